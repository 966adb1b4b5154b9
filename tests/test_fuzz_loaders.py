"""Property-based fuzzing of the structure, space and task-card loaders.

Mutations of valid files (a value replaced by any JSON value, a key dropped or added) and raw
bytes: a loader either raises an S3petError subclass or accepts a file that satisfies the
format's rules; no foreign exception (TypeError, ValueError, OverflowError, ...) ever escapes.
Runs are derandomized, so a failure reproduces.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from s3pet import plot as P
from s3pet import structure as S
from s3pet.deltas import KINDS
from s3pet.deltas.base import MAX_UNITS
from s3pet.errors import S3petError
from s3pet.space import ROLES, instantiate, load_space
from s3pet.tasks import load_task
from synthetic import write_sentiment_task

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), st.text(max_size=6),
                 st.sampled_from(["64", "1", "encoder", "lora", "attn.q", "s3pet.structure/v1", ""]))
json_value = st.recursive(leaf, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                          max_leaves=6)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


def _at(obj, path):
    for k in path:
        obj = obj[k]
    return obj


@st.composite
def mutated(draw, base: dict):
    """``base`` with one to three edits: a node set to any JSON value, a key dropped, a key added."""
    doc = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(list(_paths(doc))))
        op = draw(st.sampled_from(["set", "set", "drop", "add"]))
        if not path:
            if op == "set":
                doc = draw(json_value)
            continue
        parent = _at(doc, path[:-1])
        if op == "set":
            parent[path[-1]] = draw(json_value)
        elif op == "drop":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=6))] = draw(json_value)
        if not isinstance(doc, (dict, list)):
            break
    return doc


def _valid_structure(tiny_backbone) -> dict:
    from s3pet.baselines import baseline_structure

    return baseline_structure("random", tiny_backbone("tiny-t5"), 2000, seed=1).to_dict()


_STRUCTURE: dict = {}


@pytest.fixture
def structure_doc(tiny_backbone):
    if not _STRUCTURE:
        _STRUCTURE.update(_valid_structure(tiny_backbone))
    return _STRUCTURE


def _int(v, lo, hi=None) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo and (hi is None or v <= hi)


def assert_valid_structure(d: dict) -> None:
    """What the format promises of an accepted file, checked independently of the loader."""
    bm = d["base_model"]
    assert isinstance(bm["name_or_path"], str) and isinstance(bm["model_type"], str)
    assert _int(bm["layers"], 1) and _int(bm["n_params"], 0)
    assert bm["stacks"] and all(isinstance(k, str) and _int(v, 1) for k, v in bm["stacks"].items())
    total = 0
    for m in d["modules"]:
        assert isinstance(m["site"], str) and m["site"]
        assert m["kind"] in KINDS and m["role"] in ROLES and m["stack"] in bm["stacks"]
        assert _int(m["layer"], -1, bm["stacks"][m["stack"]])
        assert _int(m["rank"], 1, MAX_UNITS) and _int(m["n_params"], 1)
        assert m["score"] is None or (isinstance(m["score"], (int, float)) and 0 <= m["score"] <= 1)
        assert isinstance(m["params"], dict)
        total += m["n_params"]
    assert d["n_params"] == total
    cap = d["budget"].get("params")
    assert cap is None or (_int(cap, 0) and total <= cap)
    frac = d["budget"].get("fraction")
    assert frac is None or (isinstance(frac, (int, float)) and not isinstance(frac, bool) and math.isfinite(frac))


@settings(FUZZ, max_examples=300)
@given(data=st.data())
def test_structure_loader_accepts_only_valid_files(structure_doc, data):
    doc = data.draw(mutated(structure_doc))
    try:
        st_ = S.from_dict(doc)
    except S3petError:
        return
    out = st_.to_dict()
    assert_valid_structure(out)
    assert S.from_dict(out).to_dict() == out  # accepted files round-trip
    P.structure_grid(out)  # and plot: one reader, one set of rules


@FUZZ
@given(raw=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode)))
def test_structure_file_of_any_bytes_is_one_error(tmp_path, raw):
    p = tmp_path / "s.json"
    p.write_bytes(raw)
    with pytest.raises(S3petError):
        S.load(p)


_VALID_SPACE = {"name": "fuzz", "entries": [
    {"kind": "lora", "roles": ["attn.q", "attn.v"], "rank": 4, "alpha": 8.0},
    {"kind": "adapter", "roles": ["ffn.block"], "reduction": 8, "layers": [0, "1-1"]},
    {"kind": "bitfit", "roles": ["attn.*"], "stacks": ["encoder"]},
    {"kind": "lnfit", "roles": ["norm.*"], "layers": {"from": 0.5, "to": 1.0}},
]}


@FUZZ
@given(data=st.data())
def test_space_loader_accepts_only_valid_spaces(tiny_sites, tmp_path, data):
    doc = data.draw(mutated(_VALID_SPACE))
    p = tmp_path / "space.json"
    p.write_text(json.dumps(doc))
    try:
        space = load_space(str(p))
        specs = instantiate(space, tiny_sites("tiny-bert"))
    except S3petError:
        return
    assert space.entries and all(e.kind in KINDS for e in space.entries)
    for e in space.entries:
        assert all(any(fnmatch.fnmatchcase(r, pat) for r in ROLES) for pat in e.roles)
    assert specs and all(1 <= s.units <= MAX_UNITS and s.n_params >= 1 for s in specs)


@pytest.fixture(scope="module")
def card_dir(tmp_path_factory):
    path = write_sentiment_task(tmp_path_factory.mktemp("card"), n_train=30, n_eval=10)
    return path.parent, json.loads(path.read_text())


@settings(FUZZ, max_examples=80)
@given(data=st.data())
def test_task_card_loader_accepts_only_usable_cards(card_dir, data):
    folder, card = card_dir
    doc = data.draw(mutated(card))
    p = folder / "fuzzed.json"
    p.write_text(json.dumps(doc))
    try:
        td = load_task(str(p))
    except S3petError:
        return
    assert td.train and td.validation  # an accepted card gives data to train and select on
    for ex in td.train[:5]:
        assert all(isinstance(t, str) for t in ex.texts)
