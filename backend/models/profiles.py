"""Serving profiles: named sets of models to run, loaded from YAML with line-exact errors.

    profiles:
      daily:
        description: everyday chat      # optional
        models:
          - model: Qwen3-8B-Q4_K_M      # a registry model name (required)
            alias: chat                 # name clients use instead (optional)
            preload: true               # start at boot, not on first request
            ctx_size: 16384
            n_gpu_layers: -1
            parallel: 4
            extra_args: ["--flash-attn", "on"]
            fallback: small             # another served name of this profile
          - model: Qwen3-1.7B-Q8_0
            alias: small
      tiny: [{model: SmolLM2-135M}]     # short form: the list alone

The document is walked as yaml *nodes* (``yaml.compose``) rather than loaded into
dicts, because nodes keep their marks: every problem is reported with its line.
All problems are collected into one ``ProfileError``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

import yaml
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from backend.models import fields as rules
from backend.models.errors import ProfileError


@dataclass(frozen=True)
class ProfileModel:
    model: str
    alias: str | None = None
    preload: bool = False
    ctx_size: int | None = None
    n_gpu_layers: int | None = None
    parallel: int | None = None
    extra_args: tuple[str, ...] = ()
    fallback: str | None = None

    @property
    def served_name(self) -> str:
        return self.alias or self.model


@dataclass(frozen=True)
class Profile:
    name: str
    models: tuple[ProfileModel, ...]
    description: str | None = None


@dataclass(frozen=True)
class Profiles:
    profiles: tuple[Profile, ...]

    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.profiles)

    def get(self, name: str) -> Profile:
        for profile in self.profiles:
            if profile.name == name:
                return profile
        raise KeyError(name)


def load_profiles(path: Path, known_models: Collection[str]) -> Profiles:
    """Read and validate ``path``; an unreadable file raises OSError."""
    return parse_profiles(path.read_text(encoding="utf-8"), known_models, source=str(path))


def parse_profiles(text: str, known_models: Collection[str], *, source: str = "profiles.yaml") -> Profiles:
    """Validate ``text`` against the registry's model names; raises ``ProfileError``."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else 1
        raise ProfileError(source, [(line, "", f"YAML syntax: {exc.problem}")]) from exc
    parser = _Parser(frozenset(known_models))
    profiles = parser.document(root)
    if parser.problems:
        raise ProfileError(source, sorted(parser.problems, key=lambda p: p[0]))
    return Profiles(tuple(profiles))


def _line(node: Node) -> int:
    return node.start_mark.line + 1


_ENTRY_CHECKS: dict[str, Callable[[object], object]] = {
    "alias": rules.check_alias,
    "preload": rules.check_bool,
    "ctx_size": rules.check_ctx_size,
    "n_gpu_layers": rules.check_n_gpu_layers,
    "parallel": rules.check_parallel,
    "extra_args": rules.check_extra_args,
}
_ENTRY_KEYS = ("model", *_ENTRY_CHECKS, "fallback")


