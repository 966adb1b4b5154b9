"""Speed benchmark: the cost of one training step of s3pet's search and retraining next to
full fine-tuning, HF peft LoRA and a bias-only floor, on random-initialised models.

    python benchmarks/speed.py [--models bert-base,roberta-large,llama-1b] [--batch 32]
        [--seq 128] [--steps 20] [--warmup 5] [--methods full,peft-lora,...]
        [--out results/speed.json] [--md results/speed.md] [--tiny] [--profile METHOD]
        [--compile-mode MODE] [--compile-backend NAME]

Per model, in one process, every method is built on a fresh copy of the same backbone
(float32 weights; bf16 autocast on a GPU, float32 on the CPU), stepped on the same few
random batches (rotated, so repeated steps do not replay one cached input), warmed up, then
timed: CUDA events around every step (host clock on the CPU), median of the per-step times,
peak allocated GPU memory per method. Every method puts a linear head on the backbone
through s3pet's ``TaskModel`` (mean pooling for encoders, last token for decoders) and steps
AdamW (fused on the GPU) with gradient clipping. Methods:

- ``full``: every backbone weight and the head train.
- ``peft-lora``: HF peft LoRA r=8, alpha 16, no dropout, on every linear layer of the blocks.
- ``bias-only``: frozen backbone, its existing biases train (the norm weights for models
  without biases, LLaMA); the floor of any PET method (forward + activation gradients).
- ``s3pet-lora``: the same LoRA (r=8, alpha 16, every block linear) through s3pet's
  forward hooks instead of peft's module replacement (same structure as ``peft-lora``,
  different implementation).
- ``s3pet-search-{first,second}:{s3pet-m,unified}``: one bi-level step of the search
  (``BiLevel.alpha_step`` then ``BiLevel.w_step``) of a supernet over that space at the
  budget; first order is 2 forward/backward passes, second order 5 (virtual step, unrolled
  loss, two finite-difference passes, w step).
- ``s3pet-retrain``: a random structure of the ``s3pet-m`` space at the budget (the search's
  greedy derivation from random scores), applied to a fresh frozen backbone and trained.
- ``METHOD+compile`` (any method above): the same under ``torch.compile`` (``s3pet.accel``,
  the code path of ``--compile on``; ``--compile-mode`` / ``--compile-backend`` choose
  inductor's mode, e.g. ``reduce-overhead`` for CUDA graphs). Compiling happens in the
  warm-up steps, whose seconds each row records; a compiler failure falls back to eager and
  the row says so.

Under ``torchrun --nproc_per_node N`` every GPU steps its own batch and the gradients are
averaged once per step (``s3pet.dist``); tokens/s count all GPUs and rank 0 writes.

Output: ``--out`` (JSON: machine and settings, one row per (model, method) with ms/step as
the median and mean of the timed steps, min and max, per-phase medians (``alpha``/``w`` for
the search), passes, ms/pass, tokens/s, peak and resident MiB on a GPU (the RSS change on the
CPU), trainable/PET/head parameters, ratios to ``bias-only`` and ``peft-lora``, and the
second- vs first-order comparison), and ``--md`` (the same as markdown tables, also printed
last). Both are rewritten after every row, so a run cut short keeps what it measured. A
method that fails (out of memory included) is a row with its error; the run goes on.

``--profile METHOD`` runs ``torch.profiler`` over a few steps of that method instead of the
benchmark and writes the top-20 ops (by self CUDA time, then by self CPU time, on a GPU; by
CPU time on the CPU), headed by the wall time, GPU kernel time and kernel launches per step.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import logging
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch
from torch import nn

from s3pet import accel
from s3pet import budget as B
from s3pet import dist
from s3pet import structure as S
from s3pet.baselines import baseline_structure
from s3pet.heads import TaskModel
from s3pet.inject import DeltaSet
from s3pet.models import count_params
from s3pet.search import BiLevel, SearchConfig, SearchModel
from s3pet.space import ModuleSpec, discover_sites, instantiate, is_norm, load_space
from s3pet.supernet import Supernet
from s3pet.train import autocast, make_adamw, resolve_device

log = logging.getLogger("speed")

# A classification task card as TaskModel reads it: two labels, a linear head.
CARD = SimpleNamespace(name="speed", type="classification", num_labels=2, label_words=None, is_regression=False)

SPACES = ("s3pet-m", "unified")
SEARCH = tuple(f"s3pet-search-{order}:{space}" for space in SPACES for order in ("first", "second"))
METHODS = ("full", "peft-lora", "bias-only", "s3pet-lora") + SEARCH + ("s3pet-retrain",)
FLOOR, PEFT = "bias-only", "peft-lora"
COMPILED = "+compile"  # method suffix: the same method under torch.compile
FULL_LR, PET_LR, CLIP = 5e-5, 1e-3, 1.0  # the usual settings; they do not change the cost
N_BATCHES = 4  # distinct random batches, rotated step by step
PROFILE_STEPS = 3


# ----------------------------------------------------------------------------- models

def _configs(tiny: bool) -> dict[str, Callable]:
    """Model name -> config factory (real sizes, or hidden 32 / 2 layers with ``tiny``)."""
    import transformers as tf

    if tiny:
        small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
        return {
            "bert-base": lambda: tf.BertConfig(**small, max_position_embeddings=512),
            "roberta-large": lambda: tf.RobertaConfig(**small, vocab_size=50265, max_position_embeddings=514,
                                                      type_vocab_size=1, pad_token_id=1, bos_token_id=0,
                                                      eos_token_id=2, layer_norm_eps=1e-5),
            "llama-1b": lambda: tf.LlamaConfig(**small, num_key_value_heads=1, vocab_size=32000,
                                               max_position_embeddings=2048),
        }
    return {
        # bert-base-uncased: 12 layers, hidden 768, 12 heads, FFN 3072, vocabulary 30522 (109M).
        "bert-base": lambda: tf.BertConfig(),
        # roberta-large: 24 layers, hidden 1024, 16 heads, FFN 4096, vocabulary 50265 (355M).
        "roberta-large": lambda: tf.RobertaConfig(vocab_size=50265, hidden_size=1024, num_hidden_layers=24,
                                                  num_attention_heads=16, intermediate_size=4096,
                                                  max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
                                                  bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5),
        # TinyLlama-1.1B's shape: 22 layers, hidden 2048, FFN 5632, 32 heads, 4 key/value heads,
        # vocabulary 32000 (1.03B without the LM head, which the backbone does not have).
        "llama-1b": lambda: tf.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                                           num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                                           max_position_embeddings=2048, rms_norm_eps=1e-5),
    }


MODELS = ("bert-base", "roberta-large", "llama-1b")


def build_template(name: str, tiny: bool, seed: int) -> nn.Module:
    """The random-initialised float32 backbone of a model, on the CPU (copied for every method)."""
    import transformers as tf

    config = _configs(tiny)[name]()
    torch.manual_seed(seed)
    model = tf.AutoModel.from_config(config, dtype=torch.float32)
    model.config._s3pet_name = name
    return model


def make_batches(config, batch: int, seq: int, device: torch.device, seed: int) -> list[dict]:
    """Random token ids (above the special ids, never zeros), full attention, random labels."""
    g = torch.Generator().manual_seed(seed)
    limit = config.max_position_embeddings - (2 if config.model_type == "roberta" else 0)
    if seq > limit:
        raise ValueError(f"--seq {seq} is longer than {config.model_type}'s {limit} positions")
    out = []
    for _ in range(N_BATCHES):
        ids = torch.randint(5, config.vocab_size, (batch, seq), generator=g)
        out.append({"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
                    "labels": torch.randint(0, CARD.num_labels, (batch,), generator=g).to(device)})
    return out


# ----------------------------------------------------------------------------- methods

@dataclass
class Bench:
    """One method ready to step: the phases of one step, run in order, and what it trains."""

    phases: list[tuple[str, Callable[[int], object]]]  # (name, fn(step index)); the index picks the batch
    passes: int  # forward + backward passes through the backbone per step
    trainable: int  # parameters the w optimiser updates, head included
    head: int  # of which the task head
    info: dict = field(default_factory=dict)
    keep: list = field(default_factory=list)  # objects to drop after timing
    compiled: "accel.Compiled | None" = None  # whether torch.compile is in use (it may have fallen back)


@dataclass
class Ctx:
    """What every builder needs: a fresh backbone, the batches, the device, the budget."""

    template: nn.Module
    batches: list[dict]
    device: torch.device
    budget: int
    budget_fraction: float
    seed: int
    compile: bool = False  # the method runs with torch.compile (the ``+compile`` rows)

    def fresh(self) -> nn.Module:
        return copy.deepcopy(self.template).to(self.device).train()

    def batch(self, i: int) -> dict:
        return self.batches[i % len(self.batches)]


def _uniq(params) -> list[nn.Parameter]:
    seen, out = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _plain(ctx: Ctx, tm: TaskModel, params: list[nn.Parameter], lr: float, info: dict, keep: list) -> Bench:
    """A standard training step over ``params``: autocast forward, backward, clip, AdamW."""
    params = _uniq(params)
    for p in params:
        p.requires_grad_(True)
    tm.to(ctx.device).train()
    opt = make_adamw([{"params": params, "lr": lr}], ctx.device)
    compiled = accel.Compiled(tm, ctx.compile)

    def fwd_bwd(b: dict):
        with autocast(ctx.device, "auto"):
            logits = tm(b)
        loss = tm.loss(logits, b["labels"])
        loss.backward()

    def step(i: int):
        compiled.run(fwd_bwd, ctx.batch(i))
        dist.average_gradients(params)  # under torchrun: one all-reduce, as training does
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)

    head = sum(p.numel() for p in tm.head_parameters())
    return Bench([("step", step)], 1, sum(p.numel() for p in params), head, info, keep + [tm, opt], compiled)


def build_full(ctx: Ctx) -> Bench:
    bb = ctx.fresh()
    tm = TaskModel(bb, CARD)
    return _plain(ctx, tm, list(tm.parameters()), FULL_LR, {}, [])


def _block_linears(bb: nn.Module) -> list[str]:
    return [s.path for s in discover_sites(bb) if s.host == "linear"]


def build_peft_lora(ctx: Ctx) -> Bench:
    import peft

    bb = ctx.fresh()
    targets = _block_linears(bb)
    cfg = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, bias="none", target_modules=targets)
    pm = peft.get_peft_model(bb, cfg)  # freezes the backbone, LoRA weights trainable
    inner = pm.base_model.model  # the backbone with LoRA layers in place of its linears
    tm = TaskModel(inner, CARD)
    lora = [p for p in inner.parameters() if p.requires_grad]
    return _plain(ctx, tm, lora + tm.head_parameters(), PET_LR,
                  {"targets": len(targets), "peft": peft.__version__}, [pm])


def build_s3pet_lora(ctx: Ctx) -> Bench:
    bb = ctx.fresh()
    specs = [ModuleSpec(s, "lora", {"rank": 8, "alpha": 16.0}, 8) for s in discover_sites(bb) if s.host == "linear"]
    for p in bb.parameters():
        p.requires_grad_(False)
    ds = DeltaSet(specs).attach(bb).to(ctx.device)
    tm = TaskModel(bb, CARD)
    return _plain(ctx, tm, list(ds.parameters()) + tm.head_parameters(), PET_LR, {"targets": len(specs)}, [ds])


def build_bias_only(ctx: Ctx) -> Bench:
    bb = ctx.fresh()
    for p in bb.parameters():
        p.requires_grad_(False)
    params = [m.bias for m in bb.modules() if isinstance(getattr(m, "bias", None), nn.Parameter)]
    what = "biases"
    if not params:  # LLaMA-style models have no biases: their norm scales are the BitFit analogue
        params = [m.weight for m in bb.modules() if is_norm(m)]
        what = "norm weights"
    tm = TaskModel(bb, CARD)
    return _plain(ctx, tm, params + tm.head_parameters(), PET_LR, {"trains": what}, [])


def build_retrain(ctx: Ctx) -> Bench:
    bb = ctx.fresh()
    st = baseline_structure("random", bb, ctx.budget, seed=ctx.seed, space="s3pet-m",
                            budget_record={"params": ctx.budget, "fraction": ctx.budget_fraction})
    ds = S.apply(st, bb).to(ctx.device)  # freezes the backbone, fresh modules, no gates
    tm = TaskModel(bb, CARD)
    info = {"structure": st.summary(), "by_kind": st.counts_by_kind()}
    return _plain(ctx, tm, list(ds.parameters()) + tm.head_parameters(), PET_LR, info, [ds])


def build_search(ctx: Ctx, order: str, space: str, total: int) -> Bench:
    bb = ctx.fresh()
    specs = instantiate(load_space(space), discover_sites(bb))
    sn = Supernet(bb, specs, ctx.budget)
    tm = TaskModel(bb, CARD)
    root = SearchModel(sn, tm).to(ctx.device).train()
    if ctx.device.type == "cuda":
        sn.shift_iters = 12  # as run_search does on a GPU: fixed, sync-free shift iterations
    bl = BiLevel(root, SearchConfig(order=order, progress=False, compile="on" if ctx.compile else "off"),
                 ctx.device, total)

    def alpha(i: int):
        bl.alpha_step(ctx.batch(2 * i), ctx.batch(2 * i + 1))

    def w(i: int):
        bl.w_step(ctx.batch(2 * i + 1))

    head = sum(p.numel() for p in tm.head_parameters())
    info = {"space": space, "order": order, "candidates": sn.alpha.numel(),
            "space_params": sum(s.n_params for s in specs)}
    return Bench([("alpha", alpha), ("w", w)], 2 if order == "first" else 5, sum(p.numel() for p in bl.w), head,
                 info, [root, bl], bl.compiled)


def builder(method: str, total: int) -> Callable[[Ctx], Bench]:
    """The builder of a method (a ``+compile`` suffix is handled by the caller through ``Ctx``)."""
    method = method.removesuffix(COMPILED)
    if method.startswith("s3pet-search-"):
        order, space = method[len("s3pet-search-"):].split(":")
        return lambda ctx: build_search(ctx, order, space, total)
    return {"full": build_full, "peft-lora": build_peft_lora, "bias-only": build_bias_only,
            "s3pet-lora": build_s3pet_lora, "s3pet-retrain": build_retrain}[method]


def parse_methods(text: str) -> list[str]:
    """Comma list; ``s3pet-search-first`` / ``-second`` without ``:space`` means both spaces,
    ``s3pet-search`` all four search methods."""
    out = []
    for m in (x.strip() for x in text.split(",") if x.strip()):
        suffix = COMPILED if m.endswith(COMPILED) else ""
        m = m.removesuffix(COMPILED)
        if m == "s3pet-search":
            out += [x + suffix for x in SEARCH]
        elif m in ("s3pet-search-first", "s3pet-search-second"):
            out += [f"{m}:{s}{suffix}" for s in SPACES]
        elif m in METHODS:
            out.append(m + suffix)
        else:
            raise ValueError(f"unknown method {m!r}; choose from {', '.join(METHODS)} "
                             "(or s3pet-search, s3pet-search-first, s3pet-search-second), "
                             f"each optionally with {COMPILED}")
    return list(dict.fromkeys(out))


# ----------------------------------------------------------------------------- timing

def _rss_mib() -> float | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_bench(bench: Bench, device: torch.device, steps: int, warmup: int) -> dict:
    """Warm up, then time ``steps`` steps; per-step and per-phase times in ms (medians)."""
    tw = time.perf_counter()
    for i in range(warmup):
        for _, fn in bench.phases:
            fn(i)
    _sync(device)
    warmup_s = time.perf_counter() - tw  # includes compiling, for the +compile rows
    n_ph = len(bench.phases)
    per = [[0.0] * n_ph for _ in range(steps)]
    t0 = time.perf_counter()
    if device.type == "cuda":
        ev = [[torch.cuda.Event(enable_timing=True) for _ in range(n_ph + 1)] for _ in range(steps)]
        for s in range(steps):
            ev[s][0].record()
            for k, (_, fn) in enumerate(bench.phases):
                fn(warmup + s)
                ev[s][k + 1].record()
        torch.cuda.synchronize(device)
        wall = time.perf_counter() - t0
        per = [[ev[s][k].elapsed_time(ev[s][k + 1]) for k in range(n_ph)] for s in range(steps)]
    else:
        for s in range(steps):
            last = time.perf_counter()
            for k, (_, fn) in enumerate(bench.phases):
                fn(warmup + s)
                now = time.perf_counter()
                per[s][k] = 1e3 * (now - last)
                last = now
        wall = time.perf_counter() - t0
    totals = [sum(p) for p in per]
    return {"ms_step": statistics.median(totals), "ms_step_mean": 1e3 * wall / steps, "warmup_s": warmup_s,
            "ms_step_min": min(totals), "ms_step_max": max(totals),
            "ms_phase": {name: statistics.median(p[k] for p in per) for k, (name, _) in enumerate(bench.phases)}}


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_method(method: str, ctx: Ctx, steps: int, warmup: int, tokens: int) -> dict:
    """Build, time and free one method; a failure (out of memory included) becomes an error row."""
    dev = ctx.device
    row: dict = {"method": method}
    _free(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    rss0 = _rss_mib()
    t0 = time.perf_counter()
    bench = None
    ctx = dataclasses.replace(ctx, compile=method.endswith(COMPILED))
    try:
        bench = builder(method, warmup + steps)(ctx)
        _sync(dev)
        row["build_s"] = round(time.perf_counter() - t0, 2)
        t = time_bench(bench, dev, steps, warmup)
        row.update(status="ok", passes=bench.passes, trainable=bench.trainable, head=bench.head,
                   pet=bench.trainable - bench.head, **bench.info, **t)
        if ctx.compile:  # compiled, or fell back to eager (then the row says why)
            row.update(compiled=bench.compiled.active, compile_error=bench.compiled.error)
        row["ms_pass"] = t["ms_step"] / bench.passes
        row["tokens_per_s"] = tokens / (t["ms_step"] / 1e3)
        if dev.type == "cuda":
            row["peak_mib"] = torch.cuda.max_memory_allocated(dev) / 2**20
            row["resident_mib"] = (torch.cuda.memory_allocated(dev) - base) / 2**20  # weights + optimiser state
        else:
            rss = _rss_mib()
            row["peak_mib"] = None
            row["rss_delta_mib"] = None if rss is None or rss0 is None else rss - rss0
    except Exception as e:  # noqa: BLE001 - any failure (OOM, a library error) is recorded, the run goes on
        first = (str(e).strip().splitlines() or [""])[0][:300]  # OOM messages run to many lines
        row.update(status="error", error=f"{type(e).__name__}: {first}")
        if dev.type == "cuda":
            row["peak_mib"] = torch.cuda.max_memory_allocated(dev) / 2**20
        log.warning("%s failed: %s", method, row["error"])
        e.__traceback__ = None  # drop the frames (and the tensors they hold) before freeing memory
    finally:
        if bench is not None and bench.compiled is not None:
            bench.compiled.close()
        del bench
        _free(dev)
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def add_ratios(rows: list[dict]) -> None:
    """x floor / x peft-lora (time and memory) per model, in place."""
    ok = {(r["model"], r["method"]): r for r in rows if r.get("status") == "ok"}
    for r in rows:
        if r.get("status") != "ok":
            continue
        for key, ref in (("x_floor", FLOOR), ("x_peft_lora", PEFT)):
            other = ok.get((r["model"], ref))
            r[key] = r["ms_step"] / other["ms_step"] if other else None
            if other and r.get("peak_mib") and other.get("peak_mib"):
                r[key + "_mem"] = r["peak_mib"] / other["peak_mib"]


def order_ratios(rows: list[dict]) -> list[dict]:
    """Second- vs first-order search per (model, space): time, time per pass, peak memory."""
    ok = {(r["model"], r["method"]): r for r in rows if r.get("status") == "ok"}
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        for space, suffix in ((s, x) for s in SPACES for x in ("", COMPILED)):
            a = ok.get((model, f"s3pet-search-first:{space}{suffix}"))
            b = ok.get((model, f"s3pet-search-second:{space}{suffix}"))
            if not (a and b):
                continue
            mem = b["peak_mib"] / a["peak_mib"] if a.get("peak_mib") and b.get("peak_mib") else None
            out.append({"model": model, "space": space + suffix, "first_ms": a["ms_step"], "second_ms": b["ms_step"],
                        "x_time": b["ms_step"] / a["ms_step"], "first_ms_pass": a["ms_pass"],
                        "second_ms_pass": b["ms_pass"], "first_peak_mib": a.get("peak_mib"),
                        "second_peak_mib": b.get("peak_mib"), "x_memory": mem})
    return out


# ----------------------------------------------------------------------------- report

def machine_info(device: torch.device, args) -> dict:
    import transformers

    try:
        import peft
        peft_v = peft.__version__
    except ImportError:
        peft_v = None
    info = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "host": platform.node(),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft_v, "device": str(device),
            "world_size": dist.world_size(),
            "cpu_threads": torch.get_num_threads(), "batch": args.batch, "seq": args.seq, "steps": args.steps,
            "warmup": args.warmup, "tiny": args.tiny,
            "compile_mode": args.compile_mode, "compile_backend": args.compile_backend, "budget": args.budget, "seed": args.seed,
            "precision": "bf16 autocast, float32 weights" if device.type == "cuda" else "float32",
            "timing": "CUDA events per step, median" if device.type == "cuda" else "host clock per step, median"}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, gpu_memory_mib=p.total_memory // 2**20, sm_count=p.multi_processor_count,
                    cuda=torch.version.cuda, tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    return info


def _f(x, fmt: str) -> str:
    return "n/a" if x is None else format(x, fmt)


def markdown(result: dict) -> str:
    m = result["machine"]
    dev = m.get("gpu") or f"CPU ({m['cpu_threads']} threads)"
    if m.get("world_size", 1) > 1:
        dev = f"{m['world_size']} x {dev} (data parallel; tokens/s over all of them)"
    lines = [f"Speed: {dev}, torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}; "
             f"batch {m['batch']} x seq {m['seq']}, {m['steps']} timed steps after {m['warmup']} warm-up; "
             f"{m['precision']}; budget {m['budget']} of the backbone" + (" (tiny models)" if m["tiny"] else "")
             + ("" if m.get("gpu") else "; peak MiB is GPU-only (the JSON has the CPU's RSS change)"),
             "",
             "| model | method | ms/step | tokens/s | peak MiB | x floor | x peft-lora | warm-up s |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["rows"]:
        if r.get("status") != "ok":
            lines.append(f"| {r['model']} | {r['method']} | failed: {r.get('error', '')} | | | | | |")
            continue
        name = r["method"] + (" (fell back to eager)" if r.get("compiled") is False else "")
        lines.append(f"| {r['model']} | {name} | {r['ms_step']:.1f} | {r['tokens_per_s']:,.0f} | "
                     f"{_f(r.get('peak_mib'), ',.0f')} | {_f(r.get('x_floor'), '.2f')} | "
                     f"{_f(r.get('x_peft_lora'), '.2f')} | {r['warmup_s']:.1f} |")
    if result["order_ratios"]:
        lines += ["", "Search step, second vs first order (a step is alpha_step + w_step: 2 forward/backward "
                  "passes first order, 5 second order):", "",
                  "| model | space | first ms/step | second ms/step | x time | first ms/pass | second ms/pass "
                  "| first peak MiB | second peak MiB | x memory |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for o in result["order_ratios"]:
            lines.append(f"| {o['model']} | {o['space']} | {o['first_ms']:.1f} | {o['second_ms']:.1f} | "
                         f"{o['x_time']:.2f} | {o['first_ms_pass']:.1f} | {o['second_ms_pass']:.1f} | "
                         f"{_f(o['first_peak_mib'], ',.0f')} | {_f(o['second_peak_mib'], ',.0f')} | "
                         f"{_f(o['x_memory'], '.2f')} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- profile

def profile(method: str, ctx: Ctx, warmup: int, steps: int, path: Path) -> str:
    """Profile ``steps`` steps of one method after ``warmup``; write and return the top-20 ops
    table(s), headed by wall time, kernel time and kernel launches per step."""
    from torch.profiler import ProfilerActivity, profile as tprofile

    ctx = dataclasses.replace(ctx, compile=method.endswith(COMPILED))
    bench = builder(method, warmup + steps)(ctx)
    for i in range(warmup):
        for _, fn in bench.phases:
            fn(i)
    _sync(ctx.device)
    cuda = ctx.device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the profiler's note on clearing events per cycle
        with tprofile(activities=acts) as prof:
            t0 = time.perf_counter()
            for s in range(steps):
                for _, fn in bench.phases:
                    fn(warmup + s)
            _sync(ctx.device)
            wall = 1e3 * (time.perf_counter() - t0) / steps
        avg = prof.key_averages()
    name = f"{method} on {ctx.template.config._s3pet_name}"
    ops = sum(e.count for e in avg if e.key.startswith("aten::"))
    lines = [f"# {name}: {steps} profiled steps after {warmup} warm-up; wall {wall:.1f} ms/step under the profiler",
             f"# {ops / steps:.0f} aten ops/step (each a dispatch on the host, most a kernel launch on a GPU)"]
    if cuda:
        kern = sum(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0) for e in avg)
        launches = sum(e.count for e in avg if "LaunchKernel" in e.key)
        lines.append(f"# GPU kernels {kern / 1e3 / steps:.1f} ms/step ({100 * kern / 1e3 / steps / wall:.0f}% of wall), "
                     f"{launches / steps:.0f} kernel launches/step: the rest is the host launching work")
    parts = ["\n".join(lines) + "\n"]
    # On a GPU the CPU view too: where launches, not kernels, set the pace, it shows the costly host-side ops.
    sorts = [("self CUDA time", ("self_device_time_total", "self_cuda_time_total"))] if cuda else []
    sorts.append(("self CPU time", ("self_cpu_time_total",)))
    for label, keys in sorts:
        for key in keys:
            try:
                parts.append(f"# top 20 ops by {label}\n{avg.table(sort_by=key, row_limit=20)}\n")
                break
            except (KeyError, AttributeError, ValueError):
                continue
    text = "\n".join(parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


# ----------------------------------------------------------------------------- main

def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Training-step speed of s3pet search/retrain vs full, peft LoRA "
                                             "and a bias-only floor.")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    ap.add_argument("--batch", type=int, default=None, help="sequences per batch (32; 4 with --tiny)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (128; 32 with --tiny)")
    # 20 + 5 steps keep the three real models near 6 minutes on one H100 (the second-order
    # search steps dominate: 1-2.5 s each); medians of 20 steps are stable to a few percent.
    ap.add_argument("--steps", type=int, default=20, help="timed steps per method")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    ap.add_argument("--methods", default=",".join(m for m in METHODS),
                    help="comma list (s3pet-search-first/-second alone = both spaces)")
    ap.add_argument("--budget", default="0.1%", help="search/retrain budget (percent of the backbone or a count)")
    ap.add_argument("--out", default="results/speed.json")
    ap.add_argument("--md", default="results/speed.md")
    ap.add_argument("--tiny", action="store_true", help="tiny models (hidden 32, 2 layers) for a quick check")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = its default)")
    ap.add_argument("--compile-mode", default=None,
                    help="torch.compile mode for the +compile rows (default: inductor's default; "
                         "e.g. reduce-overhead for CUDA graphs, max-autotune-no-cudagraphs)")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend for the +compile rows")
    ap.add_argument("--profile", metavar="METHOD", default=None,
                    help="profile this method instead of benchmarking; writes the top-20 ops table")
    ap.add_argument("--profile-out", default="results/profile-{model}-{method}.txt",
                    help="where --profile writes ({model} and {method} are filled in)")
    args = ap.parse_args(argv)
    args.batch = args.batch or (4 if args.tiny else 32)
    args.seq = args.seq or (32 if args.tiny else 128)
    if args.steps < 1 or args.warmup < 0 or args.batch < 1 or args.seq < 1:
        ap.error("--steps, --batch and --seq must be positive, --warmup >= 0")
    args.model_list = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in args.model_list if m not in MODELS]
    if bad or not args.model_list:
        ap.error(f"unknown model(s) {bad}; choose from {', '.join(MODELS)}")
    try:
        args.method_list = parse_methods(args.profile if args.profile else args.methods)
    except ValueError as e:
        ap.error(str(e))
    if args.profile and len(args.method_list) != 1:
        ap.error("--profile takes one method (give a search method with its space, e.g. s3pet-search-first:s3pet-m)")
    return args


def write_results(result: dict, args, seconds: float) -> None:
    """Fill in the ratios and write the JSON and the markdown table."""
    add_ratios(result["rows"])
    result["order_ratios"] = order_ratios(result["rows"])
    result["machine"]["total_seconds"] = round(seconds, 1)
    if not dist.is_main():
        return  # under torchrun every rank times the same steps; rank 0 reports
    for path, text in ((args.out, json.dumps(result, indent=2, sort_keys=True, default=str) + "\n"),
                       (args.md, markdown(result))):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)


def main(argv=None) -> int:
    """Run the benchmark (or ``--profile``); exit status 0 when every method ran, 1 otherwise."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    threads, compile_settings = torch.get_num_threads(), (accel.MODE, accel.BACKEND)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # library deprecation notes, not results
            return _run(args)
    finally:
        torch.set_num_threads(threads)
        accel.MODE, accel.BACKEND = compile_settings


