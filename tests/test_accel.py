"""The compiled paths against the plain ones: same outputs and gradients, a fallback when the
compiler fails, and the ``compile`` setting.

Most tests trace with the ``aot_eager`` backend (the same graph capture, hooks and gate inputs
as inductor, without code generation, so they run in seconds); one test compiles with
inductor on the CPU to check the generated element-wise low-rank products numerically.
"""

from __future__ import annotations

import json
import logging
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from s3pet import accel
from s3pet import budget as B
from s3pet.deltas import KINDS
from s3pet.deltas.base import expand, project
from s3pet.errors import ConfigError
from s3pet.heads import TaskModel
from s3pet.models import load_backbone
from s3pet.search import BiLevel, SearchConfig, SearchModel
from s3pet.space import discover_sites, instantiate, load_space, shipped_space_path
from s3pet.supernet import Supernet

CARD = SimpleNamespace(name="t", type="classification", num_labels=2, label_words=None, is_regression=False)


@pytest.fixture(autouse=True)
def _aot_eager(monkeypatch):
    monkeypatch.setattr(accel, "BACKEND", "aot_eager")
    yield
    torch._dynamo.reset()


def _no_dropout(m: nn.Module) -> nn.Module:
    for mod in m.modules():
        if isinstance(mod, nn.Dropout):
            mod.p = 0.0
    return m


def _tolerance(dtype: torch.dtype, reduction: int, updates: int) -> float:
    """How far two orderings of the same float computation may drift apart.

    A compiled graph sums in another order than eager mode: each reduction of length n differs
    by about eps * sqrt(n) (round-off adds up like a random walk), and every dependent update
    (an optimizer step, a second-order pass) carries the difference forward. Values here are
    O(1), so the bound serves as both absolute and relative tolerance.
    """
    return torch.finfo(dtype).eps * math.sqrt(reduction) * updates


def _reduction(bb: nn.Module, batches: list[dict]) -> int:
    """The longest sum of the computation: every token of a batch times the widest layer."""
    width = max(bb.config.hidden_size, bb.config.intermediate_size)
    return max(b["input_ids"].numel() for b in batches) * width


def _batches(n: int, lengths=(12, 12, 15, 9, 12, 17)):
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        ids = torch.randint(5, 100, (3, lengths[i % len(lengths)]), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                    "labels": torch.randint(0, 2, (3,), generator=g)})
    return out


def _space(name: str):
    """A shipped space; "unified-compiled": unified without the kinds a compiled search runs eagerly."""
    if name != "unified-compiled":
        return load_space(name)
    entries = [e for e in json.loads(shipped_space_path("unified").read_text())["entries"]
               if KINDS[e["kind"]].compiles_gated]
    return load_space({"name": name, "entries": entries})


def _search(order: str, compile_: str, space: str = "s3pet-m", steps: int = 4, shift_iters: int | None = None):
    torch.manual_seed(0)
    bb = _no_dropout(load_backbone("tiny-bert"))
    sn = Supernet(bb, instantiate(_space(space), discover_sites(bb)), 1500)
    sn.shift_iters = shift_iters  # as on a GPU: a fixed number of sync-free iterations
    for p in sn.deltaset.parameters():  # non-zero everywhere, so every path carries gradient
        nn.init.normal_(p, std=0.05)
    root = SearchModel(sn, TaskModel(bb, CARD, dropout=0.0))
    bl = BiLevel(root, SearchConfig(order=order, compile=compile_, progress=False), torch.device("cpu"), 100)
    bs = _batches(steps + 1)
    losses = []
    for i in range(steps):  # lengths change between steps: static, then dynamic-shape graphs
        losses.append(float(bl.alpha_step(bs[i], bs[i + 1])))
        losses.append(float(bl.w_step(bs[i + 1])))
    # An alpha and a w step per step; second order adds the virtual step and two more passes.
    updates = steps * (2 if order == "first" else 5)
    tol = _tolerance(sn.alpha.dtype, _reduction(bb, bs), updates)
    return bl, losses, sn.alpha.detach().clone(), [p.detach().clone() for p in bl.w], tol


@pytest.mark.parametrize("order,space,iters", [("first", "s3pet-m", None), ("first", "unified-compiled", 12),
                                               ("second", "s3pet-m", None)])
