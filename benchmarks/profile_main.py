"""Where the README's main job spends its time: ``s3pet run`` (search -> derive -> retrain ->
plot on the real all-MiniLM-L6-v2 weights, the offline defaults) run in this process under
nested wall-clock stage timers and cProfile.

    python benchmarks/profile_main.py [--out results/profile_main.json] [--md FILE]
        [--run-dir outputs/profile_main] [--threads N] [--no-cprofile] [--top 25]
        [--run-args "--max-steps 4"]

The job is ``s3pet.cli.main(["run", "--out", RUN_DIR, *RUN_ARGS])``: the command's own code
path and defaults. Before it starts, the functions the pipeline calls are wrapped for the
run (module and class attributes replaced, no file edited) so that each call is charged to a
stage: imports (s3pet's CLI and pipeline with torch and transformers), model load, data load,
tokenizer load, tokenisation, the search loop (alpha steps, w steps, validation, checkpoints,
history lines), derivation, retraining (train steps, validation, test), plots and output
writes. Stages nest; a stage's *self* time is its time outside its timed children, so the
self times (the "by activity" table) add up to the total wall time.

cProfile (wall clock) runs over the same span unless ``--no-cprofile``; it slows
Python-heavy code a little, so compare the totals of a run with and one without it. Its
functions are summarised three ways: self time by group (torch kernels, autograd engine,
torch and transformers Python, optimizer, tokenizer, plotting, imports, I/O; these add up
to the profiled time), the cumulative time of a few entry points (forward, backward,
optimizer step, clipping, PET hooks, tokenizer, savefig, torch.save, imports; these
overlap), and the top functions by cumulative and by self time. cProfile sees calls, not
Python operators: ``x + y`` or ``x @ w`` on tensors is charged to the self time of the
Python function that wrote it (so "s3pet Python" holds the PET modules' tensor arithmetic).

Output: ``--out`` (JSON: the machine — CPU model, cores, torch threads, load average before
and after —, the command, the stage tree, the self times by activity, the profile summaries,
the job's own summary.json figures, process CPU time and peak RSS) and ``--md`` (the same as
markdown tables, also printed last).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import functools
import json
import os
import platform
import pstats
import resource
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

T_START = time.perf_counter()  # before torch, transformers and s3pet are imported
_MISSING = object()


# ----------------------------------------------------------------------------- stage timers

class StageTimer:
    """Nested wall-clock stages.

    ``stage(name)`` opens a stage under the stages open at that moment; ``wrap`` replaces a
    function attribute so that every call runs inside a stage; ``restore`` undoes the wraps.
    ``records`` maps a stage path (a tuple of names) to its seconds and calls, in the order
    the paths were first entered.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self.open: list[str] = []
        self.records: dict[tuple[str, ...], dict] = {}
        self.self_labels: dict[str, str] = {}
        self._undo: list[tuple[object, str, object]] = []

    @contextlib.contextmanager
    def stage(self, name: str):
        if self.open and self.open[-1] == name:  # e.g. a writer calling a writer: one stage
            yield
            return
        self.open.append(name)
        rec = self.records.setdefault(tuple(self.open), {"seconds": 0.0, "calls": 0})
        t0 = self.clock()
        try:
            yield
        finally:
            rec["seconds"] += self.clock() - t0
            rec["calls"] += 1
            self.open.pop()

    def wrap(self, owner: object, attr: str, name: str | Callable[..., str], *, self_label: str | None = None,
             on_result: Callable[[object], None] | None = None) -> None:
        """Charge every call of ``owner.attr`` to stage ``name`` (or ``name(*args, **kwargs)``).

        Args:
            owner: a module or class whose attribute is replaced until ``restore``.
            self_label: what the stage's own time (outside its timed children) is called in
                the by-activity table (default: the stage name).
            on_result: called with each return value (e.g. to remember an object).
        """
        fn = getattr(owner, attr)
        if self_label and isinstance(name, str):
            self.self_labels[name] = self_label

        @functools.wraps(fn, updated=())  # updated=(): a wrapped class keeps its own __dict__
        def timed(*args, **kwargs):
            with self.stage(name(*args, **kwargs) if callable(name) else name):
                result = fn(*args, **kwargs)
            if on_result is not None:
                on_result(result)
            return result

        self._undo.append((owner, attr, vars(owner).get(attr, _MISSING)))
        setattr(owner, attr, timed)

    def restore(self) -> None:
        for owner, attr, old in reversed(self._undo):
            if old is _MISSING:
                delattr(owner, attr)
            else:
                setattr(owner, attr, old)
        self._undo.clear()


