"""New text to predict: rows holding a card's input fields -> unlabelled ``Example``s.

An input row (a CSV/TSV row under a header, a JSON-lines object, or a dict in Python) holds
the card's *logical* names, not its source columns: each text field, or the names its
template uses (COPA: ``premise`` and ``question``), and for multiple choice the choices. The
card's templates and value maps apply as in training; other columns (an id, a label) are
ignored. Every row must be readable, so that predictions line up with the rows one to one.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from string import Formatter

from s3pet.errors import TaskError
from s3pet.tasks.cards import Example, TaskCard
from s3pet.tasks.examples import _example_maker, _guarded
from s3pet.tasks.formats import FORMATS, _rows, _suffix_format


def input_fields(card: TaskCard) -> tuple[str, ...]:
    """The names an input row must hold: each text field (or the names in its template), then the choices."""
    templates = card.source.get("templates", {})
    names: list[str] = []
    for key in card.text_fields:
        if key in templates:  # "{word}: {sentence1}" reads word and sentence1
            names += [re.split(r"[.\[]", f)[0] for _, f, _, _ in Formatter().parse(templates[key]) if f]
        else:
            names.append(key)
    names += card.source.get("choices", [])
    return tuple(dict.fromkeys(names))


def input_examples(card: TaskCard, rows: Iterable[tuple[str, object]]) -> list[Example]:
    """Unlabelled examples (label -1) from ``(where, row)`` pairs, ``where`` naming the row in errors
    (``file:line``). A plain string stands for the one input field of a card that has one.

    Raises TaskError for a row that is not an object, lacks a field, or breaks the card's rules."""
    fields = input_fields(card)
    make = _example_maker(card, labelled=False)
    out = []
    for where, row in rows:
        if isinstance(row, Exception):
            raise TaskError(f"{where}: {row}")
        if isinstance(row, str) and len(fields) == 1:
            row = {fields[0]: row}
        if not isinstance(row, dict):
            raise TaskError(f"{where}: a row must be an object of the fields {', '.join(fields)}, got "
                            f"{type(row).__name__}")
        missing = [f for f in fields if f not in row]
        if missing:
            raise TaskError(f"{where}: no field '{missing[0]}' (task {card.name} reads {', '.join(fields)}; "
                            f"the row has {', '.join(map(str, row)) or 'none'})")
        try:
            out.append(make(row))
        except (ValueError, KeyError, TypeError) as e:
            raise TaskError(f"{where}: {e}") from e
    return out


def read_inputs(card: TaskCard, path: str | os.PathLike) -> list[Example]:
    """Unlabelled examples from a CSV, TSV (with a header) or JSON-lines file, one per row in order.

    Raises TaskError: no such file, an unknown suffix, no rows, or a bad row (named by its line)."""
    p = Path(path)
    if not p.is_file():
        raise TaskError(f"input file {path} not found")
    fmt = _suffix_format(p.name)
    if fmt not in FORMATS:
        raise TaskError(f"input file {p}: unknown format {p.suffix or '(no suffix)'}; use .csv, .tsv or .jsonl")
    try:
        rows = _rows(p, {"format": fmt, "header": True, "encoding": "utf-8-sig"}, None)
        examples = input_examples(card, ((f"{p}:{n}", r) for n, r in _guarded(rows, str(p))))
    except OSError as e:
        raise TaskError(f"input file {p} cannot be read ({e.strerror})") from e
    if not examples:
        raise TaskError(f"input file {p} has no rows (empty or header only)")
    return examples
