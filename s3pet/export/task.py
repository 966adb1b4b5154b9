"""Task export: a trained ``TaskModel`` (backbone + structure + head) as a peft adapter that
loads with the two standard lines of its transformers auto class::

    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=N)
    model = PeftModel.from_pretrained(model, folder)

and predicts what s3pet's own model predicts (checked on a probe batch before writing).

How s3pet's heads map onto transformers' (``s3pet.heads``):

- BERT-like encoders with the pooler (``pooling="auto"``): the pooler is the backbone's own and
  ``TaskModel.head`` is the ``classifier`` (``modules_to_save``). RoBERTa's
  ``RobertaClassificationHead`` is pooler-shaped (first token, dense, tanh, out_proj): the
  backbone's trained-or-frozen pooler dense goes to ``classifier.dense``, the head to
  ``classifier.out_proj``.
- Decoders (GPT-2, LLaMA): ``score``, on the last token. transformers takes the rightmost
  token that is not ``pad_token_id``, s3pet the last one the attention mask covers: the same
  for right-padded batches whose text does not end in the pad token. ``score`` has no bias,
  s3pet's head has one: on GPT-2 it is folded into the final LayerNorm's bias
  (``ln_f`` saved whole: ``W (beta + d) = W beta + b`` for ``d = pinv(W) b``, exact when W has
  full row rank, i.e. fewer labels than hidden units); LLaMA's final RMSNorm has no bias, so a
  non-zero head bias is refused there.
- T5 text-to-text classification: no head; the adapter is a ``SEQ_2_SEQ_LM`` one on
  ``AutoModelForSeq2SeqLM``, whose first decoder step's logits at the label words' first
  tokens are s3pet's logits (the model card lists the words and token ids).

Refused with one line naming the alternative: mean pooling (no transformers class pools so),
multiple choice, and T5 regression (a linear head on the decoder state; no transformers class).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from torch import Tensor, nn

from s3pet import structure as S
from s3pet.errors import StructureError
from s3pet.export.adapter import base_name, fill_peft, peft_config, prepare, save_adapter, wrap
from s3pet.export.folders import check_target, model_card
from s3pet.export.weights import check_same
from s3pet.space import discover_sites

log = logging.getLogger("s3pet.export")

KEEP = "s3pet's own format (structure.json + delta.safetensors, loaded by s3pet)"


def hf_task_model(tm) -> tuple[nn.Module, str, list[str], str]:
    """The transformers task model around ``tm.backbone`` (shared, not copied), with its head
    modules still empty: (model, backbone prefix such as ``"bert."``, head module names,
    peft task type). Raises StructureError (one line) for heads transformers has no class for."""
    import transformers as tf

    bb = tm.backbone
    if tm.seq2seq:
        if not tm.text_to_text:
            raise StructureError(f"task {tm.card.name}: T5's {tm.card.type} head (a linear head on the first decoder "
                                 f"state) has no transformers class; keep {KEEP}")
        return bb, "", [], "SEQ_2_SEQ_LM"
    if tm.mc:
        raise StructureError(f"task {tm.card.name}: multiple-choice heads are not exported to peft; keep {KEEP}")
    if tm.pooling == "mean" and not tm.causal:
        raise StructureError("the head reads mean-pooled tokens, which AutoModelForSequenceClassification does not "
                             f"do: retrain with --pooling auto (the model's own pooler), or keep {KEEP}")
    cfg = copy.deepcopy(bb.config)
    cfg.num_labels = 1 if tm.regression else tm.card.num_labels
    cfg.problem_type = "regression" if tm.regression else "single_label_classification"
    if tm.causal and cfg.pad_token_id is None:
        raise StructureError(f"{type(bb).__name__}'s config has no pad_token_id, which the sequence classifier needs "
                             "to find the last token; set it (e.g. to the tokenizer's pad token) and export again")
    with torch.device("meta"):  # only the head is new; the backbone is swapped in below
        hf = tf.AutoModelForSequenceClassification.from_config(cfg)
    prefix = hf.base_model_prefix
    setattr(hf, prefix, bb)
    ref = next(bb.parameters())
    heads = [n for n, m in hf.named_children() if n != prefix and any(True for _ in m.parameters())]
    for n in heads:
        getattr(hf, n).to_empty(device=ref.device).to(ref.dtype)
    return hf, prefix + ".", heads, "SEQ_CLS"


def _final_norm(bb: nn.Module) -> str | None:
    """The final norm's path, if it has a bias that can carry the head's (GPT-2's ln_f)."""
    path = next((s.path for s in discover_sites(bb) if s.role == "norm.final"), None)
    return path if path is not None and getattr(bb.get_submodule(path), "bias", None) is not None else None


@torch.no_grad()
def _fill_head(pm: nn.Module, tm, prefix: str, heads: list[str], norm: str | None) -> None:
    """Copy s3pet's head (and RoBERTa's pooler dense) into the ``modules_to_save`` copies."""
    root = pm.base_model.model
    for n in heads:
        w, b = tm.head.weight, tm.head.bias
        mod = getattr(root, n)
        copy_ = mod.modules_to_save["default"] if hasattr(mod, "modules_to_save") else mod
        if isinstance(copy_, nn.Linear):
            out = copy_
        else:  # RobertaClassificationHead: dense + tanh + out_proj, the pooler's shape
            copy_.dense.load_state_dict(tm.backbone.pooler.dense.state_dict())
            out = copy_.out_proj
        out.weight.copy_(w)
        if out.bias is not None:
            out.bias.copy_(b)
        elif b is not None and b.abs().max() > 0:
            if norm is None:
                raise StructureError("the head has a bias, transformers' score layer has none, and the final norm has "
                                     f"no bias to carry it ({type(tm.backbone).__name__}); keep {KEEP}")
            d = torch.linalg.pinv(w.double()) @ b.double()
            if (w.double() @ d - b.double()).abs().max() > 1e-6 * (1 + b.abs().max()):
                raise StructureError(f"the head's bias cannot be folded into {norm} (more labels than hidden units?); "
                                     f"keep {KEEP}")
            fn = root.get_submodule(prefix + norm).modules_to_save["default"]
            fn.bias.add_(d.to(fn.bias.dtype))


def _probe(tm) -> dict[str, Tensor]:
    """A right-padded batch whose tokens avoid the pad id (so both last-token rules agree)."""
    cfg = tm.backbone.config
    pad = getattr(cfg, "pad_token_id", None) or 0
    ids = torch.randint(1, int(getattr(cfg, "vocab_size", 0) or 128), (3, 9), generator=torch.Generator().manual_seed(0))
    ids[ids == pad] = pad + 1
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    mask[2, -1:] = 0
    ids[mask == 0] = pad
    dev = next(tm.backbone.parameters()).device
    return {"input_ids": ids.to(dev), "attention_mask": mask.to(dev)}


@torch.no_grad()
def hf_logits(pm: nn.Module, tm, batch: dict[str, Tensor]) -> Tensor:
    """What a transformers + peft user computes as the logits of ``batch``, shaped as s3pet's."""
    pm.eval()
    if tm.seq2seq:
        start = tm.backbone.config.decoder_start_token_id or 0
        dec = torch.full_like(batch["input_ids"][:, :1], start)
        return pm(**batch, decoder_input_ids=dec).logits[:, 0, tm.label_token_ids].float()
    logits = pm(**batch).logits.float()
    return logits.squeeze(-1) if tm.regression else logits


@torch.no_grad()
def _s3pet_logits(tm, ds, batch: dict[str, Tensor]) -> Tensor:
    was = tm.training
    tm.eval()
    ds.attach(tm.backbone)
    try:
        return tm(batch).float()
    finally:
        ds.detach()
        tm.train(was)


def export_task(tm, structure: S.Structure, out_dir: str | Path, weights: dict[str, Tensor] | None, *,
                untrained: bool = False, inplace: bool = False, verify: bool = True,
                metrics: dict | None = None) -> Path:
    """Write ``structure`` + ``weights`` + ``tm``'s head as a peft adapter for the task's
    transformers auto class (see the module docstring), with a model card.

    Args: ``tm`` a ``TaskModel`` whose head holds the trained head (its backbone bare: no
    DeltaSet attached); ``weights`` keyed as ``DeltaSet.state_dict()`` (None only with
    ``untrained``); ``inplace`` lets peft take over ``tm``'s backbone (it is changed);
    ``metrics`` (e.g. the retrain's test scores) go into the card.
    Returns the folder. Raises StructureError (one line) for what cannot be expressed.
    """
    check_target(out_dir)
    plan, specs, ds = prepare(structure, tm.backbone, weights, untrained)
    batch = _probe(tm)
    ref = _s3pet_logits(tm, ds, batch) if verify else None
    if not inplace:
        tm = copy.deepcopy(tm)
    model, prefix, heads, task_type = hf_task_model(tm)
    norm = _final_norm(tm.backbone) if tm.causal else None
    fold_norm = norm is not None and getattr(tm.head, "bias", None) is not None and tm.head.bias is not None and tm.head.bias.abs().max() > 0
    saved = heads + ([prefix + norm] if fold_norm and norm not in plan.save else [])
    name = base_name(structure, tm.backbone)
    pm = wrap(model, peft_config(plan, specs, model, prefix, task_type, tuple(saved)), name)
    fill_peft(pm, plan, specs, ds, prefix)
    _fill_head(pm, tm, prefix, heads, norm)
    dtype = next(tm.backbone.parameters()).dtype
    diff = check_same(ref, hf_logits(pm, tm, batch), "the peft adapter", dtype) if verify else None
    meta = {"format": "peft", "peft_method": plan.method, "task_type": task_type, "task": tm.card.name,
            "num_labels": model.config.num_labels if heads else None, "modules_to_save": sorted(set(saved) | {
                prefix + p for p in plan.save}), "lora_bias": plan.lora_bias, "max_abs_diff": diff}
    card = _card(tm, structure, name, meta, untrained, metrics)
    return save_adapter(pm, out_dir, structure, weights is None, None, meta, card)


def _card(tm, structure: S.Structure, base: str, meta: dict, untrained: bool, metrics: dict | None) -> str:
    card = tm.card
    notes = []
    if tm.seq2seq:
        load = ("from transformers import AutoModelForSeq2SeqLM\nfrom peft import PeftModel\n\n"
                f'model = AutoModelForSeq2SeqLM.from_pretrained("{base}")\n'
                'model = PeftModel.from_pretrained(model, "path/to/this/folder")')
        ids = [int(i) for i in tm.label_token_ids]
        notes.append("Text to text: the logits of the first decoder step (decoder input: the start token) at the "
                     f"label words' first tokens {ids} are the class scores, in the order {list(card.label_words)}.")
    else:
        extra = ", pad_token_id=tokenizer.pad_token_id" if tm.causal else ""
        load = ("from transformers import AutoModelForSequenceClassification, AutoTokenizer\nfrom peft import PeftModel\n\n"
                f'tokenizer = AutoTokenizer.from_pretrained("{base}")\n'
                f'model = AutoModelForSequenceClassification.from_pretrained("{base}", '
                f"num_labels={meta['num_labels']}{extra})\n"
                'model = PeftModel.from_pretrained(model, "path/to/this/folder")')
        if tm.causal:
            notes.append("The sequence classifier reads the rightmost token that is not the pad token: pad on the "
                         "right, as s3pet trained it.")
    if card.labels and not tm.regression:
        notes.append("Labels by index: " + ", ".join(f"{i} = {lab}" for i, lab in enumerate(card.labels)) + ".")
    if tm.regression:
        notes.append("Regression: the single output is the prediction.")
    if meta["lora_bias"]:
        notes.append("BitFit is carried by the bias of LoRA's B matrix (lora_bias), so disable_adapter() undoes it; "
                     "sites with BitFit alone hold a rank-1 LoRA with zero factors.")
    if metrics:
        notes.append("Scores of s3pet's evaluation: " + ", ".join(f"{k} {v}" for k, v in metrics.items()) + ".")
    return model_card(structure, base, meta, untrained, title=f"{card.name}: s3pet adapter for {base}", load=load,
                      notes=tuple(notes), pipeline_tag="text2text-generation" if tm.seq2seq else "text-classification")
