"""Training memory of ladder side-tuning (LST) against s3pet's structures, LoRA and BitFit.

    python benchmarks/lst_memory.py [--models minilm,tiny-bert] [--batch 32] [--seq 128]
        [--steps 5] [--warmup 2] [--structure PATH] [--out lst_memory.json]

Per (model, method), in a process of its own (a process's peak memory cannot be reset for the
next method otherwise), on the same random batch (seeded token ids, labels of 2 classes):
build the task model, take AdamW steps (forward, backward, step) in training mode, then report

- trainable parameters (PET modules or side network; the head counted apart),
- peak memory of the timed steps: on CUDA ``torch.cuda.max_memory_allocated``; on the CPU the
  process's peak resident set (``VmHWM``, reset by writing 5 to ``/proc/self/clear_refs`` once
  the model is built) minus its resident set at that moment, i.e. what the steps (warm-up and
  timed) add on top of the loaded model,
- what autograd keeps for the backward pass (``saved_tensors_hooks``: the bytes of every
  distinct saved tensor), exact and machine-independent,
- the mean step time.

Methods, all at the same budget (``--budget``, default 0.05% on MiniLM, 1% on tiny models):
``lora`` and ``bitfit`` (s3pet's hand-designed baselines), ``s3pet`` (a searched structure:
``--structure``, by default the committed showcase run's for MiniLM; on other models a structure
derived from the s3pet-m space with random scores, which costs what a searched one of the same
kinds costs), ``lst`` (sized to the budget) and ``lst-r8`` (the paper's reduction factor 8,
whatever its size).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("lora", "bitfit", "s3pet", "lst", "lst-r8")
SHOWCASE = ROOT / "outputs" / "showcase" / "retrain" / "structure.json"


def _status(key: str) -> int:
    """A ``/proc/self/status`` field in KiB."""
    return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def build(model: str, method: str, budget: str, structure: str | None):
    """(task model, trainable parameters, PET parameter count, what was built) for one method."""
    import torch

    from s3pet import budget as B
    from s3pet import lst
    from s3pet import structure as S
    from s3pet.baselines import baseline_structure
    from s3pet.heads import TaskModel
    from s3pet.models import count_params, load_backbone
    from s3pet.tasks import TaskCard

    backbone = load_backbone(model, seed=0)
    b = B.parse_budget(budget, count_params(backbone))
    card = TaskCard.from_dict({"name": "bench", "benchmark": "custom", "type": "classification",
                               "text_fields": ["text"], "labels": ["a", "b"], "label_words": ["a", "b"],
                               "metrics": ["accuracy"], "main_metric": "accuracy", "size_class": "small",
                               "source": {"files": {"all": "data.csv"}}, "description": "benchmark batch",
                               "citation": ""})
    torch.manual_seed(0)
    if method.startswith("lst"):
        if method == "lst-r8":
            d, f, layers = lst.dims(backbone)
            b = lst.side_params(d, f, layers, d // 8)
        tm, info = lst.build(backbone, card, b, pooling="mean")
        return tm, [*tm.side.parameters(), *tm.head_parameters()], info["params"], lst.describe(info)
    if method == "s3pet":
        if structure:
            st = S.load(structure)
            what = f"structure {structure}"
        else:
            st = baseline_structure("random", backbone, b, seed=0)
            what = "s3pet-m structure with random scores"
    else:
        st, what = baseline_structure(method, backbone, b, seed=0), method
    ds = S.apply(st, backbone)
    tm = TaskModel(backbone, card, pooling="mean")
    pet = list(ds.parameters())
    return tm, [*pet, *tm.head_parameters()], sum(p.numel() for p in pet), f"{what}: {st.summary()}"


def measure(model: str, method: str, budget: str, structure: str | None, batch: int, seq: int, steps: int,
            warmup: int) -> dict:
    """One (model, method) row, measured in this process."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tm, params, n_pet, what = build(model, method, budget, structure)
    for p in params:
        p.requires_grad_(True)
    tm.to(device).train()
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000, (batch, seq), generator=g)  # ordinary word pieces, no specials
    data = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "labels": torch.randint(0, 2, (batch,), generator=g).to(device)}
    saved = {}

    def pack(t):
        saved.setdefault((t.untyped_storage().data_ptr(), t.dtype), t.untyped_storage().nbytes())
        return t

    def step(count_saved: bool = False):
        if count_saved:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = tm.loss(tm(data), data["labels"])
        else:
            loss = tm.loss(tm(data), data["labels"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    # The peak is taken over the warm-up as well: the allocator keeps what the first step took
    # (the CPU's resident set does not shrink back), so a reset after it would miss the peak.
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
        base = _status("VmRSS") * 1024
    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    secs = (time.perf_counter() - t0) / steps
    if device.type == "cuda":
        total = torch.cuda.max_memory_allocated(device)
        peak = total - base
    else:
        total = _status("VmHWM") * 1024
        peak = total - base
    step(count_saved=True)
    n_head = sum(p.numel() for p in tm.head_parameters())
    return {"model": model, "method": method, "what": what, "trainable_params": n_pet, "head_params": n_head,
            "peak_step_mb": round(peak / 2**20, 1), "peak_total_mb": round(total / 2**20, 1),
            "saved_for_backward_mb": round(sum(saved.values()) / 2**20, 1), "step_s": round(secs, 4),
            "device": str(device)}


def table(rows: list[dict]) -> str:
    head = (f"| model | method | trainable params | peak memory of a step (MB) | saved for backward (MB) "
            f"| step (s) |\n| --- | --- | ---: | ---: | ---: | ---: |")
    lines = [head]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['method']} | {r['error']} | | | |")
            continue
        lines.append(f"| {r['model']} | {r['method']} | {r['trainable_params']:,} | {r['peak_step_mb']:,.1f} | "
                     f"{r['saved_for_backward_mb']:,.1f} | {r['step_s']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="minilm,tiny-bert")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--budget", default=None, help="default: 0.05%% on minilm, 1%% on other models")
    ap.add_argument("--structure", default=None, help="the s3pet row's structure (default: the showcase run's on minilm)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default="lst_memory.json")
    ap.add_argument("--one", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)  # the child process
    a = ap.parse_args(argv)
    if a.one:
        model, method = a.one
        print(json.dumps(measure(model, method, a.budget, a.structure, a.batch, a.seq, a.steps, a.warmup)))
        return 0
    rows = []
    for model in a.models.split(","):
        budget = a.budget or ("0.05%" if model == "minilm" else "1%")
        structure = a.structure or (str(SHOWCASE) if model == "minilm" and SHOWCASE.is_file() else None)
        for method in a.methods.split(","):
            cmd = [sys.executable, __file__, "--one", model, method, "--budget", budget, "--batch", str(a.batch),
                   "--seq", str(a.seq), "--steps", str(a.steps), "--warmup", str(a.warmup)]
            if structure:
                cmd += ["--structure", structure]
            p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
            if p.returncode:
                last = (p.stderr.strip().splitlines() or ["failed"])[-1]
                rows.append({"model": model, "method": method, "error": last[:120]})
            else:
                rows.append({**json.loads(p.stdout.strip().splitlines()[-1]), "budget": budget})
            print(f"{model} {method}: {rows[-1]}", file=sys.stderr)
    import torch

    machine = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
               "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
               "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    settings = {k: getattr(a, k) for k in ("models", "methods", "budget", "structure", "batch", "seq", "steps",
                                           "warmup")}
    Path(a.out).write_text(json.dumps({"machine": machine, "settings": settings, "rows": rows}, indent=2) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
