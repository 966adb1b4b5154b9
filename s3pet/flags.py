"""Command-line flags generated from the stage configs, and configs built back from them.

A command's settings are a *tree*: a config class whose fields sit at the top of its
``config.json`` (``RunConfig``, with nested stage configs), or a dict ``{section: class}``
(``{"search": SearchConfig}``). Each leaf field becomes one flag: its type from the
annotation, ``--x/--no-x`` for a bool, choices and help from the field's metadata and the
default shown. A field name found in several sections is one flag that sets all of them,
unless the parent field lists it as ``prefixed`` (``--search-epochs``). ``--config FILE``
starts from a saved ``config.json``; flags on the line override it. No torch here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import MISSING, fields
from pathlib import Path
from typing import NamedTuple

from s3pet.configs.base import field_types, flag_of
from s3pet.errors import ConfigError

DEST = "cfg."  # namespace prefix of generated flags, apart from a command's own arguments


class Leaf(NamedTuple):
    """One setting of a tree: where it goes, its type, the command's default and its metadata."""

    path: tuple[str, ...]  # ("search", "epochs"); ("model",) at the top of a RunConfig
    type: type
    default: object  # MISSING: required
    meta: dict
    flag: str


def leaves(tree) -> list[Leaf]:
    """Every leaf setting of a tree, in field order, with the flag that sets it."""
    if isinstance(tree, dict):
        return [leaf for name, cls in tree.items() for leaf in _walk(cls, (name,), None, ())]
    return _walk(tree, (), None, ())


def _walk(cls, prefix: tuple, defaults, prefixed: tuple) -> list[Leaf]:
    out, types = [], field_types(cls)
    for f in fields(cls):
        if defaults is not None:
            default = getattr(defaults, f.name)
        elif f.default is not MISSING:
            default = f.default
        elif f.default_factory is not MISSING:
            default = f.default_factory()
        else:
            default = MISSING
        t = types[f.name]
        if dataclasses.is_dataclass(t):  # a nested stage config: its fields, at its own defaults
            out += _walk(t, prefix + (f.name,), default, f.metadata.get("prefixed", ()))
        else:
            name = f"{prefix[-1]}_{f.name}" if prefix and f.name in prefixed else f.name
            out.append(Leaf(prefix + (f.name,), t, default, dict(f.metadata), flag_of(name)))
    return out


