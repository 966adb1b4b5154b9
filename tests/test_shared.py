"""Tensors shared across sites (Compacter's slow weights, FacT's factors): paid once in the
greedy derivation, set aside by the search and given back when unused, recorded once in the
structure file and in delta.safetensors, and counted exactly by every stage."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file

from s3pet import budget as B
from s3pet import export as E
from s3pet import structure as S
from s3pet.errors import BudgetError, ConfigError, StructureError
from s3pet.models import load_backbone
from s3pet.space import discover_sites, instantiate, load_space, shared_params, shared_tensors, total_params
from s3pet.supernet import Supernet
from test_export import batch_for, s3pet_out
from test_export import run as out_of

pytestmark = pytest.mark.usefixtures("one_thread")

MIXED = [{"kind": "lora", "roles": ["attn.q", "attn.v"], "rank": 2},
         {"kind": "fact", "roles": ["attn.*", "ffn.*"], "rank": 2},
         {"kind": "compacter", "roles": ["attn.block", "ffn.block"], "bottleneck": 4}]


def specs_of(sites, entries=MIXED):
    return instantiate(load_space({"name": "mixed", "entries": entries}), sites)


def built_trainable(structure, backbone) -> int:
    ds = S.apply(structure, backbone)
    return sum(p.numel() for p in ds.parameters() if p.requires_grad)


# --------------------------------------------------------------------------- the greedy derivation

def test_derive_pays_each_shared_tensor_once_and_only_when_needed():
    n = torch.tensor([10.0, 10.0, 10.0, 30.0])
    needs = [[0], [0], [], [1]]  # candidates 0 and 1 share tensor 0 (cost 25); 3 needs tensor 1 (cost 100)
    shared = [25, 100]
    p = torch.tensor([0.9, 0.8, 0.7, 0.95])
    # 3 would cost 30 + 100 > 70: skipped; 0 pays 10 + 25, 1 only 10, 2 another 10: 55 <= 70.
    keep = B.derive(p, n, 70, needs=needs, shared=shared)
    assert keep.tolist() == [True, True, True, False]
    # Without the shared costs the same scores keep 3 first.
    assert B.derive(p, n, 70).tolist()[3] is True
    # When 1 alone is too dear with its tensor, it is skipped and the rest still filled.
    assert B.derive(torch.tensor([0.1, 0.9, 0.8, 0.2]), n, 30, needs=needs, shared=shared).tolist() == \
        [False, False, True, False]
    with pytest.raises(BudgetError):
        B.derive(p, n, 70, needs=needs[:2], shared=shared)


@pytest.mark.parametrize("seed", range(5))
def test_derived_total_with_shared_tensors_is_within_budget(seed, tiny_sites):
    specs = specs_of(tiny_sites("tiny-llama"))
    from s3pet.space import shared_needs
    from s3pet.supernet import kept_specs

    off = 0
    for s in specs:
        s.offset, off = off, off + s.units
    n = torch.tensor([s.unit_params for s in specs for _ in range(s.units)], dtype=torch.float64)
    p = torch.rand(off, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    needs, costs = shared_needs(specs)
    for budget in (200, 600, 1500):
        kept = [s for s, _ in kept_specs(specs, B.derive(p, n, budget, needs=needs, shared=costs), p)]
        assert kept and total_params(kept) <= budget
        assert total_params(kept) == sum(s.n_params for s in kept) + shared_params(kept)


# --------------------------------------------------------------------------- the search

@pytest.mark.parametrize("alias", ["tiny-bert", "tiny-t5", "tiny-gpt2", "tiny-llama"])
def test_search_reserves_shared_tensors_and_derives_within_budget_exactly(alias, tiny_backbone, tiny_sites):
    specs = specs_of(tiny_sites(alias))
    reserved, units = shared_params(specs), sum(s.n_params for s in specs) // 2
    budget = reserved + units
    net = Supernet(tiny_backbone(alias), specs, budget)
    assert net.reserved == reserved > 0 and net.unit_budget == units
    p = net.gate_probs().detach()
    assert float(B.expected_params(p.double(), net.n)) == pytest.approx(units, rel=1e-4)  # the gates share the rest
    kept = net.derive_specs()
    st = S.from_specs(kept, tiny_backbone(alias), "mixed", {"params": budget, "fraction": 0.0})
    st = S.from_dict(json.loads(json.dumps(st.to_dict())))  # through the file format and its checks
    assert st.shared and st.n_params == total_params([s for s, _ in kept]) <= budget
    assert built_trainable(st, tiny_backbone(alias)) == st.n_params  # built == reported <= budget
    stats = net.derivation_stats(p)
    assert sum(stats["derived_params_by_kind"].values()) == st.n_params


def test_shared_share_is_given_back_when_no_module_of_its_kind_is_kept(tiny_backbone, tiny_sites):
    specs = specs_of(tiny_sites("tiny-bert"))
    net = Supernet(tiny_backbone("tiny-bert"), specs, shared_params(specs) + 600)
    with torch.no_grad():  # LoRA's gates first: the derivation keeps what fits of LoRA before any sharer
        for s in net.specs:
            net.alpha[s.offset:s.offset + s.units] = 5.0 if s.kind == "lora" else -5.0
    net.set_alpha(net.alpha.detach().clone())
    kept = [s for s, _ in net.derive_specs(budget=total_params([s for s in specs if s.kind == "lora"]))]
    assert {s.kind for s in kept} == {"lora"}  # every LoRA unit fits: the sharers' reserve is unused
    assert shared_params(kept) == 0 and total_params(kept) == sum(s.n_params for s in specs if s.kind == "lora")


def test_a_budget_without_room_for_the_shared_tensors(tiny_backbone, tiny_sites, caplog):
    from s3pet.pipeline import affordable

    specs = specs_of(tiny_sites("tiny-bert"))
    with pytest.raises(BudgetError, match="shared tensors"):
        Supernet(tiny_backbone("tiny-bert"), specs, shared_params(specs))
    # The search drops the kind sharing the most (FacT here) rather than refusing the budget.
    fact = shared_params([s for s in specs if s.kind == "fact"])
    with caplog.at_level(logging.WARNING, logger="s3pet"):
        kept = affordable(specs, fact)
    assert {s.kind for s in kept} == {"lora", "compacter"} and "fact is not searched" in caplog.text
    assert affordable(specs, 10 ** 6) == specs
    with pytest.raises(BudgetError, match="compacter"):
        affordable([s for s in specs if s.kind == "compacter"], 64)


# --------------------------------------------------------------------------- the structure file

def make_structure(alias="tiny-llama", entries=MIXED):
    bb = load_backbone(alias)
    specs = specs_of(discover_sites(bb), entries)
    st = S.from_specs([(s, 0.5) for s in specs], bb, "mixed", {"params": total_params(specs), "fraction": 0.0})
    return bb, st


def test_structure_lists_each_shared_tensor_once_and_checks_it():
    bb, st = make_structure()
    raw = st.to_dict()
    names = [t["name"] for t in raw["shared"]]
    assert len(names) == len(set(names)) == len(shared_tensors(S.to_specs(st, bb)))
    assert raw["n_params"] == sum(m["n_params"] for m in raw["modules"]) + sum(t["n_params"] for t in raw["shared"])
    by_kind = st.counts_by_kind()
    assert sum(v["params"] for v in by_kind.values()) == st.n_params

    def bad(edit, match, model=False):
        r = json.loads(json.dumps(raw))
        edit(r)
        with pytest.raises(StructureError, match=match):
            S.to_specs(S.from_dict(r), bb) if model else S.from_dict(r)

    bad(lambda r: r["shared"][0].update(n_params=5), "product of the shape")
    bad(lambda r: r["shared"].append(dict(r["shared"][0])), "listed twice")
    bad(lambda r: r["shared"][0].update(kind="nope"), "known kind")
    bad(lambda r: r["budget"].update(params=r["n_params"] - 1), "over the budget")
    bad(lambda r: (r["shared"].pop(), r.update(n_params=r["n_params"] - raw["shared"][-1]["n_params"])),
        "shared tensors listed", model=True)
    # Kinds without shared tensors write the file as before: no "shared" key.
    _, plain = make_structure(entries=MIXED[:1])
    assert "shared" not in plain.to_dict() and plain.shared == []


# --------------------------------------------------------------------------- export

@pytest.mark.parametrize("form", ["tt", "tk"])
@pytest.mark.parametrize("alias", ["tiny-bert", "tiny-t5", "tiny-gpt2", "tiny-llama"])
def test_fact_merges_exactly_and_peft_refuses_it(alias, form, tmp_path):
    entries = [{"kind": "fact", "roles": ["attn.*", "ffn.*"], "rank": 2, "form": form, "scale": 2.0},
               {"kind": "lora", "roles": ["attn.v"], "rank": 2}]
    bb, st = make_structure(alias, entries)
    g = torch.Generator().manual_seed(0)
    from s3pet.inject import DeltaSet

    w = {k: 0.3 * torch.randn(v.shape, generator=g) for k, v in DeltaSet(S.to_specs(st, bb)).state_dict().items()}
    ref = s3pet_out(alias, st, w)
    assert (ref - out_of(load_backbone(alias), batch_for(bb))).abs().max() > 1e-2
    merged = E.merge(st, bb, w)
    assert (out_of(merged, batch_for(bb)) - ref).abs().max() <= 1e-4 * (1 + ref.abs().max())
    with pytest.raises(StructureError, match=r"fact \(no peft counterpart"):
        E.export_peft(st, bb, tmp_path / "a", w)


def test_compacter_is_refused_by_both_exports(tmp_path):
    bb, st = make_structure("tiny-gpt2", MIXED[2:])
    from s3pet.inject import DeltaSet

    w = {k: v.detach().clone() for k, v in DeltaSet(S.to_specs(st, bb)).state_dict().items()}
    with pytest.raises(StructureError, match="compacter"):
        E.export_merged(st, bb, tmp_path / "m", w)
    with pytest.raises(StructureError, match=r"compacter \(no peft counterpart"):
        E.export_peft(st, bb, tmp_path / "a", w)


# --------------------------------------------------------------------------- retrain, weights, reload

def test_retrain_counts_saves_and_reloads_shared_tensors_once(tmp_path):
    from s3pet.pipeline import load_run, retrain
    from s3pet.train import TrainConfig
    from synthetic import write_sentiment_task

    task = str(write_sentiment_task(tmp_path / "task", n_train=32, n_eval=8))
    _, st = make_structure("tiny-bert")
    cfg = TrainConfig(max_steps=2, batch_size=8, eval_every=2, progress=False, device="cpu")
    m = retrain(st, task, tmp_path / "r", cfg, model="tiny-bert")
    assert m["params"]["pet"] == st.n_params  # the trainable count reported after retrain
    assert m["learning_rates"]["kind:compacter"] == 3e-3 and m["learning_rates"]["kind:fact"] == 1e-3
    saved = load_file(str(tmp_path / "r" / "delta.safetensors"))
    shared = sorted(k for k in saved if ".shared." in k)
    assert shared == sorted(f"deltas.shared.{t['name']}" for t in st.shared)  # each once
    assert sum(v.numel() for k, v in saved.items() if k.startswith("deltas.")) == st.n_params
    run = load_run(tmp_path / "r")
    for t in st.shared:
        assert torch.equal(run.deltas.shared[t["name"]].detach().cpu(), saved[f"deltas.shared.{t['name']}"])
    with pytest.raises(ConfigError, match="--dp does not support shared tensors"):
        retrain(st, task, tmp_path / "dp", TrainConfig(max_steps=2, batch_size=8, progress=False, dp=True,
                                                       device="cpu"), model="tiny-bert")
    assert not (tmp_path / "dp").exists()  # refused before the folder is made
