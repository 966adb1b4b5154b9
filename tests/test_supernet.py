"""The supernet: backbone outputs under closed / fresh / trained gates, parameters handed out by
structure, gradients, detaching, and deriving under a budget."""

from __future__ import annotations

import pytest
import torch

from s3pet.errors import BudgetError
from s3pet.models import TINY_ALIASES
from s3pet.space import SHIPPED_SPACES, instantiate, load_space, total_params
from s3pet.supernet import Supernet

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-6
FAMILY_SPACE = [(a, s) for a in TINY_ALIASES for s in SHIPPED_SPACES]


def build(tiny_backbone, tiny_sites, alias, space="s3pet-m", budget=None):
    model = tiny_backbone(alias)
    specs = instantiate(load_space(space), tiny_sites(alias))
    total = total_params(specs)  # the whole space, each shared tensor once
    net = Supernet(model, specs, budget=total if budget is None else budget(total))
    return model, net


def randomize_deltas(net, seed=0, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.delta_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.mark.parametrize("alias,space", FAMILY_SPACE, ids=[f"{a}-{s}" for a, s in FAMILY_SPACE])
def test_outputs_equal_backbone_when_closed_or_fresh(alias, space, tiny_backbone, tiny_sites, make_inputs,
                                                     backbone_output):
    plain = tiny_backbone(alias)
    inputs = make_inputs(plain)
    ref = backbone_output(plain, inputs)
    model, net = build(tiny_backbone, tiny_sites, alias, space)
    net.eval()
    # Fresh deltas, gates open (everything fits the budget, so every p is 1).
    p = net.expected_gates()
    assert torch.equal(p, torch.ones_like(p))
    # A fresh prefix is not the identity (its keys draw attention): its gates stay closed here.
    fresh = torch.ones(net.deltaset.n_units)
    for s in net.specs:
        if s.kind == "prefix":
            fresh[s.offset:s.offset + s.units] = 0
    net.deltaset.z = fresh
    assert torch.allclose(backbone_output(net, inputs), ref, atol=TOL)
    # Trained (random) deltas, gates closed.
    randomize_deltas(net)
    net.deltaset.z = torch.zeros(net.deltaset.n_units)
    assert torch.allclose(backbone_output(net, inputs), ref, atol=TOL)
    # Trained deltas, gates open: the output must move (otherwise this test could not fail).
    net.deltaset.z = torch.ones(net.deltaset.n_units)
    opened = backbone_output(net, inputs)
    assert (opened - ref).abs().max() > 1e-2
    # No gate vector at all means whole modules, i.e. gate 1.
    net.deltaset.z = None
    assert torch.allclose(backbone_output(net, inputs), opened, atol=TOL)


@pytest.mark.parametrize("alias", TINY_ALIASES)
def test_one_open_unit_changes_outputs_in_proportion(alias, tiny_backbone, tiny_sites, make_inputs,
                                                     backbone_output):
    """A single open BitFit unit on the last norm feeds the output linearly: out(g) = out(0) + g * delta."""
    model, net = build(tiny_backbone, tiny_sites, alias, "s3pet-m")
    randomize_deltas(net, seed=1)
    inputs = make_inputs(model)
    last = max((s for s in net.specs if s.site.host == "norm" and s.kind == "bitfit"),
               key=lambda s: (s.site.stack == "decoder", s.site.layer, s.offset))
    # The last norm before the output (BERT: the FFN norm of the last block; others: the final norm).
    outs = {}
    for g in (0.0, 0.5, 1.0):
        z = torch.zeros(net.deltaset.n_units)
        z[last.offset] = g
        net.deltaset.z = z
        outs[g] = backbone_output(net, inputs)
    d1 = outs[1.0] - outs[0.0]
    assert d1.abs().max() > 1e-2
    assert torch.allclose(outs[0.5] - outs[0.0], 0.5 * d1, atol=1e-5)


@pytest.mark.parametrize("alias", TINY_ALIASES)
def test_parameters_by_structure(alias, tiny_backbone, tiny_sites):
    model, net = build(tiny_backbone, tiny_sites, alias, "unified", budget=lambda t: t // 4)
    arch = net.arch_parameters()
    assert len(arch) == 1 and arch[0] is net.alpha
    units = sum(s.units for s in net.specs)
    assert net.alpha.shape == (units,) and torch.all(net.alpha == 0)
    for s in net.specs:  # one logit per unit, with that unit's exact size
        assert torch.all(net.n[s.offset:s.offset + s.units] == s.unit_params)
    assert int(net.n.sum()) == sum(s.n_params for s in net.specs)

    deltas = net.delta_parameters()
    ids = {id(p) for p in deltas}
    assert ids == {id(p) for p in net.deltaset.parameters()} and len(ids) == len(deltas)
    # What the budget counts is what the modules keep (shared tensors once); the prefix's MLP trains
    # beside it (decision 39).
    assert net.deltaset.kept_params() == total_params(net.specs) < sum(p.numel() for p in deltas)
    backbone = {id(p) for p in model.parameters()}
    assert not ids & backbone and id(net.alpha) not in ids | backbone
    assert all(not p.requires_grad for p in model.parameters())
    assert all(p.requires_grad for p in deltas) and net.alpha.requires_grad
    # Together they are every parameter the supernet has.
    assert {id(p) for p in net.parameters()} == ids | backbone | {id(net.alpha)}


@pytest.mark.parametrize("alias", TINY_ALIASES)
def test_gradients_reach_alpha_and_deltas_not_backbone(alias, tiny_backbone, tiny_sites, make_inputs,
                                                       backbone_output):
    model, net = build(tiny_backbone, tiny_sites, alias, "s3pet-m", budget=lambda t: t // 3)
    randomize_deltas(net, seed=2, std=0.1)
    net.train()
    p = net.sample_gates(torch.Generator().manual_seed(0))
    assert torch.all((p > 0) & (p < 1))  # a binding budget: gates are not saturated
    loss = backbone_output(net, make_inputs(model), grad=True).pow(2).mean()
    loss.backward()
    assert net.alpha.grad is not None and torch.isfinite(net.alpha.grad).all()
    assert torch.all(net.alpha.grad != 0)
    for name, q in net.deltaset.named_parameters():
        assert q.grad is not None and q.grad.abs().max() > 0, name
    assert all(q.grad is None for q in model.parameters())


@pytest.mark.parametrize("alias", TINY_ALIASES)
def test_detach_restores_the_backbone(alias, tiny_backbone, tiny_sites, make_inputs, backbone_output):
    model, net = build(tiny_backbone, tiny_sites, alias, "unified")
    inputs = make_inputs(model)
    randomize_deltas(net, seed=3)
    net.deltaset.z = torch.ones(net.deltaset.n_units)
    with_deltas = backbone_output(net, inputs)
    net.deltaset.detach()
    ref = backbone_output(tiny_backbone(alias), inputs)
    assert torch.allclose(backbone_output(model, inputs), ref, atol=TOL)
    assert (with_deltas - ref).abs().max() > 1e-2
    net.deltaset.attach(model)
    assert torch.allclose(backbone_output(net, inputs), with_deltas, atol=TOL)


def test_derive_respects_the_budget_and_merges_units(tiny_backbone, tiny_sites):
    model, net = build(tiny_backbone, tiny_sites, "tiny-t5", "unified", budget=lambda t: t // 10)
    with torch.no_grad():
        net.alpha.copy_(torch.randn(net.alpha.shape, generator=torch.Generator().manual_seed(0)))
    kept = net.derive_specs()
    assert kept
    assert sum(s.n_params for s, _ in kept) <= net.budget
    full = {s.key: s for s in net.specs}
    assert len({s.key for s, _ in kept}) == len(kept)
    for spec, score in kept:
        src = full[spec.key]
        assert 1 <= spec.units <= src.units and spec.site == src.site and set(spec.params) == set(src.params)
        assert spec.n_params == spec.units * src.unit_params  # a derived module's units cost what they did
        assert 0.0 <= score <= 1.0
    assert any(s.units > 1 for s, _ in kept)  # a multi-rank LoRA component set was merged
    # A larger budget keeps at least as many parameters.
    bigger = net.derive_specs(budget=net.budget * 2)
    assert sum(s.n_params for s, _ in bigger) >= sum(s.n_params for s, _ in kept)


def test_candidate_rows_one_per_unit(tiny_backbone, tiny_sites):
    _, net = build(tiny_backbone, tiny_sites, "tiny-gpt2", "unified", budget=lambda t: t // 5)
    rows = net.candidate_rows()
    assert [r["index"] for r in rows] == list(range(net.alpha.numel()))
    assert sum(r["n"] for r in rows) == sum(s.n_params for s in net.specs)
    p = net.gate_probs().detach()
    assert [r["p"] for r in rows] == pytest.approx(p.tolist(), abs=1e-6)


def test_budget_below_every_candidate_is_infeasible(tiny_backbone, tiny_sites):
    with pytest.raises(BudgetError):
        build(tiny_backbone, tiny_sites, "tiny-bert", "s3pet-m", budget=lambda t: 1)


def test_each_module_reads_its_own_units_of_z_and_a_new_z_replaces_them(tiny_backbone, tiny_sites, make_inputs,
                                                                         backbone_output):
    model, net = build(tiny_backbone, tiny_sites, "tiny-bert", "s3pet-m", budget=lambda t: t // 3)
    randomize_deltas(net, seed=2, std=0.1)
    ds = net.deltaset
    z = torch.rand(net.alpha.numel(), generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    ds.z = z
    for spec in ds.specs:
        assert torch.equal(ds._gate(spec), z[spec.offset:spec.offset + spec.units])
    backbone_output(net, make_inputs(model), grad=True).pow(2).mean().backward()
    # the same gradient as gates cut from z one slice per module
    ref = z.detach().clone().requires_grad_(True)
    parts = {s.key: ref[s.offset:s.offset + s.units] for s in ds.specs}
    old = ds._gate
    ds._gate = lambda spec: parts[spec.key]
    try:
        ds.z = ref
        backbone_output(net, make_inputs(model), grad=True).pow(2).mean().backward()
    finally:
        ds._gate = old
    assert torch.allclose(z.grad, ref.grad, rtol=1e-5, atol=1e-7) and z.grad.abs().max() > 0
    z2 = torch.zeros_like(z)
    ds.z = z2
    assert all(torch.equal(ds._gate(s), z2[s.offset:s.offset + s.units]) for s in ds.specs)
