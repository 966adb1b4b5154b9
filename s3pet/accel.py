"""torch.compile of the training forward, where it pays, with a fallback where it breaks.

A PET step on a frozen backbone is host-bound in eager mode: every gated module adds a few
tiny kernels, each launched from Python. Compiling the task model (backbone, PET hooks and
head as one graph; the hooks and the gate vector are traced, the gates are graph inputs)
fuses the element-wise work around the matrix products and launches the rest from
generated code. The compiled module keeps its parameters and state dict; only its call
changes (``nn.Module.compile``), so checkpoints, ``functional_call`` and export are the same.

``compile`` settings: ``off``; ``on``; ``auto`` (default): on a CUDA GPU when the run has at
least ``AUTO_MIN_STEPS`` optimizer steps (below that, compiling costs more than it saves),
never on the CPU, where inductor's C++ compile takes longer than a short run.

Fallback: when compiling or running the compiled graph raises a compiler error, the module
goes back to eager, a warning names the error, and the step is run again eagerly; nothing
was updated by the failed attempt (a failure surfaces in the forward or backward pass,
before any optimizer step).
"""

from __future__ import annotations

import logging
from typing import Callable, TypeVar

import torch
from torch import nn

from s3pet.configs import COMPILE
from s3pet.errors import ConfigError

log = logging.getLogger(__name__)

CHOICES = COMPILE  # TrainConfig / SearchConfig.compile
# Steps from which ``auto`` compiles on a GPU. Measured on an H100 (BERT-base, s3pet-m):
# compiling the search's graphs takes about 3 minutes and saves about 0.1 s per step, a
# retrain's about 40 s for 0.025 s per step; both pay for themselves after ~1,500-1,800
# steps (docs/benchmarks.md).
AUTO_MIN_STEPS = 2000
BACKEND = "inductor"  # tests use "aot_eager": the same tracing, no code generation
MODE: str | None = None  # inductor mode; None = its default (fused kernels, no CUDA graphs)
RECOMPILE_LIMIT = 64
# Compiled graphs write matrix products of at most this rank element-wise (see
# ``s3pet.deltas.base.project``), so that they fuse with their neighbours instead of each
# launching its own tiny matmul; eager runs always use matmuls.
ELEMENTWISE_MAX_RANK = 1

T = TypeVar("T")


def check_setting(value: str) -> str:
    if value not in CHOICES:
        raise ConfigError(f"compile must be one of {', '.join(CHOICES)}, got {value!r}")
    return value


def wanted(setting: str, device: torch.device, steps: int) -> bool:
    """Whether a run with this setting, device and number of steps compiles."""
    check_setting(setting)
    if setting == "auto":
        return device.type == "cuda" and steps >= AUTO_MIN_STEPS
    return setting == "on"


def _is_compiler_error(e: BaseException) -> bool:
    try:
        from torch._dynamo.exc import TorchDynamoException
    except ImportError:  # pragma: no cover - every supported torch has it
        TorchDynamoException = ()  # noqa: N806
    if isinstance(e, TorchDynamoException):
        return True
    mod = type(e).__module__ or ""
    return mod.startswith(("torch._dynamo", "torch._inductor", "torch._functorch", "triton"))


class Compiled:
    """Compiles ``module`` in place (when ``enabled``) and runs steps with an eager fallback."""

    def __init__(self, module: nn.Module, enabled: bool):
        self.module = module
        self.active = False
        self.error: str | None = None
        if enabled:
            try:
                import torch._dynamo

                # One code object (``Module._call_impl``) serves every graph of a run: training
                # with and without gate gradients, evaluation, new sequence lengths. The default
                # of 8 cached graphs per code object would silently send later ones to eager.
                cfg = torch._dynamo.config
                cfg.recompile_limit = max(cfg.recompile_limit, RECOMPILE_LIMIT)
                module.compile(backend=BACKEND, mode=MODE, dynamic=None)
                self.active = True
            except Exception as e:  # noqa: BLE001 - an unusable compiler means eager, not a failed run
                self._fall_back(e)

    def function(self, fn: Callable[..., T]) -> Callable[..., T]:
        """``fn`` compiled alongside the module (a small graph of its own, e.g. the shift solve
        run between passes), eager again after a fallback or ``close``."""
        if not self.active:
            return fn
        compiled = torch.compile(fn, backend=BACKEND, mode=MODE, dynamic=False)

        def call(*args, **kwargs):
            return (compiled if self.active else fn)(*args, **kwargs)

        return call

    def _fall_back(self, e: BaseException) -> None:
        self.module._compiled_call_impl = None  # back to the module's own (eager) call
        self.active = False
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        self.error = f"{type(e).__name__}: {' '.join(lines[:2])[:300]}"  # the compiler's own cause is line 2
        log.warning("torch.compile failed (%s); continuing without it", self.error)

    def run(self, fn: Callable[..., T], *args) -> T:
        """``fn(*args)``; on a compiler error, fall back to eager and run it again."""
        if not self.active:
            return fn(*args)
        try:
            return fn(*args)
        except Exception as e:
            if not _is_compiler_error(e):
                raise
            self._fall_back(e)
            return fn(*args)

    def close(self) -> None:
        """Return the module to eager calls and drop the compiled graphs (the next model of the
        process, e.g. the retrain after a search, compiles afresh)."""
        if self.active:
            import torch._dynamo

            torch._dynamo.reset()
        self.module._compiled_call_impl = None
        self.active = False
