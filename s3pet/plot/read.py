"""Reading run files (structure.json, alphas.csv, history.jsonl) and checking structures."""

from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path
from typing import Any

from s3pet.errors import ConfigError, StructureError
from s3pet.plot.common import _infer_stack, _Module

logger = logging.getLogger(__name__)


def _existing(path: str | os.PathLike, what: str = "file") -> Path:
    """``path`` as a Path; raises ConfigError if it is not a file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no such {what}: {path}")
    return path


def read_structure(path: str | os.PathLike) -> dict:
    """Load and check a ``structure.json``.

    Raises:
        ConfigError: the file does not exist.
        StructureError: it is not JSON or not an s3pet structure.
    """
    path = _existing(path, "structure file")
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StructureError(f"{path}: not a JSON file ({e})") from e
    _modules_of(obj, where=str(path))  # validates
    return obj


def read_alphas(path: str | os.PathLike) -> list[dict]:
    """Rows of an ``alphas.csv`` as dicts (values still strings; ``gate_grid`` converts)."""
    path = _existing(path)
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = {"layer", "role", "kind", "p"} - set(reader.fieldnames or ())
        if missing:
            raise StructureError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
        return list(reader)


def read_history(path: str | os.PathLike) -> list[dict]:
    """Records of a ``history.jsonl``; a truncated last line (a killed run) is skipped."""
    path = _existing(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines):
                logger.warning("%s: skipping a truncated last line", path)
                break
            raise StructureError(f"{path}:{i}: not a JSON record ({e.msg})") from e
        if isinstance(rec, dict):
            records.append(rec)
    return records


def _stacks_of(structure: dict) -> dict[str, int]:
    base = structure.get("base_model") or {}
    stacks = base.get("stacks")
    if isinstance(stacks, dict) and stacks:
        return {str(k): int(v) for k, v in stacks.items()}
    named = {m.get("stack") for m in structure.get("modules", []) if isinstance(m, dict)}
    named.discard(None)
    if len(named) > 1:
        return {s: -1 for s in named}  # sizes filled in from the modules
    name = next(iter(named), "model")
    return {name: int(base["layers"]) if "layers" in base else -1}


def _modules_of(structure: Any, where: str = "structure") -> tuple[dict[str, int], list[_Module]]:
    """Stacks ({name: n_layers}) and checked module entries of a structure dict."""
    if not isinstance(structure, dict) or not str(structure.get("schema", "")).startswith(
            "s3pet.structure/"):
        raise StructureError(f"{where}: not an s3pet structure (no 's3pet.structure/...' schema)")
    entries = structure.get("modules")
    if not isinstance(entries, list):
        raise StructureError(f"{where}: 'modules' must be a list")
    stacks = _stacks_of(structure)
    names = list(stacks)
    mods = []
    for i, m in enumerate(entries):
        if not isinstance(m, dict):
            raise StructureError(f"{where}: modules[{i}] is not an object")
        missing = [k for k in ("layer", "role", "kind") if k not in m]
        if missing:
            raise StructureError(f"{where}: modules[{i}] ({m.get('site', '?')}) lacks "
                                 f"{', '.join(missing)}")
        stack = m.get("stack") or _infer_stack(str(m.get("site", "")), names)
        if stack is None:
            raise StructureError(f"{where}: modules[{i}] ({m.get('site', '?')}) names no stack")
        try:
            layer = int(m["layer"])
            rank = float(m.get("rank", 1) or 1)
            n_params = float(m.get("n_params", 0) or 0)
        except (TypeError, ValueError) as e:
            raise StructureError(f"{where}: modules[{i}] has a non-numeric field ({e})") from e
        score = m.get("score")
        mods.append(_Module(str(stack), layer, str(m["role"]), str(m["kind"]), rank, n_params,
                            str(m.get("site", f"{stack}.{layer}.{m['role']}")),
                            float(score) if isinstance(score, (int, float)) else None))
    for mod in mods:
        stacks.setdefault(mod.stack, -1)
    for s, n in stacks.items():
        if n < 0:  # size unknown: blocks are the layers below any final norm
            blocks = [m.layer for m in mods if m.stack == s and m.role != "norm.final"]
            stacks[s] = max(blocks, default=-1) + 1
    return stacks, mods
