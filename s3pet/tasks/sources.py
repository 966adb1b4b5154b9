"""Where a card's data comes from: a local folder, the PyPI cache, or the hub; parsed per split."""

from __future__ import annotations

import os
from pathlib import Path

from s3pet.errors import TaskError
from s3pet.tasks.cards import TaskCard
from s3pet.tasks.examples import _examples
from s3pet.tasks.formats import _rows, _suffix_format
from s3pet.tasks.pypi import _cache_complete, _fetch_pypi, _pypi_cache_dir

DATA_DIR_ENV = "S3PET_DATA_DIR"


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


def _read_local(card: TaskCard, base: Path, origin: str) -> tuple[dict, dict]:
    out, sources, dropped = {}, {}, {}
    for split, spec in _file_specs(card).items():
        path = base / spec["file"]
        rows = _rows(path, spec, card.source.get("flatten"))
        out[split], dropped[split] = _examples(card, rows, str(path))
        sources[split] = str(path)
    return out, {"origin": origin, "sources": sources, "dropped": dropped}


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
