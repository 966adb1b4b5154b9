"""Differentially private training (DP-SGD through Opacus) of the parameters one run trains.

As Yu et al. 2022 ("Differentially private fine-tuning of language models") do for PET: the
backbone is frozen, only the PET modules (or a side network) and the head train, so each
example's gradient is a few thousand numbers. One step of DP-SGD:

1. Poisson sampling: every training example joins the step's batch independently with
   probability q = batch_size / n (the batch size varies; an empty batch is a noise-only step).
   The draws are seeded per (seed, epoch), so a resumed run draws the batches it would have.
2. Per-example gradients of every trained parameter (``PerExample``).
3. Opacus' ``DPOptimizer``: each example's gradient clipped to norm C (``dp_max_grad_norm``),
   summed, Gaussian noise of std sigma * C added, divided by the expected batch size, then
   the wrapped AdamW step.
4. Accounting: Opacus' RDP (or PRV) accountant; sigma is solved for a target epsilon over the
   planned steps unless given; the epsilon spent at ``dp_delta`` is reported for the steps run.

Why per-example gradients are computed here and not by Opacus' ``GradSampleModule``: its
forward hook keeps only a module's positional inputs and detaches each one (s3pet's modules
are called as ``module(x, y, gate=...)``; a ``None`` there fails), its functorch fallback
re-runs a module on its first input alone (``x``; the modules need ``y`` as well), and LNFit
needs its host norm. ``PerExample`` does what that fallback does (``torch.func``: a vmap over
the batch of the gradient of ``<module(inputs), dL/doutput>``) with every positional and
keyword input, so every kind (and any module that owns trained parameters: the head, peft's
layers, a side network) is handled by one rule; ``tests/test_dp.py`` checks it against
gradients computed one example at a time.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from functools import partial

import torch
from torch import Tensor, nn

from s3pet import data as D
from s3pet.errors import ConfigError

log = logging.getLogger(__name__)

ACCOUNTANTS = ("rdp", "prv")


def require_opacus() -> None:
    """ConfigError naming the extra when Opacus is not installed."""
    if importlib.util.find_spec("opacus") is None:
        raise ConfigError("--dp needs Opacus, which is not installed; pip install 's3pet[dp]' (or opacus)")


class PerExample:
    """Per-example gradients (``p.grad_sample``, shape (batch, *p.shape)) of ``params``.

    Hooks every module under ``roots`` that owns one of ``params`` directly. In the forward
    pass a module's inputs are kept and a hook is put on its output; when the output's
    gradient arrives, each example's parameter gradient is the gradient of
    ``<module(inputs_i), dL/doutput_i>`` (vmapped over the batch). ``loss_mean``: the loss is
    a mean over the batch, so the output gradients are multiplied by the batch size to give
    the gradient of each example's own loss.
    """

    def __init__(self, roots: list[nn.Module], params: list[nn.Parameter], loss_mean: bool = True):
        wanted = {id(p): p for p in params}
        self.loss_mean = loss_mean
        self.params = list(wanted.values())
        self.handles = []
        self._recomputing = False
        covered, seen = set(), set()
        for root in roots:
            for m in root.modules():
                if id(m) in seen:
                    continue
                seen.add(id(m))
                own = {n: p for n, p in m.named_parameters(recurse=False) if id(p) in wanted}
                if own:
                    covered.update(id(p) for p in own.values())
                    self.handles.append(m.register_forward_hook(partial(self._forward, own), with_kwargs=True))
        missing = [p.shape for i, p in wanted.items() if i not in covered]
        if missing:
            self.close()
            raise ConfigError(f"--dp: {len(missing)} trained tensor(s) belong to no module of the model "
                              f"(shapes {missing[:3]}); per-example gradients need their module")

    def _forward(self, own: dict, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        if self._recomputing or not torch.is_grad_enabled() or not isinstance(output, Tensor) \
                or not output.requires_grad:
            return  # the re-run below, evaluation, or a call outside the loss
        args = tuple(a.detach() if torch.is_tensor(a) else a for a in args)
        n = output.shape[0]
        output.register_hook(lambda g: self._backward(module, own, args, kwargs, g.detach() * (n if self.loss_mean else 1)))

    def _backward(self, module: nn.Module, own: dict, args: tuple, kwargs: dict, g: Tensor) -> None:
        names = list(own)
        values = tuple(own[k].detach() for k in names)
        dims = tuple(0 if torch.is_tensor(a) else None for a in args)

        def inner(vals, xs, gi):
            one = tuple(a.unsqueeze(0) if torch.is_tensor(a) else a for a in xs)
            out = torch.func.functional_call(module, dict(zip(names, vals)), one, kwargs)
            return (out * gi.unsqueeze(0)).sum()

        self._recomputing = True  # the module's re-run must not hook itself again
        try:
            with torch.enable_grad():  # the backward pass runs hooks with grad mode off; func.grad needs it on
                grads = torch.func.vmap(torch.func.grad(inner), in_dims=(None, dims, 0))(values, args, g)
        finally:
            self._recomputing = False
        for k, gs in zip(names, grads):
            p = own[k]
            prev = getattr(p, "grad_sample", None)
            p.grad_sample = gs if prev is None else prev + gs  # a module called twice (tied weights)

    def empty(self) -> None:
        """Per-example gradients of an empty batch (a Poisson draw can be empty: noise only)."""
        for p in self.params:
            p.grad_sample = p.new_zeros((0, *p.shape))

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        for p in self.params:
            for attr in ("grad_sample", "summed_grad"):
                if hasattr(p, attr):
                    delattr(p, attr)


def sample_rate(batch_size: int, n: int) -> float:
    """Poisson sampling rate q: the expected batch is ``batch_size`` examples."""
    return min(1.0, batch_size / n)


def noise_multiplier(cfg, q: float, steps: int, delta: float) -> float:
    """sigma: ``cfg.dp_noise_multiplier`` if set, else the smallest that keeps ``steps`` steps within ``cfg.dp_epsilon``."""
    if cfg.dp_noise_multiplier:
        return float(cfg.dp_noise_multiplier)
    import warnings

    from opacus.accountants.utils import get_noise_multiplier

    try:
        with warnings.catch_warnings():  # RDP: "optimal order is the largest alpha" (a looser bound, still valid)
            warnings.simplefilter("ignore")
            return float(get_noise_multiplier(target_epsilon=cfg.dp_epsilon, target_delta=delta, sample_rate=q,
                                              steps=steps, accountant=cfg.dp_accountant))
    except ValueError as e:  # Opacus: the target cannot be reached (sigma beyond its search range)
        raise ConfigError(f"--dp-epsilon {cfg.dp_epsilon} cannot be met over {steps} steps at sampling rate "
                          f"{q:.4g}: {e}; raise --dp-epsilon or lower --max-steps/--epochs") from e


def epsilon(sigma: float, q: float, steps: int, delta: float, accountant: str = "rdp") -> float:
    """Epsilon spent by ``steps`` DP-SGD steps (noise ``sigma``, sampling rate ``q``) at ``delta``."""
    import warnings

    from opacus.accountants import create_accountant

    if steps == 0:
        return 0.0
    acc = create_accountant(accountant)
    acc.history = [(sigma, q, steps)]
    with warnings.catch_warnings():  # RDP: "optimal order is the largest alpha" at tiny epsilons
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta))


class Private:
    """DP-SGD around one run of ``train.fit``: the wrapped optimizer, Poisson batches, the report.

    ``roots``: modules under which every parameter of ``optimizer`` is owned by some module;
    ``train``: the training split; ``total``: planned optimizer steps (sigma is solved over them).
    """

    def __init__(self, roots: list[nn.Module], optimizer: torch.optim.Optimizer, train: D.EncodedSplit, cfg,
                 total: int):
        require_opacus()
        from opacus.optimizers import DPOptimizer

        from s3pet import dist

        if dist.world_size() > 1:
            raise ConfigError("--dp runs in one process; drop torchrun")
        if train.n_choices:  # one example is several rows: per-row gradients are not per-example ones
            raise ConfigError("--dp does not support multiple-choice tasks")
        n = len(train)
        self.cfg, self.n = cfg, n
        self.q = sample_rate(cfg.batch_size, n)
        self.delta = cfg.dp_delta
        if self.delta >= 1 / n:
            log.warning("dp: delta %g is not below 1/n = %g (n = %d training examples); consider --dp-delta %g",
                        self.delta, 1 / n, n, 10 ** math.floor(math.log10(0.1 / n)))
        self.sigma = noise_multiplier(cfg, self.q, total, self.delta)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        self.per_example = PerExample(roots, params)
        self.optimizer = DPOptimizer(optimizer, noise_multiplier=self.sigma, max_grad_norm=cfg.dp_max_grad_norm,
                                     expected_batch_size=cfg.batch_size, loss_reduction="mean")
        log.info("dp: sigma %.4g, clip %g, sampling rate %.4g (expected batch %d of %d), delta %g, %s accountant",
                 self.sigma, cfg.dp_max_grad_norm, self.q, cfg.batch_size, n, self.delta, cfg.dp_accountant)

    def batches(self, split: D.EncodedSplit, pad_id: int, epoch: int, steps: int):
        """``steps`` Poisson batches of ``split`` (seeded by the run's seed and ``epoch``)."""
        g = torch.Generator().manual_seed(self.cfg.seed * 100_003 + epoch + 7_919)
        for _ in range(steps):
            idx = (torch.rand(len(split), generator=g) < self.q).nonzero().flatten().tolist()
            if idx:
                yield D.collate(split, idx, pad_id)
            else:
                yield {"input_ids": torch.zeros((0, 1), dtype=torch.long), "labels": torch.zeros(0)}

    def step(self, micro_step):
        """``micro_step`` for a batch, or a noise-only step for an empty one (returns the loss)."""

        def run(batch) -> Tensor:
            if batch["labels"].numel() == 0:
                self.per_example.empty()
                return torch.zeros((), device=batch["labels"].device)
            return micro_step(batch)

        return run

    def report(self, steps: int) -> dict:
        """The privacy of a run of ``steps`` steps (metrics.json's ``privacy``)."""
        return {"epsilon": round(epsilon(self.sigma, self.q, steps, self.delta, self.cfg.dp_accountant), 4),
                "delta": self.delta, "steps": steps, "noise_multiplier": self.sigma,
                "max_grad_norm": self.cfg.dp_max_grad_norm, "sample_rate": self.q,
                "expected_batch_size": self.cfg.batch_size, "accountant": self.cfg.dp_accountant,
                "target_epsilon": None if self.cfg.dp_noise_multiplier else self.cfg.dp_epsilon,
                "sampling": "poisson"}

    def close(self) -> None:
        self.per_example.close()
