"""The search-ops benchmark counts each phase's ops and the shift iterations a step needs."""

from __future__ import annotations

from scripts import load_benchmark

O = load_benchmark("search_ops")


def test_counts_every_phase_and_each_steps_iterations():
    r = O.measure("bert-base", True, "s3pet-m", "0.1%", steps=3, alpha_lr=0.1, shift_iters=4)
    assert set(r["ops"]) == {"alpha", "w"} and min(r["ops"].values()) > 0
    assert 0 < r["shift_solve_ops"] < r["ops"]["alpha"]  # the solve runs inside the alpha step
    assert sum(r["iterations_needed"].values()) == 3 and r["modules"] > 0
    fewer = O.measure("bert-base", True, "s3pet-m", "0.1%", steps=0, alpha_lr=0.1, shift_iters=2)
    assert fewer["shift_solve_ops"] < r["shift_solve_ops"]  # ops grow with the iterations
