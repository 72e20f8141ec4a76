"""`llamagate serve`'s flags, made from the settings `load_config` reads.

Every setting has a flag named after its variable (`PORT` → `--port`, `MODEL_PATH` →
`--model-path`); `--help` lists them with their variable, default and accepted form as
core.config.settings() reports them, so the help cannot drift from the reader. A flag is
not read into the configuration here: `parse` returns the flags as an overlay of
environment variables that wins over the environment, and core.config stays the one
reader of settings. Secrets (the fields Config keeps out of its repr) have no flag: a
command line is visible to anyone who can run `ps`.
"""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Sequence

from core.config import Setting, settings
from llamagate.setting_help import SECTIONS

DESCRIPTION = """\
Run the service: the gateway (OpenAI API) on PORT, the health tier (/ping, /health) on
PORT_HEALTH and a supervised llama-server (or BACKEND_URL's).

Every setting is read from its environment variable (or .env with `make run`); a flag
sets it for this run and wins over the environment. Booleans take true/false, and a
bare boolean flag means true. docs/configuration.md explains each setting at length."""


class UsageError(Exception):
    """A command line that names an unknown flag, a secret or a stray argument."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # argparse would print and exit here; the caller prints, so tests see one message
        raise UsageError(message)


def _shown(value: object) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return " ".join(map(str, value)) or "empty"
    return str(value)


def _metavar(setting: Setting) -> str:
    form = setting.form
    if form.startswith("an integer"):
        return "N"
    if form.startswith("a number of seconds"):
        return "SECONDS"
    if form.startswith("true or false"):
        return "BOOL"
    if form.startswith("one of "):
        return "{" + form[len("one of "):].replace(", ", ",") + "}"
    if form.startswith("an http"):
        return "URL"
    if setting.name.endswith(("_PATH", "_DIR", "_FILE", "_DB")):
        return "PATH"
    return "VALUE"


def parser() -> _Parser:
    p = _Parser(prog="llamagate serve", usage="%(prog)s [--SETTING VALUE ...]",
                description=DESCRIPTION, allow_abbrev=False,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    known = {s.name: s for s in settings()}
    secrets = [s for s in known.values() if s.secret]
    placed: set[str] = set()
    for title, meanings in SECTIONS:
        group = p.add_argument_group(title)
        for name, meaning in meanings.items():
            if name in known and not known[name].secret:
                _add(group, known[name], meaning)
                placed.add(name)
    rest = [s for s in known.values() if s.name not in placed and not s.secret]
    if rest:  # a setting added without its line in setting_help (a test catches it)
        group = p.add_argument_group("other")
        for setting in rest:
            _add(group, setting, "see docs/configuration.md")
    p.epilog = ("environment only (secrets: a flag would show in `ps`): "
                + ", ".join(s.name for s in secrets))
    return p


def _add(group: argparse._ArgumentGroup, setting: Setting, meaning: str) -> None:
    form = "" if setting.form == "text" else f"; {setting.form}"
    text = f"{meaning} [{setting.name}; default {_shown(setting.default)}{form}]"
    boolean = setting.form.startswith("true or false")
    group.add_argument(setting.flag, dest=setting.name, metavar=_metavar(setting),
                       nargs="?" if boolean else None, const="true" if boolean else None,
                       help=text.replace("%", "%%"))


def _unknown(token: str, flags: list[str], secrets: dict[str, str]) -> str:
    if not token.startswith("-"):
        return f"unexpected argument {token!r}: settings are given as --name value"
    flag = token.split("=", 1)[0]
    if flag in secrets:
        return (f"{flag}: {secrets[flag]} is a secret and is read from the environment only "
                "(a command line shows in `ps`)")
    close = difflib.get_close_matches(flag, flags, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]}?)" if close else " (llamagate serve --help lists them)"
    return f"unknown option {flag}{hint}"


def parse(argv: Sequence[str]) -> dict[str, str]:
    """The command line as environment variables (``{"PORT": "9000"}``); raises UsageError.
    `--help` prints the help and exits 0 (argparse's SystemExit)."""
    p = parser()
    args, unknown = p.parse_known_args(list(argv))
    if unknown:
        every = settings()
        flags = [s.flag for s in every if not s.secret] + ["--help"]
        raise UsageError(_unknown(unknown[0], flags, {s.flag: s.name for s in every if s.secret}))
    return {name: value for name, value in vars(args).items() if value is not None}


def explain(problems: list[str], overlay: dict[str, str]) -> list[str]:
    """A bad value names its variable (core.config); say which came from a flag."""
    out = []
    for problem in problems:
        name = problem.split("=", 1)[0].split(" ", 1)[0]
        if name in overlay:
            problem = f"{'--' + name.lower().replace('_', '-')} (command line): {problem}"
        out.append(problem)
    return out
