"""Discrete structure search with Optuna: sample a structure, retrain it, keep the best.

The black-box alternative to the differentiable search, in the spirit of AutoPEFT: every
trial samples a discrete structure of a space, retrains it from scratch with the shared loop
(``pipeline.train_structure``) and returns its validation score (single objective, maximised
under the budget) or (validation score, PET parameters) for a Pareto front (NSGA-II).

Sampling. Each *decision* is one integer Optuna parameter, the number of units to keep:
0 = absent, LoRA rank 0..R, adapter bottleneck units 0..m, single-unit kinds 0/1.
- ``module`` granularity: one decision per (site, kind); its name is ``"<site path>:<kind>"``.
- ``group`` granularity: one decision per (stack, role, kind, layer group), shared by the
  modules it covers; its name is ``"<stack>.<role>.L<a>-<b>:<kind>"`` (layers a..b), or
  ``"<stack>.norm.emb:<kind>"`` outside the blocks. Spaces with hundreds of modules give TPE
  hundreds of dimensions and far too few trials to learn them; a role in a third of the depth
  is the level at which PET placements are usually discussed (and what differs between them).
- ``auto`` (default): ``module`` up to ``AUTO_MODULE_LIMIT`` modules, else ``group``.
Names depend only on the model, the space and the granularity, so they are stable across
trials, workers and machines.

Over the budget. A sampled request larger than the budget is repaired, never trained as is:
its modules are visited in a fixed seeded random order (the same in every trial and worker)
and each keeps as many of its requested units as still fit (the greedy derivation of the
differentiable search, with the order in place of the gate scores). The repaired structure
is a deterministic function of the sampled parameters, so the samplers still see a function
of their inputs; the order is neutral between kinds, layers and sizes (a cost- or depth-based
order would bias every repaired trial the same way). Each trial records the structure it
trained, the requested parameter count and whether it was repaired as user attributes.
A request that fits is trained as sampled, even if it leaves budget unused.

Multi-objective studies add one parameter, ``budget_share`` (log-uniform in [0.01, 1]): the
trial's cap is that share of the budget. Per-module sampling alone draws requests of about
half the space, so nearly every trial would be repaired to the full budget and the front would
have no width in parameters; the share lets NSGA-II trade size against score directly.

Trials of identical structures are not retrained: a trial whose (repaired) structure equals
that of a completed trial takes its values and says so in ``duplicate_of``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import re
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple, Sequence

from s3pet import budget as B
from s3pet import structure as S
from s3pet.configs import GRANULARITIES, OBJECTIVES, PRUNERS  # noqa: F401 (OptunaConfig's choices)
from s3pet.errors import ConfigError, S3petError
from s3pet.io import atomic_write_bytes, write_json
from s3pet.space import ModuleSpec, stack_depths, total_params
from s3pet.train import TrainConfig, resolve_device

log = logging.getLogger(__name__)

AUTO_MODULE_LIMIT = 64  # at most this many (site, kind) modules: one decision each
# TrainConfig fields that do not change a trial's result; workers may differ in them.
_LOCAL_TRAIN_FIELDS = ("device", "progress", "eval_batch_size", "log_every")


# --------------------------------------------------------------------------- decisions


@dataclass(frozen=True)
class Decision:
    """One sampled integer: how many units each of its modules keeps (0 = absent)."""

    name: str  # stable Optuna parameter name
    kind: str
    max_units: int  # the smallest full size among its modules
    modules: tuple[int, ...]  # indices into the list of full-size module specs


def resolve_granularity(n_modules: int, granularity: str = "auto") -> str:
    if granularity not in GRANULARITIES:
        raise ConfigError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")
    if granularity == "auto":
        return "module" if n_modules <= AUTO_MODULE_LIMIT else "group"
    return granularity


def decisions(specs: Sequence[ModuleSpec], granularity: str = "module", layer_groups: int = 3) -> list[Decision]:
    """The decisions of a space on a model, in module order.

    Args:
        specs: full-size modules (``instantiate(space, sites)``).
        granularity: ``module`` (one per site and kind) or ``group`` (one per stack, role,
            kind and contiguous group of layers); resolve ``auto`` first.
        layer_groups: number of layer groups per stack (group granularity).
    Raises:
        ConfigError: unknown granularity or fewer than one layer group.
    """
    if granularity not in ("module", "group"):
        raise ConfigError(f"granularity must be module or group here, got {granularity!r}")
    if layer_groups < 1:
        raise ConfigError(f"layer_groups must be at least 1, got {layer_groups}")
    depths = stack_depths(list({sp.site for sp in specs}))
    members: dict[str, list[int]] = {}
    for i, sp in enumerate(specs):
        members.setdefault(_decision_name(sp, granularity, layer_groups, depths), []).append(i)
    out = []
    for name, idx in members.items():
        if granularity == "group":  # the layer range in the name is the one really covered
            layers = sorted({specs[i].site.layer for i in idx})
            name = re.sub(r"\.G\d+\.L\{\}", f".L{layers[0]}-{layers[-1]}", name)
        out.append(Decision(name, specs[idx[0]].kind, min(specs[i].units for i in idx), tuple(idx)))
    if len({d.name for d in out}) != len(out):  # pragma: no cover - roles make paths unique
        raise ConfigError("two decisions of this space share a name")
    return out


def _decision_name(sp: ModuleSpec, granularity: str, groups: int, depths: dict[str, int]) -> str:
    s = sp.site
    if granularity == "module":
        # (site path, kind) is unique: adapters only attach to block sites (docs/ARCHITECTURE.md).
        return f"{s.path}:{sp.kind}"
    depth = depths.get(s.stack, 1)
    if not 0 <= s.layer < depth:  # embedding / final norms stand alone
        return f"{s.stack}.{s.role}:{sp.kind}"
    g = min(groups, depth)
    # "L{}" is filled with the group's layer range once its members are known.
    return f"{s.stack}.{s.role}.G{s.layer * g // depth}.L{{}}:{sp.kind}"


def sample_units(trial, decs: Sequence[Decision], n_modules: int) -> list[int]:
    """Ask the trial for every decision; returns the requested units per module."""
    units = [0] * n_modules
    for d in decs:
        u = trial.suggest_int(d.name, 0, d.max_units)
        for i in d.modules:
            units[i] = u
    return units


def repair_order(n_modules: int, seed: int) -> list[int]:
    """The fixed order in which modules keep their units when a request is over budget."""
    order = list(range(n_modules))
    random.Random(f"s3pet-optuna-repair:{seed}").shuffle(order)
    return order


def realize(specs: Sequence[ModuleSpec], units: Sequence[int], budget: int, order: Sequence[int]
            ) -> tuple[list[ModuleSpec], int, bool]:
    """The structure a request stands for, within the budget.

    Returns (kept modules in module order, requested parameters, whether it was repaired).
    A request that fits is kept as is; otherwise modules are visited in ``order`` and each
    keeps as many of its requested units as still fit, the first module needing a shared tensor
    paying for it.
    """
    req = [min(int(u), sp.units) for u, sp in zip(units, specs)]
    requested = total_params([ModuleSpec(sp.site, sp.kind, sp.params, u) for sp, u in zip(specs, req) if u])
    keep = list(req)
    repaired = requested > budget
    if repaired:
        used, paid = 0, set()
        for i in order:
            c = specs[i].unit_params
            new = {n: s for n, s in specs[i].shared.items() if n not in paid}
            extra = sum(math.prod(s) for s in new.values())
            room = budget - used - extra
            keep[i] = min(req[i], room // c) if req[i] and room >= c else 0
            if keep[i]:
                used += keep[i] * c + extra
                paid.update(new)
    kept = [ModuleSpec(sp.site, sp.kind, dict(sp.params), k) for sp, k in zip(specs, keep) if k > 0]
    return kept, requested, repaired


def structure_key(st: S.Structure) -> str:
    """A short fingerprint of what a structure trains (sites, kinds, ranks, hyper-parameters)."""
    rows = sorted((m["site"], m["role"], m["kind"], m["rank"], json.dumps(m.get("params") or {}, sort_keys=True))
                  for m in st.modules)
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- storage and study


def mask_url(url: str | None) -> str | None:
    """The storage URL with any password hidden (it is written to config and metrics files)."""
    if url is None:
        return None
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


def open_storage(url: str | None):
    """An Optuna storage for a URL: None -> in memory; ``sqlite:///path.db`` or any database
    URL SQLAlchemy knows. Raises ConfigError (one line) when it cannot be opened."""
    import optuna

    if url is None:
        return optuna.storages.InMemoryStorage()
    if not isinstance(url, str) or "://" not in url:
        raise ConfigError(f"storage {url!r} is not a database URL; use e.g. sqlite:///study.db or "
                          "postgresql://user@host/db (omit --storage for an in-memory study)")
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        # Several worker processes write one file: wait for the lock instead of failing at once.
        kwargs = {"connect_args": {"timeout": 60}}
    last = None
    for attempt in range(6):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
        except Exception as e:  # SQLAlchemy, driver and Optuna errors alike
            last = e
            text = str(e).lower()
            # Two workers creating the tables at the same moment: the loser retries.
            # (SQLite reports it as "locked", "already exists" or a UNIQUE constraint on the
            # schema-version row written by the table set-up.)
            if "locked" in text or "already exists" in text or "unique constraint" in text:
                time.sleep(0.2 * (attempt + 1))
                continue
            break
    msg = str(last).strip().splitlines()[0] if str(last).strip() else type(last).__name__
    raise ConfigError(f"cannot open study storage {mask_url(url)}: {msg}") from last


def _sampler(objective: str, seed: int | None):
    import optuna

    if objective == "multi":
        return optuna.samplers.NSGAIISampler(seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # Multivariate TPE models the decisions jointly; the constant liar keeps parallel
        # workers from proposing the same point while their trials still run.
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True)


def _pruner(pruner, objective: str):
    import optuna

    if not isinstance(pruner, str):
        return pruner  # a pruner object (tests, custom policies)
    if pruner not in PRUNERS:
        raise ConfigError(f"pruner must be one of {', '.join(PRUNERS)}, got {pruner!r}")
    if pruner == "none" or objective == "multi":  # Optuna cannot prune multi-objective trials
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner()


def _check_settings(study, settings: dict) -> None:
    """A shared study must be continued with the settings it was made with."""
    mine = _jsonable(settings)
    theirs = study.user_attrs.get("s3pet")
    if theirs is None:
        study.set_user_attr("s3pet", mine)
        theirs = study.user_attrs.get("s3pet", mine)
    mine, theirs = _flat(mine), _flat(theirs)
    diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    if diff:
        detail = "; ".join(f"{k}: study has {theirs.get(k)!r}, this worker {mine.get(k)!r}" for k in diff[:3])
        raise ConfigError(f"study '{study.study_name}' was made with other settings ({detail}); "
                          "use the same arguments in every worker, or another --study")


# --------------------------------------------------------------------------- Pareto front


class ParetoData(NamedTuple):
    """Completed trials as (parameters, score) points and which of them are non-dominated."""

    numbers: tuple[int, ...]
    params: tuple[int, ...]
    scores: tuple[float, ...]
    front: tuple[bool, ...]
    metric: str
    budget: int


def non_dominated(points: Sequence[tuple[float, float]]) -> list[bool]:
    """For (score to maximise, parameters to minimise) points: which no other point dominates."""
    out = []
    for i, (s, n) in enumerate(points):
        out.append(not any((s2 >= s and n2 <= n) and (s2 > s or n2 < n)
                           for j, (s2, n2) in enumerate(points) if j != i))
    return out


def pareto_data(trials, metric: str, budget: int) -> ParetoData:
    """Points of the completed multi-objective trials (values = (score, parameters))."""
    done = [t for t in trials if t.values is not None and len(t.values) == 2 and str(t.state).endswith("COMPLETE")]
    pts = [(float(t.values[0]), float(t.values[1])) for t in done]
    return ParetoData(tuple(t.number for t in done), tuple(int(n) for _, n in pts), tuple(s for s, _ in pts),
                      tuple(non_dominated(pts)), metric, budget)


def draw_pareto(data: ParetoData, ax=None):
    """Validation score against PET parameters (log x), front highlighted; returns the Axes."""
    if ax is None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(6, 4.2))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
    xs = [max(n, 1) for n in data.params]  # a head-only trial (0 PET parameters) sits at 1 on the log axis
    rest = [(x, s) for x, s, f in zip(xs, data.scores, data.front) if not f]
    front = sorted((x, s) for x, s, f in zip(xs, data.scores, data.front) if f)
    if rest:
        ax.scatter(*zip(*rest), s=22, color="#999999", label="trials", zorder=2)
    if front:
        ax.plot(*zip(*front), "-o", color="#0072B2", ms=6, lw=1.5, drawstyle="steps-post", label="Pareto front",
                zorder=3)
        for x, s, f, n in zip(xs, data.scores, data.front, data.numbers):
            if f:
                ax.annotate(str(n), (x, s), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.axvline(data.budget, color="#D55E00", ls="--", lw=1, label=f"budget {data.budget:,}")
    ax.set_xscale("log")
    ax.set_xlabel("PET parameters (log scale)" + (", head only drawn at 1" if 0 in data.params else ""))
    ax.set_ylabel(f"validation {data.metric}")
    ax.set_title(f"{len(data.numbers)} trials, {sum(data.front)} on the front")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return ax


# --------------------------------------------------------------------------- the search


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def _jsonable(x):
    """Plain JSON values (Optuna stores user attributes as JSON)."""
    return json.loads(json.dumps(x, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:120] or "study"


def optuna_search(model: str, task: str, space: str, budget: str | int, out: str | Path | None, trials: int,
                  storage: str | None = None, study_name: str | None = None, objective: str = "single",
                  pruner="median", cfg: TrainConfig | None = None, data_dir: str | None = None, seed: int = 0,
                  granularity: str = "auto", layer_groups: int = 3) -> dict:
    """Run ``trials`` more trials of an Optuna structure search and summarise the study.

    Args:
        model, task, space, budget: as for ``pipeline.search`` (budget: count or ``"0.05%"``).
        out: run directory; trial ``n`` trains in ``out/trials/n`` (None: ``outputs/optuna/<study>``).
        trials: trials this call runs (workers sharing a study each run their own).
        storage: None (in memory) or a database URL, e.g. ``sqlite:///study.db``.
        study_name: default: derived from model, task, space, budget and objective, so that
            workers started with the same arguments share one study.
        objective: ``single`` (maximise the validation main metric) or ``multi``
            (maximise it and minimise PET parameters; NSGA-II).
        pruner: ``median``, ``none`` or an Optuna pruner; single objective only.
        cfg: training settings of every trial (``cfg.seed`` seeds training).
        seed: seeds the repair order and, with in-memory storage, the sampler.
        granularity, layer_groups: see the module docstring.
    Returns:
        The metrics dict written to ``out/metrics.json``.
    Raises:
        ConfigError: bad arguments, an unusable storage, or a shared study made with other
            settings. BudgetError: a budget below the smallest unit. S3petError: every trial
            of this worker failed.
    """
    import optuna

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # one line per trial from us instead
    try:
        return _search(model, task, space, budget, out, trials, storage, study_name, objective, pruner, cfg,
                       data_dir, seed, granularity, layer_groups)
    finally:
        optuna.logging.set_verbosity(verbosity)


def _search(model, task, space, budget, out, trials, storage, study_name, objective, pruner, cfg, data_dir, seed,
            granularity, layer_groups) -> dict:
    import optuna

    from s3pet.pipeline import _machine, space_on_model, train_structure, versions
    from s3pet import rundir
    from s3pet.tasks import get_card

    cfg = cfg or TrainConfig()
    if objective not in OBJECTIVES:
        raise ConfigError(f"objective must be single or multi, got {objective!r}")
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ConfigError(f"trials must be a positive integer, got {trials!r}")
    optuna_storage = open_storage(storage)  # first: a bad URL fails before any model loads
    card = get_card(task)
    backbone, space_obj, specs, b, brec = space_on_model(model, space, budget, cfg.seed)
    B.check_budget([sp.unit_params for sp in specs], b)
    gran = resolve_granularity(len(specs), granularity)
    decs = decisions(specs, gran, layer_groups)
    order = repair_order(len(specs), seed)
    total_space = total_params(specs)
    if b >= total_space:
        log.warning("budget %d >= the whole space (%d params): no request is ever over budget", b, total_space)
    study_name = study_name or _slug(f"s3pet-{model}-{card.name}-{space_obj.name}-{b}-{objective}")
    # Workers of a shared study write into one folder (each its own trials/N), so it is neither
    # locked nor refused when finished: the study continues.
    out = rundir.check(out or Path("outputs") / "optuna" / _slug(study_name), resume=True)
    out.mkdir(parents=True, exist_ok=True)
    train = {k: v for k, v in asdict(cfg).items() if k not in _LOCAL_TRAIN_FIELDS}
    settings = {"model": model, "task": card.name, "space": space_obj.name, "budget": b, "objective": objective,
                "granularity": gran, "layer_groups": layer_groups if gran == "group" else None, "seed": seed,
                "train": train}

    directions = ["maximize"] if objective == "single" else ["maximize", "minimize"]
    # Workers of a shared study must not share a sampler seed, or their random start repeats.
    sampler_seed = seed if storage is None else int.from_bytes(os.urandom(4), "little")
    try:
        study = optuna.create_study(storage=optuna_storage, sampler=_sampler(objective, sampler_seed),
                                    pruner=_pruner(pruner, objective), study_name=study_name,
                                    directions=directions, load_if_exists=True)
    except (optuna.exceptions.OptunaError, ValueError) as e:
        raise ConfigError(f"cannot open study '{study_name}' in {mask_url(storage)}: {_one_line(e)}") from e
    if [d.name.lower() for d in study.directions] != directions:
        raise ConfigError(f"study '{study_name}' optimises {[d.name.lower() for d in study.directions]}, "
                          f"not {directions} (--objective {objective}); use another --study")
    _check_settings(study, settings)
    write_json(out / "config.json", {"command": "optuna", **settings, "budget": brec, "budget_arg": str(budget),
                                     "space_spec": space_obj.to_dict(), "space_params": total_space,
                                     "modules": len(specs), "decisions": len(decs), "study": study_name,
                                     "storage": mask_url(storage), "directions": directions,
                                     "pruner": pruner if isinstance(pruner, str) else type(pruner).__name__,
                                     "sampler_seed": sampler_seed, "data_dir": data_dir,
                                     "train_full": asdict(cfg), "versions": versions()})
    log.info("optuna: %s on %s, space %s (%d modules -> %d %s decisions), budget %d (%.4f%%), study '%s' "
             "in %s, %d trials", model, card.name, space_obj.name, len(specs), len(decs), gran, b,
             100 * brec["fraction"], study_name, mask_url(storage) or "memory", trials)

    mine: list[int] = []
    peak = [0.0]
    trial_seconds = [0.0]

    def run_trial(trial) -> float | tuple[float, float]:
        mine.append(trial.number)
        units = sample_units(trial, decs, len(specs))
        cap = b
        if objective == "multi":
            cap = max(1, int(trial.suggest_float("budget_share", 0.01, 1.0, log=True) * b))
        kept, requested, repaired = realize(specs, units, cap, order)
        st = S.from_specs([(sp, None) for sp in kept], backbone, f"optuna:{space_obj.name}", brec,
                          {"method": "optuna", "task": card.name, "study": study_name, "trial": trial.number,
                           "seed": seed, "repaired": repaired, "cap": cap})
        key = structure_key(st)
        for k, v in (("structure", st.to_dict()), ("structure_key", key), ("n_params", st.n_params),
                     ("requested_params", requested), ("cap", cap), ("repaired", repaired)):
            trial.set_user_attr(k, _jsonable(v))
        for t in trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            if t.user_attrs.get("structure_key") == key:
                for k in ("validation", "test", "main_metric"):
                    if k in t.user_attrs:
                        trial.set_user_attr(k, t.user_attrs[k])
                trial.set_user_attr("duplicate_of", t.number)
                return t.value if objective == "single" else tuple(t.values)
        on_eval = None
        if objective == "single":
            def on_eval(step: int, metrics: dict) -> None:
                trial.report(float(metrics["main"]), step)
                if trial.should_prune():
                    trial.set_user_attr("pruned_at_step", step)
                    raise optuna.TrialPruned(f"pruned at step {step}")
        try:
            m = train_structure(st, task, model, out / "trials" / str(trial.number), cfg, data_dir, stage="optuna",
                                extra_config={"study": study_name, "trial": trial.number, "params": trial.params,
                                              "requested_params": requested, "repaired": repaired},
                                on_eval=on_eval)
        except RuntimeError as e:  # e.g. out of memory: this trial fails, the study goes on
            trial.set_user_attr("error", _one_line(e))
            raise
        trial_seconds[0] += m["cost"]["seconds"]
        peak[0] = max(peak[0], m["cost"]["peak_memory_mb"])
        for k in ("validation", "test", "main_metric", "cost"):
            trial.set_user_attr(k, _jsonable(m[k]))
        val = float(m["validation"].get("main", float("nan")))
        return val if objective == "single" else (val, float(st.n_params))

    def report(study, ft) -> None:
        state = ft.state.name.lower()
        if state == "complete":
            dup = ft.user_attrs.get("duplicate_of")
            log.info("trial %d: validation %.4f, %s PET params%s%s", ft.number, ft.values[0],
                     f"{ft.user_attrs.get('n_params', 0):,}", " (repaired to fit)" if ft.user_attrs.get("repaired")
                     else "", f", same structure as trial {dup}" if dup is not None else "")
        elif state == "pruned":
            log.info("trial %d: pruned at step %s", ft.number, ft.user_attrs.get("pruned_at_step", "?"))
        else:
            log.warning("trial %d: %s %s", ft.number, state, ft.user_attrs.get("error", ""))

    t0 = time.perf_counter()
    study.optimize(run_trial, n_trials=trials, catch=(RuntimeError,), callbacks=[report])
    wall = time.perf_counter() - t0
    return _finish(study, out, objective, card.main_metric, brec, mine, wall, trial_seconds[0], peak[0],
                   resolve_device(cfg.device), _machine, decs, gran, mask_url(storage))


def _finish(study, out: Path, objective: str, metric: str, brec: dict, mine: list[int], wall: float,
            trial_seconds: float, peak: float, device, machine, decs, gran: str, storage: str | None) -> dict:
    """Write best_structure.json or pareto.json (+ .png) and metrics.json; returns the metrics."""
    from optuna.trial import TrialState

    from s3pet.pipeline import gpu_hours

    all_trials = study.get_trials(deepcopy=False)
    count = {s: sum(t.state == getattr(TrialState, s.upper()) for t in all_trials)
             for s in ("complete", "pruned", "fail", "running")}
    by_number = {t.number: t for t in all_trials}
    own = [by_number[n] for n in mine if n in by_number]
    own_count = {s: sum(t.state == getattr(TrialState, s.upper()) for t in own) for s in ("complete", "pruned", "fail")}
    metrics: dict[str, Any] = {
        "stage": "optuna", "study": study.study_name, "storage": storage, "objective": objective,
        "main_metric": metric, "budget": brec, "granularity": gran, "decisions": len(decs),
        "trials": {"total": len(all_trials), "complete": count["complete"], "pruned": count["pruned"],
                   "failed": count["fail"], "running": count["running"],
                   "this_worker": {"numbers": mine, "complete": own_count["complete"], "pruned": own_count["pruned"],
                                   "failed": own_count["fail"]}},
        "best": None,
        "cost": {"seconds": round(wall, 2), "trial_seconds": round(trial_seconds, 2),
                 "peak_memory_mb": round(peak, 1),
                 "gpu_hours": gpu_hours(wall, device), "machine": machine(device)},
    }
    done = [t for t in all_trials if t.state == TrialState.COMPLETE]
    if objective == "single" and done:
        best = study.best_trial
        st = S.from_dict(best.user_attrs["structure"], f"trial {best.number}")
        st.save(out / "best_structure.json")
        metrics["best"] = _trial_summary(best)
    elif objective == "multi":
        data = pareto_data(done, metric, brec["params"])
        front = [t for t, f in zip(done, data.front) if f]
        front.sort(key=lambda t: t.values[1])
        write_json(out / "pareto.json", {"metric": metric, "directions": ["maximize", "minimize"],
                                         "budget": brec, "study": study.study_name,
                                         "trials": [{**_trial_summary(t), "structure": t.user_attrs.get("structure")}
                                                    for t in front]})
        metrics["pareto"] = [_trial_summary(t) for t in front]
        if front:
            metrics["best"] = max(metrics["pareto"], key=lambda r: r["validation"])
            _save_png(draw_pareto(data).figure, out / "pareto.png")
    if not done:
        log.warning("no trial of study '%s' has completed yet", study.study_name)
    write_json(out / "metrics.json", metrics)
    if mine and own_count["fail"] == len(mine):
        reason = by_number[mine[-1]].user_attrs.get("error", "see the log")
        raise S3petError(f"all {len(mine)} trials of this worker failed ({reason}); metrics in {out}/metrics.json")
    return metrics


def _trial_summary(t) -> dict:
    ua = t.user_attrs
    return {"trial": t.number, "validation": t.values[0], "test": (ua.get("test") or {}).get("main"),
            "n_params": ua.get("n_params"), "repaired": ua.get("repaired"), "duplicate_of": ua.get("duplicate_of"),
            "validation_metrics": ua.get("validation"), "test_metrics": ua.get("test")}


def _save_png(fig, path: Path) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=150, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


__all__ = ["Decision", "ParetoData", "decisions", "draw_pareto", "non_dominated", "open_storage", "optuna_search",
           "pareto_data", "realize", "repair_order", "resolve_granularity", "sample_units"]
