"""Prefix-Tuning (Li & Liang 2021): n trainable key/value vectors prepended to the keys and
values of one attention module, gated per module on their attention mass.

Where it acts. The attention modules of transformers 5.x (BERT, T5, GPT-2, LLaMA, ...) call
their implementation through ``ALL_ATTENTION_FUNCTIONS`` with the module itself as the first
argument and the keys after any rotary embedding. Attaching a prefix registers the module
here and switches its config's ``_attn_implementation`` to ``s3pet_prefix_<impl>``, a
function registered with transformers that wraps ``<impl>`` (``eager``: the modelling file's
own ``eager_attention_forward``; ``sdpa``): for a module with a prefix attached it
concatenates P_k, P_v (kv heads x n x head dim) in front of the keys and values and the
column block log(gate) in front of the attention mask; every other module goes straight to
``<impl>`` with its arguments untouched. The mask function of ``<impl>`` is registered under
the new name too, so the masks the model builds are unchanged. Detaching the last prefix
restores the config, so a detached backbone is the original model.

Gate. exp(log g) = g multiplies the prefix's unnormalised attention weights: g = 1 is plain
prefix tuning, g = 0 (log g = -inf) removes the prefix exactly (the unit is really off), a
gate in between scales the prefix's softmax mass. One unit per module: the whole prefix.

Prefix columns carry no padding, causal or relative-position term: every query sees every
prefix vector (T5's position bias is padded with zeros there), as in Li & Liang, where the
prefix comes before every token. Cross-attention modules (T5 ``EncDecAttention``, role
``xattn.core``) take a prefix too: their keys are the encoder's, and the prefix extends them.

Size. The counted parameters are the prefix itself, 2 * n * d_kv per module (d_kv: the
key width, kv heads x head dim, smaller than d under grouped-query attention). With
``mlp`` (Li & Liang's reparametrisation, on by default) training goes through
P = MLP(E), E (n x d) and MLP d -> hidden (default d) -> tanh -> 2 d_kv, whose extra parameters exist
only while training: ``bake`` replaces them by P at the end of a retrain, and only P is
saved, counted and exported. ``mlp: false`` trains P directly.

No merge (a prefix adds attention columns, no weight reproduces it) and no peft export
(see ``PrefixKind.peft_refusal``).
"""

from __future__ import annotations

import sys
import weakref
from functools import lru_cache

import torch
from torch import Tensor, nn

from s3pet.deltas.base import MAX_UNITS, Delta, DeltaKind, register
from s3pet.errors import ConfigError

NAME = "s3pet_prefix_"  # + the wrapped implementation
WRAPPABLE = ("eager", "sdpa")  # implementations that take an arbitrary additive mask

# Attention module -> (its Delta, a callable returning its gate or None). Weak: a dropped
# backbone takes its entries with it.
_ATTACHED: "weakref.WeakKeyDictionary[nn.Module, tuple[Delta, object]]" = weakref.WeakKeyDictionary()
# id(config) -> [config, original implementation, number of prefixes attached under it].
_CONFIGS: dict[int, list] = {}


class Prefix(Delta):
    kind = "prefix"

    def __init__(self, d: int, d_kv: int, n: int, hidden: int | None):
        super().__init__()
        self.n, self.d_kv = n, d_kv
        if hidden:  # Li & Liang's reparametrisation, P = MLP(E)
            self.embedding = nn.Parameter(torch.randn(n, d))  # nn.Embedding's N(0, 1), as peft's prefix encoder
            self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, 2 * d_kv))
        else:
            self.prefix = nn.Parameter(torch.randn(2, n, d_kv))

    @property
    def baked(self) -> bool:
        return "prefix" in self._parameters

    def kv(self) -> Tensor:
        """The prefix keys and values, (2, n, d_kv)."""
        if self.baked:
            return self.prefix
        return self.mlp(self.embedding).view(self.n, 2, self.d_kv).transpose(0, 1)

    def kept_params(self) -> int:
        return 2 * self.n * self.d_kv

    def bake(self) -> None:
        """Replace E and the MLP by P = MLP(E) (after training: only P is kept)."""
        if self.baked:
            return
        with torch.no_grad():
            p = self.kv().detach().clone()
        del self.mlp
        del self.embedding
        self.prefix = nn.Parameter(p)

    def forward(self, x: Tensor, gate: Tensor | None = None) -> Tensor:
        """The prefix for keys ``x`` (batch, kv heads, length, head dim): (batch, 2, kv heads, n, head dim).

        The gate does not scale P (it acts on the attention mass, in the mask); it is an
        argument so that every PET module is called with its gate."""
        b, h, _, hd = x.shape
        p = self.kv().to(x.dtype).view(2, self.n, h, hd).transpose(1, 2)
        return p.unsqueeze(0).expand(b, -1, -1, -1, -1)


