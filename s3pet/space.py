"""Sites (places in a model) and search spaces (which module kinds go where).

A *site* is found from the module tree by type: linear layers (``nn.Linear`` and GPT-2's
``Conv1D``), normalisation layers (LayerNorm and RMSNorm-like modules), sublayer outputs
(the output of the attention / FFN sublayer, hosted by its output projection, where
sequential adapters sit) and attention cores (the attention module that owns the query
projection, where prefixes extend the keys and values). Each site records its stack (encoder/decoder), layer index and
role, from generic name rules that cover BERT, RoBERTa, T5, GPT-2, LLaMA-style models and
most others; anything unmatched keeps a generic role (``attn.other``, ``ffn.other``).

A *space* (JSON, see ``search_spaces/``) lists entries by kind and role pattern, never by
module path, so one file serves every architecture.
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from torch import nn

from s3pet.deltas import KINDS
from s3pet.errors import ConfigError, ModelError

# Canonical role order (plots, tables).
ROLES = ("attn.q", "attn.k", "attn.v", "attn.qkv", "attn.o", "attn.other",
         "xattn.q", "xattn.k", "xattn.v", "xattn.qkv", "xattn.o", "xattn.other",
         "ffn.gate", "ffn.in", "ffn.out", "ffn.other",
         "norm.attn", "norm.xattn", "norm.ffn", "norm.other",
         "attn.block", "xattn.block", "ffn.block", "attn.core", "xattn.core", "norm.emb", "norm.final")
HOSTS = ("linear", "norm", "block", "attention")

_CROSS = re.compile(r"encdecattention|crossattention|cross_attn|crossattn|encoder_attn|cross_attention", re.I)
_ATTN = re.compile(r"attn|attention", re.I)
_FFN = re.compile(r"mlp|ffn|feed_forward|feedforward|densereludense|intermediate|output|fc", re.I)
_EMB = re.compile(r"embed", re.I)

_LINEAR_LEAF = [
    ("qkv", re.compile(r"^(c_attn|qkv|qkv_proj|wqkv|query_key_value|in_proj|qkv_linear)$", re.I)),
    ("q", re.compile(r"^(q|query|q_proj|q_lin|wq|to_q)$", re.I)),
    ("k", re.compile(r"^(k|key|k_proj|k_lin|wk|to_k)$", re.I)),
    ("v", re.compile(r"^(v|value|v_proj|v_lin|wv|to_v)$", re.I)),
    ("o", re.compile(r"^(o|o_proj|out_proj|out_lin|wo|c_proj|dense|proj|to_out|dense_out)$", re.I)),
]
_FFN_LEAF = [
    ("gate", re.compile(r"^(gate_proj|wi_0|w1|gate)$", re.I)),
    ("in", re.compile(r"^(wi|wi_1|up_proj|fc1|c_fc|lin1|fc_in|dense_h_to_4h|w3|up|dense)$", re.I)),
    ("out", re.compile(r"^(wo|down_proj|fc2|c_proj|lin2|fc_out|dense_4h_to_h|w2|down)$", re.I)),
]
_NORM_LEAF = [
    ("attn", re.compile(r"^(ln_1|input_layernorm|attention_norm|self_attn_layer_norm|norm1|sa_layer_norm|ln_attn)$", re.I)),
    ("xattn", re.compile(r"^(ln_cross_attn|encoder_attn_layer_norm|cross_attn_layer_norm|norm_cross)$", re.I)),
    ("ffn", re.compile(r"^(ln_2|post_attention_layernorm|ffn_norm|final_layer_norm|norm2|output_layer_norm|ln_mlp)$", re.I)),
]


@dataclass(frozen=True)
class Site:
    """A place in the model where PET modules can attach."""

    path: str  # module path relative to the backbone root (for blocks: the hosting output projection)
    host: str  # "linear" | "norm" | "block" | "attention"
    role: str  # e.g. "attn.q", "ffn.out", "norm.attn", "attn.block", "attn.core"
    stack: str  # "encoder" | "decoder"
    layer: int  # block index in its stack; -1 before the blocks, n_layers after them
    d_in: int
    d_out: int  # attention sites: the width of the keys (kv heads x head dim), what a prefix extends
    # Block sites: the sublayer's first projection (q/qkv, FFN in/gate), whose input is the
    # sublayer's input, which parallel modules read; "" where there is none of width d_out.
    source: str = ""


def is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"


def linear_dims(m: nn.Module) -> tuple[int, int]:
    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features
    w = m.weight  # GPT-2 Conv1D stores (in, out)
    return int(w.shape[0]), int(w.shape[1])


def is_norm(m: nn.Module) -> bool:
    """LayerNorm, RMSNorm and look-alikes: a 'norm' class with a 1-D weight."""
    if isinstance(m, (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm))):
        return getattr(m, "weight", None) is not None
    name = type(m).__name__.lower()
    w = getattr(m, "weight", None)
    return ("norm" in name and "batch" not in name and "group" not in name
            and isinstance(w, nn.Parameter) and w.dim() == 1)


def _block_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """Outermost ModuleLists of identical blocks that contain linear layers."""
    found: list[tuple[str, nn.ModuleList]] = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if any(name.startswith(p + ".") for p, _ in found):
            continue
        if len({type(c) for c in mod}) != 1:
            continue
        if any(is_linear(m) for m in mod[0].modules()):
            found.append((name, mod))
    return found


def default_stack(model: nn.Module) -> str:
    """"decoder" for causal-only model types (GPT-2, LLaMA), else "encoder"."""
    try:
        from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                            MODEL_FOR_MASKED_LM_MAPPING_NAMES)
        mt = getattr(getattr(model, "config", None), "model_type", "")
        if mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and mt not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
            return "decoder"
    except ImportError:  # pragma: no cover - very old transformers
        pass
    return "encoder"


def _stack_of(path: str, default: str) -> str:
    low = path.lower()
    if "decoder" in low:
        return "decoder"
    if "encoder" in low:
        return "encoder"
    return default


def _linear_role(rel: str) -> str:
    parts = rel.split(".")
    leaf, parent = parts[-1], ".".join(parts[:-1])
    prefix = "xattn" if _CROSS.search(parent) else "attn"
    in_attn = bool(_ATTN.search(parent)) or prefix == "xattn"
    if in_attn:
        for role, pat in _LINEAR_LEAF:
            if pat.match(leaf):
                return f"{prefix}.{role}"
        return f"{prefix}.other"
    for role, pat in _LINEAR_LEAF[:4]:  # q/k/v/qkv names are unambiguous outside an 'attn' parent
        if pat.match(leaf):
            return f"attn.{role}"
    if _FFN.search(parent) or not parent:
        # BERT keeps the FFN projections under 'intermediate' and 'output'.
        if re.search(r"intermediate", parent, re.I):
            return "ffn.in"
        if re.search(r"(^|\.)output$", parent, re.I):
            return "ffn.out"
        for role, pat in _FFN_LEAF:
            if pat.match(leaf):
                return f"ffn.{role}"
    return "ffn.other"


def _norm_role(rel: str, block: nn.Module) -> str:
    parts = rel.split(".")
    leaf, parent = parts[-1], ".".join(parts[:-1])
    for role, pat in _NORM_LEAF:
        if pat.match(leaf):
            return f"norm.{role}"
    if _CROSS.search(parent):
        return "norm.xattn"
    if _ATTN.search(parent):
        return "norm.attn"
    # Norm next to its sublayer (T5: layer.0 = {SelfAttention, layer_norm}).
    sib = " ".join(n for n, _ in (block.get_submodule(parent).named_children() if parent else []))
    if _CROSS.search(sib):
        return "norm.xattn"
    if _ATTN.search(sib):
        return "norm.attn"
    if _FFN.search(sib) or _FFN.search(parent):
        return "norm.ffn"
    return "norm.other"


def discover_sites(model: nn.Module) -> list[Site]:
    """Every site of a model, in module order. Raises ModelError if it has no transformer blocks."""
    blocks = _block_lists(model)
    if not blocks:
        raise ModelError(f"no stack of transformer blocks found in {type(model).__name__} "
                         "(expected a ModuleList of identical blocks holding linear layers)")
    default = default_stack(model)
    sites: list[Site] = []
    in_block: set[str] = set()
    depth = {}
    for list_name, blist in blocks:
        stack = _stack_of(list_name, default)
        depth[stack] = max(depth.get(stack, 0), len(blist))
        for i, block in enumerate(blist):
            prefix = f"{list_name}.{i}" if list_name else str(i)
            in_block.add(prefix)
            outs, firsts, attn = {}, {}, {}
            for rel, mod in block.named_modules():
                if not rel:
                    continue
                path = f"{prefix}.{rel}"
                if is_linear(mod):
                    d_in, d_out = linear_dims(mod)
                    role = _linear_role(rel)
                    sites.append(Site(path, "linear", role, stack, i, d_in, d_out))
                    if role in ("attn.o", "xattn.o", "ffn.out"):
                        outs[role.split(".")[0]] = (path, d_out)
                    if role in ("attn.q", "attn.qkv", "xattn.q", "xattn.qkv", "ffn.in", "ffn.gate"):
                        firsts.setdefault(role.split(".")[0], (path, d_in))
                    _note_attention(attn, rel, role, d_in, d_out)
                elif is_norm(mod):
                    d = int(mod.weight.shape[0])
                    sites.append(Site(path, "norm", _norm_role(rel, block), stack, i, d, d))
            for sub in ("attn", "xattn", "ffn"):
                if sub in outs:
                    path, d = outs[sub]
                    src, d_src = firsts.get(sub, ("", 0))
                    sites.append(Site(path, "block", f"{sub}.block", stack, i, d, d, src if d_src == d else ""))
            sites.extend(_attention_sites(attn, block, prefix, stack, i))
    # Norms outside the blocks: embedding norm (before) and final norm (after).
    for name, mod in model.named_modules():
        if not is_norm(mod) or any(name.startswith(p + ".") for p in in_block):
            continue
        if any(name.startswith(ln + ".") for ln, _ in blocks):
            continue
        stack = _stack_of(name, default)
        d = int(mod.weight.shape[0])
        if _EMB.search(name):
            sites.append(Site(name, "norm", "norm.emb", stack, -1, d, d))
        else:
            sites.append(Site(name, "norm", "norm.final", stack, depth.get(stack, 0), d, d))
    return sites


def _note_attention(attn: dict, rel: str, role: str, d_in: int, d_out: int) -> None:
    """Record a q / k / fused qkv projection under its parent module (a candidate attention core)."""
    sub, _, leaf = role.partition(".")
    if sub in ("attn", "xattn") and leaf in ("q", "k", "qkv"):
        parent = rel.rpartition(".")[0]
        attn.setdefault(parent, {"sub": sub})[leaf] = (d_in, d_out)


def _attention_sites(attn: dict, block: nn.Module, prefix: str, stack: str, layer: int) -> list[Site]:
    """One ``attention`` site per attention module of a block: a module whose class name says
    attention and that owns the query projection (and the key one, or a fused qkv, whose
    output is split in three equal parts: keys are a third). d_in: the query's input width;
    d_out: the keys' width."""
    out = []
    for parent, proj in attn.items():
        if not parent or not _ATTN.search(type(block.get_submodule(parent)).__name__):
            continue
        if "q" in proj and "k" in proj:
            d_in, d_kv = proj["q"][0], proj["k"][1]
        elif "qkv" in proj and proj["qkv"][1] % 3 == 0:
            d_in, d_kv = proj["qkv"][0], proj["qkv"][1] // 3
        else:
            continue
        out.append(Site(f"{prefix}.{parent}", "attention", f"{proj['sub']}.core", stack, layer, d_in, d_kv))
    return out