def stage_rows(records: dict[tuple[str, ...], dict], total: float) -> list[dict]:
    """The stage tree, parents before children (children in first-entry order): one row per
    stage path with its inclusive seconds, self seconds (outside its timed children), calls
    and share of ``total``; a last row holds the time outside every top-level stage."""
    children: dict[tuple[str, ...], list[tuple[str, ...]]] = {}
    for path in records:
        children.setdefault(path[:-1], []).append(path)
    rows: list[dict] = []

    def walk(parent: tuple[str, ...]) -> None:
        for path in children.get(parent, []):
            rec = records[path]
            inner = sum(records[c]["seconds"] for c in children.get(path, []))
            rows.append({"stage": path[-1], "path": " / ".join(path), "depth": len(path) - 1,
                         "seconds": rec["seconds"], "self_seconds": rec["seconds"] - inner, "calls": rec["calls"],
                         "share": rec["seconds"] / total if total else 0.0})
            walk(path)

    walk(())
    outside = total - sum(records[p]["seconds"] for p in children.get((), []))
    rows.append({"stage": "(outside the stages)", "path": "(outside the stages)", "depth": 0, "seconds": outside,
                 "self_seconds": outside, "calls": 1, "share": outside / total if total else 0.0})
    return rows


def activity_rows(rows: list[dict], self_labels: dict[str, str], total: float) -> list[dict]:
    """Self seconds summed by activity (a stage's self label, else its name) across the tree,
    largest first; they add up to ``total``."""
    acc: dict[str, list] = {}
    for r in rows:
        label = self_labels.get(r["stage"], r["stage"])
        a = acc.setdefault(label, [0.0, 0])
        a[0] += r["self_seconds"]
        a[1] += r["calls"]
    out = [{"activity": k, "seconds": s, "calls": n, "share": s / total if total else 0.0}
           for k, (s, n) in acc.items()]
    return sorted(out, key=lambda r: -r["seconds"])


def instrument(timer: StageTimer, pipeline) -> None:
    """Wrap the functions the main job calls (``pipeline`` is the imported s3pet.pipeline)."""
    from s3pet import history, plot, search, structure, supernet, train

    tests: set[int] = set()  # ids of the test splits, to tell test from validation in fit's evaluate

    w = timer.wrap
    w(pipeline, "search", "search", self_label="search setup (config, task model)")
    w(pipeline, "retrain", "retrain", self_label="retrain setup (structure, task model)")
    w(pipeline, "space_on_model", "space on model", self_label="space instantiation")
    w(pipeline, "load_backbone", "load model")
    w(pipeline, "prepare_task", "data", self_label="data (rest)")
    w(pipeline, "load_task", "load data")
    w(pipeline, "load_tokenizer", "load tokenizer")
    w(pipeline, "encode_task", "tokenise", on_result=lambda enc: tests.add(id(enc.test)))
    w(pipeline, "Supernet", "build supernet")
    w(pipeline, "run_search", "search loop", self_label="search loop (batching, logging)")
    w(search.BiLevel, "alpha_step", "alpha steps")
    w(search.BiLevel, "w_step", "w steps")
    w(search, "evaluate", "validation")
    w(search, "_save_checkpoint", "checkpoint")
    w(supernet.Supernet, "candidate_rows", "derive")
    w(supernet.Supernet, "derive_specs", "derive")
    w(structure, "from_specs", "derive")
    w(structure, "apply", "apply structure")
    w(pipeline, "fit", "train loop", self_label="train steps (forward, backward, optimizer, batching)")
    w(train, "evaluate", lambda model, split, *a, **k: "test" if id(split) in tests else "validation")
    w(history, "append_jsonl", "history lines")  # the one writer of history.jsonl, search and train
    w(pipeline, "write_json", "write outputs")
    w(pipeline, "write_alphas_csv", "write outputs")
    w(pipeline, "_save_delta", "write outputs")
    w(structure.Structure, "save", "write outputs")
    w(plot, "plot_paths", "plots")  # run_all imports it when it is called: the wrapped one


