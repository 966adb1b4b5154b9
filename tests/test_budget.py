"""Budget math: parsing, the shift solve, gates and knapsack-greedy deriving."""

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from s3pet.budget import (
    budget_fits_all,
    budget_record,
    check_budget,
    concrete_sample,
    derive,
    expected_params,
    gate_entropy,
    gate_probs,
    group_counts,
    parse_budget,
    solve_shift,
)
from s3pet.errors import BudgetError, ConfigError

TOL = 1e-6
FAST = settings(max_examples=40, deadline=None)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tensors here are tiny; on a loaded CPU, intra-op threads only contend."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def rel_err(alpha, n, budget, shift, beta):
    e = expected_params(gate_probs(alpha.double(), shift, beta), n).item()
    return abs(e - budget) / budget


@st.composite
def problems(draw, scales=(0.01, 1.0, 30.0, 1e3, 1e4), betas=(0.01, 0.1, 1.0, 10.0),
             max_log_n=7.0, max_n=80):
    """(alpha, n, B, beta) with min(n) <= B < sum(n); n log-uniform over 1..10^max_log_n."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    size = draw(st.integers(2, max_n))
    scale = draw(st.sampled_from(scales))
    alpha = torch.randn(size, generator=g) * scale
    n = torch.round(10 ** (torch.rand(size, generator=g, dtype=torch.float64) * max_log_n))
    n = n.long().clamp(min=1)
    total = int(n.sum())
    frac = draw(st.sampled_from([1e-6, 1e-3, 0.05, 0.3, 0.7, 0.99, 0.999999]))
    budget = max(int(n.min()), int(frac * total))
    assume(budget < total)
    return alpha, n, budget, draw(st.sampled_from(betas))


# --- parse_budget ----------------------------------------------------------------------------

@pytest.mark.parametrize("value, backbone, expected", [
    (25000, 10**6, 25000),
    ("25000", 10**6, 25000),
    ("25_000", 10**6, 25000),
    (" 300 ", 10**6, 300),
    ("25k", 10**6, 25000),
    ("25K", 10**6, 25000),
    ("2.5k", 10**6, 2500),
    ("1.5M", 10**6, 1_500_000),
    ("2G", 10**6, 2_000_000_000),
    ("1.0004k", 10**6, 1000),  # suffixed counts round to nearest
    (25000.0, 10**6, 25000),
    ("0.01%", 22_713_728, 2271),  # the design doc's MiniLM example
    ("100%", 1000, 1000),
    ("50%", 3, 2),  # 1.5 rounds half up
    (".5%", 1000, 5),
    ("0.0001%", 1000, 1),  # rounds to 0, floored at one parameter
])
def test_parse_budget_table(value, backbone, expected):
    assert parse_budget(value, backbone) == expected


@pytest.mark.parametrize("value", [
    "", "abc", "-5", "0", 0, -3, True, None, "1.5", 0.5, float("nan"), 2.5, "0%", "101%",
    "5%%", "%", "k", "1e4", "1,000", "25 000", "0k", [100],
])
def test_parse_budget_rejects_malformed(value):
    with pytest.raises(ConfigError) as e:
        parse_budget(value, 10**6)
    assert repr(value) in str(e.value)
    assert "25k" in str(e.value) or "percent" in str(e.value)


def test_parse_budget_bare_fraction_points_to_percent():
    with pytest.raises(ConfigError, match=r"'0\.01%'"):
        parse_budget("0.01", 10**6)


def test_parse_budget_percent_needs_a_backbone():
    with pytest.raises(ConfigError, match="backbone"):
        parse_budget("1%", 0)


def test_budget_record():
    assert budget_record(2271, 22_713_728) == {"params": 2271, "fraction": 2271 / 22_713_728}
    with pytest.raises(ConfigError):
        budget_record(0, 100)


# --- solve_shift -----------------------------------------------------------------------------

@FAST
@given(problems())
def test_budget_met_iterate_to_tolerance(prob):
    alpha, n, budget, beta = prob
    shift = solve_shift(alpha, n, budget, beta)
    assert shift.dtype == torch.float64 and shift.dim() == 0 and torch.isfinite(shift)
    assert rel_err(alpha, n, budget, shift, beta) <= TOL * (1 + 1e-6)


@FAST
@given(problems())
def test_budget_met_fixed_iterations(prob):
    alpha, n, budget, beta = prob
    shift = solve_shift(alpha, n, budget, beta, iters=100)
    assert rel_err(alpha, n, budget, shift, beta) <= TOL


@FAST
@given(problems(), st.floats(0.05, 1.0))
def test_warm_start_converges_in_few_fixed_iterations(prob, move):
    """A training step moves every logit by a fraction of beta; 8 steps from the last shift."""
    alpha, n, budget, beta = prob
    shift = solve_shift(alpha, n, budget, beta)
    g = torch.Generator().manual_seed(1)
    stepped = alpha + move * beta * torch.randn(alpha.shape, generator=g)
    warm = solve_shift(stepped, n, budget, beta, init=shift, iters=8)
    assert rel_err(stepped, n, budget, warm, beta) <= TOL


@FAST
@given(problems(scales=(1e4,), betas=(1e-3, 1e-2, 1.0)), st.booleans())
def test_finite_and_correct_at_extreme_logits(prob, two_valued):
    alpha, n, budget, beta = prob
    if two_valued:  # logits pinned at the extremes, as after a long search
        alpha = torch.where(alpha > 0, 1e4, -1e4)
    shift = solve_shift(alpha, n, budget, beta)
    p = gate_probs(alpha.double(), shift, beta)
    assert torch.isfinite(shift) and torch.isfinite(p).all()
    assert rel_err(alpha, n, budget, shift, beta) <= TOL * (1 + 1e-6)


@FAST
@given(problems(), st.floats(1.001, 50.0))
def test_shift_decreases_as_budget_grows(prob, factor):
    alpha, n, budget, beta = prob
    bigger = int(budget * factor) + 1
    assume(bigger < int(n.sum()))
    b_small = solve_shift(alpha, n, budget, beta, tol=1e-10)
    b_big = solve_shift(alpha, n, bigger, beta, tol=1e-10)
    assert b_big < b_small


@st.composite
def well_conditioned(draw):
    """Spread logits and mid-range budgets, so that the shift itself is well determined."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    size = draw(st.integers(5, 60))
    beta = draw(st.sampled_from([0.3, 1.0, 3.0]))
    alpha = torch.randn(size, generator=g, dtype=torch.float64) * beta
    n = torch.randint(1, 10**4, (size,), generator=g)
    budget = max(int(n.min()), int(draw(st.floats(0.1, 0.9)) * int(n.sum())))
    return alpha, n, budget, beta


