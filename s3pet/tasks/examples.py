"""Rows -> ``Example``s by a card's rules: templates, value maps, label maps and drops."""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable

from s3pet.errors import TaskError
from s3pet.tasks.cards import Example, TaskCard

log = logging.getLogger(__name__)

#: A file with more malformed rows than this fraction is an error, not a warning.
MAX_MALFORMED = 0.01


def _examples(card: TaskCard, rows, where: str) -> tuple[list[Example], int]:
    """Examples from rows; returns (examples, number dropped by the card's label rules)."""
    make = _example_maker(card)
    out, dropped, bad, first_bad, total = [], 0, 0, None, 0
    for lineno, row in _guarded(rows, where):
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
    if total == 0:  # an empty or header-only file: an error here, not an empty split (a hang) later
        raise TaskError(f"task '{card.name}': {where} has no data rows (empty or header only); add examples "
                        f"or point the card's source.files at the right file")
    if bad:
        if bad > MAX_MALFORMED * total:
            raise TaskError(f"task '{card.name}': {bad} of {total} rows of {where} cannot be "
                            f"read; first: {first_bad}")
        log.warning("task %s: skipped %d malformed row(s) of %s; first: %s",
                    card.name, bad, where, first_bad)
    return out, dropped


def _guarded(rows, where: str):
    """The rows, with a reader error (a CSV field over the size limit, a NUL byte) as a TaskError."""
    try:
        yield from rows
    except (csv.Error, ValueError, OSError) as e:
        raise TaskError(f"{where}: cannot be read as the card's format ({e})") from e


def _example_maker(card: TaskCard, labelled: bool = True) -> Callable[[dict], Example | None]:
    """Row -> Example by the card's rules; ``labelled=False`` reads no label (new text to predict:
    the label is -1) and drops nothing."""
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
                if not labelled and key not in row:
                    continue  # e.g. a map of the label: new text has none (its input fields are checked before)
                if row[key] not in mapping:
                    raise ValueError(f"'{key}' value {row[key]!r} not in {sorted(mapping)}")
                row[key] = mapping[row[key]]
        y = label(row) if labelled else -1
        if y is None:
            return None
        return Example(tuple(text(row, k) for k in card.text_fields), y,
                       tuple(text(row, k) for k in choice_keys))

    return make
