"""Export folders: written beside the target and renamed into place, never over a folder that
is not an earlier export; the files every export carries (structure, marker, head, card)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from torch import Tensor

import s3pet
from s3pet import structure as S
from s3pet.errors import ConfigError
from s3pet.io import write_json

log = logging.getLogger(__name__)

MARKER = "s3pet_export.json"  # written into every export; an existing folder is replaced only if it has one


def write_extras(folder: Path, structure: S.Structure, untrained: bool, head: dict[str, Tensor] | None,
                  meta: dict) -> None:
    from safetensors.torch import save_file

    if head:
        save_file({k: v.detach().contiguous().cpu() for k, v in head.items()}, str(folder / "head.safetensors"))
    structure.save(folder / "structure.json")
    write_json(folder / MARKER, {"s3pet_version": s3pet.__version__, "trained": not untrained,
                                 "head": "head.safetensors" if head else None, **meta})


def check_target(out: str | Path) -> Path:
    """ConfigError unless ``out`` is new, empty, or an earlier s3pet export (safe to replace)."""
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise ConfigError(f"export target {out} exists and is not a folder")
        if any(out.iterdir()) and not (out / MARKER).is_file():
            raise ConfigError(f"export target {out} is a non-empty folder that is not an s3pet export; "
                              "choose a new path")
    return out


@contextlib.contextmanager
def staging(out: str | Path):
    """Yield a temporary folder beside ``out``; on success it replaces ``out`` by renames.

    An existing ``out`` is replaced only if it is empty or an earlier s3pet export, so a
    mistyped path never wipes a run directory. On error nothing is left behind, and what a
    killed export left is cleaned up first (``_recover_killed``).
    """
    _recover_killed(Path(out))
    out = check_target(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # The pid in the name tells a later export whether this folder's writer is still alive.
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.{os.getpid()}.", suffix=".tmp"))
    try:
        yield tmp
        _usual_modes(tmp)
        old = None
        if out.exists():
            old = tmp.with_name(tmp.name + ".old")
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            if old is not None:
                os.replace(old, out)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _recover_killed(out: Path) -> None:
    """Undo what a killed export left beside ``out``: its staging folder is removed, and an
    earlier export it had moved aside (killed between the two renames) is put back."""
    from s3pet.rundir import pid_alive

    if not out.parent.is_dir():
        return
    prefix = f".{out.name}."
    for p in sorted(out.parent.iterdir()):
        if not (p.name.startswith(prefix) and (p.name.endswith(".tmp") or p.name.endswith(".tmp.old"))):
            continue
        pid = p.name[len(prefix):].split(".", 1)[0]
        if not pid.isdigit() or pid_alive(int(pid)):
            continue  # another export's, still running (or not ours at all)
        if p.name.endswith(".old") and not out.exists():
            os.replace(p, out)
            log.warning("restored %s, which a killed export had moved aside", out)
        else:
            shutil.rmtree(p, ignore_errors=True)
            log.info("removed %s, left by a killed export", p)


def _usual_modes(folder: Path) -> None:
    """Temporary files and folders are private; give the export the modes of ordinary files."""
    os.chmod(folder, 0o755)
    for p in folder.rglob("*"):
        os.chmod(p, 0o755 if p.is_dir() else 0o644)


def read_export_info(folder: str | Path) -> dict:
    """The ``s3pet_export.json`` of an export folder."""
    return json.loads((Path(folder) / MARKER).read_text())


# The hub ids of s3pet's aliases, so that an export names its base model in a way that works
# elsewhere; the tiny aliases are random models that only s3pet's load_backbone rebuilds.
HUB_IDS = {"minilm": "sentence-transformers/all-MiniLM-L6-v2"}


def model_card(structure: S.Structure, base: str, meta: dict, untrained: bool, *, title: str | None = None,
               load: str | None = None, notes: tuple[str, ...] = (), pipeline_tag: str | None = None) -> str:
    """The ``README.md`` of an export: front matter (base model, library, tags), what was
    exported, how to load it (``load``: a Python snippet), and ``notes``."""
    kinds = sorted(structure.counts_by_kind())
    head = ["---", f"base_model: {base}", "library_name: peft" if meta.get("format") == "peft" else None,
            f"pipeline_tag: {pipeline_tag}" if pipeline_tag else None,
            "tags:", "- s3pet", *[f"- {k}" for k in kinds], "---", ""]
    lines = [ln for ln in head if ln is not None]
    lines += [f"# {title or 's3pet export'}", "",
              f"Base model: `{base}`. Exported by s3pet {s3pet.__version__} as a "
              f"{meta.get('format')} model ({meta.get('peft_method') or 'merged weights'}).", "",
              f"Structure: {structure.summary()}.", ""]
    if untrained:
        lines += ["**Untrained**: the modules are freshly initialised, not trained.", ""]
    if load:
        lines += ["## Load", "", "```python", load.strip(), "```", ""]
    if notes:
        lines += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    lines += ["`structure.json` is s3pet's structure file; `s3pet_export.json` records how this folder was made.", ""]
    return "\n".join(lines)
