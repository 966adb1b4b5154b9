"""The kronecker and sparse_lora kinds and the adapter's large-sparse option: their math, their
supports, derivation, merge and peft export (LoKr for kronecker, LoRA for a sparse_lora without
chunks). The counts, identity and gate tests of the family table are in test_deltas.py."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from torch import nn

from s3pet import export as E
from s3pet.deltas import KINDS
from s3pet.deltas.adapter import SparseAdapter, kept_per_unit, prune_on_batch
from s3pet.errors import ConfigError, StructureError
from s3pet.export.adapter import plan_specs
from s3pet.inject import DeltaSet
from s3pet.models import load_backbone
from s3pet.space import ModuleSpec, discover_sites, instantiate, load_space
from s3pet.structure import from_dict, from_specs, to_specs
from s3pet.supernet import kept_specs
from test_deltas import attached, close, host_out, one  # noqa: F401  (attached is a fixture)
from test_export import batch_for, s3pet_out
from test_export import run as out_of

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = ("tiny-bert", "tiny-t5", "tiny-gpt2", "tiny-llama")
KRON = {"kind": "kronecker", "roles": ["attn.*", "xattn.*", "ffn.*"], "factor": 4, "rank": 2, "alpha": 4.0}
SPARSE = {"kind": "sparse_lora", "roles": ["attn.q", "attn.qkv", "attn.v", "xattn.v", "ffn.out"], "rank": 2,
          "sparse_units": 3, "alpha": 4.0}


def structure_of(name, entries, seed=1):
    """(backbone, structure with every candidate of ``entries``, random weights). Only the
    floating tensors are drawn: a sparse support (an index buffer) is what its module chose."""
    bb = load_backbone(name)
    specs = instantiate(load_space({"name": "t", "entries": entries}), discover_sites(bb))
    st = from_specs([(s, 1.0) for s in specs], bb, "t", {"params": sum(s.n_params for s in specs), "fraction": 0.01})
    ds = DeltaSet(to_specs(st, bb)).attach(bb)  # attaching chooses the supports
    ds.detach()
    g = torch.Generator().manual_seed(seed)
    w = {k: (0.3 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone())
         for k, v in ds.state_dict().items()}
    return bb, st, w


def assert_close_to(model, ref, bb):
    got = out_of(model, batch_for(bb))
    assert (got - ref).abs().max() <= 1e-4 * (1 + ref.abs().max())


# --------------------------------------------------------------------------- kronecker

@pytest.mark.parametrize("alias,role", [("tiny-bert", "attn.q"), ("tiny-gpt2", "attn.qkv"),
                                        ("tiny-t5", "xattn.v"), ("tiny-llama", "ffn.gate")])
def test_kronecker_is_a_scaled_kronecker_product(alias, role, attached):
    from peft.tuners.lokr.layer import make_kron

    ds, spec, host, x, base = one(alias, "kronecker", role, attached, params={"factor": 4, "rank": 2, "alpha": 4.0})
    d = ds.delta(spec)
    assert d.lokr_w1.shape[0] * d.lokr_w2_a.shape[0] == spec.site.d_out
    assert d.lokr_w1.shape[1] * d.lokr_w2_b.shape[1] == spec.site.d_in
    dw = make_kron(d.lokr_w1, d.lokr_w2_a @ d.lokr_w2_b, 4.0 / 2)  # peft's own product
    for g in (0.3, 1.0):
        assert close(host_out(ds, host, x, torch.full((ds.n_units,), g)), base + g * x @ dw.T, 1e-4)


def test_kronecker_is_one_unit_and_checks_its_params(tiny_sites):
    site = next(s for s in tiny_sites("tiny-bert") if s.role == "attn.q")
    k = KINDS["kronecker"]
    assert k.max_units(site, k.check_params({"rank": 4})) == 1
    small, big = (k.unit_params(site, k.check_params({"rank": r})) for r in (1, 3))
    a, b = k.check_params({"factor": 4}), k.check_params({"factor": 8})
    assert big > small and k.unit_params(site, a) != k.unit_params(site, b)
    for bad in ({"factor": 0}, {"rank": 0}, {"alpha": -1.0}, {"bottleneck": 2}):
        with pytest.raises(ConfigError):
            k.check_params(bad)


@pytest.mark.parametrize("name", FAMILIES)
def test_kronecker_merges_exactly(name):
    bb, st, w = structure_of(name, [KRON])
    ref = s3pet_out(name, st, w)
    assert (ref - out_of(load_backbone(name), batch_for(bb))).abs().max() > 1e-2
    assert_close_to(E.merge(st, bb, w), ref, bb)


@pytest.mark.parametrize("name,rank", [("tiny-bert", 2), ("tiny-t5", 2), ("tiny-llama", 2), ("tiny-bert", 16)])
def test_kronecker_exports_to_peft_lokr(name, rank, tmp_path):
    # rank 16 reaches peft's threshold max(b, d) / 2, where LoKr keeps W2 whole (lokr_w2).
    entries = [{**KRON, "rank": rank}, {"kind": "lnfit", "roles": ["norm.*"]}]
    bb, st, w = structure_of(name, entries)
    ref = s3pet_out(name, st, w)
    out = E.export_peft(st, bb, tmp_path / "a", w)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LOKR" and cfg["decompose_factor"] == 4 and not cfg["decompose_both"]
    pm = peft.PeftModel.from_pretrained(load_backbone(name), str(out))
    kron = [m for m in st.modules if m["kind"] == "kronecker"]
    for m in kron:
        layer = pm.base_model.model.get_submodule(m["site"])
        assert layer.scaling["default"] == pytest.approx(4.0 / rank)
        assert ("default" in layer.lokr_w2) == (rank == 16)
    assert {n for n, mod in pm.base_model.model.named_modules() if hasattr(mod, "lokr_w1")} == {m["site"] for m in kron}
    assert_close_to(pm, ref, bb)


def test_kronecker_peft_refusals(tmp_path):
    bb, st, w = structure_of("tiny-gpt2", [KRON])
    with pytest.raises(StructureError, match=r"kronecker on a Conv1D .peft's LoKr wraps nn.Linear only.*--merge"):
        E.export_peft(st, bb, tmp_path / "a", w)
    bb, st, w = structure_of("tiny-bert", [{**KRON, "roles": ["attn.q"]}, {"kind": "lora", "roles": ["attn.v"]}])
    with pytest.raises(StructureError, match=r"kronecker together with lora on linears .a peft adapter is one method"):
        E.export_peft(st, bb, tmp_path / "a", w)
    bb, st, w = structure_of("tiny-bert", [{**KRON, "roles": ["attn.q"]}, {**KRON, "roles": ["attn.v"], "factor": 2}])
    with pytest.raises(StructureError, match=r"different decompose_factor"):
        E.export_peft(st, bb, tmp_path / "a", w)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- sparse_lora

@pytest.mark.parametrize("alias,role", [("tiny-bert", "attn.q"), ("tiny-gpt2", "attn.qkv"),
                                        ("tiny-t5", "ffn.out"), ("tiny-llama", "attn.v")])
def test_sparse_lora_support_is_the_largest_pretrained_weights(alias, role, attached):
    model, ds, rows = attached(alias, "sparse_lora", {"rank": 2, "sparse_units": 3})
    spec, host, x, base = next(r for r in rows if r[0].site.role == role)
    d = ds.delta(spec)
    w = host.weight if isinstance(host, nn.Linear) else host.weight.T  # (d_out, d_in) for Conv1D too
    c = spec.site.d_in + spec.site.d_out
    mag = w.detach().abs().flatten()
    chunk_mag = [mag[d.support[j]] for j in range(3)]
    assert d.support.shape == (3, c) and len(set(d.support.flatten().tolist())) == 3 * c  # distinct positions
    assert chunk_mag[0].min() >= chunk_mag[1].max() and chunk_mag[1].min() >= chunk_mag[2].max()  # chunk 1 largest
    assert chunk_mag[2].min() >= torch.sort(mag, descending=True).values[3 * c]  # nothing larger left out
    # Gate-by-gate: low-rank components first, then chunks; S x uses exactly the support.
    with torch.no_grad():
        d.sparse.normal_(generator=torch.Generator().manual_seed(0))
        d.lora_B.normal_(generator=torch.Generator().manual_seed(1))
    z = torch.zeros(ds.n_units)
    z[spec.offset + 2 + 1] = 0.5  # chunk 2 only
    s = torch.zeros(w.numel())
    s[d.support[1]] = d.sparse[1].detach()
    assert close(host_out(ds, host, x, z), base + 0.5 * x @ s.view_as(w).T, 1e-4)
    z = torch.zeros(ds.n_units)
    z[spec.offset] = 1.0  # the first rank-1 component only
    lo = d.scaling * (x @ d.lora_A[:1].T) @ d.lora_B[:, :1].T
    assert close(host_out(ds, host, x, z), base + lo, 1e-4)


def test_sparse_lora_keeps_a_loaded_support_and_refuses_too_many_chunks(tiny_backbone, tiny_sites):
    sites = tiny_sites("tiny-bert")
    specs = instantiate(load_space({"entries": [{**SPARSE, "roles": ["attn.q"]}]}), sites)
    model = tiny_backbone("tiny-bert")
    ds = DeltaSet(specs)
    state = {k: (torch.arange(v.numel()).view_as(v) if not v.is_floating_point() else v) for k, v in ds.state_dict().items()}
    ds.load_state_dict(state)
    ds.attach(model)  # attached after loading: the loaded support stays
    assert torch.equal(ds.delta(specs[0]).support.flatten(), torch.arange(ds.delta(specs[0]).support.numel()))
    ds.detach()
    site = specs[0].site
    too_many = site.d_in * site.d_out // (site.d_in + site.d_out) + 1
    params = KINDS["sparse_lora"].check_params({"rank": 0, "sparse_units": too_many})
    with pytest.raises(ConfigError, match="exceed"):
        KINDS["sparse_lora"].build(site, params, too_many)


def test_sparse_lora_params_allow_one_empty_part():
    k = KINDS["sparse_lora"]
    assert k.check_params({"rank": 0, "sparse_units": 2})["rank"] == 0
    assert k.check_params({"rank": 4, "sparse_units": 0})["sparse_units"] == 0
    for bad in ({"rank": 0, "sparse_units": 0}, {"rank": -1}, {"sparse_units": 1.5}, {"sparse_units": True}):
        with pytest.raises(ConfigError):
            k.check_params(bad)


def test_sparse_lora_derivation_records_which_units_were_kept(tiny_sites):
    specs = instantiate(load_space({"entries": [{**SPARSE, "roles": ["attn.q"]}]}), tiny_sites("tiny-llama"))
    DeltaSet(specs)  # assigns offsets
    n = sum(s.units for s in specs)
    keep = torch.zeros(n, dtype=torch.bool)
    a, b = specs[0], specs[1]
    keep[a.offset + 1] = keep[a.offset + 3] = keep[a.offset + 4] = True  # 1 component, 2 chunks
    keep[b.offset + 2] = True  # 1 chunk, no component
    kept = kept_specs(specs, keep, torch.full((n,), 0.5, dtype=torch.float64))
    (ka, _), (kb, _) = kept
    assert (ka.units, ka.params["rank"], ka.params["sparse_units"]) == (3, 1, 2)
    assert (kb.units, kb.params["rank"], kb.params["sparse_units"]) == (1, 0, 1)
    assert ka.n_params == 3 * a.unit_params and kb.n_params == b.unit_params
    bb = load_backbone("tiny-llama")
    st = from_dict(from_specs(kept, bb, "t", {"params": ka.n_params + kb.n_params, "fraction": 0.01}).to_dict())
    built = DeltaSet(to_specs(st, bb))
    assert (built.delta(ka).rank, built.delta(ka).chunks, built.delta(kb).rank, built.delta(kb).chunks) == (1, 2, 0, 1)
    assert sum(p.numel() for p in built.parameters()) == st.n_params


@pytest.mark.parametrize("name", FAMILIES)
def test_sparse_lora_merges_exactly(name):
    bb, st, w = structure_of(name, [SPARSE, {"kind": "ia3", "roles": ["ffn.out"]}])  # after IA3's scaling
    ref = s3pet_out(name, st, w)
    assert (ref - out_of(load_backbone(name), batch_for(bb))).abs().max() > 1e-2
    assert_close_to(E.merge(st, bb, w), ref, bb)


@pytest.mark.parametrize("name", FAMILIES)
def test_sparse_lora_exports_to_peft_only_without_chunks(name, tmp_path):
    bb, st, w = structure_of(name, [SPARSE])
    with pytest.raises(StructureError, match=r"sparse_lora .peft has no sparse residual.*--merge"):
        E.export_peft(st, bb, tmp_path / "a", w)
    bb, st, w = structure_of(name, [{**SPARSE, "sparse_units": 0}])
    ref = s3pet_out(name, st, w)
    out = E.export_peft(st, bb, tmp_path / "b", w)
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert_close_to(peft.PeftModel.from_pretrained(load_backbone(name), str(out)), ref, bb)


def test_sparse_lora_beside_lora_at_one_site_is_refused_by_peft(tiny_backbone, tiny_sites):
    entries = [{**SPARSE, "roles": ["attn.q"], "sparse_units": 0}, {"kind": "lora", "roles": ["attn.q"]}]
    specs = instantiate(load_space({"entries": entries}), tiny_sites("tiny-bert"))
    problems = plan_specs(specs, tiny_backbone("tiny-bert")).problems
    assert problems and all("lora/sparse_lora at one linear" in p for p in problems)


# --------------------------------------------------------------------------- the large-sparse adapter

def sparse_adapter_specs(sites, **params):
    entry = {"kind": "adapter", "roles": ["attn.block", "ffn.block"], "bottleneck": 16, "density": 0.05, **params}
    return instantiate(load_space({"entries": [entry]}), sites)


def test_sparse_adapter_keeps_the_share_and_starts_as_identity(tiny_sites):
    for spec in sparse_adapter_specs(tiny_sites("tiny-t5")):
        d = KINDS["adapter"].build(spec.site, spec.params, spec.units)
        k = kept_per_unit(spec.site.d_out, 0.05)
        assert isinstance(d, SparseAdapter) and d.values.shape == (16, k) and spec.unit_params == k
        assert len({tuple(r) for r in d.index.tolist()}) == 16  # each unit its own support
        assert all(len(set(r)) == k for r in d.index.tolist())  # k distinct elements per unit
        w = d.dense()
        assert (w != 0).sum(1).le(k).all() and torch.all(w[:, spec.site.d_out + 1:] == 0)  # up starts at 0
    with pytest.raises(ConfigError, match="density"):
        KINDS["adapter"].check_params({"density": 1.5})
    with pytest.raises(ConfigError, match="density"):
        KINDS["adapter"].check_params({"density": 0})


def test_snip_keeps_the_largest_weight_times_gradient(tiny_backbone, tiny_sites):
    model = tiny_backbone("tiny-bert")
    specs = sparse_adapter_specs(tiny_sites("tiny-bert"))
    ds = DeltaSet(specs).attach(model)
    ids = torch.randint(1, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    target = torch.randn(2, 6, model.config.hidden_size, generator=torch.Generator().manual_seed(1))

    def loss():
        return ((model(input_ids=ids).last_hidden_state - target) ** 2).mean()

    with torch.no_grad():
        base = model(input_ids=ids).last_hidden_state  # modules start as the identity
    # SNIP by hand, on the dense initialisation prune_on_batch draws (same seed, same order).
    g = torch.Generator().manual_seed(7)
    probes = [ds.delta(s).start_probe(g) for s in specs]
    grads = torch.autograd.grad(loss(), probes)
    expected = []
    for s, w, gr in zip(specs, probes, grads):
        ds.delta(s).finish_probe(None)
        assert (gr != 0).any()
        score = (w.detach() * gr).abs()  # largest first, ties by position
        idx = torch.sort(torch.sort(score, dim=1, descending=True, stable=True).indices[:, :ds.delta(s).k], dim=1).values
        expected.append((idx, torch.where(idx > s.site.d_out, 0.0, torch.gather(w.detach(), 1, idx))))
    assert prune_on_batch(list(ds.modules()), loss, seed=7) == len(specs)
    for s, (idx, v) in zip(specs, expected):
        assert torch.equal(ds.delta(s).index, idx) and torch.equal(ds.delta(s).values.detach(), v)
    with torch.no_grad():  # pruned, each module is still the identity (its up elements at zero)
        assert torch.equal(model(input_ids=ids).last_hidden_state, base)
    assert sum(p.numel() for p in ds.parameters()) == sum(s.n_params for s in specs)
    ds.detach()


def test_retrain_prunes_sparse_adapters_by_snip_on_its_first_batch(tmp_path, monkeypatch):
    from s3pet.deltas import adapter as A
    from s3pet.pipeline import train_structure
    from s3pet.train import TrainConfig
    from synthetic import write_sentiment_task

    task = str(write_sentiment_task(tmp_path / "task", n_train=32, n_eval=8))
    bb = load_backbone("tiny-bert")
    specs = sparse_adapter_specs(discover_sites(bb))
    st = from_specs([(s, 1.0) for s in specs], bb, "t", {"params": sum(s.n_params for s in specs), "fraction": 0.1})
    calls = []
    real = A.prune_on_batch

    def spy(modules, loss_fn, seed):
        n = real(modules, loss_fn, seed)
        calls.append((n, seed))
        return n

    monkeypatch.setattr(A, "prune_on_batch", spy)
    cfg = TrainConfig(max_steps=2, batch_size=8, eval_every=2, progress=False, seed=3)
    m = train_structure(st, task, "tiny-bert", tmp_path / "r", cfg)
    assert calls == [(len(specs), 3)]
    assert m["params"]["pet"] == st.n_params
