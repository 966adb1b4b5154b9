"""Weights of an export and the probe that checks it: the structure's modules holding the
trained tensors, and the outputs of s3pet's own model on a small fixed batch."""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from s3pet import structure as S
from s3pet.errors import StructureError
from s3pet.inject import DeltaSet
from s3pet.models import is_encoder_decoder
from s3pet.space import ModuleSpec

log = logging.getLogger("s3pet.export")

# ----------------------------------------------------------------------------- weights

def build_deltas(structure: S.Structure, backbone: nn.Module,
                 weights: dict[str, Tensor] | None) -> tuple[list[ModuleSpec], DeltaSet]:
    """The structure's modules for ``backbone`` (not attached), holding ``weights``.

    ``weights`` are keyed as ``DeltaSet.state_dict()`` (``deltas.<site>--<kind>.<param>``);
    None keeps the fresh initialisation (logged: the export is untrained).
    Raises StructureError when the structure does not fit the backbone, or when ``weights``
    miss keys, have extra ones or the wrong shapes.
    """
    specs = S.to_specs(structure, backbone)
    return specs, load_deltas(specs, backbone, weights)


def load_deltas(specs: list[ModuleSpec], backbone: nn.Module, weights: dict[str, Tensor] | None) -> DeltaSet:
    ds = DeltaSet(specs, gated=False).bake()  # saved weights hold only what a module keeps
    ref = next(backbone.parameters())
    ds.to(device=ref.device)
    if weights is None:
        log.warning("no weights given: exporting freshly initialised (untrained) modules")
        return ds
    expected = ds.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    shapes = [f"{k}: got {tuple(weights[k].shape)}, expected {tuple(v.shape)}"
              for k, v in expected.items() if k in weights and tuple(weights[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {some(missing)}")
        if unexpected:
            parts.append(f"unexpected {some(unexpected)}")
        if shapes:
            parts.append(f"wrong shape {some(shapes)}")
        hint = ""
        if any(k.startswith(("deltas.deltas.", "head.")) for k in unexpected):
            hint = ("; these look like the keys of a delta.safetensors file: drop its 'head.' entries and strip "
                    "the leading 'deltas.' (export_run does both)")
        raise StructureError(f"weights do not fit the structure ({len(expected)} tensors expected): "
                             f"{'; '.join(parts)}{hint}")
    with torch.no_grad():
        ds.load_state_dict({k: v.detach() for k, v in weights.items()})
    return ds


def some(items: list[str], n: int = 4) -> str:
    shown = ", ".join(items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


def by_site(specs: list[ModuleSpec], ds: DeltaSet) -> dict[str, dict[str, tuple[ModuleSpec, nn.Module]]]:
    """{site path: {kind: (spec, module)}}."""
    out: dict[str, dict] = {}
    for spec in specs:
        out.setdefault(spec.site.path, {})[spec.kind] = (spec, ds.delta(spec))
    return out


# ----------------------------------------------------------------------------- probing

def probe_batch(model: nn.Module) -> dict[str, Tensor]:
    """A small deterministic batch any transformers model of the families s3pet knows accepts."""
    cfg = model.config
    device = next(model.parameters()).device
    vocab = int(getattr(cfg, "vocab_size", 0) or 128)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0  # exercise padding
    batch = {"input_ids": ids, "attention_mask": mask}
    if is_encoder_decoder(cfg):
        batch["decoder_input_ids"] = ids[:, :3]
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def outputs(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    was = model.training
    model.eval()
    try:
        out = model(**batch)
    finally:
        model.train(was)
    return (out[0] if not isinstance(out, Tensor) else out).float()


def s3pet_outputs(backbone: nn.Module, ds: DeltaSet) -> Tensor:
    ds.attach(backbone)
    try:
        return outputs(backbone, probe_batch(backbone))
    finally:
        ds.detach()


def tolerance(dtype: torch.dtype, scale: float) -> float:
    """Allowed max abs difference between two computations of the same function in ``dtype``
    whose outputs reach ``scale``: sqrt(eps) relative, i.e. half the digits of the dtype
    (reordered sums over thousands of terms lose that much, a dropped delta far more)."""
    return torch.finfo(dtype).eps ** 0.5 * (1.0 + scale)


def check_same(ref: Tensor, got: Tensor, what: str, dtype: torch.dtype = torch.float32) -> float:
    """Max abs difference; StructureError if above ``tolerance`` for the models' ``dtype``."""
    diff = (ref - got).abs().max().item()
    tol = tolerance(dtype, ref.abs().max().item())
    if not diff <= tol:  # also catches NaN
        raise StructureError(f"{what} does not reproduce s3pet's model: outputs differ by {diff:.3g} "
                             f"(tolerance {tol:.3g}); nothing was written")
    return diff