# ----------------------------------------------------------------------------- cProfile summaries

def _short(file: str) -> str:
    f = file.replace("\\", "/")
    for marker in ("site-packages/", "/s3pet/", "/benchmarks/"):
        if marker in f:
            return ("s3pet/" if marker == "/s3pet/" else "") + f.split(marker, 1)[1]
    return f


def classify(file: str, func: str) -> str:
    """The group a profiled function's self time belongs to, by where its code lives
    (``file`` is ``~`` for built-in C functions, whose ``func`` names their type)."""
    f = file.replace("\\", "/")
    if file == "~":
        if "run_backward" in func:
            return "autograd engine (backward, C++)"
        if "tokenizers" in func:
            return "tokenizer (Rust)"
        if "torch" in func:
            return "torch ops (C++ kernels)"
        if any(s in func for s in ("matplotlib", "PIL", "zlib", "kiwisolver")):
            return "plotting (matplotlib, PIL)"
        if any(s in func for s in ("_imp.", "marshal.", "builtins.exec", "builtins.compile", "__build_class__")):
            return "imports"
        if any(s in func for s in ("posix.", "_io.", "safetensors", "_pickle", "io.open")):
            return "file I/O"
        return "other built-ins"
    if f.startswith("<frozen importlib") or f.startswith("<frozen zipimport"):
        return "imports"
    if "/torch/optim/" in f:
        return "optimizer (torch.optim Python)"
    if "/torch/" in f:
        return "torch Python (module calls, hooks, autograd glue)"
    if "/transformers/" in f:
        return "transformers Python (+ its tensor operators)"
    if "/tokenizers/" in f:
        return "tokenizer (Rust)"
    if any(s in f for s in ("/matplotlib/", "/PIL/", "/kiwisolver/", "/fontTools/")):
        return "plotting (matplotlib, PIL)"
    if "/s3pet/" in f:
        return "s3pet Python (+ its tensor operators)"
    if "/tqdm/" in f:
        return "progress bar (tqdm)"
    if "/safetensors/" in f:
        return "file I/O"
    return "other Python"


# (label, predicate on (file, function name)); each matches one function of the job, so the
# cumulative times are those of the outermost calls (cProfile does not count recursion twice).
ENTRY_POINTS: tuple[tuple[str, Callable[[str, str], bool]], ...] = (
    ("forward (TaskModel.forward)", lambda f, fn: f.endswith("s3pet/heads.py") and fn == "forward"),
    ("backward (autograd engine)", lambda f, fn: f == "~" and "run_backward" in fn),
    ("optimizer step (AdamW)", lambda f, fn: f.endswith("torch/optim/adam.py") and fn == "step"),
    ("gradient clipping", lambda f, fn: f.endswith("torch/nn/utils/clip_grad.py") and fn == "clip_grad_norm_"),
    ("PET hooks (s3pet.inject)", lambda f, fn: f.endswith("s3pet/inject.py") and fn == "hook"),
    ("gate shift solve", lambda f, fn: f.endswith("s3pet/budget.py") and fn == "solve_shift"),
    ("batching (s3pet.data.collate)", lambda f, fn: f.endswith("s3pet/data.py") and fn == "collate"),
    ("tokenizer call", lambda f, fn: f.endswith("tokenization_utils_base.py") and fn == "__call__"),
    ("model from_pretrained", lambda f, fn: f.endswith("transformers/modeling_utils.py") and fn == "from_pretrained"),
    ("matplotlib savefig", lambda f, fn: f.endswith("matplotlib/figure.py") and fn == "savefig"),
    ("torch.save", lambda f, fn: f.endswith("torch/serialization.py") and fn == "save"),
    ("imports (import machinery)", lambda f, fn: f.startswith("<frozen importlib._bootstrap>")
     and fn == "_find_and_load"),
)


