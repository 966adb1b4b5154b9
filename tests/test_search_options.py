"""The search's options: the supernet as the one owner of gates (one shift solve per alpha
update), warm-up, sensitivity init and selector, temperature annealing, hard-concrete and
deterministic gates, accumulated alpha batches, restarts; every structure within budget."""

from __future__ import annotations

import json

import pytest
import torch

from s3pet import budget as B
from s3pet.errors import ConfigError
from s3pet.models import load_backbone
from s3pet.pipeline import search
from s3pet.search import BiLevel, SearchConfig, SearchModel, temperature_at
from s3pet.space import discover_sites, instantiate, load_space
from s3pet.supernet import Supernet
from s3pet.transfer import average_runs
from synthetic import write_sentiment_task
from test_search import BIAS_SCALE, Features, _teacher_batches, planted_task

pytestmark = pytest.mark.usefixtures("one_thread")


def _root(budget_share=3, space="s3pet-m", **sn_kw):
    torch.manual_seed(0)
    bb = load_backbone("tiny-bert").eval()
    specs = instantiate(load_space(space), discover_sites(bb))
    sn = Supernet(bb, specs, sum(s.n_params for s in specs) // budget_share, **sn_kw)
    return SearchModel(sn, Features(bb)).eval()


def _make(n=8, seed=1):
    return _teacher_batches(load_backbone("tiny-bert", seed=3).eval(), seed=seed, n=n)


class CountingSolver:
    def __init__(self):
        self.calls = 0

    def __call__(self, *a, **kw):
        self.calls += 1
        return B.solve_shift(*a, **kw)


@pytest.mark.parametrize("order", ["first", "second"])
def test_one_shift_solve_per_alpha_update(order):
    root = _root()
    sn = root.supernet
    bl = BiLevel(root, SearchConfig(order=order, w_lr=1e-2), torch.device("cpu"), 10)
    sn.solver = solver = CountingSolver()
    make = _make(n=4)
    for k in range(1, 4):
        bl.alpha_step(make(), make())
        bl.w_step(make())
        sn.gate_probs(), sn.stats(sn.gate_probs()), sn.expected_gates()  # logging and evaluation reuse it
        assert solver.calls == k
    # An external write to the logits is seen (version counter), and so is set_alpha.
    with torch.no_grad():
        sn.alpha.add_(0.5)
    sn.gate_probs()
    assert solver.calls == 4
    sn.set_alpha(torch.zeros_like(sn.alpha))
    sn.gate_probs()
    assert solver.calls == 5
    assert abs(float(B.expected_params(sn.gate_probs().detach(), sn.n)) - sn.budget) <= 1e-6 * sn.budget


def test_supernet_gates_are_the_budget_modules():
    root = _root()
    sn = root.supernet
    sn.configure(temperature=0.7)
    z_ref = B.concrete_sample(sn.alpha, sn.current_shift(), sn.beta, 0.7, False, torch.Generator().manual_seed(5))
    sn.sample_gates(torch.Generator().manual_seed(5))
    assert torch.equal(sn.deltaset.z, z_ref)
    sn.configure(gates="deterministic")
    p = sn.sample_gates()
    assert torch.equal(sn.deltaset.z, p) and sn.deltaset.z.requires_grad  # z = p, differentiable in alpha


def test_hard_concrete_gates_reach_exact_zero_and_one_and_keep_gradients():
    alpha = torch.linspace(-3, 3, 4000, dtype=torch.float64).requires_grad_(True)
    z = B.hard_concrete_sample(alpha, torch.zeros((), dtype=torch.float64), temperature=0.5,
                               generator=torch.Generator().manual_seed(0))
    assert (z == 0).any() and (z == 1).any() and ((z > 0) & (z < 1)).any()
    assert z.min() >= 0 and z.max() <= 1
    z.sum().backward()
    inner = (z > 0) & (z < 1)
    assert (alpha.grad[inner] > 0).all() and (alpha.grad[~inner] == 0).all()
    # Through the supernet: a training step's installed gates hold exact 0s and 1s.
    root = _root()
    root.supernet.configure(gates="hard-concrete")
    root.supernet.sample_gates(torch.Generator().manual_seed(1))
    zs = root.supernet.deltaset.z
    assert (zs == 0).any() and (zs == 1).any()


def test_temperature_anneals_geometrically_from_t0_to_t1():
    ts = [temperature_at(t, 5, 2.0, 0.125) for t in range(5)]
    assert ts[0] == 2.0 and ts[-1] == pytest.approx(0.125, rel=1e-12)
    ratios = [b / a for a, b in zip(ts, ts[1:])]
    assert ratios == pytest.approx([ratios[0]] * 4, rel=1e-12) and ratios[0] < 1
    assert temperature_at(3, 5, 2.0, 0.0) == 2.0  # 0 = no annealing


def test_accumulated_alpha_step_applies_the_mean_gradient():
    root = _root(gates="deterministic")  # no gate noise: the two gradients are exact functions of the batches
    sn = root.supernet
    bl = BiLevel(root, SearchConfig(gates="deterministic", alpha_accum=2, grad_clip=0.0), torch.device("cpu"), 10)
    with torch.no_grad():  # trained deltas: fresh ones are 0 and give every gate a zero gradient
        for q in sn.delta_parameters():
            q.normal_(0, 0.3)
    make = _make(n=4)
    b1, b2 = make(), make()
    grads = []
    for b in (b1, b2):
        sn.sample_gates()
        (g,) = torch.autograd.grad(bl._loss(b), [sn.alpha])
        grads.append(g)
    seen = {}
    bl.opt_a.register_step_pre_hook(lambda opt, args, kw: seen.update(g=sn.alpha.grad.clone()))
    bl.alpha_step([b1, b2], None)
    tol = 10 * torch.finfo(sn.alpha.dtype).eps * float(grads[0].abs().max() + grads[1].abs().max())
    assert (seen["g"] - (grads[0] + grads[1]) / 2).abs().max() <= tol
    assert (grads[0] - grads[1]).abs().max() > 100 * tol  # two batches that differ: the mean is a real test


def test_warm_up_moves_pet_weights_not_alpha():
    root = _root()
    sn = root.supernet
    bl = BiLevel(root, SearchConfig(w_lr=1e-2, warmup_steps=3), torch.device("cpu"), 6, 3)
    before = [p.detach().clone() for p in sn.delta_parameters()]
    make = _make(n=4)
    for _ in range(3):
        bl.warm_step(make())
        assert torch.equal(sn.deltaset.z, sn.gate_probs().detach())  # gates fixed at p
    assert torch.equal(sn.alpha, torch.zeros_like(sn.alpha)) and sn.alpha.grad is None
    assert any((p - q).abs().max() > 0 for p, q in zip(sn.delta_parameters(), before))


def test_alpha_from_scores_is_standardised_and_monotone():
    s = torch.tensor([0.0, 1e-6, 1e-3, 1.0, 5.0], dtype=torch.float64)
    a = B.alpha_from_scores(s, scale=2.0)
    assert torch.isfinite(a).all()
    assert torch.all(a[2:] > a[1:-1]) and a[0] == a[1]  # zero takes the smallest positive score
    tol = 100 * torch.finfo(torch.float64).eps
    assert abs(float(a.mean())) <= tol and abs(float(a.std(unbiased=False)) - 2.0) <= tol * 2
    assert torch.equal(B.alpha_from_scores(torch.zeros(4)), torch.zeros(4, dtype=torch.float64))
    with pytest.raises(ConfigError):
        B.alpha_from_scores(torch.tensor([-1.0, 1.0]))


def test_sensitivity_of_the_warmed_up_supernet_picks_the_planted_sites():
    # The recovery task of test_search: only a bias and a scale on the last norm explain the
    # teacher. Warm-up alone (no alpha step), then |z dL/dz| ranks the candidates.
    teacher, student, target, budget = planted_task()
    sn = Supernet(student, instantiate(load_space(BIAS_SCALE), discover_sites(student)), budget)
    root = SearchModel(sn, Features(student)).eval()
    cfg = SearchConfig(w_lr=5e-2, warmup_steps=60, selector="sensitivity")
    bl = BiLevel(root, cfg, torch.device("cpu"), 60, 0)
    make = _teacher_batches(teacher)
    for _ in range(60):
        bl.warm_step(make())
    assert torch.equal(sn.alpha, torch.zeros_like(sn.alpha))
    bl.init_alpha(bl.sensitivity([make() for _ in range(4)]))
    kept = sn.derive_specs()
    assert {spec.key for spec, _ in kept} == target
    assert sum(s.n_params for s, _ in kept) <= budget


def test_invalid_options_are_refused():
    for kw in ({"gates": "gumbel"}, {"gates": "deterministic", "hard": True}, {"warmup_steps": -1},
               {"alpha_init": "sensitivity"}, {"selector": "sensitivity"}, {"selector": "magic", "warmup_steps": 1},
               {"alpha_accum": 0}, {"restarts": 0}, {"warmup_steps": 2, "warmup_epochs": 1.0}, {"temperature_final": -0.5}, {"alpha_init_scale": 0}):
        with pytest.raises(ConfigError):
            SearchConfig(**kw)
    SearchConfig(alpha_init="sensitivity", warmup_steps=1)  # with a warm-up it is fine


# --------------------------------------------------------------------------- end to end

def _toy(tmp_path):
    return str(write_sentiment_task(tmp_path / "task", n_train=96, n_eval=24))


def _cfg(**kw):
    base = dict(max_steps=6, batch_size=8, eval_every=3, checkpoint_every=2, log_every=1, progress=False,
                w_lr=1e-2, alpha_lr=0.2)
    base.update(kw)
    return SearchConfig(**base)


def _history(out):
    return [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]


def _within_budget(out, budget=800, name="structure.json"):
    st = json.loads((out / name).read_text())
    assert 0 < st["n_params"] <= budget
    return st


def test_warm_up_then_annealed_search_records_its_recipe(tmp_path):
    out = tmp_path / "run"
    cfg = _cfg(warmup_steps=4, alpha_init="sensitivity", temperature=1.0, temperature_final=0.25,
               gates="hard-concrete", alpha_accum=2)
    search("tiny-bert", _toy(tmp_path), "s3pet-m", "800", out, cfg)
    recs = [r for r in _history(out) if "loss_w" in r]
    warm, bil = recs[:4], recs[4:]
    assert [r["phase"] for r in warm] == ["warmup"] * 4 and all(r["phase"] == "bilevel" for r in bil)
    assert all(r["loss_alpha"] == 0 for r in warm) and all(r["loss_alpha"] > 0 for r in bil)
    assert len({r["shift"] for r in warm[:3]}) == 1  # logits untouched during the warm-up
    assert warm[3]["shift"] != warm[0]["shift"]  # set from the sensitivity at its end
    assert bil[0]["temperature"] == 1.0 and bil[-1]["temperature"] == pytest.approx(0.25, rel=1e-12)
    assert all(a["temperature"] > b["temperature"] for a, b in zip(bil, bil[1:]))
    saved = json.loads((out / "config.json").read_text())["search"]
    for k in ("warmup_steps", "alpha_init", "temperature_final", "gates", "alpha_accum", "selector", "restarts"):
        assert saved[k] == getattr(cfg, k), k
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["best_step"] >= 4  # never the untrained logits of the warm-up
    _within_budget(out)


def test_sensitivity_selector_takes_no_alpha_step(tmp_path):
    out = tmp_path / "run"
    search("tiny-bert", _toy(tmp_path), "s3pet-m", "800", out, _cfg(warmup_steps=4, selector="sensitivity"))
    recs = [r for r in _history(out) if "loss_w" in r]
    assert [r["step"] for r in recs] == [1, 2, 3, 4] and all(r["loss_alpha"] == 0 for r in recs)
    rows = (out / "alphas.csv").read_text().splitlines()[1:]
    alphas = [float(r.split(",")[8]) for r in rows]
    assert len(set(alphas)) > 1  # ranked by the score, not all tied at 0
    _within_budget(out)


def _killed_then_resumed_equals(tmp_path, monkeypatch, task, cfg, w_steps: int) -> None:
    """A search into b killed at its ``w_steps``-th w step, then resumed, ends as a's did."""
    calls = {"n": 0}
    real = BiLevel.w_step

    def dying(self, batch):
        calls["n"] += 1
        if calls["n"] == w_steps:
            raise KeyboardInterrupt
        return real(self, batch)

    monkeypatch.setattr(BiLevel, "w_step", dying)
    with pytest.raises(KeyboardInterrupt):
        search("tiny-bert", task, "s3pet-m", "800", tmp_path / "b", cfg)
    monkeypatch.setattr(BiLevel, "w_step", real)
    search("tiny-bert", task, "s3pet-m", "800", tmp_path / "b", cfg, resume=True)
    for name in ("alphas.csv", "structure.json", "structure-loss.json", "structure-last.json"):
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text(), name


def test_alpha_every_k_steps_and_a_killed_search_resumes_to_the_same_structure(tmp_path, monkeypatch):
    task = _toy(tmp_path)
    cfg = _cfg(alpha_every=2, warmup_steps=1, max_steps=6)
    search("tiny-bert", task, "s3pet-m", "800", tmp_path / "a", cfg)
    recs = [r for r in _history(tmp_path / "a") if "loss_w" in r]
    assert [r["loss_alpha"] > 0 for r in recs] == [False, True, False, True, False, True, False]
    assert recs[1]["shift"] == recs[2]["shift"] != recs[3]["shift"]  # logits still on the steps between
    _within_budget(tmp_path / "a")
    _killed_then_resumed_equals(tmp_path, monkeypatch, task, cfg, w_steps=4)


def test_each_selection_rule_derives_from_the_same_search(tmp_path):
    """One search writes the structure of every rule: the selected one in structure.json, the
    others in structure-<rule>.json, each from the step its rule names; select only chooses
    which is which (a search with --select last writes, as structure.json, what one with
    --select best writes as structure-last.json)."""
    task = _toy(tmp_path)
    search("tiny-bert", task, "s3pet-m", "800", tmp_path / "best", _cfg(max_steps=8, eval_every=2, seed=1))
    evals = [r for r in _history(tmp_path / "best") if "eval" in r]
    assert [r["step"] for r in evals] == [2, 4, 6, 8] and all(r["eval"]["loss"] > 0 for r in evals)
    best = max(evals, key=lambda r: (r["eval"]["main"], -r["step"]))["step"]  # ties: the earliest
    low = min(evals, key=lambda r: (r["eval"]["loss"], r["step"]))["step"]
    steps = {rule: json.loads((tmp_path / "best" / name).read_text())["provenance"]["step"]
             for rule, name in (("best", "structure.json"), ("loss", "structure-loss.json"),
                                ("last", "structure-last.json"))}
    assert steps == {"best": best, "loss": low, "last": 8}
    assert json.loads((tmp_path / "best" / "metrics.json").read_text())["select_steps"] == steps
    assert not (tmp_path / "best" / "structure-best.json").exists()
    for name in ("structure.json", "structure-loss.json", "structure-last.json"):
        _within_budget(tmp_path / "best", name=name)
    search("tiny-bert", task, "s3pet-m", "800", tmp_path / "last", _cfg(max_steps=8, eval_every=2, seed=1,
                                                                         select="last"))
    strip = lambda p: {k: v for k, v in json.loads(p.read_text()).items() if k != "provenance"}  # noqa: E731
    assert strip(tmp_path / "last" / "structure.json") == strip(tmp_path / "best" / "structure-last.json")
    assert strip(tmp_path / "last" / "structure-best.json") == strip(tmp_path / "best" / "structure.json")


def test_warm_up_in_epochs_counts_passes_over_d_w(tmp_path):
    out = tmp_path / "run"  # 96 examples: D_w holds 48, 6 batches of 8; half an epoch is 3 steps
    search("tiny-bert", _toy(tmp_path), "s3pet-m", "800", out, _cfg(warmup_epochs=0.5, max_steps=2))
    recs = [r for r in _history(out) if "loss_w" in r]
    assert [r["phase"] for r in recs] == ["warmup"] * 3 + ["bilevel"] * 2
    _within_budget(out)


def test_restarts_derive_from_the_averaged_probabilities(tmp_path):
    out = tmp_path / "run"
    search("tiny-bert", _toy(tmp_path), "s3pet-m", "800", out, _cfg(restarts=2, max_steps=4))
    runs = [out / "restart0", out / "restart1"]
    seeds = [json.loads((r / "config.json").read_text())["search"]["seed"] for r in runs]
    assert seeds == [0, 1]
    p = [[float(x.split(",")[9]) for x in (r / "alphas.csv").read_text().splitlines()[1:]] for r in runs]
    assert p[0] != p[1]  # two different searches
    st = _within_budget(out)
    ref = average_runs(runs, "800")
    assert [(m["site"], m["kind"], m["rank"]) for m in st["modules"]] == \
        [(m["site"], m["kind"], m["rank"]) for m in ref.modules]
    assert len(json.loads((out / "metrics.json").read_text())["restarts"]) == 2


def test_killed_search_with_every_option_resumes_to_the_same_structure(tmp_path, monkeypatch):
    task = _toy(tmp_path)
    cfg = _cfg(warmup_steps=2, alpha_init="sensitivity", temperature_final=0.5, alpha_accum=2, max_steps=5)
    search("tiny-bert", task, "s3pet-m", "800", tmp_path / "a", cfg)
    # killed at the 6th step: after the warm-up, the init and three alpha steps
    _killed_then_resumed_equals(tmp_path, monkeypatch, task, cfg, w_steps=4)


def test_every_option_is_a_flag_of_search_and_run():
    from s3pet.cli import parse

    def search_cfg(argv):
        cfg = parse(argv).cfg
        return cfg["search"] if isinstance(cfg, dict) else cfg.search

    flags = ["--temperature-final", "0.2", "--gates", "hard-concrete", "--warmup-steps", "5", "--alpha-init",
             "sensitivity", "--alpha-init-scale", "2", "--sensitivity-batches", "3", "--selector", "sensitivity",
             "--alpha-accum", "4", "--restarts", "3", "--alpha-every", "2"]
    want = dict(temperature_final=0.2, gates="hard-concrete", warmup_steps=5, alpha_init="sensitivity",
                alpha_init_scale=2.0, sensitivity_batches=3, selector="sensitivity", alpha_accum=4, restarts=3,
                alpha_every=2)
    for argv in (["search", "--task", "t", "--budget", "1k", "--out", "o"], ["run", "--out", "o"]):
        cfg = search_cfg(argv + flags)
        assert {k: getattr(cfg, k) for k in want} == want, argv[0]
        plain = search_cfg(argv)
        assert {k: getattr(plain, k) for k in want} == {k: getattr(SearchConfig(), k) for k in want}


def test_the_search_loop_forms_no_gates_of_its_own():
    import inspect

    import s3pet.search

    src = inspect.getsource(s3pet.search)
    for name in ("torch.sigmoid(", "gate_logits(", "deltaset.z", "concrete_sample("):
        assert name not in src, name  # the supernet (through budget's functions) owns that


def test_kind_lr_scale_trains_each_kind_at_its_own_rate():
    from s3pet.deltas import KINDS

    root = _root()
    sn = root.supernet
    root.task_model.head = torch.nn.Linear(4, 2)  # a head to place
    root.task_model.head_parameters = lambda: list(root.task_model.head.parameters())
    plain = BiLevel(root, SearchConfig(w_lr=1e-2), torch.device("cpu"), 10).opt_w.param_groups
    assert [g["initial_lr"] for g in plain] == [1e-2, 1e-2]  # modules, head
    groups = BiLevel(root, SearchConfig(w_lr=1e-2, kind_lr_scale=3.0), torch.device("cpu"), 10).opt_w.param_groups
    rate = {id(p): g["initial_lr"] for g in groups for p in g["params"]}
    kinds = {s.kind for s in sn.specs}
    assert len(kinds) > 1 and len({KINDS[k].lr for k in kinds}) > 1  # the test tells kinds apart
    for spec in sn.specs:
        for p in sn.deltaset.delta(spec).parameters():
            assert rate[id(p)] == pytest.approx(3.0 * KINDS[spec.kind].lr)
    head = root.task_model.head_parameters()
    assert head and all(rate[id(p)] == pytest.approx(3.0 * max(KINDS[k].lr for k in kinds)) for p in head)
    # every trainable weight in exactly one group
    assert sorted(rate) == sorted({id(p) for p in sn.delta_parameters()} | {id(p) for p in head})
    assert sum(len(g["params"]) for g in groups) == len(rate)