def stack_depths(sites: list[Site]) -> dict[str, int]:
    """Number of blocks per stack."""
    out: dict[str, int] = {}
    for s in sites:
        if s.host != "norm" or s.role not in ("norm.emb", "norm.final"):
            out[s.stack] = max(out.get(s.stack, 0), s.layer + 1)
    return out


# ----------------------------------------------------------------------------- spaces

@dataclass
class SpaceEntry:
    """One line of a space file: a kind, the roles it goes to, and its hyper-parameters."""

    kind: str
    roles: list[str]
    stacks: list[str] | None = None
    layers: Any = None  # None, list of ints / "a-b" ranges, or {"from": 0.0, "to": 1.0} relative depth
    params: dict = field(default_factory=dict)  # kind hyper-parameters (rank, bottleneck, reduction, ...)

    def matches(self, site: Site, depths: dict[str, int]) -> bool:
        if not any(fnmatch.fnmatchcase(site.role, pat) for pat in self.roles):
            return False
        if self.stacks is not None and site.stack not in self.stacks:
            return False
        if self.layers is None:
            return True
        n = depths.get(site.stack, 1)
        if not 0 <= site.layer < n:  # layer filters select blocks only, never the emb/final norms
            return False
        if isinstance(self.layers, dict):
            rel = site.layer / max(n - 1, 1)
            return self.layers.get("from", 0.0) - 1e-9 <= rel <= self.layers.get("to", 1.0) + 1e-9
        return site.layer in _expand_layers(self.layers, n)


