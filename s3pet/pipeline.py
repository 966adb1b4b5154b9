"""The stages users run: search, retrain, baseline, evaluate. Each writes a run directory.

A run directory holds ``config.json`` (written before work starts: every setting, seed and
version), ``history.jsonl``, ``metrics.json`` and the stage's artefacts (``structure.json``,
``alphas.csv``, ``delta.safetensors``, ``search.pt``).
"""

from __future__ import annotations

import logging
import math
import platform
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import NamedTuple

import torch

import s3pet
from s3pet import budget as B
from s3pet import data as D
from s3pet import rundir
from s3pet import structure as S
from s3pet.configs import SELECTS, RunConfig
from s3pet.errors import BudgetError, ConfigError, StructureError
from s3pet.heads import TaskModel
from s3pet.io import read_json, write_json
from s3pet.models import count_params, load_backbone, load_tokenizer
from s3pet.search import SearchConfig, SearchModel, run_search, write_alphas_csv
from s3pet.space import discover_sites, instantiate, load_space, shared_params, shared_tensors, total_params
from s3pet.supernet import Supernet
from s3pet.tasks import load_task
from s3pet.train import TrainConfig, encode_task, evaluate, fit, learning_rates, resolve_device

log = logging.getLogger(__name__)


def versions() -> dict:
    import transformers

    return {"s3pet": s3pet.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def gpu_hours(seconds: float, device: torch.device) -> float:
    """GPU-hours of a stage: wall time times the GPUs that ran it (every rank under torchrun)."""
    from s3pet import dist

    return round(seconds * dist.world_size() / 3600, 5) if device.type == "cuda" else 0.0


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        from s3pet import dist

        n = dist.world_size()
        return torch.cuda.get_device_name(device) + (f" x{n}" if n > 1 else "")
    return f"cpu ({torch.get_num_threads()} threads)"


def prepare_task(task: str, model: str, max_length: int, seed: int, max_train: int, max_eval: int,
                 data_dir: str | None, positions: int | None = None):
    """Load a task and tokenise it for a model; returns (task data, tokenizer, encoded task).

    ``max_length`` 0 takes the length from the training split, capped at ``positions`` (the
    model's position embeddings, see ``max_positions``)."""
    td = load_task(task, data_dir=data_dir, seed=seed, max_train_samples=max_train or None,
                   max_eval_samples=max_eval or None)
    tok = load_tokenizer(model)
    return td, tok, encode_task(td, tok, max_length, positions)


def max_positions(backbone: torch.nn.Module) -> int | None:
    """Tokens the backbone's position embeddings can take, or None (relative positions: T5)."""
    c = backbone.config
    n = getattr(c, "n_positions", None) or getattr(c, "max_position_embeddings", None)
    if n and "roberta" in getattr(c, "model_type", ""):
        n -= (c.pad_token_id if c.pad_token_id is not None else 1) + 1  # positions start after the pad id
    return n


def check_max_length(backbone: torch.nn.Module, max_length: int) -> None:
    """ConfigError when ``--max-length`` is beyond the model's position embeddings."""
    n = max_positions(backbone)
    if n is not None and max_length > n:
        raise ConfigError(f"max_length (--max-length) is {max_length} but the model has {n} positions; "
                          f"use --max-length {n} or less")


# --------------------------------------------------------------------------- search

class SpaceOnModel(NamedTuple):
    """A space instantiated on a freshly loaded backbone, with the budget resolved."""

    backbone: torch.nn.Module
    space: object
    specs: list
    budget: int
    budget_record: dict


def space_on_model(model: str, space: str, budget: str | int, seed: int = 0, exportable: bool = False) -> SpaceOnModel:
    """Load ``model``, instantiate ``space`` on it and parse ``budget`` against its size.

    ``exportable`` keeps only candidates that ``s3pet export --to peft`` or ``--merge`` can
    always write (``s3pet.export.exportable``); ConfigError if none is left."""
    backbone = load_backbone(model, seed=seed)
    space_obj = load_space(space)
    specs = instantiate(space_obj, discover_sites(backbone))
    if exportable:
        from s3pet.export.exportable import dropped_by_kind, exportable_specs

        kept, target = exportable_specs(specs, backbone)
        if not kept:
            raise ConfigError(f"space '{space_obj.name}' has no candidate on {model} that an export can write; "
                              "search it without exportable (--no-exportable)")
        dropped = dropped_by_kind(specs, kept)
        if dropped:
            log.info("exportable: kept %d of %d candidates, so that every derived structure exports (%s); "
                     "dropped %s", len(kept), len(specs), target,
                     ", ".join(f"{k} x{n}" for k, n in sorted(dropped.items())))
        specs = kept
    bb = count_params(backbone)
    b = B.parse_budget(budget, bb)
    return SpaceOnModel(backbone, space_obj, affordable(specs, b), b, B.budget_record(b, bb))


def affordable(specs: list, budget: int) -> list:
    """``specs`` without the kinds whose shared tensors leave no room for a candidate.

    The search sets the shared tensors of the whole space aside from the budget (``Supernet``);
    when that leaves less than the smallest candidate, the kind sharing the most is dropped
    (logged), and so on, rather than refusing a budget the other kinds could use."""
    while shared_params(specs) and budget - shared_params(specs) < min(s.unit_params for s in specs):
        cost: dict[str, int] = {}
        for kind, shape in shared_tensors(specs).values():
            cost[kind] = cost.get(kind, 0) + math.prod(shape)
        worst = max(cost, key=lambda k: (cost[k], k))
        rest = [s for s in specs if s.kind != worst]
        log.warning("budget %d cannot hold the %d shared parameters of %s beside the rest of the space: "
                    "%s is not searched", budget, cost[worst], worst, worst)
        if not rest:
            raise BudgetError(f"budget of {budget} parameters cannot hold the shared tensors of {worst} "
                              f"({cost[worst]} parameters) and one candidate")
        specs = rest
    return specs


def search(model: str, task: str, space: str, budget: str | int, out: str | Path, cfg: SearchConfig | None = None,
           resume: bool = False, data_dir: str | None = None, overwrite: bool = False) -> dict:
    """Search a structure under ``budget``; writes config.json, history.jsonl, alphas.csv,
    structure.json, search.pt and metrics.json into ``out``. Returns the metrics dict.

    ``resume`` continues from ``out/search.pt`` (the settings must be those of the first
    start); ``overwrite`` replaces a finished run in ``out``. Raises S3petError subclasses
    for bad input before anything is written (see ``s3pet.rundir``)."""
    cfg = cfg or SearchConfig()
    out = rundir.check(out, resume=resume, overwrite=overwrite)
    if resume and (out / "config.json").exists():
        _check_resume(out, "search", {"command": "search", "model": model, "task": task, "space": space,
                                      "budget_arg": str(budget), "search": asdict(cfg)},
                      ("model", "task", "space", "budget_arg"))
    device = resolve_device(cfg.device)
    # Everything is loaded and checked before the folder is touched: a bad model, space, budget,
    # task or data file leaves no trace in --out.
    backbone, space_obj, specs, b, brec = space_on_model(model, space, budget, cfg.seed, cfg.exportable)
    check_max_length(backbone, cfg.max_length)
    total_space = total_params(specs)
    config = {"command": "search", "model": model, "task": task, "space": space, "space_spec": space_obj.to_dict(),
              "budget": brec, "budget_arg": str(budget), "space_params": total_space, "data_dir": data_dir,
              "search": asdict(cfg), "versions": versions()}
    td, tok, enc = prepare_task(task, model, cfg.max_length, cfg.seed, cfg.max_train_samples, cfg.max_eval_samples,
                                data_dir, max_positions(backbone))
    if b >= total_space:
        log.warning("budget %d >= the whole space (%d params): every candidate fits, nothing to search", b, total_space)
    with rundir.RunDir(out, resume=resume, overwrite=overwrite):
        if not resume or not (out / "config.json").exists():
            write_json(out / "config.json", config)
        results, probs, alphas = [], {}, {}
        for k in range(cfg.restarts):
            # Restarts: independent searches (seed + k, own D_w/D_alpha split) on the same data,
            # each in restart<k>/ with its own history and checkpoint; their gate probabilities are
            # averaged below before one derivation (as ``s3pet average`` does for separate runs).
            kcfg = replace(cfg, seed=cfg.seed + k) if cfg.restarts > 1 else cfg
            kout = out if cfg.restarts == 1 else out / f"restart{k}"
            if k:  # a fresh backbone: the supernet hooks into it
                backbone, _, specs, _, _ = space_on_model(model, space, budget, cfg.seed, cfg.exportable)
            torch.manual_seed(kcfg.seed)
            sn = Supernet(backbone, specs, b, beta=cfg.beta, temperature=cfg.temperature, hard=cfg.hard,
                          gates=cfg.gates, controller=cfg.controller, l0_weight=cfg.l0_weight)
            tm = TaskModel(backbone, td.card, tok, pooling=cfg.pooling)
            root = SearchModel(sn, tm)
            log.info("search: %s on %s, space %s (%d candidates, %d params), budget %d (%.4f%%)%s", model, task, space,
                     sn.alpha.numel(), total_space, b, 100 * brec["fraction"],
                     f", restart {k + 1} of {cfg.restarts}" if cfg.restarts > 1 else "")
            if cfg.restarts > 1:
                kout.mkdir(parents=True, exist_ok=True)
                write_json(kout / "config.json", {**config, "search": asdict(kcfg), "restart": k})
            res = run_search(root, enc, kcfg, kout, resume=resume)
            for rule, a in res.alphas.items():  # every rule's logits: the selected one and the alternatives
                sn.set_alpha(a)
                with torch.no_grad():
                    probs.setdefault(rule, []).append(sn.gate_probs().detach().double().cpu())
                    alphas.setdefault(rule, []).append(a.detach().double().cpu())
            sn.set_alpha(res.selected_alpha)
            if cfg.restarts > 1:
                write_alphas_csv(kout / "alphas.csv", sn.candidate_rows())
            results.append(res)
        res = results[-1]
        # The selected rule's structure, then the other rules' (structure-<rule>.json: the same search,
        # logits chosen otherwise, e.g. to retrain the last logits' structure without searching again).
        structures = {}
        for rule in SELECTS:
            p_mean = torch.stack(probs[rule]).mean(0) if cfg.restarts > 1 else None
            with torch.no_grad():  # after restarts the mean logits only break ties in the mean probabilities
                sn.set_alpha(torch.stack(alphas[rule]).mean(0).to(sn.alpha.dtype))
                rows = sn.candidate_rows(p_mean)
                kept = sn.derive_specs(b, p=p_mean)
            st = S.from_specs(kept, backbone, space_obj.name, brec,
                              {"task": task, **({"task_name": td.card.name} if td.card.name != task else {}),
                               "seed": cfg.seed, "select": rule, "step": res.steps_of[rule], "order": cfg.order,
                               "controller": cfg.controller, **({"restarts": cfg.restarts} if cfg.restarts > 1 else {})})
            if rule == cfg.select:
                write_alphas_csv(out / "alphas.csv", rows)
            st.save(out / ("structure.json" if rule == cfg.select else f"structure-{rule}.json"))
            structures[rule] = st
        st = structures[cfg.select]
        device = resolve_device(cfg.device)
        metrics = {"stage": "search", "validation_soft_gates": res.best_validation, "best_step": res.best_step,
                   "select_steps": res.steps_of,  # the step each rule's logits are from
                   **enc.truncation(),
                   "steps": res.steps, "structure": {"n_params": st.n_params, "modules": len(st.modules),
                                                     "by_kind": st.counts_by_kind(), "budget": brec},
                   "cost": {"seconds": round(res.seconds, 2), "peak_memory_mb": round(res.peak_memory_mb, 1),
                            "gpu_hours": gpu_hours(res.seconds, device),
                            "machine": _machine(device)}}
        if cfg.restarts > 1:
            metrics["restarts"] = [{"seed": cfg.seed + k, "validation_soft_gates": r.best_validation,
                                    "best_step": r.best_step, "steps": r.steps, "seconds": round(r.seconds, 2)}
                                   for k, r in enumerate(results)]
            metrics["cost"]["seconds"] = round(sum(r.seconds for r in results), 2)
            metrics["cost"]["gpu_hours"] = gpu_hours(sum(r.seconds for r in results), device)
            metrics["cost"]["peak_memory_mb"] = round(max(r.peak_memory_mb for r in results), 1)
        write_json(out / "metrics.json", metrics)  # last: its presence marks the run finished
    log.info("structure: %s", st.summary())
    return metrics


# Settings a resumed search may change: they do not alter what is computed.
# Settings a resumed run may change: they do not alter what is computed.
_RESUME_FREE = ("progress", "device", "compile", "eval_batch_size", "tensorboard")


def _check_resume(out: Path, section: str, config: dict, keys: tuple[str, ...]) -> None:
    """ConfigError unless a ``--resume`` into ``out`` repeats its first start: the top-level
    ``keys`` and every setting of ``config[section]`` but ``_RESUME_FREE`` must be equal."""
    try:
        old = read_json(out / "config.json")
        old_cfg = dict(old[section])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"--resume: {out / 'config.json'} is not a {config['command']} config "
                          f"({type(e).__name__}); start afresh without --resume in another --out") from e
    diff = [f"{k} {old.get(k)!r} -> {config.get(k)!r}" for k in keys if old.get(k) != config.get(k)]
    diff += [f"{k} {old_cfg.get(k)!r} -> {v!r}" for k, v in config[section].items()
             if k not in _RESUME_FREE and old_cfg.get(k) != v]
    if diff:
        raise ConfigError(f"--resume: {out} was started with other settings ({'; '.join(diff)}); repeat the "
                          f"original settings or start a new --out")


