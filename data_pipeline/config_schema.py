"""The one config scheme: typed dataclasses loaded from YAML with dotted ``key=value`` overrides.

Every stage owns a dataclass of its fields (one-line docstring per field, written as a string
literal under it); ``launcher.config`` composes them. Validation collects every problem
(field, value, what was expected) and raises once. The config leaf: it imports nothing of the project, so
every layer's config may import it.
"""

from __future__ import annotations

import ast
import difflib
import dataclasses
import inspect
import types
import typing
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """Every problem found in a config, reported together: one line for one problem, else a list."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        if len(problems) == 1:
            super().__init__(f"{source}: {problems[0]}")
        else:
            super().__init__(f"{source}: {len(problems)} problem(s)\n" + "\n".join(f"  - {p}" for p in problems))


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the string literal written under it in the class body."""
    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for stmt, nxt in zip(body, body[1:]):
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                if isinstance(nxt.value.value, str):
                    docs[stmt.target.id] = nxt.value.value.strip()
    return docs


def _describe(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str, problems: list[str]) -> Any:
    """Convert a YAML/CLI value to ``tp``; append a problem and return None on failure."""
    origin = get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            return None
        if len(args) == 1:
            return _coerce(value, args[0], where, problems)
        for arg in args:
            sub: list[str] = []
            out = _coerce(value, arg, where, sub)
            if not sub:
                return out
        problems.append(f"{where}: {value!r} is not any of {[_describe(a) for a in args]}")
        return None
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a mapping for section {tp.__name__}, got {value!r}")
            return None
        return _build(tp, value, where, problems)
    if origin in (list, tuple):
        (item_tp, *_) = get_args(tp) or (Any,)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v != ""] if value else []
        if not isinstance(value, (list, tuple)):
            problems.append(f"{where}: expected a list, got {value!r}")
            return None
        return [_coerce(v, item_tp, f"{where}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a mapping, got {value!r}")
            return None
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        problems.append(f"{where}: expected true/false, got {value!r}")
        return None
    if tp is int:
        if isinstance(value, bool):
            problems.append(f"{where}: expected an integer, got {value!r}")
            return None
        try:
            if isinstance(value, str):
                value = value.replace("_", "")
            out = int(value)
            if isinstance(value, float) and value != out:
                raise ValueError
            return out
        except (TypeError, ValueError):
            problems.append(f"{where}: expected an integer, got {value!r}")
            return None
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            problems.append(f"{where}: expected a number, got {value!r}")
            return None
    if tp is str:
        if isinstance(value, (dict, list)):
            problems.append(f"{where}: expected a string, got {value!r}")
            return None
        return str(value)
    return value


def _build(cls: type, data: dict, where: str, problems: list[str]) -> Any:
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), sorted(names), n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}? " if close else ""
            problems.append(f"{where + '.' if where else ''}{key}: unknown field of {cls.__name__}; {hint}"
                            f"(known: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            path = f"{where + '.' if where else ''}{f.name}"
            sub: list[str] = []
            value = _coerce(data[f.name], hints[f.name], path, sub)
            problems += sub
            # A bad scalar keeps its default so check() does not report it twice; a section keeps what it built.
            if not sub or (value is not None and dataclasses.is_dataclass(value)):
                kwargs[f.name] = value
    try:
        obj = cls(**kwargs)
    except TypeError as exc:
        problems.append(f"{where or cls.__name__}: {exc}")
        return None
    return obj


def set_dotted(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError([f"{dotted}: {key} is not a section"], "override")
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    out, problems = [], []
    for item in overrides:
        if "=" not in item:
            problems.append(f"override {item!r}: expected key=value")
            continue
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        out.append((key.strip(), value))
    if problems:
        raise ConfigError(problems, "command line")
    return out


def validate_tree(obj: Any, where: str = "") -> list[str]:
    """Run ``check()`` of every dataclass in the tree; each returns a list of problems."""
    problems: list[str] = []
    if not dataclasses.is_dataclass(obj):
        return problems
    check = getattr(obj, "check", None)
    if callable(check):
        problems += [f"{where + '.' if where else ''}{p}" for p in check()]
    for f in dataclasses.fields(obj):
        problems += validate_tree(getattr(obj, f.name), f"{where + '.' if where else ''}{f.name}")
    return problems


def load(cls: type, path: str | Path | None, overrides: list[str] | None = None,
         deep_check: typing.Callable[[Any], list[str]] | None = None) -> Any:
    """Load ``cls`` from a YAML file plus ``key=value`` overrides; raise one ConfigError listing all problems.
    ``deep_check(obj)`` adds the problems of checks that import heavy code (a recipe's rules): it runs with the
    others unless the config has a structural problem (unknown key, wrong type), so a typo answers at once."""
    data: dict = {}
    source = str(path) if path else "defaults"
    if path:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError([f"cannot read config file: {exc}"], source) from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError([f"invalid YAML: {exc}"], source) from None
        if not isinstance(data, dict):
            raise ConfigError([f"top level must be a mapping, got {type(data).__name__}"], source)
    for key, value in parse_overrides(overrides or []):
        set_dotted(data, key, value)
    return from_mapping(cls, data, source, deep_check)


def from_mapping(cls: type, data: dict, source: str, deep_check: typing.Callable[[Any], list[str]] | None = None) -> Any:
    """``cls`` built from a mapping (a parsed YAML tree) with every check ``load`` runs."""
    problems: list[str] = []
    obj = _build(cls, data, "", problems)
    structural = bool(problems)
    if obj is not None:
        problems += validate_tree(obj)
        if deep_check is not None and not structural:
            problems += deep_check(obj)
    if problems:
        raise ConfigError(problems, source)
    return obj


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


def choice(where: str, value: Any, allowed: typing.Iterable) -> list[str]:
    allowed = list(allowed)
    return [] if value in allowed else [f"{where}: {value!r} is not one of {allowed}"]


def positive(where: str, value: Any, allow_zero: bool = False) -> list[str]:
    ok = value is not None and (value >= 0 if allow_zero else value > 0)
    return [] if ok else [f"{where}: {value!r} must be {'>= 0' if allow_zero else '> 0'}"]
