"""GPU-only checks, run on a machine with a CUDA device (the CPU test suite cannot run them).

    python benchmarks/gpu_checks.py

1. The fixed-iteration shift solve, the gates, concrete sampling and their backward pass make
   no host-device synchronisation (checked with ``torch.cuda.set_sync_debug_mode("error")``),
   and still meet the budget to 1e-6 relative.
"""

from __future__ import annotations

import math
import sys

import torch

from s3pet.budget import concrete_sample, expected_params, gate_probs, solve_shift


def check_fixed_iterations_never_sync_the_host() -> None:
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    alpha = torch.randn(5000, device=dev, generator=g, requires_grad=True)
    n = torch.randint(1, 10**5, (5000,), device=dev, generator=g)
    budget = 10**6
    shift = solve_shift(alpha, n, budget, iters=40)  # cold start, outside the checked region
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        moved = alpha.detach() + 0.1 * torch.randn(5000, device=dev, generator=g)
        shift = solve_shift(moved, n, budget, init=shift, iters=10)
        p = gate_probs(alpha, shift)
        z = concrete_sample(alpha, shift, hard=True, generator=g)
        (z * p).sum().backward()
        fits = solve_shift(moved, n, 10**12, iters=3)
        synced = False
        try:  # the detector works: the tolerance loop syncs
            solve_shift(moved, n, budget, init=shift)
        except RuntimeError:
            synced = True
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert synced, "the sync detector did not fire on the tolerance loop"
    rel = abs(float(expected_params(gate_probs(moved, shift), n)) - budget) / budget
    assert shift.device.type == "cuda" and rel <= 1e-6, rel
    assert fits.item() == -math.inf


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_checks: no CUDA device here; run this on a GPU machine", file=sys.stderr)
        return 2
    check_fixed_iterations_never_sync_the_host()
    print("1 passed, 0 failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