@dataclass
class Space:
    """A declarative search space."""

    name: str
    entries: list[SpaceEntry]
    description: str = ""
    source: str = ""

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description,
                "entries": [_entry_dict(e) for e in self.entries]}


def _entry_dict(e: SpaceEntry) -> dict:
    d: dict[str, Any] = {"kind": e.kind, "roles": e.roles, **e.params}
    if e.stacks is not None:
        d["stacks"] = e.stacks
    if e.layers is not None:
        d["layers"] = e.layers
    return d


def _expand_layers(spec: list, n: int) -> set[int]:
    out: set[int] = set()
    for item in spec:
        if isinstance(item, int):
            out.add(item if item >= 0 else n + item)
        else:
            a, b = str(item).split("-", 1)
            out.update(range(int(a), int(b) + 1))
    return out


SHIPPED_SPACES = ("s3pet-m", "s3pet-l", "unified")


def shipped_space_path(name: str):
    return resources.files("s3pet.search_spaces").joinpath(f"{name}.json")


def load_space(name_or_path: str | dict) -> Space:
    """Load a shipped space by name or a user space file; ConfigError names the bad field."""
    if isinstance(name_or_path, dict):
        raw, source = name_or_path, "<dict>"
    else:
        if name_or_path in SHIPPED_SPACES:
            text, source = shipped_space_path(name_or_path).read_text(), name_or_path
        else:
            p = Path(name_or_path)
            if not p.is_file():
                raise ConfigError(f"unknown space '{name_or_path}': use one of {', '.join(SHIPPED_SPACES)} "
                                  "or a path to a space JSON file")
            try:
                text, source = p.read_bytes().decode("utf-8"), str(p)
            except OSError as e:
                raise ConfigError(f"space file {p} cannot be read ({e.strerror})") from e
            except UnicodeDecodeError as e:
                raise ConfigError(f"space file {p} is not UTF-8 text (byte {e.start})") from e
        try:
            raw = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as e:
            raise ConfigError(f"space file {source} is not valid JSON: {e}") from e
    where = f"space {source}"
    if not isinstance(raw, dict) or not isinstance(raw.get("entries"), list) or not raw["entries"]:
        raise ConfigError(f"{where}: needs a non-empty list 'entries'")
    entries = []
    for i, e in enumerate(raw["entries"]):
        at = f"{where}: entries[{i}]"
        if not isinstance(e, dict):
            raise ConfigError(f"{at}: must be an object")
        e = dict(e)
        kind = e.pop("kind", None)
        if not isinstance(kind, str) or kind not in KINDS:
            raise ConfigError(f"{at}.kind: unknown kind {kind!r}; known: {', '.join(sorted(KINDS))}")
        roles = e.pop("roles", None)
        if isinstance(roles, str):
            roles = [roles]
        if not isinstance(roles, list) or not roles or not all(isinstance(r, str) for r in roles):
            raise ConfigError(f"{at}.roles: give a list of role patterns, e.g. [\"attn.*\", \"ffn.in\"]")
        for pat in roles:  # a typo ("atn.*") would silently select nothing
            if not any(fnmatch.fnmatchcase(r, pat) for r in ROLES):
                raise ConfigError(f"{at}.roles: {pat!r} matches no role; roles are {', '.join(ROLES)}")
        stacks = e.pop("stacks", None)
        if isinstance(stacks, str):
            stacks = [stacks]
        if stacks is not None and (not isinstance(stacks, list) or not all(isinstance(x, str) for x in stacks)
                                   or not set(stacks) <= {"encoder", "decoder"}):
            raise ConfigError(f"{at}.stacks: must be 'encoder' and/or 'decoder', got {stacks}")
        layers = e.pop("layers", None)
        _check_layers(layers, at)
        try:
            params = KINDS[kind].check_params(e)
        except ConfigError as err:
            raise ConfigError(f"{at}: {err}") from err
        entries.append(SpaceEntry(kind, list(roles), stacks, layers, params))
    for key in ("name", "description"):
        if not isinstance(raw.get(key, ""), str):
            raise ConfigError(f"{where}.{key}: must be a string, got {raw[key]!r}"[:200])
    return Space(str(raw.get("name", Path(str(source)).stem)), entries, str(raw.get("description", "")), source)


