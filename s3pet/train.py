"""One training loop for retraining, baselines and (through its pieces) the search.

AdamW, linear schedule with warm-up, gradient clipping, gradient accumulation, bf16 autocast
on the GPU only (float32 on the CPU, where bf16 is far slower), evaluation every N steps,
best checkpoint on validation (kept in memory: PET weights are small), early stopping, a
progress bar and ``history.jsonl``.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from s3pet import accel
from s3pet import data as D
from s3pet import dist
from s3pet.configs import POOLINGS, TrainConfig, check_device, check_numbers  # noqa: F401 (re-exported)
from s3pet.errors import ConfigError, TaskError, TrainingError
from s3pet.heads import TaskModel
from s3pet.history import History
from s3pet.metrics import compute_metrics
from s3pet.progress import Progress

log = logging.getLogger(__name__)

# TrainConfig lives in s3pet.configs (no torch: the command line builds its flags from it).


def learning_rates(cfg: TrainConfig, kinds: list[str], full: bool = False) -> dict[str, float]:
    """The AdamW rate of each parameter group: ``kind:<name>`` per PET kind, ``backbone`` and ``head``.

    Each kind trains at ``cfg.lr`` if set, else at its own known-good rate (``DeltaKind.lr``);
    the head at ``cfg.head_lr`` if set, else at the largest module rate (the rate a user of a
    single method gives the whole model); everything times ``cfg.lr_scale``.
    """
    from s3pet.deltas import KINDS

    rates = {f"kind:{k}": cfg.lr or KINDS[k].lr for k in sorted(set(kinds))}
    if full:
        rates["backbone"] = cfg.full_lr
    head = cfg.head_lr or max(rates.values(), default=cfg.lr or 1e-3)
    return {**{k: v * cfg.lr_scale for k, v in rates.items()}, "head": head * cfg.lr_scale}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_device(name)
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name} asked for but no CUDA GPU is available; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"device {name} asked for but there are {torch.cuda.device_count()} GPUs")
    return dev


def autocast(device: torch.device, precision: str):
    """bf16 autocast on the GPU (or when asked); a no-op context otherwise."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def linear_schedule(opt, total: int, warmup: int):
    """Linear warm-up to the base rate, then linear decay to zero at ``total``."""

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(opt, f)


def make_adamw(groups: list[dict], device: torch.device, weight_decay: float = 0.0):
    groups = [g for g in groups if g["params"]]
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, weight_decay=weight_decay, fused=fused)


@dataclass
class EncodedTask:
    card: object
    train: D.EncodedSplit
    validation: D.EncodedSplit
    test: D.EncodedSplit
    pad_id: int
    split_info: dict = field(default_factory=dict)

    @property
    def max_length(self) -> int:
        """The length every split was cut at."""
        return self.train.max_length

    def truncation(self) -> dict:
        """For metrics.json: the length used and the share of each split's examples cut there."""
        return {"max_length": self.max_length,
                "truncated": {s: round(getattr(self, s).truncated, 4) for s in ("train", "validation", "test")}}


_SANE_MAX = 1_000_000  # tokenizers without a limit report ~1e30 as model_max_length


def model_max_length(tokenizer, positions: int | None) -> int:
    """The longest input the model takes: its position embeddings, else the tokenizer's limit, else 512."""
    if positions:
        return int(positions)
    n = getattr(tokenizer, "model_max_length", None)
    return int(n) if isinstance(n, int) and 0 < n < _SANE_MAX else 512


def encode_task(task_data, tokenizer, max_length: int, positions: int | None = None) -> EncodedTask:
    """Tokenise every split at ``max_length`` tokens (0: from the training split's lengths, see
    ``data.length_from_data``, capped at the model's ``positions``); warns with the share of
    examples cut when any is."""
    reg = task_data.card.is_regression
    cap = model_max_length(tokenizer, positions)
    if max_length == 0:
        lengths = D.token_lengths(task_data.train, tokenizer)
        max_length = D.length_from_data(lengths, cap)
        log.info("max length from the data: %d tokens (95th percentile of the %d training examples, longest %d, "
                 "model limit %d)", max_length, len(lengths), max(lengths, default=0), cap)
    enc = {s: D.encode(getattr(task_data, s), tokenizer, max_length, reg) for s in ("train", "validation", "test")}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    task = EncodedTask(task_data.card, enc["train"], enc["validation"], enc["test"], pad, task_data.split_info)
    _warn_truncation(task, cap)
    return task


