"""The structure file: round trip, apply, and every validation error naming its entry."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from s3pet import structure as S
from s3pet.errors import StructureError
from s3pet.models import TINY_ALIASES, count_params
from s3pet.space import ModuleSpec, instantiate, load_space, total_params

pytestmark = pytest.mark.usefixtures("one_thread")


def derived(specs):
    """A plausible derived structure: every candidate module at about half its units."""
    out = []
    for i, s in enumerate(specs):
        out.append((ModuleSpec(s.site, s.kind, dict(s.params), max(1, s.units // 2)), 0.5 + i / (4 * len(specs))))
    return out


def make_structure(tiny_backbone, tiny_sites, alias, space):
    model = tiny_backbone(alias)
    kept = derived(instantiate(load_space(space), tiny_sites(alias)))
    total = total_params([s for s, _ in kept])  # modules, and each shared tensor once
    st = S.from_specs(kept, model, space, {"params": total + 10, "fraction": (total + 10) / count_params(model)},
                      {"task": "unit-test", "seed": 0})
    return st, kept


def spec_tuple(s):
    return (s.site, s.kind, s.units, s.params, s.n_params)


ROUND_TRIP = [(a, "s3pet-m") for a in TINY_ALIASES] + [("tiny-bert", "s3pet-l"), ("tiny-bert", "unified"),
                                                       ("tiny-t5", "unified")]


@pytest.mark.parametrize("alias,space", ROUND_TRIP)
def test_round_trip(alias, space, tmp_path, tiny_backbone, tiny_sites):
    st, kept = make_structure(tiny_backbone, tiny_sites, alias, space)
    st.save(tmp_path / "structure.json")
    raw = json.loads((tmp_path / "structure.json").read_text())
    assert raw["schema"] == S.SCHEMA and raw["n_params"] == total_params([s for s, _ in kept])
    loaded = S.load(tmp_path)  # a run directory works too
    assert loaded.to_dict() == st.to_dict()
    assert loaded.base_model["name_or_path"] == alias
    assert loaded.base_model["n_params"] == count_params(tiny_backbone(alias))
    specs = S.to_specs(loaded, tiny_backbone(alias))
    assert [spec_tuple(s) for s in specs] == [spec_tuple(s) for s, _ in kept]
    assert [m["score"] for m in loaded.modules] == pytest.approx([sc for _, sc in kept], abs=1e-6)


@pytest.mark.parametrize("alias", TINY_ALIASES)
def test_apply_trains_exactly_n_params(alias, tiny_backbone, tiny_sites, make_inputs, backbone_output):
    st, _ = make_structure(tiny_backbone, tiny_sites, alias, "s3pet-m")
    model = tiny_backbone(alias)
    inputs = make_inputs(model)
    ref = backbone_output(model, inputs)
    deltas = S.apply(st, model)
    trainable = [p for p in list(model.parameters()) + list(deltas.parameters()) if p.requires_grad]
    assert sum(p.numel() for p in trainable) == st.n_params == sum(p.numel() for p in deltas.parameters())
    # The modules live beside the backbone, not in its tree: a task head built on the backbone
    # stays separate from (and is never counted in) the structure.
    assert count_params(model) == st.base_model["n_params"]
    assert not {id(p) for p in model.parameters()} & {id(p) for p in deltas.parameters()}
    # Fresh modules start as a no-op; whole (ungated) modules with weights act.
    assert torch.allclose(backbone_output(model, inputs), ref, atol=1e-6)
    with torch.no_grad():
        for p in deltas.parameters():
            p.normal_(0, 0.3)
    assert (backbone_output(model, inputs) - ref).abs().max() > 1e-2
    deltas.detach()


def test_summary_and_counts(tiny_backbone, tiny_sites):
    st, kept = make_structure(tiny_backbone, tiny_sites, "tiny-bert", "s3pet-m")
    counts = st.counts_by_kind()
    for kind in {s.kind for s, _ in kept}:
        mine = [s for s, _ in kept if s.kind == kind]
        assert counts[kind] == {"modules": len(mine), "params": sum(s.n_params for s in mine),
                                "rank": sum(s.units for s in mine)}
    line = st.summary()
    assert f"{len(kept)} modules" in line and f"{st.n_params:,} params" in line and "% of budget" in line


# --------------------------------------------------------------------------- validation on load

@pytest.fixture(scope="module")
def valid(tiny_backbone, tiny_sites):
    st, _ = make_structure(tiny_backbone, tiny_sites, "tiny-bert", "s3pet-m")
    d = st.to_dict()
    assert {m["kind"] for m in d["modules"]} == {"lora", "bitfit", "lnfit", "lowrank_adapter"}
    return json.loads(json.dumps(d))


def _set(path, value):
    def edit(d):
        *head, last = path
        for k in head:
            d = d[k]
        d[last] = value
    return edit


def _drop(path):
    def edit(d):
        *head, last = path
        for k in head:
            d = d[k]
        del d[last]
    return edit


def _retotal(edit):
    """Apply ``edit`` then make the top-level total and budget agree again (isolates the error)."""
    def wrapped(d):
        edit(d)
        d["n_params"] = sum(int(m["n_params"]) for m in d["modules"])
        d["budget"]["params"] = d["n_params"] + 10
    return wrapped


def _duplicate(d):
    d["modules"].append(copy.deepcopy(d["modules"][1]))
    d["n_params"] = sum(int(m["n_params"]) for m in d["modules"])
    d["budget"]["params"] = d["n_params"]


LOAD_ERRORS = [
    ("wrong-schema", _set(["schema"], "s3pet.structure/v0"), ["schema", "s3pet.structure/v0"]),
    ("no-schema", _drop(["schema"]), ["schema"]),
    ("missing-base-model", _drop(["base_model"]), ["base_model"]),
    ("missing-budget", _drop(["budget"]), ["budget"]),
    ("missing-modules", _drop(["modules"]), ["modules"]),
    ("modules-not-list", _set(["modules"], {"a": 1}), ["modules"]),
    ("module-not-object", _set(["modules", 1], "lora"), ["modules[1]"]),
    ("module-missing-role", _drop(["modules", 1, "role"]), ["modules[1]", "role"]),
    ("module-missing-n-params", _drop(["modules", 2, "n_params"]), ["modules[2]", "n_params"]),
    ("unknown-kind", _set(["modules", 1, "kind"], "dora_xl"), ["modules[1]", "dora_xl"]),
    ("rank-zero", _set(["modules", 1, "rank"], 0), ["modules[1]", "rank"]),
    ("rank-not-int", _set(["modules", 1, "rank"], "2"), ["modules[1]", "rank"]),
    ("duplicate-module", _duplicate, ["listed twice"]),
    ("n-params-sum", _set(["n_params"], 12345), ["n_params", "12345"]),
    ("budget-overrun", _set(["budget", "params"], 5), ["budget", "5"]),
    ("bad-kind-params", lambda d: d["modules"][0].update(params={"rank": 1, "dropout": 0.1}),
     ["modules[0]", "dropout"]),
    ("layer-beyond-stack", _set(["modules", 1, "layer"], 9), ["modules[1]", "layer", "9"]),
    ("n-params-string", _set(["modules", 1, "n_params"], "64"), ["modules[1]", "n_params", "'64'"]),
    ("n-params-float", _set(["modules", 1, "n_params"], 32.0), ["modules[1]", "n_params", "32.0"]),
    ("stack-not-string", _set(["modules", 1, "stack"], 0), ["modules[1]", "stack"]),
    ("score-nan", _set(["modules", 1, "score"], float("nan")), ["modules[1]", "score"]),
    ("params-not-object", _set(["modules", 1, "params"], [1]), ["modules[1]", "params"]),
    ("rank-huge", _set(["modules", 1, "rank"], 10**12), ["modules[1]", "rank"]),
]


@pytest.mark.parametrize("edit,fields", [c[1:] for c in LOAD_ERRORS], ids=[c[0] for c in LOAD_ERRORS])
def test_invalid_file_raises_on_load(valid, tmp_path, edit, fields):
    raw = copy.deepcopy(valid)
    edit(raw)
    p = tmp_path / "structure.json"
    p.write_text(json.dumps(raw))
    with pytest.raises(StructureError) as e:
        S.load(p)
    msg = str(e.value)
    assert str(p) in msg
    for f in fields:
        assert f in msg
    if "listed twice" in fields:  # the duplicate is the appended last entry
        assert f"modules[{len(raw['modules']) - 1}]" in msg and raw["modules"][1]["site"] in msg


def test_unreadable_files(tmp_path):
    with pytest.raises(StructureError, match="not found"):
        S.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    with pytest.raises(StructureError, match="not valid JSON"):
        S.load(bad)


def test_valid_file_loads(valid, tmp_path):
    p = tmp_path / "s.json"
    p.write_text(json.dumps(valid))
    assert S.load(p).n_params == valid["n_params"]


# --------------------------------------------------------------------------- validation against a model

def _find(d, pred):
    return next(i for i, m in enumerate(d["modules"]) if pred(m))


def _edit_module(pred, **changes):
    def edit(d):
        i = _find(d, pred)
        d["modules"][i].update(changes)
        return i
    return edit


def _move_kind_to_norm(d):
    """A LoRA entry moved onto a norm site (valid on its own, impossible on that host)."""
    i = _find(d, lambda m: m["kind"] == "lora")
    m = d["modules"][i]
    m.update(site="encoder.layer.0.attention.output.LayerNorm", role="norm.attn", layer=0)
    return i


def _wrong_n_params(d):
    i = _find(d, lambda m: m["kind"] == "lora")
    d["modules"][i]["n_params"] += 1
    return i


MODEL_ERRORS = [
    ("site-absent", _edit_module(lambda m: m["role"] == "attn.q", site="encoder.layer.1.attention.self.qery"),
     ["no such site"]),
    ("role-mismatch", _edit_module(lambda m: m["role"] == "attn.q", role="attn.k"), ["attn.k"]),
    ("n-params-disagree", _wrong_n_params, ["n_params"]),
    ("incompatible-host", _move_kind_to_norm, ["cannot attach", "norm"]),
]


@pytest.mark.parametrize("edit,fields", [c[1:] for c in MODEL_ERRORS], ids=[c[0] for c in MODEL_ERRORS])
def test_mismatch_with_the_model_names_the_entry(valid, tiny_backbone, edit, fields):
    raw = copy.deepcopy(valid)
    i = edit(raw)
    raw["n_params"] = sum(int(m["n_params"]) for m in raw["modules"])
    raw["budget"]["params"] = raw["n_params"]
    st = S.from_dict(raw)  # fine on its own: only the model can tell
    model = tiny_backbone("tiny-bert")
    with pytest.raises(StructureError) as e:
        S.apply(st, model)
    msg = str(e.value)
    m = raw["modules"][i]
    assert f"modules[{i}]" in msg and m["site"] in msg and m["kind"] in msg
    for f in fields:
        assert f in msg
    assert not model._forward_hooks and all(not mod._forward_hooks for mod in model.modules())


def test_structure_for_another_family_is_rejected(valid, tiny_backbone):
    st = S.from_dict(copy.deepcopy(valid))
    with pytest.raises(StructureError, match=r"modules\[0\].*no such site.*gpt2"):
        S.to_specs(st, tiny_backbone("tiny-gpt2"))
