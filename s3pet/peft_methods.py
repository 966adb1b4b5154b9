"""Reference methods run through HF peft itself, the way a peft user runs them.

``AutoModelForSequenceClassification`` (the model's own pooler and classifier, the classifier
in ``modules_to_save``) wrapped by ``peft.get_peft_model``, trained by s3pet's training loop
(``train.fit``: the same schedule, evaluation, checkpoint selection, splits and metrics as
every other method), so that the only difference to s3pet's own modules is the method.

- ``peft-lora-r8-qv``: LoRA r=8 on query and value (alpha 16, dropout 0.1): peft's usual config.
- ``peft-lora-all-r1``: LoRA r=1 on every attention and FFN linear (alpha 2, dropout 0.1).
- ``adalora``: peft's AdaLoRA on every attention and FFN linear, sized to a budget: it starts
  at rank ``init_r`` (1.5x the final average rank, at least 1) and its rank allocator prunes
  singular triplets down to ``budget / (mean triplet size)`` of them (a triplet at a linear of
  d_in x d_out costs d_in + d_out + 1 parameters). The budget is met at the end of training;
  before that AdaLoRA trains more parameters, as it does for its own users.

The target modules come from s3pet's site discovery (roles), so every family works that has
an ``AutoModelForSequenceClassification`` class (BERT, RoBERTa, GPT-2, LLaMA, ...).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn

from s3pet.errors import ConfigError, TaskError

METHODS = ("peft-lora-r8-qv", "peft-lora-all-r1", "adalora")
BUDGETED = ("adalora",)  # sized to a budget; the others are fixed shapes
RATE_KIND = "lora"  # every method here is of the LoRA family: it trains at the lora kind's learning rate
ALL_LINEARS = ("attn.q", "attn.k", "attn.v", "attn.qkv", "attn.o", "ffn.gate", "ffn.in", "ffn.out")
LORA = {"peft-lora-r8-qv": (8, ("attn.q", "attn.v", "attn.qkv")), "peft-lora-all-r1": (1, ALL_LINEARS)}


def load_classifier(model: str, num_labels: int, seed: int = 0) -> nn.Module:
    """``AutoModelForSequenceClassification`` of a model name, folder or alias (float32)."""
    import transformers as tf

    from s3pet.errors import ModelError
    from s3pet.models import TINY_ALIASES, _load_hint, load_config, resolve

    config = load_config(model)
    config.num_labels = num_labels
    if getattr(config, "pad_token_id", None) is None:  # decoder-only classifiers find the last token by it
        config.pad_token_id = getattr(config, "eos_token_id", None) or 0
    if model in TINY_ALIASES:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return tf.AutoModelForSequenceClassification.from_config(config)
    try:
        return tf.AutoModelForSequenceClassification.from_pretrained(resolve(model), config=config,
                                                                      dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise ModelError(_load_hint(model, e)) from e


class PeftTaskModel(nn.Module):
    """A peft-wrapped sequence classifier behind ``TaskModel``'s interface (forward/loss/head)."""

    def __init__(self, peft_model: nn.Module, card, head_names: list[str]):
        super().__init__()
        self.peft_model = peft_model
        self.card = card
        self.regression = card.is_regression
        self.head_names = head_names
        self._loss: Tensor | None = None

    def head_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.peft_model.named_parameters()
                if p.requires_grad and any(f".{h}." in f".{n}" and "modules_to_save" in n for h in self.head_names)]

    def forward(self, batch: dict) -> Tensor:
        kw = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        # Labels go in so that the model computes its own loss (AdaLoRA adds its orthogonality
        # penalty to it); evaluation ignores the loss.
        out = self.peft_model(**kw, labels=batch["labels"])
        self._loss = out.loss
        logits = out.logits
        return logits.squeeze(-1) if self.regression else logits

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        return self._loss.float()


def _targets(backbone: nn.Module, roles: tuple[str, ...]) -> list[str]:
    from s3pet.space import discover_sites

    names = [s.path for s in discover_sites(backbone) if s.host == "linear" and s.role in roles]
    if not names:
        raise ConfigError(f"no linear layer with a role in {', '.join(roles)} found for peft")
    return names


def triplet_budget(backbone: nn.Module, targets: list[str], budget: int) -> tuple[int, float]:
    """How many AdaLoRA triplets a parameter budget buys on ``targets``, and the mean triplet size."""
    sizes = []
    for t in targets:
        m = backbone.get_submodule(t)
        d_in, d_out = (m.in_features, m.out_features) if isinstance(m, nn.Linear) else m.weight.shape
        sizes.append(d_in + d_out + 1)
    mean = sum(sizes) / len(sizes)
    k = int(budget // mean)
    if k < 1:
        raise ConfigError(f"budget {budget} is below one AdaLoRA triplet ({mean:.0f} parameters)")
    return k, mean


def build(method: str, model: str, card, budget: int | None, total_steps: int, seed: int = 0):
    """The peft model of ``method`` for ``card``: (PeftTaskModel, info dict with the peft config and sizes)."""
    import peft

    if method not in METHODS:
        raise ConfigError(f"unknown peft method {method!r}; choose from {', '.join(METHODS)}")
    if card.type == "multiple_choice":
        raise TaskError(f"task {card.name}: peft methods here need a sequence classification task")
    hf = load_classifier(model, card.num_labels, seed)
    backbone = hf.base_model
    prefix = hf.base_model_prefix
    head_names = [n for n, m in hf.named_children() if n != prefix and any(True for _ in m.parameters())]
    info: dict = {"head_modules": head_names}
    if method in LORA:
        r, roles = LORA[method]
        targets = _targets(backbone, roles)
        cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.1, target_modules=targets,
                              modules_to_save=head_names)
    else:
        if budget is None:
            raise ConfigError("adalora needs --budget")
        targets = _targets(backbone, ALL_LINEARS)
        k, mean = triplet_budget(backbone, targets, budget)
        init_r = max(1, math.ceil(1.5 * k / len(targets)))
        tinit, tfinal = int(0.1 * total_steps), int(0.3 * total_steps)
        cfg = peft.AdaLoraConfig(init_r=init_r, target_r=max(1, k // len(targets)), tinit=tinit, tfinal=tfinal,
                                 deltaT=10, total_step=total_steps, lora_alpha=2 * init_r, lora_dropout=0.1,
                                 target_modules=targets, modules_to_save=head_names)
        info.update(triplets=k, triplet_params=round(mean, 1), init_r=init_r, final_params=round(k * mean))
    pm = peft.get_peft_model(hf, cfg)
    if method == "adalora":
        pm.base_model.rankallocator.target_bgt = info["triplets"]  # the budget, in triplets, across all modules
    info["peft_config"] = {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.to_dict().items()
                           if isinstance(v, (int, float, str, bool, list, set, type(None)))}
    return PeftTaskModel(pm, card, head_names), info


def adalora_step(tm: PeftTaskModel):
    """The after-step hook AdaLoRA needs: its rank allocator reads the gradients of each step."""
    return lambda step: tm.peft_model.base_model.update_and_allocate(step)


def n_pet_params(tm: PeftTaskModel) -> int:
    head = {id(p) for p in tm.head_parameters()}
    return sum(p.numel() for p in tm.peft_model.parameters() if p.requires_grad and id(p) not in head)


def save_adapter(tm: PeftTaskModel, folder: Path) -> None:
    import warnings

    with warnings.catch_warnings():  # AdaLoRA's pruned modules are saved at rank 0, which peft warns about
        warnings.simplefilter("ignore")
        tm.peft_model.save_pretrained(str(folder))
