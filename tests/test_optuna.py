"""Optuna structure search: sampling and repair, single/multi objective, shared studies, pruning."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from s3pet import structure as S
from s3pet.cli import main
from s3pet.errors import ConfigError
from s3pet.optuna_search import (decisions, non_dominated, optuna_search, realize, repair_order,
                                 resolve_granularity)
from s3pet.space import instantiate, load_space, shared_tensors, total_params
from s3pet.train import TrainConfig
from synthetic import write_sentiment_task

pytestmark = pytest.mark.usefixtures("one_thread")

BUDGET = 500  # tiny-bert's s3pet-m space holds 2,060 parameters: most requests need repair
TRAIN_FLAGS = ["--max-steps", "4", "--batch-size", "16", "--eval-every", "2", "--no-progress"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return str(write_sentiment_task(tmp_path_factory.mktemp("optuna") / "task", n_train=64, n_eval=20))


def _cfg(**kw):
    base = dict(max_steps=4, batch_size=16, lr=1e-2, eval_every=2, progress=False, log_every=2)
    base.update(kw)
    return TrainConfig(**base)


def _trial_structures(run: Path) -> dict[int, S.Structure]:
    return {int(d.name): S.load(d / "structure.json") for d in (run / "trials").iterdir()}


# --------------------------------------------------------------------------- sampling and repair


@pytest.mark.parametrize("space", ["s3pet-m", "unified"])
@pytest.mark.parametrize("granularity", ["module", "group"])
def test_decisions_cover_every_module_once_with_stable_names(tiny_sites, space, granularity):
    specs = instantiate(load_space(space), tiny_sites("tiny-bert"))
    decs = decisions(specs, granularity, layer_groups=1)  # tiny-bert has 2 layers: one group of both
    covered = sorted(i for d in decs for i in d.modules)
    assert covered == list(range(len(specs)))
    assert len({d.name for d in decs}) == len(decs)
    assert all(d.max_units == min(specs[i].units for i in d.modules) for d in decs)
    assert [d.name for d in decisions(specs, granularity, layer_groups=1)] == [d.name for d in decs]
    if granularity == "module":
        assert {d.name for d in decs} == {f"{sp.site.path}:{sp.kind}" for sp in specs}
    else:
        names = {d.name for d in decs}
        assert {"encoder.attn.q.L0-1:lora", "encoder.norm.emb:lnfit"} <= names
        assert len(decs) < len(specs)
        assert {d.name for d in decisions(specs, granularity, layer_groups=2)} >= {"encoder.attn.q.L0-0:lora",
                                                                                   "encoder.attn.q.L1-1:lora"}


def test_auto_granularity_switches_to_groups_for_large_spaces():
    assert resolve_granularity(38) == "module"
    assert resolve_granularity(110) == "group"
    with pytest.raises(ConfigError):
        resolve_granularity(10, "layers")


def test_repair_is_deterministic_and_within_budget(tiny_sites):
    specs = instantiate(load_space("unified"), tiny_sites("tiny-bert"))
    order = repair_order(len(specs), seed=0)
    full = [sp.units for sp in specs]
    kept, requested, repaired = realize(specs, full, BUDGET, order)
    assert repaired and requested == total_params(specs)  # the unified space's shared tensors once
    assert 0 < total_params(kept) <= BUDGET
    # Greedy: no module short of its request could take one more unit (and the shared tensors
    # it would be the first to need).
    left = BUDGET - total_params(kept)
    units = {k.key: k.units for k in kept}
    paid = set(shared_tensors(kept))
    extra = {sp.key: sum(math.prod(v) for n, v in sp.shared.items() if n not in paid) for sp in specs}
    assert all(left < sp.unit_params + extra[sp.key] for sp in specs if units.get(sp.key, 0) < sp.units)
    again, _, _ = realize(specs, full, BUDGET, repair_order(len(specs), seed=0))
    assert [(k.key, k.units) for k in again] == [(k.key, k.units) for k in kept]
    # A request that fits is trained as sampled.
    a, b = [i for i, sp in enumerate(specs) if not sp.shared][:2]
    small = [1 if i in (a, b) else 0 for i in range(len(specs))]
    kept, requested, repaired = realize(specs, small, BUDGET, order)
    assert not repaired and [k.key for k in kept] == [specs[a].key, specs[b].key]
    assert requested == specs[a].unit_params + specs[b].unit_params
    # Two FacT modules request their shared factors once.
    f = [i for i, sp in enumerate(specs) if sp.kind == "fact"][:2]
    two = [1 if i in f else 0 for i in range(len(specs))]
    kept, requested, repaired = realize(specs, two, 10_000, order)
    assert not repaired and requested == sum(specs[i].unit_params for i in f) + 2 * 8 * 32  # U and V: 8 x 32 each


def test_non_dominated_points():
    pts = [(0.8, 100), (0.7, 50), (0.6, 200), (0.8, 100), (0.9, 300), (0.5, 50)]
    assert non_dominated(pts) == [True, True, False, True, True, False]


# --------------------------------------------------------------------------- studies


def test_single_objective_in_memory(tmp_path, toy):
    run = tmp_path / "run"
    m = optuna_search("tiny-bert", toy, "s3pet-m", BUDGET, run, 2, cfg=_cfg())
    assert m["trials"]["complete"] == 2 and m["trials"]["this_worker"]["numbers"] == [0, 1]
    for st in _trial_structures(run).values():
        assert st.n_params <= BUDGET and st.budget["params"] == BUDGET
    best = S.load(run / "best_structure.json")
    assert best.n_params <= BUDGET and best.n_params == m["best"]["n_params"]
    trial = json.loads((run / "trials" / str(m["best"]["trial"]) / "metrics.json").read_text())
    assert m["best"]["validation"] == trial["validation"]["main"] and m["best"]["test"] == trial["test"]["main"]
    assert set(m["cost"]) >= {"seconds", "gpu_hours", "peak_memory_mb"}
    assert json.loads((run / "config.json").read_text())["storage"] is None


def test_multi_objective_pareto_lists_non_dominated_trials(tmp_path, toy):
    run, url = tmp_path / "run", f"sqlite:///{tmp_path / 'multi.db'}"
    m = optuna_search("tiny-bert", toy, "s3pet-m", BUDGET, run, 2, storage=url, study_name="multi",
                      objective="multi", cfg=_cfg())
    study = optuna.load_study(study_name="multi", storage=url)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 2 and all(t.user_attrs["n_params"] <= BUDGET for t in done)
    pareto = json.loads((run / "pareto.json").read_text())
    listed = {r["trial"] for r in pareto["trials"]}
    assert listed == {t.number for t in study.best_trials}
    for r in pareto["trials"]:
        t = study.trials[r["trial"]]
        assert not any(o.values[0] >= t.values[0] and o.values[1] <= t.values[1] and o.values != t.values
                       for o in done)
        assert S.from_dict(r["structure"]).n_params == t.values[1] == r["n_params"]
    assert (run / "pareto.png").stat().st_size > 0 and m["best"]["trial"] in listed
    # The shared study refuses a worker with other settings.
    with pytest.raises(ConfigError, match="other settings.*budget: study has 500"):
        optuna_search("tiny-bert", toy, "s3pet-m", BUDGET + 1, tmp_path / "other", 1, storage=url,
                      study_name="multi", objective="multi", cfg=_cfg())


def test_two_worker_processes_share_one_sqlite_study(tmp_path, toy):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "s3pet.cli", "optuna", "--model", "tiny-bert", "--task", toy, "--space", "s3pet-m",
           "--budget", str(BUDGET), "--trials", "2", "--storage", url, "--study", "shared", *TRAIN_FLAGS]
    procs = [subprocess.Popen([*cmd, "--out", str(tmp_path / f"w{i}")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    study = optuna.load_study(study_name="shared", storage=url)
    assert sorted(t.number for t in study.trials) == [0, 1, 2, 3]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    ran = [json.loads((tmp_path / f"w{i}" / "metrics.json").read_text())["trials"]["this_worker"]["numbers"]
           for i in range(2)]
    assert sorted(ran[0] + ran[1]) == [0, 1, 2, 3] and len(ran[0]) == len(ran[1]) == 2
    assert all(t.user_attrs["n_params"] <= BUDGET for t in study.trials)


class AlwaysPrune(optuna.pruners.BasePruner):
    def prune(self, study, trial) -> bool:
        return True


def test_pruned_trials_do_not_break_the_study(tmp_path, toy):
    url = f"sqlite:///{tmp_path / 'prune.db'}"
    m = optuna_search("tiny-bert", toy, "s3pet-m", BUDGET, tmp_path / "run", 2, storage=url, study_name="p",
                      pruner=AlwaysPrune(), cfg=_cfg())
    assert (m["trials"]["pruned"], m["trials"]["complete"], m["trials"]["failed"]) == (2, 0, 0)
    assert m["best"] is None and not (tmp_path / "run" / "best_structure.json").exists()
    study = optuna.load_study(study_name="p", storage=url)
    assert all(t.state == optuna.trial.TrialState.PRUNED and t.user_attrs["pruned_at_step"] == 2
               for t in study.trials)
    # The study goes on: a later worker without pruning completes a trial and finds a best.
    m = optuna_search("tiny-bert", toy, "s3pet-m", BUDGET, tmp_path / "run", 1, storage=url, study_name="p",
                      pruner="none", cfg=_cfg())
    assert (m["trials"]["pruned"], m["trials"]["complete"]) == (2, 1) and m["best"]["trial"] == 2
    assert S.load(tmp_path / "run" / "best_structure.json").n_params <= BUDGET


@pytest.mark.parametrize("url", ["nosuchdb://nowhere/x", "not-a-url", "sqlite:////no/such/folder/x.db"])
def test_bad_storage_url_is_a_one_line_error(tmp_path, toy, capsys, url):
    rc = main(["optuna", "--model", "tiny-bert", "--task", toy, "--budget", "500", "--trials", "1",
               "--storage", url, "--out", str(tmp_path / "run"), *TRAIN_FLAGS])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "storage" in err, err