def _warn_truncation(task: EncodedTask, cap: int) -> None:
    shares = {s: getattr(task, s).truncated for s in ("train", "validation", "test")}
    if not any(shares.values()):
        return
    lengths = sorted(task.train.lengths or [0])
    p95 = lengths[min(len(lengths) - 1, math.ceil(0.95 * len(lengths)) - 1)]
    lost = sum(max(0, n - task.max_length) for n in task.train.lengths) / max(1, sum(task.train.lengths))
    hint = ("the model takes no more" if task.max_length >= cap else
            f"--max-length 0 takes it from the data (95th percentile, at most the model's {cap})")
    log.warning("max length %d cuts %.1f%% of the training examples of %s (validation %.1f%%, test %.1f%%), "
                "%.1f%% of their tokens; longest %d tokens, 95th percentile %d; %s",
                task.max_length, 100 * shares["train"], task.card.name, 100 * shares["validation"],
                100 * shares["test"], 100 * lost, lengths[-1], p95, hint)


@torch.no_grad()
def batch_logits(model: TaskModel, split: D.EncodedSplit, pad_id: int, batch_size: int, device: torch.device,
                 precision: str):
    """Yield ``(logits, batch)`` over a split in its order, in eval mode (the previous mode is restored
    after). The one forward of evaluation, shared by ``evaluate`` and ``s3pet.predict``."""
    was = model.training
    model.eval()
    try:
        for batch in D.batches(split, batch_size, pad_id):
            batch = D.to_device(batch, device)
            with autocast(device, precision):
                logits = model(batch)
            yield logits, batch
    finally:
        model.train(was)


def evaluate(model: TaskModel, split: D.EncodedSplit, card, pad_id: int, batch_size: int,
             device: torch.device, precision: str, progress: bool = False, loss: bool = False) -> dict:
    """Metrics of ``model`` on a split (eval mode restored to the previous mode after).

    ``progress``: show the progress of an evaluation that lasts more than a few seconds.
    ``loss``: also the mean training loss over the split's examples (key ``loss``)."""
    preds, labels, total = [], [], torch.zeros((), dtype=torch.float64, device=device)
    bar = Progress(D.n_batches(len(split), batch_size), "eval", enabled=progress, delay_s=5.0, every_s=15.0,
                   tenths=False, unit="batch")
    for logits, batch in batch_logits(model, split, pad_id, batch_size, device, precision):
        preds.append(TaskModel.predict(logits, card.is_regression).cpu())
        labels.append(batch["labels"].cpu())
        if loss:
            total += model.loss(logits, batch["labels"]).double() * len(batch["labels"])
        bar.update(1)
    bar.close()
    if not preds:
        return {"main": float("nan"), **({"loss": float("nan")} if loss else {})}
    m = compute_metrics(card, torch.cat(preds).tolist(), torch.cat(labels).tolist())
    if loss:
        m["loss"] = total.item() / len(split)
    return m


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def all_finite(tensors) -> bool:
    """True when every element of every tensor is finite (one device sync, not one per tensor)."""
    tensors = list(tensors)
    return not tensors or bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


@dataclass
class TrainResult:
    best_validation: dict
    test: dict
    best_step: int
    steps: int
    seconds: float
    peak_memory_mb: float
    history: list = field(default_factory=list)
    privacy: dict | None = None  # under DP: epsilon spent at delta, noise, clipping, sampling rate


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Write a training checkpoint atomically (a kill leaves the previous one whole)."""
    import io

    from s3pet.io import atomic_write_bytes

    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint written by ``save_checkpoint``; ConfigError naming the file if it is unreadable."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a foreign or damaged file: pickle, zip or torch errors
        raise ConfigError(f"{path} is not a readable training checkpoint ({type(e).__name__}); "
                          f"start again without --resume") from e


def keep_history_until(path: Path, step: int) -> None:
    """Drop history lines after ``step`` (and a line torn by a kill): a resumed run writes them again."""
    import json

    from s3pet.io import atomic_write_text

    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("step", 0) <= step:
            keep.append(line)
    atomic_write_text(path, "".join(x + "\n" for x in keep))


def planned_steps(cfg: TrainConfig, n_train: int) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps) of a run over ``n_train`` examples."""
    per_epoch = D.n_batches(n_train, cfg.batch_size, world=dist.world_size()) // cfg.grad_accum
    return per_epoch, cfg.max_steps or max(1, math.ceil(cfg.epochs * per_epoch))


