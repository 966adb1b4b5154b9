"""``plot_paths``: every plot a run directory or structure file allows, saved to files (the CLI)."""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

from s3pet.errors import ConfigError, StructureError
from s3pet.io import atomic_write_bytes
from s3pet.plot.graph import plot_graph, structure_graph
from s3pet.plot.grids import average_grid, gate_grid, structure_grid
from s3pet.plot.heatmaps import plot_average, plot_gates, plot_structure
from s3pet.plot.read import _modules_of, read_alphas, read_history, read_structure
from s3pet.plot.trajectory import plot_trajectory, trajectory

logger = logging.getLogger(__name__)


STAGES = ("search", "retrain")
FORMATS = ("png", "svg", "pdf")
DPI = 150


class _Job(NamedTuple):
    stem: str                         # file name without extension
    where: Path                       # default folder (next to the input)
    rel: Path                         # sub-folder under ``out`` (stage folders)
    label: str                        # input label, for several inputs into one ``out``
    priority: int                     # lower = the main plot, drawn alone for a file ``out``
    draw: Callable[[], Any]           # returns the Axes (or array) drawn on a new figure


def _same_modules(structure: dict) -> str:
    """The modules of a structure without their scores: two stages holding this key hold one structure."""
    return json.dumps([{k: v for k, v in m.items() if k != "score"} for m in structure.get("modules", [])],
                      sort_keys=True)


def _stage_jobs(folder: Path, rel: Path, label: str,
                drawn: set[str] | None = None) -> tuple[list[_Job], dict | None]:
    """Plots of one folder's structure.json, alphas.csv and history.jsonl (those present).

    A structure whose modules are in ``drawn`` (an earlier stage of the same run, e.g. the
    retrain of the structure the search derived) is not drawn again."""
    jobs: list[_Job] = []
    structure = None
    n_layers = None
    if (folder / "structure.json").is_file():
        structure = read_structure(folder / "structure.json")
        key = _same_modules(structure)
        if drawn is None or key not in drawn:
            jobs += _structure_jobs(structure, "structure", folder, rel, label)
        if drawn is not None:
            drawn.add(key)
        n_layers = _modules_of(structure)[0]
    if (folder / "alphas.csv").is_file():
        grid = gate_grid(read_alphas(folder / "alphas.csv"), n_layers=n_layers, structure=structure)
        if grid.p:
            jobs.append(_Job("gates", folder, rel, label, 2, lambda g=grid: plot_gates(g)))
    if (folder / "history.jsonl").is_file():
        traj = trajectory(read_history(folder / "history.jsonl"))
        what = ("search" if traj.shift.step or traj.loss_alpha.step
                else "retrain" if traj.loss.step else "training")
        name = f"{what} trajectory · {label}" + (f" ({rel.as_posix()}/)" if rel.parts else "")
        jobs.append(_Job("trajectory", folder, rel, label, 3,
                         lambda t=traj, n=name: plot_trajectory(t, title=n)))
    return jobs, structure


def _structure_jobs(structure: dict, stem: str, where: Path, rel: Path, label: str) -> list[_Job]:
    grid = structure_grid(structure)
    return [_Job(stem, where, rel, label, 1, lambda: plot_structure(grid)),
            _Job(f"{stem}_per_kind", where, rel, label, 4,
                 lambda: plot_structure(grid, mode="per-kind")),
            _Job(f"{stem}_graph", where, rel, label, 5,
                 lambda: plot_graph(structure_graph(structure)))]


