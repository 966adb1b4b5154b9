"""The kind interface: a kind declared in one place flows through every stage that handles
kinds (space listing, injection, merge and peft export, plots) with no other edit; the
exportable restriction asked of the kinds; the export of the newer kinds."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf
from torch import nn

from s3pet import export as E
from s3pet.cli import main
from s3pet.deltas import KINDS, Delta, DeltaKind, register, unregister
from s3pet.errors import StructureError
from s3pet.export.adapter import plan_specs
from s3pet.export.exportable import exportable_specs
from s3pet.inject import DeltaSet
from s3pet.models import load_backbone
from s3pet.space import discover_sites, instantiate, load_space
from s3pet.structure import from_specs, to_specs
from test_export import batch_for, s3pet_out
from test_export import run as out_of

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = ("tiny-bert", "tiny-t5", "tiny-gpt2", "tiny-llama")


def structure_of(name, entries, seed=1):
    """(backbone, structure with every candidate of ``entries``, random weights)."""
    bb = load_backbone(name)
    specs = instantiate(load_space({"name": "t", "entries": entries}), discover_sites(bb))
    st = from_specs([(s, 1.0) for s in specs], bb, "t", {"params": sum(s.n_params for s in specs), "fraction": 0.01})
    g = torch.Generator().manual_seed(seed)
    ds = DeltaSet(to_specs(st, bb))
    return bb, st, {k: 0.3 * torch.randn(v.shape, generator=g) for k, v in ds.state_dict().items()}


# --------------------------------------------------------------------------- a kind declared in a test

class ToyScale(Delta):
    kind = "toy_scale"

    def __init__(self):
        super().__init__()
        self.c = nn.Parameter(torch.zeros(1))

    def forward(self, x, y, gate):
        c = self.c if gate is None else self.c * gate
        return y * (1 + c.to(y.dtype))


class ToyScaleKind(DeltaKind):
    """One scalar per linear, scaling its whole output: y <- (1 + c) y."""

    name = "toy_scale"
    hosts = ("linear",)
    stage = 0
    defaults = {}
    merge_refusal = None
    peft_refusal = "a toy of the tests"
    code, colour, order = "TS", "#123456", 50

    def unit_params(self, site, params):
        return 1

    def build(self, site, params, units):
        return ToyScale()

    def fold(self, delta, weight, bias):
        s = 1 + delta.c.float()
        return weight * s, None if bias is None else bias * s


@pytest.fixture
def toy_kind():
    register(ToyScaleKind)
    yield KINDS["toy_scale"]
    unregister("toy_scale")


def test_a_kind_declared_in_one_place_flows_through_every_stage(toy_kind, tmp_path, capsys):
    from s3pet import plot as P

    space = tmp_path / "toy.json"
    space.write_text(json.dumps({"name": "toy", "entries": [{"kind": "toy_scale", "roles": ["ffn.in"]},
                                                            {"kind": "lora", "roles": ["attn.q"], "rank": 2}]}))
    # 1. space listing
    assert main(["space", "tiny-bert", "--space", str(space)]) == 0
    listing = capsys.readouterr().out
    assert any(line.split()[:2] == ["toy_scale", "2"] for line in listing.splitlines())  # 2 layers: 2 modules
    # 2. injection, through the structure reader
    bb, st, w = structure_of("tiny-bert", load_space(str(space)).to_dict()["entries"])
    assert st.counts_by_kind()["toy_scale"]["modules"] == 2
    path = tmp_path / "structure.json"
    st.save(path)
    base = out_of(load_backbone("tiny-bert"), batch_for(bb))
    ref = s3pet_out("tiny-bert", st, w)
    assert (ref - base).abs().max() > 1e-2
    # 3. merge export: folded by the kind's own rule, reloaded by transformers
    out = E.export_merged(st, bb, tmp_path / "merged", w)
    assert (out_of(tf.AutoModel.from_pretrained(str(out)), batch_for(bb)) - ref).abs().max() < 1e-4
    # ... and the peft export names the kind and its reason
    with pytest.raises(StructureError, match="toy_scale .a toy of the tests.*--merge"):
        E.export_peft(st, bb, tmp_path / "peft", w)
    # 4. plots: its code, colour and order
    grid = P.structure_grid(P.read_structure(path))
    assert grid.kinds == ("lora", "toy_scale")  # lora's order 0 before the toy's 50
    assert {P.cell_label(grid.cell(*k[:3])) for k in grid.rank if k[3] == "toy_scale"} == {"TS"}
    assert P.kind_colour("toy_scale") == "#123456" and P.kind_code("toy_scale") == "TS"
    pngs = [p for p in P.plot_paths([path], tmp_path / "plots") if p.suffix == ".png"]
    assert pngs and all(p.stat().st_size > 2000 for p in pngs)


def test_unregistered_kind_is_unknown_again(toy_kind):
    unregister("toy_scale")
    assert "toy_scale" not in KINDS
    with pytest.raises(Exception, match="unknown kind"):
        load_space({"entries": [{"kind": "toy_scale", "roles": ["ffn.in"]}]})
    register(ToyScaleKind)  # for the fixture's teardown


def test_every_shipped_kind_declares_its_export_and_plot_style():
    colours = [k.colour for k in KINDS.values()]
    assert all(colours) and len(set(colours)) == len(colours)
    codes = [k.code for k in KINDS.values()]
    assert all(codes) and len(set(codes)) == len(codes)
    assert len({k.order for k in KINDS.values()}) == len(KINDS)
    for k in KINDS.values():
        assert (k.merge_refusal is None) or isinstance(k.merge_refusal, str)
        assert (k.peft_refusal is None) or isinstance(k.peft_refusal, str)


# --------------------------------------------------------------------------- exportable

@pytest.mark.parametrize("name", FAMILIES)
def test_exportable_space_exports_whole_by_its_target(name, tiny_backbone, tiny_sites):
    bb = tiny_backbone(name)
    specs = instantiate(load_space("unified"), tiny_sites(name))
    kept, target = exportable_specs(specs, bb)
    kinds = {s.kind for s in kept}
    assert kept and kinds.isdisjoint({"adapter", "lowrank_adapter", "parallel_adapter"})
    assert "lora" in kinds
    if "merged" in target:
        assert E.merge_problems(kept, bb) == []
    if "peft" in target:
        assert plan_specs(kept, bb).problems == []
    # Nothing is dropped without cause: under the merged target, every dropped candidate
    # cannot merge even on its own.
    keys = {s.key for s in kept}
    if target == "merged":
        assert all(E.merge_problems([s], bb) for s in specs if s.key not in keys)


def test_search_with_exportable_derives_only_exportable_kinds_and_exports(tmp_path):
    from s3pet.pipeline import search
    from s3pet.search import SearchConfig
    from s3pet.structure import load
    from synthetic import write_sentiment_task

    task = str(write_sentiment_task(tmp_path / "task", n_train=64, n_eval=16))
    cfg = SearchConfig(max_steps=4, batch_size=8, eval_every=2, log_every=1, progress=False, exportable=True)
    search("tiny-t5", task, "unified", "4000", tmp_path / "s", cfg)
    saved = json.loads((tmp_path / "s" / "config.json").read_text())
    assert saved["search"]["exportable"] is True
    st = load(tmp_path / "s" / "structure.json")
    kinds = set(st.counts_by_kind())
    assert kinds and all(KINDS[k].merge_refusal is None or KINDS[k].peft_refusal is None for k in kinds)
    bb = load_backbone("tiny-t5")
    specs = to_specs(st, bb)
    g = torch.Generator().manual_seed(0)
    w = {k: 0.3 * torch.randn(v.shape, generator=g) for k, v in DeltaSet(specs).state_dict().items()}
    if not E.merge_problems(specs, bb):
        out = E.export_merged(st, bb, tmp_path / "m", w)
    else:
        out = E.export_peft(st, bb, tmp_path / "m", w)
    assert E.read_export_info(out)["trained"] is True


def test_exportable_is_on_in_run_and_off_in_search():
    from s3pet.cli import parse

    assert parse(["run", "--out", "o"]).cfg.search.exportable is True
    assert parse(["run", "--out", "o", "--no-exportable"]).cfg.search.exportable is False
    assert parse(["search", "--task", "t", "--budget", "1k", "--out", "o"]).cfg["search"].exportable is False
    assert parse(["search", "--task", "t", "--budget", "1k", "--out", "o",
                  "--exportable"]).cfg["search"].exportable is True


# --------------------------------------------------------------------------- the newer kinds' export

@pytest.mark.parametrize("name", FAMILIES)
def test_adapterbias_merges_exactly_after_the_earlier_stages(name, tmp_path):
    # ffn.out hosts both the FFN's linear site and its block site: IA3, LoRA and AdapterBias
    # stack at one host, folded in stage order.
    entries = [{"kind": "adapterbias", "roles": ["attn.block", "ffn.block", "xattn.block"]},
               {"kind": "lora", "roles": ["ffn.out"], "rank": 2, "alpha": 4.0},
               {"kind": "ia3", "roles": ["ffn.out"]}]
    bb, st, w = structure_of(name, entries)
    ref = s3pet_out(name, st, w)
    assert (ref - out_of(load_backbone(name), batch_for(bb))).abs().max() > 1e-2
    merged = E.merge(st, bb, w)
    assert (out_of(merged, batch_for(bb)) - ref).abs().max() <= 1e-4 * (1 + ref.abs().max())
    with pytest.raises(StructureError, match=r"adapterbias \(no peft counterpart.*--merge"):
        E.export_peft(st, bb, tmp_path / "a", w)


def test_parallel_adapter_is_refused_by_both_exports(tmp_path):
    bb, st, w = structure_of("tiny-gpt2", [{"kind": "parallel_adapter", "roles": ["ffn.block"], "bottleneck": 2}])
    with pytest.raises(StructureError, match="parallel_adapter .parallel bottleneck") as e:
        E.export_peft(st, bb, tmp_path / "a", w)
    assert "Merging is not possible either" in str(e.value)
    with pytest.raises(StructureError, match="parallel_adapter"):
        E.export_merged(st, bb, tmp_path / "m", w)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- s3pet space lists them

def _dims(cfg):
    """(d, [(stack, layers, sublayers per block)]) from a tiny model's config, by family."""
    if cfg.model_type == "t5":
        return cfg.d_model, [("encoder", cfg.num_layers, 2), ("decoder", cfg.num_decoder_layers, 3)]
    if cfg.model_type == "gpt2":
        return cfg.n_embd, [("decoder", cfg.n_layer, 2)]
    stack = "decoder" if cfg.model_type == "llama" else "encoder"
    return cfg.hidden_size, [(stack, cfg.num_hidden_layers, 2)]


