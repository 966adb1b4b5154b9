"""Task models: a backbone (with PET modules attached) plus a task head.

- Encoder models (BERT, RoBERTa, MiniLM): by default (``pooling="auto"``) the model's own
  pooler when it has one (BERT's first-token dense + tanh, frozen unless every weight
  trains), then dropout and a linear classifier initialised as transformers initialises it:
  exactly ``AutoModelForSequenceClassification``, so a PET method trains here as it trains
  there. ``pooling="mean"`` (or a model without a pooler) averages the tokens instead.
- Decoder-only models (GPT-2, LLaMA): the last non-padding token, then a linear head.
- Encoder-decoder models (T5): text to text as in the S3PET paper: classification reads the
  decoder's first-step logits at each label word's first token (no trainable head);
  regression and multiple choice put a linear head on the decoder's first hidden state.

Multiple choice scores each (context, choice) pair with a 1-output head and takes the
softmax over choices. The head is always trainable and never counted in the budget.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from s3pet.errors import TaskError
from s3pet.models import is_encoder_decoder
from s3pet.space import default_stack


class TaskModel(nn.Module):
    """Backbone + head. ``forward(batch) -> logits`` of shape (B, labels), (B,) or (B, choices)."""

    def __init__(self, backbone: nn.Module, card, tokenizer=None, dropout: float = 0.1, pooling: str = "auto"):
        super().__init__()
        self.backbone = backbone
        self.card = card
        cfg = backbone.config
        self.seq2seq = is_encoder_decoder(cfg)
        self.causal = not self.seq2seq and default_stack(backbone) == "decoder"
        self.mc = card.type == "multiple_choice"
        self.regression = card.type == "regression"
        hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "d_model", None) or cfg.n_embd
        out = 1 if (self.mc or self.regression) else card.num_labels
        self.dropout = nn.Dropout(dropout)
        self.text_to_text = self.seq2seq and not (self.mc or self.regression)
        if self.text_to_text:
            if tokenizer is None or not card.label_words:
                raise TaskError(f"task {card.name}: text-to-text models need label_words in the task card")
            ids = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in card.label_words]
            firsts = [i[0] for i in ids if i]
            if len(firsts) != len(card.label_words) or len(set(firsts)) != len(firsts):
                raise TaskError(f"task {card.name}: label words {card.label_words} do not map to distinct tokens")
            self.register_buffer("label_token_ids", torch.tensor(firsts), persistent=False)
            self.head = nn.Identity()
        else:
            self.head = nn.Linear(hidden, out)
        has_pooler = getattr(backbone, "pooler", None) is not None
        if pooling not in ("auto", "pooler", "mean"):
            raise TaskError(f"pooling must be auto, pooler or mean, got {pooling!r}")
        if pooling == "pooler" and not has_pooler:
            raise TaskError(f"pooling 'pooler': {type(backbone).__name__} has no pooler; use --pooling mean")
        self.pooling = "pooler" if (pooling != "mean" and has_pooler and not (self.seq2seq or self.causal)) else "mean"
        if self.pooling == "pooler" and isinstance(self.head, nn.Linear):
            # transformers' initialisation of a classifier (normal, std = initializer_range, zero bias)
            nn.init.normal_(self.head.weight, std=getattr(cfg, "initializer_range", 0.02))
            nn.init.zeros_(self.head.bias)

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters())

    def _features(self, input_ids, attention_mask, **kw) -> Tensor:
        if self.seq2seq:
            start = self.backbone.config.decoder_start_token_id or 0
            dec = torch.full((input_ids.shape[0], 1), start, dtype=input_ids.dtype, device=input_ids.device)
            out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=dec,
                                output_hidden_states=not self.text_to_text)
            if self.text_to_text:
                return out.logits[:, 0, :]
            return out.decoder_hidden_states[-1][:, 0, :]
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **kw)
        if self.pooling == "pooler":
            return out.pooler_output
        h = out.last_hidden_state
        if self.causal:
            last = attention_mask.long().sum(1) - 1  # right padding
            return h[torch.arange(h.shape[0], device=h.device), last.clamp(min=0)]
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp(min=1.0)

    def forward(self, batch: dict) -> Tensor:
        kw = {}
        if "token_type_ids" in batch and not self.seq2seq and not self.causal:
            kw["token_type_ids"] = batch["token_type_ids"]
        feats = self._features(batch["input_ids"], batch["attention_mask"], **kw)
        if self.text_to_text:
            logits = feats[:, self.label_token_ids]
        else:
            logits = self.head(self.dropout(feats.to(self.head.weight.dtype)))
        if self.mc:
            return logits.view(-1, batch["n_choices"])
        if self.regression:
            return logits.squeeze(-1)
        return logits

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        if self.regression:
            return F.mse_loss(logits.float(), labels.float())
        return F.cross_entropy(logits.float(), labels.long())

    @staticmethod
    def predict(logits: Tensor, regression: bool) -> Tensor:
        return logits.float() if regression else logits.argmax(-1)
