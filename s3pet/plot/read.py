"""Reading run files (structure.json, alphas.csv, history.jsonl) and checking structures."""

from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path
from typing import Any

from s3pet.errors import ConfigError, StructureError
from s3pet.plot.common import _Module

logger = logging.getLogger(__name__)


def _existing(path: str | os.PathLike, what: str = "file") -> Path:
    """``path`` as a Path; raises ConfigError if it is not a file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no such {what}: {path}")
    return path


def read_structure(path: str | os.PathLike) -> dict:
    """Load and check a ``structure.json`` with the one structure loader (``s3pet.structure.load``).

    Raises:
        StructureError: the file is missing, not UTF-8 JSON or not a valid s3pet structure.
    """
    from s3pet import structure as S

    return S.load(path).to_dict()


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


def _modules_of(structure: Any, where: str = "structure") -> tuple[dict[str, int], list[_Module]]:
    """Stacks ({name: n_layers}) and module entries of a structure dict, validated by the one
    structure loader (``s3pet.structure.from_dict``): what plots draw is what retrain accepts."""
    from s3pet import structure as S

    st = S.from_dict(structure, where)
    stacks = dict(st.base_model["stacks"])
    mods = [_Module(m["stack"], m["layer"], m["role"], m["kind"], float(m["rank"]), float(m["n_params"]), m["site"],
                    None if m["score"] is None else float(m["score"])) for m in st.modules]
    return stacks, mods
