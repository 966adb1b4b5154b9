"""The bi-level search: recovery of known sites, second order against finite differences,
the budget controllers, and resume equality."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from s3pet.baselines import random_specs
from s3pet.inject import DeltaSet
from s3pet.models import load_backbone
from s3pet.pipeline import search
from s3pet.search import BiLevel, SearchConfig, SearchModel
from s3pet.space import ModuleSpec, discover_sites, instantiate, load_space
from s3pet.supernet import Supernet
from synthetic import write_sentiment_task

BIAS_SCALE = {"name": "bias-scale", "entries": [{"kind": "bitfit", "roles": ["*"]},
                                                {"kind": "lnfit", "roles": ["norm.*"]}]}


class Features(nn.Module):
    """A 'task model' whose output is the backbone's hidden states, trained to match a teacher."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, batch):
        return self.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state

    def loss(self, out, y):
        return ((out - y) ** 2).mean()

    def head_parameters(self):
        return []


def _teacher_batches(teacher, seed=1, n=16):
    g = torch.Generator().manual_seed(seed)

    def make():
        ids = torch.randint(1000, 30000, (n, 8), generator=g)
        b = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        with torch.no_grad():
            b["labels"] = Features(teacher)(b)
        return b

    return make


def planted_task():
    """(teacher, student, target keys, budget): the teacher is the frozen backbone plus a bias and a
    scale on the last norm, drawn large; the budget fits exactly those two candidates."""
    torch.manual_seed(0)
    teacher = load_backbone("tiny-bert").eval()
    specs = instantiate(load_space(BIAS_SCALE), discover_sites(teacher))
    target = {"encoder.layer.1.output.LayerNorm:bitfit", "encoder.layer.1.output.LayerNorm:lnfit"}
    tspecs = [s for s in specs if s.key in target]
    ds = DeltaSet([ModuleSpec(s.site, s.kind, s.params, s.units) for s in tspecs]).attach(teacher)
    with torch.no_grad():
        for p in ds.parameters():
            p.normal_(0, 3.0)  # large enough that no other site can imitate it (4 of 4 seeds recover)
    return teacher, load_backbone("tiny-bert").eval(), target, sum(s.n_params for s in tspecs)


def test_search_recovers_the_only_sites_that_explain_the_task():
    # The student must match the teacher's hidden states. Under a budget that fits exactly the
    # two planted candidates, the search must keep exactly them; random structures of the same
    # budget do not.
    teacher, student, target, budget = planted_task()
    sites = discover_sites(student)
    sn = Supernet(student, instantiate(load_space(BIAS_SCALE), discover_sites(student)), budget)
    root = SearchModel(sn, Features(student)).eval()
    bl = BiLevel(root, SearchConfig(w_lr=5e-2, alpha_lr=0.1), torch.device("cpu"), 150)
    make = _teacher_batches(teacher)
    for _ in range(150):
        bl.alpha_step(make(), None)
        bl.w_step(make())
    kept = {spec.key for spec, _ in sn.derive_specs()}
    assert kept == target
    hits = sum({sp.key for sp, _ in random_specs(sites, budget, BIAS_SCALE, seed)} == target for seed in range(50))
    assert hits <= 1, "random structures of this budget should almost never find the target"


