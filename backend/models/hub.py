"""The one place that talks to the Hugging Face Hub.

Built on huggingface_hub's public helpers (``hf_hub_url``, ``get_hf_file_metadata``,
``HfApi.model_info``, the shared ``get_session`` client, ``hf_raise_for_status``) but
not on ``hf_hub_download``: since 1.x it writes to a per-process temporary file and
deletes it on failure, so a download can neither resume after a crash nor report
progress finer than its 10 MB read size. Here the body is streamed with a ``Range``
header into a partial file we own.

Every huggingface_hub / httpx2 error is turned into a ``PullError`` subclass whose
message tells the operator what to do; nothing from those libraries leaks out.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx2
from huggingface_hub import (
    HfApi,
    constants,
    get_hf_file_metadata,
    get_session,
    hf_hub_url,
    hf_raise_for_status,
)
from huggingface_hub.errors import (
    FileMetadataError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

# Exported lazily by huggingface_hub.utils, which mypy cannot see through.
from huggingface_hub.utils import build_hf_headers  # type: ignore[attr-defined]

from backend.models.errors import (
    AccessDenied,
    BadPullRequest,
    HubUnavailable,
    RemoteNotFound,
)

LIBRARY = "llamagate"
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class RemoteFile:
    repo: str
    filename: str
    commit: str
    size: int
    etag: str
    url: str  # where the bytes are: the resolve URL, or the CDN location it redirects to

    @property
    def sha256(self) -> str | None:
        """The Hub's LFS sha256 (the ETag of an LFS file); None for small git files."""
        return self.etag if _SHA256_RE.fullmatch(self.etag) else None


@dataclass
class Body:
    offset: int  # where these bytes start in the file: the asked start, or 0 if Range was ignored
    chunks: Iterator[bytes]


class HubClient:
    """Blocking calls; the pull workers run them in threads."""

    def __init__(
        self, endpoint: str | None = None, token: str | None = None, *, timeout_s: float = 10.0
    ) -> None:
        # None defers to huggingface_hub's own settings: HF_ENDPOINT (read when it was
        # imported) and HF_TOKEN or the stored login. Pass them explicitly to be sure.
        self.endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
        self._token = token
        self._timeout = timeout_s

    def list_files(self, repo: str, revision: str) -> list[str]:
        api = HfApi(endpoint=self.endpoint, token=self._token, library_name=LIBRARY)
        with self._errors(f"listing {repo}@{revision}", repo, revision):
            info = api.model_info(repo, revision=revision, timeout=self._timeout)
        return [s.rfilename for s in info.siblings or []]

    def resolve(self, repo: str, filename: str, revision: str) -> RemoteFile:
        """HEAD the file: commit, size, ETag (= sha256 for LFS files) and download URL."""
        url = hf_hub_url(repo, filename, revision=revision, endpoint=self.endpoint)
        with self._errors(f"{repo}/{filename}@{revision}", repo, revision, filename):
            meta = get_hf_file_metadata(
                url,
                token=self._token,
                timeout=self._timeout,
                library_name=LIBRARY,
                endpoint=self.endpoint,
            )
        if meta.commit_hash is None or meta.etag is None or meta.size is None:
            raise HubUnavailable(
                f"{self.endpoint} answered without commit, ETag or size for {repo}/{filename};"
                " check that HF_ENDPOINT points to a Hugging Face Hub (or a faithful mirror)"
            )
        return RemoteFile(repo, filename, meta.commit_hash, meta.size, meta.etag, meta.location)

    @contextmanager
    def open_body(self, remote: RemoteFile, start: int) -> Iterator[Body]:
        """Stream the file from byte ``start``; errors while reading are translated too."""
        # Auth goes to the Hub only, never to the CDN host a large file redirects to.
        same_origin = _origin(remote.url) == _origin(self.endpoint)
        headers = build_hf_headers(token=self._token if same_origin else False, library_name=LIBRARY)
        headers["Accept-Encoding"] = "identity"  # byte offsets must be file offsets
        if start:
            headers["Range"] = f"bytes={start}-"
        what = f"{remote.repo}/{remote.filename}"
        with (
            self._errors(what, remote.repo, remote.commit, remote.filename),
            get_session().stream(
                "GET", remote.url, headers=headers, timeout=self._timeout, follow_redirects=True
            ) as response,
        ):
            hf_raise_for_status(response)
            offset = start if response.status_code == 206 else 0
            content_range = response.headers.get("Content-Range", "")
            if offset and not content_range.startswith(f"bytes {start}-"):
                raise HubUnavailable(f"{what}: asked for bytes {start}-, got {content_range!r}")
            yield Body(offset, response.iter_bytes())

    @contextmanager
    def _errors(self, what: str, repo: str, revision: str, filename: str | None = None) -> Iterator[None]:
        page = f"{self.endpoint}/{repo}"
        try:
            yield
        except GatedRepoError as exc:
            raise AccessDenied(
                f"{what}: {repo} is gated. Accept its conditions on {page} with your account,"
                " then set HF_TOKEN to a read token of that account"
            ) from exc
        except RepositoryNotFoundError as exc:
            if _status(exc) in (401, 403):
                raise AccessDenied(
                    f"{what}: {repo} does not exist or is private; check the repo id, and set"
                    " HF_TOKEN to a token with access if it is private"
                ) from exc
            raise RemoteNotFound(f"{what}: repository {repo} not found; check the id") from exc
        except RevisionNotFoundError as exc:
            raise RemoteNotFound(
                f"{what}: revision {revision!r} not found in {repo}; use a branch, tag or commit"
            ) from exc
        except RemoteEntryNotFoundError as exc:
            raise RemoteNotFound(
                f"{what}: no file {filename!r} in {repo} at {revision}; see the file list at"
                f" {page}/tree/{revision}"
            ) from exc
        except HFValidationError as exc:
            raise BadPullRequest(f"{what}: {exc}") from exc
        except HfHubHTTPError as exc:
            status = _status(exc)
            if status in (401, 403):
                raise AccessDenied(
                    f"{what}: HTTP {status} from the Hub; set HF_TOKEN to a token with access"
                ) from exc
            raise HubUnavailable(f"{what}: the Hub answered HTTP {status}; retry later") from exc
        except OfflineModeIsEnabled as exc:
            raise HubUnavailable(f"{what}: HF_HUB_OFFLINE is set; unset it to pull") from exc
        except FileMetadataError as exc:
            raise HubUnavailable(
                f"{what}: {self.endpoint} does not answer like a Hugging Face Hub ({exc})"
            ) from exc
        except httpx2.TransportError as exc:
            raise HubUnavailable(
                f"{what}: cannot reach {self.endpoint} ({type(exc).__name__}: {exc});"
                " check the network, proxy settings and HF_ENDPOINT"
            ) from exc


def _status(exc: HfHubHTTPError) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port
