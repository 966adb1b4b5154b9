"""The ``s3pet`` command. Every S3petError becomes one line on stderr and exit status 2.

Each subcommand is one ``Command`` in ``COMMANDS``: its own arguments (``Arg``: what it runs
on, where it writes) and its settings, the stage configs of ``s3pet.configs``, whose fields
``s3pet.flags`` turns into flags. A field added to a config is a flag of every command that
uses that config, with no edit here; a new command is one more ``Command``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Callable, NamedTuple

from s3pet.errors import S3petError

# Idle OpenMP threads sleep instead of spinning (read when torch loads, so set before it is
# imported): on a 2-core machine shared with another busy process a training step is ~1.8x
# faster, at a cost of ~3% on an idle one (docs/results.md). A user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

log = logging.getLogger("s3pet")

# s3pet.baselines.METHODS + s3pet.peft_methods.METHODS (tested), named here so that --help
# needs no torch import.
BASELINE_METHODS = ("full", "lora", "lora-all", "adapter", "bitfit", "lnfit", "random", "lst",
                    "ia3", "lowrank_adapter", "parallel_adapter", "adapterbias", "kronecker", "sparse_lora",
                    "compacter", "fact", "prefix", "peft-lora-r8-qv", "peft-lora-all-r1", "adalora")


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:  # pragma: no cover - transformers always present
        pass


# --------------------------------------------------------------------------- space

def cmd_space(args, cfg=None) -> int:
    from s3pet.models import count_params, load_backbone
    from s3pet.space import discover_sites, instantiate, load_space

    backbone = load_backbone(args.model)
    space = load_space(args.space)
    specs = instantiate(space, discover_sites(backbone))
    report = space_report(specs, count_params(backbone), args.model, space.name)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_space_report(report))
    return 0


def space_report(specs, backbone_params: int, model: str, space: str) -> dict:
    """Candidates of a space on a model, with totals per kind and per layer; ``shared`` (when
    any) lists the tensors modules share, each counted once in the totals."""
    from s3pet.structure import shared_records

    rows, per_kind, per_layer = [], {}, {}
    for s in specs:
        n = s.n_params
        rows.append({"site": s.site.path, "stack": s.site.stack, "layer": s.site.layer, "role": s.site.role,
                     "kind": s.kind, "units": s.units, "unit_params": s.unit_params, "n_params": n})
        k = per_kind.setdefault(s.kind, {"modules": 0, "candidates": 0, "params": 0})
        k["modules"] += 1
        k["candidates"] += s.units
        k["params"] += n
        per_layer[(s.site.stack, s.site.layer)] = per_layer.get((s.site.stack, s.site.layer), 0) + n
    shared = shared_records(specs)
    for t in shared:  # paid once, whichever of its kind's modules a structure keeps
        per_kind[t["kind"]]["params"] += t["n_params"]
    total = sum(r["n_params"] for r in rows) + sum(t["n_params"] for t in shared)
    per_layer = {f"{st}.{layer}": v for (st, layer), v in sorted(per_layer.items())}  # -1: before the blocks
    return {"model": model, "space": space, "backbone_params": backbone_params, "modules": rows,
            **({"shared": shared} if shared else {}), "per_kind": per_kind, "per_layer": per_layer, "total_params": total,
            "candidates": sum(r["units"] for r in rows), "share_of_backbone": total / backbone_params}


def format_space_report(r: dict) -> str:
    lines = [f"space {r['space']} on {r['model']} ({r['backbone_params']:,} backbone parameters)", ""]
    kw = max([15] + [len(k) for k in r["per_kind"]])  # the kind column fits the longest kind name
    head = f"{'site':58} {'stack':7} {'layer':>5} {'role':11} {'kind':{kw}} {'units':>5} {'n/unit':>7} {'params':>9}"
    lines += [head, "-" * len(head)]
    for m in r["modules"]:
        lines.append(f"{m['site'][-58:]:58} {m['stack']:7} {m['layer']:>5} {m['role']:11} {m['kind']:{kw}} "
                     f"{m['units']:>5} {m['unit_params']:>7,} {m['n_params']:>9,}")
    if r.get("shared"):
        lines += ["", "shared (each paid once by a structure keeping any module that uses it):"]
        lines += [f"  {t['name']:40} {t['kind']:{kw}} {'x'.join(map(str, t['shape'])):>12} {t['n_params']:>9,}"
                  for t in r["shared"]]
    lines += ["", "per kind:"]
    for k, v in sorted(r["per_kind"].items()):
        lines.append(f"  {k:{kw}} {v['modules']:>5} modules {v['candidates']:>6} candidates {v['params']:>11,} params")
    lines += ["", "per layer:"]
    for k, v in r["per_layer"].items():
        lines.append(f"  {k:12} {v:>11,} params")
    lines += ["", f"total: {r['candidates']:,} candidates, {r['total_params']:,} parameters = "
                  f"{100 * r['share_of_backbone']:.3f}% of the backbone"]
    return "\n".join(lines)


# --------------------------------------------------------------------------- tasks

def cmd_tasks(args, cfg=None) -> int:
    from s3pet.tasks import describe_tasks

    rows = describe_tasks(args.data_dir)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    print(f"{'task':16} {'benchmark':10} {'type':16} {'metric':24} splits")
    for r in rows:
        metric = r.get("main_metric") or ""
        if metric in ("", "mean"):  # the card's metrics averaged, e.g. MRPC accuracy and F1
            metric = "mean(" + ",".join(r.get("metrics", [])) + ")"
        sizes = r.get("sizes") or r.get("where") or ""
        if isinstance(sizes, dict):
            sizes = " ".join(f"{k}={v}" for k, v in sizes.items())
        print(f"{r['name']:16} {str(r.get('benchmark', '')):10} {str(r.get('type', '')):16} {str(metric):24} {sizes}")
    return 0


# --------------------------------------------------------------------------- training stages

def _print_metrics(m: dict) -> None:
    test = m.get("test", {})
    val = m.get("validation", {})
    p = m.get("params", {})
    print(f"test {m.get('main_metric', 'main')}: {test.get('main', float('nan')):.4f}   "
          f"validation: {val.get('main', float('nan')):.4f}   PET params: {p.get('pet', 0):,} "
          f"(+ head {p.get('head', 0):,})   {m['cost']['seconds']:.0f} s")
    if m.get("privacy"):
        v = m["privacy"]
        print(f"privacy: ({v['epsilon']:.3g}, {v['delta']:g})-DP over {v['steps']} steps (noise multiplier "
              f"{v['noise_multiplier']:.3g}, clipping norm {v['max_grad_norm']:g}, sampling rate "
              f"{v['sample_rate']:.3g}, {v['accountant']} accountant)")


def cmd_search(args, cfg) -> int:
    from s3pet.pipeline import search

    m = search(args.model, args.task, args.space, args.budget, args.out, cfg["search"], resume=args.resume,
               data_dir=args.data_dir, overwrite=args.overwrite)
    s = m["structure"]
    kinds = ", ".join(f"{k} x{v['modules']}" for k, v in sorted(s["by_kind"].items()))
    print(f"structure: {s['n_params']:,} params in {s['modules']} modules ({kinds}); "
          f"budget {s['budget']['params']:,}; search {m['cost']['seconds']:.0f} s -> {args.out}/structure.json")
    return 0


def cmd_retrain(args, cfg) -> int:
    from s3pet.pipeline import retrain

    _print_metrics(retrain(args.structure, args.task, args.out, cfg["train"], model=args.model,
                           data_dir=args.data_dir, overwrite=args.overwrite, resume=args.resume))
    return 0


def cmd_baseline(args, cfg) -> int:
    from s3pet.pipeline import baseline

    _print_metrics(baseline(args.method, args.budget, args.task, args.out, cfg["train"], model=args.model,
                            space=args.space, data_dir=args.data_dir, overwrite=args.overwrite, resume=args.resume))
    return 0


def cmd_evaluate(args, cfg) -> int:
    from s3pet.pipeline import evaluate_run

    r = evaluate_run(args.run, args.task, data_dir=args.data_dir)
    print(json.dumps(r, indent=2))
    return 0


def cmd_predict(args, cfg) -> int:
    from s3pet.predict import predict_file

    n = predict_file(args.run, args.input, args.out, batch_size=args.batch_size, device=args.device)
    print(f"{n:,} predictions -> {args.out}")
    return 0


def cmd_run(args, cfg) -> int:
    from s3pet.pipeline import run_all

    run_all(args.out, cfg, data_dir=args.data_dir, overwrite=args.overwrite)
    return 0


def cmd_optuna(args, cfg) -> int:
    from s3pet.optuna_search import optuna_search

    o, train = cfg["optuna"], cfg["train"]
    m = optuna_search(args.model, args.task, args.space, args.budget, args.out, o.trials, storage=o.storage,
                      study_name=o.study, objective=o.objective, pruner=o.pruner, cfg=train,
                      data_dir=args.data_dir, seed=train.seed, granularity=o.granularity,
                      layer_groups=o.layer_groups)
    t, best = m["trials"], m["best"]
    print(f"study {m['study']}: {t['total']} trials ({t['complete']} complete, {t['pruned']} pruned, "
          f"{t['failed']} failed); this worker ran {len(t['this_worker']['numbers'])} in {m['cost']['seconds']:.0f} s")
    if best:
        test = "n/a" if best["test"] is None else f"{best['test']:.4f}"
        what = "best_structure.json" if m["objective"] == "single" else f"pareto.json ({len(m['pareto'])} on the front)"
        print(f"best validation {m['main_metric']}: {best['validation']:.4f} (trial {best['trial']}, test {test}, "
              f"{best['n_params']:,} PET params) -> {what}")
    return 0


def cmd_plot(args, cfg) -> int:
    from s3pet.plot import plot_paths

    fmts = tuple(args.format.split(","))
    for p in plot_paths(args.run, args.out, formats=fmts):
        print(p)
    return 0


def cmd_transfer(args, cfg) -> int:
    from dataclasses import asdict

    from s3pet import structure as S
    from s3pet.models import load_backbone
    from s3pet.pipeline import train_structure
    from s3pet.transfer import map_structure

    mapping = cfg["transfer"].mapping
    st = S.load(args.structure)
    model = args.model or st.base_model.get("name_or_path")
    if args.model and args.model != st.base_model.get("name_or_path"):
        st = map_structure(st, load_backbone(args.model), mapping)
        print(f"mapped onto {args.model} ({mapping}, budget {st.provenance['transfer']['budget']}): {st.summary()}")
    m = train_structure(st, args.task, model, args.out, cfg["train"], data_dir=args.data_dir, stage="transfer",
                        extra_config={"source_structure": str(args.structure), "transfer": asdict(cfg["transfer"])},
                        overwrite=args.overwrite, resume=args.resume)
    _print_metrics(m)
    return 0


def cmd_average(args, cfg) -> int:
    from s3pet.errors import ConfigError
    from s3pet.transfer import average_runs

    if os.path.isdir(args.out):
        raise ConfigError(f"--out {args.out} is a folder; give the structure file to write, e.g. "
                          f"{os.path.join(args.out, 'structure.json')}")
    st = average_runs(args.run, args.budget)
    try:
        st.save(args.out)
    except OSError as e:
        raise ConfigError(f"--out {args.out}: cannot write ({e.strerror})") from e
    print(f"{st.summary()} -> {args.out}")
    return 0


def cmd_export(args, cfg) -> int:
    from s3pet.export import export_run

    e = cfg["export"]
    path = export_run(args.structure, args.out, to=e.to, weights_path=args.weights, model=args.model,
                      untrained=e.untrained, task=args.task)
    print(f"exported to {path}")
    return 0


# --------------------------------------------------------------------------- commands

class Arg(NamedTuple):
    """One of a command's own arguments (what it runs on, where it writes), beside its settings.

    ``default`` applies after ``--config``, so a replayed file can give the value; ``required``
    is checked then too. ``kw`` goes to ``add_argument`` (action, choices, nargs).
    """

    flags: tuple[str, ...]
    help: str
    default: object = None
    required: bool = False
    kw: dict = {}

    @property
    def dest(self) -> str:
        return self.flags[0].lstrip("-").replace("-", "_")


class Command(NamedTuple):
    """A subcommand: its function ``func(args, cfg)``, its own arguments and its settings.

    ``tree``: the settings, as ``s3pet.flags`` reads them (``{section: config class name}`` or a
    class name, looked up in ``s3pet.configs`` when the parser is built). ``replay``: keys of a
    saved config.json that give own arguments (``--config``; None: no ``--config``).
    ``records``: keys a run writes beside its settings, skipped by ``--config``.
    """

    name: str
    help: str
    func: Callable
    args: tuple[Arg, ...] = ()
    tree: object = None
    replay: dict | None = None
    records: tuple[str, ...] = ("command", "versions")


MODELS = "hub id, local folder, or alias (minilm, tiny-bert, tiny-t5, tiny-gpt2, tiny-llama)"
BUDGET = "PET parameters (25000, 25k) or share of the backbone (0.05%)"


def model_arg(default=None) -> Arg:
    """``--model``, the same in every command; without a default: the structure's base model."""
    return Arg(("--model",), MODELS if default else f"{MODELS}; default: the structure's base model", default)


