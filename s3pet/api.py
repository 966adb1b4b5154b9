"""The Python API, importable as ``import s3pet`` (``s3pet.search(...)``, ``s3pet.load_run(...)``).

Thin functions over the stages the command line runs (``s3pet.pipeline``, ``s3pet.transfer``,
``s3pet.export``), so Python and the CLI run the same job and write the same run folders::

    structure = s3pet.search("minilm", "rotten-tomatoes", budget="0.05%", out="runs/search")
    s3pet.retrain(structure, "rotten-tomatoes", out="runs/retrain")
    s3pet.load_run("runs/retrain").predict(["a gripping, funny film"])

Settings are the stage dataclasses' fields (``SearchConfig``, ``TrainConfig``), given as a
``config`` object, as keywords (``max_steps=100``), or both (keywords win).
"""

from __future__ import annotations

import os
from dataclasses import fields, replace
from pathlib import Path

from torch import nn

from s3pet import structure as S
from s3pet.errors import ConfigError
from s3pet.petmodel import PetModel
from s3pet.predict import Predictor
from s3pet.search import SearchConfig
from s3pet.train import TrainConfig

PathLike = str | os.PathLike


def _config(cls, config, settings: dict):
    """``config`` (or the defaults) with ``settings`` replaced; ConfigError for a name that is no field."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(settings) - names)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} setting(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    if config is not None and not isinstance(config, cls):
        raise ConfigError(f"config must be a {cls.__name__}, got {type(config).__name__}")
    return replace(config or cls(), **settings)


def search(model: str, task: str, budget: str | int, out: PathLike, *, space: str = "s3pet-m",
           config: SearchConfig | None = None, data_dir: PathLike | None = None, resume: bool = False,
           overwrite: bool = False, **settings) -> S.Structure:
    """Search a PET structure under a parameter budget (``s3pet search``).

    Args:
        model: hub id, local folder or alias (``minilm``, ``tiny-bert``, ...).
        task: task name (``rotten-tomatoes``, ``rte``, ...) or the path of a task card.
        budget: parameters (``25000``, ``"25k"``) or a share of the backbone (``"0.05%"``).
        out: the run folder (config, history, alphas.csv, structure.json, search.pt, metrics.json).
        space: ``s3pet-m``, ``s3pet-l``, ``unified`` or a space file.
        config, settings: the search settings (``SearchConfig`` and/or its fields as keywords).
        data_dir: folder of GLUE/SuperGLUE files; resume: continue a killed search in ``out``;
        overwrite: replace a finished run in ``out``.
    Returns:
        The derived Structure (also in ``out/structure.json``; the search's metrics in ``out/metrics.json``).
    Raises:
        S3petError subclasses for bad input, before anything is written; TrainingError if it diverges.
    """
    from s3pet import pipeline

    cfg = _config(SearchConfig, config, settings)
    pipeline.search(model, task, space, budget, out, cfg, resume=resume, data_dir=_str(data_dir), overwrite=overwrite)
    return S.load(Path(out) / "structure.json")


def derive(runs: PathLike | list[PathLike], budget: str | int, *, model: str | None = None) -> S.Structure:
    """Re-derive a structure from finished searches at another budget (``s3pet average``).

    The gate probabilities of the searches (their ``alphas.csv``) are averaged (one search: its
    own) and derived greedily under ``budget``, ties broken by the mean logits, as the search does.

    Args:
        runs: a search run folder (or a main job's folder, whose ``search/`` is used), or several.
        budget: parameters or a share of the backbone, as for ``search``.
        model: the model to derive for (default: the searches' own).
    Returns:
        A Structure (save it with ``.save(path)``).
    Raises:
        ConfigError: a folder without alphas.csv, searches of different models or spaces;
        BudgetError: a budget below the smallest candidate.
    """
    from s3pet.transfer import average_runs

    runs = [runs] if isinstance(runs, (str, os.PathLike)) else list(runs)
    return average_runs(runs, budget, model=model)


def apply_structure(model: nn.Module, structure: S.Structure | PathLike) -> PetModel:
    """Attach a structure's PET modules (freshly initialised) to a transformers model, freeze the
    rest but its task head, and return it ready to train (as peft's ``get_peft_model``).

    The structure's sites are matched in the model's backbone (``model.base_model``: ``bert`` of a
    ``BertForSequenceClassification``, the model itself for ``AutoModel`` or T5). Parameters outside
    the backbone (a classifier, GPT-2's ``score``) stay trainable, the backbone's are frozen.

    Args:
        model: a transformers model of the structure's family and size (float32, or train it under autocast).
        structure: a Structure, a structure.json, or a run folder holding one.
    Returns:
        A PetModel: call it as the model; its ``parameters()`` include the PET modules, whose
        ``deltas`` are on the model's device.
    Raises:
        StructureError: the structure does not fit the model (a site, role or size is not there).
    """
    st = structure if isinstance(structure, S.Structure) else S.load(structure)
    backbone = model.base_model if isinstance(getattr(model, "base_model", None), nn.Module) else model
    in_backbone = {id(p) for p in backbone.parameters()}
    deltas = S.apply(st, backbone)  # checks every module against the model, then freezes the backbone
    for p in model.parameters():
        p.requires_grad_(id(p) not in in_backbone)
    first = next(backbone.parameters(), None)
    if first is not None:
        deltas.to(first.device)
    return PetModel(model, deltas, st)


def retrain(structure: S.Structure | PathLike, task: str, out: PathLike, *, model: str | None = None,
            config: TrainConfig | None = None, data_dir: PathLike | None = None, overwrite: bool = False,
            resume: bool = False, **settings) -> dict:
    """Train a structure from scratch on a fresh backbone (``s3pet retrain``): best checkpoint on
    validation, reported on test.

    Args:
        structure: a Structure, a structure.json, or a run folder holding one.
        task: task name or card path; out: the run folder (config, history, delta.safetensors, metrics.json).
        model: the backbone (default: the structure's base model).
        config, settings: the training settings (``TrainConfig`` and/or its fields as keywords).
        data_dir, overwrite, resume: as for ``search``.
    Returns:
        The metrics dict (also ``out/metrics.json``): ``test``, ``validation``, ``params``, ``cost``, ...
    Raises:
        S3petError subclasses for bad input (before anything is written) or a diverged run.
    """
    from s3pet import pipeline

    cfg = _config(TrainConfig, config, settings)
    return pipeline.retrain(structure, task, out, cfg, model=model, data_dir=_str(data_dir), overwrite=overwrite,
                            resume=resume)


def export(run: PathLike, out: PathLike, *, to: str = "peft", weights: PathLike | None = None,
           model: str | None = None, task: str | None = None, untrained: bool = False) -> Path:
    """Export a run's structure and weights (``s3pet export``).

    Args:
        run: a retrain run folder (or a structure.json with its ``delta.safetensors`` beside it).
        out: the folder to write (atomically).
        to: ``peft`` (an adapter: ``AutoModelForSequenceClassification.from_pretrained(base,
            num_labels=N)`` + ``PeftModel.from_pretrained(model, out)``) or ``merged`` (the deltas
            folded into a plain transformers model, head in head.safetensors).
        weights: another ``delta.safetensors``; model: another base; task: the head's task card;
        untrained: allow exporting freshly initialised modules when there are no weights.
    Returns:
        The written folder.
    Raises:
        ConfigError (no weights, bad format), StructureError (kinds peft cannot express).
    """
    from s3pet.export import export_run

    return export_run(run, out, to=to, weights_path=weights, model=model, untrained=untrained, task=task)


def load_run(run: PathLike, *, device: str | None = None, task: str | None = None) -> Predictor:
    """Load a finished retrain or baseline run (or a main job's folder: its ``retrain/``) to predict.

    Args:
        run: the run folder; device: ``auto``, ``cpu``, ``cuda:N`` (default: the run's own setting);
        task: another task card for the head (its labels must fit the saved head).
    Returns:
        A Predictor: ``.predict(["text", ...])`` or ``.predict([{field: text, ...}])`` gives one
        ``{"label", "label_id", "scores"}`` per input, exactly as ``s3pet predict`` writes them;
        ``.model`` is the TaskModel (backbone + PET modules + head) in eval mode.
    Raises:
        ConfigError: not a finished run, or weights that do not fit it.
    """
    from s3pet.pipeline import load_run as _load

    return Predictor(_load(run, task=task, device=device))


def _str(path: PathLike | None) -> str | None:
    return None if path is None else os.fspath(path)