# --------------------------------------------------------------------------- retrain / baselines

def _save_delta(path: Path, named: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save

    from s3pet.io import atomic_write_bytes

    atomic_write_bytes(path, save({k: v.detach().contiguous().cpu() for k, v in named.items()}))


def prune_at_start(tm: TaskModel, deltaset, enc, cfg: TrainConfig, device: torch.device) -> None:
    """Choose the supports of modules pruned on a batch (SNIP of the large-sparse adapter) on
    the first training batch of epoch 0 in its seeded order, in eval mode (no dropout), from a
    dense initialisation seeded by ``cfg.seed``: the same choice on every start and resume."""
    from s3pet.deltas.adapter import prune_on_batch

    first = next(iter(D.batches(enc.train, cfg.batch_size, enc.pad_id, shuffle=True, seed=cfg.seed, epoch=0)), None)
    if first is None:
        return
    tm.to(device)
    deltaset.to(device)
    was = tm.training
    tm.eval()
    batch = D.to_device(first, device)
    try:
        n = prune_on_batch(list(deltaset.modules()), lambda: tm.loss(tm(batch), batch["labels"]), cfg.seed)
    finally:
        tm.train(was)
    if n:
        log.info("pruned %d sparse adapter(s) by SNIP on the first training batch", n)


def train_structure(structure: S.Structure | None, task: str, model: str, out: str | Path, cfg: TrainConfig,
                    data_dir: str | None = None, stage: str = "retrain", extra_config: dict | None = None,
                    on_eval=None, overwrite: bool = False, extra_metrics: dict | None = None,
                    resume: bool = False) -> dict:
    """Train a structure (or every weight when ``structure`` is None: full fine-tuning) from
    scratch on a fresh backbone; best checkpoint on validation, reported on test.
    ``on_eval(step, metrics)`` is passed to ``fit`` (called after each validation);
    ``overwrite`` replaces a finished run in ``out``; ``extra_metrics`` are added to metrics.json;
    ``resume`` continues a killed run from ``out/train.pt`` (written at every validation; the
    settings must be the first start's) and ends as the uninterrupted run would."""
    out = rundir.check(out, overwrite=overwrite, resume=resume)
    full = structure is None
    config = {"command": stage, "model": model, "task": task, "data_dir": data_dir, "train": asdict(cfg),
              "versions": versions(), **(extra_config or {})}
    if structure is not None:
        config["structure"] = structure.to_dict()
    if resume:
        _check_resume(out, "train", config, ("command", "model", "task", "structure"))
    device = resolve_device(cfg.device)
    backbone = load_backbone(model, seed=cfg.seed)
    check_max_length(backbone, cfg.max_length)
    td, tok, enc = prepare_task(task, model, cfg.max_length, cfg.seed, cfg.max_train_samples, cfg.max_eval_samples,
                                data_dir, max_positions(backbone))
    torch.manual_seed(cfg.seed)
    deltaset = None
    if structure is not None:
        deltaset = S.apply(structure, backbone)
        if cfg.dp and len(deltaset.shared):
            raise ConfigError(f"--dp does not support shared tensors ({', '.join(sorted({t['kind'] for t in structure.shared}))}"
                              "): every module uses them, and per-example gradients are taken module by module")
        if cfg.dp and sum(p.numel() for p in deltaset.parameters()) != deltaset.kept_params():
            raise ConfigError("--dp does not support modules trained through a reparametrisation (a prefix with its "
                              "MLP): per-example gradients are taken of the kept tensors; set \"mlp\": false")
    tm = TaskModel(backbone, td.card, tok, pooling=cfg.pooling)
    groups = {"head": tm.head_parameters()}
    if full:
        groups["backbone"] = [p for p in backbone.parameters()]
    else:
        for kind, ps in deltaset.kind_parameters().items():  # one group per kind: each trains at its own rate
            groups[f"kind:{kind}"] = ps
        deltaset.to(device)
    if deltaset is not None:
        prune_at_start(tm, deltaset, enc, cfg, device)
    rates = learning_rates(cfg, [k[len("kind:"):] for k in groups if k.startswith("kind:")], full)
    n_trainable = sum(p.numel() for ps in groups.values() for p in ps)
    n_head = sum(p.numel() for p in groups["head"])
    n_pet = n_trainable - n_head if full else deltaset.kept_params()  # counted: what is kept after training
    if structure is not None and n_pet != structure.n_params:
        raise StructureError(f"built {n_pet} PET parameters but the structure lists {structure.n_params}")
    if not full and n_trainable - n_head != n_pet:
        log.info("training %d PET parameters, %d of them kept after training (prefix reparametrisation)",
                 n_trainable - n_head, n_pet)
    with rundir.RunDir(out, overwrite=overwrite, resume=resume):
        if not resume:
            if structure is not None:
                structure.save(out / "structure.json")
            write_json(out / "config.json", config)
        res = fit(tm, groups, enc, cfg, out, full=full, on_eval=on_eval, rates=rates, checkpoint=out / "train.pt",
                  resume=resume, modules=[tm] if deltaset is None else [tm, deltaset])
        named = {f"head.{k}": v for k, v in tm.head.state_dict().items()}
        if full:
            named.update({f"backbone.{k}": v for k, v in backbone.state_dict().items()})
        else:
            named.update({f"deltas.{k}": v for k, v in deltaset.bake().state_dict().items()})
        _save_delta(out / "delta.safetensors", named)
        bb = count_params(backbone) if not full else n_pet
        metrics = {"stage": stage, "task": task, "model": model, "main_metric": td.card.main_metric,
                   "validation": res.best_validation, "test": res.test, "best_step": res.best_step,
                   "steps": res.steps, "params": {"pet": n_pet, "head": n_head, "backbone": bb,
                                                  "pet_share_of_backbone": n_pet / bb if bb else 0.0,
                                                  **({"pet_trained": n_trainable - n_head}
                                                     if n_trainable - n_head != n_pet else {})},
                   "split_info": td.split_info, "learning_rates": rates, "pooling": tm.pooling, **enc.truncation(),
                   "cost": {"seconds": round(res.seconds, 2), "peak_memory_mb": round(res.peak_memory_mb, 1),
                            "gpu_hours": gpu_hours(res.seconds, device),
                            "machine": _machine(device)}, **privacy_metrics(res), **(extra_metrics or {})}
        write_json(out / "metrics.json", metrics)  # last: its presence marks the run finished
        (out / "train.pt").unlink(missing_ok=True)  # finished: nothing to resume
    return metrics


def privacy_metrics(res) -> dict:
    """``{"privacy": ...}`` of a differentially private run (epsilon spent at delta), else ``{}``."""
    return {"privacy": res.privacy} if res.privacy is not None else {}


def retrain(structure_path: str | Path | S.Structure, task: str, out: str | Path, cfg: TrainConfig | None = None,
            model: str | None = None, data_dir: str | None = None, overwrite: bool = False,
            resume: bool = False) -> dict:
    """Retrain a structure (a file, a run folder holding one, or a Structure) on a task (on its own
    base model unless ``model`` is given); ``resume`` continues a killed retrain in ``out``."""
    st = structure_path if isinstance(structure_path, S.Structure) else S.load(structure_path)
    model = model or st.base_model.get("name_or_path")
    if not model:
        where = "the structure" if isinstance(structure_path, S.Structure) else structure_path
        raise StructureError(f"{where}: base_model.name_or_path is empty; pass --model")
    return train_structure(st, task, model, out, cfg or TrainConfig(), data_dir, overwrite=overwrite, resume=resume)


def run_folder(run_dir: str | Path) -> Path:
    """The folder holding a retrain/baseline run's weights: ``run_dir`` itself, or the ``retrain/``
    stage of a main job (``s3pet run``). ConfigError when neither is a finished run."""
    run = Path(run_dir)
    if not (run / "delta.safetensors").is_file() and (run / "retrain" / "delta.safetensors").is_file():
        run = run / "retrain"  # the main job's folder: its retrained structure
    if not all((run / f).is_file() for f in ("config.json", "delta.safetensors", "metrics.json")):
        hint = " (a search run holds no trained weights: retrain its structure.json)" if (
            run / "search.pt").is_file() else ""
        raise ConfigError(f"{run} is not a finished retrain/baseline run (needs config.json, delta.safetensors "
                          f"and metrics.json){hint}")
    return run


def read_run_config(run_dir: str | Path) -> tuple[Path, dict, TrainConfig]:
    """``(folder, config.json, its TrainConfig)`` of a finished retrain/baseline run (see ``run_folder``)."""
    run = run_folder(run_dir)
    try:
        config = read_json(run / "config.json")
        cfg = TrainConfig.from_dict({"pooling": "mean", **config.get("train", {})})  # runs before pooling: mean
    except (OSError, ValueError, AttributeError, TypeError) as e:  # ConfigError passes: it is a one-liner
        raise ConfigError(f"{run / 'config.json'} is not a run config ({type(e).__name__}: {e})") from e
    missing = [k for k in ("task", "model") if not isinstance(config.get(k), str)]
    if missing:
        raise ConfigError(f"{run / 'config.json'} is not a run config (no {' or '.join(missing)})")
    return run, config, cfg


class LoadedRun(NamedTuple):
    """A finished run's task model with its trained weights, ready to evaluate or predict."""

    path: Path  # the folder of the weights
    model: TaskModel  # backbone + PET modules (hooked in) + head, on ``device``
    deltas: object  # the DeltaSet, or None for full fine-tuning
    card: object  # the TaskCard the head was built for
    tokenizer: object
    config: dict  # the run's config.json
    train: TrainConfig  # its training settings (max_length, eval_batch_size, precision, ...)
    device: torch.device


def load_run(run_dir: str | Path, task: str | None = None, device: str | None = None) -> LoadedRun:
    """Rebuild a retrain/baseline run (or the main job's ``retrain/``) from its config and
    ``delta.safetensors``: fresh backbone, the structure's modules with their trained weights, the head.

    ``task`` builds the head for another task's card (its labels must fit the saved head);
    ``device`` overrides the run's own setting (``auto``, ``cpu``, ``cuda:N``). Needs no task data.
    Raises ConfigError for a folder that is not a finished run or weights that do not fit it."""
    from safetensors.torch import load_file

    from s3pet.tasks import get_card

    run, config, cfg = read_run_config(run_dir)
    task = task or config["task"]
    model = config["model"]
    card = get_card(task)
    backbone = load_backbone(model, seed=cfg.seed)
    tok = load_tokenizer(model)
    if config.get("method") == "lst":  # a side network beside the backbone, rebuilt at its width
        from s3pet import lst

        d, f, layers = lst.dims(backbone)
        tm = lst.LSTModel(backbone, card, lst.SideNetwork(d, f, layers, config["lst"]["width"]), tok,
                          pooling=cfg.pooling)
    else:
        tm = TaskModel(backbone, card, tok, pooling=cfg.pooling)
    try:
        weights = load_file(str(run / "delta.safetensors"))
    except Exception as e:  # safetensors raises its own error type for a torn file
        raise ConfigError(f"{run / 'delta.safetensors'} cannot be read ({str(e).splitlines()[0]})") from e
    deltaset = None
    try:
        if config.get("method") == "lst":
            tm.side.load_state_dict({k[len("side."):]: v for k, v in weights.items() if k.startswith("side.")})
        elif "structure" in config:
            deltaset = S.apply(S.from_dict(config["structure"], str(run / "config.json")), backbone).bake()
            deltaset.load_state_dict({k[len("deltas."):]: v for k, v in weights.items() if k.startswith("deltas.")})
        else:
            backbone.load_state_dict({k[len("backbone."):]: v for k, v in weights.items()
                                      if k.startswith("backbone.")})
    except RuntimeError as e:  # missing, unexpected or mis-shaped tensors
        raise ConfigError(f"{run / 'delta.safetensors'} does not fit the run's structure: "
                          f"{str(e).splitlines()[0]}") from e
    head = {k[len("head."):]: v for k, v in weights.items() if k.startswith("head.")}
    try:
        tm.head.load_state_dict(head)
    except RuntimeError as e:
        raise ConfigError(f"the saved head does not fit task {task} (trained on {config['task']}?): "
                          f"{str(e).splitlines()[0]}") from e
    dev = resolve_device(device or cfg.device)
    tm.to(dev).eval()
    if deltaset is not None:
        deltaset.to(dev)
    return LoadedRun(run, tm, deltaset, card, tok, config, cfg, dev)


def run_max_length(lr: LoadedRun) -> int:
    """The max length a loaded run tokenises with: its setting, or, for a length taken from the
    data (``max_length`` 0), the one the run used (its metrics.json), not one of the data now."""
    if lr.train.max_length:
        return lr.train.max_length
    used = read_json(lr.path / "metrics.json").get("max_length")
    if isinstance(used, int) and used > 0:
        return used
    return max_positions(lr.model.backbone) or 512  # an older run without the record: the model's limit


def evaluate_run(run_dir: str | Path, task: str | None = None, data_dir: str | None = None,
                 split: str = "test") -> dict:
    """Re-evaluate the saved weights of a retrain/baseline run (or of the main job's ``retrain/``)
    on a task's validation and test splits."""
    lr = load_run(run_dir, task)
    cfg, config = lr.train, lr.config
    task = task or config["task"]
    td, _, enc = prepare_task(task, config["model"], run_max_length(lr), cfg.seed, 0, cfg.max_eval_samples,
                              data_dir or config.get("data_dir"))
    res = {s: evaluate(lr.model, getattr(enc, s), td.card, enc.pad_id, cfg.eval_batch_size, lr.device, cfg.precision)
           for s in ("validation", "test")}
    return {"run": str(lr.path), "task": task, **res}


def baseline(method: str, budget: str | int | None, task: str, out: str | Path, cfg: TrainConfig | None = None,
             model: str = "minilm", space: str = "s3pet-m", data_dir: str | None = None,
             overwrite: bool = False, resume: bool = False) -> dict:
    """Train a hand-designed method (or a random structure of ``space``) sized to ``budget``;
    ``resume`` continues a killed run in ``out`` (s3pet's own structures and full fine-tuning)."""
    from s3pet import peft_methods
    from s3pet.baselines import METHODS, baseline_structure

    cfg = cfg or TrainConfig()
    if resume and (method in peft_methods.METHODS or method == "lst"):
        raise ConfigError(f"--resume is not supported for --method {method} (it trains outside s3pet's "
                          "checkpointed loop); run it again with --overwrite")
    if method in peft_methods.METHODS:
        return train_peft(method, budget, task, out, cfg, model=model, data_dir=data_dir, overwrite=overwrite)
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose from {', '.join(METHODS + peft_methods.METHODS)}")
    if method != "full" and budget is None:
        raise ConfigError(f"--budget is required for method {method}")
    if method == "full" and budget is not None:
        raise ConfigError(f"--budget {budget} does not apply to --method full (every weight trains); drop --budget")
    if method == "lst":
        return train_lst(budget, task, out, cfg, model=model, data_dir=data_dir, overwrite=overwrite)
    rundir.check(out, overwrite=overwrite, resume=resume)
    backbone = load_backbone(model, seed=cfg.seed)
    bb = count_params(backbone)
    st, brec = None, None
    if method != "full":
        b = B.parse_budget(budget, bb)
        brec = B.budget_record(b, bb)
        st = baseline_structure(method, backbone, b, seed=cfg.seed, space=space, budget_record=brec)
        log.info("%s under %d: %s", method, b, st.summary())
    del backbone
    return train_structure(st, task, model, out, cfg, data_dir, stage=f"baseline:{method}",
                           extra_config={"method": method, "budget": brec,
                                         "space": space if method == "random" else None},
                           overwrite=overwrite, extra_metrics={"method": method}, resume=resume)


def train_lst(budget: str | int, task: str, out: str | Path, cfg: TrainConfig, model: str = "minilm",
              data_dir: str | None = None, overwrite: bool = False) -> dict:
    """Train ladder side-tuning (``s3pet.lst``) sized to ``budget``: config.json, history.jsonl,
    delta.safetensors (``side.*``, ``head.*``) and metrics.json, as a baseline run."""
    from s3pet import lst

    out = rundir.check(out, overwrite=overwrite)
    backbone = load_backbone(model, seed=cfg.seed)
    lst.dims(backbone)  # an encoder, or a one-line error before anything else loads
    check_max_length(backbone, cfg.max_length)
    bb = count_params(backbone)
    brec = B.budget_record(B.parse_budget(budget, bb), bb)
    td, tok, enc = prepare_task(task, model, cfg.max_length, cfg.seed, cfg.max_train_samples, cfg.max_eval_samples,
                                data_dir)
    torch.manual_seed(cfg.seed)
    tm, info = lst.build(backbone, td.card, brec["params"], tok, pooling=cfg.pooling)
    log.info("%s", lst.describe(info))
    config = {"command": "baseline:lst", "model": model, "task": task, "data_dir": data_dir, "method": "lst",
              "budget": brec, "lst": info, "train": asdict(cfg), "versions": versions()}
    groups = {"side": list(tm.side.parameters()), "head": tm.head_parameters()}
    rate = lst.learning_rate(cfg)
    rates = {"side": rate, "head": (cfg.head_lr * cfg.lr_scale) or rate}
    device = resolve_device(cfg.device)
    with rundir.RunDir(out, overwrite=overwrite):
        write_json(out / "config.json", config)
        res = fit(tm, groups, enc, cfg, out, rates=rates)
        _save_delta(out / "delta.safetensors", {**{f"side.{k}": v for k, v in tm.side.state_dict().items()},
                                                **{f"head.{k}": v for k, v in tm.head.state_dict().items()}})
        n_head = sum(p.numel() for p in groups["head"])
        metrics = {"stage": "baseline:lst", "method": "lst", "task": task, "model": model,
                   "main_metric": td.card.main_metric, "validation": res.best_validation, "test": res.test,
                   "best_step": res.best_step, "steps": res.steps,
                   "params": {"pet": info["params"], "head": n_head, "backbone": bb,
                              "pet_share_of_backbone": info["params"] / bb},
                   "lst": info, "split_info": td.split_info, "learning_rates": rates, "pooling": tm.pooling,
                   "cost": {"seconds": round(res.seconds, 2), "peak_memory_mb": round(res.peak_memory_mb, 1),
                            "gpu_hours": gpu_hours(res.seconds, device), "machine": _machine(device)},
                   **privacy_metrics(res)}
        write_json(out / "metrics.json", metrics)  # last: its presence marks the run finished
    return metrics


def train_peft(method: str, budget: str | int | None, task: str, out: str | Path, cfg: TrainConfig,
               model: str = "minilm", data_dir: str | None = None, overwrite: bool = False) -> dict:
    """Train a reference method through HF peft itself (``s3pet.peft_methods``) with s3pet's loop,
    splits and metrics; writes config.json, history.jsonl, metrics.json and the peft adapter
    (``adapter/``, loadable with ``PeftModel.from_pretrained``)."""
    from s3pet import peft_methods as PM
    from s3pet.train import planned_steps

    out = rundir.check(out, overwrite=overwrite)
    td, tok, enc = prepare_task(task, model, cfg.max_length, cfg.seed, cfg.max_train_samples, cfg.max_eval_samples,
                                data_dir)
    brec = None
    if method in PM.BUDGETED:
        if budget is None:
            raise ConfigError(f"--budget is required for method {method}")
        bb = count_params(load_backbone(model, seed=cfg.seed))
        brec = B.budget_record(B.parse_budget(budget, bb), bb)
    torch.manual_seed(cfg.seed)
    _, total = planned_steps(cfg, len(enc.train))
    tm, info = PM.build(method, model, td.card, brec and brec["params"], total, cfg.seed)
    config = {"command": f"baseline:{method}", "model": model, "task": task, "data_dir": data_dir,
              "method": method, "budget": brec, "train": asdict(cfg), "peft": info, "versions": versions()}
    group = f"kind:{PM.RATE_KIND}"
    groups = {group: [], "head": tm.head_parameters()}
    head_ids = {id(p) for p in groups["head"]}
    groups[group] = [p for p in tm.peft_model.parameters() if p.requires_grad and id(p) not in head_ids]
    rates = learning_rates(cfg, [PM.RATE_KIND])
    if cfg.dp and method == "adalora":  # its orthogonality penalty is one term for the whole batch
        raise ConfigError("--dp does not support adalora (its loss is not a sum over examples)")
    after = PM.adalora_step(tm) if method == "adalora" else None
    device = resolve_device(cfg.device)
    with rundir.RunDir(out, overwrite=overwrite):
        write_json(out / "config.json", config)
        res = fit(tm, groups, enc, cfg, out, on_eval=None, rates=rates, after_step=after)
        PM.save_adapter(tm, out / "adapter")
        n_pet, n_head = PM.n_pet_params(tm), sum(p.numel() for p in groups["head"])
        bb = count_params(tm.peft_model.base_model.model.base_model) - n_pet
        params = {"pet": info.get("final_params", n_pet), "trained": n_pet, "head": n_head, "backbone": bb}
        params["pet_share_of_backbone"] = params["pet"] / bb
        metrics = {"stage": f"baseline:{method}", "method": method, "task": task, "model": model,
                   "main_metric": td.card.main_metric, "validation": res.best_validation, "test": res.test,
                   "best_step": res.best_step, "steps": res.steps, "params": params, "split_info": td.split_info,
                   **enc.truncation(),
                   "learning_rates": rates, "pooling": "model's own (AutoModelForSequenceClassification)",
                   "cost": {"seconds": round(res.seconds, 2), "peak_memory_mb": round(res.peak_memory_mb, 1),
                            "gpu_hours": gpu_hours(res.seconds, device), "machine": _machine(device)},
                   **privacy_metrics(res)}
        write_json(out / "metrics.json", metrics)  # last: its presence marks the run finished
    return metrics


def run_config(cfg: RunConfig, data_dir: str | None = None) -> dict:
    """The main job's config.json: every setting of the job and its stages, and the versions."""
    return {"command": "run", **asdict(cfg), "data_dir": data_dir, "versions": versions()}


def run_all(out: str | Path, cfg: RunConfig | None = None, data_dir: str | None = None,
            overwrite: bool = False) -> dict:
    """The main job: search -> derive -> retrain -> evaluate -> plot (-> compare), one folder per stage.

    ``cfg`` defaults to ``RunConfig()``, the job ``s3pet run`` runs with no flags; it is saved as
    ``out/config.json`` (``s3pet run --config`` replays it). ``overwrite`` replaces a finished
    main job (``summary.json``) and each finished stage in it."""
    from s3pet.plot import plot_paths

    cfg = cfg or RunConfig()
    with rundir.RunDir(out, overwrite=overwrite, finished="summary.json") as rd:
        write_json(rd.path / "config.json", run_config(cfg, data_dir))
        summary = _run_all(cfg.model, cfg.task, cfg.space, cfg.budget, rd.path, cfg.search, cfg.train, cfg.compare,
                           data_dir, overwrite, plot_paths)
    return summary


def _run_all(model, task, space, budget, out: Path, scfg, tcfg, compare, data_dir, overwrite, plot_paths) -> dict:
    t0 = time.perf_counter()
    sm = search(model, task, space, budget, out / "search", scfg, data_dir=data_dir, overwrite=overwrite)
    rm = retrain(out / "search" / "structure.json", task, out / "retrain", tcfg, model=model, data_dir=data_dir,
                 overwrite=overwrite)
    summary = {"model": model, "task": task, "space": space, "budget": sm["structure"]["budget"],
               "structure": sm["structure"], "retrain": {"test": rm["test"], "validation": rm["validation"],
                                                         "params": rm["params"]},
               "cost": {"search_seconds": sm["cost"]["seconds"], "retrain_seconds": rm["cost"]["seconds"],
                        "search_over_retrain": round(sm["cost"]["seconds"] / max(rm["cost"]["seconds"], 1e-9), 3)}}
    if compare:
        summary["compare"] = {}
        from s3pet.baselines import COMPARE

        for method in COMPARE:
            bm = baseline(method, sm["structure"]["budget"]["params"], task, out / "compare" / method, tcfg,
                          model=model, space=space, data_dir=data_dir, overwrite=overwrite)
            summary["compare"][method] = {"test": bm["test"], "params": bm["params"]}
    plots = plot_paths([out], out / "plots")
    summary["plots"] = [str(p) for p in plots]
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    write_json(out / "summary.json", summary)
    print(format_summary(summary, rm.get("main_metric", "main")))
    return summary


def format_summary(s: dict, metric: str) -> str:
    st = s["structure"]
    kinds = ", ".join(f"{k} x{v['modules']} ({v['params']:,})" for k, v in sorted(st["by_kind"].items()))
    bb = s["retrain"]["params"]["backbone"] or 1
    lines = [f"s3pet: {s['model']} on {s['task']}, space {s['space']}, budget {st['budget']['params']:,} "
             f"({100 * st['budget']['fraction']:.3f}% of the backbone)",
             f"  structure: {st['modules']} modules: {kinds}",
             f"             {st['n_params']:,} params = {100 * st['n_params'] / bb:.4f}% of the backbone, "
             f"{100 * st['n_params'] / st['budget']['params']:.1f}% of the budget (+ head "
             f"{s['retrain']['params']['head']:,}, not counted)",
             f"  test {metric}: {s['retrain']['test']['main']:.4f} (s3pet)"]
    for k, v in (s.get("compare") or {}).items():
        lines.append(f"  test {metric}: {v['test']['main']:.4f} ({k}, {v['params']['pet']:,} params)")
    lines.append(f"  time: search {s['cost']['search_seconds']:.0f} s, retrain {s['cost']['retrain_seconds']:.0f} s, "
                 f"total {s['seconds']:.0f} s")
    lines.append(f"  plots: {plot_list(s['plots'])}")
    return "\n".join(lines)


def plot_list(paths: list) -> str:
    """The PNG plots by their path under the plots folder ("search/gates.png, retrain/trajectory.png"):
    stages hold files of one name, so a bare file name would list "trajectory.png" twice."""
    import os

    pngs = [Path(p) for p in paths if str(p).endswith(".png")]
    if not pngs:
        return "(none)"
    root = Path(os.path.commonpath([str(p.parent) for p in pngs]))
    return ", ".join(p.relative_to(root).as_posix() for p in pngs) + f" (in {root}/)"
