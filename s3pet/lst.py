"""Ladder Side-Tuning (LST, Sung et al. 2022) as a baseline: a small side network beside a frozen encoder.

The backbone runs without gradient (``torch.no_grad``): nothing is stored for, or computed by,
a backward pass through it, which is where LST saves training memory. A side network of width
w = d / r (d the backbone's hidden size, r the reduction factor) reads the backbone's hidden
states through a ladder:

    h_0 = down_0(e)                                   e: the embedding output
    h_i = block_i(mu_i * down_i(x_i) + (1 - mu_i) * h_{i-1}),  i = 1..L,  x_i: layer i's output
    features = x_L + up(h_L)                          then the task head (pooler or mean, as TaskModel)

``down_i``: linear d -> w; ``mu_i = sigmoid(alpha_i / T)`` (T = 0.1, alpha_i = 0 at the start:
mu = 0.5), one learned gate per layer; ``block_i``: a pre-norm transformer layer of width w
(self-attention, FFN of width intermediate_size / r); ``up``: linear w -> d, zero-initialised,
so training starts from the frozen backbone's own features (every s3pet module starts as a
no-op). The side blocks start from random weights, not from the backbone's pruned weights as in
the paper (which shrinks T5 weights by magnitude): s3pet's other methods start fresh as well.

Sizing to a budget: ``side_params(d, f, L, w)`` is the exact count; ``width_for_budget`` takes
the largest w (at most d, r >= 1) whose side network fits, so r follows from the budget (r = 8
in the paper is about 1.2% of MiniLM's parameters, 0.7% of BERT-base's). The head is not counted,
as for every method. Encoder models only (BERT, RoBERTa, MiniLM); other families are refused.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from s3pet.errors import BudgetError, ConfigError
from s3pet.heads import TaskModel

GATE_TEMPERATURE = 0.1  # the paper's T: mu = sigmoid(alpha / T)
LR = 1e-3  # AdamW rate of the side network (the rate of s3pet's adapters; --lr overrides, --lr-scale scales)


def block_params(w: int, f: int) -> int:
    """Parameters of one side block: 2 LayerNorms, q/k/v/o (with biases), FFN w -> f -> w."""
    return 2 * 2 * w + 4 * (w * w + w) + (w * f + f) + (f * w + w)


def side_params(d: int, f: int, layers: int, w: int) -> int:
    """Exact parameters of a side network of width ``w`` on L = ``layers`` layers of width ``d``
    (FFN ``f``): L + 1 downsamplers, L gates, L blocks (FFN width f * w / d), one upsampler."""
    fw = ffn_width(d, f, w)
    return (layers + 1) * (d * w + w) + layers + layers * block_params(w, fw) + (w * d + d)


def ffn_width(d: int, f: int, w: int) -> int:
    """The side FFN width: the backbone's FFN width reduced by the same factor as the hidden width."""
    return max(1, f * w // d)


def width_for_budget(d: int, f: int, layers: int, budget: int) -> int:
    """The largest side width w <= d whose side network fits ``budget``; BudgetError below w = 1."""
    if side_params(d, f, layers, 1) > budget:
        raise BudgetError(f"budget {budget} is below the smallest LST side network (width 1: "
                          f"{side_params(d, f, layers, 1)} parameters on this model)")
    lo, hi = 1, d  # side_params grows with w: bisect for the last width that fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if side_params(d, f, layers, mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _heads(w: int) -> int:
    """Attention heads of a side block: the most of 8, 4, 2 that leaves heads of 8+ dimensions."""
    return next((h for h in (8, 4, 2) if w % h == 0 and w // h >= 8), 1)


class Gate(nn.Module):
    """One ladder gate: mu * a + (1 - mu) * b, mu = sigmoid(alpha / T)."""

    def __init__(self):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(()))

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        mu = torch.sigmoid(self.alpha / GATE_TEMPERATURE)
        return mu * a + (1 - mu) * b


class SideBlock(nn.Module):
    """A pre-norm transformer layer of width w."""

    def __init__(self, w: int, f: int):
        super().__init__()
        self.heads = _heads(w)
        self.ln1, self.ln2 = nn.LayerNorm(w), nn.LayerNorm(w)
        self.q, self.k, self.v, self.o = (nn.Linear(w, w) for _ in range(4))
        self.ffn_in, self.ffn_out = nn.Linear(w, f), nn.Linear(f, w)

    def forward(self, h: Tensor, mask: Tensor) -> Tensor:
        b, t, w = h.shape
        x = self.ln1(h)

        def split(z):
            return z.view(b, t, self.heads, w // self.heads).transpose(1, 2)

        keep = mask[:, None, None, :].to(torch.bool)  # (B, 1, 1, T): padded keys are ignored
        a = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)), attn_mask=keep)
        h = h + self.o(a.transpose(1, 2).reshape(b, t, w))
        return h + self.ffn_out(F.gelu(self.ffn_in(self.ln2(h))))


