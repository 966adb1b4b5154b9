"""Budget math: parse a budget, solve the gate shift, sample gates, derive a structure.

Candidate i has a logit alpha_i and an exact parameter count n_i > 0. Its gate is

    p_i = sigmoid((alpha_i - b) / beta),   with the shift b chosen so that  sum_i n_i p_i = B.

Every function here is pure (tensors in, tensors out, no module state) so that the search loop,
the structure code and the tests can share it.

Shift bracket (E(b) = sum_i n_i p_i, T = sum_i n_i, 0 < B < T), safeguarding the root solve:
  * b_hi = max(alpha) + beta * (log(T / B) + 1). Every (alpha_i - b_hi) / beta is then
    <= -log(T / B) - 1 and sigmoid(x) < exp(x), so E(b_hi) < T * (B / T) * e^-1 < B.
  * b_lo = min(alpha) - beta * (logit(B / T) + 1). Every (alpha_i - b_lo) / beta is then
    > logit(B / T), so every p_i > B / T and E(b_lo) > T * B / T = B.
E(b) is strictly decreasing, so the unique root lies in (b_lo, b_hi).
"""

from __future__ import annotations

import math
import re
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from numbers import Integral, Real
from typing import Hashable, Sequence

import torch
import torch.nn.functional as F

from s3pet.errors import BudgetError, ConfigError

_F64 = torch.float64
_MAX_ITERS = 100
_EPS = torch.finfo(_F64).eps
_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}
_COUNT_RE = re.compile(r"^(\d[\d_]*(?:\.\d+)?)\s*([kmg]?)$", re.IGNORECASE)
_PERCENT_RE = re.compile(r"^(\d[\d_]*(?:\.\d*)?|\.\d+)\s*%$")
_EXAMPLES = "valid examples: 25000, '25_000', '25k', '1.5M', '0.01%' (percent of the backbone)"


# --- parsing -------------------------------------------------------------------------------


def parse_budget(value: int | str, backbone_params: int) -> int:
    """Turn a user budget into a parameter count.

    Args:
        value: an int, or a string: a count (``"25000"``, ``"25_000"``, ``"25k"``, ``"1.5M"``)
            or a percent of the backbone (``"0.01%"``). A bare number is always a count.
        backbone_params: parameters in the backbone, the base of a percent.
    Returns:
        The budget in parameters, rounded to nearest (half up) and at least 1.
    Raises:
        ConfigError: malformed value, non-positive budget, or a percent above 100.
    """
    if isinstance(value, bool):  # bool is an Integral; True is not a budget
        raise ConfigError(f"budget {value!r} is not a number of parameters; {_EXAMPLES}")
    if isinstance(value, Integral):
        if value < 1:
            raise ConfigError(f"budget {value!r} must be at least 1 parameter; {_EXAMPLES}")
        return int(value)
    if isinstance(value, Real):
        # A float such as 0.01 could mean a fraction or a count; refuse rather than guess.
        if not math.isfinite(value) or value < 1 or value != int(value):
            raise ConfigError(
                f"budget {value!r} is ambiguous: give a whole parameter count or a percent "
                f"string; {_EXAMPLES}"
            )
        return int(value)
    if not isinstance(value, str):
        raise ConfigError(f"budget {value!r} has type {type(value).__name__}; {_EXAMPLES}")
    text = value.strip()
    if m := _PERCENT_RE.match(text):
        pct = _decimal(m.group(1), value)
        if not 0 < pct <= 100:
            raise ConfigError(f"budget {value!r}: a percent must lie in (0, 100]; {_EXAMPLES}")
        if isinstance(backbone_params, bool) or not isinstance(backbone_params, Integral) \
                or backbone_params < 1:
            raise ConfigError(f"budget {value!r} needs a positive backbone size, "
                              f"got {backbone_params!r}")
        return max(1, _round(pct * backbone_params / 100))
    if m := _COUNT_RE.match(text):
        count = _decimal(m.group(1), value) * _SUFFIX[m.group(2).lower()]
        if count != count.to_integral_value() and not m.group(2):
            raise ConfigError(
                f"budget {value!r} is not a whole parameter count (for a share of the backbone "
                f"write a percent, e.g. '{m.group(1)}%'); {_EXAMPLES}"
            )
        if count <= 0:
            raise ConfigError(f"budget {value!r} must be at least 1 parameter; {_EXAMPLES}")
        return max(1, _round(count))
    raise ConfigError(f"budget {value!r} is malformed; {_EXAMPLES}")