def test_second_order_gradient_matches_finite_differences():
    torch.manual_seed(0)
    bb = load_backbone("tiny-bert").eval()
    space = {"name": "s", "entries": [{"kind": "lora", "roles": ["attn.v", "ffn.out"], "rank": 2},
                                      {"kind": "bitfit", "roles": ["norm.*"]}]}
    sn = Supernet(bb, instantiate(load_space(space), discover_sites(bb)), 10**9, controller="none")
    root = SearchModel(sn, Features(bb)).double().eval()
    with torch.no_grad():
        for p in sn.delta_parameters():
            p.normal_(0, 0.3)
        sn.alpha.normal_(0, 1.0)
    cfg = SearchConfig(order="second", xi=0.05, precision="fp32")
    bl = BiLevel(root, cfg, torch.device("cpu"), 10)
    teacher = load_backbone("tiny-bert", seed=3).double().eval()
    make = _teacher_batches(teacher, n=4)
    ba, bw = make(), make()
    ba["labels"], bw["labels"] = ba["labels"].double(), bw["labels"].double()
    u = bl._noise()
    g_alpha, _ = bl._second_order(ba, bw, u)

    names, w = list(bl.w_named), bl.w

    def objective(alpha):
        # F(alpha) = L_alpha(w - xi * grad_w L_w(w, alpha), alpha), the quantity the unrolled gradient differentiates.
        sn.alpha.data.copy_(alpha)
        bl._gates(u, alpha_grad=False)
        g = torch.autograd.grad(bl._loss(bw), w)
        wv = {n: (p - cfg.xi * gi).detach() for n, p, gi in zip(names, w, g)}
        bl._gates(u, alpha_grad=False)
        with torch.no_grad():
            return bl._loss(ba, wv).item()

    a0 = sn.alpha.detach().clone()
    h = 1e-5
    numeric = torch.zeros_like(a0)
    for i in range(a0.numel()):
        e = torch.zeros_like(a0)
        e[i] = h
        numeric[i] = (objective(a0 + e) - objective(a0 - e)) / (2 * h)
    rel = (g_alpha - numeric).norm() / numeric.norm()
    assert numeric.norm() > 0
    assert rel < 1e-3, f"relative error {rel:.2e}"


def _toy(tmp_path):
    return str(write_sentiment_task(tmp_path / "task", n_train=96, n_eval=24))


def _cfg(**kw):
    base = dict(max_steps=8, batch_size=8, eval_every=4, checkpoint_every=2, log_every=1, progress=False,
                w_lr=1e-2, alpha_lr=0.2)
    base.update(kw)
    return SearchConfig(**base)


def test_shift_controller_holds_expected_params_at_budget(tmp_path):
    out = tmp_path / "run"
    search("tiny-bert", _toy(tmp_path), "s3pet-m", "800", out, _cfg())
    recs = [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "expected_params" in r]
    assert steps and all(abs(r["expected_params"] - 800) <= 1e-3 for r in steps)
    for name in ("config.json", "alphas.csv", "structure.json", "metrics.json", "search.pt"):
        assert (out / name).is_file(), name
    st = json.loads((out / "structure.json").read_text())
    assert 0 < st["n_params"] <= 800
    header = (out / "alphas.csv").read_text().splitlines()[0]
    assert header == "index,site,stack,layer,role,kind,unit,n,alpha,p"


def test_plain_sigmoid_ablation_ignores_the_budget(tmp_path):
    out = tmp_path / "run"
    search("tiny-bert", _toy(tmp_path), "s3pet-m", "800", out, _cfg(controller="none"))
    recs = [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]
    first = next(r for r in recs if "expected_params" in r)
    assert first["expected_params"] > 900  # sigmoid(~0) = 0.5 of a 2,060-parameter space
    st = json.loads((out / "structure.json").read_text())
    assert st["n_params"] <= 800  # the derivation still honours the budget


@pytest.mark.parametrize("order", ["first", "second"])
def test_killed_search_resumes_to_the_same_structure(tmp_path, monkeypatch, order):
    task = _toy(tmp_path)
    search("tiny-bert", task, "s3pet-m", "800", tmp_path / "a", _cfg(order=order))
    calls = {"n": 0}
    real = BiLevel.w_step

    def dying(self, batch):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return real(self, batch)

    monkeypatch.setattr(BiLevel, "w_step", dying)
    with pytest.raises(KeyboardInterrupt):
        search("tiny-bert", task, "s3pet-m", "800", tmp_path / "b", _cfg(order=order))
    monkeypatch.setattr(BiLevel, "w_step", real)
    assert not (tmp_path / "b" / "structure.json").exists()
    search("tiny-bert", task, "s3pet-m", "800", tmp_path / "b", _cfg(order=order), resume=True)
    for name in ("alphas.csv", "structure.json"):
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text(), name
    ha = [json.loads(x) for x in (tmp_path / "a" / "history.jsonl").read_text().splitlines()]
    hb = [json.loads(x) for x in (tmp_path / "b" / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in ha] == [r["step"] for r in hb]


def test_infeasible_budget_is_a_clear_error(tmp_path):
    from s3pet.errors import BudgetError

    with pytest.raises(BudgetError, match="raise the budget"):
        search("tiny-bert", _toy(tmp_path), "s3pet-m", "3", tmp_path / "run", _cfg())
