"""Quality benchmark: does the searched structure beat hand-picked PET at the same budget?

Runs a grid of (task, method, budget, seed) on one machine, several runs at a time (the model
is small, so several processes share one GPU), with the recipe HF + peft users run (below).
Every method picks its learning rate on the validation split from a grid of the same size
(``--lr-grid``: multipliers of each kind's known-good rate) on the ``--lr-seeds``; its other
seeds then run at the chosen rate. The grid resumes: a run whose ``result.json`` exists is
skipped, ``--time-limit`` stops launching new runs in time, and ``--merge DIR|TAR`` brings in
the runs of another call's output. Then it writes every run to ``results.json``, a markdown
table (task x method per budget, mean +- std over seeds, the six-task average), the paired
difference of every two methods over (task, seed) with a 95% bootstrap interval and win/loss
counts, and a plot of score against trainable parameters.

    python benchmarks/quality.py --model PATH --data-dir DIR --out results/quality \\
        [--tasks rte,mrpc,cola,stsb,sst2,cb] [--budgets 0.01%,0.1%,1%] [--methods ...] \\
        [--seeds 0,1,2] [--small-seeds 0,1,2,3,4] [--lr-grid 0.5,1,2] [--lr-seeds 0] \\
        [--workers 12] [--time-limit 540] [--merge OTHER_OUT] [--report-only]

Recipe (the reference of HF transformers + peft users): whole training sets, batch 32, AdamW
without weight decay, linear schedule with 6% warm-up, gradient clip 1.0, bf16 autocast on the
GPU, 10 epochs (CB 20, SST-2 2), max length 256 for RTE and CB and 128 otherwise, validation
after every epoch, test at the best validation epoch; the model's own pooler and classifier.

Methods: ``s3pet`` (the default search recipe, ``SearchConfig()``, in the s3pet-m space; runs
before 2026-12-02 named it ``s3pet-m``, and ``merge`` renames them) / ``unified`` (the same in the
unified space), then retrain the derived structure; ``random`` (a random structure of s3pet-m,
a different one per seed), ``lora``,
``lora-all``, ``adapter``, ``bitfit``, ``lnfit`` (hand-designed, sized to the budget), ``full``
(every weight), ``optuna`` (Optuna/TPE over s3pet-m, ``--optuna-trials`` retrains), and the
references run through peft itself: ``peft-lora-r8-qv``, ``peft-lora-all-r1`` (fixed shapes)
and ``adalora`` (sized to the budget). Search ablations (``ABLATIONS``: s3pet with search
options changed, e.g. ``s3pet-warmup``, ``s3pet-det``), other selection rules of their searches
(``DERIVED``: ``s3pet-last``, ``s3pet-det-loss``, ...: retrains only) and the newer kinds alone
(``KIND_BASELINES``: ``prefix``, ``compacter``, ``fact``, ... each as large as the budget allows)
run only when named.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tarfile
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

TASKS = ("rte", "mrpc", "cola", "stsb", "sst2", "cb")
SMALL = ("rte", "cb")  # the tasks whose scores swing most between seeds: more seeds
BUDGETS = ("0.01%", "0.1%", "1%")
#: search ablations: ``s3pet`` (the s3pet-m space, the default recipe) with SearchConfig overrides
#: (``epochs_factor`` multiplies the search length); paired with s3pet on the same seeds.
ABLATIONS = {
    "s3pet-warmup": {"warmup_epochs": 1.0},  # PET weights and head first, gates fixed
    "s3pet-sens-init": {"warmup_epochs": 1.0, "alpha_init": "sensitivity"},  # alpha from |z dL/dz|
    "s3pet-sens-select": {"warmup_epochs": 1.0, "selector": "sensitivity"},  # the score alone, no search
    "s3pet-anneal": {"temperature_final": 0.1},  # concrete temperature 1 -> 0.1
    "s3pet-hard-concrete": {"gates": "hard-concrete"},  # exact 0/1 gates
    "s3pet-deterministic": {"warmup_epochs": 1.0, "gates": "deterministic"},  # z = p after the warm-up
    "s3pet-det": {"gates": "deterministic"},  # z = p from the start: no gate noise on the supernet's outputs
    "s3pet-accum4": {"alpha_accum": 4},  # 4 D_alpha batches per alpha step
    "s3pet-restarts3": {"restarts": 3},  # 3 searches averaged ...
    "s3pet-long3": {"epochs_factor": 3.0},  # ... against one search 3x as long
    "s3pet-second": {"order": "second", "epochs_factor": 1 / 2.8},  # equal wall time: 2.8x per step (benchmarks.md)
    "s3pet-kindlr": {"kind_lr_scale": 3.0},  # each kind at 3x its retrain rate (LoRA 1.5e-3, others 3e-3)
    "s3pet-alpha2": {"alpha_every": 2},  # an alpha step every 2nd step: 1.5 passes a step instead of 2
    "s3pet-recipe": {"warmup_epochs": 1.0, "alpha_init": "sensitivity", "temperature_final": 0.1, "alpha_accum": 4},
}
DEFAULT_METHODS = ("s3pet", "unified", "random", "lora", "lora-all", "adapter", "bitfit", "lnfit", "full",
                   "optuna", "peft-lora-r8-qv", "peft-lora-all-r1", "adalora")
#: the newer kinds alone, each as large as the budget allows (s3pet.baselines.KIND_METHODS):
#: hand-designed rows, run only when named
KIND_BASELINES = ("ia3", "lowrank_adapter", "parallel_adapter", "adapterbias", "kronecker", "sparse_lora",
                  "compacter", "fact", "prefix")
#: other selection rules of a search method's own searches (no search of their own: each seed's
#: retrain takes the parent's structure-<rule>.json, so the pair differs only in the rule)
DERIVED = {"s3pet-last": ("s3pet", "last"), "s3pet-loss": ("s3pet", "loss"),
           "s3pet-kindlr-last": ("s3pet-kindlr", "last"), "s3pet-kindlr-loss": ("s3pet-kindlr", "loss"),
           "s3pet-det-last": ("s3pet-det", "last"), "s3pet-det-loss": ("s3pet-det", "loss")}
METHODS = DEFAULT_METHODS + tuple(ABLATIONS) + tuple(DERIVED) + KIND_BASELINES  # all but the defaults: when named
SEARCH_METHODS = ("s3pet", "unified") + tuple(ABLATIONS)
SPACES = {"s3pet": "s3pet-m", "unified": "unified"}  # the space each search method searches (ablations: s3pet's)
RENAMED = {"s3pet-m": "s3pet"}  # method names of older runs
FIXED_SHAPE = ("full", "peft-lora-r8-qv", "peft-lora-all-r1")  # budget-independent: one row in every table
#: epochs and max length per task, as the reference recipe sets them
RECIPE = {"rte": (10, 256), "mrpc": (10, 128), "cola": (10, 128), "stsb": (10, 128), "sst2": (2, 128),
          "cb": (20, 256)}
DEFAULT_RECIPE = (10, 128)


def budget_key(method: str, budget: str) -> str:
    return "-" if method in FIXED_SHAPE else budget


def run_dir(out: Path, task: str, method: str, budget: str, seed: int, scale: float) -> Path:
    b = "all" if budget == "-" else budget.replace("%", "pct")
    return out / "runs" / task / method / b / f"seed{seed}" / f"lr{scale:g}"


def seeds_for(args, task: str) -> list[int]:
    return args.small_seeds if task in SMALL else args.seeds


def cells(args) -> list[tuple[str, str, str]]:
    """Every (task, method, budget) of the grid; fixed-shape methods once."""
    out = []
    for task in args.tasks:
        for method in args.methods:
            for budget in sorted({budget_key(method, b) for b in args.budgets}, key=args.budgets_order):
                out.append((task, method, budget))
    return out


def read_result(d: Path) -> dict | None:
    p = d / "result.json"
    return json.loads(p.read_text()) if p.is_file() else None


def chosen_scale(out: Path, args, task: str, method: str, budget: str) -> float | None:
    """The lr multiplier with the best mean validation over the lr seeds; None until they all ran."""
    means = {}
    for scale in args.lr_grid:
        rs = [read_result(run_dir(out, task, method, budget, s, scale)) for s in args.lr_seeds]
        if any(r is None for r in rs):
            return None
        ok = [r["validation"] for r in rs if r.get("status") == "ok" and _finite(r.get("validation"))]
        means[scale] = statistics.mean(ok) if len(ok) == len(rs) else -math.inf
    best = max(means.values())
    return min((s for s, v in means.items() if v == best), key=lambda s: abs(math.log(s)))  # ties: closest to 1


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


SEARCHED = SEARCH_METHODS + ("optuna",)  # methods whose runs retrain a structure found first


def search_state(out: Path, task: str, method: str, budget: str, seed: int) -> str | None:
    """None for methods without a search; else "done", "failed" or "todo" for that seed's search.
    A derived method's is its parent's: "wait" while the parent's search is to do, "stale" when it
    ended before searches wrote the other rules' structures."""
    if method in DERIVED:
        parent, rule = DERIVED[method]
        state = search_state(out, task, parent, budget, seed)
        if state != "done":
            return "wait" if state == "todo" else state
        alt = run_dir(out, task, parent, budget, seed, 1.0).parent / "search" / f"structure-{rule}.json"
        return "done" if alt.is_file() else "stale"
    if method not in SEARCHED:
        return None
    base = run_dir(out, task, method, budget, seed, 1.0).parent
    found = base / ("optuna/best_structure.json" if method == "optuna" else "search/structure.json")
    if found.is_file():
        return "done"
    return "failed" if (base / "search-failed.json").is_file() else "todo"


