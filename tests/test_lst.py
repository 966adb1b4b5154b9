"""Ladder side-tuning (s3pet.lst): exact size, sizing to a budget, no gradient into the backbone, training, CLI."""

from __future__ import annotations

import json

import pytest
import torch

from s3pet import data as D
from s3pet import lst
from s3pet.cli import main
from s3pet.errors import BudgetError, ConfigError
from s3pet.models import load_tokenizer
from s3pet.tasks import load_task
from s3pet.train import TrainConfig, encode_task, fit
from synthetic import write_sentiment_task

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def toy(tmp_path):
    return str(write_sentiment_task(tmp_path / "task", n_train=128, n_eval=40))


@pytest.mark.parametrize("d,f,layers,w", [(32, 37, 2, 1), (32, 37, 2, 4), (32, 37, 2, 32), (384, 1536, 6, 48)])
def test_side_params_count_every_tensor(d, f, layers, w):
    side = lst.SideNetwork(d, f, layers, w)
    assert sum(p.numel() for p in side.parameters()) == lst.side_params(d, f, layers, w)


@pytest.mark.parametrize("budget", [500, 3_000, 20_000, 10**9])
def test_width_is_the_largest_that_fits_the_budget(budget):
    d, f, layers = 64, 256, 3
    if budget < lst.side_params(d, f, layers, 1):
        with pytest.raises(BudgetError, match="smallest LST side network"):
            lst.width_for_budget(d, f, layers, budget)
        return
    w = lst.width_for_budget(d, f, layers, budget)
    assert lst.side_params(d, f, layers, w) <= budget
    assert w == d or lst.side_params(d, f, layers, w + 1) > budget


def test_lst_trains_the_side_network_only_and_the_loss_goes_down(tiny_backbone, toy):
    backbone = tiny_backbone("tiny-bert")
    td = load_task(toy, seed=0)
    enc = encode_task(td, load_tokenizer("tiny-bert"), 32)
    torch.manual_seed(0)
    tm, info = lst.build(backbone, td.card, 20_000, pooling="mean")
    assert info["params"] == sum(p.numel() for p in tm.side.parameters()) <= 20_000
    frozen = {k: v.clone() for k, v in backbone.state_dict().items()}
    batch = D.collate(enc.train, list(range(64)), enc.pad_id)

    def train_loss():
        tm.eval()
        with torch.no_grad():
            return tm.loss(tm(batch), batch["labels"]).item()

    before = train_loss()
    cfg = TrainConfig(max_steps=60, batch_size=16, lr=1e-2, eval_every=30, progress=False, log_every=10)
    grads_seen = []

    def after_step(step):  # gradients are still there: the backbone has none, the side network has them
        assert all(p.grad is None for p in backbone.parameters())
        grads_seen.append(sum(float(p.grad.abs().sum()) for p in tm.side.parameters() if p.grad is not None))

    fit(tm, {"side": list(tm.side.parameters()), "head": tm.head_parameters()}, enc, cfg, after_step=after_step)
    assert min(grads_seen) > 0
    assert train_loss() < 0.8 * before
    assert all(torch.equal(v, frozen[k]) for k, v in backbone.state_dict().items())  # the backbone never moved


def test_lst_backbone_builds_no_graph(tiny_backbone, toy):
    backbone = tiny_backbone("tiny-bert")
    td = load_task(toy, seed=0)
    enc = encode_task(td, load_tokenizer("tiny-bert"), 32)
    tm, _ = lst.build(backbone, td.card, 20_000)
    seen = []
    hooks = [m.register_forward_hook(lambda m, a, o: seen.append(o[0].requires_grad if isinstance(o, tuple)
                                                               else o.requires_grad))
             for m in backbone.encoder.layer]
    tm.train()
    tm(D.collate(enc.train, [0, 1], enc.pad_id))
    for h in hooks:
        h.remove()
    assert seen and not any(seen)  # no layer output is part of an autograd graph


@pytest.mark.parametrize("alias", ["tiny-gpt2", "tiny-t5", "tiny-llama"])
def test_lst_refuses_other_families_in_one_line(alias, toy, tmp_path, capsys):
    rc = main(["baseline", "--method", "lst", "--budget", "5000", "--model", alias, "--task", toy,
               "--out", str(tmp_path / "x"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "lst supports encoder models" in err
    assert not (tmp_path / "x").exists()
    with pytest.raises(ConfigError):
        lst.dims(__import__("s3pet.models", fromlist=["load_backbone"]).load_backbone(alias))


def test_lst_baseline_from_the_cli_and_evaluate(tmp_path, toy, capsys):
    out = tmp_path / "lst"
    rc = main(["baseline", "--method", "lst", "--budget", "8k", "--model", "tiny-bert", "--task", toy, "--out",
               str(out), "--max-steps", "20", "--batch-size", "16", "--eval-every", "10", "--no-progress"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["method"] == "lst" and 0 < m["params"]["pet"] <= 8000 and m["params"]["pet"] == m["lst"]["params"]
    assert "PET params" in capsys.readouterr().out
    rc = main(["evaluate", "--run", str(out)])
    assert rc == 0
    again = json.loads(capsys.readouterr().out)
    assert again["test"]["main"] == pytest.approx(m["test"]["main"])
    rc = main(["baseline", "--method", "lst", "--budget", "100", "--model", "tiny-bert", "--task", toy, "--out",
               str(tmp_path / "small"), "--no-progress"])
    assert rc == 2 and "smallest LST side network" in capsys.readouterr().err
