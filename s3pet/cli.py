"""The ``s3pet`` command. Every S3petError becomes one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from s3pet.errors import S3petError

# Idle OpenMP threads sleep instead of spinning (read when torch loads, so set before it is
# imported): on a 2-core machine shared with another busy process a training step is ~1.8x
# faster, at a cost of ~3% on an idle one (docs/results.md). A user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

log = logging.getLogger("s3pet")

# s3pet.baselines.METHODS + s3pet.peft_methods.METHODS (tested), named here so that --help
# needs no torch import.
BASELINE_METHODS = ("full", "lora", "lora-all", "adapter", "bitfit", "lnfit", "random",
                    "peft-lora-r8-qv", "peft-lora-all-r1", "adalora")


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:  # pragma: no cover - transformers always present
        pass


# --------------------------------------------------------------------------- space

def cmd_space(args) -> int:
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
    """Candidates of a space on a model, with totals per kind and per layer."""
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
    total = sum(r["n_params"] for r in rows)
    per_layer = {f"{st}.{layer}": v for (st, layer), v in sorted(per_layer.items())}  # -1: before the blocks
    return {"model": model, "space": space, "backbone_params": backbone_params, "modules": rows,
            "per_kind": per_kind, "per_layer": per_layer, "total_params": total,
            "candidates": sum(r["units"] for r in rows), "share_of_backbone": total / backbone_params}


def format_space_report(r: dict) -> str:
    lines = [f"space {r['space']} on {r['model']} ({r['backbone_params']:,} backbone parameters)", ""]
    kw = max([15] + [len(k) for k in r["per_kind"]])  # the kind column fits the longest kind name
    head = f"{'site':58} {'stack':7} {'layer':>5} {'role':11} {'kind':{kw}} {'units':>5} {'n/unit':>7} {'params':>9}"
    lines += [head, "-" * len(head)]
    for m in r["modules"]:
        lines.append(f"{m['site'][-58:]:58} {m['stack']:7} {m['layer']:>5} {m['role']:11} {m['kind']:{kw}} "
                     f"{m['units']:>5} {m['unit_params']:>7,} {m['n_params']:>9,}")
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

def cmd_tasks(args) -> int:
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

def _train_cfg(args, **over):
    from s3pet.train import TrainConfig

    d = {k: getattr(args, k) for k in ("epochs", "max_steps", "batch_size", "lr", "full_lr", "head_lr", "weight_decay",
                                        "grad_clip", "grad_accum", "eval_every", "patience", "max_length", "seed",
                                        "device", "precision", "max_train_samples", "max_eval_samples", "compile",
                                        "lr_scale", "pooling")
         if getattr(args, k, None) is not None}
    d["progress"] = not args.no_progress
    d.update(over)
    return TrainConfig.from_dict(d)


def _search_cfg(args, **over):
    from s3pet.search import SearchConfig

    names = ("order", "epochs", "max_steps", "batch_size", "w_lr", "alpha_lr", "head_lr", "grad_clip", "beta",
             "temperature", "controller", "select", "eval_every", "max_length", "seed", "device", "precision",
             "max_train_samples", "max_eval_samples", "l0_weight", "xi", "compile", "pooling",
             "temperature_final", "gates", "warmup_steps", "warmup_epochs", "alpha_init", "alpha_init_scale", "sensitivity_batches",
             "selector", "alpha_accum", "restarts", "exportable")
    d = {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}
    if getattr(args, "hard", False):
        d["hard"] = True
    d["progress"] = not args.no_progress
    d.update(over)
    return SearchConfig.from_dict(d)


def _print_metrics(m: dict) -> None:
    test = m.get("test", {})
    val = m.get("validation", {})
    p = m.get("params", {})
    print(f"test {m.get('main_metric', 'main')}: {test.get('main', float('nan')):.4f}   "
          f"validation: {val.get('main', float('nan')):.4f}   PET params: {p.get('pet', 0):,} "
          f"(+ head {p.get('head', 0):,})   {m['cost']['seconds']:.0f} s")


def cmd_search(args) -> int:
    from s3pet.pipeline import search

    m = search(args.model, args.task, args.space, args.budget, args.out, _search_cfg(args), resume=args.resume,
               data_dir=args.data_dir, overwrite=args.overwrite)
    s = m["structure"]
    kinds = ", ".join(f"{k} x{v['modules']}" for k, v in sorted(s["by_kind"].items()))
    print(f"structure: {s['n_params']:,} params in {s['modules']} modules ({kinds}); "
          f"budget {s['budget']['params']:,}; search {m['cost']['seconds']:.0f} s -> {args.out}/structure.json")
    return 0


def cmd_retrain(args) -> int:
    from s3pet.pipeline import retrain

    _print_metrics(retrain(args.structure, args.task, args.out, _train_cfg(args), model=args.model,
                           data_dir=args.data_dir, overwrite=args.overwrite, resume=args.resume))
    return 0


def cmd_baseline(args) -> int:
    from s3pet.pipeline import baseline

    _print_metrics(baseline(args.method, args.budget, args.task, args.out, _train_cfg(args), model=args.model,
                            space=args.space, data_dir=args.data_dir, overwrite=args.overwrite))
    return 0


def cmd_evaluate(args) -> int:
    from s3pet.pipeline import evaluate_run

    r = evaluate_run(args.run, args.task, data_dir=args.data_dir)
    print(json.dumps(r, indent=2))
    return 0


def cmd_run(args) -> int:
    from s3pet.pipeline import run_all

    run_all(args.model, args.task, args.space, args.budget, args.out, _search_cfg(args, epochs=args.search_epochs),
            _train_cfg(args), compare=args.compare, data_dir=args.data_dir, overwrite=args.overwrite)
    return 0


def cmd_optuna(args) -> int:
    from s3pet.optuna_search import optuna_search

    m = optuna_search(args.model, args.task, args.space, args.budget, args.out, args.trials, storage=args.storage,
                      study_name=args.study, objective=args.objective, pruner=args.pruner, cfg=_train_cfg(args),
                      data_dir=args.data_dir, seed=args.seed or 0, granularity=args.granularity,
                      layer_groups=args.layer_groups)
    t, best = m["trials"], m["best"]
    print(f"study {m['study']}: {t['total']} trials ({t['complete']} complete, {t['pruned']} pruned, "
          f"{t['failed']} failed); this worker ran {len(t['this_worker']['numbers'])} in {m['cost']['seconds']:.0f} s")
    if best:
        test = "n/a" if best["test"] is None else f"{best['test']:.4f}"
        what = "best_structure.json" if m["objective"] == "single" else f"pareto.json ({len(m['pareto'])} on the front)"
        print(f"best validation {m['main_metric']}: {best['validation']:.4f} (trial {best['trial']}, test {test}, "
              f"{best['n_params']:,} PET params) -> {what}")
    return 0


def cmd_plot(args) -> int:
    from s3pet.plot import plot_paths

    fmts = tuple(args.format.split(","))
    for p in plot_paths(args.inputs, args.out, formats=fmts):
        print(p)
    return 0


def cmd_transfer(args) -> int:
    from s3pet import structure as S
    from s3pet.models import load_backbone
    from s3pet.pipeline import train_structure
    from s3pet.transfer import map_structure

    st = S.load(args.structure)
    model = args.model or st.base_model.get("name_or_path")
    if args.model and args.model != st.base_model.get("name_or_path"):
        st = map_structure(st, load_backbone(args.model), args.mapping)
        print(f"mapped onto {args.model} ({args.mapping}, budget {st.provenance['transfer']['budget']}): {st.summary()}")
    m = train_structure(st, args.task, model, args.out, _train_cfg(args), data_dir=args.data_dir, stage="transfer",
                        extra_config={"source_structure": str(args.structure)}, overwrite=args.overwrite)
    _print_metrics(m)
    return 0


def cmd_average(args) -> int:
    from s3pet.errors import ConfigError
    from s3pet.transfer import average_runs

    if os.path.isdir(args.out):
        raise ConfigError(f"--out {args.out} is a folder; give the structure file to write, e.g. "
                          f"{os.path.join(args.out, 'structure.json')}")
    st = average_runs(args.runs, args.budget)
    try:
        st.save(args.out)
    except OSError as e:
        raise ConfigError(f"--out {args.out}: cannot write ({e.strerror})") from e
    print(f"{st.summary()} -> {args.out}")
    return 0


def cmd_export(args) -> int:
    from s3pet.export import export_run

    path = export_run(args.structure, args.out, to="merged" if args.merge else args.to, weights_path=args.weights,
                      model=args.model, untrained=args.untrained, task=args.task)
    print(f"exported to {path}")
    return 0


# --------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="s3pet", description="Search where to put parameter-efficient tuning "
                                "modules under a parameter budget (S3PET).")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--version", action="version", version=f"s3pet {__import__('s3pet').__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sp = sub.add_parser("space", help="list every candidate of a search space on a model")
    sp.add_argument("model", help="hub id, local folder, or alias (minilm, tiny-bert, tiny-t5, tiny-gpt2, tiny-llama)")
    sp.add_argument("--space", default="s3pet-m", help="s3pet-m | s3pet-l | unified | path to a space JSON")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.set_defaults(func=cmd_space)

    def common_train(q, lr=None):
        q.add_argument("--model", default=None, help="model (default: the structure's base model, or minilm)")
        q.add_argument("--data-dir", default=None, help="folder with GLUE/SuperGLUE files (or env S3PET_DATA_DIR)")
        q.add_argument("--epochs", type=float, default=None)
        q.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides epochs)")
        q.add_argument("--batch-size", type=int, default=None)
        q.add_argument("--max-length", type=int, default=None, help="tokens per input")
        q.add_argument("--seed", type=int, default=None)
        q.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N")
        q.add_argument("--precision", default=None, choices=["auto", "fp32", "bf16"])
        q.add_argument("--compile", default=None, choices=["auto", "on", "off"],
                       help="torch.compile the model (auto: on a GPU for runs of 2,000+ steps, where the "
                            "minutes of compiling pay off)")
        q.add_argument("--max-train-samples", type=int, default=None, help="seeded training subset (quick runs)")
        q.add_argument("--max-eval-samples", type=int, default=None, help="cap on validation and test examples")
        q.add_argument("--eval-every", type=int, default=None, help="steps between validations")
        q.add_argument("--head-lr", type=float, default=None,
                       help="learning rate of the task head (default: the largest module rate)")
        q.add_argument("--pooling", default=None, choices=["auto", "pooler", "mean"],
                       help="encoder read-out: auto = the model's own pooler when it has one (as "
                            "AutoModelForSequenceClassification), else the mean over tokens")
        q.add_argument("--grad-clip", type=float, default=None)
        q.add_argument("--no-progress", action="store_true", help="no progress bar")

    def overwrite(q):
        q.add_argument("--overwrite", action="store_true", help="replace a finished run in --out (refused without)")

    def train_only(q):
        q.add_argument("--lr", type=float, default=None,
                       help="learning rate of every PET module (default: each kind's own, LoRA 5e-4, others 1e-3)")
        q.add_argument("--lr-scale", type=float, default=None, help="multiplies every learning rate (default 1)")
        q.add_argument("--full-lr", type=float, default=None, help="learning rate of full fine-tuning (default 5e-5)")
        q.add_argument("--weight-decay", type=float, default=None)
        q.add_argument("--grad-accum", type=int, default=None)
        q.add_argument("--patience", type=int, default=None, help="validations without improvement before stopping")

    def search_only(q):
        q.add_argument("--order", choices=["first", "second"], default=None, help="DARTS approximation (default first)")
        q.add_argument("--w-lr", type=float, default=None, help="PET/head learning rate (default 3e-4)")
        q.add_argument("--alpha-lr", type=float, default=None, help="gate-logit learning rate (default 0.1)")
        q.add_argument("--controller", choices=["shift", "none", "l0"], default=None,
                       help="budget controller: shift (S3PET), none / l0 (ablations)")
        q.add_argument("--l0-weight", type=float, default=None)
        q.add_argument("--select", choices=["best", "last"], default=None,
                       help="derive from the best-validation or the last logits")
        q.add_argument("--beta", type=float, default=None, help="gate sigmoid temperature")
        q.add_argument("--temperature", type=float, default=None, help="binary-concrete temperature")
        q.add_argument("--hard", action="store_true", help="straight-through hard gates")
        q.add_argument("--xi", type=float, default=None, help="second-order virtual step (default w-lr)")
        # The search recipe's options (SearchConfig's comments say why; defaults: the plain search).
        q.add_argument("--temperature-final", type=float, default=None,
                       help="anneal the concrete temperature geometrically to this over the bi-level steps "
                            "(default 0: no annealing)")
        q.add_argument("--gates", choices=["concrete", "hard-concrete", "deterministic"], default=None,
                       help="training gates: binary concrete (default), hard concrete (stretched and clipped: "
                            "exact 0s and 1s) or deterministic (z = p)")
        q.add_argument("--warmup-steps", type=int, default=None,
                       help="steps that train only the PET modules and head, gates fixed at p, before any "
                            "alpha step (default 0)")
        q.add_argument("--warmup-epochs", type=float, default=None,
                       help="the warm-up in passes over D_w instead of steps (default 0)")
        q.add_argument("--alpha-init", choices=["zero", "sensitivity"], default=None,
                       help="after the warm-up, set alpha from each candidate's |gate x dL/dgate| "
                            "(default zero; sensitivity needs --warmup-steps)")
        q.add_argument("--alpha-init-scale", type=float, default=None,
                       help="standard deviation of the sensitivity-initialised logits (default 1)")
        q.add_argument("--sensitivity-batches", type=int, default=None,
                       help="D_alpha batches the sensitivity score averages over (default 8)")
        q.add_argument("--selector", choices=["search", "sensitivity"], default=None,
                       help="search (default): the bi-level search ranks the candidates; sensitivity: the "
                            "warmed-up sensitivity alone ranks them, no alpha steps (needs --warmup-steps)")
        q.add_argument("--alpha-accum", type=int, default=None,
                       help="D_alpha micro-batches averaged per alpha step (default 1)")
        q.add_argument("--restarts", type=int, default=None,
                       help="independent searches (seeds seed..seed+N-1) whose gate probabilities are averaged "
                            "before the derivation (default 1)")
        q.add_argument("--exportable", action=argparse.BooleanOptionalAction, default=None,
                       help="search only candidates that 'export --to peft' or '--merge' can write "
                            "(default: on in 'run', off in 'search')")

    sp = sub.add_parser("tasks", help="list the known tasks")
    sp.add_argument("--data-dir", default=None)
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_tasks)

    sp = sub.add_parser("search", help="search a structure under a parameter budget")
    common_train(sp)
    search_only(sp)
    sp.set_defaults(model="minilm")
    sp.add_argument("--task", required=True)
    sp.add_argument("--space", default="s3pet-m")
    sp.add_argument("--budget", required=True, help="parameters (25000, 25k) or share of the backbone (0.01%%)")
    sp.add_argument("--out", required=True)
    sp.add_argument("--resume", action="store_true", help="continue a killed search from its checkpoint")
    overwrite(sp)
    sp.set_defaults(func=cmd_search)

    sp = sub.add_parser("retrain", help="train a structure from scratch and evaluate it")
    common_train(sp)
    train_only(sp)
    sp.add_argument("--structure", required=True)
    sp.add_argument("--task", required=True)
    sp.add_argument("--out", required=True)
    sp.add_argument("--resume", action="store_true",
                    help="continue a killed retrain from its checkpoint (OUT/train.pt, written at every validation)")
    overwrite(sp)
    sp.set_defaults(func=cmd_retrain)

    sp = sub.add_parser("baseline", help="train a hand-designed PET method sized to the budget")
    common_train(sp)
    train_only(sp)
    sp.set_defaults(model="minilm")
    sp.add_argument("--method", required=True, choices=BASELINE_METHODS,
                    help="hand-designed method sized to --budget, a random structure, full fine-tuning, or a "
                         "reference run through HF peft itself (peft-*, adalora)")
    sp.add_argument("--budget", default=None, help="required except for full")
    sp.add_argument("--space", default="s3pet-m", help="space of the random method")
    sp.add_argument("--task", required=True)
    sp.add_argument("--out", required=True)
    overwrite(sp)
    sp.set_defaults(func=cmd_baseline)

    sp = sub.add_parser("evaluate", help="re-evaluate the saved weights of a run")
    sp.add_argument("--run", required=True)
    sp.add_argument("--task", default=None, help="default: the run's task")
    sp.add_argument("--data-dir", default=None)
    sp.set_defaults(func=cmd_evaluate)

    sp = sub.add_parser("run", help="the main job: search, derive, retrain, evaluate, plot")
    common_train(sp)
    search_only(sp)
    sp.add_argument("--lr", type=float, default=None, help="retrain learning rate")
    sp.add_argument("--task", default="rotten-tomatoes")
    sp.add_argument("--space", default="s3pet-m")
    sp.add_argument("--budget", default="0.05%")
    sp.add_argument("--search-epochs", type=float, default=2.0, help="search passes over D_w")
    # Defaults of the main job: sized so that search + retrain + plots take a few minutes on
    # 2 CPU cores (see README); pass 0 to --max-train-samples / --max-eval-samples for all data.
    # Mean pooling here: on 2,000 examples all-MiniLM-L6-v2's own read-out (mean pooling, which it
    # was trained with) scores 0.810 test accuracy against 0.778 for its pooler (README).
    sp.set_defaults(model="minilm", max_train_samples=2000, max_eval_samples=500, epochs=2.0, lr=3e-3,
                    head_lr=1e-2, w_lr=3e-3, pooling="mean", exportable=True)
    sp.add_argument("--compare", action="store_true", help="also train a random structure and BitFit of the same budget")
    sp.add_argument("--out", required=True)
    overwrite(sp)
    sp.set_defaults(func=cmd_run)

    sp = sub.add_parser("optuna", help="discrete structure search: Optuna samples structures, each is retrained")
    common_train(sp)
    train_only(sp)
    sp.set_defaults(model="minilm")
    sp.add_argument("--task", required=True)
    sp.add_argument("--space", default="s3pet-m")
    sp.add_argument("--budget", required=True, help="parameters (25000, 25k) or share of the backbone (0.01%%)")
    sp.add_argument("--trials", type=int, required=True, help="trials this worker runs (each worker adds its own)")
    sp.add_argument("--storage", default=None, help="study storage URL: sqlite:///study.db, postgresql://..., "
                    "mysql://...; omitted: in memory")
    sp.add_argument("--study", default=None, help="study name (workers with the same name and storage share it)")
    sp.add_argument("--objective", choices=["single", "multi"], default="single",
                    help="single: validation metric; multi: validation metric vs PET parameters (NSGA-II)")
    sp.add_argument("--pruner", choices=["median", "none"], default="median",
                    help="stop weak trials at validations (single objective)")
    sp.add_argument("--granularity", choices=["auto", "module", "group"], default="auto",
                    help="one sampled size per module, or per role and layer group (auto: by space size)")
    sp.add_argument("--layer-groups", type=int, default=3, help="layer groups per stack (group granularity)")
    sp.add_argument("--out", default=None, help="run directory (default outputs/optuna/<study>)")
    sp.set_defaults(func=cmd_optuna)

    sp = sub.add_parser("plot", help="plot runs or structures (heatmaps, gates, trajectory, graph)")
    sp.add_argument("inputs", nargs="+", help="run directories or structure.json files")
    sp.add_argument("--out", default=None, help="output folder (or file for a single plot)")
    sp.add_argument("--format", default="png,svg")
    sp.set_defaults(func=cmd_plot)

    sp = sub.add_parser("transfer", help="retrain a structure on another task and/or model")
    common_train(sp)
    train_only(sp)
    sp.add_argument("--structure", required=True)
    sp.add_argument("--task", required=True)
    sp.add_argument("--mapping", choices=["depth", "stretch"], default="depth",
                    help="another model: depth keeps the module count, stretch fills every layer")
    sp.add_argument("--out", required=True)
    overwrite(sp)
    sp.set_defaults(func=cmd_transfer)

    sp = sub.add_parser("average", help="average gate scores of several searches and re-derive")
    sp.add_argument("runs", nargs="+")
    sp.add_argument("--budget", required=True)
    sp.add_argument("--out", required=True, help="structure.json to write")
    sp.set_defaults(func=cmd_average)

    sp = sub.add_parser("export", help="export a structure (and weights) to HF peft or a merged model")
    sp.add_argument("--structure", required=True)
    sp.add_argument("--weights", default=None, help="delta.safetensors of a retrain run")
    sp.add_argument("--to", choices=["peft"], default="peft")
    sp.add_argument("--merge", action="store_true", help="fold the deltas into a plain transformers model")
    sp.add_argument("--model", default=None)
    sp.add_argument("--task", default=None, help="task card (name or path) of the head; default: the run's task")
    sp.add_argument("--untrained", action="store_true",
                    help="allow exporting freshly initialised modules when there are no weights")
    sp.add_argument("--out", required=True)
    sp.set_defaults(func=cmd_export)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    _quiet_libraries()
    try:
        from s3pet import dist

        if hasattr(args, "device") and os.environ.get("WORLD_SIZE", "1") != "1":
            args.device = dist.init_from_env(args.device or "auto")  # launched by torchrun
        return int(args.func(args) or 0)
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
