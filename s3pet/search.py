"""The bi-level search (DARTS-style) over a supernet, with the budget held by the gate shift.

Each step: (1) an alpha step on a D_alpha batch, (2) a w step (PET modules and head) on a D_w
batch; D_w and D_alpha are a seeded 50/50 split of the training set. First order uses
dL_alpha(w, alpha)/dalpha. Second order takes a *virtual* step w' = w - xi grad_w L_w on the PET
and head parameters only (``torch.func.functional_call``; no copy of the model) and corrects
with a finite difference of dL_w/dalpha at w +- eps grad_w' L_alpha(w', alpha). The supernet
forms every gate; the shift is solved once per alpha update.

Options of the recipe (``SearchConfig``, all off by default): a warm-up of w-only steps with
the gates fixed at p; logits initialised from the warmed-up sensitivity |z dL/dz| or that score
alone as the selector; temperature annealing; hard-concrete or deterministic gates; alpha
gradients averaged over micro-batches; restarts (looped by ``pipeline.search``).

The search checkpoint (``search.pt``) holds every state needed to continue: PET weights,
head, logits, both optimisers and schedules, the shift, the step and all random states. A
killed search resumed with ``resume=True`` ends with the same structure as an uninterrupted
one (on the CPU).
"""

from __future__ import annotations

import csv
import io
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from s3pet import accel
from s3pet import budget as B
from s3pet import data as D
from s3pet import dist
from s3pet.configs import SearchConfig  # noqa: F401 (re-exported)
from s3pet.deltas import KINDS
from s3pet.errors import ConfigError, TrainingError
from s3pet.heads import TaskModel
from s3pet.history import History
from s3pet.io import atomic_write_bytes, atomic_write_text
from s3pet.progress import Progress
from s3pet.supernet import Supernet
from s3pet.train import (EncodedTask, all_finite, autocast, evaluate, linear_schedule, make_adamw, peak_memory_mb,
                         resolve_device)

log = logging.getLogger(__name__)


class SearchModel(nn.Module):
    """Root module of a search: the supernet (backbone, PET modules, logits) and the task model.

    One root lets ``functional_call`` swap PET and head weights for the virtual step.
    """

    def __init__(self, supernet: Supernet, task_model: TaskModel):
        super().__init__()
        self.supernet = supernet
        self.task_model = task_model

    def forward(self, batch):
        return self.task_model(batch)

    def w_named(self) -> dict[str, nn.Parameter]:
        """PET and head parameters by name (found by structure: the supernet's delta set and the head)."""
        ids = {id(p) for p in self.supernet.delta_parameters()} | {id(p) for p in self.task_model.head_parameters()}
        return {n: p for n, p in self.named_parameters() if id(p) in ids}


def w_groups(root: SearchModel, cfg: SearchConfig) -> list[dict]:
    """AdamW groups of the PET modules and head: one rate (``w_lr``) for every module, or, with
    ``kind_lr_scale``, each kind at its known-good rate times the scale (what retraining gives it,
    so the gates compare kinds trained the way the derived structure will be); the head at
    ``head_lr``, else the largest module rate."""
    if not cfg.kind_lr_scale:
        groups = [{"params": root.supernet.delta_parameters(), "lr": cfg.w_lr}]
    else:  # one group per kind, its shared tensors included (DeltaSet.kind_parameters)
        groups = [{"params": ps, "lr": KINDS[k].lr * cfg.kind_lr_scale}
                  for k, ps in sorted(root.supernet.deltaset.kind_parameters().items())]
    top = max((g["lr"] for g in groups), default=cfg.w_lr)
    return [g for g in groups if g["params"]] + [{"params": root.task_model.head_parameters(),
                                                   "lr": cfg.head_lr or top}]