TASK = Arg(("--task",), "task card: a name (s3pet tasks) or a card file", required=True)
SPACE = Arg(("--space",), "search space: s3pet-m | s3pet-l | unified | a space JSON", "s3pet-m")
DATA_DIR = Arg(("--data-dir",), "folder with GLUE/SuperGLUE files (default: env S3PET_DATA_DIR)")
OUT = Arg(("--out",), "run directory to write", required=True)
OVERWRITE = Arg(("--overwrite",), "replace a finished run in --out (refused without)", False,
                kw={"action": "store_true"})
STRUCTURE = Arg(("--structure",), "structure.json to train", required=True)
RESUME_TRAIN = Arg(("--resume",), "continue a killed run from its checkpoint (OUT/train.pt, written at every "
                                  "validation)", False, kw={"action": "store_true"})
RUNS = Arg(("--run", "--runs"), "run directory (repeat --run, or list after --runs)", kw={"nargs": "+",
                                                                                        "action": "extend"})

COMMANDS = (
    Command("space", "list every candidate of a search space on a model", cmd_space, (
        model_arg("minilm"), SPACE, Arg(("--json",), "machine-readable output", False, kw={"action": "store_true"}))),
    Command("tasks", "list the known tasks", cmd_tasks, (
        DATA_DIR, Arg(("--json",), "machine-readable output", False, kw={"action": "store_true"}))),
    Command("search", "search a structure under a parameter budget", cmd_search, (
        model_arg("minilm"), TASK, SPACE, Arg(("--budget",), BUDGET, required=True), DATA_DIR, OUT,
        Arg(("--resume",), "continue a killed search from its checkpoint (OUT/search.pt)", False,
            kw={"action": "store_true"}), OVERWRITE),
        {"search": "SearchConfig"}, {"model": "model", "task": "task", "space": "space", "budget_arg": "budget",
                                     "data_dir": "data_dir"},
        ("command", "versions", "space_spec", "space_params", "budget", "restart")),
    Command("retrain", "train a structure from scratch and evaluate it", cmd_retrain, (
        STRUCTURE, model_arg(), TASK, DATA_DIR, OUT,
        RESUME_TRAIN, OVERWRITE),
        {"train": "TrainConfig"}, {"model": "model", "task": "task", "data_dir": "data_dir"},
        ("command", "versions", "structure")),
    Command("baseline", "train a hand-designed PET method sized to the budget", cmd_baseline, (
        Arg(("--method",), "hand-designed method sized to --budget, a random structure, full fine-tuning, ladder "
                           "side-tuning (lst: a side network beside the frozen encoder), or a reference run "
                           "through HF peft itself (peft-*, adalora)", required=True,
            kw={"choices": BASELINE_METHODS}),
        Arg(("--budget",), BUDGET + "; required except for full"),
        Arg(("--space",), "search space of the random method", "s3pet-m"), model_arg("minilm"), TASK, DATA_DIR,
        OUT, RESUME_TRAIN, OVERWRITE),
        {"train": "TrainConfig"}, {"model": "model", "task": "task", "data_dir": "data_dir", "method": "method",
                                   "budget": "budget", "space": "space"},
        ("command", "versions", "structure", "peft")),
    Command("evaluate", "re-evaluate the saved weights of a run", cmd_evaluate, (
        Arg(("--run",), "a finished retrain/baseline run directory", required=True),
        Arg(("--task",), "task card (default: the run's task)"), DATA_DIR)),
    Command("predict", "predict labels for new text with a run's trained weights", cmd_predict, (
        Arg(("--run",), "a retrain or baseline run, or the main job's folder (its retrain/)", required=True),
        Arg(("--input",), "CSV/TSV with a header, or JSON lines, holding the task's text fields", required=True),
        Arg(("--out",), "JSON lines to write: label, label_id, scores per input row", required=True),
        Arg(("--batch-size",), "rows per forward pass (default: the run's)", kw={"type": int}),
        Arg(("--device",), "auto | cpu | cuda | cuda:N (default: the run's)"))),
    Command("run", "the main job: search, derive, retrain, evaluate, plot", cmd_run, (OUT, DATA_DIR, OVERWRITE),
            "RunConfig", {"data_dir": "data_dir"}),
    Command("optuna", "discrete structure search: Optuna samples structures, each is retrained", cmd_optuna, (
        model_arg("minilm"), TASK, SPACE, Arg(("--budget",), BUDGET, required=True), DATA_DIR,
        Arg(("--out",), "run directory (default: outputs/optuna/<study>)")),
        {"optuna": "OptunaConfig", "train": "TrainConfig"}),
    Command("plot", "plot runs or structures (heatmaps, gates, trajectory, graph)", cmd_plot, (
        Arg(("--run", "--runs"), "run directory or structure.json (repeat --run, or list after --runs)",
            kw={"nargs": "+", "action": "extend"}),
        Arg(("--out",), "output folder (or file for a single plot); default: beside each input"),
        Arg(("--format",), "comma-separated image formats: png, svg, pdf", "png,svg"))),
    Command("transfer", "retrain a structure on another task and/or model", cmd_transfer, (
        STRUCTURE, model_arg(), TASK, DATA_DIR, OUT, RESUME_TRAIN, OVERWRITE),
        {"transfer": "TransferConfig", "train": "TrainConfig"}, {"model": "model", "task": "task",
                                                                  "data_dir": "data_dir"},
        ("command", "versions", "structure", "source_structure")),
    Command("average", "average gate scores of several searches and re-derive", cmd_average, (
        RUNS, Arg(("--budget",), BUDGET, required=True), Arg(("--out",), "structure.json to write", required=True))),
    Command("export", "export a structure (and weights) to HF peft or a merged model", cmd_export, (
        Arg(("--structure", "--run"), "structure.json, or the run directory holding it", required=True),
        Arg(("--weights",), "delta.safetensors of a retrain run (default: the one beside the structure)"),
        Arg(("--merge",), "the same as --to merged", False, kw={"action": "store_true"}),
        model_arg(), Arg(("--task",), "task card (name or path) of the head; default: the run's task"),
        Arg(("--out",), "folder to write the export to", required=True)),
        {"export": "ExportConfig"}),
)