def _decimal(digits: str, original: object) -> Decimal:
    try:
        return Decimal(digits.replace("_", ""))
    except InvalidOperation as e:
        raise ConfigError(f"budget {original!r} is malformed; {_EXAMPLES}") from e


def _round(x: Decimal) -> int:
    return int(x.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def budget_record(params: int, backbone_params: int) -> dict:
    """The ``budget`` entry of a structure file: ``{"params": int, "fraction": float}``.

    Raises:
        ConfigError: a non-positive count or backbone size.
    """
    if int(params) < 1 or int(backbone_params) < 1:
        raise ConfigError(f"budget {params!r} and backbone size {backbone_params!r} must be >= 1")
    return {"params": int(params), "fraction": int(params) / int(backbone_params)}


# --- feasibility ---------------------------------------------------------------------------


def _host_counts(n) -> list[int | float]:
    vals = n.detach().cpu().tolist() if isinstance(n, torch.Tensor) else list(n)
    if not vals:
        raise BudgetError("there are no candidates to spend the budget on")
    if any(not (v > 0 and math.isfinite(v)) for v in vals):
        raise BudgetError("every candidate must have a positive, finite parameter count")
    return vals


def check_budget(n, budget: float) -> None:
    """Check that ``budget`` can hold at least one candidate.

    Args:
        n: parameter count per candidate (sequence or tensor, all > 0).
        budget: the budget B in parameters.
    Raises:
        BudgetError: B below the smallest candidate, a non-positive B, or bad counts.
    """
    vals = _host_counts(n)
    if not (budget > 0 and math.isfinite(budget)):
        raise BudgetError(f"budget {budget!r} must be a positive number of parameters")
    smallest = min(vals)
    if budget < smallest:
        raise BudgetError(
            f"budget of {_num(budget)} parameters is infeasible: the smallest candidate has "
            f"{_num(smallest)} parameters; raise the budget to at least {_num(smallest)}"
        )


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def budget_fits_all(n, budget: float) -> bool:
    """True when every candidate fits at once (sum n <= B), so every gate is 1."""
    return sum(_host_counts(n)) <= budget


# --- the shift -----------------------------------------------------------------------------


def solve_shift(alpha: torch.Tensor, n, budget: float, beta: float = 1.0, init=None,
                iters: int | None = None, tol: float = 1e-6) -> torch.Tensor:
    """Find the shift b with sum_i n_i sigmoid((alpha_i - b) / beta) = B.

    Safeguarded Newton (bisection fallback) in float64 inside an analytic bracket.

    Args:
        alpha: gate logits, shape (N,); only their values are used.
        n: parameter count per candidate, shape (N,). For a step free of host syncs, pass a
            tensor on alpha's device and call ``check_budget`` once beforehand.
        budget: the budget B in parameters.
        beta: gate temperature (> 0).
        init: a previous shift to warm start from (ignored if not finite).
        iters: None iterates until |E - B| <= tol * B (at most 100 steps, syncs the host);
            k runs exactly k steps with no host sync, for use inside a training step (a
            point within tol is held, so the result never drifts off a converged shift).
        tol: relative tolerance on the expected parameter count.
    Returns:
        0-dim float64 tensor on alpha's device; -inf when every candidate fits (sum n <= B).
    Raises:
        BudgetError: B below the smallest candidate (checked unless n lives on an accelerator
            and ``iters`` is set), bad counts, or a shape mismatch.
        ConfigError: beta <= 0, iters < 0 or tol < 0.
    """
    if not beta > 0:
        raise ConfigError(f"beta must be positive, got {beta!r}")
    if iters is not None and iters < 0:
        raise ConfigError(f"iters must be >= 0 or None, got {iters!r}")
    if not tol >= 0:
        raise ConfigError(f"tol must be >= 0, got {tol!r}")
    a = alpha.detach().to(_F64).reshape(-1)
    dev = a.device
    n_on_device = isinstance(n, torch.Tensor) and n.device.type != "cpu"
    if iters is None or not n_on_device:
        check_budget(n, budget)
        if budget_fits_all(n, budget):
            return torch.full((), -math.inf, dtype=_F64, device=dev)
    nt = torch.as_tensor(n, dtype=_F64, device=dev).reshape(-1)
    if nt.shape != a.shape:
        raise BudgetError(f"{a.numel()} logits but {nt.numel()} parameter counts")
    with torch.no_grad():
        s = _Setup(a, nt, float(budget), float(beta), float(tol))
        b = s.start(init)
        dx = dxold = s.hi - s.lo
        lo, hi = s.lo, s.hi
        if iters is not None:
            for _ in range(iters):
                lo, hi, b, dx, dxold, _ = s.step(lo, hi, b, dx, dxold)
            # Only reached without a host check when n is on the device: sum n <= B -> all fit.
            return torch.where(s.total <= s.budget, torch.full_like(b, -math.inf), b)
        best, best_err = b, math.inf
        for _ in range(_MAX_ITERS):
            lo, hi, nb, dx, dxold, rel = s.step(lo, hi, b, dx, dxold)
            err = abs(rel.item())
            if err < best_err:
                best, best_err = b, err
            if err <= tol:
                return b
            b = nb
        return best  # precision-limited (beta tiny next to |alpha|): the closest point seen


class _Setup:
    """Constants of one solve and one safeguarded step (torch ops only: no host sync)."""

    def __init__(self, a: torch.Tensor, nt: torch.Tensor, budget: float, beta: float,
                 tol: float):
        self.a, self.beta, self.tol = a, beta, tol
        self.log_n = nt.log()
        self.total = nt.sum()
        # torch.full, not torch.tensor: no host-to-device copy, so no sync inside a step.
        self.budget = torch.full((), budget, dtype=_F64, device=a.device)
        self.log_b = self.budget.log()
        self.log_rest = (self.total - self.budget).log()  # log(T - B); NaN if all fit (masked)
        big = torch.finfo(_F64).max
        # Bracket from the module docstring; clamped so extreme logits cannot overflow it.
        self.hi = (a.max() + beta * (self.total.log() - self.log_b + 1)).clamp(-big, big)
        self.lo = (a.min() - beta * (self.log_b - self.log_rest + 1)).clamp(-big, big)

    def start(self, init) -> torch.Tensor:
        # Cold start: the shift that would be exact if all logits were equal to their mean.
        cold = self.a.mean() - self.beta * (self.log_b - self.log_rest)
        if init is not None:
            if isinstance(init, torch.Tensor):
                init = init.detach().to(self.a.device, _F64).reshape(())
            else:
                init = torch.full((), float(init), dtype=_F64, device=self.a.device)
            cold = torch.where(torch.isfinite(init), init, cold)
        return torch.minimum(torch.maximum(cold, self.lo), self.hi)

    def step(self, lo, hi, b, dx, dxold):
        """One rtsafe step; returns (lo, hi, next b, dx, dxold, (E(b) - B) / B)."""
        x = (self.a - b) / self.beta
        lp, ln = F.logsigmoid(x), F.logsigmoid(-x)  # log p, log(1 - p), finite at any x
        w_on, w_off = self.log_n + lp, self.log_n + ln
        log_e = torch.logsumexp(w_on, 0)  # log E,       E = sum n p
        log_c = torch.logsumexp(w_off, 0)  # log (T - E), the parameters switched off
        rel = torch.expm1(log_e - self.log_b)
        # 1. Shrink the bracket: E(b) > B means the root lies to the right of b.
        above = log_e > self.log_b
        lo = torch.where(above, b, lo)
        hi = torch.where(above, hi, b)
        # 2. Newton on the log of the smaller side at the root: log E when B <= T / 2, else
        #    log(T - E). In its tail that log is near-linear in b (one step lands) where the
        #    plain residual E - B is exponential (Newton overshoots by orders of magnitude).
        on = self.log_b <= self.log_rest
        r = torch.where(on, log_e - self.log_b, log_c - self.log_rest)
        dr_on = -(torch.softmax(w_on, 0) * ln.exp()).sum() / self.beta
        dr_off = (torch.softmax(w_off, 0) * lp.exp()).sum() / self.beta
        step = -r / torch.where(on, dr_on, dr_off)
        newton = b + step
        # 3. rtsafe safeguard: bisect when Newton leaves the bracket or is not at least
        #    halving the step taken two iterations ago (guarantees linear convergence).
        ok = torch.isfinite(newton) & (newton >= lo) & (newton <= hi) \
            & (step.abs() <= 0.5 * dxold.abs())
        mid = lo / 2 + hi / 2  # not (lo + hi) / 2: that overflows at extreme shifts
        nb = torch.where(ok, newton, mid)
        # 4. Hold a converged point, so a fixed-iteration run ends on it rather than wherever
        #    later safeguarded steps wander (at rounding-noise level the progress test fails
        #    and would bisect towards a far bracket end). A Newton step below the float64
        #    resolution of b or of the logits also means converged: |dr/db| <= 1 / beta, so
        #    |r| <= |step| / beta <= 4 eps (|b| / beta + 1), about 1e-8 at |b| / beta = 1e7.
        stalled = step.abs() <= 4 * _EPS * (b.abs() + self.beta)
        nb = torch.where((rel.abs() <= self.tol) | stalled, b, nb)
        ndx = torch.where(ok, step.abs(), (hi - lo) / 2)
        return lo, hi, nb, ndx, dx, rel


# --- gates ---------------------------------------------------------------------------------


def gate_logits(alpha: torch.Tensor, shift: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """(alpha - shift) / beta, differenced in float64 (cancellation at large logits), in
    alpha's dtype; the shift is detached, so gradients flow only to alpha."""
    shift = torch.as_tensor(shift, dtype=_F64, device=alpha.device).detach()
    return ((alpha.to(_F64) - shift) / beta).to(alpha.dtype)


def gate_probs(alpha: torch.Tensor, shift: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """Gate probabilities p = sigmoid((alpha - shift) / beta) in alpha's dtype.

    The shift is a constant of the backward pass. A shift of -inf gives all ones.
    """
    return torch.sigmoid(gate_logits(alpha, shift, beta))


def expected_params(p: torch.Tensor, n) -> torch.Tensor:
    """Expected trainable parameters sum_i n_i p_i (float64, differentiable in p)."""
    nt = torch.as_tensor(n, dtype=_F64, device=p.device)
    return (p.to(_F64) * nt).sum()


def gate_entropy(p: torch.Tensor) -> torch.Tensor:
    """Mean binary entropy of the gates in nats; 0 at p in {0, 1} (xlogy(0, 0) = 0)."""
    q = 1 - p
    return -(torch.special.xlogy(p, p) + torch.special.xlogy(q, q)).mean()


def logistic_noise(like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """logit u for u ~ U(0, 1), shaped like ``like`` (same dtype and device).

    Drawn once and passed as ``noise`` to the samplers, one draw serves several passes of a
    step (the second-order estimate differentiates one function of alpha).
    """
    eps = torch.finfo(like.dtype).eps
    u = torch.rand(like.shape, generator=generator, device=like.device, dtype=like.dtype)
    u = u.clamp(eps, 1 - eps)  # logit(0) and logit(1) are infinite
    return u.log() - torch.log1p(-u)


def concrete_sample(alpha: torch.Tensor, shift: torch.Tensor, beta: float = 1.0,
                    temperature: float = 1.0, hard: bool = False,
                    generator: torch.Generator | None = None,
                    noise: torch.Tensor | None = None) -> torch.Tensor:
    """Binary-concrete gates z = sigmoid((logit p + logit u) / T), u ~ U(0, 1).

    Args:
        alpha, shift, beta: as in ``gate_probs``; logit p = (alpha - shift) / beta directly,
            never log(p), so saturated gates keep their gradient.
        temperature: relaxation temperature T (> 0).
        hard: straight-through gates: forward exactly 1[z > 0.5], backward through z.
        generator: random generator on alpha's device, for reproducible samples.
        noise: logit u from ``logistic_noise`` (then ``generator`` is unused).
    Returns:
        Tensor like alpha, in (0, 1) (soft; may round to 0/1 at saturated logits) or {0, 1}.
    Raises:
        ConfigError: temperature <= 0.
    """
    if not temperature > 0:
        raise ConfigError(f"temperature must be positive, got {temperature!r}")
    if noise is None:
        noise = logistic_noise(alpha, generator)
    z = torch.sigmoid((gate_logits(alpha, shift, beta) + noise) / temperature)
    if not hard:
        return z
    # h + (z - z) is exactly h in the forward pass and carries z's gradient backward.
    return (z > 0.5).to(z.dtype) + (z - z.detach())


#: the stretch interval (gamma, zeta) of hard-concrete gates (Louizos et al., 2018)
STRETCH = (-0.1, 1.1)


def hard_concrete_sample(alpha: torch.Tensor, shift: torch.Tensor, beta: float = 1.0,
                         temperature: float = 1.0, generator: torch.Generator | None = None,
                         noise: torch.Tensor | None = None,
                         stretch: tuple[float, float] = STRETCH) -> torch.Tensor:
    """Hard-concrete gates: a binary-concrete sample stretched to (gamma, zeta), clipped to [0, 1].

    The clip gives exact 0s and 1s with positive probability (a closed gate contributes
    nothing, an open one everything) while z stays differentiable in alpha where 0 < z < 1.

    Args:
        alpha, shift, beta, temperature, generator, noise: as in ``concrete_sample``.
        stretch: (gamma, zeta) with gamma < 0 and zeta > 1.
    Returns:
        Tensor like alpha in [0, 1].
    Raises:
        ConfigError: temperature <= 0 or a stretch that does not contain [0, 1].
    """
    lo, hi = stretch
    if not (lo < 0 and hi > 1):
        raise ConfigError(f"stretch must satisfy gamma < 0 < 1 < zeta, got {stretch!r}")
    s = concrete_sample(alpha, shift, beta, temperature, False, generator, noise)
    return (s * (hi - lo) + lo).clamp(0, 1)


def alpha_from_scores(score: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Logits from a non-negative importance score: scale * standardised log score (float64).

    Scores span orders of magnitude, hence the log; standardising makes the spread of the
    logits (and so how far the gates start from the budget share) independent of the loss
    scale. Zero scores (a delta that never trained) take the smallest positive score, so they
    rank last and stay finite; all-equal or all-zero scores give all-zero logits.

    Args:
        score: shape (N,), >= 0.
        scale: standard deviation of the returned logits (> 0).
    Returns:
        float64 tensor of shape (N,) on score's device, monotone in the score.
    Raises:
        ConfigError: scale <= 0, or a negative or NaN score.
    """
    if not scale > 0:
        raise ConfigError(f"scale must be positive, got {scale!r}")
    s = score.detach().to(_F64).reshape(-1)
    if torch.isnan(s).any() or (s < 0).any():
        raise ConfigError("sensitivity scores must be non-negative numbers")
    pos = s[s > 0]
    if pos.numel() == 0:
        return torch.zeros_like(s)
    log = torch.maximum(s, pos.min()).log()
    spread = log.std(unbiased=False) if log.numel() > 1 else log.new_zeros(())
    if not spread > 0:
        return torch.zeros_like(s)
    return scale * (log - log.mean()) / spread


# --- deriving ------------------------------------------------------------------------------


def derive(p: torch.Tensor, n, budget: float, alpha: torch.Tensor | None = None,
           needs: Sequence[Sequence[int]] | None = None, shared: Sequence[int] | None = None) -> torch.Tensor:
    """Knapsack-greedy structure: keep candidates in order of p while they fit in B.

    Order: p descending, ties by alpha descending, then by lower index. A candidate that does
    not fit is skipped and smaller ones are still tried. Shared tensors are paid once: a
    candidate costs its own n plus the shared tensors it needs that no kept candidate needed
    before it, so the kept total counts each of them once, and not at all when none is kept.

    Args:
        p: gate scores, shape (N,).
        n: parameter count per candidate, shape (N,).
        budget: the budget B in parameters.
        alpha: optional logits for breaking ties in p.
        needs: per candidate, the indices of the shared tensors it needs (None: none share).
        shared: the parameter count of each shared tensor.
    Returns:
        Bool keep-mask of shape (N,) on p's device; the kept total is <= B.
    Raises:
        BudgetError: B below the smallest candidate, bad counts, NaN scores or a shape mismatch.
    """
    check_budget(n, budget)
    counts = _host_counts(n)
    scores = p.detach().to("cpu", _F64).reshape(-1)
    if scores.numel() != len(counts) or (alpha is not None and alpha.numel() != len(counts)):
        raise BudgetError(f"{scores.numel()} scores but {len(counts)} parameter counts")
    if torch.isnan(scores).any():
        raise BudgetError("gate scores contain NaN; the search diverged")
    if needs is not None and (len(needs) != len(counts) or shared is None):
        raise BudgetError(f"{len(needs)} shared-tensor needs for {len(counts)} candidates (and costs: {shared is not None})")
    # 1. Stable sorts from the least to the most significant key give the full tie order.
    order = torch.arange(len(counts))
    if alpha is not None:
        a = alpha.detach().to("cpu", _F64).reshape(-1)
        order = torch.sort(a, descending=True, stable=True).indices
    order = order[torch.sort(scores[order], descending=True, stable=True).indices]
    # 2. Greedy fill; stop early once nothing left could fit.
    keep = [False] * len(counts)
    total, smallest = 0, min(counts)
    paid: set[int] = set()
    for i in order.tolist():
        extra = [j for j in needs[i] if j not in paid] if needs is not None else []
        cost = counts[i] + sum(shared[j] for j in extra)
        if total + cost <= budget:
            keep[i] = True
            total += cost
            paid.update(extra)
            if budget - total < smallest:
                break
    return torch.tensor(keep, dtype=torch.bool, device=p.device)


def group_counts(keep, group_ids: Sequence[Hashable]) -> dict:
    """Kept candidates per group, e.g. the derived rank of each (site, kind).

    Args:
        keep: bool mask over candidates (tensor or sequence).
        group_ids: one hashable group id per candidate.
    Returns:
        ``{group: kept count}`` for every group, in order of first appearance (0 if none kept).
    Raises:
        BudgetError: lengths differ.
    """
    flags = keep.detach().cpu().tolist() if isinstance(keep, torch.Tensor) else list(keep)
    if len(flags) != len(group_ids):
        raise BudgetError(f"{len(flags)} keep flags but {len(group_ids)} group ids")
    out: dict = {}
    for g, k in zip(group_ids, flags):
        out[g] = out.get(g, 0) + int(bool(k))
    return out
