"""The mechanism of every stage config: a field holds its default, help, choices and range.

``setting(default, help, choices=..., check=...)`` is a ``dataclasses.field`` whose metadata
the checks here and the command line (``s3pet.flags``) read, so a setting is written once:
a field added to a config is validated, saved in ``config.json`` and becomes a flag with no
other edit. No torch here: ``s3pet --help`` builds its flags from these classes.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import MISSING, field, fields

from s3pet.errors import ConfigError

# The ranges a number may be checked against (``check=``), and how an error states each.
CHECKS = {
    "> 0": (lambda v: v > 0, "must be positive"),
    ">= 0": (lambda v: v >= 0, "must be >= 0"),
    "[0, 1]": (lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    "(0, 1)": (lambda v: 0 < v < 1, "must be in (0, 1)"),
    ">= 1": (lambda v: v >= 1, "must be at least 1"),
}

def check_tensorboard(enabled: bool) -> None:
    """ConfigError when TensorBoard logging is asked for but the package is missing (no import)."""
    import importlib.util

    if enabled and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("tensorboard logging (--tensorboard) needs the tensorboard package: "
                          "pip install 's3pet[tensorboard]'")


_INT_LIMIT = 2**62  # far beyond any real count; keeps seeds and step counts inside torch's int64
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def setting(default=MISSING, help: str = "", *, choices=None, check: str | None = None, factory=None,
            prefixed: tuple[str, ...] = ()):
    """A config field with its default, one-line help and checks (metadata read by ``Config``).

    ``choices``: the allowed values of a string; ``check``: a range of ``CHECKS`` for a number;
    ``factory``: a default made per instance (a nested config). No default: a required setting.
    ``prefixed`` (a nested config only): its fields whose flag carries the field's name
    (``--search-epochs``) rather than one flag shared with the other nested configs.
    """
    if check is not None and check not in CHECKS:
        raise ValueError(f"unknown check {check!r}; use one of {', '.join(CHECKS)}")
    meta = {"help": help, **({"choices": tuple(choices)} if choices else {}), **({"check": check} if check else {}),
            **({"prefixed": tuple(prefixed)} if prefixed else {})}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def flag_of(name: str) -> str:
    """The command-line spelling of a field name: ``max_steps`` -> ``--max-steps``."""
    return "--" + name.replace("_", "-")


def field_types(cls) -> dict[str, type]:
    """Each field's annotation resolved to a type (``str | None`` -> ``str``)."""
    out = {}
    for name, t in typing.get_type_hints(cls).items():
        args = [a for a in typing.get_args(t) if a is not type(None)]
        out[name] = args[0] if typing.get_origin(t) in (typing.Union, types.UnionType) and len(args) == 1 else t
    return out


def optional(cls, name: str) -> bool:
    """Whether a field's annotation allows None (``str | None``)."""
    return type(None) in typing.get_args(typing.get_type_hints(cls)[name])


class Config:
    """Base of the stage configs (dataclasses): checks every field by its type and metadata.

    Subclasses that have checks across fields call ``super().__post_init__()`` first.
    """

    def __post_init__(self):
        check_fields(self)

    @classmethod
    def from_dict(cls, d: dict):
        """A config from a saved ``config.json`` section; keys this version does not know are dropped
        (a run written by an older s3pet stays readable)."""
        types = field_types(cls)
        kw = {}
        for f in fields(cls):
            if f.name in d:
                v, t = d[f.name], types[f.name]
                kw[f.name] = t.from_dict(v) if dataclasses.is_dataclass(t) and isinstance(v, dict) else v
        return cls(**kw)


def check_fields(cfg) -> None:
    """Every field of ``cfg`` has its annotation's type, one of its choices and is in its range.

    nan and inf pass a plain ``<= 0`` test (argparse's ``float`` accepts them), so numbers are
    checked finite first; ints must be ints (not floats or bools). Raises ConfigError naming
    the setting as the command line spells it.
    """
    types = field_types(type(cfg))
    for f in fields(cfg):
        v, t, meta = getattr(cfg, f.name), types[f.name], f.metadata
        if v is None and optional(type(cfg), f.name):
            continue
        if dataclasses.is_dataclass(t):
            if not isinstance(v, t):
                raise ConfigError(f"{f.name} must be a {t.__name__}, got {type(v).__name__}")
            continue
        if t in (int, float):
            _check_number(f.name, v, t is int, meta.get("check"))
        elif t is bool and not isinstance(v, bool):
            raise ConfigError(f"{f.name} ({flag_of(f.name)}) must be true or false, got {v!r}")
        elif t is str and not isinstance(v, str):
            raise ConfigError(f"{f.name} ({flag_of(f.name)}) must be a string, got {v!r}")
        if "choices" in meta and v not in meta["choices"]:
            raise ConfigError(f"{f.name} must be one of {', '.join(meta['choices'])}, got {v!r} ({flag_of(f.name)})")


def _check_number(name: str, v, want_int: bool, check: str | None) -> None:
    flag = flag_of(name)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (want_int and not isinstance(v, int)):
        raise ConfigError(f"{name} ({flag}) must be {'an integer' if want_int else 'a number'}, got {v!r}")
    if not math.isfinite(v) or (want_int and abs(v) > _INT_LIMIT):
        raise ConfigError(f"{name} ({flag}) must be a finite number, got {v!r}")
    if check is not None:
        ok, says = CHECKS[check]
        if not ok(v):
            raise ConfigError(f"{name} ({flag}) {says}, got {v}")


def check_numbers(cfg, positive=(), non_negative=(), at_most_one=()) -> None:
    """Named fields of a config are finite numbers of their field's type, in range (for configs
    outside this package; stage configs say it per field with ``check=``)."""
    types = field_types(type(cfg))
    for name in (*positive, *non_negative):
        _check_number(name, getattr(cfg, name), types[name] is int, "> 0" if name in positive else ">= 0")
        if name in at_most_one and getattr(cfg, name) > 1:
            raise ConfigError(f"{name} ({flag_of(name)}) must be at most 1, got {getattr(cfg, name)}")


def check_device(name) -> None:
    """Reject device names s3pet cannot run on (before torch raises its own error, mid-run)."""
    if not isinstance(name, str) or not _DEVICE.fullmatch(name):
        raise ConfigError(f"device (--device) must be auto, cpu, cuda or cuda:N, got {name!r}")
