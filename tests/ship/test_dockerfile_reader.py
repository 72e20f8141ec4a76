"""The Dockerfile and .dockerignore readers the image tests rely on."""

from __future__ import annotations

import pytest

from tests.ship.dockerfile import parse, parse_env
from tests.ship.dockerignore import DockerIgnore

SAMPLE = """# syntax=docker/dockerfile:1
ARG BASE=debian
ARG TAG=12
FROM ${BASE}:${TAG} AS build
ARG TAG
ARG MODE="fast"
RUN echo one \\
    # a comment inside a continuation
    && echo two

RUN ["echo", "exec"]
FROM scratch
ENV A=1 B="two words" \\
    C=$A
ENV LEGACY some value
HEALTHCHECK --interval=5s --timeout=2s \\
  CMD ["true"]
USER ${NOBODY:-65534}
"""


def test_stages_arguments_and_continuations() -> None:
    df = parse(SAMPLE)
    assert df.global_args == {"BASE": "debian", "TAG": "12"}
    build, final = df.stages
    assert (build.base, build.name, build.args) == ("debian:12", "build", {"TAG": "12", "MODE": "fast"})
    assert build.base_source == "${BASE}:${TAG}"
    first, second = build.all("RUN")
    assert first.value == "echo one && echo two" and first.line == 7
    assert first.exec_form() is None and second.exec_form() == ["echo", "exec"]
    assert final.base == "scratch" and final.name is None and df.final is final
    assert final.env() == {"A": "1", "B": "two words", "C": "$A", "LEGACY": "some value"}
    flags, rest = final.one("HEALTHCHECK").flags()
    assert flags == {"interval": "5s", "timeout": "2s"} and rest == 'CMD ["true"]'
    assert final.substitute(final.one("USER").value) == "65534"


def test_heredocs_are_refused_not_misread() -> None:
    with pytest.raises(ValueError, match="heredoc"):
        parse("FROM scratch\nRUN <<EOF\necho hi\nEOF\n")


def test_env_words_need_an_equals_sign() -> None:
    with pytest.raises(ValueError):
        parse_env("A=1 B")


def test_dockerignore_last_match_wins_and_directories_cover_their_contents() -> None:
    ignore = DockerIgnore("*\n!src/\n!tools/build.sh\n**/__pycache__\n# comment\n")
    assert ignore.excluded(".git/config") and ignore.excluded("README.md")
    assert not ignore.excluded("src/a/b.py")
    assert ignore.excluded("src/a/__pycache__/b.pyc")
    assert not ignore.excluded("tools/build.sh") and ignore.excluded("tools/other.sh")