# Commands that take positional inputs too, as older command lines wrote them.
POSITIONAL = {"space": ("model", "?"), "plot": ("run", "*"), "average": ("run", "*")}


def _tree(spec):
    """A command's settings with the config classes looked up now (so a patched class is seen)."""
    from s3pet import configs

    if spec is None:
        return None
    if isinstance(spec, str):
        return getattr(configs, spec)
    return {k: getattr(configs, v) for k, v in spec.items()}


# --------------------------------------------------------------------------- parser

def _verbosity() -> argparse.ArgumentParser:
    # SUPPRESS: a subcommand's parser does not reset what was given before the subcommand.
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                   help="warnings and errors only")
    return p


def build_parser() -> argparse.ArgumentParser:
    """The ``s3pet`` parser: each command's own arguments and one flag per field of its configs."""
    from s3pet.flags import add_config_flags

    p = argparse.ArgumentParser(prog="s3pet", parents=[_verbosity()], description="Search where to put "
                                "parameter-efficient tuning modules under a parameter budget (S3PET).")
    p.add_argument("--version", action="version", version=f"s3pet {__import__('s3pet').__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for c in COMMANDS:
        sp = sub.add_parser(c.name, help=c.help, description=c.help, parents=[_verbosity()])
        if c.name in POSITIONAL:
            dest, nargs = POSITIONAL[c.name]
            sp.add_argument(f"{dest}_positional", nargs=nargs, metavar=dest.upper(),
                            help=f"the same as --{dest}")
        for a in c.args:
            kw = dict(a.kw)
            if kw.get("action") != "store_true":
                kw["default"] = None
            shown = f" (default: {a.default})" if a.default not in (None, False) else ""
            sp.add_argument(*a.flags, dest=a.dest, help=(a.help + shown).replace("%", "%%"), **kw)
        if c.replay is not None:
            sp.add_argument("--config", default=None, metavar="FILE",
                            help="start from a run's config.json (or a JSON file of its shape); flags on the "
                                 "line override it")
        tree = _tree(c.tree)
        if tree is not None:
            add_config_flags(sp, tree)
        sp.set_defaults(func=c.func, spec=c, subparser=sp)
    return p


class Parsed(NamedTuple):
    """A command line understood: the command's own arguments and its configs."""

    args: argparse.Namespace
    cfg: object  # {section: config}, a RunConfig, or None


def parse(argv: list[str] | None = None) -> Parsed:
    """Parse a command line into the command's arguments (after ``--config`` and defaults) and its
    configs. argparse errors exit (status 2); a bad setting raises ConfigError."""
    from s3pet import flags

    args = build_parser().parse_args(argv)
    c, tree = args.spec, _tree(args.spec.tree)
    if c.name in POSITIONAL:
        dest, _ = POSITIONAL[c.name]
        pos, have = getattr(args, f"{dest}_positional"), getattr(args, dest)
        if isinstance(pos, list):  # plot, average: the inputs listed, then those of --run
            setattr(args, dest, pos + (have or []) or None)
        elif pos and have not in (None, pos):
            args.subparser.error(f"the {dest} is given twice ({pos}, --{dest} {have}); give it once")
        elif pos:
            setattr(args, dest, pos)
    settings, from_file = {}, {}
    if getattr(args, "config", None):
        settings, from_file = flags.read_config(args.config, tree, c.replay, c.records, c.name)
        if isinstance(from_file.get("budget"), dict):  # a run's budget record: its parameter count
            from_file["budget"] = str(from_file["budget"].get("params"))
    missing = []
    for a in c.args:
        if getattr(args, a.dest) in (None, False) and a.dest in from_file:
            setattr(args, a.dest, from_file[a.dest])
        if getattr(args, a.dest) is None:
            setattr(args, a.dest, a.default)
        if a.required and getattr(args, a.dest) in (None, []):
            missing.append(a.flags[0])
    if missing:
        args.subparser.error(f"the following arguments are required: {', '.join(missing)}")
    given = flags.given(args)
    if getattr(args, "merge", False):  # export's older spelling of --to merged
        given["to"] = "merged"
    cfg = None if tree is None else flags.build(tree, given, settings)
    return Parsed(args, cfg)


def _configs(cfg):
    """Every config in ``cfg`` (a dict of configs, a config or None), nested ones included."""
    import dataclasses

    for c in (cfg.values() if isinstance(cfg, dict) else [cfg] if cfg is not None else []):
        yield c
        yield from _configs({f.name: getattr(c, f.name) for f in dataclasses.fields(c)
                             if dataclasses.is_dataclass(getattr(c, f.name))})


def on_device(cfg, device: str):
    """``cfg`` with the ``device`` of every config in it set (a torchrun rank's own GPU)."""
    import dataclasses

    if isinstance(cfg, dict):
        return {k: on_device(v, device) for k, v in cfg.items()}
    if not dataclasses.is_dataclass(cfg):
        return cfg
    over = {f.name: on_device(getattr(cfg, f.name), device) for f in dataclasses.fields(cfg)
            if dataclasses.is_dataclass(getattr(cfg, f.name))}
    if hasattr(cfg, "device"):
        over["device"] = device
    return dataclasses.replace(cfg, **over)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        parsed = parse(argv)
    except S3petError as e:  # a bad setting or --config file: before anything runs
        print(f"s3pet: error: {e}", file=sys.stderr)
        return 2
    args, cfg = parsed
    if getattr(args, "verbose", False) and getattr(args, "quiet", False):
        args.subparser.error("give -v/--verbose or -q/--quiet, not both")
    level = logging.DEBUG if getattr(args, "verbose", False) else \
        logging.WARNING if getattr(args, "quiet", False) else logging.INFO
    logging.basicConfig(level=level, format="%(message)s")
    _quiet_libraries()
    try:
        from s3pet import dist

        device = next((c.device for c in _configs(cfg) if hasattr(c, "device")), None)
        if device is not None and os.environ.get("WORLD_SIZE", "1") != "1":
            cfg = on_device(cfg, dist.init_from_env(device))  # launched by torchrun
        return int(args.func(args, cfg) or 0)
    except S3petError as e:
        print(f"s3pet: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("s3pet: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into head and the like
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        import torch.distributed as tdist

        if tdist.is_available() and tdist.is_initialized():
            tdist.destroy_process_group()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