def _input_jobs(path: Path) -> tuple[list[_Job], dict | None]:
    label = path.stem if path.is_file() and path.stem != "structure" else (
        path.parent.name if path.is_file() else path.resolve().name)
    if path.is_file():
        s = read_structure(path)
        return _structure_jobs(s, path.stem, path.parent, Path(), label), s
    drawn: set[str] = set()
    jobs, structure = _stage_jobs(path, Path(), label, drawn)
    for stage in STAGES:
        if (path / stage).is_dir():
            more, s = _stage_jobs(path / stage, Path(stage), label, drawn)
            jobs += more
            if structure is None:  # the top folder's, else search's, else retrain's
                structure = s
    if not jobs:
        raise StructureError(f"{path}: no structure.json, alphas.csv or history.jsonl "
                             f"(nor in {'/, '.join(STAGES)}/)")
    return jobs, structure


def _save(fig, path: Path, fmt: str) -> None:
    import matplotlib

    buf = io.BytesIO()
    # fixed ids and no date, so that re-plotting the same run gives the same SVG
    with matplotlib.rc_context({"svg.hashsalt": "s3pet"}):
        fig.savefig(buf, format=fmt, dpi=DPI, bbox_inches="tight", pad_inches=0.12,
                    facecolor="white", metadata={"Date": None} if fmt in ("svg", "pdf") else None)
    atomic_write_bytes(path, buf.getvalue())


def plot_paths(inputs: Sequence[str | os.PathLike] | str | os.PathLike,
               out: str | os.PathLike | None = None,
               formats: Sequence[str] = ("png", "svg")) -> list[Path]:
    """Draw every plot the inputs allow and save them; returns the files written.

    Args:
        inputs: run directories (their structure.json, alphas.csv, history.jsonl and those of
            their ``search/`` and ``retrain/`` folders) or structure files. With two or more
            structures their average is drawn too (``average.*``, in the inputs' common folder).
        out: None writes next to each input; a folder collects everything (one sub-folder per
            input when there are several); a file path (``.png``/``.svg``/``.pdf``) draws only
            the main plot there: the average for several inputs, else the structure heatmap
            (else the gates, else the trajectory).
        formats: file formats for folder outputs.

    Raises:
        ConfigError: a missing input, no input, an unknown format.
        StructureError: an input is not a structure / run directory, or holds a malformed file.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    paths = [Path(p) for p in inputs]
    if not paths:
        raise ConfigError("nothing to plot: no inputs given")
    formats = tuple(f.lower().lstrip(".") for f in formats)
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ConfigError(f"unknown plot format {', '.join(bad) or '(none)'}; "
                          f"use {', '.join(FORMATS)}")
    for p in paths:
        if not p.exists():
            raise ConfigError(f"no such file or directory: {p}")

    jobs: list[_Job] = []
    structures = []
    labels: dict[str, int] = {}
    for p in paths:
        more, s = _input_jobs(p)
        label = more[0].label
        labels[label] = labels.get(label, 0) + 1
        if labels[label] > 1:  # two inputs with one name (runs/a/x, runs/b/x)
            label = f"{label}_{labels[label]}"
            more = [j._replace(label=label) for j in more]
        jobs += more
        if s is not None:
            structures.append(s)
    if len(structures) >= 2:
        common = Path(os.path.commonpath([str((p if p.is_dir() else p.parent).resolve())
                                          for p in paths]))
        avg = average_grid(structures)
        jobs.append(_Job("average", common, Path(), "", 0, lambda: plot_average(avg)))

    out_path = Path(out) if out is not None else None
    if out_path is not None and out_path.suffix.lower().lstrip(".") in FORMATS \
            and not out_path.is_dir():
        plan = [(min(jobs, key=lambda j: j.priority), [out_path])]
    else:
        several = len(paths) > 1
        plan = []
        for j in jobs:
            folder = j.where if out_path is None else (
                out_path / (j.label if several and j.label else "") / j.rel)
            plan.append((j, [folder / f"{j.stem}.{f}" for f in formats]))

    written = []
    for job, files in plan:  # one figure alive at a time
        result = job.draw()
        fig = (result.flat[0] if hasattr(result, "flat") else result).figure
        for path in files:
            _save(fig, path, path.suffix.lower().lstrip("."))
            written.append(path)
            logger.info("wrote %s", path)
    return written