@FAST
@given(well_conditioned(), st.floats(-1e4, 1e4))
def test_shift_moves_with_a_constant_offset_of_alpha(prob, c):
    alpha, n, budget, beta = prob
    b = solve_shift(alpha, n, budget, beta, tol=1e-12)
    b_moved = solve_shift(alpha + c, n, budget, beta, tol=1e-12)
    assert abs(b_moved - (b + c)) <= 1e-6 * beta + 1e-12 * abs(c)


@FAST
@given(well_conditioned(), st.sampled_from([1e-2, 0.5, 7.0, 100.0]))
def test_shift_scales_with_alpha_and_beta_together(prob, s):
    alpha, n, budget, beta = prob
    b = solve_shift(alpha, n, budget, beta, tol=1e-12)
    b_scaled = solve_shift(alpha * s, n, budget, beta * s, tol=1e-12)
    assert abs(b_scaled - s * b) <= 1e-6 * beta * s


@pytest.mark.parametrize("beta", [1e-3, 0.1, 1.0, 10.0, 1e3])
@pytest.mark.parametrize("frac", [1e-4, 0.25, 0.9])
def test_equal_logits_give_the_closed_form_shift(beta, frac):
    """All logits equal: every gate is B / T, so b = alpha - beta * logit(B / T)."""
    n = torch.tensor([3, 50, 1000, 7, 10**6])
    total = int(n.sum())
    budget = int(frac * total)
    alpha = torch.full((5,), 2.0)
    b = solve_shift(alpha, n, budget, beta, tol=1e-12)
    expected = 2.0 - beta * math.log(budget / (total - budget))
    assert abs(b.item() - expected) <= 1e-9 * max(1.0, beta)
    assert torch.allclose(gate_probs(alpha.double(), b, beta),
                          torch.full((5,), budget / total, dtype=torch.float64), rtol=1e-9)


def test_larger_beta_flattens_the_gates():
    alpha = torch.linspace(-3, 3, 20)
    n = torch.full((20,), 100)
    spreads = []
    for beta in (0.1, 1.0, 10.0, 100.0):
        p = gate_probs(alpha, solve_shift(alpha, n, 500, beta), beta)
        spreads.append((p.max() - p.min()).item())
    assert spreads == sorted(spreads, reverse=True) and spreads[-1] < 0.05


@pytest.mark.parametrize("init", [None, -1e300, 1e300, float("nan"), float("inf"), 0.0])
def test_any_warm_start_is_safe(init):
    alpha = torch.randn(50, generator=torch.Generator().manual_seed(0))
    n = torch.arange(1, 51)
    shift = solve_shift(alpha, n, 300, 0.5, init=init, iters=60)
    assert rel_err(alpha, n, 300, shift, 0.5) <= TOL