@pytest.mark.parametrize("name", FAMILIES)
def test_space_lists_the_new_kinds_with_exact_counts(name, capsys, tiny_backbone):
    assert main(["space", name, "--space", "unified", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    d, stacks = _dims(tiny_backbone(name).config)
    sites = sum(n * subs for _, n, subs in stacks)  # one block site per sublayer
    bneck = max(1, d // 16)
    assert report["per_kind"]["parallel_adapter"] == {"modules": sites, "candidates": sites * bneck,
                                                      "params": sites * bneck * (2 * d + 1)}
    assert report["per_kind"]["adapterbias"] == {"modules": sites, "candidates": sites, "params": sites * 2 * d}
    rows = [m for m in report["modules"] if m["kind"] in ("parallel_adapter", "adapterbias")]
    assert {m["role"] for m in rows} <= {"attn.block", "xattn.block", "ffn.block"}
    assert {(m["stack"], m["role"]) for m in rows} >= {(s, r) for s, _, _ in stacks for r in ("attn.block", "ffn.block")}


def test_exportable_without_peft_keeps_what_merges(monkeypatch, tiny_backbone, tiny_sites):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    bb = tiny_backbone("tiny-t5")
    kept, target = exportable_specs(instantiate(load_space("s3pet-m"), tiny_sites("tiny-t5")), bb)
    assert target == "merged" and kept and E.merge_problems(kept, bb) == []
