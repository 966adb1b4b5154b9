"""``load_task`` (read, split, subsample) and ``describe_tasks`` (the ``s3pet tasks`` table)."""

from __future__ import annotations

import logging
import os

from s3pet.errors import ConfigError, TaskError
from s3pet.tasks.cards import TaskCard, TaskData
from s3pet.tasks.registry import get_card, list_tasks
from s3pet.tasks.sources import _read_splits
from s3pet.tasks.splits import _make_splits, _subsample

log = logging.getLogger(__name__)

NOT_LOCAL = "not available locally"


def load_task(name_or_path: str | os.PathLike | TaskCard, data_dir: str | os.PathLike | None = None,
              seed: int = 0, max_train_samples: int | None = None,
              max_eval_samples: int | None = None) -> TaskData:
    """Load a task's train / validation / test examples.

    Args:
        name_or_path: a shipped task name or the path of a user card JSON.
        data_dir: folder with GLUE/SuperGLUE files in the official layout (default: env
            ``S3PET_DATA_DIR``).
        seed: run seed for the split (unless the card fixes ``split_seed``) and subsampling.
        max_train_samples / max_eval_samples: keep at most this many training / validation
            and test examples (seeded subsample after splitting).

    Returns:
        TaskData with the three splits and ``split_info`` saying how they were made.

    Raises:
        TaskError: data missing (the message says where to put it), unreadable, or a PyPI
            sdist that does not match its pinned sha256. ConfigError: an invalid card.
    """
    card = get_card(name_or_path)
    for key, value in (("max_train_samples", max_train_samples), ("max_eval_samples", max_eval_samples)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ConfigError(f"{key} must be a positive integer, got {value!r}")
    raw, info = _read_splits(card, data_dir, allow_download=True)
    train, validation, test, split = _make_splits(card, raw, seed)
    info.update(split, run_seed=seed)
    sub = {}
    if max_train_samples is not None and len(train) > max_train_samples:
        train = _subsample(train, max_train_samples, f"{card.name}:train:{seed}")
        sub["train"] = max_train_samples
    if max_eval_samples is not None:
        if len(validation) > max_eval_samples:
            validation = _subsample(validation, max_eval_samples, f"{card.name}:validation:{seed}")
            sub["validation"] = max_eval_samples
        if len(test) > max_eval_samples:
            test = _subsample(test, max_eval_samples, f"{card.name}:test:{seed}")
            sub["test"] = max_eval_samples
    if sub:
        info["subsample"] = {"seed": seed, "max_train_samples": max_train_samples,
                             "max_eval_samples": max_eval_samples, "subsampled": sub}
    info["sizes"] = {"train": len(train), "validation": len(validation), "test": len(test)}
    return TaskData(card, train, validation, test, info)


def describe_tasks(data_dir: str | os.PathLike | None = None) -> list[dict]:
    """One row per shipped task for ``s3pet tasks``; never downloads.

    Returns dicts with name, benchmark, type, metrics, main_metric, sizes (train /
    validation / test at seed 0, or None) and where ("not available locally" if None).
    """
    rows = []
    for card in list_tasks():
        row = {"name": card.name, "benchmark": card.benchmark, "type": card.type,
               "metrics": list(card.metrics), "main_metric": card.main_metric}
        try:
            raw, info = _read_splits(card, data_dir, allow_download=False)
            *_, split = _make_splits(card, raw, 0)
            row.update(sizes=split["sizes"], where=info["origin"])
        except TaskError as e:
            log.debug("task %s: %s", card.name, e)
            row.update(sizes=None, where=NOT_LOCAL)
        rows.append(row)
    return rows
