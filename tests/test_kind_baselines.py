"""Hand-designed baselines of the newer kinds: each kind alone, on the sites the unified space
gives it, as large as a budget allows; within budget on every model family, and exact."""

from __future__ import annotations

import pytest

from s3pet.baselines import KIND_METHODS, baseline_structure, kind_specs
from s3pet.deltas import KINDS
from s3pet.errors import BudgetError
from s3pet.space import discover_sites, instantiate, load_space, total_params

FAMILIES = ("tiny-bert", "tiny-t5", "tiny-gpt2", "tiny-llama")


def _full(bb, kind):
    return [sp for sp in instantiate(load_space("unified"), discover_sites(bb)) if sp.kind == kind]


@pytest.mark.parametrize("alias", FAMILIES)
@pytest.mark.parametrize("kind", KIND_METHODS)
def test_each_kind_alone_fills_the_budget_without_exceeding_it(tiny_backbone, alias, kind):
    bb = tiny_backbone(alias)
    full = _full(bb, kind)
    if not full:  # e.g. no cross-attention prefix on a decoder: the kind still has sites elsewhere
        pytest.fail(f"unified puts no {kind} on {alias}")
    one = total_params(kind_specs(kind, discover_sites(bb), 10**9))  # no limit: the largest it builds
    for budget in (one, one // 2, one // 5):
        specs = kind_specs(kind, discover_sites(bb), budget)
        if not specs:
            continue  # below the smallest module on one site
        n = total_params(specs)
        assert 0 < n <= budget and {sp.kind for sp in specs} == {kind}
        st = baseline_structure(kind, bb, budget)
        assert st.n_params == n  # the structure file counts what the builder counted
    small = kind_specs(kind, discover_sites(bb), one // 5)
    big = kind_specs(kind, discover_sites(bb), one)
    assert total_params(small) <= total_params(big)


def test_a_size_field_grows_on_every_site_and_units_stay_uniform(tiny_backbone):
    bb = tiny_backbone("tiny-bert")
    sites = discover_sites(bb)
    attn = [sp for sp in _full(bb, "prefix")]
    per_token = sum(KINDS["prefix"].unit_params(sp.site, {**sp.params, "n_prefix": 1}) for sp in attn)
    specs = kind_specs("prefix", sites, 3 * per_token + 1)
    assert {sp.params["n_prefix"] for sp in specs} == {3} and len(specs) == len(attn)
    pa = kind_specs("parallel_adapter", sites, 10**9)
    full = _full(bb, "parallel_adapter")
    assert [sp.units for sp in pa] == [sp.units for sp in full]  # capped at the space's full module
    half = kind_specs("parallel_adapter", sites, total_params(pa) // 2)
    assert len({sp.units for sp in half}) == 1 and len(half) == len(full)


def test_below_the_smallest_size_everywhere_the_top_layers_come_first_and_shared_tensors_count_once(tiny_backbone):
    bb = tiny_backbone("tiny-bert")
    sites = discover_sites(bb)
    every = kind_specs("compacter", sites, 10**9)
    shared = total_params(every) - sum(sp.n_params for sp in every)
    assert shared > 0  # the slow matrices, once
    budget = shared + 2 * every[0].n_params
    few = kind_specs("compacter", sites, budget)
    assert 1 <= len(few) < len(every) and total_params(few) <= budget
    assert min(sp.site.layer for sp in few) == max(sp.site.layer for sp in every)
    with pytest.raises(BudgetError, match="no prefix"):
        kind_specs("prefix", [s for s in sites if s.host != "attention"], 10**6)


def test_a_sized_dsee_module_keeps_both_parts(tiny_backbone):
    kind = KINDS["sparse_lora"]
    site = next(s for s in discover_sites(tiny_backbone("tiny-bert")) if s.host == "linear")
    params = kind.check_params({"rank": 4, "sparse_units": 4})
    full = kind.max_units(site, params)
    for units in range(1, full + 1):
        kept = kind.first_units(site, params, units)
        got = kind.derived_params(params, kept)
        assert sum(kept) == units and got["rank"] >= 1
        assert got["sparse_units"] == (min(units // 2, full - 4) if units < full else full - 4)


def test_the_sizes_table_covers_every_kind_within_its_budgets():
    from scripts import load_benchmark

    rows = load_benchmark("kind_sizes").sizes("tiny-bert", ["1%", "10%"])
    assert {r["kind"] for r in rows} == set(KIND_METHODS)
    for r in rows:
        assert 0 < r["params"] <= r["budget_params"] and 1 <= r["modules"] <= r["sites"]
