"""``PetModel``: a transformers model with a structure's PET modules, as ``s3pet.apply_structure``
returns it (s3pet's counterpart of peft's ``PeftModel``).

The PET modules attach to the model's backbone with forward hooks (docs/ARCHITECTURE.md,
decision 2) and live in one ``DeltaSet``; the wrapper holds both as children, so
``parameters()``, ``state_dict()``, ``.to(device)`` and an optimiser see the modules, while the
transformers model's own module tree and state dict stay as they were.
"""

from __future__ import annotations

from torch import nn

from s3pet.inject import DeltaSet


class PetModel(nn.Module):
    """``model`` (called as usual: ``forward`` passes everything through) + ``deltas`` (its PET modules).

    Attributes other than ``model`` and ``deltas`` are read from the wrapped model (``config``,
    ``generate``, ...)."""

    def __init__(self, model: nn.Module, deltas: DeltaSet, structure):
        super().__init__()
        self.model = model
        self.deltas = deltas
        self.structure = structure

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)  # parameters, buffers and children of the wrapper
        except AttributeError:
            if name in ("model", "deltas"):
                raise
            return getattr(self.model, name)

    def trainable_parameters(self) -> dict[str, int]:
        """Trainable parameters: ``pet`` (the structure's modules), ``head`` (the rest that trains:
        the model's task head), ``total`` (every parameter, frozen or not)."""
        pet = sum(p.numel() for p in self.deltas.parameters() if p.requires_grad)
        head = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return {"pet": pet, "head": head, "total": total}

    def print_trainable_parameters(self) -> None:
        """One line, as peft prints it: trainable (PET + head), all parameters, trainable share."""
        t = self.trainable_parameters()
        n = t["pet"] + t["head"]
        print(f"trainable params: {n:,} (PET {t['pet']:,} + head {t['head']:,}) || all params: {t['total']:,} "
              f"|| trainable%: {100 * n / t['total']:.4f}")