def show(v) -> str:
    """A default as ``--help`` shows it."""
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def add_config_flags(parser: argparse.ArgumentParser, tree) -> None:
    """Add one flag per leaf setting of ``tree`` to ``parser``, grouped by the section that holds it."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for flag, same in _by_flag(tree).items():
        first = same[0]
        where = {".".join(leaf.path[:-1]) or "settings": leaf for leaf in same}
        title = next(iter(where))
        if title not in groups:
            groups[title] = parser.add_argument_group(f"{title} settings" if title != "settings" else title)
        kw = {"dest": DEST + flag[2:], "default": argparse.SUPPRESS, "help": _help(where).replace("%", "%%")}
        if first.type is bool:
            groups[title].add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif "choices" in first.meta:
            groups[title].add_argument(flag, type=first.type, choices=first.meta["choices"], **kw)
        else:
            groups[title].add_argument(flag, type=first.type, metavar=flag[2:].replace("-", "_").upper(), **kw)


def _help(where: dict[str, Leaf]) -> str:
    """The help of a flag: its field's help and default; for a flag of several sections, each one's."""
    def one(leaf: Leaf) -> str:
        return leaf.meta.get("help") or leaf.path[-1].replace("_", " ")

    if any(leaf.default is MISSING for leaf in where.values()):
        shown = "required"
    elif len({show(leaf.default) for leaf in where.values()}) == 1:
        shown = f"default: {show(next(iter(where.values())).default)}"
    else:
        shown = "default: " + ", ".join(f"{k} {show(leaf.default)}" for k, leaf in where.items())
    if len({one(leaf) for leaf in where.values()}) == 1:
        text = one(next(iter(where.values())))
    else:
        text = "; ".join(f"{k}: {one(leaf)}" for k, leaf in where.items())
    if len(where) > 1:
        text += f"; sets {' and '.join(where)}"
    return f"{text} ({shown})"


def _by_flag(tree) -> dict[str, list[Leaf]]:
    out: dict[str, list[Leaf]] = {}
    for leaf in leaves(tree):
        same = out.setdefault(leaf.flag, [])
        if same and (same[0].type, same[0].meta.get("choices")) != (leaf.type, leaf.meta.get("choices")):
            raise TypeError(f"{leaf.flag} would set {same[0].path} and {leaf.path}, which differ in type or choices")
        same.append(leaf)
    return out


def given(ns: argparse.Namespace) -> dict[str, object]:
    """The generated flags given on the command line: flag name (no dashes) -> value."""
    return {k[len(DEST):]: v for k, v in vars(ns).items() if k.startswith(DEST)}


def build(tree, flags: dict[str, object] | None = None, file: dict | None = None):
    """The configs of ``tree``: its defaults, then ``file`` (a saved config.json, see
    ``read_config``), then ``flags`` (flag name without dashes -> value). A dict tree gives a dict
    of configs, a class tree one config. Raises ConfigError for a required setting not given and
    for any value its config rejects."""
    values = {leaf.path: leaf.default for leaf in leaves(tree) if leaf.default is not MISSING}
    values.update(file or {})
    by_flag = _by_flag(tree)
    for name, v in (flags or {}).items():
        for leaf in by_flag["--" + name]:
            values[leaf.path] = v
    for leaf in leaves(tree):
        if leaf.path not in values:
            raise ConfigError(f"{leaf.flag} is required (on the command line or in --config)")
    if isinstance(tree, dict):
        return {name: _make(cls, (name,), values) for name, cls in tree.items()}
    return _make(tree, (), values)


def _make(cls, prefix: tuple, values: dict):
    kw, types = {}, field_types(cls)
    for f in fields(cls):
        t = types[f.name]
        kw[f.name] = _make(t, prefix + (f.name,), values) if dataclasses.is_dataclass(t) else values[prefix + (f.name,)]
    return cls(**kw)


def read_config(path: str | Path, tree, inputs: dict[str, str], records: tuple[str, ...],
                command: str | None = None) -> tuple[dict, dict]:
    """Read a saved ``config.json`` (or a JSON file of the same shape) for ``--config``.

    Args:
        tree: the command's settings (see the module docstring).
        inputs: top-level keys of the file that are the command's own arguments -> their name
            (``{"budget_arg": "budget", "task": "task"}``); a key seen twice keeps the later one.
        records: top-level keys a run writes beside its settings (versions, ...); skipped.
        command: the command reading it; a file whose ``command`` is another one is refused
            (``baseline:lora`` is a ``baseline``).
    Returns:
        (settings by leaf path, the command's arguments by name).
    Raises:
        ConfigError: an unreadable file, or a key that is none of the above, named.
    """
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot read ({e.strerror or e})") from e
    except (UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"--config {path}: not valid JSON ({e})") from e
    if not isinstance(d, dict):
        raise ConfigError(f"--config {path}: must be a JSON object, got {type(d).__name__}")
    wrote = d.get("command")
    if command and isinstance(wrote, str) and wrote.split(":")[0] != command:
        raise ConfigError(f"--config {path} holds the settings of 's3pet {wrote.split(':')[0]}', not of "
                          f"'s3pet {command}'")
    paths = {leaf.path for leaf in leaves(tree)}
    sections = {p[:-1] for p in paths if len(p) > 1}
    settings, args = {}, {}
    for key, v in d.items():
        if (key,) in sections:
            if not isinstance(v, dict):
                raise ConfigError(f"--config {path}: '{key}' must be an object of settings")
            for sub, w in v.items():
                if (key, sub) not in paths:
                    raise ConfigError(f"--config {path}: unknown setting '{key}.{sub}'")
                settings[(key, sub)] = w
        elif (key,) in paths:
            settings[(key,)] = v
        elif key in records:
            continue
        elif key in inputs:
            if v is not None:
                args[inputs[key]] = v
        else:
            raise ConfigError(f"--config {path}: unknown key '{key}'")
    return settings, args