def pending_jobs(out: Path, args) -> list[dict]:
    """Runs not done yet whose inputs are ready: the lr sweep first, then the other seeds at the chosen rate.

    A search method's seed first gets a search job of its own (``scales`` empty, ``search`` true; it
    does not wait for the learning rate, which only the retrains use), then one retrain job per rate,
    so that no job is longer than one search or one training and the retrains run side by side."""
    todo = []
    for task, method, budget in cells(args):
        sweep = [s for s in seeds_for(args, task) if s in args.lr_seeds] or args.lr_seeds
        scale = chosen_scale(out, args, task, method, budget)
        for seed in dict.fromkeys(sweep + seeds_for(args, task)):
            if seed in sweep:
                missing = [sc for sc in args.lr_grid if read_result(run_dir(out, task, method, budget, seed, sc)) is None]
            elif scale is None:
                missing = [None]  # a run will be needed once the rate is chosen
            else:
                missing = [] if read_result(run_dir(out, task, method, budget, seed, scale)) else [scale]
            if not missing:
                continue
            job = {"task": task, "method": method, "budget": budget, "seed": seed}
            state = search_state(out, task, method, budget, seed)
            if state == "todo":
                todo.append({**job, "scales": [], "search": True})
                continue
            if state in ("wait", "stale"):  # a derived method: its parent searches (or searched too early)
                continue
            todo += [{**job, "scales": [sc]} for sc in missing if sc is not None]
    return todo


