"""Which paths a `.dockerignore` keeps in the build context.

The rules of Docker's pattern matcher, as far as the project's file uses them: patterns are
matched against slash-separated paths relative to the context root with Go's filepath.Match
syntax plus `**` (any number of directories); a pattern matching a directory matches
everything below it; `!` re-includes; the last matching pattern wins.
"""

from __future__ import annotations

import re
from pathlib import Path


def _regex(pattern: str) -> re.Pattern[str]:
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + "$")


class DockerIgnore:
    def __init__(self, text: str) -> None:
        self.rules: list[tuple[bool, re.Pattern[str]]] = []
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            pattern = line[1:].strip() if negate else line
            pattern = pattern.strip("/") or "."
            self.rules.append((negate, _regex(pattern)))

    @classmethod
    def read(cls, path: Path) -> DockerIgnore:
        return cls(path.read_text())

    def excluded(self, path: str) -> bool:
        """Whether `path` (relative, slash-separated) stays out of the build context."""
        parts = path.strip("/").split("/")
        prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
        excluded = False
        for negate, regex in self.rules:
            if any(regex.match(p) for p in prefixes):
                excluded = not negate
        return excluded