def test_converged_shift_stays_put_over_extra_iterations():
    alpha = torch.randn(40, generator=torch.Generator().manual_seed(3)) * 5
    n = torch.randint(1, 10**6, (40,), generator=torch.Generator().manual_seed(4))
    budget = int(n.sum()) // 10
    for k in (20, 21, 50, 99):
        assert rel_err(alpha, n, budget, solve_shift(alpha, n, budget, iters=k), 1.0) <= TOL


def test_infeasible_budget_names_the_numbers():
    n = torch.tensor([40, 10, 25])
    with pytest.raises(BudgetError) as e:
        solve_shift(torch.zeros(3), n, 5)
    msg = str(e.value)
    assert "5" in msg and "10" in msg and "raise the budget" in msg
    with pytest.raises(BudgetError):
        solve_shift(torch.zeros(3), n, 5, iters=10)
    with pytest.raises(BudgetError):
        derive(torch.rand(3), n, 5)


@pytest.mark.parametrize("n, budget", [([1, 0, 3], 10), ([1, -2], 10), ([], 10), ([3, 4], 0),
                                       ([3, 4], -1), ([3, 4], float("nan"))])
def test_bad_counts_or_budget_raise(n, budget):
    with pytest.raises(BudgetError):
        check_budget(n, budget)


def test_shape_mismatch_and_bad_beta_raise():
    with pytest.raises(BudgetError, match="3 logits but 2"):
        solve_shift(torch.zeros(3), [5, 5], 7)
    with pytest.raises(ConfigError, match="beta"):
        solve_shift(torch.zeros(2), [5, 5], 7, beta=0.0)


@pytest.mark.parametrize("iters", [None, 5])
def test_budget_at_or_above_total_keeps_everything(iters):
    alpha = torch.tensor([-50.0, 0.0, 50.0], requires_grad=True)
    n = [10, 20, 30]
    assert budget_fits_all(n, 60) and not budget_fits_all(n, 59)
    for budget in (60, 10**9):
        shift = solve_shift(alpha, n, budget, iters=iters)
        assert shift.item() == -math.inf
        p = gate_probs(alpha, shift)
        assert torch.equal(p, torch.ones(3))
        assert expected_params(p, n).item() == 60
        p.sum().backward()
        assert torch.isfinite(alpha.grad).all()


def test_solve_shift_does_not_touch_the_graph():
    alpha = torch.randn(10, requires_grad=True)
    shift = solve_shift(alpha, [3] * 10, 12)
    assert not shift.requires_grad


# --- gates -----------------------------------------------------------------------------------

def test_gate_probs_dtype_and_gradient_only_through_alpha():
    alpha = torch.randn(8, requires_grad=True)
    shift = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    p = gate_probs(alpha, shift, beta=0.5)
    assert p.dtype == torch.float32
    p.sum().backward()
    assert shift.grad is None
    assert torch.allclose(alpha.grad, p.detach() * (1 - p.detach()) / 0.5, atol=1e-6)


def test_gate_probs_precise_at_large_logits():
    # Differencing in float32 would lose the 1e-3 gap between alpha and the shift.
    alpha = torch.tensor([10000.0])
    shift = torch.tensor(10000.0 - 1e-3, dtype=torch.float64)
    p = gate_probs(alpha, shift, beta=1e-3)
    assert abs(p.item() - 1 / (1 + math.exp(-1))) < 1e-3


def test_expected_params_and_entropy():
    p = torch.tensor([0.0, 1.0, 0.5, 0.25])
    assert expected_params(p, [4, 8, 10, 100]).item() == 8 + 5 + 25
    assert gate_entropy(torch.tensor([0.0, 1.0])).item() == 0.0
    assert math.isclose(gate_entropy(torch.tensor([0.5])).item(), math.log(2), rel_tol=1e-6)
    assert torch.isfinite(gate_entropy(p))


def test_concrete_soft_and_hard_values():
    alpha = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    shift = torch.tensor(0.2, dtype=torch.float64)
    z = concrete_sample(alpha, shift, generator=torch.Generator().manual_seed(1))
    assert ((z > 0) & (z < 1)).all()
    h = concrete_sample(alpha, shift, hard=True, generator=torch.Generator().manual_seed(1))
    assert set(h.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(h, (z > 0.5).float())  # same noise, thresholded


def test_concrete_gradients_reach_alpha_not_the_shift():
    for hard in (False, True):
        alpha = torch.randn(64, requires_grad=True)
        shift = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)
        z = concrete_sample(alpha, shift, beta=0.7, temperature=0.5, hard=hard,
                            generator=torch.Generator().manual_seed(2))
        (z * torch.arange(64.0)).sum().backward()
        assert shift.grad is None
        assert torch.isfinite(alpha.grad).all() and (alpha.grad.abs() > 0).any()