def profile_summary(stats: dict, top: int = 25) -> dict:
    """Summarise ``pstats.Stats(...).stats`` ({(file, line, func): (cc, nc, tt, ct, callers)}).

    Returns a dict with ``profiled_seconds`` (all self time), ``groups`` (self time by
    ``classify`` group, largest first), ``entry_points`` (cumulative time of ``ENTRY_POINTS``)
    and ``top_cumulative`` / ``top_self`` (the ``top`` largest functions each way).
    """
    total = sum(v[2] for v in stats.values())
    groups: dict[str, list] = {}
    for (file, _line, func), (_cc, nc, tt, _ct, _callers) in stats.items():
        g = groups.setdefault(classify(file, func), [0.0, 0])
        g[0] += tt
        g[1] += nc
    group_rows = sorted(({"group": k, "self_seconds": s, "calls": n, "share": s / total if total else 0.0}
                         for k, (s, n) in groups.items()), key=lambda r: -r["self_seconds"])
    entries = []
    for label, pred in ENTRY_POINTS:
        hits = [(k, v) for k, v in stats.items() if pred(k[0], k[2])]
        entries.append({"entry": label, "cumulative_seconds": sum(v[3] for _, v in hits),
                        "calls": sum(v[1] for _, v in hits), "functions": len(hits),
                        "share": sum(v[3] for _, v in hits) / total if total else 0.0})

    def row(k, v) -> dict:
        file, line, func = k
        where = func if file == "~" else f"{_short(file)}:{line}({func})"
        return {"function": where, "group": classify(file, func), "calls": v[1], "self_seconds": v[2],
                "cumulative_seconds": v[3]}

    mine = [kv for kv in stats.items() if kv[0][0] != __file__]  # not the stage timers' wrappers
    by_cum = sorted(mine, key=lambda kv: -kv[1][3])[:top]
    by_self = sorted(mine, key=lambda kv: -kv[1][2])[:top]
    return {"profiled_seconds": total, "groups": group_rows, "entry_points": entries,
            "top_cumulative": [row(k, v) for k, v in by_cum], "top_self": [row(k, v) for k, v in by_self]}


# ----------------------------------------------------------------------------- machine and report

def machine_info() -> dict:
    import torch
    import transformers

    cpu, mem, info = platform.processor() or "unknown", None, {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():  # the first processor's fields
            key, _, value = line.partition(":")
            if not key.strip():
                break
            info.setdefault(key.strip(), value.strip())
    cpu = info.get("model name", cpu)
    if "cpu family" in info:  # a bare "AMD EPYC" says little: family/model tell the generation
        cpu += f" (family {info['cpu family']}, model {info.get('model', '?')})"
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem = int(Path("/proc/meminfo").read_text().split()[1]) // 1024
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "host": platform.node(),
            "cpu": cpu, "cpu_count": os.cpu_count(), "usable_cores": usable, "memory_mib": mem,
            "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "thread_env": {k: v for k, v in sorted(os.environ.items())
                           if k.startswith(("OMP_", "GOMP_", "KMP_", "MKL_", "OPENBLAS_"))},
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "platform": platform.platform()}


def _busy_cpu_seconds() -> float | None:
    """CPU seconds every process of the machine has used since boot (``/proc/stat``)."""
    try:
        f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    return sum(f[i] for i in (0, 1, 2, 5, 6) if i < len(f)) / os.sysconf("SC_CLK_TCK")  # user nice system irq softirq