def recipe(args, task: str) -> tuple[float, int]:
    """(epochs, max length) of a task: the reference recipe's unless overridden."""
    epochs, max_len = RECIPE.get(task, DEFAULT_RECIPE)
    return float(args.epochs or epochs), args.max_length or max_len


#: official training-set sizes after the splits (SST-2: 2,000 held out), to estimate run lengths
TRAIN_SIZES = {"rte": 2490, "mrpc": 3668, "cola": 8551, "stsb": 5749, "sst2": 65349, "cb": 250}


def job_steps(args, job: dict) -> int:
    """Optimizer steps a job will take: its trainings' or, for a search job, its search's (over
    D_w, half the training set: alpha steps ride along; restarts and warm-up count)."""
    epochs, _ = recipe(args, job["task"])
    n = TRAIN_SIZES.get(job["task"], 10_000)
    if args.max_train_samples:
        n = min(n, args.max_train_samples)
    if not job.get("search"):
        return int(len(job["scales"]) * epochs * math.ceil(n / 32))
    if job["method"] == "optuna":  # its trials are trainings
        return int(args.optuna_trials * epochs * math.ceil(n / 32))
    over = ABLATIONS.get(job["method"], {})
    runs = over.get("epochs_factor", 1.0) * over.get("restarts", 1) * (0.0 if over.get("selector") else 1.0)
    runs += over.get("warmup_epochs", 0.0) / max(epochs, 1.0)
    return int(runs * epochs * math.ceil(math.ceil(n / 2) / 32))


def train_config(args, task: str, seed: int, scale: float):
    from s3pet.train import TrainConfig

    epochs, max_len = recipe(args, task)
    return TrainConfig(epochs=epochs, batch_size=32, lr=0.0, head_lr=0.0, lr_scale=scale, seed=seed,
                       max_train_samples=args.max_train_samples, max_length=max_len, progress=False,
                       eval_every=0, patience=0, compile=args.compile, pooling=args.pooling)


def search_config(args, method: str, task: str, seed: int):
    """The SearchConfig of a search method: the grid's settings, then the ablation's overrides."""
    from s3pet.search import SearchConfig

    epochs, max_len = recipe(args, task)
    over = dict(ABLATIONS.get(method, {}))
    factor = over.pop("epochs_factor", 1.0)
    return SearchConfig(**{"epochs": float(args.search_epochs or epochs) * factor, "batch_size": 32,
                           "seed": seed, **{k: v for k, v in (("w_lr", args.w_lr), ("alpha_lr", args.alpha_lr))
                                            if v is not None},
                           "max_train_samples": args.max_train_samples, "max_length": max_len, "progress": False,
                           "compile": args.compile, "pooling": args.pooling, **over})


def _search(args, task: str, space: str, budget: str, out: Path, cfg) -> dict:
    """One search into ``out``, resumed from its checkpoint when an earlier call was cut off at
    its time limit (a search longer than a call, SST-2's, ends over several calls)."""
    from s3pet.errors import S3petError
    from s3pet.pipeline import search

    if (out / "search.pt").is_file():
        try:
            return search(args.model, task, space, budget, out, cfg, data_dir=args.data_dir, resume=True)
        except S3petError as e:  # another recipe's or an unreadable checkpoint: start afresh
            print(f"{out}: not resumed ({e}); searching afresh", flush=True)
    return search(args.model, task, space, budget, out, cfg, data_dir=args.data_dir, overwrite=True)


