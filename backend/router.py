"""llama-server's router mode: the preset file that names the models, and its /models API.

In router mode one llama-server process (the router) starts a child llama-server
per model on demand, proxies each request by its "model" field, keeps at most
``--models-max`` children (least recently used unloaded first) and reports each
model's status on ``GET /models``. docs/models.md explains why llamagate uses it
instead of supervising several llama-server processes itself.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp

log = logging.getLogger("llamagate.backend.router")


@dataclass(frozen=True)
class RoutedModel:
    """One preset section: a served name and the llama-server settings of its child."""

    name: str
    path: Path
    ctx: int | None = None
    ngl: int | None = None
    parallel: int | None = None
    extra_args: tuple[str, ...] = ()
    preload: bool = False
    fallback: str | None = None


@dataclass(frozen=True)
class RouterStatus:
    state: str  # unloaded | loading | loaded | sleeping | failed
    exit_code: int = 0
    # the child's port in its last launch: the router prefixes the child's log lines with it
    port: int | None = field(default=None, compare=False)


def _ini_value(value: str) -> str:
    if any(c in value for c in "\n\r"):
        raise ValueError(f"a llama-server setting may not contain a line break: {value!r}")
    return value


_NUMBER = re.compile(r"-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _is_value(arg: str) -> bool:
    """An argv entry that is an option's value rather than the next option: anything not
    starting with a dash, a lone "-", or a negative number (`--n-gpu-layers -1`)."""
    return not arg.startswith("-") or arg == "-" or _NUMBER.fullmatch(arg) is not None


def args_to_options(args: Sequence[str]) -> list[tuple[str, str]]:
    """`--flash-attn on --jinja --no-mmap` → [("flash-attn", "on"), ("jinja", "true"),
    ("no-mmap", "true")].

    Preset keys are llama-server's option names without the dashes (long or short). A
    flag with no value is written as true. `--no-foo` stays `no-foo = true`: llama-server
    reads a negated key as the negation of its option, and some flags are named `--no-…`
    with no positive form (`--no-host`), where `host = false` would set another option.
    """
    options: list[tuple[str, str]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if _is_value(arg):
            raise ValueError(f"expected an option, got {arg!r} (in {' '.join(args)!r})")
        key, eq, inline = arg.lstrip("-").partition("=")
        if not key:
            raise ValueError(f"expected an option, got {arg!r} (in {' '.join(args)!r})")
        if eq:
            options.append((key, _ini_value(inline)))
        elif i + 1 < len(args) and _is_value(args[i + 1]):
            options.append((key, _ini_value(args[i + 1])))
            i += 1
        else:
            options.append((key, "true"))
        i += 1
    return options


def preset_text(models: Sequence[RoutedModel], common: Sequence[tuple[str, str]]) -> str:
    """The INI file given to --models-preset: `[*]` holds what every child shares."""
    lines = ["; written by llamagate at start and on profile switches; edits are overwritten", "[*]"]
    lines += [f"{k} = {_ini_value(v)}" for k, v in common]
    for m in models:
        if not m.name or any(c in m.name for c in "[]\n\r;#="):
            raise ValueError(f"model name {m.name!r} cannot be a preset section")
        lines += ["", f"[{m.name}]", f"model = {_ini_value(str(m.path))}"]
        if m.ctx is not None:
            lines.append(f"ctx-size = {m.ctx}")
        if m.ngl is not None:
            lines.append(f"n-gpu-layers = {m.ngl}")
        if m.parallel is not None:
            lines.append(f"parallel = {m.parallel}")
        lines += [f"{k} = {v}" for k, v in args_to_options(m.extra_args)]
    return "\n".join(lines) + "\n"


def parse_models(listing: object) -> dict[str, RouterStatus]:
    """The router's `GET /models` answer → served name → status."""
    result: dict[str, RouterStatus] = {}
    data = listing.get("data") if isinstance(listing, dict) else None
    for entry in data if isinstance(data, list) else []:
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
            continue
        status: Any = entry.get("status") or {}
        value = str(status.get("value", "unknown")) if isinstance(status, dict) else "unknown"
        exit_code = int(status.get("exit_code", 0) or 0) if isinstance(status, dict) else 0
        if isinstance(status, dict) and status.get("failed"):
            value = "failed"
        result[entry["id"]] = RouterStatus(value, exit_code, _port_of(status))
    return result


def _port_of(status: object) -> int | None:
    args = status.get("args") if isinstance(status, dict) else None
    if not isinstance(args, list):
        return None
    for flag, value in zip(args, args[1:], strict=False):
        if flag == "--port" and isinstance(value, str) and value.isdigit() and value != "0":
            return int(value)
    return None


class RouterClient:
    """Talks to the router's model-management endpoints with the backend key."""

    def __init__(self, base_url: str, key: str, session: aiohttp.ClientSession) -> None:
        self._base = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {key}"}
        self._session = session

    async def models(self, reload: bool = False) -> dict[str, RouterStatus]:
        url = f"{self._base}/models" + ("?reload=1" if reload else "")
        async with self._session.get(url, headers=self._headers,
                                     timeout=aiohttp.ClientTimeout(total=10)) as resp:
            resp.raise_for_status()
            return parse_models(await resp.json())

    async def busy(self, name: str) -> bool:
        """Whether a request is being processed on the model (its child's /slots, through the
        router, never loading it); False when that cannot be told."""
        url = f"{self._base}/slots?model={quote(name, safe='')}&autoload=false"
        try:
            async with self._session.get(url, headers=self._headers,
                                         timeout=aiohttp.ClientTimeout(total=5)) as resp:
                if resp.status != 200:
                    return False
                slots = await resp.json()
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return False
        return isinstance(slots, list) and any(
            isinstance(slot, dict) and slot.get("is_processing") for slot in slots)

    async def load(self, name: str) -> None:
        await self._post("/models/load", name)

    async def unload(self, name: str) -> None:
        await self._post("/models/unload", name)

    async def _post(self, path: str, name: str) -> None:
        async with self._session.post(f"{self._base}{path}", json={"model": name},
                                      headers=self._headers,
                                      timeout=aiohttp.ClientTimeout(total=30)) as resp:
            if resp.status >= 400:
                text = (await resp.text())[:300]
                raise RouterError(f"{path} {name}: HTTP {resp.status} {text}")


class RouterError(RuntimeError):
    pass