def split_alpha(n: int, share: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded split of training indices into D_w and D_alpha."""
    g = torch.Generator().manual_seed(10_007 + seed)
    perm = torch.randperm(n, generator=g).tolist()
    k = max(1, int(round(n * share)))
    return sorted(perm[k:]), sorted(perm[:k])


def _subset(split: D.EncodedSplit, idx: list[int]) -> D.EncodedSplit:
    return D.EncodedSplit([split.features[i] for i in idx], [split.labels[i] for i in idx], split.regression,
                          split.n_choices)


def temperature_at(t: int, n: int, t0: float, t1: float) -> float:
    """Concrete temperature of bi-level step t of n: geometric from t0 (first) to t1 (last); t1 = 0: t0."""
    if not t1 or n <= 1:
        return t0
    return t0 * (t1 / t0) ** (min(t, n - 1) / (n - 1))


class BiLevel:
    """The two optimisers and the step functions of the bi-level search.

    Gates come from the supernet (``sample_gates`` / ``fixed_gates``), configured here from
    ``cfg``; the shift is solved once after every alpha update and reused by every pass until
    the next one.
    """

    def __init__(self, root: SearchModel, cfg: SearchConfig, device: torch.device, total: int,
                 alpha_total: int | None = None):
        self.root, self.cfg, self.device = root, cfg, device
        self.sn = root.supernet
        self.sn.configure(beta=cfg.beta, temperature=cfg.temperature, hard=cfg.hard, gates=cfg.gates)
        self.w_named = root.w_named()
        self.w = list(self.w_named.values())
        self.opt_w = make_adamw(w_groups(root, cfg), device, cfg.weight_decay)
        self.opt_a = make_adamw([{"params": self.sn.arch_parameters(), "lr": cfg.alpha_lr}], device, 0.0)
        alpha_total = total if alpha_total is None else max(1, alpha_total)  # alpha steps follow the warm-up
        self.sched_w = linear_schedule(self.opt_w, total, int(cfg.warmup_ratio * total))
        self.sched_a = linear_schedule(self.opt_a, alpha_total, int(cfg.warmup_ratio * alpha_total))
        self.gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
        want = accel.wanted(cfg.compile, device, total)
        eager_only = sorted({s.kind for s in self.sn.specs if not KINDS[s.kind].compiles_gated})
        if want and eager_only:
            log.warning("the search runs eagerly: a compiled step would not carry the gate gradient of %s",
                        ", ".join(eager_only))
        self.compiled = accel.Compiled(root.task_model, want and not eager_only)
        if self.sn.shift_iters:  # the fixed-iteration (sync-free) solve: ~25 tiny ops per iteration
            self.sn.solver = self.compiled.function(B.solve_shift)

    def _loss(self, batch, params: dict | None = None):
        with autocast(self.device, self.cfg.precision):
            if params is None:
                logits = self.root(batch)
            else:
                logits = torch.func.functional_call(self.root, params, (batch,), strict=False)
        return self.root.task_model.loss(logits, batch["labels"])

    def _gates(self, noise: torch.Tensor | None, alpha_grad: bool):
        """Install training gates from fixed noise (the supernet forms them); returns p."""
        return self.sn.sample_gates(noise=noise, alpha_grad=alpha_grad)

    def _noise(self) -> torch.Tensor | None:
        if self.sn.gates == "deterministic":
            return None  # z = p: nothing to draw
        return B.logistic_noise(self.sn.alpha, self.gen)

    def set_temperature(self, t: int, n: int) -> float:
        """Anneal: the concrete temperature of bi-level step t of n (``cfg.temperature_final``)."""
        temp = temperature_at(t, n, self.cfg.temperature, self.cfg.temperature_final)
        self.sn.configure(temperature=temp)
        return temp

    def alpha_step(self, batch_a, batch_w) -> torch.Tensor:
        """One update of the gate logits on a D_alpha batch, or the mean gradient of a list of
        micro-batches (``alpha_accum``); second order also uses the D_w batch."""
        return self.compiled.run(self._alpha_step, batch_a, batch_w)

    def w_step(self, batch_w) -> torch.Tensor:
        """One update of the PET modules and the head on a D_w batch."""
        return self.compiled.run(self._w_step, batch_w, False)

    def warm_step(self, batch_w) -> torch.Tensor:
        """A warm-up step: the PET modules and the head train with the gates fixed at p."""
        return self.compiled.run(self._w_step, batch_w, True)

    def _alpha_step(self, batch_a, batch_w) -> torch.Tensor:
        cfg, sn = self.cfg, self.sn
        if sn.controller == "shift" and sn.fits_all:
            return torch.zeros((), device=self.device)  # every candidate fits: nothing to choose
        alpha = sn.alpha
        micro = batch_a if isinstance(batch_a, list) else [batch_a]
        g_sum = loss_sum = None
        for ba in micro:
            u = self._noise()  # one draw per micro-batch: averaging also averages the gate noise
            if cfg.order == "first":
                p = self._gates(u, alpha_grad=True)
                loss = self._loss(ba) + sn.penalty(p)
                (g,) = torch.autograd.grad(loss, [alpha])
            else:
                g, loss = self._second_order(ba, batch_w, u)
            g_sum = g if g_sum is None else g_sum + g
            loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
        alpha.grad = g_sum / len(micro)
        dist.average_gradients([alpha])
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_([alpha], cfg.grad_clip)
        self.opt_a.step()
        self.opt_a.zero_grad(set_to_none=True)
        self.sched_a.step()
        sn.refresh_shift()  # the one solve for these logits; every pass until the next update reuses it
        return loss_sum / len(micro)

    def _second_order(self, batch_a, batch_w, u):
        """DARTS' unrolled gradient with a virtual step on the PET and head weights only."""
        sn, names, w = self.sn, list(self.w_named), self.w
        xi = self.cfg.xi or self.cfg.w_lr
        # 1. Virtual step w' = w - xi * grad_w L_w(w, alpha), gates from the same noise throughout.
        self._gates(u, alpha_grad=False)
        g_w = torch.autograd.grad(self._loss(batch_w), w, allow_unused=True)
        w_virtual = {n: (p - xi * g if g is not None else p).detach() for n, p, g in zip(names, w, g_w)}
        for t in w_virtual.values():
            t.requires_grad_(True)
        # 2. dL_alpha(w', alpha)/dalpha and /dw'.
        p = self._gates(u, alpha_grad=True)
        loss = self._loss(batch_a, w_virtual) + sn.penalty(p)
        grads = torch.autograd.grad(loss, [sn.alpha] + list(w_virtual.values()), allow_unused=True)
        g_alpha, g_wv = grads[0], grads[1:]
        g_wv = [g if g is not None else torch.zeros_like(t) for g, t in zip(g_wv, w_virtual.values())]
        # 3. Finite difference of dL_w/dalpha at w +- eps * grad_w' L_alpha.
        norm = torch.sqrt(sum((g.float() ** 2).sum() for g in g_wv))
        eps = 0.01 / (norm + 1e-12)
        fd = []
        for sign in (1.0, -1.0):
            wp = {n: (p.detach() + sign * eps * g) for n, p, g in zip(names, w, g_wv)}
            self._gates(u, alpha_grad=True)
            (ga,) = torch.autograd.grad(self._loss(batch_w, wp), [sn.alpha])
            fd.append(ga)
        g_alpha = g_alpha - xi * (fd[0] - fd[1]) / (2 * eps)
        return g_alpha, loss.detach()

    def _w_step(self, batch_w, fixed: bool = False) -> torch.Tensor:
        if fixed:
            self.sn.fixed_gates()
        else:
            self._gates(self._noise(), alpha_grad=False)
        loss = self._loss(batch_w)
        loss.backward()
        dist.average_gradients(self.w)
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.w, self.cfg.grad_clip)
        self.opt_w.step()
        self.opt_w.zero_grad(set_to_none=True)
        self.sched_w.step()
        return loss.detach()

    def sensitivity(self, batches) -> torch.Tensor:
        """Per-candidate |z dL/dz| at z = p, averaged over ``batches`` (float64).

        The first-order estimate of how much the loss changes if the gate closes; computed in
        eval mode (no dropout, so no random state is used) on the current PET weights.
        """
        sn, was = self.sn, self.root.training
        self.root.eval()
        score = torch.zeros(sn.alpha.shape, dtype=torch.float64, device=sn.alpha.device)
        k = 0
        for batch in batches:
            z = sn.probe_gates()
            (g,) = torch.autograd.grad(self._loss(batch), [z])
            score += (z * g).detach().abs().double()
            k += 1
        self.root.train(was)
        if k == 0:
            raise ConfigError("the sensitivity score needs at least one batch")
        if dist.world_size() > 1:  # every rank scored its own shard: average them
            torch.distributed.all_reduce(score)
            score /= dist.world_size()
        return score / k

    def init_alpha(self, score: torch.Tensor) -> None:
        """Set the logits from a sensitivity score (standardised log score x ``alpha_init_scale``)."""
        self.sn.set_alpha(B.alpha_from_scores(score, self.cfg.alpha_init_scale).to(self.sn.alpha.dtype))
        self.sn.refresh_shift()

    def state_dict(self) -> dict:
        return {"opt_w": self.opt_w.state_dict(), "opt_a": self.opt_a.state_dict(),
                "sched_w": self.sched_w.state_dict(), "sched_a": self.sched_a.state_dict(),
                "gen": self.gen.get_state()}

    def load_state_dict(self, s: dict) -> None:
        self.opt_w.load_state_dict(s["opt_w"])
        self.opt_a.load_state_dict(s["opt_a"])
        self.sched_w.load_state_dict(s["sched_w"])
        self.sched_a.load_state_dict(s["sched_a"])
        self.gen.set_state(s["gen"])