def run_job(job: dict, args_dict: dict) -> list[dict]:
    """One (task, method, budget, seed) in a worker process: the search (if any) once, then one
    training per lr multiplier in ``job['scales']``; each writes its result.json."""
    import torch
    import transformers

    from s3pet.pipeline import baseline, retrain, search

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    args = argparse.Namespace(**args_dict)
    torch.set_num_threads(max(1, args.threads))
    task, method, budget, seed = job["task"], job["method"], job["budget"], job["seed"]
    base = run_dir(Path(args.out), task, method, budget, seed, 1.0).parent
    base.mkdir(parents=True, exist_ok=True)
    recs, structure, search_cost, err = [], None, None, None
    failed = base / "search-failed.json"
    try:
        if failed.is_file():  # an earlier search job of this seed failed: its retrains fail with it
            raise RuntimeError(json.loads(failed.read_text())["error"])
        if method in DERIVED:  # the parent's search, another rule's structure
            parent, rule = DERIVED[method]
            pbase = run_dir(Path(args.out), task, parent, budget, seed, 1.0).parent
            if (pbase / "search-failed.json").is_file():
                raise RuntimeError(json.loads((pbase / "search-failed.json").read_text())["error"])
            structure = pbase / "search" / f"structure-{rule}.json"
            search_cost = json.loads((pbase / "search" / "metrics.json").read_text())["cost"]
        elif method in SEARCH_METHODS:
            scfg = search_config(args, method, task, seed)
            space = SPACES.get(method, SPACES["s3pet"])
            if not (base / "search" / "structure.json").is_file():
                sm = _search(args, task, space, budget, base / "search", scfg)
            else:
                sm = json.loads((base / "search" / "metrics.json").read_text())
            structure, search_cost = base / "search" / "structure.json", sm["cost"]
        elif method == "optuna":
            from s3pet.optuna_search import optuna_search

            if not (base / "optuna" / "best_structure.json").is_file():
                om = optuna_search(args.model, task, "s3pet-m", budget, base / "optuna", args.optuna_trials,
                                   cfg=train_config(args, task, seed, 1.0), data_dir=args.data_dir, seed=seed,
                                   pruner="none")
                (base / "optuna" / "cost.json").write_text(json.dumps(om.get("cost", {})))
            structure = base / "optuna" / "best_structure.json"
            search_cost = json.loads((base / "optuna" / "cost.json").read_text())
    except Exception as e:  # the search failed: every lr run of this job fails with it
        err = e
    if job.get("search"):  # a search job: the retrains are jobs of their own
        if err is not None and not failed.is_file():
            failed.write_text(json.dumps({"error": f"{type(err).__name__}: {err}",
                                          "trace": traceback.format_exc()[-2000:]}))
        if not args.keep_weights:
            for f in base.glob("*/search.pt"):
                f.unlink()
        rec = {"task": task, "method": method, "budget": budget, "seed": seed, "search": True,
               "status": "failed" if err is not None else "ok", "error": str(err) if err else ""}
        if err is None and method in SEARCH_METHODS:
            rec.update(seconds=search_cost.get("seconds"), steps=sm.get("steps"))
        return [rec]
    for scale in job["scales"]:
        d = run_dir(Path(args.out), task, method, budget, seed, scale)
        rec = {"task": task, "method": method, "budget": budget, "seed": seed, "lr_scale": scale}
        t1 = time.perf_counter()
        try:
            if err is not None:
                raise err
            tcfg = train_config(args, task, seed, scale)
            if structure is not None:
                m = retrain(structure, task, d / "train", tcfg, model=args.model, data_dir=args.data_dir,
                            overwrite=True)
                rec["search_cost"] = search_cost
            else:
                m = baseline(method, None if budget == "-" else budget, task, d / "train", tcfg, model=args.model,
                             data_dir=args.data_dir, overwrite=True)
            rates = m.get("learning_rates", {})
            rec.update(status="ok", main_metric=m["main_metric"], validation=m["validation"]["main"],
                       test=m["test"]["main"], test_all=m["test"], params=m["params"], retrain_cost=m["cost"],
                       learning_rates=rates, lr=max((v for k, v in rates.items() if k != "head"), default=None),
                       best_step=m.get("best_step"), steps=m.get("steps"))
        except Exception as e:  # record and go on: one failed run must not stop the grid
            rec.update(status="failed", error=f"{type(e).__name__}: {e}", trace=traceback.format_exc()[-2000:])
        rec["seconds"] = round(time.perf_counter() - t1, 2)
        if not args.keep_weights:  # the grid needs the numbers, not hundreds of weight files
            for f in list(d.rglob("*.safetensors")) + list(d.rglob("*.pt")) + list(d.rglob("*.bin")):
                f.unlink()
        d.mkdir(parents=True, exist_ok=True)
        (d / "result.json").write_text(json.dumps(rec, indent=2, sort_keys=True, default=str))
        recs.append(rec)
    if not args.keep_weights:
        for f in base.glob("*/search.pt"):
            f.unlink()
    return recs