class _Parser:
    def __init__(self, known: frozenset[str]) -> None:
        self.known = known
        self.problems: list[tuple[int, str, str]] = []
        self._constructor = SafeConstructor()

    def fail(self, node: Node, field: str, message: str) -> None:
        self.problems.append((_line(node), field, message))

    def mapping(self, node: Node, field: str) -> dict[str, tuple[Node, Node]]:
        """Key -> (key node, value node); reports non-mappings, odd keys and duplicates."""
        if not isinstance(node, MappingNode):
            self.fail(node, field, "must be a mapping")
            return {}
        items: dict[str, tuple[Node, Node]] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, ScalarNode) else None
            if not isinstance(key, str):
                self.fail(key_node, field, "keys must be plain strings")
            elif key in items:
                self.fail(key_node, f"{field}.{key}" if field else key, "duplicate key")
            else:
                items[key] = (key_node, value_node)
        return items

    def value(self, node: Node) -> object:
        try:
            return self._constructor.construct_object(node, deep=True)
        except ConstructorError as exc:
            return exc  # an unconstructible value fails every check below

    def document(self, root: Node | None) -> list[Profile]:
        if root is None:
            self.problems.append((1, "profiles", "empty file; expected a 'profiles:' mapping"))
            return []
        top = self.mapping(root, "")
        for key, (key_node, _) in top.items():
            if key != "profiles":
                self.fail(key_node, key, "unknown key; accepted: profiles")
        if "profiles" not in top:
            if isinstance(root, MappingNode):
                self.fail(root, "profiles", "missing required key")
            return []
        profiles_node = top["profiles"][1]
        result = []
        for name, (name_node, body) in self.mapping(profiles_node, "profiles").items():
            if not rules.ALIAS_RE.fullmatch(name):
                self.fail(name_node, f"profiles.{name}", "names must match [A-Za-z0-9._:-]{1,128}")
            result.append(self.profile(name, body))
        return result

    def profile(self, name: str, node: Node) -> Profile:
        field = f"profiles.{name}"
        description: str | None = None
        models_node: Node | None = node
        if isinstance(node, MappingNode):
            models_node = None
            for key, (key_node, value_node) in self.mapping(node, field).items():
                if key == "models":
                    models_node = value_node
                elif key == "description":
                    value = self.value(value_node)
                    if isinstance(value, str):
                        description = value
                    else:
                        self.fail(value_node, f"{field}.description", "must be a string")
                else:
                    accepted = "unknown key; accepted: description, models"
                    self.fail(key_node, f"{field}.{key}", accepted)
            if models_node is None:
                self.fail(node, f"{field}.models", "missing required key")
                return Profile(name, (), description)
        if not isinstance(models_node, SequenceNode) or not models_node.value:
            self.fail(models_node or node, f"{field}.models", "must be a non-empty list of models")
            return Profile(name, (), description)
        entries = [self.entry(f"{field}.models[{i}]", n) for i, n in enumerate(models_node.value)]
        valid = [(i, e, n) for i, (e, n) in enumerate(zip(entries, models_node.value, strict=True))
                 if e is not None]
        # with a broken entry its served name is unknown: "fallback not served" would be a guess
        self.cross_check(field, valid, complete=len(valid) == len(entries))
        return Profile(name, tuple(e for _, e, _ in valid), description)

    def entry(self, field: str, node: Node) -> ProfileModel | None:
        items = self.mapping(node, field)
        if not isinstance(node, MappingNode):
            return None
        before = len(self.problems)
        values: dict[str, object] = {}
        for key, (key_node, value_node) in items.items():
            value = self.value(value_node)
            if key == "model" or key == "fallback":
                if not isinstance(value, str) or not value:
                    self.fail(value_node, f"{field}.{key}", "must be a model name (string)")
                elif key == "model" and value not in self.known:
                    hint = _hint(self.known)
                    self.fail(value_node, f"{field}.model", f"unknown model {value!r}{hint}")
                values[key] = value
            elif key in _ENTRY_CHECKS:
                try:
                    values[key] = _ENTRY_CHECKS[key](value)
                except rules.BadValue as exc:
                    self.fail(value_node, f"{field}.{key}", str(exc))
            else:
                accepted = f"unknown key; accepted: {', '.join(_ENTRY_KEYS)}"
                self.fail(key_node, f"{field}.{key}", accepted)
        if "model" not in items:
            self.fail(node, f"{field}.model", "missing required key")
        if len(self.problems) != before:
            return None
        return ProfileModel(**values)  # type: ignore[arg-type]  # checked above

    def cross_check(self, field: str, entries: list[tuple[int, ProfileModel, Node]],
                    complete: bool) -> None:
        """Duplicates and fallbacks; `i` is each entry's index in the file's list."""
        served: dict[str, ProfileModel] = {}
        for _, entry, node in entries:
            name = entry.served_name
            if name in served:
                self.fail(node, field, f"{name!r} is served twice; give one of them an alias")
            served[name] = entry
        for i, entry, node in entries:
            if entry.fallback is None:
                continue
            if entry.fallback == entry.served_name:
                self.fail(node, f"{field}.models[{i}].fallback", "cannot be the model itself")
            elif entry.fallback not in served:
                if not complete:
                    continue
                self.fail(
                    node,
                    f"{field}.models[{i}].fallback",
                    f"{entry.fallback!r} is not served by this profile (served: {', '.join(served)})",
                )
            elif (cycle := _cycle(entry, served)) is not None:
                self.fail(node, f"{field}.models[{i}].fallback", f"fallback cycle: {cycle}")


def _cycle(start: ProfileModel, served: dict[str, ProfileModel]) -> str | None:
    chain = [start.served_name]
    current = start
    while current.fallback is not None and current.fallback in served:
        if current.fallback in chain:
            return " -> ".join([*chain, current.fallback]) if current.fallback == chain[0] else None
        chain.append(current.fallback)
        current = served[current.fallback]
    return None


def _hint(known: frozenset[str]) -> str:
    if not known:
        return "; the registry has no models"
    names = sorted(known)
    shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
    return f"; known: {shown}"
