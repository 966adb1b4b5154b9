"""Module kinds: exact parameter counts, init as a no-op, gate semantics and the math of each kind.

A table of cases over every kind and every tiny model family. Hooks are exercised by calling
the host module itself (a module call runs its forward hooks), on random inputs.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn import functional as F

from s3pet.deltas import KINDS, Delta
from s3pet.errors import ConfigError
from s3pet.inject import DeltaSet
from s3pet.models import TINY_ALIASES
from s3pet.space import ModuleSpec, instantiate, is_linear, linear_dims, load_space

pytestmark = pytest.mark.usefixtures("one_thread")

KIND_NAMES = ("lora", "adapter", "lowrank_adapter", "bitfit", "lnfit", "ia3", "parallel_adapter", "adapterbias")
HOSTS = {"lora": {"linear"}, "ia3": {"linear"}, "bitfit": {"linear", "norm"}, "lnfit": {"norm"},
         "adapter": {"block"}, "lowrank_adapter": {"block"}, "parallel_adapter": {"block"}, "adapterbias": {"block"}}
# Hyper-parameters of the full-size module, and how many units a derived module keeps.
FULL = {"lora": {"rank": 8, "alpha": 16}, "adapter": {"bottleneck": 6}, "lowrank_adapter": {},
        "bitfit": {}, "lnfit": {}, "ia3": {}, "parallel_adapter": {"bottleneck": 5}, "adapterbias": {}}
DERIVED = {"lora": 3, "adapter": 2, "parallel_adapter": 3}
MULTI_UNIT = tuple(DERIVED)
CASES = [(k, a) for k in KIND_NAMES for a in TINY_ALIASES]
IDS = [f"{k}-{a}" for k, a in CASES]


def n_built(module) -> int:
    return sum(p.numel() for p in module.parameters())


def unit_formula(kind: str, site, params: dict) -> int:
    """Per-unit parameter count as the design states it, written out independently."""
    d_in, d_out = site.d_in, site.d_out
    if kind == "lora":  # one row of A (d_in) and one column of B (d_out)
        return d_in + d_out
    if kind in ("adapter", "parallel_adapter"):  # a row of down, its bias, a column of up (no up bias)
        return 2 * d_out + 1
    if kind == "adapterbias":  # the shift vector v and the scalar map alpha
        return 2 * d_out
    if kind == "lowrank_adapter":  # rank-1 down (d + m) and up (m + d), biases m and d
        m = max(1, d_out // int(params.get("reduction", 32)))
        return 3 * (d_out + m)
    return d_out  # bitfit, lnfit, ia3: one vector of the host's output size


def kind_specs(kind, sites, params=None):
    params = FULL[kind] if params is None else params
    return instantiate(load_space({"entries": [{"kind": kind, "roles": ["*"], **params}]}), sites)


def host_input(host, site, seed=0, batch=2, seq=5):
    d = linear_dims(host)[0] if is_linear(host) else site.d_in
    return torch.randn(batch, seq, d, generator=torch.Generator().manual_seed(seed))


class WithSource:
    """A host whose modules read the sublayer's input: calling it runs the sublayer's first
    projection on ``xs`` first (as the block's forward does), then the host."""

    def __init__(self, host, source, xs):
        self.host, self.source, self.xs = host, source, xs

    def __call__(self, x):
        self.source(self.xs)
        return self.host(x)


def randomize(module, seed=0, std=0.5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def close(a, b, tol=1e-5):
    return torch.allclose(a, b, atol=tol, rtol=tol)


# --------------------------------------------------------------------------- registry

def test_registry_holds_every_kind_with_its_hosts():
    assert set(KIND_NAMES) <= set(KINDS)
    for name in KIND_NAMES:
        assert KINDS[name].name == name
        assert set(KINDS[name].hosts) == HOSTS[name]


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_check_params_fills_defaults_and_rejects_unknown(kind):
    k = KINDS[kind]
    assert k.check_params({}) == k.defaults
    with pytest.raises(ConfigError, match="no_such_field"):
        k.check_params({"no_such_field": 1})


# --------------------------------------------------------------------------- exact parameter counts

@pytest.mark.parametrize("kind,alias", CASES, ids=IDS)
def test_n_params_equals_built_parameters(kind, alias, tiny_sites):
    specs = kind_specs(kind, tiny_sites(alias))
    assert {s.site.host for s in specs} == HOSTS[kind]  # every family has linear, norm and block sites
    impl = KINDS[kind]
    for spec in specs:
        full = impl.build(spec.site, spec.params, spec.units)
        assert isinstance(full, Delta)
        assert n_built(full) == spec.n_params
        assert spec.unit_params == unit_formula(kind, spec.site, spec.params)
        assert spec.n_params == spec.units * spec.unit_params
        if kind in MULTI_UNIT:
            assert spec.units == FULL[kind].get("rank", FULL[kind].get("bottleneck"))
            r = DERIVED[kind]
            small = ModuleSpec(spec.site, kind, dict(spec.params), r)
            built = impl.build(spec.site, spec.params, r)
            assert built.units == r
            assert n_built(built) == small.n_params == r * spec.unit_params
        else:
            assert spec.units == 1


@pytest.mark.parametrize("alias", TINY_ALIASES)
def test_adapter_units_follow_the_reduction(alias, tiny_sites):
    for reduction in (4, 16, 1000):
        for spec in kind_specs("adapter", tiny_sites(alias), {"reduction": reduction}):
            assert spec.units == max(1, spec.site.d_out // reduction)
            assert n_built(KINDS["adapter"].build(spec.site, spec.params, spec.units)) == spec.n_params


def test_lowrank_adapter_is_one_unit_and_scales_with_reduction(tiny_sites):
    site = kind_specs("lowrank_adapter", tiny_sites("tiny-bert"))[0].site
    for reduction in (2, 8, 32):
        params = KINDS["lowrank_adapter"].check_params({"reduction": reduction})
        spec = ModuleSpec(site, "lowrank_adapter", params, 1)
        assert spec.n_params == 3 * (site.d_out + site.d_out // reduction)
        assert n_built(KINDS["lowrank_adapter"].build(site, params, 1)) == spec.n_params


# --------------------------------------------------------------------------- gates, through the hooks

@pytest.fixture
def attached(tiny_backbone, tiny_sites):
    """``attached(alias, kind, params=None) -> (backbone, DeltaSet, [(spec, host, x, base)])``."""
    made = []

    def make(alias, kind, params=None):
        model = tiny_backbone(alias)
        specs = kind_specs(kind, tiny_sites(alias), params)
        rows = []
        for i, spec in enumerate(specs):
            host = model.get_submodule(spec.site.path)
            x = host_input(host, spec.site, seed=i)
            if KINDS[kind].reads == "sublayer":
                source = model.get_submodule(spec.site.source)
                host = WithSource(host, source, host_input(source, spec.site, seed=100 + i))
            with torch.no_grad():
                rows.append((spec, host, x, host(x)))
        ds = DeltaSet(specs, gated=True).attach(model)
        made.append(ds)
        return model, ds, rows

    yield make
    for ds in made:
        ds.detach()


def host_out(ds, host, x, z):
    ds.z = z
    with torch.no_grad():
        return host(x)


@pytest.mark.parametrize("kind,alias", CASES, ids=IDS)
def test_fresh_module_is_a_no_op(kind, alias, attached):
    _, ds, rows = attached(alias, kind)
    ones = torch.ones(ds.n_units)
    for spec, host, x, base in rows:
        assert torch.equal(host_out(ds, host, x, None), base), spec.site.path
        assert torch.allclose(host_out(ds, host, x, ones), base, atol=1e-6), spec.site.path


@pytest.mark.parametrize("kind,alias", CASES, ids=IDS)
def test_gates_close_scale_and_add_up(kind, alias, attached):
    _, ds, rows = attached(alias, kind)
    randomize(ds, seed=1)
    n = ds.n_units
    for spec, host, x, base in rows:
        closed = host_out(ds, host, x, torch.zeros(n))
        assert torch.allclose(closed, base, atol=1e-6), spec.site.path
        full = host_out(ds, host, x, torch.ones(n)) - base
        assert full.abs().max() > 1e-3, spec.site.path  # the module really acts
        assert close(host_out(ds, host, x, None) - base, full)  # no gate = gate 1
        for g in (0.3, 2.0):
            part = host_out(ds, host, x, torch.full((n,), g)) - base
            assert torch.allclose(part, g * full, atol=1e-4, rtol=1e-4), (spec.site.path, g)
        if spec.units > 1:  # every unit is a separable part of the module
            total = torch.zeros_like(full)
            for u in range(spec.units):
                z = torch.zeros(n)
                z[spec.offset + u] = 1.0
                total += host_out(ds, host, x, z) - base
            assert torch.allclose(total, full, atol=1e-4, rtol=1e-4), spec.site.path


@pytest.mark.parametrize("kind,alias", CASES, ids=IDS)
def test_detach_restores_and_attach_is_idempotent(kind, alias, attached):
    model, ds, rows = attached(alias, kind)
    randomize(ds, seed=2)
    ones = torch.ones(ds.n_units)
    once = [host_out(ds, host, x, ones) for _, host, x, _ in rows]
    ds.attach(model)  # again: must not stack a second hook
    for (spec, host, x, _), o in zip(rows, once):
        assert torch.equal(host_out(ds, host, x, ones), o), spec.site.path
    ds.detach()
    for spec, host, x, base in rows:
        assert torch.equal(host_out(ds, host, x, ones), base), spec.site.path


# --------------------------------------------------------------------------- the math of each kind

def one(alias, kind, role, attached, params=None, seed=3):
    model, ds, rows = attached(alias, kind, params)
    randomize(ds, seed=seed)
    spec, host, x, base = next(r for r in rows if r[0].site.role == role)
    return ds, spec, host, x, base


@pytest.mark.parametrize("alias,role", [("tiny-bert", "attn.q"), ("tiny-gpt2", "attn.qkv"),
                                        ("tiny-t5", "xattn.v"), ("tiny-llama", "ffn.gate")])
def test_lora_is_scaled_low_rank_product(alias, role, attached):
    ds, spec, host, x, base = one(alias, "lora", role, attached)
    d = ds.delta(spec)
    z = torch.rand(ds.n_units, generator=torch.Generator().manual_seed(0))
    g = z[spec.offset:spec.offset + spec.units]
    scaling = FULL["lora"]["alpha"] / FULL["lora"]["rank"]
    expected = base + ((x @ d.lora_A.T) * g * scaling) @ d.lora_B.T
    assert close(host_out(ds, host, x, z), expected, 1e-4)


@pytest.mark.parametrize("alias,role", [("tiny-bert", "ffn.block"), ("tiny-llama", "attn.block")])
def test_adapter_is_a_gated_bottleneck_after_the_output(alias, role, attached):
    ds, spec, host, x, base = one(alias, "adapter", role, attached)
    d = ds.delta(spec)
    z = torch.rand(ds.n_units, generator=torch.Generator().manual_seed(0))
    g = z[spec.offset:spec.offset + spec.units]
    expected = base + (torch.relu(base @ d.down.weight.T + d.down.bias) * g) @ d.up_weight.T
    assert close(host_out(ds, host, x, z), expected, 1e-4)


@pytest.mark.parametrize("alias,role", [("tiny-t5", "xattn.block"), ("tiny-gpt2", "ffn.block")])
def test_lowrank_adapter_is_rank_one_factorised(alias, role, attached):
    ds, spec, host, x, base = one(alias, "lowrank_adapter", role, attached)
    d = ds.delta(spec)
    z = torch.full((ds.n_units,), 0.7)
    h = F.gelu((base @ d.down_a) @ d.down_b + d.down_bias)
    expected = base + 0.7 * ((h @ d.up_a) @ d.up_b + d.up_bias)
    assert close(host_out(ds, host, x, z), expected, 1e-4)


@pytest.mark.parametrize("alias,role", [("tiny-bert", "attn.o"), ("tiny-llama", "attn.k"),
                                        ("tiny-t5", "ffn.in"), ("tiny-gpt2", "norm.final")])
def test_bitfit_adds_a_bias(alias, role, attached):
    ds, spec, host, x, base = one(alias, "bitfit", role, attached)
    b = ds.delta(spec).bias
    z = torch.full((ds.n_units,), 0.5)
    assert close(host_out(ds, host, x, z), base + 0.5 * b)
    if getattr(host, "bias", None) is not None:  # same as training the existing bias
        moved = copy.deepcopy(host)
        moved._forward_hooks.clear()
        with torch.no_grad():
            moved.bias += b
            assert close(moved(x), host_out(ds, host, x, None))


@pytest.mark.parametrize("alias,role", [("tiny-bert", "attn.v"), ("tiny-llama", "ffn.in"),
                                        ("tiny-gpt2", "attn.qkv")])
def test_ia3_rescales_the_output(alias, role, attached):
    ds, spec, host, x, base = one(alias, "ia3", role, attached)
    s = ds.delta(spec).scale
    z = torch.full((ds.n_units,), 0.25)
    assert close(host_out(ds, host, x, z), base * (1 + 0.25 * s))


@pytest.mark.parametrize("alias,role", [("tiny-bert", "norm.emb"), ("tiny-gpt2", "norm.attn"),
                                        ("tiny-t5", "norm.xattn"), ("tiny-llama", "norm.final")])
def test_lnfit_equals_the_norm_with_a_shifted_scale(alias, role, attached):
    ds, spec, host, x, base = one(alias, "lnfit", role, attached)
    dw = ds.delta(spec).weight
    moved = copy.deepcopy(host)
    moved._forward_hooks.clear()
    with torch.no_grad():
        moved.weight += 0.6 * dw
        expected = moved(x)
    assert not close(expected, base)
    assert close(host_out(ds, host, x, torch.full((ds.n_units,), 0.6)), expected)


def test_kinds_at_one_host_apply_in_stage_order(tiny_backbone, tiny_sites):
    """Scale (ia3), then parallel (lora, bitfit), then sequential (adapter), whatever the list order."""
    model = tiny_backbone("tiny-llama")
    sites = tiny_sites("tiny-llama")
    out = next(s for s in sites if s.role == "ffn.out" and s.layer == 0)
    blk = next(s for s in sites if s.role == "ffn.block" and s.layer == 0)
    specs = [ModuleSpec(blk, "adapter", KINDS["adapter"].check_params({"bottleneck": 3}), 3)]
    specs += [ModuleSpec(out, k, KINDS[k].check_params({"rank": 2} if k == "lora" else {}), 2 if k == "lora" else 1)
              for k in ("bitfit", "lora", "ia3")]
    host = model.get_submodule(out.path)
    x = host_input(host, out)
    with torch.no_grad():
        y = host(x)
    ds = DeltaSet(specs, gated=False).attach(model)
    randomize(ds, seed=4)
    ad, bf, lo, ia = (ds.delta(s) for s in specs)
    with torch.no_grad():
        y1 = y * (1 + ia.scale)
        y2 = y1 + lo.scaling * (x @ lo.lora_A.T) @ lo.lora_B.T + bf.bias
        y3 = y2 + torch.relu(y2 @ ad.down.weight.T + ad.down.bias) @ ad.up_weight.T
        got = host(x)
    ds.detach()
    assert close(got, y3, 1e-4)


def test_deltaset_assigns_contiguous_gate_slices(tiny_sites):
    specs = instantiate(load_space("unified"), tiny_sites("tiny-t5"))
    ds = DeltaSet(specs, gated=True)
    offsets = [s.offset for s in ds.specs]
    assert offsets[0] == 0
    assert all(b.offset == a.offset + a.units for a, b in zip(ds.specs, ds.specs[1:]))
    assert ds.n_units == sum(s.units for s in specs)
    # The counted parameters are what the modules keep; the prefix's MLP trains beside them until baked.
    assert ds.kept_params() == sum(s.n_params for s in specs) < n_built(ds)
    assert n_built(ds.bake()) == sum(s.n_params for s in specs)
    assert all(ds.delta(s) is ds.delta(s.key) for s in specs)


# --------------------------------------------------------------------------- parallel adapter, AdapterBias

@pytest.mark.parametrize("alias,role", [("tiny-bert", "ffn.block"), ("tiny-t5", "xattn.block"),
                                        ("tiny-gpt2", "attn.block"), ("tiny-llama", "ffn.block")])
def test_parallel_adapter_reads_the_sublayer_input(alias, role, attached):
    ds, spec, host, x, base = one(alias, "parallel_adapter", role, attached)
    d = ds.delta(spec)
    z = torch.rand(ds.n_units, generator=torch.Generator().manual_seed(0))
    g = z[spec.offset:spec.offset + spec.units]
    xs = host.xs  # the input of the sublayer's first projection, not the host's
    assert xs.shape[-1] == spec.site.d_out
    expected = base + 4.0 * (torch.relu(xs @ d.down.weight.T + d.down.bias) * g) @ d.up_weight.T
    assert close(host_out(ds, host, x, z), expected, 1e-4)


@pytest.mark.parametrize("alias", TINY_ALIASES)
def test_parallel_adapter_source_is_the_sublayer_first_projection(alias, tiny_sites):
    sites = tiny_sites(alias)
    specs = kind_specs("parallel_adapter", sites)
    assert {s.site.role.split(".")[0] for s in specs} >= {"attn", "ffn"}
    by_path = {(s.path, s.role): s for s in sites}
    for spec in specs:
        sub = spec.site.role.split(".")[0]
        src = next(s for (p, r), s in by_path.items() if p == spec.site.source and s.host == "linear")
        assert src.role in (f"{sub}.q", f"{sub}.qkv", "ffn.in", "ffn.gate") and src.role.startswith(sub)
        assert src.layer == spec.site.layer and src.stack == spec.site.stack and src.d_in == spec.site.d_out


def test_parallel_adapter_follows_the_forward_of_the_whole_model(tiny_backbone, tiny_sites):
    """Through the model's own forward (no hand-run source): a fresh module changes nothing, a
    trained one changes the output, and no sublayer input outlives the forward."""
    model = tiny_backbone("tiny-llama")
    specs = kind_specs("parallel_adapter", tiny_sites("tiny-llama"))
    ids = torch.randint(1, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(input_ids=ids).last_hidden_state
        ds = DeltaSet(specs, gated=False).attach(model)
        assert torch.equal(model(input_ids=ids).last_hidden_state, base)
        randomize(ds, seed=5)
        moved = model(input_ids=ids).last_hidden_state
    assert not ds._seen
    ds.detach()
    assert (moved - base).abs().max() > 1e-3


def test_parallel_adapter_needs_a_source(tiny_sites):
    from dataclasses import replace

    site = kind_specs("parallel_adapter", tiny_sites("tiny-bert"))[0].site
    assert KINDS["parallel_adapter"].fits(site)
    assert not KINDS["parallel_adapter"].fits(replace(site, source=""))
    assert KINDS["adapter"].fits(replace(site, source=""))


@pytest.mark.parametrize("alias,role", [("tiny-bert", "attn.block"), ("tiny-t5", "ffn.block"),
                                        ("tiny-gpt2", "ffn.block"), ("tiny-llama", "attn.block")])
def test_adapterbias_is_a_token_dependent_shift(alias, role, attached):
    ds, spec, host, x, base = one(alias, "adapterbias", role, attached)
    d = ds.delta(spec)
    z = torch.full((ds.n_units,), 0.4)
    alpha = base @ d.alpha  # one scalar per token
    assert alpha.shape == base.shape[:-1]
    assert close(host_out(ds, host, x, z), base + 0.4 * alpha[..., None] * d.v, 1e-4)


def test_new_kinds_check_their_params():
    assert KINDS["parallel_adapter"].check_params({})["scaling"] == 4.0
    for bad in ({"scaling": 0}, {"scaling": float("nan")}, {"bottleneck": 0}, {"activation": "swish"}):
        with pytest.raises(ConfigError):
            KINDS["parallel_adapter"].check_params(bad)
    with pytest.raises(ConfigError, match="rank"):
        KINDS["adapterbias"].check_params({"rank": 2})
