"""Data parallelism across processes (``torchrun``): one process per GPU, same model on each.

Every rank sees the same batch order and takes every ``world``-th batch; after each backward
the gradients of the trainable tensors (PET weights, head, gate logits) are averaged across
ranks in one flattened all-reduce, so the optimisers, the shift and the derived structure stay
identical everywhere. Only rank 0 writes files. Without ``torchrun`` (WORLD_SIZE unset) every
function here is a no-op and the code runs as one process.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def init_from_env(device: str = "auto") -> str:
    """Start the process group when launched by torchrun; returns the device for this rank."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        dist.init_process_group("nccl")
        return f"cuda:{local}"
    dist.init_process_group("gloo")
    return "cpu"


def average_gradients(params: list[torch.Tensor]) -> None:
    """Average the .grad of ``params`` over ranks (one all-reduce of a flat buffer)."""
    if world_size() == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    off = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[off:off + n].view_as(g).to(g.dtype))
        off += n


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def check_same(t: torch.Tensor, what: str) -> None:
    """Raise if ``t`` differs between ranks (e.g. the gate logits that the structure is derived from)."""
    if world_size() == 1:
        return
    lo, hi = t.detach().clone().double(), t.detach().clone().double()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if not torch.equal(lo, hi):
        raise RuntimeError(f"{what} differ between ranks (max gap {float((hi - lo).abs().max()):.3g})")