def fit(model: TaskModel, groups: dict[str, list[nn.Parameter]], task: EncodedTask, cfg: TrainConfig,
        run_dir: str | Path | None = None, full: bool = False,
        on_eval: Callable[[int, dict], None] | None = None, rates: dict[str, float] | None = None,
        after_step: Callable[[int], None] | None = None, checkpoint: str | Path | None = None,
        resume: bool = False, modules: list[nn.Module] | None = None) -> TrainResult:
    """Train the given parameter groups, keep the best validation state, report test there.

    ``groups`` maps a name ("kind:lora", "deltas", "head", "backbone") to parameters; everything
    else stays frozen. ``rates`` maps the same names to learning rates (see
    ``learning_rates``); without it every group but the head trains at ``cfg.lr`` (``full_lr``
    when ``full``). ``on_eval(step, metrics)`` is called after each validation (e.g. to report
    to a pruner); an exception raised there stops training and propagates. ``after_step(step)``
    runs after each optimizer step, before the gradients are cleared, with the
    0-based step index (e.g. AdaLoRA's rank allocator). ``checkpoint``: a file written
    (atomically) after every validation with all that is needed to continue; with ``resume``
    the run continues from it and ends as the uninterrupted run would. ``modules``: the modules
    that own the trained parameters (default ``[model]``), hooked for per-example gradients
    when ``cfg.dp`` (``s3pet.dp``). Returns the best validation metrics and the test metrics of
    that checkpoint (and, under DP, the privacy spent).
    """
    device = resolve_device(cfg.device)
    model.to(device)
    torch.manual_seed(cfg.seed)
    trainable = [p for ps in groups.values() for p in ps]
    for p in trainable:
        p.requires_grad_(True)
    if rates is None:
        lr = (cfg.full_lr if full else (cfg.lr or 1e-3)) * cfg.lr_scale
        rates = {name: lr for name in groups}
        rates["head"] = cfg.head_lr * cfg.lr_scale or lr
    opt_groups = [{"params": ps, "lr": rates[name]} for name, ps in groups.items()]
    opt = make_adamw(opt_groups, device, cfg.weight_decay)
    world, shard = dist.world_size(), (dist.rank(), dist.world_size())
    n_batches = D.n_batches(len(task.train), cfg.batch_size, world=world)
    if n_batches == 0:  # an epoch without a batch would loop forever
        raise TaskError(f"the training split of {task.card.name} is empty ({len(task.train)} examples for "
                        f"{world} process(es)); check the task's training file")
    if n_batches < cfg.grad_accum:
        raise ConfigError(f"grad_accum (--grad-accum) is {cfg.grad_accum} but an epoch has only {n_batches} "
                          f"batches of {cfg.batch_size}; lower --grad-accum or --batch-size")
    # Each optimizer step sums exactly grad_accum micro-batches; the last n_batches % grad_accum
    # batches of an epoch are skipped (the order is reshuffled every epoch, so no example is
    # always left out), never carried into the next epoch's first step.
    per_epoch, total = planned_steps(cfg, len(task.train))
    sched = linear_schedule(opt, total, int(cfg.warmup_ratio * total))
    private = None
    if cfg.dp:  # DP-SGD: the optimizer clips and noises per example, batches are Poisson draws
        from s3pet.dp import Private

        private = Private(modules or [model], opt, task.train, cfg, total)
        opt = private.optimizer
    eval_every = cfg.eval_every or per_epoch
    hist_path = Path(run_dir) / "history.jsonl" if run_dir and dist.is_main() else None
    resumed = resume and checkpoint is not None and Path(checkpoint).is_file()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    best, best_state, best_step, bad = None, None, 0, 0
    step, epoch, t0 = 0, 0, time.perf_counter()
    if resumed:
        state = load_checkpoint(checkpoint)
        with torch.no_grad():
            for p, v in zip(trainable, state["trainable"], strict=True):
                p.copy_(v)
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        best, best_step, bad, step = state["best"], state["best_step"], state["bad"], state["step"]
        best_state = [v.to(device) for v in state["best_state"]] if state["best_state"] is not None else None
        torch.set_rng_state(state["rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        epoch = step // per_epoch
        if hist_path:
            keep_history_until(hist_path, step)
        log.info("resuming training at step %d of %d", step, total)
    elif hist_path and hist_path.exists():
        hist_path.unlink()
    skip = (step - epoch * per_epoch) * cfg.grad_accum  # micro-batches of the current epoch already done
    model.train()
    bar = Progress(total, "train", enabled=cfg.progress, initial=step)
    history = History(run_dir if hist_path else None, "train", cfg.tensorboard, start_step=step if resumed else None)
    running = torch.zeros((), device=device)
    compiled = accel.Compiled(model, accel.wanted(cfg.compile, device, total) and not cfg.dp)

    def micro_step(batch) -> torch.Tensor:
        with autocast(device, cfg.precision):
            logits = model(batch)
        loss = model.loss(logits, batch["labels"]) / cfg.grad_accum
        loss.backward()
        return loss.detach()

    # A non-finite loss is checked every step on the CPU (free) and at every log interval on a
    # GPU (one sync there anyway); weights are checked before each validation and at the end.
    check_every = 1 if device.type == "cpu" else cfg.log_every
    setting = "--full-lr" if full else "--lr"

    def diverged(what: str, at: int):
        bar.close()
        history.close()
        compiled.close()  # the next model of the process compiles afresh
        clip = "" if cfg.grad_clip else " or set --grad-clip (now off)"
        top = max(rates.values())
        return TrainingError(f"training diverged at step {at}: {what} is not finite; lower {setting} or "
                             f"--lr-scale (largest rate now {top:g}){clip}")

    done = False
    while not done:
        micro = 0
        if private is not None:
            epoch_batches = private.batches(task.train, task.pad_id, epoch, per_epoch)
        else:
            epoch_batches = D.batches(task.train, cfg.batch_size, task.pad_id, shuffle=True, seed=cfg.seed,
                                      epoch=epoch, shard=shard)
        step_fn = private.step(micro_step) if private is not None else micro_step
        for batch in itertools.islice(epoch_batches, skip, per_epoch * cfg.grad_accum):
            running += compiled.run(step_fn, D.to_device(batch, device))
            micro += 1
            if micro % cfg.grad_accum:
                continue
            if (step + 1) % check_every == 0 and not torch.isfinite(running):
                raise diverged("the loss", step + 1)
            dist.average_gradients(trainable)
            if cfg.grad_clip and private is None:  # DP clips each example's gradient instead
                torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
            opt.step()
            sched.step()
            if after_step is not None:  # before zero_grad: a rank allocator reads this step's gradients
                after_step(step)
            opt.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            if step % cfg.log_every == 0:
                val = running.item() / cfg.log_every  # one sync per log interval, not per step
                if not math.isfinite(val):
                    raise diverged("the loss", step)
                running.zero_()
                bar.set(loss=f"{val:.4f}", lr=f"{sched.get_last_lr()[0]:.2e}")
                history.write({"step": step, "epoch": epoch, "loss": val, "lr": sched.get_last_lr()[0]})
            if step % eval_every == 0 or step == total:
                if not all_finite(trainable):
                    raise diverged("a trained weight", step)
                m = evaluate(model, task.validation, task.card, task.pad_id, cfg.eval_batch_size, device, cfg.precision,
                             progress=cfg.progress)
                history.write({"step": step, "epoch": epoch, "eval": m})
                if best is None or m["main"] > best["main"]:
                    best, best_step, bad = m, step, 0
                    best_state = [p.detach().clone() for p in trainable]
                else:
                    bad += 1
                if on_eval is not None:
                    on_eval(step, m)
                if cfg.patience and bad >= cfg.patience:
                    log.info("early stop at step %d (no improvement in %d validations)", step, bad)
                    done = True
                if checkpoint is not None and not done and step < total:
                    save_checkpoint(checkpoint, {
                        "step": step, "trainable": [p.detach().cpu() for p in trainable], "opt": opt.state_dict(),
                        "sched": sched.state_dict(), "best": best, "best_step": best_step, "bad": bad,
                        "best_state": [v.cpu() for v in best_state] if best_state is not None else None,
                        "rng": torch.get_rng_state(),
                        "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None})
            if step >= total or done:
                done = True
                break
        epoch += 1
        skip = 0
    bar.close()
    history.close()
    compiled.close()
    privacy = None
    if private is not None:
        privacy = private.report(step)
        private.close()
    if best_state is not None:
        with torch.no_grad():
            for p, s in zip(trainable, best_state):
                p.copy_(s)
    if not all_finite(trainable):
        raise diverged("a trained weight", step)
    test = evaluate(model, task.test, task.card, task.pad_id, cfg.eval_batch_size, device, cfg.precision,
                    progress=cfg.progress)
    secs = time.perf_counter() - t0
    return TrainResult(best or {}, test, best_step, step, secs, peak_memory_mb(device), privacy=privacy)

