"""The workers' catalog while BACKEND_URL's model list is not known yet: every request
refused with 503 (no name becomes a label value), until serve's state says otherwise."""

from __future__ import annotations

import pytest

from gateway.admin.catalog import ModelCatalog
from gateway.errors import BackendUnavailable


def test_an_unknown_list_refuses_every_name_until_it_is_read() -> None:
    catalog = ModelCatalog((), known=False)
    for name in ("anything", None):
        with pytest.raises(BackendUnavailable) as refused:
            catalog.resolve(name)
        assert refused.value.status == 503 and refused.value.retry_after == 5
    catalog.update({"models": ["tiny"], "models_known": True, "mode": "external"})
    assert catalog.resolve("tiny") == "tiny" and catalog.resolve(None) == "tiny"
    assert catalog.resolve("other") == "tiny"  # one model: any name reaches it (issue 26)
    catalog.update({"models": ["tiny", "tiny-b"], "models_known": True, "mode": "external"})
    assert catalog.resolve("other") is None


def test_a_refusal_or_a_404_is_never_from_an_older_state_than_serve_published() -> None:
    published = {"models": ["tiny"], "models_known": False}
    catalog = ModelCatalog((), known=False)
    catalog.reread = lambda: catalog.update(published)
    published["models_known"] = True  # serve has read the list; the worker has not looked yet
    assert catalog.resolve("tiny") == "tiny"
    published["models"] = ["tiny-2"]  # the backend came back serving another model
    assert catalog.resolve("tiny-2") == "tiny-2"
    assert catalog.resolve("tiny") == "tiny-2"  # one model: any name reaches it (issue 26)
    published["models"] = ["tiny-2", "tiny-3"]  # and then several others
    assert catalog.resolve("tiny-3") == "tiny-3"
    assert catalog.resolve("tiny") is None


def test_a_state_without_the_flag_is_known() -> None:
    catalog = ModelCatalog(("a",))
    catalog.update({"models": ["a", "b"], "mode": "router"})
    assert catalog.known and catalog.resolve("b") == "b"
