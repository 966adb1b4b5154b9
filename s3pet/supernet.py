"""The supernet: every candidate of a space injected into a frozen backbone, one gate each.

Candidate i is one unit (a LoRA rank-1 component, an adapter bottleneck unit, a whole BitFit
vector, ...) with logit ``alpha[i]`` and exact size ``n[i]``. The supernet owns the logits
and hands out logits and PET parameters by structure (``arch_parameters()``,
``delta_parameters()``), never by matching names.

Controllers (how gate probabilities are formed):
- ``shift`` (S3PET): p = sigmoid((alpha - b) / beta) with the shift b solved each step so
  that sum n p = budget.
- ``none``: plain sigmoid(alpha / beta), no budget pressure (ablation).
- ``l0``: plain sigmoid plus a penalty on expected parameters over the budget (ablation).

Shared tensors (Compacter's slow weights, FacT's factors) are paid once, not per unit: their
parameters over the whole space (``reserved``) are set aside from the budget the gates are held
to (``unit_budget``), and the derivation charges each of them when the first unit needing it is
kept, within the full budget (so a structure keeping none of them gets their share back).

The supernet is the one place that turns logits into gates: it holds beta, the concrete
temperature and the gate kind, solves the shift once per change of alpha (cached against the
logits' version counter, so the several passes of one step reuse one solve), and installs
the gate vector for a forward (``sample_gates``, ``fixed_gates``, ``expected_gates``).

Gate kinds for training steps (``gates``):
- ``concrete``: binary-concrete samples (optionally straight-through hard, ``hard``).
- ``hard-concrete``: stretched and clipped binary-concrete samples: exact 0s and 1s.
- ``deterministic``: z = p, no noise.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from s3pet import budget as B
from s3pet.configs import CONTROLLERS, GATES  # one list, shared with SearchConfig
from s3pet.deltas import KINDS
from s3pet.inject import DeltaSet
from s3pet.errors import BudgetError
from s3pet.space import ModuleSpec, shared_needs, shared_params, shared_tensors


class Supernet(nn.Module):
    """A frozen backbone with all candidates of a space attached and gated."""

    def __init__(self, backbone: nn.Module, specs: list[ModuleSpec], budget: int, *, beta: float = 1.0,
                 temperature: float = 1.0, hard: bool = False, gates: str = "concrete",
                 controller: str = "shift", shift_iters: int | None = None, l0_weight: float = 1.0):
        super().__init__()
        if controller not in CONTROLLERS:
            raise ValueError(f"controller must be one of {CONTROLLERS}")
        if gates not in GATES:
            raise ValueError(f"gates must be one of {GATES}")
        self.backbone = backbone
        for p in backbone.parameters():
            p.requires_grad_(False)
        self.deltaset = DeltaSet(specs, gated=True).attach(backbone)
        n_units = self.deltaset.n_units
        self.alpha = nn.Parameter(torch.zeros(n_units))
        n = torch.empty(n_units, dtype=torch.float64)
        group = torch.empty(n_units, dtype=torch.long)
        for g, spec in enumerate(self.deltaset.specs):
            n[spec.offset:spec.offset + spec.units] = spec.unit_params
            group[spec.offset:spec.offset + spec.units] = g
        self.register_buffer("n", n)
        self.register_buffer("group", group)
        self.register_buffer("shift", torch.zeros((), dtype=torch.float64))
        self.budget = int(budget)
        self.reserved = shared_params(self.deltaset.specs)  # paid once, set aside from what the gates share
        self.unit_budget = self.budget - self.reserved
        if self.reserved and self.unit_budget < float(n.min()):
            raise BudgetError(f"budget of {self.budget} parameters cannot hold the shared tensors of the space "
                              f"({self.reserved} parameters) and one candidate; raise it or drop those kinds")
        self._needs = shared_needs(self.deltaset.specs) if self.reserved else (None, None)
        self.beta, self.temperature, self.hard, self.gates = beta, temperature, hard, gates
        self._shift_key = None  # (alpha version, beta) the cached shift was solved for
        self.controller, self.shift_iters, self.l0_weight = controller, shift_iters, l0_weight
        self.solver = B.solve_shift  # the search swaps in a compiled copy when it compiles
        self.fits_all = B.budget_fits_all(self.n, self.unit_budget)
        if controller == "shift" and not self.fits_all:
            self._solve(warm=False)  # raises BudgetError early if the budget is infeasible

    @property
    def specs(self) -> list[ModuleSpec]:
        return self.deltaset.specs

    def arch_parameters(self) -> list[nn.Parameter]:
        return [self.alpha]

    def delta_parameters(self) -> list[nn.Parameter]:
        return list(self.deltaset.parameters())

    # ------------------------------------------------------------------ gates
    def configure(self, *, beta: float | None = None, temperature: float | None = None, hard: bool | None = None,
                  gates: str | None = None) -> None:
        """Set the gate settings (the search's config calls this; the values live only here)."""
        if gates is not None and gates not in GATES:
            raise ValueError(f"gates must be one of {GATES}")
        if beta is not None:
            self.beta = beta
        if temperature is not None:
            self.temperature = temperature
        if hard is not None:
            self.hard = hard
        if gates is not None:
            self.gates = gates

    def set_alpha(self, alpha: Tensor) -> None:
        """Overwrite the logits (e.g. with the best-validation ones); the shift follows."""
        with torch.no_grad():
            self.alpha.copy_(alpha)
        self._shift_key = None

    def _solve(self, warm: bool = True) -> Tensor:
        with torch.no_grad():
            s = self.solver(self.alpha.detach(), self.n, self.unit_budget, beta=self.beta,
                            init=self.shift if warm else None, iters=self.shift_iters)
            self.shift.copy_(s)
        self._shift_key = (self.alpha._version, self.beta)
        return self.shift

    def refresh_shift(self) -> None:
        """Solve the shift for the current logits now (called once after every alpha update)."""
        if self.controller == "shift" and not self.fits_all:
            self._solve()

    def current_shift(self) -> Tensor:
        """The shift b used by the gates (0 without the shift controller, -inf when all fits).

        Solved only when alpha changed since the last solve: every in-place update of alpha
        (optimiser step, ``copy_`` under no_grad, ``load_state_dict``) bumps its version
        counter; writes through ``alpha.data`` do not, so use ``set_alpha`` for those.
        """
        if self.controller != "shift":
            return torch.zeros((), dtype=torch.float64, device=self.alpha.device)
        if self.fits_all:
            return torch.full((), float("-inf"), dtype=torch.float64, device=self.alpha.device)
        if self._shift_key != (self.alpha._version, self.beta):
            self._solve()
        return self.shift

    def gate_probs(self) -> Tensor:
        """p for every candidate (differentiable in alpha; the shift is a constant)."""
        return B.gate_probs(self.alpha, self.current_shift(), self.beta)

    def sample_gates(self, generator: torch.Generator | None = None, *, noise: Tensor | None = None,
                     alpha_grad: bool = True) -> Tensor:
        """Draw training gates of the configured kind and install them; returns p.

        Args:
            generator: random generator for the noise (ignored when ``noise`` is given).
            noise: logit u from ``budget.logistic_noise``, to reuse one draw over passes.
            alpha_grad: False detaches the gates from alpha (w steps, virtual steps).
        """
        alpha = self.alpha if alpha_grad else self.alpha.detach()
        shift = self.current_shift()
        if self.gates == "deterministic":
            z = B.gate_probs(alpha, shift, self.beta)
        elif self.gates == "hard-concrete":
            z = B.hard_concrete_sample(alpha, shift, self.beta, self.temperature, generator, noise)
        else:
            z = B.concrete_sample(alpha, shift, self.beta, self.temperature, self.hard, generator, noise)
        self.deltaset.z = z
        return B.gate_probs(alpha, shift, self.beta)

    def fixed_gates(self) -> Tensor:
        """Install z = p detached from alpha (warm-up: the PET weights train, the gates do not move)."""
        p = self.gate_probs().detach()
        self.deltaset.z = p
        return p

    def probe_gates(self) -> Tensor:
        """Install z = p as a leaf tensor that requires grad and return it (dL/dz per candidate:
        the sensitivity score)."""
        z = self.gate_probs().detach().requires_grad_(True)
        self.deltaset.z = z
        return z

    def expected_gates(self) -> Tensor:
        """Install the deterministic gates p (evaluation); returns p."""
        p = self.gate_probs()
        self.deltaset.z = p
        return p

    def penalty(self, p: Tensor) -> Tensor:
        """Extra loss for the ``l0`` controller: expected parameters over the budget, relative."""
        if self.controller != "l0":
            return p.new_zeros(())
        over = B.expected_params(p.double(), self.n) / self.unit_budget - 1.0
        return self.l0_weight * torch.relu(over).to(p.dtype)

    def stats(self, p: Tensor) -> dict:
        """Scalars for history.jsonl (tensors; convert on logging steps only)."""
        p = p.detach()
        return {"shift": self.current_shift().detach() if self.controller == "shift" else p.new_zeros(()),
                "expected_params": B.expected_params(p.double(), self.n),
                "gate_entropy": B.gate_entropy(p), "gates_open": (p > 0.5).sum()}

    def derivation_stats(self, p: Tensor) -> dict:
        """What the greedy derivation would keep from ``p`` now, for history.jsonl (plain numbers):
        ``derived_params_by_kind`` ({kind: parameters}), ``derived_kept`` (candidates kept) and the
        spread of the gates: ``p_max``, ``p_median`` and ``p_kept_min`` (the last kept p: the
        derivation's threshold). With the shift controller sum_i n_i p_i always equals the
        budget, so these, not the expected size, show how the search moves."""
        p = p.detach().double().cpu()
        keep = self._derive(p, self.budget)
        by_kind: dict[str, int] = {}
        kept = [spec for spec, _ in kept_specs(self.specs, keep, p)]
        for spec in kept:
            by_kind[spec.kind] = by_kind.get(spec.kind, 0) + spec.n_params
        for kind, shape in shared_tensors(kept).values():  # each shared tensor once, with its kind
            by_kind[kind] += math.prod(shape)
        return {"derived_params_by_kind": by_kind, "derived_kept": int(keep.sum()),
                "p_max": float(p.max()), "p_median": float(p.median()),
                "p_kept_min": float(p[keep].min()) if bool(keep.any()) else 0.0}

    def forward(self, *args, **kwargs):
        return self.backbone(*args, **kwargs)

    # ------------------------------------------------------------------ derive
    def candidate_rows(self, p: Tensor | None = None) -> list[dict]:
        """One row per candidate: site, stack, layer, role, kind, unit, n, alpha, p (default: the
        current gate probabilities; e.g. the mean over restarts when given)."""
        with torch.no_grad():
            p = (self.gate_probs() if p is None else p).float().cpu().tolist()
        alpha = self.alpha.detach().float().cpu().tolist()
        rows = []
        for spec in self.specs:
            s = spec.site
            for u in range(spec.units):
                i = spec.offset + u
                rows.append({"index": i, "site": s.path, "stack": s.stack, "layer": s.layer, "role": s.role,
                             "kind": spec.kind, "unit": u, "n": spec.unit_params, "alpha": alpha[i], "p": p[i]})
        return rows

    def derive_specs(self, budget: int | None = None, p: Tensor | None = None) -> list[tuple[ModuleSpec, float]]:
        """Knapsack-greedy derivation under ``budget``: kept specs with merged units and mean score."""
        budget = self.budget if budget is None else int(budget)
        with torch.no_grad():
            p = (self.gate_probs() if p is None else p).detach().double().cpu()
            keep = self._derive(p, budget)
        return kept_specs(self.specs, keep, p)

    def _derive(self, p: Tensor, budget: int) -> Tensor:
        """The greedy keep-mask under the full ``budget``, each shared tensor charged once."""
        needs, costs = self._needs
        return B.derive(p, self.n.cpu(), budget, alpha=self.alpha.detach().double().cpu(), needs=needs, shared=costs)


def kept_specs(specs: list[ModuleSpec], keep: Tensor, p: Tensor) -> list[tuple[ModuleSpec, float]]:
    """Merge the kept units of every spec into one module of that many units (the derived rank),
    with the hyper-parameters its kind gives such a module (``DeltaKind.derived_params``)."""
    out = []
    for spec in specs:
        sl = slice(spec.offset, spec.offset + spec.units)
        k = keep[sl]
        r = int(k.sum())
        if r:
            score = float(p[sl][k].mean())
            params = KINDS[spec.kind].derived_params(spec.params, [bool(v) for v in k.tolist()])
            out.append((ModuleSpec(spec.site, spec.kind, params, r), score))
    return out
