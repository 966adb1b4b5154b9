"""Quality benchmark: does the searched structure beat hand-picked PET at the same budget?

Runs a grid of (task, method, budget, seed) on one machine, several runs at a time (the model
is small, so several processes share one GPU), and resumes: a run whose ``result.json``
exists is skipped, so the grid can be spread over several calls (``--time-limit`` stops
launching new runs in time). Then it writes every run to ``results.json``, a markdown table
(task x method per budget, mean +- std over seeds, an average column, % of full fine-tuning,
and the cost of search vs retrain) and a plot of score against trainable parameters.

    python benchmarks/quality.py --model PATH --data-dir DIR --out results/quality \
        [--tasks rte,mrpc,cola,stsb,sst2,cb] [--budgets 0.01%,0.1%,1%] [--seeds 0,1,2] \
        [--methods s3pet-m,unified,random,lora,adapter,bitfit,lnfit,full,optuna] \
        [--workers 8] [--time-limit 540] [--report-only]

Methods: ``s3pet-m`` / ``unified`` (search in that space, then retrain the derived structure),
``random`` (a random structure of s3pet-m under the budget), ``lora``, ``adapter``,
``bitfit``, ``lnfit`` (hand-designed, sized to the budget), ``full`` (full fine-tuning,
budget-independent) and ``optuna`` (Optuna/TPE over the s3pet-m space, ``--optuna-trials``
retrains, chosen to cost about as much as one search).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

TASKS = ("rte", "mrpc", "cola", "stsb", "sst2", "cb")
BUDGETS = ("0.01%", "0.1%", "1%")
METHODS = ("s3pet-m", "unified", "random", "lora", "adapter", "bitfit", "lnfit", "full", "optuna")
SEARCH_METHODS = ("s3pet-m", "unified")


def job_dir(out: Path, task: str, method: str, budget: str, seed: int) -> Path:
    b = "all" if method == "full" else budget.replace("%", "pct")
    return out / "runs" / task / method / b / f"seed{seed}"


def jobs(args) -> list[dict]:
    out = []
    for seed in args.seeds:
        for task in args.tasks:
            for method in args.methods:
                budgets = ["-"] if method == "full" else args.budgets
                for budget in budgets:
                    out.append({"task": task, "method": method, "budget": budget, "seed": seed})
    return out


TRAIN_SIZES = {"rte": 2490, "mrpc": 3668, "cola": 8551, "stsb": 5749, "sst2": 65349, "cb": 250,
               "rotten-tomatoes": 8058, "snli": 97890}


def epochs_for(args, task: str, base: float) -> float:
    """At least ``--min-steps`` optimizer steps on small tasks (at most 20 epochs), else ``base``."""
    n = min(TRAIN_SIZES.get(task, 10**9), args.max_train_samples or 10**9)
    return float(min(20.0, max(base, math.ceil(args.min_steps * args.batch_size / n))))


def train_settings(args, task: str, seed: int) -> dict:
    """Per-task training settings: a few epochs, larger training sets capped (recorded)."""
    return dict(epochs=epochs_for(args, task, args.epochs), batch_size=args.batch_size, lr=args.lr, head_lr=args.head_lr, seed=seed,
                max_train_samples=args.max_train_samples, max_length=args.max_length, progress=False,
                eval_every=0, patience=0)


def run_job(job: dict, args_dict: dict) -> dict:
    """One run in a worker process; writes result.json into its folder and returns it."""
    import torch

    from s3pet.pipeline import baseline, retrain, search
    from s3pet.search import SearchConfig
    from s3pet.train import TrainConfig

    args = argparse.Namespace(**args_dict)
    torch.set_num_threads(max(1, args.threads))
    d = job_dir(Path(args.out), job["task"], job["method"], job["budget"], job["seed"])
    d.mkdir(parents=True, exist_ok=True)
    ts = train_settings(args, job["task"], job["seed"])
    tcfg = TrainConfig(**ts)
    rec = dict(job)
    t0 = time.perf_counter()
    try:
        if job["method"] in SEARCH_METHODS:
            scfg = SearchConfig(epochs=epochs_for(args, job["task"], args.search_epochs), batch_size=args.batch_size, w_lr=args.w_lr,
                                alpha_lr=args.alpha_lr, head_lr=args.head_lr, seed=job["seed"],
                                max_train_samples=args.max_train_samples, max_length=args.max_length,
                                progress=False)
            # A job without result.json is redone from scratch: replace what a killed attempt finished.
            sm = search(args.model, job["task"], job["method"], job["budget"], d / "search", scfg,
                        data_dir=args.data_dir, overwrite=True)
            m = retrain(d / "search" / "structure.json", job["task"], d / "retrain", tcfg, model=args.model,
                        data_dir=args.data_dir, overwrite=True)
            rec["search_cost"] = sm["cost"]
        elif job["method"] == "optuna":
            from s3pet.optuna_search import optuna_search

            om = optuna_search(args.model, job["task"], "s3pet-m", job["budget"], d / "optuna", args.optuna_trials,
                               cfg=tcfg, data_dir=args.data_dir, seed=job["seed"], pruner="none")
            best = Path(d / "optuna" / "best_structure.json")
            m = retrain(best, job["task"], d / "retrain", tcfg, model=args.model, data_dir=args.data_dir,
                        overwrite=True)
            rec["search_cost"] = om.get("cost", {})
        else:
            budget = None if job["method"] == "full" else job["budget"]
            m = baseline(job["method"], budget, job["task"], d / "train", tcfg, model=args.model,
                         data_dir=args.data_dir, overwrite=True)
        rec.update(status="ok", main_metric=m["main_metric"], validation=m["validation"]["main"],
                   test=m["test"]["main"], test_all=m["test"], params=m["params"], retrain_cost=m["cost"])
    except Exception as e:  # record and go on: one failed run must not stop the grid
        rec.update(status="failed", error=f"{type(e).__name__}: {e}", trace=traceback.format_exc()[-2000:])
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    if not args.keep_weights:  # the grid needs the numbers, not hundreds of weight files
        for f in list(d.rglob("*.safetensors")) + list(d.rglob("*.pt")):
            f.unlink()
    (d / "result.json").write_text(json.dumps(rec, indent=2, sort_keys=True, default=str))
    return rec


def collect(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/*/*/*/result.json"))]


def _fmt(xs: list[float]) -> str:
    if not xs:
        return "–"
    m = statistics.mean(xs)
    s = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{100 * m:.1f} ± {100 * s:.1f}"


def report(out: Path, args) -> str:
    """results.json, results.md and quality.png from every finished run."""
    recs = [r for r in collect(out) if r.get("status") == "ok"]
    failed = [r for r in collect(out) if r.get("status") != "ok"]
    machines = sorted({r["retrain_cost"].get("machine", "?") for r in recs})
    if machines:  # the machine the runs ran on, not the one writing the report
        args.machine = ", ".join(machines)
    (out / "results.json").write_text(json.dumps({"runs": collect(out), "machine": args.machine,
                                                   "command": " ".join(sys.argv)}, indent=2, default=str))
    tasks = [t for t in args.tasks if any(r["task"] == t for r in recs)]
    methods = [m for m in args.methods if any(r["method"] == m for r in recs)]
    full = {t: [r["test"] for r in recs if r["task"] == t and r["method"] == "full"] for t in tasks}
    lines = [f"Model {args.model_name}; test metric x100 (mean ± std over seeds); machine: {args.machine}.", ""]
    for budget in args.budgets:
        lines += [f"### Budget {budget} of the backbone", "",
                  "| method | " + " | ".join(tasks) + " | average | % of full FT | PET params | search s | retrain s |",
                  "|---|" + "---|" * (len(tasks) + 5)]
        for meth in methods:
            b = "-" if meth == "full" else budget
            rs = [r for r in recs if r["method"] == meth and r["budget"] == b]
            if not rs:
                continue
            cells, means = [], []
            for t in tasks:
                xs = [r["test"] for r in rs if r["task"] == t]
                cells.append(_fmt(xs))
                if xs:
                    means.append(statistics.mean(xs))
            avg = statistics.mean(means) if len(means) == len(tasks) else float("nan")
            fulls = [statistics.mean(full[t]) for t in tasks if full.get(t)]
            pct = 100 * avg / statistics.mean(fulls) if fulls and len(fulls) == len(tasks) and not math.isnan(avg) else float("nan")
            params = statistics.mean(r["params"]["pet"] for r in rs)
            ss = [r.get("search_cost", {}).get("seconds") for r in rs if r.get("search_cost")]
            rsec = statistics.mean(r["retrain_cost"]["seconds"] for r in rs)
            lines.append(f"| {meth} | " + " | ".join(cells) + f" | {100 * avg:.1f} | {pct:.1f} | {params:,.0f} | "
                         + (f"{statistics.mean(ss):.0f}" if ss else "–") + f" | {rsec:.0f} |")
        lines.append("")
    if failed:
        lines += [f"{len(failed)} runs failed: " + "; ".join(f"{r['task']}/{r['method']}/{r['budget']}/{r['seed']}: "
                                                            f"{r.get('error', '')[:120]}" for r in failed[:10]), ""]
    md = "\n".join(lines)
    (out / "results.md").write_text(md)
    _plot(recs, tasks, methods, out / "quality.png")
    return md


def _plot(recs, tasks, methods, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not recs:
        return
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    markers = "os^vDP*Xh"
    for i, meth in enumerate(methods):
        pts = {}
        for r in recs:
            if r["method"] != meth:
                continue
            pts.setdefault(r["budget"], []).append(r)
        xs, ys = [], []
        for b, rs in pts.items():
            per_task = {}
            for r in rs:
                per_task.setdefault(r["task"], []).append(r["test"])
            if len(per_task) != len(tasks):
                continue
            xs.append(statistics.mean(r["params"]["pet"] for r in rs))
            ys.append(100 * statistics.mean(statistics.mean(v) for v in per_task.values()))
        order = sorted(range(len(xs)), key=lambda k: xs[k])
        ax.plot([xs[k] for k in order], [ys[k] for k in order], marker=markers[i % len(markers)], label=meth)
    ax.set_xscale("log")
    ax.set_xlabel("trainable PET parameters (log; head not counted)")
    ax.set_ylabel(f"test score x100, mean over {len(tasks)} tasks")
    ax.set_title("Score vs trainable parameters")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=150)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--model-name", default="all-MiniLM-L6-v2 (real weights, fp16 copy upcast to fp32)")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--budgets", default=",".join(BUDGETS))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--search-epochs", type=float, default=3.0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--head-lr", type=float, default=1e-2)
    p.add_argument("--w-lr", type=float, default=3e-3)
    p.add_argument("--alpha-lr", type=float, default=0.1)
    p.add_argument("--max-train-samples", type=int, default=4000)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--optuna-trials", type=int, default=3)
    p.add_argument("--min-steps", type=int, default=300, help="small tasks train for at least this many steps")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--threads", type=int, default=2, help="CPU threads per worker")
    p.add_argument("--time-limit", type=float, default=0, help="stop launching runs after this many seconds")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--keep-weights", action="store_true", help="keep delta.safetensors and search.pt of every run")
    args = p.parse_args(argv)
    args.tasks = args.tasks.split(",")
    args.budgets = args.budgets.split(",")
    args.methods = args.methods.split(",")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    args.machine = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    if not args.report_only:
        todo = [j for j in jobs(args) if not (job_dir(out, j["task"], j["method"], j["budget"], j["seed"])
                                              / "result.json").exists()]
        # Long tasks first so that the tail of the grid is short.
        weight = {"sst2": 0, "cola": 1, "stsb": 2, "mrpc": 3, "rte": 4, "cb": 5}
        todo.sort(key=lambda j: (j["seed"], weight.get(j["task"], 9), j["method"]))
        print(f"{len(todo)} runs to do", flush=True)
        t0 = time.time()
        ad = vars(args)
        import multiprocessing as mp

        with ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn")) as ex:
            pending = set()
            it = iter(todo)
            done = 0
            while True:
                while len(pending) < args.workers:
                    if args.time_limit and time.time() - t0 > args.time_limit:
                        break
                    j = next(it, None)
                    if j is None:
                        break
                    pending.add(ex.submit(run_job, j, ad))
                if not pending:
                    break
                fin, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in fin:
                    r = f.result()
                    done += 1
                    print(f"[{time.time() - t0:6.0f}s] {done} {r['task']}/{r['method']}/{r['budget']}/s{r['seed']}: "
                          f"{r['status']} {r.get('test', r.get('error', ''))}", flush=True)
    print(report(out, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