def test_hard_gates_fire_with_probability_p():
    """With T = 1, P(z > 0.5) = P(u > 1 - p) = p."""
    alpha = torch.tensor([-2.0, 0.0, 1.0, 3.0]).repeat(20000, 1)
    shift = torch.tensor(0.5, dtype=torch.float64)
    h = concrete_sample(alpha, shift, hard=True, generator=torch.Generator().manual_seed(3))
    p = gate_probs(alpha[0], shift)
    assert torch.allclose(h.mean(0), p, atol=0.015)


def test_concrete_edge_cases():
    alpha = torch.tensor([-1e4, 0.0, 1e4], requires_grad=True)
    ones = concrete_sample(alpha, torch.tensor(-math.inf, dtype=torch.float64))
    assert torch.equal(ones, torch.ones(3))
    z = concrete_sample(alpha, torch.tensor(0.0, dtype=torch.float64), beta=1e-3)
    assert torch.isfinite(z).all()
    with pytest.raises(ConfigError, match="temperature"):
        concrete_sample(alpha, torch.tensor(0.0), temperature=0.0)


# --- derive ----------------------------------------------------------------------------------

def greedy_reference(p, n, budget, alpha):
    order = sorted(range(len(p)), key=lambda i: (-p[i], -alpha[i], i))
    keep, total = [False] * len(p), 0
    for i in order:
        if total + n[i] <= budget:
            keep[i], total = True, total + n[i]
    return keep


@FAST
@given(st.data())
def test_derive_matches_the_greedy_rule_and_fits(data):
    size = data.draw(st.integers(1, 40))
    # Few distinct values so that ties in p and in alpha are common.
    p = data.draw(st.lists(st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]), min_size=size,
                           max_size=size))
    alpha = data.draw(st.lists(st.sampled_from([-1.0, 0.0, 2.0]), min_size=size, max_size=size))
    n = data.draw(st.lists(st.integers(1, 1000), min_size=size, max_size=size))
    budget = data.draw(st.integers(min(n), sum(n) + 10))
    keep = derive(torch.tensor(p), n, budget, torch.tensor(alpha))
    assert keep.dtype == torch.bool
    assert keep.tolist() == greedy_reference(p, n, budget, alpha)
    assert sum(k * c for k, c in zip(keep.tolist(), n)) <= budget
    assert torch.equal(keep, derive(torch.tensor(p), n, budget, torch.tensor(alpha)))


@FAST
@given(st.integers(0, 2**31 - 1), st.integers(10**3, 10**7))
def test_derive_fills_the_budget_when_candidates_are_small(seed, budget):
    g = torch.Generator().manual_seed(seed)
    n = torch.randint(1, budget // 100 + 1, (400,), generator=g)
    assume(int(n.sum()) > budget)
    keep = derive(torch.rand(400, generator=g), n, budget)
    total = int(n[keep].sum())
    assert 0.98 * budget <= total <= budget


def test_derive_tie_rules_and_skipping():
    same = torch.tensor([0.5, 0.5, 0.5])
    assert derive(same, [1, 1, 1], 2).tolist() == [True, True, False]  # lower index first
    assert derive(same, [1, 1, 1], 2, alpha=torch.tensor([0.0, 1.0, 2.0])).tolist() == \
        [False, True, True]  # then higher alpha first
    # The second candidate does not fit; a smaller later one still does.
    assert derive(torch.tensor([0.9, 0.8, 0.7]), [5, 10, 3], 9).tolist() == [True, False, True]
    assert derive(torch.tensor([0.1, 0.2]), [5, 6], 100).tolist() == [True, True]


def test_derive_rejects_nan_and_mismatch():
    with pytest.raises(BudgetError, match="NaN"):
        derive(torch.tensor([0.5, float("nan")]), [1, 1], 5)
    with pytest.raises(BudgetError, match="2 scores but 3"):
        derive(torch.tensor([0.5, 0.1]), [1, 1, 1], 5)


def test_group_counts_merges_kept_components_per_site():
    keep = torch.tensor([True, False, True, True, False])
    groups = [("q", "lora"), ("q", "lora"), ("v", "lora"), ("v", "lora"), ("ln", "lnfit")]
    counts = group_counts(keep, groups)
    assert counts == {("q", "lora"): 1, ("v", "lora"): 2, ("ln", "lnfit"): 0}
    assert list(counts) == [("q", "lora"), ("v", "lora"), ("ln", "lnfit")]
    assert group_counts([1, 0, 1], [7, 7, 3]) == {7: 1, 3: 1}
    with pytest.raises(BudgetError):
        group_counts(keep, groups[:2])

