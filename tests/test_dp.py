"""Differentially private training (s3pet.dp): per-example gradients, clipping, sampling, accounting, CLI."""

from __future__ import annotations

import json

import pytest
import torch

from s3pet import data as D
from s3pet import dp
from s3pet.cli import main
from s3pet.deltas import KINDS
from s3pet.errors import ConfigError
from s3pet.heads import TaskModel
from s3pet.inject import DeltaSet
from s3pet.models import load_tokenizer
from s3pet.space import ModuleSpec, discover_sites
from s3pet.tasks import load_task
from s3pet.train import TrainConfig, encode_task
from synthetic import write_sentiment_task

pytestmark = pytest.mark.usefixtures("one_thread")

KIND_NAMES = ("lora", "adapter", "lowrank_adapter", "bitfit", "lnfit", "ia3")
UNITS = {"lora": 2, "adapter": 3}


@pytest.fixture
def toy(tmp_path):
    return str(write_sentiment_task(tmp_path / "task", n_train=96, n_eval=24))


def every_kind(backbone) -> DeltaSet:
    """One module of every kind on the backbone (at the first site that hosts it), random weights."""
    specs, used = [], set()
    for site in discover_sites(backbone):
        for kind in KIND_NAMES:
            if kind not in used and site.host in KINDS[kind].hosts:
                params = KINDS[kind].check_params({"rank": 2} if kind == "lora" else {})
                specs.append(ModuleSpec(site, kind, params, UNITS.get(kind, 1)))
                used.add(kind)
    assert used == set(KIND_NAMES)
    for p in backbone.parameters():
        p.requires_grad_(False)
    ds = DeltaSet(specs).attach(backbone)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # fresh modules start at zero in places (LoRA B, LNFit): no gradient reaches A there
        for p in ds.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return ds


@pytest.mark.parametrize("alias", ["tiny-bert", "tiny-llama"])  # LayerNorm and a norm class of its own (RMSNorm)
def test_per_example_gradients_equal_gradients_one_example_at_a_time(alias, tiny_backbone, toy):
    backbone = tiny_backbone(alias)
    ds = every_kind(backbone)
    td = load_task(toy, seed=0)
    enc = encode_task(td, load_tokenizer(alias), 32)
    tm = TaskModel(backbone, td.card).eval()  # no dropout: both sides run the same function
    params = [*ds.parameters(), *tm.head_parameters()]
    for p in params:
        p.requires_grad_(True)
    idx = [0, 5, 9, 13]  # different lengths: the batch pads, the single examples do not
    assert len({len(enc.train.features[i][0]["input_ids"]) for i in idx}) > 1
    pe = dp.PerExample([tm, ds], params)
    batch = D.collate(enc.train, idx, enc.pad_id)
    tm.loss(tm(batch), batch["labels"]).backward()
    got = [p.grad_sample.clone() for p in params]
    pe.close()
    assert all(not hasattr(p, "grad_sample") for p in params)
    for j, i in enumerate(idx):
        one = D.collate(enc.train, [i], enc.pad_id)
        want = torch.autograd.grad(tm.loss(tm(one), one["labels"]), params)
        for p, g, w in zip(params, got, want):
            assert g.shape == (len(idx), *p.shape)
            torch.testing.assert_close(g[j], w, rtol=1e-4, atol=1e-6)
    # The per-example gradients add up to the batch gradient (mean loss x batch size).
    for p, g in zip(params, got):
        torch.testing.assert_close(g.sum(0), p.grad * len(idx), rtol=1e-4, atol=1e-6)


def test_private_step_clips_each_example_then_averages(tiny_backbone, toy):
    backbone = tiny_backbone("tiny-bert")
    ds = every_kind(backbone)
    td = load_task(toy, seed=0)
    enc = encode_task(td, load_tokenizer("tiny-bert"), 32)
    tm = TaskModel(backbone, td.card).eval()
    params = [*ds.parameters(), *tm.head_parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=1.0)
    cfg = TrainConfig(dp=True, dp_noise_multiplier=1e-12, dp_max_grad_norm=0.05, batch_size=4, progress=False)
    private = dp.Private([tm, ds], opt, enc.train, cfg, total=10)
    batch = D.collate(enc.train, [1, 2, 3, 4], enc.pad_id)
    before = [p.detach().clone() for p in params]
    tm.loss(tm(batch), batch["labels"]).backward()
    gs = [p.grad_sample.clone() for p in params]
    private.optimizer.step()
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in gs], 1).norm(dim=1)
    assert (norms > 0.05).all()  # every example is clipped at this norm
    factor = (0.05 / (norms + 1e-6)).clamp(max=1.0)
    for p, b, g in zip(params, before, gs):
        want = torch.einsum("i,i...->...", factor, g) / cfg.batch_size  # expected batch size divides
        torch.testing.assert_close(b - p.detach(), want, rtol=1e-3, atol=1e-6)  # float32 subtraction
    private.close()