def test_compiled_search_steps_match_plain(order, space, iters):
    bl_c, loss_c, alpha_c, w_c, tol = _search(order, "on", space, shift_iters=iters)
    assert bl_c.compiled.active and bl_c.compiled.error is None  # really compiled, no fallback
    assert (bl_c.sn.solver is not B.solve_shift) == (iters is not None)  # the fixed solve is compiled too
    _, loss_e, alpha_e, w_e, _ = _search(order, "off", space, shift_iters=iters)
    assert tol < 1e-3  # still far below any real difference (a wrong gate moves a loss by ~1e-2)
    assert loss_c == pytest.approx(loss_e, rel=tol, abs=tol)
    assert torch.allclose(alpha_c, alpha_e, rtol=tol, atol=tol) and not torch.equal(alpha_e, torch.zeros_like(alpha_e))
    for a, b in zip(w_c, w_e):
        assert torch.allclose(a, b, rtol=tol, atol=tol)


def test_a_search_holding_a_kind_that_does_not_compile_runs_eagerly(caplog):
    eager_only = sorted(k for k, v in KINDS.items() if not v.compiles_gated)
    assert eager_only  # prefix: compiled, its gates get no gradient (measured: alpha stayed 0)
    bb = load_backbone("tiny-bert")
    sn = Supernet(bb, instantiate(load_space("unified"), discover_sites(bb)), 1500)
    root = SearchModel(sn, TaskModel(bb, CARD, dropout=0.0))
    with caplog.at_level("WARNING", logger="s3pet.search"):
        bl = BiLevel(root, SearchConfig(compile="on", progress=False), torch.device("cpu"), 100)
    assert not bl.compiled.active and any("runs eagerly" in r.getMessage() for r in caplog.records)


def test_gates_are_graph_inputs_not_constants():
    """A compiled forward follows new gate values with one graph (no constant baked in, no
    recompilation per value)."""
    torch.manual_seed(0)
    bb = _no_dropout(load_backbone("tiny-bert"))
    sn = Supernet(bb, instantiate(load_space("s3pet-m"), discover_sites(bb)), 1500)
    for p in sn.deltaset.parameters():
        nn.init.normal_(p, std=0.1)
    tm = TaskModel(bb, CARD, dropout=0.0).eval()
    graphs = []
    accel.BACKEND = lambda gm, inputs: graphs.append(gm) or gm.forward
    c = accel.Compiled(tm, True)
    b = _batches(1)[0]
    outs = []
    for seed in range(3):
        sn.deltaset.z = torch.rand(sn.alpha.numel(), generator=torch.Generator().manual_seed(seed))
        out_c = c.run(tm, b)  # the compiled call
        out_e = tm.forward(b)  # the same modules and hooks, eagerly
        tol = _tolerance(out_e.dtype, _reduction(bb, [b]), 1)
        assert torch.allclose(out_c, out_e, rtol=tol, atol=tol)
        outs.append(out_c)
    assert len(graphs) == 1
    assert not torch.allclose(outs[0], outs[1])  # the gates really changed the output


def test_compiled_fit_matches_plain(tmp_path):
    """The training loop (retrain, baselines) with compile on gives the plain loop's weights."""
    from s3pet.inject import DeltaSet
    from s3pet.models import load_tokenizer
    from s3pet.tasks import load_task
    from s3pet.train import TrainConfig, encode_task, fit
    from synthetic import write_sentiment_task

    card = write_sentiment_task(tmp_path / "task", n_train=48, n_eval=16)
    td = load_task(str(card))
    task = encode_task(td, load_tokenizer("tiny-bert"), 32)  # lengths vary: dynamic shapes

    def run(compile_):
        torch.manual_seed(0)
        bb = _no_dropout(load_backbone("tiny-bert"))
        for p in bb.parameters():
            p.requires_grad_(False)
        ds = DeltaSet(instantiate(load_space("s3pet-m"), discover_sites(bb))).attach(bb)
        for p in ds.parameters():
            nn.init.normal_(p, std=0.05)
        tm = TaskModel(bb, td.card, dropout=0.0)
        cfg = TrainConfig(epochs=2, batch_size=8, compile=compile_, progress=False, device="cpu")
        res = fit(tm, {"deltas": list(ds.parameters()), "head": tm.head_parameters()}, task, cfg)
        return res, [p.detach().clone() for p in ds.parameters()]

    (res_c, a), (res_e, b) = run("on"), run("off")
    assert res_c.steps == res_e.steps > 4
    assert res_c.test["main"] == pytest.approx(res_e.test["main"])
    bb = load_backbone("tiny-bert")
    tol = _tolerance(torch.float32, 8 * 32 * max(bb.config.hidden_size, bb.config.intermediate_size), res_c.steps)
    for x, y in zip(a, b):
        assert torch.allclose(x, y, rtol=tol, atol=tol)