class SideNetwork(nn.Module):
    """The ladder: downsamplers, gates, side blocks and the zero-initialised upsampler."""

    def __init__(self, d: int, f: int, layers: int, w: int):
        super().__init__()
        self.width, self.layers = w, layers
        fw = ffn_width(d, f, w)
        self.down = nn.ModuleList(nn.Linear(d, w) for _ in range(layers + 1))
        self.gates = nn.ModuleList(Gate() for _ in range(layers))
        self.blocks = nn.ModuleList(SideBlock(w, fw) for _ in range(layers))
        self.up = nn.Linear(w, d)
        nn.init.zeros_(self.up.weight)  # the features start as the backbone's own
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden: tuple[Tensor, ...], mask: Tensor) -> Tensor:
        """``hidden``: the embedding output and each layer's output (L + 1 tensors); returns up(h_L)."""
        h = self.down[0](hidden[0])
        for i in range(self.layers):
            h = self.blocks[i](self.gates[i](self.down[i + 1](hidden[i + 1]), h), mask)
        return self.up(h)


def dims(backbone: nn.Module) -> tuple[int, int, int]:
    """(hidden size d, FFN width f, layers L) of an encoder; ConfigError for other families."""
    from s3pet.models import is_encoder_decoder
    from s3pet.space import default_stack

    c = backbone.config
    if is_encoder_decoder(c) or default_stack(backbone) != "encoder":
        raise ConfigError(f"lst supports encoder models (BERT, RoBERTa, MiniLM); "
                          f"{getattr(c, 'model_type', type(backbone).__name__)} is not one")
    try:
        return int(c.hidden_size), int(c.intermediate_size), int(c.num_hidden_layers)
    except AttributeError as e:
        raise ConfigError(f"lst: the {c.model_type} config has no {e.name}; lst needs a BERT-like encoder") from e


class LSTModel(TaskModel):
    """TaskModel whose features come from a frozen backbone (run without gradient) plus a side network."""

    def __init__(self, backbone: nn.Module, card, side: SideNetwork, tokenizer=None, pooling: str = "auto"):
        super().__init__(backbone, card, tokenizer, pooling=pooling)
        self.side = side
        for p in backbone.parameters():
            p.requires_grad_(False)

    def _features(self, input_ids, attention_mask, **kw) -> Tensor:
        with torch.no_grad():  # no graph through the backbone: LST's memory saving
            out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, **kw)
        hs = out.hidden_states
        y = hs[-1] + self.side(hs, attention_mask)
        if self.pooling == "pooler":
            return self.backbone.pooler(y)  # frozen; the gradient reaches y through it
        m = attention_mask.unsqueeze(-1).to(y.dtype)
        return (y * m).sum(1) / m.sum(1).clamp(min=1.0)


def build(backbone: nn.Module, card, budget: int, tokenizer=None, pooling: str = "auto") -> tuple[LSTModel, dict]:
    """The LST task model sized to ``budget``, and its shape (width, r, FFN width, heads, params)."""
    d, f, layers = dims(backbone)
    w = width_for_budget(d, f, layers, budget)
    side = SideNetwork(d, f, layers, w)
    n = sum(p.numel() for p in side.parameters())
    assert n == side_params(d, f, layers, w), "side_params must count every tensor of SideNetwork"
    info = {"width": w, "reduction": round(d / w, 3), "ffn_width": ffn_width(d, f, w), "heads": _heads(w),
            "layers": layers, "params": n, "gate_temperature": GATE_TEMPERATURE}
    return LSTModel(backbone, card, side, tokenizer, pooling=pooling), info


def learning_rate(cfg) -> float:
    """The side network's rate: ``--lr`` if given, else LR; times ``--lr-scale``."""
    return (cfg.lr or LR) * cfg.lr_scale


def describe(info: dict) -> str:
    return (f"lst: side width {info['width']} (r = {info['reduction']:g}), FFN {info['ffn_width']}, "
            f"{info['heads']} head(s), {info['layers']} blocks, {info['params']:,} params")

