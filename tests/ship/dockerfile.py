"""A small reader of Dockerfiles for the image tests.

Enough of the syntax for the project's two Dockerfiles: comments and parser directives, line
continuations, exec (JSON) and shell forms, stages (`FROM image AS name`), `ENV` in both forms,
and `$NAME` / `${NAME}` / `${NAME:-default}` substitution from `ARG` defaults. Heredocs are not
supported; `parse` refuses them rather than misreading one.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field

_SUBST = re.compile(r"\$(?:\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}"
                    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))")


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case
    value: str  # everything after the keyword, continuations joined
    line: int  # 1-based line of the keyword

    def exec_form(self) -> list[str] | None:
        """The JSON array form's items, or None for the shell form."""
        if not self.value.startswith("["):
            return None
        try:
            items = json.loads(self.value)
        except ValueError:
            return None
        return items if isinstance(items, list) and all(isinstance(i, str) for i in items) else None

    def flags(self) -> tuple[dict[str, str], str]:
        """Leading `--name=value` flags (COPY --from, HEALTHCHECK --interval) and the rest."""
        found: dict[str, str] = {}
        rest = self.value
        while (m := re.match(r"--([a-z-]+)=(\S+)\s*", rest)) is not None:
            found[m.group(1)] = m.group(2)
            rest = rest[m.end():]
        return found, rest


@dataclass
class Stage:
    base: str  # FROM's image, arguments substituted
    name: str | None
    base_source: str  # FROM's image as written
    args: dict[str, str]  # ARG defaults in scope at the end of the stage
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def one(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        assert len(found) == 1, f"expected one {keyword} in stage {self.name or self.base}, got {len(found)}"
        return found[0]

    def env(self) -> dict[str, str]:
        """Every ENV of the stage, in order (later wins), values unsubstituted."""
        env: dict[str, str] = {}
        for ins in self.all("ENV"):
            env.update(parse_env(ins.value))
        return env

    def run_text(self) -> str:
        return "\n".join(i.value for i in self.all("RUN"))

    def substitute(self, text: str) -> str:
        return substitute(text, self.args)


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)


def substitute(text: str, args: dict[str, str]) -> str:
    def repl(m: re.Match[str]) -> str:
        name = m.group("braced") or m.group("bare")
        value = args.get(name, "")
        if not value and m.group("default") is not None:
            return m.group("default")
        return value
    return _SUBST.sub(repl, text)


def parse_env(value: str) -> dict[str, str]:
    """`ENV a=1 b="x y"` or the legacy `ENV name value with spaces`."""
    words = shlex.split(value)
    if words and "=" not in words[0]:
        return {words[0]: value.split(None, 1)[1] if len(words) > 1 else ""}
    out = {}
    for word in words:
        name, sep, val = word.partition("=")
        if not sep:
            raise ValueError(f"ENV word without '=': {word!r}")
        out[name] = val
    return out


def _parse_arg(value: str) -> tuple[str, str | None]:
    [word] = shlex.split(value)
    name, sep, default = word.partition("=")
    return name, default if sep else None


def logical_lines(text: str) -> list[tuple[int, str]]:
    """(first line number, text) per instruction: comments dropped, continuations joined."""
    out: list[tuple[int, str]] = []
    parts: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue  # blank lines and comments (and parser directives) vanish, also mid-instruction
        if not parts:
            start = number
        if stripped.endswith("\\"):
            parts.append(stripped[:-1].strip())
            continue
        parts.append(stripped)
        out.append((start, " ".join(p for p in parts if p)))
        parts = []
    if parts:
        raise ValueError(f"line {start}: continuation runs off the end of the file")
    return out


def parse(text: str) -> Dockerfile:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for number, line in logical_lines(text):
        keyword, _, value = line.partition(" ")
        keyword, value = keyword.upper(), value.strip()
        if "<<" in value and keyword in ("RUN", "COPY"):
            raise ValueError(f"line {number}: heredocs are not supported by this reader")
        if keyword == "FROM":
            words = value.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=substitute(words[0], global_args), name=name,
                                base_source=words[0], args={}))
            continue
        if keyword == "ARG":
            name, default = _parse_arg(value)
            if not stages:
                global_args[name] = default or ""
            else:
                # a bare `ARG NAME` in a stage brings the global value into scope
                stages[-1].args[name] = default if default is not None else global_args.get(name, "")
            continue
        if not stages:
            raise ValueError(f"line {number}: {keyword} before the first FROM")
        stages[-1].instructions.append(Instruction(keyword, value, number))
    return Dockerfile(global_args, stages)