# --------------------------------------------------------------------------- results

def collect(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/*/*/seed*/lr*/result.json"))]


def final_runs(out: Path, args, recs: list[dict]) -> list[dict]:
    """One run per (task, method, budget, seed): the one at the chosen lr multiplier."""
    by = {(r["task"], r["method"], r["budget"], r["seed"], r["lr_scale"]): r for r in recs}
    out_runs = []
    for task, method, budget in cells(args):
        scale = chosen_scale(out, args, task, method, budget)
        if scale is None:
            continue
        for seed in seeds_for(args, task):
            r = by.get((task, method, budget, seed, scale))
            if r is not None:
                out_runs.append({**r, "lr_grid": list(args.lr_grid), "lr_chosen_on_seeds": list(args.lr_seeds)})
    return out_runs


def _fmt(xs: list[float]) -> str:
    if not xs:
        return "–"
    if len(xs) == 1:
        return f"{100 * xs[0]:.1f} (1)"
    return f"{100 * statistics.mean(xs):.1f} ± {100 * statistics.stdev(xs):.1f} ({len(xs)})"


#: the reference script's method names for the methods of the same shape here
ANCHOR_NAMES = {"full": "full", "lora": "lora_qv_r2", "bitfit": "bitfit", "lnfit": "lnfit",
                "peft-lora-r8-qv": "lora", "peft-lora-all-r1": "lora_all_r1"}


def anchor_table(runs: list[dict], tasks: list[str], path: Path, budget: str = "0.1%") -> list[str]:
    """Markdown rows: each method here against the HF + peft reference of the same shape
    (``path``: the reference script's JSON lines, scores x100), task by task."""
    ref: dict = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if "test" in r:
            ref.setdefault((r["method"], r["task"]), []).append(r["test"] / 100)
    lines = ["| method (reference) | " + " | ".join(tasks) + " | average | reference average | difference |",
             "|---|" + "---|" * (len(tasks) + 3)]
    for meth, name in ANCHOR_NAMES.items():
        rs = [r for r in runs if r["method"] == meth and r["budget"] == budget_key(meth, budget) and r["status"] == "ok"]
        if not rs or not all((name, t) in ref for t in tasks):
            continue
        ours = task_average(rs, tasks)
        theirs = statistics.mean(statistics.mean(ref[(name, t)]) for t in tasks)
        cells_ = [f"{100 * statistics.mean([r['test'] for r in rs if r['task'] == t]):.1f} / "
                  f"{100 * statistics.mean(ref[(name, t)]):.1f}" if any(r["task"] == t for r in rs) else "–"
                  for t in tasks]
        lines.append(f"| {meth} ({name}) | " + " | ".join(cells_) + f" | {100 * ours:.1f} | {100 * theirs:.1f} | "
                     f"{100 * (ours - theirs):+.1f} |")
    return lines


def budget_methods(runs: list[dict], budget: str, methods: list[str]) -> dict[str, list[dict]]:
    """The runs of each method in the table of ``budget`` (fixed-shape methods in every table)."""
    return {m: [r for r in runs if r["method"] == m and r["budget"] == budget_key(m, budget) and r["status"] == "ok"]
            for m in methods}


def task_average(rs: list[dict], tasks: list[str]) -> float:
    means = [statistics.mean([r["test"] for r in rs if r["task"] == t]) for t in tasks if any(r["task"] == t for r in rs)]
    return statistics.mean(means) if len(means) == len(tasks) else float("nan")


def paired_table(by_method: dict[str, list[dict]], tasks: list[str]) -> list[str]:
    """Markdown rows: each method against every other, paired over (task, seed)."""
    from s3pet.stats import pair_up, paired_difference

    scores = {m: {(r["task"], r["seed"]): r["test"] for r in rs if r["task"] in tasks} for m, rs in by_method.items()}
    names = [m for m, s in scores.items() if {t for t, _ in s} == set(tasks)]
    lines = ["| A | B | A - B (x100) | 95% interval | wins / losses / ties | pairs (fewest per task) |",
             "|---|---|---|---|---|---|"]
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            d = pair_up(scores[a], scores[b])
            if set(d) != set(tasks):
                continue
            p = paired_difference(d)
            diff = f"{100 * p.mean:+.2f}"
            if (p.low > 0 or p.high < 0) and p.min_pairs >= 2:  # excludes 0, every task with seeds to resample
                diff = f"**{diff}**"
            lines.append(f"| {a} | {b} | {diff} | [{100 * p.low:+.2f}, {100 * p.high:+.2f}] | "
                         f"{p.wins} / {p.losses} / {p.ties} | {p.pairs} ({p.min_pairs}) |")
    return lines


def report(out: Path, args) -> str:
    """results.json, results.md and quality.png from every finished run."""
    allrecs = collect(out)
    runs = final_runs(out, args, allrecs)
    failed = [r for r in allrecs if r.get("status") != "ok"]
    machines = sorted({r["retrain_cost"].get("machine", "?") for r in allrecs if r.get("status") == "ok"})
    if machines:  # the machine the runs ran on, not the one writing the report
        args.machine = ", ".join(machines)
    (out / "results.json").write_text(json.dumps({
        "runs": runs, "lr_sweep": [r for r in allrecs if r.get("seed") in args.lr_seeds],
        "machine": args.machine, "command": " ".join(sys.argv), "protocol": {
            "lr_grid": args.lr_grid, "lr_seeds": args.lr_seeds, "seeds": args.seeds, "small_seeds": args.small_seeds,
            "small_tasks": list(SMALL), "recipe": {t: {"epochs": e, "max_length": m} for t, (e, m) in RECIPE.items()},
            "pooling": args.pooling}}, indent=2, default=str))
    tasks = [t for t in args.tasks if any(r["task"] == t for r in runs)]
    lines = [f"Model {args.model_name}; test metric x100 (mean ± std over seeds; {len(args.seeds)} seeds, "
             f"{len(args.small_seeds)} on {', '.join(SMALL)}); learning rate chosen on validation from "
             f"{len(args.lr_grid)} multipliers ({', '.join(f'{s:g}' for s in args.lr_grid)}) of each kind's rate; "
             f"machine: {args.machine}.", ""]
    for budget in args.budgets:
        by_method = budget_methods(runs, budget, [m for m in args.methods])
        by_method = {m: rs for m, rs in by_method.items() if rs}
        if not any(m not in FIXED_SHAPE for m in by_method):
            continue
        lines += [f"### Budget {budget} of the backbone", "",
                  "| method | " + " | ".join(tasks) + " | average | PET params | lr x | search s | train s |",
                  "|---|" + "---|" * (len(tasks) + 5)]
        for meth, rs in by_method.items():
            cells_ = [_fmt([r["test"] for r in rs if r["task"] == t]) for t in tasks]
            avg = task_average(rs, tasks)
            params = statistics.mean(r["params"]["pet"] for r in rs)
            scales = sorted({r["lr_scale"] for r in rs})
            ss = [r["search_cost"].get("seconds", 0) for r in rs if r.get("search_cost")]
            rsec = statistics.mean(r["retrain_cost"]["seconds"] for r in rs)
            avg_s = "–" if math.isnan(avg) else f"{100 * avg:.1f}"  # a task missing: no average
            lines.append(f"| {meth} | " + " | ".join(cells_) + f" | {avg_s} | {params:,.0f} | "
                         + "/".join(f"{s:g}" for s in scales) + " | "
                         + (f"{statistics.mean(ss):.0f}" if ss else "–") + f" | {rsec:.0f} |")
        lines += ["", f"Paired differences at {budget} (test x100, difference of six-task averages; bold: the "
                      "95% interval excludes 0 and every task has 2+ seeds; a task with one seed adds no "
                      "variance, so such intervals are too narrow):", ""]
        lines += paired_table(by_method, tasks)
        lines.append("")
    if args.anchors:
        lines += [f"Against HF + peft run by the reference script ({Path(args.anchors).name}; cells: here / "
                  "reference, test x100, means over seeds):", ""]
        lines += anchor_table(runs, tasks, Path(args.anchors), args.budgets[0]) + [""]
    if failed:
        lines += [f"{len(failed)} runs failed: " + "; ".join(f"{r['task']}/{r['method']}/{r['budget']}/{r['seed']}: "
                                                            f"{r.get('error', '')[:120]}" for r in failed[:10]), ""]
    md = "\n".join(lines)
    (out / "results.md").write_text(md)
    _plot(runs, tasks, args.methods, args.budgets, out / "quality.png")
    return md


def _plot(runs, tasks, methods, budgets, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in runs if r["status"] == "ok"]
    if not ok:
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    markers = "os^vDP*Xh<>dp"
    for i, meth in enumerate(methods):
        xs, ys = [], []
        for b in sorted({budget_key(meth, b) for b in budgets}):
            rs = [r for r in ok if r["method"] == meth and r["budget"] == b]
            avg = task_average(rs, tasks)
            if rs and not math.isnan(avg):
                xs.append(statistics.mean(r["params"]["pet"] for r in rs))
                ys.append(100 * avg)
        if xs:
            order = sorted(range(len(xs)), key=lambda k: xs[k])
            ax.plot([xs[k] for k in order], [ys[k] for k in order], marker=markers[i % len(markers)], label=meth,
                    linestyle="-" if len(xs) > 1 else "none")
    ax.set_xscale("log")
    ax.set_xlabel("trainable PET parameters (log; head not counted)")
    ax.set_ylabel(f"test score x100, mean over {len(tasks)} tasks")
    ax.set_title("Score vs trainable parameters")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=150)