@register
class PrefixKind(DeltaKind):
    name = "prefix"
    hosts = ("attention",)
    stage = 1
    defaults = {"n_prefix": 10, "mlp": True, "hidden": None}  # hidden None: the model width d
    size_field = "n_prefix"  # what a hand-designed baseline grows to fill a budget
    # peft's prefix-tuning examples and P-tuning v2 train prefixes (with the MLP) at 5e-3 to 1e-2.
    lr = 5e-3
    merge_refusal = "prefix keys and values add attention columns, which no weight of the model can fold in"
    peft_refusal = ("peft's PREFIX_TUNING puts one prefix of one length on every layer, as a key/value cache that "
                    "also shifts the positions of the input tokens; s3pet's prefixes are per module and position-free")
    code, colour, order = "P", "#661100", 12
    # Compiled, the attention wrapper's gate reads give alpha no gradient (tests/test_accel.py):
    # searches with prefixes run eagerly; a retrain (no gates) still compiles.
    compiles_gated = False

    def check_params(self, params):
        out = super().check_params(params)
        if not isinstance(out["mlp"], bool):
            raise ConfigError(f"field 'mlp' of kind 'prefix' must be true or false, got {out['mlp']!r}")
        h = out["hidden"]
        if h is not None and (isinstance(h, bool) or not isinstance(h, int) or not 1 <= h <= MAX_UNITS):
            raise ConfigError(f"field 'hidden' of kind 'prefix' must be null (the model width) or an integer "
                              f"in [1, {MAX_UNITS}], got {h!r}")
        return out

    def unit_params(self, site, params):
        return 2 * int(params["n_prefix"]) * site.d_out

    def build(self, site, params, units):
        hidden = (params["hidden"] or site.d_in) if params["mlp"] else None
        return Prefix(site.d_in, site.d_out, int(params["n_prefix"]), hidden)

    def attach(self, host, delta, gate):
        return attach_prefix(host, delta, gate)


# ----------------------------------------------------------------------------- attaching

class _Handle:
    def __init__(self, host: nn.Module):
        self.host = host

    def remove(self) -> None:
        if self.host is None:
            return
        _ATTACHED.pop(self.host, None)
        _release(self.host.config)
        self.host = None


