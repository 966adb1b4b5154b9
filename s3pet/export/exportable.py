"""Which candidates of a space an export can always write: the restriction behind
``SearchConfig.exportable``, asked of the kinds (``DeltaKind.merge_refusal``, ``peft_refusal``)
and of the model (a bias a layer cannot take, a config that would drop it)."""

from __future__ import annotations

import importlib.util

from torch import nn

from s3pet.deltas import KINDS
from s3pet.export.adapter import plan_specs
from s3pet.export.merging import mergeable
from s3pet.space import ModuleSpec, total_params


def exportable_specs(specs: list[ModuleSpec], backbone: nn.Module) -> tuple[list[ModuleSpec], str]:
    """The candidates of ``specs`` every subset of which one export writes, and that export.

    Returns ``(kept, target)``, ``target`` being ``"peft or merged"`` (every candidate is both),
    ``"merged"`` or ``"peft"``. A candidate merges on its own or not (``mergeable``), and a set
    that merges keeps merging when modules are dropped; the same holds for a set that forms one
    peft adapter. When neither set holds every candidate (e.g. on T5, BitFit on its bias-free
    linears is peft-only and AdapterBias merge-only), the set with more
    parameters is kept (the merged one on a tie). Without peft installed, only merging counts.
    """
    merged = mergeable(specs, backbone)
    peft = []
    if importlib.util.find_spec("peft") is not None:  # an optional extra: without it, only merging writes
        peft = [s for s in specs if KINDS[s.kind].peft_problem(s) is None and not plan_specs([s], backbone).problems]
        if peft and plan_specs(peft, backbone).problems:  # e.g. IA3 beside LoRA: no single peft adapter
            peft = []
    if len(merged) == len(specs) and len(peft) == len(specs):
        return list(specs), "peft or merged"
    if len(merged) == len(specs) or len(peft) == len(specs):
        return list(specs), "merged" if len(merged) == len(specs) else "peft"
    size = total_params
    kept, target = (merged, "merged") if size(merged) >= size(peft) else (peft, "peft")
    return kept, target


def dropped_by_kind(specs: list[ModuleSpec], kept: list[ModuleSpec]) -> dict[str, int]:
    """{kind: candidates of ``specs`` not in ``kept``}, for the log line."""
    keep = {s.key for s in kept}
    out: dict[str, int] = {}
    for s in specs:
        if s.key not in keep:
            out[s.kind] = out.get(s.kind, 0) + 1
    return out