def test_poisson_batches_are_seeded_and_sized_by_the_sampling_rate(toy):
    td = load_task(toy, seed=0)
    enc = encode_task(td, load_tokenizer("tiny-bert"), 32)
    lin = torch.nn.Linear(1, 1)
    cfg = TrainConfig(dp=True, dp_noise_multiplier=1.0, batch_size=8, seed=3, progress=False)
    private = dp.Private([lin], torch.optim.SGD(lin.parameters(), lr=0.1), enc.train, cfg, total=5)

    def sizes(epoch):
        return [len(b["labels"]) for b in private.batches(enc.train, enc.pad_id, epoch=epoch, steps=200)]

    first = sizes(0)
    assert first == sizes(0) and first != sizes(1)
    assert len(set(first)) > 3  # Poisson: the batch size varies
    assert abs(sum(first) / len(first) - 8) < 1.0  # mean 8; the standard error of the mean is ~0.2
    private.close()


def test_noise_is_solved_for_the_target_epsilon():
    cfg = TrainConfig(dp=True, dp_epsilon=3.0, progress=False)
    sigma = dp.noise_multiplier(cfg, q=0.05, steps=200, delta=1e-5)
    eps = dp.epsilon(sigma, 0.05, 200, 1e-5)
    assert 3.0 - 0.02 <= eps <= 3.0  # Opacus' search stops within its tolerance (0.01), below the target
    assert dp.epsilon(sigma, 0.05, 100, 1e-5) < eps  # fewer steps spend less
    with pytest.raises(ConfigError, match="dp-epsilon"):
        dp.noise_multiplier(TrainConfig(dp=True, dp_epsilon=1e-4, progress=False), q=0.5, steps=10**5, delta=1e-5)


def test_dp_retrain_from_the_cli_reports_epsilon(tmp_path, toy, capsys):
    out = tmp_path / "run"
    rc = main(["baseline", "--method", "lnfit", "--budget", "300", "--model", "tiny-bert", "--task", toy,
               "--out", str(out), "--max-steps", "8", "--batch-size", "16", "--eval-every", "4", "--no-progress",
               "--lr", "1e-2", "--dp", "--dp-epsilon", "4", "--dp-delta", "1e-4"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    v = m["privacy"]
    assert v["steps"] == m["steps"] == 8 and v["delta"] == 1e-4 and v["sampling"] == "poisson"
    assert v["sample_rate"] == pytest.approx(16 / 96)
    # The reported epsilon is the accountant's for the run's noise, sampling rate and steps.
    assert v["epsilon"] == pytest.approx(dp.epsilon(v["noise_multiplier"], v["sample_rate"], 8, 1e-4), abs=1e-4)
    assert 4 - 0.02 <= v["epsilon"] <= 4
    assert f"({v['epsilon']:.3g}, 0.0001)-DP over 8 steps" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["train"]["dp"] is True


def test_dp_needs_opacus_and_refuses_what_it_cannot_do(monkeypatch, capsys, toy, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "opacus" else real(name, *a))
    with pytest.raises(ConfigError, match=r"s3pet\[dp\]"):
        TrainConfig(dp=True)
    rc = main(["baseline", "--method", "bitfit", "--budget", "300", "--model", "tiny-bert", "--task", toy,
               "--out", str(tmp_path / "x"), "--dp"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "s3pet[dp]" in err
    assert not (tmp_path / "x").exists()
    monkeypatch.undo()
    for bad in ({"grad_accum": 2}, {"compile": "on"}, {"dp_delta": 1.0}, {"dp_max_grad_norm": 0.0},
                {"dp_accountant": "moments"}):
        with pytest.raises(ConfigError):
            TrainConfig(dp=True, **bad)


def test_per_example_gradients_of_a_side_network(tiny_backbone, toy):
    from s3pet import lst

    backbone = tiny_backbone("tiny-bert")
    td = load_task(toy, seed=0)
    enc = encode_task(td, load_tokenizer("tiny-bert"), 32)
    torch.manual_seed(0)
    tm, _ = lst.build(backbone, td.card, 20_000)
    tm.eval()
    with torch.no_grad():  # the upsampler starts at zero: no gradient would reach the blocks
        tm.side.up.weight.normal_(std=0.1)
    params = [*tm.side.parameters(), *tm.head_parameters()]
    pe = dp.PerExample([tm], params)
    idx = [2, 7, 11]
    batch = D.collate(enc.train, idx, enc.pad_id)
    tm.loss(tm(batch), batch["labels"]).backward()
    got = [p.grad_sample.clone() for p in params]
    pe.close()
    for j, i in enumerate(idx):
        one = D.collate(enc.train, [i], enc.pad_id)
        want = torch.autograd.grad(tm.loss(tm(one), one["labels"]), params)
        for g, w in zip(got, want):
            torch.testing.assert_close(g[j], w, rtol=1e-4, atol=1e-6)
