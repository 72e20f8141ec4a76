from __future__ import annotations

from pathlib import Path

import pytest

from core.platform import Platform, detect_platform


@pytest.mark.parametrize(("env", "files", "expected"), [
    ({"RUNPOD_ENDPOINT_ID": "abc"}, [".dockerenv"], Platform.RUNPOD_SERVERLESS),
    ({"RUNPOD_POD_ID": "pod1"}, [".dockerenv"], Platform.RUNPOD_POD),
    ({"VAST_CONTAINERLABEL": "C.123"}, [".dockerenv"], Platform.VASTAI),
    ({"CONTAINER_ID": "123"}, [".dockerenv", "workspace/"], Platform.VASTAI),
    ({"LAMBDA_INSTANCE_ID": "i-1"}, [], Platform.LAMBDA),
    ({}, ["etc/lambda-stack-version"], Platform.LAMBDA),
    ({}, [".dockerenv"], Platform.DOCKER),
    ({}, ["run/.containerenv"], Platform.DOCKER),
    ({}, [], Platform.BARE_METAL),
    ({"PLATFORM": "vastai"}, [".dockerenv"], Platform.VASTAI),
])
def test_detect_platform(tmp_path: Path, env: dict[str, str], files: list[str],
                         expected: Platform) -> None:
    for name in files:
        path = tmp_path / name
        if name.endswith("/"):
            path.mkdir(parents=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
    assert detect_platform(env, tmp_path) == expected
