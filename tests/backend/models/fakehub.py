"""A stand-in for the Hugging Face Hub, served on 127.0.0.1, with misbehaviour switches.

It answers what huggingface_hub 2.x asks (read from its source):

- ``GET /api/models/{owner}/{name}[/revision/{rev}]`` -> ``{id, sha, siblings}``
  (``HfApi.model_info``; ``?blobs=true`` adds sizes and LFS sha256);
- ``HEAD /{owner}/{name}/resolve/{rev}/{file}`` (``get_hf_file_metadata``): for an
  LFS file the real Hub answers 302 to a CDN host with ``X-Repo-Commit``,
  ``X-Linked-Etag`` (the sha256) and ``X-Linked-Size``; here the "CDN" is a second
  port, so the redirect leaves the Hub's origin as it does in production. With
  ``redirect=False`` the file is answered directly (200, ``ETag``, ``Content-Length``);
- ``GET`` of the same URL (302 again, or the body) and ``GET /cdn/{sha256}``, with
  ``Range: bytes=N-`` answered 206 + ``Content-Range``;
- errors as the Hub signals them: ``X-Error-Code`` = RepoNotFound, RevisionNotFound,
  EntryNotFound, GatedRepo (``hf_raise_for_status`` keys on that header).

Files live in ``root/{owner}/{name}/{path}``. The only revision is ``main``, whose
commit is sha1(repo id).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web


@dataclass
class Switches:
    chunk_size: int = 64 * 1024
    chunk_delay_s: float = 0.0  # per chunk: throttles the body
    fail_after_bytes: int | None = None  # drop the connection after this many body bytes
    fail_times: int = 1  # ... in this many responses (then behave)
    ignore_range: bool = False  # answer 200 with the whole file even when asked a range
    redirect: bool = True  # LFS files via a 302 to the "CDN" port, as the Hub does
    gated: set[str] = field(default_factory=set)  # repo ids answering 401 GatedRepo
    corrupt: set[str] = field(default_factory=set)  # file paths served with one byte flipped
    down_for: int = 0  # answer this many API and resolve requests 503 (a Hub outage)


@dataclass
class Served:
    method: str
    path: str
    range: str | None
    status: int
    body_bytes: int = 0


class FakeHub:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.switches = Switches()
        self.log: list[Served] = []
        self._runner: web.AppRunner | None = None
        self.endpoint = ""
        self.cdn = ""

    # -- content ---------------------------------------------------------------
    def add_file(self, repo: str, path: str, data: bytes) -> str:
        """Put a file in a repo; returns its sha256."""
        target = self.root / repo / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        return hashlib.sha256(data).hexdigest()

    @staticmethod
    def commit(repo: str) -> str:
        return hashlib.sha1(repo.encode()).hexdigest()

    def body_bytes(self) -> int:
        return sum(s.body_bytes for s in self.log)

    # -- lifecycle ---------------------------------------------------------------
    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        ports = []
        for _ in range(2):  # hub, cdn
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
            await web.SockSite(self._runner, sock).start()
        self.endpoint = f"http://127.0.0.1:{ports[0]}"
        self.cdn = f"http://127.0.0.1:{ports[1]}"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # -- routing -----------------------------------------------------------------
    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        parts = request.path.strip("/").split("/")
        if self.switches.down_for > 0 and parts[:1] != ["cdn"]:
            self.switches.down_for -= 1
            return self._error(request, 503, None, "the Hub is down for maintenance")
        if parts[:1] == ["cdn"] and len(parts) == 2:
            return await self._cdn(request, parts[1])
        if parts[:2] == ["api", "models"] and len(parts) in (4, 6):
            return self._model_info(request, "/".join(parts[2:4]), parts[5] if len(parts) == 6 else "main")
        if len(parts) >= 5 and parts[2] == "resolve":
            return await self._resolve(request, "/".join(parts[:2]), parts[3], "/".join(parts[4:]))
        return self._error(request, 404, None, "no such route")

    def _error(
        self, request: web.Request, status: int, code: str | None, message: str, **extra: str
    ) -> web.Response:
        headers = {"X-Error-Message": message, **extra}
        if code:
            headers["X-Error-Code"] = code
        self.log.append(Served(request.method, request.path, request.headers.get("Range"), status))
        return web.Response(
            status=status,
            text=json.dumps({"error": message}),
            headers=headers,
            content_type="application/json",
        )

    def _check_repo(self, request: web.Request, repo: str, revision: str) -> web.Response | None:
        if repo in self.switches.gated:
            return self._error(request, 401, "GatedRepo", f"Access to model {repo} is restricted.")
        if not (self.root / repo).is_dir():
            return self._error(request, 404, "RepoNotFound", "Repository not found")
        if revision not in ("main", self.commit(repo)):
            return self._error(request, 404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return None

    def _model_info(self, request: web.Request, repo: str, revision: str) -> web.Response:
        problem = self._check_repo(request, repo, revision)
        if problem is not None:
            return problem
        base = self.root / repo
        siblings = []
        for path in sorted(p for p in base.rglob("*") if p.is_file()):
            rel = path.relative_to(base).as_posix()
            entry: dict[str, object] = {"rfilename": rel}
            if request.query.get("blobs"):
                data = path.read_bytes()
                sha = hashlib.sha256(data).hexdigest()
                entry.update(
                    size=len(data),
                    blobId=sha[:40],
                    lfs={"size": len(data), "sha256": sha, "pointerSize": 130},
                )
            siblings.append(entry)
        self.log.append(Served(request.method, request.path, None, 200))
        return web.json_response({"id": repo, "sha": self.commit(repo), "siblings": siblings})

    def _file(self, repo: str, path: str) -> Path | None:
        target = (self.root / repo / path).resolve()
        return target if target.is_file() and target.is_relative_to(self.root.resolve()) else None

    async def _resolve(self, request: web.Request, repo: str, revision: str, path: str) -> web.StreamResponse:
        problem = self._check_repo(request, repo, revision)
        if problem is not None:
            return problem
        target = self._file(repo, path)
        commit = self.commit(repo)
        if target is None:
            return self._error(
                request, 404, "EntryNotFound", f"{path} does not exist", **{"X-Repo-Commit": commit}
            )
        data = target.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        headers = {"X-Repo-Commit": commit, "Accept-Ranges": "bytes"}
        if self.switches.redirect:
            headers.update(
                {
                    "X-Linked-Etag": f'"{sha}"',
                    "X-Linked-Size": str(len(data)),
                    "ETag": f'"{sha}"',
                    "Location": f"{self.cdn}/cdn/{sha}?repo={repo}&path={path}",
                }
            )
            self.log.append(Served(request.method, request.path, request.headers.get("Range"), 302))
            return web.Response(status=302, headers=headers)
        headers["ETag"] = f'"{sha}"'
        return await self._body(request, data, path, headers)

    async def _cdn(self, request: web.Request, sha: str) -> web.StreamResponse:
        repo, path = request.query.get("repo", ""), request.query.get("path", "")
        target = self._file(repo, path)
        if target is None:
            return self._error(request, 404, None, "no such blob")
        data = target.read_bytes()
        if hashlib.sha256(data).hexdigest() != sha:
            return self._error(request, 404, None, "stale blob")
        return await self._body(request, data, path, {"ETag": f'"{sha}"', "Accept-Ranges": "bytes"})

    async def _body(
        self, request: web.Request, data: bytes, path: str, headers: dict[str, str]
    ) -> web.StreamResponse:
        if path in self.switches.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        start, status = 0, 200
        asked = request.headers.get("Range")
        if asked and not self.switches.ignore_range:
            start = int(asked.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                return self._error(
                    request, 416, None, "range not satisfiable", **{"Content-Range": f"bytes */{len(data)}"}
                )
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        served = Served(request.method, request.path, asked, status)
        self.log.append(served)
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = len(data) - start
        await response.prepare(request)
        if request.method == "HEAD":
            return response
        sw = self.switches
        fail_at = sw.fail_after_bytes if sw.fail_after_bytes is not None and sw.fail_times > 0 else None
        for offset in range(start, len(data), sw.chunk_size):
            chunk = data[offset : offset + sw.chunk_size]
            if fail_at is not None and served.body_bytes + len(chunk) > fail_at:
                sw.fail_times -= 1
                chunk = chunk[: fail_at - served.body_bytes]
                await response.write(chunk)
                served.body_bytes += len(chunk)
                assert request.transport is not None
                request.transport.close()  # the client sees the body end early
                return response
            await response.write(chunk)
            served.body_bytes += len(chunk)
            if sw.chunk_delay_s:
                await asyncio.sleep(sw.chunk_delay_s)
        await response.write_eof()
        return response