# --------------------------------------------------------------------------- merging calls

def _ckpt_step(d: Path) -> int:
    """How far a cut-off search got: the last step in its history (-1 without a checkpoint)."""
    if not (d / "search.pt").is_file():
        return -1
    try:
        last = (d / "history.jsonl").read_text().strip().splitlines()[-1]
        return int(json.loads(last).get("step", 0))
    except (OSError, IndexError, ValueError):
        return 0


def _renamed(rel: Path) -> Path:
    """``runs/TASK/METHOD/...`` with an older method name replaced by its current one."""
    parts = list(rel.parts)
    parts[2] = RENAMED.get(parts[2], parts[2])
    return Path(*parts)


def merge(out: Path, source: Path) -> int:
    """Copy into ``out`` every finished run of ``source`` (an output folder or a .tar.gz of one)
    that ``out`` lacks; returns how many were copied. Runs present in both are kept as they are."""
    tmp = None
    if source.is_file():
        tmp = out / ".merge-tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        with tarfile.open(source) as tf:
            tf.extractall(tmp, filter="data")
        roots = [p.parent for p in tmp.rglob("runs") if p.is_dir()]
        source = min(roots, key=lambda p: len(p.parts)) if roots else tmp
    n = 0
    for res in sorted((source / "runs").glob("*/*/*/seed*/lr*/result.json")):
        rel = _renamed(res.parent.relative_to(source))
        if not (out / rel / "result.json").exists():
            shutil.copytree(res.parent, out / rel, dirs_exist_ok=True)
            rec = json.loads((out / rel / "result.json").read_text())
            if rec.get("method") in RENAMED:
                rec["method"] = RENAMED[rec["method"]]
                (out / rel / "result.json").write_text(json.dumps(rec, indent=2, sort_keys=True, default=str))
            n += 1
    for srch in sorted((source / "runs").glob("*/*/*/seed*/*/structure.json")):  # finished searches
        rel = _renamed(srch.parent.relative_to(source))
        if not (out / rel / "structure.json").exists():
            shutil.copytree(srch.parent, out / rel, dirs_exist_ok=True)
    for ckpt in sorted((source / "runs").glob("*/*/*/seed*/search/search.pt")):  # searches cut off: resumable
        rel = _renamed(ckpt.parent.relative_to(source))
        if not (ckpt.parent / "structure.json").exists() and not (out / rel / "structure.json").exists() \
                and _ckpt_step(ckpt.parent) > _ckpt_step(out / rel):
            shutil.rmtree(out / rel, ignore_errors=True)
            shutil.copytree(ckpt.parent, out / rel)
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)
    return n


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--model-name", default="all-MiniLM-L6-v2 (real weights, fp16 copy upcast to fp32)")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--budgets", default=",".join(BUDGETS), help="run in this order (the first named first)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="also: " + ", ".join(ABLATIONS))
    p.add_argument("--seeds", default="0,1,2", help="seeds of every task but the small ones")
    p.add_argument("--small-seeds", default="0,1,2,3,4", help=f"seeds of {', '.join(SMALL)}")
    p.add_argument("--lr-grid", default="0.5,1,2", help="multipliers of each kind's known-good learning rate")
    p.add_argument("--lr-seeds", default="0", help="seeds on which the learning rate is chosen (validation)")
    p.add_argument("--pooling", default="auto", choices=["auto", "pooler", "mean"])
    p.add_argument("--compile", default="off", choices=["off", "auto", "on"],
                   help="torch.compile of searches and trainings (off: every committed run; auto: the library's "
                        "rule, on a GPU for runs of 2,000+ steps)")
    p.add_argument("--search-epochs", type=float, default=0, help="0 = as many as the retrain")
    p.add_argument("--w-lr", type=float, default=None, help="the search's PET rate (default: SearchConfig's)")
    p.add_argument("--alpha-lr", type=float, default=None, help="the search's gate-logit rate (default: SearchConfig's)")
    p.add_argument("--max-train-samples", type=int, default=0, help="0 = whole training sets")
    p.add_argument("--max-length", type=int, default=0, help="0 = the recipe's per task")
    p.add_argument("--epochs", type=float, default=0, help="0 = the recipe's per task")
    p.add_argument("--optuna-trials", type=int, default=3)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="CPU threads per worker")
    p.add_argument("--time-limit", type=float, default=0,
                   help="seconds: launch only runs expected to end within it (0 = no limit)")
    p.add_argument("--seconds-per-step", type=float, default=0.045, help="first guess of a worker's step time")
    p.add_argument("--seconds-per-search-step", type=float, default=0.3,
                   help="first guess of a search step's (15 searches sharing one H200 took 0.27-0.3 s)")
    p.add_argument("--merge", action="append", default=[], help="another call's output folder or .tar.gz")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--anchors", default=None, help="the reference script's JSON lines: compare shape by shape")
    p.add_argument("--keep-weights", action="store_true", help="keep delta.safetensors and search.pt of every run")
    args = p.parse_args(argv)
    args.tasks = args.tasks.split(",")
    args.budgets = args.budgets.split(",")
    args.methods = args.methods.split(",")
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        p.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    # a derived method needs its parent's searches (and is compared with its retrains)
    args.methods = list(dict.fromkeys(m for x in args.methods for m in ((DERIVED[x][0], x) if x in DERIVED else (x,))))
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.small_seeds = [int(s) for s in args.small_seeds.split(",")]
    args.lr_grid = [float(s) for s in args.lr_grid.split(",")]
    args.lr_seeds = [int(s) for s in args.lr_seeds.split(",")]
    order = {b: i for i, b in enumerate(["-"] + args.budgets)}
    args.budgets_order = lambda b: order.get(b, 99)
    return args