def test_compiler_failure_falls_back_to_eager(caplog):
    def broken(gm, inputs):
        raise RuntimeError("simulated compiler bug")

    accel.BACKEND = broken
    with caplog.at_level(logging.WARNING, logger="s3pet.accel"):
        bl_c, loss_c, alpha_c, _, _ = _search("first", "on", steps=2)
    assert not bl_c.compiled.active and "simulated compiler bug" in bl_c.compiled.error
    assert "continuing without it" in caplog.text
    accel.BACKEND = "aot_eager"
    _, loss_e, alpha_e, _, _ = _search("first", "off", steps=2)
    # The failed first attempt drew one extra noise sample, so only the shapes of the results
    # are comparable to the plain run; the run itself completed every step eagerly.
    assert len(loss_c) == len(loss_e) and alpha_c.shape == alpha_e.shape
    assert all(torch.isfinite(torch.tensor(loss_c)))


def test_errors_that_are_not_the_compilers_propagate():
    accel.BACKEND = "aot_eager"
    c = accel.Compiled(nn.Linear(2, 2), True)

    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    with pytest.raises(torch.OutOfMemoryError):
        c.run(oom)
    assert c.active  # a real error is not mistaken for a compiler failure


@pytest.mark.parametrize("rank", [1, 3])
def test_elementwise_low_rank_products_match_matmul(monkeypatch, rank):
    monkeypatch.setattr(accel, "ELEMENTWISE_MAX_RANK", 4)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(2, 5, 7, generator=g, requires_grad=True)
    a = torch.randn(rank, 7, generator=g, requires_grad=True)
    b = torch.randn(6, rank, generator=g, requires_grad=True)

    def f(x, a, b):
        return expand(project(x, a), b)

    plain = f(x, a, b)
    grads_plain = torch.autograd.grad(plain.square().sum(), [x, a, b])
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(x, a, b)
    grads_c = torch.autograd.grad(compiled.square().sum(), [x, a, b])
    tol = _tolerance(x.dtype, x.numel(), 1) * float(plain.abs().max())  # outputs here are O(10)
    assert torch.allclose(compiled, plain, rtol=tol, atol=tol)
    for gc, gp in zip(grads_c, grads_plain):
        g_tol = _tolerance(x.dtype, x.numel(), 2) * float(gp.abs().max())  # the backward is a second pass
        assert torch.allclose(gc, gp, rtol=g_tol, atol=g_tol)
    assert torch.allclose(plain, x @ a.T @ b.T, rtol=tol, atol=tol)


def test_inductor_on_cpu_matches_plain():
    """Generated code (inductor, CPU): a LoRA r=1 and a low-rank adapter, forward and backward."""
    from s3pet.deltas.adapter import LowRankAdapter
    from s3pet.deltas.lora import LoRA

    torch.manual_seed(0)
    lora, lra = LoRA(16, 12, 1, 8.0), LowRankAdapter(12, 4, "gelu")
    for p in list(lora.parameters()) + list(lra.parameters()):
        nn.init.normal_(p, std=0.2)
    x, y = torch.randn(3, 5, 16), torch.randn(3, 5, 12)
    gate = torch.rand(1, requires_grad=True)

    def f(x, y, gate):
        return lra(None, lora(x, y, gate), gate)

    params = [gate] + list(lora.parameters()) + list(lra.parameters())
    plain = f(x, y, gate)
    gp = torch.autograd.grad(plain.sum(), params)
    out = torch.compile(f, backend="inductor", fullgraph=True)(x, y, gate)
    gc = torch.autograd.grad(out.sum(), params)
    tol = _tolerance(x.dtype, x.numel(), 1) * max(1.0, float(plain.abs().max()))
    assert torch.allclose(out, plain, rtol=tol, atol=tol)
    for a, b in zip(gc, gp):  # parameter gradients sum over every position: scale by their size
        g_tol = _tolerance(x.dtype, x.numel(), 2) * max(1.0, float(b.abs().max()))
        assert torch.allclose(a, b, rtol=g_tol, atol=g_tol)


def test_compile_setting():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert not accel.wanted("auto", cpu, 10**6)  # never on the CPU by default
    assert not accel.wanted("auto", gpu, accel.AUTO_MIN_STEPS - 1)
    assert accel.wanted("auto", gpu, accel.AUTO_MIN_STEPS)
    assert accel.wanted("on", cpu, 1) and not accel.wanted("off", gpu, 10**6)
    with pytest.raises(ConfigError, match="compile must be one of auto, on, off"):
        SearchConfig(compile="yes")
    from s3pet.train import TrainConfig

    with pytest.raises(ConfigError, match="compile"):
        TrainConfig(compile="fast")


@pytest.mark.parametrize("preset,expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_cli_lets_idle_openmp_threads_sleep_unless_told_otherwise(preset, expected):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if preset:
        env["OMP_WAIT_POLICY"] = preset
    code = "import s3pet.cli, os, sys; assert 'torch' not in sys.modules; print(os.environ['OMP_WAIT_POLICY'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected  # set before torch (and its OpenMP runtime) loads