_MAX_LAYER = 10_000  # far deeper than any model; bounds the sets a layer range expands to


def _check_layers(layers: Any, at: str) -> None:
    if layers is None:
        return
    if isinstance(layers, dict):
        ok = set(layers) <= {"from", "to"} and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1 for v in layers.values())
        if ok and layers.get("from", 0.0) <= layers.get("to", 1.0):
            return
    elif isinstance(layers, list) and layers and all(
            (isinstance(x, int) and not isinstance(x, bool) and abs(x) <= _MAX_LAYER)
            or (isinstance(x, str) and re.fullmatch(r"\d{1,5}-\d{1,5}", x)
                and int(x.split("-")[0]) <= int(x.split("-")[1]) <= _MAX_LAYER)
            for x in layers):
        return
    raise ConfigError(f"{at}.layers: use a list of indices/ranges like [0, \"2-4\"] or a relative depth "
                      "like {\"from\": 0.5, \"to\": 1.0}")


# ----------------------------------------------------------------------------- instantiation

@dataclass
class ModuleSpec:
    """One PET module at one site: its kind, hyper-parameters and number of units."""

    site: Site
    kind: str
    params: dict
    units: int
    offset: int = 0  # index of its first unit in the global gate vector
    extra: dict = field(default_factory=dict)

    @property
    def unit_params(self) -> int:
        return KINDS[self.kind].unit_params(self.site, self.params)

    @property
    def n_params(self) -> int:
        return KINDS[self.kind].param_count(self.site, self.params, self.units)

    @property
    def shared(self) -> dict[str, tuple[int, ...]]:
        """The tensors this module shares with others of its kind: {name: shape}."""
        return KINDS[self.kind].shared(self.site, self.params)

    @property
    def key(self) -> str:
        return f"{self.site.path}:{self.kind}"