def main(argv=None) -> int:
    args = parse(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for src in args.merge:
        print(f"merged {merge(out, Path(src))} runs from {src}", flush=True)
    import torch

    args.machine = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    if not args.report_only:
        run_grid(out, args)
    print(report(out, args))
    return 0


def fits(args, job: dict, per_step: float, left: float) -> bool:
    """Whether a job should start with ``left`` seconds to go: it ends in time (30% margin for
    loading and evaluation), or it is a search longer than a whole call, which can only end by
    running until the limit and resuming from its last checkpoint in the next call."""
    need = 1.3 * job_steps(args, job) * per_step
    if need < left:
        return True
    return bool(job.get("search") and job["method"] in SEARCH_METHODS and args.time_limit
                and need > args.time_limit and left > 0.5 * args.time_limit)


def _key(job: dict, scale) -> tuple:
    return job["task"], job["method"], job["budget"], job["seed"], scale


def run_grid(out: Path, args) -> None:
    import multiprocessing as mp

    weight = {"sst2": 0, "cola": 1, "stsb": 2, "mrpc": 3, "rte": 4, "cb": 5}  # long tasks first: a short tail
    t0 = time.time()
    ad = {k: v for k, v in vars(args).items() if k != "budgets_order"}
    running: dict = {}
    # Seconds per optimizer step of one worker while the GPU is shared, measured as runs finish
    # (the first guess is what 14 workers on one H200 gave; a search counts its length and restarts): with --time-limit a job starts only
    # if it should end in time, so that no run is killed half-way.
    per_step, seen = {False: args.seconds_per_step, True: args.seconds_per_search_step}, {False: [], True: []}
    with ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn")) as ex:
        while True:
            left = args.time_limit - (time.time() - t0) if args.time_limit else math.inf
            busy = {_key(j, scale) for j in running.values() for scale in (j["scales"] or ["search"])}
            todo = [j for j in pending_jobs(out, args)
                    if not any(_key(j, scale) in busy for scale in (j["scales"] or ["search"]))]
            todo = [j for j in todo if fits(args, j, per_step[bool(j.get("search"))], left)]
            # budgets in the order named; searches first (their retrains wait for them), then the lr
            # sweeps, long tasks first
            todo.sort(key=lambda j: (args.budgets_order(j["budget"]), not j.get("search"),
                                     j["seed"] not in args.lr_seeds, weight.get(j["task"], 9), j["method"]))
            for j in todo[:max(0, args.workers - len(running))]:
                running[ex.submit(run_job, j, ad)] = j
            if not running:
                break
            left = args.time_limit - (time.time() - t0) if args.time_limit else None
            fin, _ = wait(list(running), timeout=None if left is None else max(left, 0) + 5,
                          return_when=FIRST_COMPLETED)
            if not fin:  # the time limit: stop the runs still going (searches resume next call)
                for j in running.values():
                    print(f"[{time.time() - t0:6.0f}s] {j['task']}/{j['method']}/{j['budget']}/s{j['seed']}: cut at "
                          "the time limit" + (" (resumes from its checkpoint)" if j.get("search") else ""), flush=True)
                for proc in list(getattr(ex, "_processes", {}).values()):
                    proc.kill()
                ex.shutdown(wait=False, cancel_futures=True)
                return
            for f in fin:
                running.pop(f)
                for r in f.result():
                    kind = bool(r.get("search"))
                    if r.get("status") == "ok" and r.get("steps") and r.get("seconds"):
                        seen[kind].append(r["seconds"] / r["steps"])
                        per_step[kind] = statistics.median(seen[kind])
                    if kind:
                        print(f"[{time.time() - t0:6.0f}s] {r['task']}/{r['method']}/{r['budget']}/s{r['seed']}/"
                              f"search: {r['status']} {r['error']}", flush=True)
                        continue
                    print(f"[{time.time() - t0:6.0f}s] {r['task']}/{r['method']}/{r['budget']}/s{r['seed']}/"
                          f"lr{r['lr_scale']:g}: {r['status']} {r.get('test', r.get('error', ''))}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
