"""Reading data files into rows: TSV (GLUE: tabs only), CSV, JSON lines, and flatteners that
turn a nested record into several rows. Knows nothing of cards: a spec dict says how to read."""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

from s3pet.errors import TaskError

log = logging.getLogger(__name__)

FORMATS = ("tsv", "csv", "jsonl")


def _suffix_format(name: str) -> str:
    suffix = Path(name).suffix.lower().lstrip(".")
    return {"txt": "tsv", "json": "jsonl"}.get(suffix, suffix)


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
