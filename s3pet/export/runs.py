"""Exporting a run directory: its structure, its retrained weights, its base model."""

from __future__ import annotations

import logging
from pathlib import Path

from torch import Tensor

from s3pet import structure as S
from s3pet.configs import EXPORT_FORMATS
from s3pet.errors import ConfigError, ModelError, StructureError
from s3pet.io import read_json
from s3pet.models import load_backbone, load_tokenizer
from s3pet.export.adapter import export_peft
from s3pet.export.merging import export_merged
from s3pet.export.weights import some

log = logging.getLogger("s3pet.export")

FORMATS = EXPORT_FORMATS

def export_run(structure_path: str | Path, out: str | Path, to: str = "peft", weights_path: str | Path | None = None,
               model: str | None = None, *, untrained: bool = False, task: str | None = None) -> Path:
    """Export a structure (file or run directory) with its trained weights.

    ``weights_path`` is a ``delta.safetensors`` written by a retrain (``deltas.`` keys go to the
    modules, ``head.`` keys to the head); when None, the one beside the structure file is used.
    Without weights the export is refused unless ``untrained`` (then the modules are freshly
    initialised, and the export says so). With ``to="peft"``, a run that names its task
    (``config.json``) or an explicit ``task`` and holds a head is exported for the task's
    transformers auto class (``s3pet.export.task``); otherwise as an adapter on the bare
    backbone. ``to="merged"`` folds the deltas into a plain model (head in head.safetensors).
    The base model is ``model`` or the structure's ``base_model.name_or_path``; tiny random
    aliases are rebuilt with the run's seed. Writes ``out`` atomically; returns it.
    """
    if to not in FORMATS:
        raise ConfigError(f"unknown export format {to!r}; use one of {', '.join(FORMATS)}")
    p = Path(structure_path)
    st = S.load(p)
    run_dir = p if p.is_dir() else p.parent
    name = model or st.base_model.get("name_or_path")
    if not name:
        raise StructureError(f"{structure_path}: base_model.name_or_path is empty; pass a model")
    if weights_path is None and (run_dir / "delta.safetensors").is_file():
        weights_path = run_dir / "delta.safetensors"
        log.info("using the weights in %s", weights_path)
    if weights_path is None and not untrained:
        raise ConfigError(f"no trained weights: {run_dir} has no delta.safetensors; pass --weights "
                          "(a retrain's delta.safetensors), or --untrained to export freshly initialised modules")
    deltas, head = _read_delta_file(weights_path) if weights_path is not None else (None, None)
    config = _run_config(run_dir)
    backbone = load_backbone(name, seed=_run_seed(config))
    task = task or config.get("task")
    if to == "peft" and task and (head or untrained):
        return _export_task_run(backbone, name, st, out, deltas, head, task, config, run_dir, untrained)
    if to == "peft":
        log.warning("no task head (the run names no task, or its weights hold no head): exporting an adapter "
                    "on the bare backbone (AutoModel), for feature extraction")
        return export_peft(st, backbone, out, deltas, head=head, untrained=untrained, inplace=True)
    tok = None
    try:
        tok = load_tokenizer(name)
    except ModelError as e:
        log.warning("exporting without a tokenizer: %s", e)
    return export_merged(st, backbone, out, deltas, tokenizer=tok, head=head, untrained=untrained, inplace=True)


def _export_task_run(backbone, name: str, st: S.Structure, out, deltas, head, task: str, config: dict,
                     run_dir: Path, untrained: bool) -> Path:
    from s3pet.export.task import export_task
    from s3pet.heads import TaskModel
    from s3pet.tasks import get_card

    card = get_card(task)
    tok = load_tokenizer(name)
    pooling = (config.get("train") or {}).get("pooling", "mean" if config else "auto")  # runs before pooling: mean
    tm = TaskModel(backbone, card, tok, pooling=pooling)
    if head:
        try:
            tm.head.load_state_dict(head)
        except RuntimeError as e:
            raise ConfigError(f"the saved head does not fit task {card.name}: {str(e).splitlines()[0]}") from e
    metrics = None
    try:
        test = read_json(run_dir / "metrics.json").get("test") or {}
        metrics = {f"test {k}": v for k, v in test.items() if k != "main"} or None
    except (OSError, ValueError):
        pass
    return export_task(tm, st, out, deltas, untrained=untrained, inplace=True, metrics=metrics)


def _run_config(run_dir: Path) -> dict:
    try:
        return read_json(run_dir / "config.json")
    except (OSError, ValueError):
        return {}


def _read_delta_file(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"weights file not found: {path}")
    try:
        raw = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ConfigError(f"cannot read weights {path}: {e}") from e
    deltas = {k[len("deltas."):]: v for k, v in raw.items() if k.startswith("deltas.")}
    head = {k[len("head."):]: v for k, v in raw.items() if k.startswith("head.")}
    other = sorted(k for k in raw if not k.startswith(("deltas.", "head.")))
    if other:
        what = " (a full fine-tuning run: no PET modules to export)" if other[0].startswith("backbone.") else ""
        raise StructureError(f"{path} holds keys other than 'deltas.' and 'head.'{what}: {some(other)}")
    if not deltas:
        raise StructureError(f"{path} holds no 'deltas.' weights")
    return deltas, head


def _run_seed(cfg: dict) -> int:
    for stage in ("train", "search"):
        seed = (cfg.get(stage) or {}).get("seed")
        if isinstance(seed, int):
            return seed
    return 0
    for stage in ("train", "search"):
        seed = (cfg.get(stage) or {}).get("seed")
        if isinstance(seed, int):
            return seed
    return 0