def _run(args) -> int:
    device = resolve_device(dist.init_from_env(args.device))
    accel.MODE, accel.BACKEND = args.compile_mode, args.compile_backend
    tokens = args.batch * args.seq * dist.world_size()  # per step, over all GPUs
    result = {"machine": machine_info(device, args), "rows": [], "order_ratios": []}
    t_all = time.perf_counter()
    for model in args.model_list:
        t0 = time.perf_counter()
        try:
            template = build_template(model, args.tiny, args.seed)
            n_bb = count_params(template)
            budget = B.parse_budget(args.budget, n_bb)
            ctx = Ctx(template, make_batches(template.config, args.batch, args.seq, device,
                                                  args.seed + 1000 * dist.rank()), device,
                      budget, budget / n_bb, args.seed)
        except Exception as e:  # noqa: BLE001 - a model that cannot be set up fails its rows, the run goes on
            log.warning("%s: cannot set up: %s", model, e)
            result["rows"] += [{"model": model, "method": m, "status": "error", "error": f"{type(e).__name__}: {e}"}
                               for m in args.method_list]
            continue
        log.info("%s: %.1fM parameters, budget %d, built in %.1f s", model, n_bb / 1e6, budget,
                 time.perf_counter() - t0)
        if args.profile:
            method = args.method_list[0]
            path = Path(args.profile_out.format(model=model, method=method.replace(":", "_")))
            print(profile(method, ctx, max(1, min(args.warmup, 3)), PROFILE_STEPS, path))
            log.info("wrote %s", path)
        else:
            for method in args.method_list:
                row = {"model": model, "backbone_params": n_bb, "budget_params": budget,
                       **run_method(method, ctx, args.steps, args.warmup, tokens)}
                result["rows"].append(row)
                if row["status"] == "ok":
                    log.info("%s %s: %.1f ms/step (%d passes), peak %s MiB, %.0f s", model, method, row["ms_step"],
                             row["passes"], _f(row.get("peak_mib"), ".0f"), row["seconds"])
                write_results(result, args, time.perf_counter() - t_all)  # after every row: a cut-off run keeps it
        del ctx, template
        _free(device)
    if args.profile:
        return 0
    write_results(result, args, time.perf_counter() - t_all)
    if dist.is_main():
        print(markdown(result))
    return 0 if all(r["status"] == "ok" for r in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