def attach_prefix(host: nn.Module, delta: Prefix, gate) -> _Handle:
    """Route ``host``'s attention through the prefix wrapper; the handle's ``remove`` undoes it.

    Raises ConfigError when ``host`` has no config or runs an attention implementation that
    cannot take the prefix's mask columns (flash attention, flex attention)."""
    config = getattr(host, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if config is None or impl is None:
        raise ConfigError(f"prefix needs a transformers attention module with a config; {type(host).__name__} has none")
    if impl.startswith(NAME):
        impl = _CONFIGS[id(config)][1]
    if impl not in WRAPPABLE:
        raise ConfigError(f"prefix needs attention implementation 'eager' or 'sdpa', the model runs {impl!r}: "
                          "load it with attn_implementation='sdpa'")
    _register(impl)
    entry = _CONFIGS.setdefault(id(config), [config, impl, 0])
    entry[2] += 1
    config._attn_implementation = NAME + impl
    _ATTACHED[host] = (delta, gate)
    return _Handle(host)


def _release(config) -> None:
    entry = _CONFIGS.get(id(config))
    if entry is None:
        return
    entry[2] -= 1
    if entry[2] <= 0:
        config._attn_implementation = entry[1]
        del _CONFIGS[id(config)]


@lru_cache(maxsize=None)
def _register(impl: str) -> None:
    """Register ``s3pet_prefix_<impl>`` with transformers (attention and mask functions), once."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(NAME + impl, _wrapper(impl))
    AttentionMaskInterface.register(NAME + impl, ALL_MASK_ATTENTION_FUNCTIONS[impl])


@lru_cache(maxsize=None)
def _eager_of(cls: type):
    """The ``eager_attention_forward`` of the modelling file that defines ``cls``."""
    fn = getattr(sys.modules[cls.__module__], "eager_attention_forward", None)
    if fn is None:
        raise ConfigError(f"prefix with eager attention needs {cls.__module__}.eager_attention_forward; "
                          "load the model with attn_implementation='sdpa'")
    return fn


def _inner(impl: str, module: nn.Module):
    if impl == "eager":
        return _eager_of(type(module))
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[impl]


def _wrapper(impl: str):
    def attention(module, query, key, value, attention_mask, **kwargs):
        inner = _inner(impl, module)
        hit = _ATTACHED.get(module)
        if hit is None:
            return inner(module, query, key, value, attention_mask, **kwargs)
        delta, gate_fn = hit
        gate = gate_fn()
        p = delta(key, gate=gate)
        n = p.shape[-2]
        mask = extend_mask(attention_mask, query, key.shape[2], n, gate, causal=_causal(impl, module, query,
                                                                                        attention_mask, kwargs))
        if kwargs.get("position_bias") is not None:  # T5: no relative position term on the prefix columns
            pb = kwargs["position_bias"]
            kwargs["position_bias"] = torch.cat([pb.new_zeros(*pb.shape[:-1], n), pb], dim=-1)
        key = torch.cat([p[:, 0], key], dim=2)
        value = torch.cat([p[:, 1], value], dim=2)
        return inner(module, query, key, value, mask, **kwargs)

    attention.__name__ = attention.__qualname__ = f"prefix_{impl}_attention"
    return attention


def _causal(impl: str, module, query: Tensor, mask, kwargs: dict) -> bool:
    """Whether ``impl`` would apply a causal mask of its own (sdpa does when it is given no mask)."""
    if impl != "sdpa" or mask is not None or query.shape[2] <= 1:
        return False
    flag = kwargs.get("is_causal")
    return bool(flag if flag is not None else getattr(module, "is_causal", True))


def safe_log(gate: Tensor) -> Tensor:
    """log(gate), -inf where the gate is 0, with a zero (not NaN) gradient there."""
    pos = gate > 0
    return torch.where(pos, torch.log(torch.where(pos, gate, torch.ones_like(gate))), float("-inf"))


def extend_mask(mask: Tensor | None, query: Tensor, k_len: int, n: int, gate: Tensor | None,
                causal: bool = False) -> Tensor:
    """An additive float mask over [prefix, keys]: log(gate) on the n prefix columns, then the
    model's mask (None, boolean with True = attend, or additive), made explicit (``causal``:
    the top-left causal pattern sdpa applies when it gets no mask)."""
    q_len = query.shape[2]
    dtype = mask.dtype if mask is not None and mask.dtype.is_floating_point else query.dtype
    low = torch.finfo(dtype).min
    if mask is None:
        base = query.new_zeros(1, 1, q_len, k_len, dtype=dtype)
        if causal:
            keep = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril()
            base = base.masked_fill(~keep, low)
    elif mask.dtype == torch.bool:
        base = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, low)
    else:
        base = mask
    lead = base.shape[:-1]
    if gate is None:
        cols = base.new_zeros(*lead, n)
    else:
        cols = safe_log(gate.reshape(-1)[:1]).to(dtype).expand(*lead, n)
    return torch.cat([cols, base], dim=-1)
