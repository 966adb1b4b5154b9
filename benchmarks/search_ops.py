"""Host work of a search step, counted in aten ops (machine-independent: each op is a dispatch
on the host and, on a GPU, a kernel launch or more): per phase (alpha step, w step), in the
shift solve, and how many warm-started shift iterations each step actually needs.

    python benchmarks/search_ops.py [--model bert-base] [--full] [--space s3pet-m] [--budget 0.1%]
        [--steps 300] [--alpha-lr 0.1] [--out FILE.json]

Runs on the CPU with ``benchmarks/speed.py``'s random-initialised models and batches (tiny
ones unless ``--full``), with the GPU's fixed shift iterations (``--shift-iters``, 12).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed as S  # noqa: E402  (the speed benchmark's models, batches and search builder)

from s3pet import budget as B  # noqa: E402


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def _ops(fn) -> int:
    with _Count() as c:
        fn()
    return c.n


def measure(model: str, tiny: bool, space: str, budget: str, steps: int, alpha_lr: float, shift_iters: int,
            batch: int = 4, seq: int = 16) -> dict:
    torch.set_num_threads(1)
    template = S.build_template(model, tiny, 0)
    n = S.count_params(template)
    b = B.parse_budget(budget, n)
    dev = torch.device("cpu")
    ctx = S.Ctx(template, S.make_batches(template.config, batch, seq, dev, 0), dev, b, b / n, 0)
    bench = S.build_search(ctx, "first", space, steps + 2)
    root, bl = bench.keep
    sn = root.supernet
    sn.shift_iters = shift_iters
    bl.opt_a.param_groups[0]["lr"] = alpha_lr
    bl.sched_a.base_lrs = [alpha_lr]
    for _, f in bench.phases:
        f(0)
    phase_ops = {name: _ops(lambda f=f: f(1)) for name, f in bench.phases}
    shift_ops = _ops(sn.refresh_shift)
    # Iterations a warm-started solve needs after each alpha step to reach 1e-6 of the budget
    need = collections.Counter()
    prev = sn.current_shift().clone()
    for i in range(2, steps + 2):
        for _, f in bench.phases:
            f(i)
        a = sn.alpha.detach().double()
        for k in range(0, 13):
            got = B.solve_shift(sn.alpha, sn.n, sn.unit_budget, sn.beta, init=prev, iters=k)
            e = float((sn.n * torch.sigmoid((a - got) / sn.beta)).sum())
            if abs(e - sn.unit_budget) <= 1e-6 * sn.unit_budget:
                need[k] += 1
                break
        else:
            need["more than 12"] += 1
        prev = B.solve_shift(sn.alpha, sn.n, sn.unit_budget, sn.beta, tol=1e-10)
    return {"model": model, "tiny": tiny, "space": space, "budget": budget, "modules": len(sn.deltaset.specs),
            "shift_iters": shift_iters, "alpha_lr": alpha_lr, "ops": phase_ops, "shift_solve_ops": shift_ops,
            "iterations_needed": {str(k): v for k, v in sorted(need.items(), key=lambda kv: str(kv[0]))}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="bert-base", help=", ".join(S.MODELS))
    p.add_argument("--full", action="store_true", help="the full-size model (default: its tiny copy)")
    p.add_argument("--space", default="s3pet-m")
    p.add_argument("--budget", default="0.1%")
    p.add_argument("--steps", type=int, default=300, help="search steps for the iterations count (0: skip it)")
    p.add_argument("--alpha-lr", type=float, default=0.1)
    p.add_argument("--shift-iters", type=int, default=12)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    r = measure(a.model, not a.full, a.space, a.budget, a.steps, a.alpha_lr, a.shift_iters)
    print(f"{r['model']}{' (tiny)' if r['tiny'] else ''}, {r['space']} at {r['budget']}: {r['modules']} gated modules")
    print("| phase | aten ops |\n|---|---|")
    for k, v in r["ops"].items():
        print(f"| {k} step | {v:,} |")
    print(f"| shift solve ({r['shift_iters']} iterations, inside the alpha step) | {r['shift_solve_ops']:,} |")
    if a.steps:
        print(f"warm-started iterations to 1e-6 of the budget over {a.steps} steps at alpha lr {r['alpha_lr']:g}: "
              + ", ".join(f"{k}: {v}" for k, v in r["iterations_needed"].items()))
    if a.out:
        Path(a.out).write_text(json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