def _loadavg() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def code_version() -> dict:
    """The s3pet commit measured and the tracked files that differed from it (None outside git)."""
    import subprocess

    import s3pet

    root = Path(s3pet.__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        diff = subprocess.run(["git", "diff", "--name-only", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True)
    except (OSError, subprocess.CalledProcessError):
        return {"s3pet": s3pet.__version__, "commit": None, "modified": None}
    return {"s3pet": s3pet.__version__, "commit": head.stdout.strip(), "modified": diff.stdout.split()}


def _job_figures(run_dir: Path) -> dict:
    """The job's own figures from its summary.json (seconds as the pipeline measured them)."""
    p = run_dir / "summary.json"
    if not p.is_file():
        return {}
    s = json.loads(p.read_text())
    return {"search_seconds": s["cost"]["search_seconds"], "retrain_seconds": s["cost"]["retrain_seconds"],
            "run_all_seconds": s.get("seconds"), "test": s["retrain"]["test"].get("main"),
            "structure_params": s["structure"]["n_params"], "budget_params": s["structure"]["budget"]["params"],
            "plots": len(s.get("plots", []))}


def _f(x, fmt: str) -> str:
    return "n/a" if x is None else format(x, fmt)


def markdown(result: dict, top: int = 15) -> str:
    m, p = result["machine"], result["process"]
    how = "under cProfile" if result["cprofile"] else "no cProfile"
    lines = [f"Main job: `{result['command']}`",
             f"Machine: {m['cpu']}, {m['usable_cores']} usable cores, {m['memory_mib']} MiB; torch {m['torch']} "
             f"with {m['torch_threads']} threads ({m.get('torch_cpu_capability')} kernels), "
             f"transformers {m['transformers']}, Python {m['python']}; "
             f"load average before {m['loadavg_before']}, after {m['loadavg_after']}",
             f"Total wall {result['total_seconds']:.1f} s ({how}); "
             f"process CPU {p['cpu_user_s'] + p['cpu_sys_s']:.0f} s (user {p['cpu_user_s']:.0f}, "
             f"sys {p['cpu_sys_s']:.0f}) = {p['cpu_per_wall']:.2f} cores busy on average; peak RSS "
             f"{p['peak_rss_mib']:.0f} MiB; other processes used {_f(p.get('other_processes_cpu_s'), '.0f')} "
             "CPU s meanwhile", "",
             "| stage | s | self s | calls | % of total |", "| --- | ---: | ---: | ---: | ---: |"]
    for r in result["stages"]:
        lines.append(f"| {'· ' * r['depth']}{r['stage']} | {r['seconds']:.1f} | {r['self_seconds']:.1f} | "
                     f"{r['calls']} | {100 * r['share']:.1f} |")
    lines += ["", "| activity (self time across stages) | s | % of total |", "| --- | ---: | ---: |"]
    small = [r for r in result["activities"] if r["seconds"] < 0.05]
    lines += [f"| {r['activity']} | {r['seconds']:.1f} | {100 * r['share']:.1f} |" for r in result["activities"]
              if r["seconds"] >= 0.05]
    if small:
        names = ", ".join(r["activity"] for r in small)
        s, share = sum(r["seconds"] for r in small), sum(r["share"] for r in small)
        lines.append(f"| {len(small)} more under 0.05 s each: {names} | {s:.1f} | {100 * share:.1f} |")
    prof = result.get("profile")
    if prof:
        lines += ["", f"cProfile: {prof['profiled_seconds']:.1f} s of self time", "",
                  "| group (self time) | s | % | calls |", "| --- | ---: | ---: | ---: |"]
        lines += [f"| {r['group']} | {r['self_seconds']:.1f} | {100 * r['share']:.1f} | {r['calls']:,} |"
                  for r in prof["groups"]]
        lines += ["", "| entry point (cumulative, overlapping) | s | % | calls |", "| --- | ---: | ---: | ---: |"]
        lines += [f"| {r['entry']} | {r['cumulative_seconds']:.1f} | {100 * r['share']:.1f} | {r['calls']:,} |"
                  for r in prof["entry_points"]]
        for key, col in (("top_cumulative", "cumulative_seconds"), ("top_self", "self_seconds")):
            lines += ["", f"| top by {'cumulative' if col.startswith('cum') else 'self'} time | group | calls | "
                          "self s | cum s |", "| --- | --- | ---: | ---: | ---: |"]
            lines += [f"| `{r['function'][:90]}` | {r['group']} | {r['calls']:,} | {r['self_seconds']:.1f} | "
                      f"{r['cumulative_seconds']:.1f} |" for r in prof[key][:top]]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main

def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Profile the README's main job (s3pet run) by stage and by function.")
    ap.add_argument("--out", default="results/profile_main.json", help="JSON report")
    ap.add_argument("--md", default=None, help="markdown report (also printed)")
    ap.add_argument("--run-dir", default="outputs/profile_main", help="the job's --out folder")
    ap.add_argument("--run-args", default="", help="extra arguments of s3pet run, one string (e.g. '--max-steps 4')")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = its default)")
    ap.add_argument("--no-cprofile", action="store_true", help="stage timers only (no profiler overhead)")
    ap.add_argument("--top", type=int, default=25, help="functions kept in each top list")
    args = ap.parse_args(argv)
    args.extra = shlex.split(args.run_args)
    if "--out" in args.extra:
        ap.error("give the job's folder with --run-dir, not inside --run-args")
    if args.threads < 0 or args.top < 1:
        ap.error("--threads must be >= 0 and --top >= 1")
    return args


def main(argv=None) -> int:
    """Run the main job under the stage timers (and cProfile); exit status of the job."""
    t_start = T_START if argv is None else time.perf_counter()  # in-process callers: from the call
    args = parse_args(argv)
    load_before, busy0 = _loadavg(), _busy_cpu_seconds()
    cpu0 = os.times()
    timer = StageTimer()
    prof = None if args.no_cprofile else cProfile.Profile()
    if prof:
        prof.enable()
    try:
        with timer.stage("imports"):
            import torch

            import s3pet.cli as cli
            from s3pet import pipeline  # what `s3pet run` imports before the job

            cli._quiet_libraries()  # imports transformers, as the command does
        instrument(timer, pipeline)
        threads = torch.get_num_threads()
        if args.threads:
            torch.set_num_threads(args.threads)
        timer.self_labels["s3pet run"] = "s3pet run (parsing, summary, printing)"
        argv_run = ["run", "--out", args.run_dir, *args.extra]
        with timer.stage("s3pet run"):
            code = cli.main(argv_run)
    finally:
        if prof:
            prof.disable()
        timer.restore()
    total = time.perf_counter() - t_start
    cpu1, busy1 = os.times(), _busy_cpu_seconds()
    info = machine_info()  # while the run's thread setting holds
    torch.set_num_threads(threads)
    own = cpu1.user - cpu0.user + cpu1.system - cpu0.system
    rows = stage_rows(timer.records, total)
    result = {"command": "s3pet " + " ".join(shlex.quote(a) for a in argv_run), "exit_status": code,
              "cprofile": prof is not None, "total_seconds": total, "machine": info, "code": code_version(),
              "stages": rows, "activities": activity_rows(rows, timer.self_labels, total),
              "process": {"cpu_user_s": cpu1.user - cpu0.user, "cpu_sys_s": cpu1.system - cpu0.system,
                          "cpu_per_wall": own / total,
                          # CPU that other processes used meanwhile: on a shared machine, how
                          # much the figures may be inflated by contention (0 = a quiet machine)
                          "other_processes_cpu_s": None if busy0 is None else max(0.0, busy1 - busy0 - own),
                          "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024},
              "job": _job_figures(Path(args.run_dir))}
    result["machine"].update(loadavg_before=load_before, loadavg_after=_loadavg())
    if prof:
        result["profile"] = profile_summary(pstats.Stats(prof).stats, args.top)
    text = markdown(result)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    if args.md:
        Path(args.md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.md).write_text(text)
    print(text)
    return code


if __name__ == "__main__":
    sys.exit(main())