@dataclass
class SearchResult:
    supernet: Supernet
    best_validation: dict
    best_step: int
    steps: int
    seconds: float
    peak_memory_mb: float
    selected_alpha: torch.Tensor
    #: the logits of every selection rule (``SELECTS``: best, loss, last) and the step each is from
    alphas: dict = field(default_factory=dict)
    steps_of: dict = field(default_factory=dict)


def run_search(root: SearchModel, task: EncodedTask, cfg: SearchConfig, out: Path, resume: bool = False) -> SearchResult:
    """Run (or continue) one search; writes history.jsonl and search.pt into ``out``.

    Steps: ``cfg.warmup_steps`` w-only steps with the gates fixed at p, then (``alpha_init`` or
    ``selector`` = sensitivity) the logits set from the warmed-up sensitivity, then the
    bi-level steps (none for the sensitivity selector). ``cfg.restarts`` is handled by the
    caller (``pipeline.search``), one call per restart.
    """
    device = resolve_device(cfg.device)
    root.to(device)
    sn = root.supernet
    if cfg.shift_iters:
        sn.shift_iters = cfg.shift_iters
    elif device.type == "cuda":
        sn.shift_iters = 12  # fixed, sync-free iterations, warm-started every step
    w_idx, a_idx = split_alpha(len(task.train), cfg.alpha_share, cfg.seed)
    d_w, d_a = _subset(task.train, w_idx), _subset(task.train, a_idx)
    world, shard = dist.world_size(), (dist.rank(), dist.world_size())
    nb_w = max(1, D.n_batches(len(d_w), cfg.batch_size, world=world))
    nb_a = max(1, D.n_batches(len(d_a), cfg.batch_size, world=world))
    warm = cfg.warmup_steps or math.ceil(cfg.warmup_epochs * nb_w)
    n_bilevel = 0 if cfg.selector == "sensitivity" else cfg.max_steps or max(1, math.ceil(cfg.epochs * nb_w))
    total = warm + n_bilevel
    eval_every = cfg.eval_every or max(1, nb_w // 2)
    ckpt_every = cfg.checkpoint_every or eval_every
    bl = BiLevel(root, cfg, device, total, math.ceil(n_bilevel / cfg.alpha_every))  # the alpha schedule's steps
    scored = cfg.selector == "sensitivity" or cfg.alpha_init == "sensitivity"
    hist = out / "history.jsonl"
    ckpt = out / "search.pt"

    step, best, best_step, best_alpha, seconds = 0, None, 0, sn.alpha.detach().clone(), 0.0
    low = {"loss": math.inf, "step": 0, "alpha": sn.alpha.detach().clone()}  # the lowest validation loss
    torch.manual_seed(cfg.seed)
    if resume and ckpt.exists():
        try:  # a torn or foreign file must be one line, not a pickle traceback
            state = torch.load(ckpt, map_location=device, weights_only=False)
            root.load_state_dict(state["root"], strict=False)
            bl.load_state_dict(state["bilevel"])
            step, best, best_step, seconds = state["step"], state["best"], state["best_step"], state["seconds"]
        except Exception as e:
            raise ConfigError(f"--resume: {ckpt} is not a readable search checkpoint ({type(e).__name__}); "
                              f"delete it to start the search afresh") from e
        best_alpha = state["best_alpha"].to(device)
        if state.get("low") is not None:  # checkpoints before the loss rule lack it
            low = {**state["low"], "alpha": state["low"]["alpha"].to(device)}
        torch.set_rng_state(state["rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        if dist.is_main():
            _truncate_history(hist, step)
        log.info("resumed search at step %d of %d", step, total)
    elif hist.exists() and dist.is_main():
        hist.unlink()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    # Non-finite losses, logits or shift stop the search at once: checked every step on the CPU
    # (free), every log interval on a GPU (one sync there anyway), and always before a checkpoint.
    check_every = 1 if device.type == "cpu" else min(cfg.log_every, ckpt_every)
    root.train()
    t0 = time.perf_counter()
    sums = {"loss_w": torch.zeros((), device=device), "loss_alpha": torch.zeros((), device=device)}
    n_alpha = 0  # alpha steps since the last record (every step, or every alpha_every-th)
    bar = Progress(total, "search", enabled=cfg.progress, initial=step)
    history = History(out, "search", cfg.tensorboard, start_step=step if resume and ckpt.exists() else None)
    it_w = it_a = None
    while step < total:
        if it_w is None or step % nb_w == 0:
            it_w = D.batches(d_w, cfg.batch_size, task.pad_id, shuffle=True, seed=cfg.seed, epoch=step // nb_w,
                             start=step % nb_w, shard=shard)
        bw = D.to_device(next(it_w), device)
        if step >= warm and (step - warm) % cfg.alpha_every == 0:
            bas = []
            for m in range(cfg.alpha_accum):
                # index of this D_alpha batch over the search (a function of the step: resumable)
                j = (step - warm) // cfg.alpha_every * cfg.alpha_accum + m
                if it_a is None or j % nb_a == 0:
                    it_a = D.batches(d_a, cfg.batch_size, task.pad_id, shuffle=True, seed=cfg.seed + 7919,
                                     epoch=j // nb_a, start=j % nb_a, shard=shard)
                bas.append(D.to_device(next(it_a), device))
            bl.set_temperature(step - warm, n_bilevel)
            sums["loss_alpha"] += bl.alpha_step(bas if cfg.alpha_accum > 1 else bas[0], bw)
            n_alpha += 1
        sums["loss_w"] += bl.warm_step(bw) if step < warm else bl.w_step(bw)
        step += 1
        bar.update(1)
        if step == warm and scored:
            bl.init_alpha(bl.sensitivity(_sensitivity_batches(d_a, task.pad_id, cfg, shard, device)))
        if step % check_every == 0 or step == total:
            _check_finite(sums, sn, cfg, step)
        if step % cfg.log_every == 0 or step == total:
            k = cfg.log_every if step % cfg.log_every == 0 else step % cfg.log_every
            with torch.no_grad():
                p = sn.gate_probs()
            rec = {"step": step, "epoch": step / nb_w, "loss_w": sums["loss_w"].item() / k,
                   "loss_alpha": sums["loss_alpha"].item() / max(n_alpha, 1), "budget": sn.budget,
                   "temperature": sn.temperature, "phase": "warmup" if step <= warm else "bilevel",
                   **{key: float(v) for key, v in sn.stats(p).items()}, **sn.derivation_stats(p)}
            for v in sums.values():
                v.zero_()
            n_alpha = 0
            history.write(rec)
            bar.set(loss_w=f"{rec['loss_w']:.3f}", loss_alpha=f"{rec['loss_alpha']:.3f}",
                    kept=f"{rec['derived_kept']} candidates", p_max=f"{rec['p_max']:.2f}")
        if step % eval_every == 0 or step == total:
            with torch.no_grad():
                sn.expected_gates()
                m = evaluate(root.task_model, task.validation, task.card, task.pad_id, cfg.eval_batch_size, device,
                             cfg.precision, progress=cfg.progress, loss=True)
            history.write({"step": step, "eval": m})
            # Logits still at their initial zeros (inside the warm-up) say nothing: never select them.
            informed = step > warm or (step == warm and scored)
            if informed and (best is None or m["main"] > best["main"]):
                best, best_step, best_alpha = m, step, sn.alpha.detach().clone()
            if informed and m["loss"] < low["loss"]:
                low = {"loss": m["loss"], "step": step, "alpha": sn.alpha.detach().clone()}
        if (step % ckpt_every == 0 or step == total) and dist.is_main():
            _save_checkpoint(ckpt, root, bl, step, best, best_step, best_alpha,
                             seconds + time.perf_counter() - t0, device, low)
    bar.close()
    history.close()
    bl.compiled.close()
    sn.solver = B.solve_shift
    seconds += time.perf_counter() - t0
    alphas = {"best": best_alpha, "loss": low["alpha"], "last": sn.alpha.detach().clone()}
    steps_of = {"best": best_step, "loss": low["step"], "last": step}
    selected = alphas[cfg.select]
    dist.check_same(selected, "gate logits")  # every rank derives the same structure
    return SearchResult(sn, best or {}, best_step, step, seconds, peak_memory_mb(device), selected, alphas, steps_of)


def _sensitivity_batches(d_a: D.EncodedSplit, pad_id: int, cfg: SearchConfig, shard, device):
    """The first ``cfg.sensitivity_batches`` D_alpha batches of a fixed order of their own."""
    it = D.batches(d_a, cfg.batch_size, pad_id, shuffle=True, seed=cfg.seed + 104_729, epoch=0, shard=shard)
    for _, b in zip(range(cfg.sensitivity_batches), it):
        yield D.to_device(b, device)
# Gate logits beyond this are saturated for any beta s3pet uses (sigmoid(1e4) == 1 in float32):
# an alpha step that large means the gate optimiser diverged, not that a gate is decided.
_MAX_LOGIT = 1e4


def _check_finite(sums: dict, sn: Supernet, cfg: SearchConfig, step: int) -> None:
    """Raise TrainingError naming the step and the setting to change when the search diverged."""
    xi = " or --xi" if cfg.order == "second" else ""  # the virtual step moves the weights too
    if not all_finite(sums.values()):
        what = f"a loss is not finite; lower --w-lr (now {cfg.w_lr:g}) or --alpha-lr (now {cfg.alpha_lr:g}){xi}"
    elif not all_finite([sn.alpha, sn.shift]) or sn.alpha.detach().abs().max() > _MAX_LOGIT:
        what = f"the gate logits exploded; lower --alpha-lr (now {cfg.alpha_lr:g})"
    elif not all_finite(sn.delta_parameters()):
        what = f"a PET weight is not finite; lower --w-lr (now {cfg.w_lr:g}){xi}"
    else:
        return
    raise TrainingError(f"search diverged at step {step}: {what}")


def _save_checkpoint(path: Path, root, bl: BiLevel, step, best, best_step, best_alpha, seconds, device,
                     low: dict | None = None) -> None:
    state = {"root": {k: v for k, v in root.state_dict().items() if not _is_backbone(k)},
             "bilevel": bl.state_dict(), "step": step, "best": best, "best_step": best_step,
             "best_alpha": best_alpha, "low": low, "seconds": seconds, "rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def _is_backbone(key: str) -> bool:
    # The frozen backbone is reloaded from its source; only PET, head, logits and buffers are saved.
    return key.startswith("supernet.backbone.") or key.startswith("task_model.backbone.")


def _truncate_history(path: Path, step: int) -> None:
    if not path.exists():
        return
    import json

    lines = [ln for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    keep = []
    for i, ln in enumerate(lines):
        try:
            rec = json.loads(ln)
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # a kill tore the last line: drop it, the checkpoint is older anyway
                log.warning("%s: dropping a torn last line", path)
                break
            raise ConfigError(f"--resume: {path} line {i + 1} is not JSON; remove the line or start afresh") from None
        if isinstance(rec, dict) and rec.get("step", 0) <= step:
            keep.append(ln)
    atomic_write_text(path, "".join(ln + "\n" for ln in keep))


def write_alphas_csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    cols = ["index", "site", "stack", "layer", "role", "kind", "unit", "n", "alpha", "p"]
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]) for k in cols})
    atomic_write_text(path, buf.getvalue())