# Shared tensors (Compacter's slow weights, FacT's factors) are paid once per structure however
# many modules use them: these are the one place that counts them.

def shared_tensors(specs: list[ModuleSpec]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{name: (kind, shape)} of every tensor the modules of ``specs`` share, in first-use order."""
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for spec in specs:
        for name, shape in spec.shared.items():
            out.setdefault(name, (spec.kind, tuple(int(x) for x in shape)))
    return out


def shared_params(specs: list[ModuleSpec]) -> int:
    """Parameters of the shared tensors of ``specs``, each counted once."""
    return sum(math.prod(shape) for _, shape in shared_tensors(specs).values())


def total_params(specs: list[ModuleSpec]) -> int:
    """Exact trainable parameters of ``specs`` as built: every module plus each shared tensor once."""
    return sum(s.n_params for s in specs) + shared_params(specs)


def shared_needs(specs: list[ModuleSpec]) -> tuple[list[list[int]], list[int]]:
    """For ``budget.derive``: (per unit of ``specs``, in gate order, the indices of the shared
    tensors it needs; the parameters of each shared tensor)."""
    names = list(shared_tensors(specs))
    index = {n: i for i, n in enumerate(names)}
    shapes = shared_tensors(specs)
    needs = []
    for spec in specs:
        ids = [index[n] for n in spec.shared]
        needs += [ids] * spec.units
    return needs, [math.prod(shapes[n][1]) for n in names]



def instantiate(space: Space, sites: list[Site]) -> list[ModuleSpec]:
    """The full-size module of every (site, kind) the space puts on this model, in site order.

    A later entry overrides an earlier one for the same (site, kind) (e.g. a larger rank on
    some roles). Raises ModelError, listing the roles found, if the space matches nothing.
    """
    depths = stack_depths(sites)
    chosen: dict[tuple[str, str, str], ModuleSpec] = {}
    for entry in space.entries:
        kind = KINDS[entry.kind]
        for site in sites:
            if kind.fits(site) and entry.matches(site, depths):
                units = kind.max_units(site, entry.params)
                chosen[(site.path, site.role, entry.kind)] = ModuleSpec(site, entry.kind, dict(entry.params), units)
    if not chosen:
        found = sorted({f"{s.role}" for s in sites}, key=lambda r: ROLES.index(r) if r in ROLES else 99)
        raise ModelError(f"space '{space.name}' matches no site of this model; roles found: {', '.join(found)}")
    order = {(s.path, s.role): i for i, s in enumerate(sites)}
    specs = sorted(chosen.values(), key=lambda m: (order[(m.site.path, m.site.role)], KINDS[m.kind].stage, m.kind))
    return specs
