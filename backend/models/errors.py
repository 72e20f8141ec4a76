"""Every error the models package raises, in one tree.

    ModelsError
    ├── InvalidGGUF          a file is not a readable GGUF (bad magic, truncated, corrupt)
    ├── ValidationError      an override patch is malformed (names each field)
    ├── ProfileError         a profiles file is malformed (names each line and field)
    ├── UnknownModel         no model of that name in the registry
    ├── JobNotFound          no pull job with that id
    └── PullError            a pull cannot start or did not finish; ``str()`` is the job's error
        ├── BadPullRequest       malformed repo id, or a pattern that matches no / several models
        ├── UnsafePath           a file name that would land outside MODELS_DIR
        ├── RemoteNotFound       repo, revision or file does not exist on the Hub
        ├── AccessDenied         gated or private repo (401/403)
        ├── HubUnavailable       network failure or Hub-side error
        ├── NotEnoughSpace       the download cannot fit on the models disk
        ├── DestinationExists    a different file already sits at the destination
        ├── StorageError         MODELS_DIR cannot be written (disk full, permissions)
        ├── VerificationFailed   size or sha256 of the downloaded bytes is wrong
        └── PullCancelled        the job was cancelled

``code`` is a stable machine-readable string for the gateway's error envelope;
``http_status`` is the status an admin route should answer with when the error is
raised synchronously (a failed job is still a 200 with ``state: failed``).
"""

from __future__ import annotations

from collections.abc import Sequence


class ModelsError(Exception):
    code = "models_error"
    http_status = 500


class InvalidGGUF(ModelsError):
    code = "invalid_gguf"
    http_status = 422

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ValidationError(ModelsError):
    """One or more fields of a patch are wrong; ``problems`` is [(field, message)]."""

    code = "invalid_override"
    http_status = 400

    def __init__(self, problems: Sequence[tuple[str, str]]) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(f"{field}: {message}" for field, message in self.problems))


class ProfileError(ModelsError):
    """One or more problems in a profiles file; ``problems`` is [(line, field, message)]."""

    code = "invalid_profile"
    http_status = 400

    def __init__(self, source: str, problems: Sequence[tuple[int, str, str]]) -> None:
        self.source = source
        self.problems = tuple(problems)
        super().__init__(
            "\n".join(
                f"{source}:{line}: {field}: {message}" if field else f"{source}:{line}: {message}"
                for line, field, message in self.problems
            )
        )


class UnknownModel(ModelsError):
    code = "model_not_found"
    http_status = 404

    def __init__(self, name: str) -> None:
        super().__init__(f"no model named {name!r}")
        self.name = name


class JobNotFound(ModelsError):
    code = "job_not_found"
    http_status = 404

    def __init__(self, job_id: str) -> None:
        super().__init__(f"no pull job with id {job_id!r}")
        self.job_id = job_id


class PullError(ModelsError):
    code = "pull_failed"
    http_status = 502


class BadPullRequest(PullError):
    code = "bad_pull_request"
    http_status = 400


class UnsafePath(PullError):
    code = "unsafe_path"
    http_status = 400


class RemoteNotFound(PullError):
    code = "remote_not_found"
    http_status = 404


class AccessDenied(PullError):
    code = "access_denied"
    http_status = 403


class HubUnavailable(PullError):
    code = "hub_unavailable"
    http_status = 502


class NotEnoughSpace(PullError):
    code = "not_enough_space"
    http_status = 507


class DestinationExists(PullError):
    code = "destination_exists"
    http_status = 409


class StorageError(PullError):
    code = "storage_error"
    http_status = 507


class VerificationFailed(PullError):
    code = "verification_failed"
    http_status = 502


class PullCancelled(PullError):
    code = "cancelled"
    http_status = 409
