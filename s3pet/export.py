"""Export a structure with its weights: as an HF peft adapter, or merged into a plain model.

Both exports build their folder beside the target and rename it into place, check before
writing that the exported model reproduces s3pet's own model (backbone + DeltaSet) on a probe
batch, and write ``s3pet_export.json`` (format, structure, whether the weights were trained).
The task head is not part of the backbone: it is saved beside the model as ``head.safetensors``
(the state dict of ``TaskModel.head``, e.g. ``weight`` and ``bias`` of a linear read-out),
applied to the pooled features as in ``s3pet.heads.TaskModel``.

peft (``export_peft``): a folder with ``adapter_config.json`` and ``adapter_model.safetensors``
that ``PeftModel.from_pretrained(base, folder)`` loads, ``base`` being the backbone as
``load_backbone`` builds it (``AutoModel``; ``AutoModelForSeq2SeqLM`` for T5). What maps:

- ``lora`` on ``nn.Linear`` or GPT-2 ``Conv1D`` -> ``LoraConfig``: ``target_modules`` are the
  exact module paths (a fullmatch regex instead if a path is also a dotted suffix of another
  module), per-module ``rank_pattern`` / ``alpha_pattern`` so that peft's lora_alpha / r is
  s3pet's alpha / rank; ``lora_A`` (r, d_in) and ``lora_B`` (d_out, r) keep their layout.
- ``bitfit`` on a linear that has a bias -> folded into that bias, saved with ``bias="all"``.
  peft then saves every bias of the model and loads them over the base model's, in place:
  disabling the adapter does not undo them (peft's documented behaviour for bias training).
- ``bitfit`` on a bias-free linear (LLaMA, T5) that also carries ``lora`` -> LoRA's bias on B
  (``lora_bias=True``, b_B = delta / scaling; peft >= 0.14). peft warns on load that such a
  LoRA cannot be merged into its base layer.
- ``lnfit``, and ``bitfit`` on a norm with a bias -> a trained copy of the norm with the deltas
  folded into its weight and bias: ``modules_to_save`` (peft matches these names by plain
  suffix, so LLaMA's final ``norm`` also wraps every ``*norm`` module with an unchanged copy),
  or ``LNTuningConfig`` when the structure has only norm modules.
- ``ia3`` -> ``IA3Config`` with ``feedforward_modules=[]`` (peft then scales the output, as
  s3pet does), ``ia3_l = 1 + scale``; only when nothing else in the structure needs LoRA
  (norm modules still go to ``modules_to_save``), since a peft adapter is one method.

Not expressible in peft (StructureError naming kinds and sites, suggesting ``--merge`` when
merging works): ``adapter`` and ``lowrank_adapter`` (sequential bottlenecks: no peft
counterpart, no merge either); ``ia3`` together with ``lora`` or linear ``bitfit``;
``bitfit`` on a bias-free linear without ``lora`` at the same site; ``bitfit`` on a norm
without a bias (RMSNorm).

merged (``merge`` / ``export_merged``): the deltas folded into the weights of a plain
transformers model saved with ``save_pretrained`` (``AutoModel.from_pretrained`` loads it).
``lora``: W += (alpha/r) B A (transposed for ``Conv1D``); ``ia3``: rows of W and the bias
scaled by 1 + scale (before LoRA and BitFit add theirs, as in s3pet); ``bitfit``: into the
bias, creating one on an ``nn.Linear`` / ``nn.LayerNorm`` without one; ``lnfit``: into the
norm weight. A created bias survives ``from_pretrained`` only if the config builds it: config
switches such as LLaMA's ``attention_bias`` / ``mlp_bias`` are turned on (the other layers
they cover get zero biases); where no switch exists (T5), ``export_merged`` raises
StructureError instead of writing a model that would silently lose them. Adapters cannot be
merged (StructureError).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

import s3pet
from s3pet import structure as S
from s3pet.errors import ConfigError, ModelError, StructureError
from s3pet.inject import DeltaSet
from s3pet.io import read_json, write_json
from s3pet.models import TINY_ALIASES, is_encoder_decoder, load_backbone, load_tokenizer, model_name, resolve
from s3pet.space import ModuleSpec, is_linear

log = logging.getLogger(__name__)

ADAPTER = "default"  # peft's adapter name
MARKER = "s3pet_export.json"  # written into every export; an existing folder is replaced only if it has one
SEQUENTIAL = ("adapter", "lowrank_adapter")
FORMATS = ("peft", "merged")


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
    return specs, _load_deltas(specs, backbone, weights)


def _load_deltas(specs: list[ModuleSpec], backbone: nn.Module, weights: dict[str, Tensor] | None) -> DeltaSet:
    ds = DeltaSet(specs, gated=False)
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
            parts.append(f"missing {_some(missing)}")
        if unexpected:
            parts.append(f"unexpected {_some(unexpected)}")
        if shapes:
            parts.append(f"wrong shape {_some(shapes)}")
        hint = ""
        if any(k.startswith(("deltas.deltas.", "head.")) for k in unexpected):
            hint = ("; these look like the keys of a delta.safetensors file: drop its 'head.' entries and strip "
                    "the leading 'deltas.' (export_run does both)")
        raise StructureError(f"weights do not fit the structure ({len(expected)} tensors expected): "
                             f"{'; '.join(parts)}{hint}")
    with torch.no_grad():
        ds.load_state_dict({k: v.detach() for k, v in weights.items()})
    return ds


def _some(items: list[str], n: int = 4) -> str:
    shown = ", ".join(items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


def _by_site(specs: list[ModuleSpec], ds: DeltaSet) -> dict[str, dict[str, tuple[ModuleSpec, nn.Module]]]:
    """{site path: {kind: (spec, module)}}."""
    out: dict[str, dict] = {}
    for spec in specs:
        out.setdefault(spec.site.path, {})[spec.kind] = (spec, ds.delta(spec))
    return out


# ----------------------------------------------------------------------------- probing

def _probe_batch(model: nn.Module) -> dict[str, Tensor]:
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
def _outputs(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    was = model.training
    model.eval()
    try:
        out = model(**batch)
    finally:
        model.train(was)
    return (out[0] if not isinstance(out, Tensor) else out).float()


def _s3pet_outputs(backbone: nn.Module, ds: DeltaSet) -> Tensor:
    ds.attach(backbone)
    try:
        return _outputs(backbone, _probe_batch(backbone))
    finally:
        ds.detach()


def _check_same(ref: Tensor, got: Tensor, what: str) -> float:
    """Max abs difference; StructureError if above a tolerance scaled to the outputs' size."""
    diff = (ref - got).abs().max().item()
    tol = 1e-4 * (1.0 + ref.abs().max().item())
    if not diff <= tol:  # also catches NaN
        raise StructureError(f"{what} does not reproduce s3pet's model: outputs differ by {diff:.3g} "
                             f"(tolerance {tol:.3g}); nothing was written")
    return diff


# ----------------------------------------------------------------------------- peft

@dataclass
class PeftPlan:
    """How a structure maps onto one peft adapter: the method and what goes where."""

    method: str  # "lora" | "ia3" | "ln_tuning"
    targets: list[str] = field(default_factory=list)  # module paths the method wraps
    save: list[str] = field(default_factory=list)  # norms saved whole with their deltas folded in
    lora_bias: bool = False  # BitFit on a bias-free linear rides on LoRA's B bias
    base_bias: bool = False  # BitFit folded into existing linear biases (bias="all")
    problems: list[str] = field(default_factory=list)


def plan_peft(structure: S.Structure, backbone: nn.Module) -> PeftPlan:
    """Work out how ``structure`` maps onto a peft adapter; ``problems`` lists what cannot."""
    specs = S.to_specs(structure, backbone)
    if not specs:
        raise StructureError("the structure has no modules: nothing to export")
    sites: dict[str, dict[str, ModuleSpec]] = {}
    for spec in specs:
        sites.setdefault(spec.site.path, {})[spec.kind] = spec
    kinds = {s.kind for s in specs}
    lin_other = any(s.kind in ("lora", "bitfit") and s.site.host == "linear" for s in specs)
    if "ia3" in kinds:
        method = "ia3"
    elif lin_other:
        method = "lora"
    else:
        method = "ln_tuning"
    plan = PeftPlan(method)
    has_lora_bias = "lora_bias" in _lora_config_fields()
    bad: dict[str, list[str]] = {}
    for path, by_kind in sites.items():
        host = backbone.get_submodule(path)
        for kind, spec in by_kind.items():
            where = f"{path} ({spec.site.role})"
            if kind in SEQUENTIAL:
                bad.setdefault(f"{kind} (sequential bottleneck, no peft counterpart)", []).append(where)
            elif kind == "ia3" and lin_other:
                bad.setdefault("ia3 together with lora/bitfit on linears (a peft adapter is one method)",
                               []).append(where)
            elif kind == "bitfit" and spec.site.host == "linear":
                if getattr(host, "bias", None) is not None:
                    plan.base_bias = True
                elif "lora" in by_kind and has_lora_bias:
                    plan.lora_bias = True
                else:
                    why = "no bias and no lora at the site" + ("" if has_lora_bias else " (or peft < 0.14)")
                    bad.setdefault(f"bitfit on a linear with {why}", []).append(where)
            elif kind == "bitfit" and spec.site.host == "norm" and getattr(host, "bias", None) is None:
                bad.setdefault("bitfit on a norm without a bias", []).append(where)
        hosts = {spec.site.host for spec in by_kind.values()}
        if "lora" in by_kind or "ia3" in by_kind:
            plan.targets.append(path)
        if "norm" in hosts:
            (plan.targets if method == "ln_tuning" else plan.save).append(path)
    plan.problems = [f"{what}: {_some(where)}" for what, where in bad.items()]
    if method == "ia3":
        plan.base_bias = plan.lora_bias = False
    return plan


def _lora_config_fields() -> set[str]:
    from peft import LoraConfig

    return set(LoraConfig.__dataclass_fields__)


def _target_spec(paths: list[str], backbone: nn.Module) -> list[str] | str:
    """``target_modules`` that select exactly ``paths``: the plain list where peft's suffix rule
    picks nothing else, else a fullmatch regex."""
    wanted = set(paths)
    for name, _ in backbone.named_modules():
        if name not in wanted and any(name.endswith("." + p) for p in paths):
            return "|".join(re.escape(p) for p in sorted(paths))
    return sorted(paths)


def _peft_config(plan: PeftPlan, specs: list[ModuleSpec], backbone: nn.Module):
    import peft

    targets = _target_spec(plan.targets, backbone)
    common = {"inference_mode": True}
    if plan.method == "ln_tuning":
        exact = "|".join(re.escape(p) for p in sorted(plan.targets))  # norm names collide by suffix
        return peft.LNTuningConfig(target_modules=exact, **common)
    save = sorted(plan.save) or None
    # GPT-2 Conv1D keeps W as (in, out); peft wants to be told (it would fix it per layer, with a warning).
    hosts = [backbone.get_submodule(p) for p in plan.targets]
    if hosts and not any(isinstance(h, nn.Linear) for h in hosts):
        common["fan_in_fan_out"] = True
    if plan.method == "ia3":
        return peft.IA3Config(target_modules=targets, feedforward_modules=[], modules_to_save=save, **common)
    lora = [s for s in specs if s.kind == "lora"]
    ranks = {re.escape(s.site.path): int(s.units) for s in lora}
    alphas = {re.escape(s.site.path): float(s.params["alpha"]) for s in lora}
    if not lora:  # BitFit on linears only: no LoRA module, the biases travel with bias="all"
        try:
            from peft.utils.constants import DUMMY_TARGET_MODULES
        except ImportError as e:
            raise StructureError("a structure with BitFit but no LoRA on its linears needs peft >= 0.14 "
                                 f"(installed: {peft.__version__}); or export it merged") from e
        targets = DUMMY_TARGET_MODULES
    extra = {"lora_bias": True} if plan.lora_bias else {}
    return peft.LoraConfig(target_modules=targets, r=max(ranks.values(), default=1),
                           lora_alpha=max(alphas.values(), default=8.0), rank_pattern=ranks, alpha_pattern=alphas,
                           lora_dropout=0.0, bias="all" if plan.base_bias else "none", modules_to_save=save,
                           **extra, **common)


@torch.no_grad()
def _fill_peft(pm: nn.Module, plan: PeftPlan, specs: list[ModuleSpec], ds: DeltaSet) -> None:
    """Copy the trained deltas into the freshly wrapped peft model."""
    root = pm.base_model.model
    for path, by_kind in _by_site(specs, ds).items():
        mod = root.get_submodule(path)
        if plan.method == "ln_tuning" or path in plan.save:
            norm = mod.ln_tuning_layers[ADAPTER] if plan.method == "ln_tuning" else mod.modules_to_save[ADAPTER]
            _fold_norm(norm, by_kind, path)
            continue
        if "ia3" in by_kind:
            scale = by_kind["ia3"][1].scale
            lv = mod.ia3_l[ADAPTER]
            lv.copy_((1 + scale.to(lv.dtype)).reshape(lv.shape))
        if "lora" in by_kind:
            spec, d = by_kind["lora"]
            a, b = mod.lora_A[ADAPTER], mod.lora_B[ADAPTER]
            if abs(mod.scaling[ADAPTER] - d.scaling) > 1e-12 * max(1.0, abs(d.scaling)):
                raise StructureError(f"peft scales the LoRA at {path} by {mod.scaling[ADAPTER]}, s3pet by "
                                     f"{d.scaling}: rank_pattern/alpha_pattern did not match it")
            a.weight.copy_(d.lora_A)
            b.weight.copy_(d.lora_B)
        if "bitfit" in by_kind:
            db = by_kind["bitfit"][1].bias
            base = mod.get_base_layer() if hasattr(mod, "get_base_layer") else mod
            if getattr(base, "bias", None) is not None:
                base.bias.add_(db.to(base.bias.dtype))
            else:  # plan.lora_bias: scaling * b_B adds the delta
                lb = mod.lora_B[ADAPTER].bias
                lb.copy_(db.to(lb.dtype) / by_kind["lora"][1].scaling)


def _fold_norm(norm: nn.Module, by_kind: dict, path: str) -> None:
    if "lnfit" in by_kind:
        norm.weight.add_(by_kind["lnfit"][1].weight.to(norm.weight.dtype))
    if "bitfit" in by_kind:
        if getattr(norm, "bias", None) is None:
            raise StructureError(f"bitfit at {path}: the norm has no bias to fold into")
        norm.bias.add_(by_kind["bitfit"][1].bias.to(norm.bias.dtype))


def export_peft(structure: S.Structure, backbone: nn.Module, out_dir: str | Path,
                weights: dict[str, Tensor] | None, *, head: dict[str, Tensor] | None = None,
                inplace: bool = False, verify: bool = True) -> Path:
    """Write ``structure`` with ``weights`` as a peft adapter folder (see the module docstring).

    Args: ``weights`` keyed as ``DeltaSet.state_dict()`` (None: untrained modules); ``head``
    the task head's state dict, saved as ``head.safetensors``; ``inplace`` lets the peft
    wrapper take over ``backbone`` instead of a copy (saves memory; the backbone is then
    changed); ``verify`` compares the peft model with s3pet's on a probe batch before writing.
    Returns the folder. Raises StructureError naming what peft cannot express.
    """
    try:
        from peft import get_peft_model
    except ImportError as e:
        raise ConfigError("exporting to peft needs the peft package: pip install 's3pet[peft]'") from e

    _check_target(out_dir)
    plan = plan_peft(structure, backbone)
    specs = S.to_specs(structure, backbone)
    if plan.problems:
        raise StructureError(_peft_refusal(plan, specs, backbone))
    ds = _load_deltas(specs, backbone, weights)
    ref = _s3pet_outputs(backbone, ds) if verify else None
    base = backbone if inplace else copy.deepcopy(backbone)
    name = _base_name(structure, backbone)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*lora_bias=True.*has no bias")  # known: see the docstring
        warnings.filterwarnings("ignore", message=r"Unsupported layer type .*Norm")  # LN tuning copies any norm
        pm = get_peft_model(base, _peft_config(plan, specs, backbone))
    pm.peft_config[ADAPTER].base_model_name_or_path = name or None  # set after: peft overwrites it on wrapping
    pm.eval()
    _fill_peft(pm, plan, specs, ds)
    diff = _check_same(ref, _outputs(pm, _probe_batch(pm)), "the peft adapter") if verify else None
    meta = {"format": "peft", "peft_method": plan.method, "modules_to_save": plan.save, "lora_bias": plan.lora_bias,
            "bias": "all" if plan.base_bias else "none", "max_abs_diff": diff}
    with _staging(out_dir) as tmp:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*LoRA tensor\(s\) have invalid shape")  # lora_B bias
            # No embedding is ever targeted; "auto" would look the base model up on the hub.
            pm.save_pretrained(str(tmp), save_embedding_layers=False)
        _write_extras(tmp, structure, weights is None, head, meta)
    log.info("wrote peft adapter (%s) to %s", plan.method, out_dir)
    return Path(out_dir)


def _peft_refusal(plan: PeftPlan, specs: list[ModuleSpec], backbone: nn.Module) -> str:
    msg = "this structure cannot be expressed as a peft adapter: " + "; ".join(plan.problems)
    blockers = merge_problems(specs, backbone)
    if not blockers:
        return msg + ". Export it merged instead (--merge / to='merged')."
    return (msg + ". Merging is not possible either (" + "; ".join(blockers) + "): keep s3pet's own format "
            "(structure.json + delta.safetensors).")


def _base_name(structure: S.Structure, backbone: nn.Module) -> str:
    """What ``adapter_config.json`` names as the base: a path or hub id where there is one."""
    name = model_name(backbone) or structure.base_model.get("name_or_path") or ""
    if not name or name in TINY_ALIASES:
        return name
    try:
        return resolve(name)
    except ModelError:
        return name


# ----------------------------------------------------------------------------- merge

def _plain_bias_ok(m: nn.Module) -> bool:
    """Whether the module's forward uses ``self.bias`` when one is set (torch's own classes)."""
    return ((isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward)
            or (isinstance(m, nn.LayerNorm) and type(m).forward is nn.LayerNorm.forward))


def merge_problems(specs: list[ModuleSpec], backbone: nn.Module) -> list[str]:
    """What stops ``specs`` from being merged into a model that ``from_pretrained`` reloads."""
    blockers, lost = _merge_check(specs, backbone)
    if lost:
        blockers.append(f"bitfit on bias-free layers whose config has no switch for a bias "
                        f"({type(backbone).__name__}; from_pretrained would drop it): {_some(lost)}")
    return blockers


def _merge_check(specs: list[ModuleSpec], backbone: nn.Module) -> tuple[list[str], list[str]]:
    """(what cannot be folded at all, sites whose created bias from_pretrained would drop)."""
    bad: dict[str, list[str]] = {}
    new_bias = []
    for spec in specs:
        where = f"{spec.site.path} ({spec.site.role})"
        if spec.kind in SEQUENTIAL:
            bad.setdefault(f"{spec.kind} (sequential bottleneck, cannot be folded into weights)", []).append(where)
        elif spec.kind == "bitfit":
            host = backbone.get_submodule(spec.site.path)
            if getattr(host, "bias", None) is not None:
                continue
            if not _plain_bias_ok(host):
                bad.setdefault(f"bitfit on a {type(host).__name__} without a bias (its forward has none)",
                               []).append(where)
            else:
                new_bias.append(spec.site.path)
    lost = _bias_switches(backbone, new_bias)[1] if new_bias else []
    return [f"{what}: {_some(where)}" for what, where in bad.items()], lost


def merge(structure: S.Structure, backbone: nn.Module, weights: dict[str, Tensor] | None, *,
          inplace: bool = False, verify: bool = True) -> nn.Module:
    """Fold the structure's deltas into the weights of (a copy of) ``backbone``.

    LoRA, IA3, BitFit and LNFit fold as the module docstring says; a bias is created where
    BitFit needs one and the module allows it, and config switches (LLaMA's
    ``attention_bias`` / ``mlp_bias``) are turned on so that the model reloads with it
    (layers they cover get zero biases). ``verify`` compares with s3pet's model on a probe
    batch. Returns the merged model (a plain transformers model, in eval mode).
    Raises StructureError for adapters or a bias the module cannot take.
    """
    specs = S.to_specs(structure, backbone)
    blockers, _ = _merge_check(specs, backbone)
    if blockers:
        raise StructureError("cannot merge this structure into the backbone's weights: " + "; ".join(blockers))
    ds = _load_deltas(specs, backbone, weights)
    ref = _s3pet_outputs(backbone, ds) if verify else None
    model = backbone if inplace else copy.deepcopy(backbone)
    added = _fold(model, specs, ds)
    if added:
        switches, lost = _bias_switches(model, added)
        for k in switches:
            setattr(model.config, k, True)
        _complete_biases(model)
        if lost:
            log.warning("biases added at %s are computed in memory, but from_pretrained would drop them "
                        "(no config switch for them): export_merged will refuse", _some(lost))
    if hasattr(model.config, "_s3pet_name"):
        del model.config._s3pet_name  # the merged model is no longer the named base model
    model.eval()
    if verify:
        _check_same(ref, _outputs(model, _probe_batch(model)), "the merged model")
    return model


@torch.no_grad()
def _fold(model: nn.Module, specs: list[ModuleSpec], ds: DeltaSet) -> list[str]:
    """Fold every delta into ``model``; returns the paths where a bias was created."""
    added = []
    for path, by_kind in _by_site(specs, ds).items():
        mod = model.get_submodule(path)
        if is_linear(mod):
            conv1d = not isinstance(mod, nn.Linear)  # GPT-2 Conv1D stores W as (in, out)
            w = mod.weight
            w32 = w.float()
            b32 = mod.bias.float() if getattr(mod, "bias", None) is not None else None
            if "ia3" in by_kind:  # stage 0: scales the base output, bias included
                s = 1 + by_kind["ia3"][1].scale.float()
                w32 = w32 * (s[None, :] if conv1d else s[:, None])
                b32 = b32 * s if b32 is not None else None
            if "lora" in by_kind:
                d = by_kind["lora"][1]
                dw = d.scaling * (d.lora_B.float() @ d.lora_A.float())  # (out, in)
                w32 = w32 + (dw.T if conv1d else dw)
            w.copy_(w32.to(w.dtype))
            if "bitfit" in by_kind:
                db = by_kind["bitfit"][1].bias.float()
                if b32 is None:
                    mod.bias = nn.Parameter(torch.zeros(db.shape[0], dtype=w.dtype, device=w.device),
                                            requires_grad=w.requires_grad)
                    b32 = torch.zeros_like(db)
                    added.append(path)
                b32 = b32 + db
            if b32 is not None:
                mod.bias.copy_(b32.to(mod.bias.dtype))
        else:  # a norm
            if "lnfit" in by_kind:
                mod.weight.add_(by_kind["lnfit"][1].weight.to(mod.weight.dtype))
            if "bitfit" in by_kind:
                if getattr(mod, "bias", None) is None:
                    w = mod.weight
                    mod.bias = nn.Parameter(torch.zeros_like(w), requires_grad=w.requires_grad)
                    added.append(path)
                mod.bias.add_(by_kind["bitfit"][1].bias.to(mod.bias.dtype))
    return added


def _meta_params(model: nn.Module, config) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of the model ``from_pretrained`` would build from ``config``."""
    with torch.device("meta"):
        ref = type(model)(config)
    return {k: tuple(v.shape) for k, v in ref.state_dict().items()}


def _bias_switches(model: nn.Module, paths: list[str]) -> tuple[list[str], list[str]]:
    """Config switches (booleans named ``*bias*``, now False) whose only effect is to build
    biases covering ``paths``; returns (switches to turn on, paths no switch covers)."""
    config = model.config
    try:
        base = _meta_params(model, config)
    except Exception as e:  # a model class that cannot be built from its config alone
        log.debug("cannot rebuild %s from its config: %s", type(model).__name__, e)
        return [], list(paths)
    need = {f"{p}.bias" for p in paths}
    need -= set(base)
    switches = []
    for key, val in config.to_dict().items():
        if not need or val is not False or "bias" not in key or key.startswith("_"):
            continue
        trial = copy.deepcopy(config)
        setattr(trial, key, True)
        try:
            got = _meta_params(model, trial)
        except Exception:
            continue
        new = set(got) - set(base)
        same_rest = all(got.get(k) == v for k, v in base.items())
        if new & need and same_rest and all(k.endswith(".bias") for k in new):
            switches.append(key)
            need -= new
    return switches, sorted(k[: -len(".bias")] for k in need)


@torch.no_grad()
def _complete_biases(model: nn.Module) -> None:
    """Give a zero bias to every layer the (switched-on) config builds with one."""
    have = set(model.state_dict())
    for key, shape in _meta_params(model, model.config).items():
        if key in have or not key.endswith(".bias"):
            continue
        mod = model.get_submodule(key[: -len(".bias")])
        w = mod.weight
        mod.bias = nn.Parameter(torch.zeros(shape, dtype=w.dtype, device=w.device), requires_grad=w.requires_grad)


def _check_reloadable(model: nn.Module) -> None:
    """StructureError unless ``from_pretrained`` rebuilds exactly this model's parameters."""
    try:
        want = _meta_params(model, model.config)
    except Exception as e:
        log.warning("cannot check that %s reloads with every merged tensor: %s", type(model).__name__, e)
        return
    have = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    dropped = sorted(k for k in have if k not in want)
    missing = sorted(k for k in want if k not in have)
    shapes = sorted(k for k in have if k in want and have[k] != want[k])
    if dropped:
        raise StructureError(f"from_pretrained would drop {_some(dropped)}: the {type(model).__name__} config "
                             "has no switch for biases on these layers, so the exported model would silently "
                             "lose the BitFit deltas there. Keep s3pet's own format, or drop bitfit at those sites")
    if missing or shapes:
        raise StructureError(f"the merged model does not match its config: missing {_some(missing)}; "
                             f"wrong shape {_some(shapes)}")


def export_merged(structure: S.Structure, backbone: nn.Module, out_dir: str | Path,
                  weights: dict[str, Tensor] | None, *, tokenizer=None, head: dict[str, Tensor] | None = None,
                  inplace: bool = False, verify: bool = True) -> Path:
    """Merge (see ``merge``) and ``save_pretrained`` the model (and ``tokenizer`` if given) so
    that ``AutoModel.from_pretrained(out_dir)`` loads it; ``head`` goes to head.safetensors.
    Returns the folder. Raises StructureError if the model cannot be merged or would not
    reload with every merged tensor."""
    _check_target(out_dir)
    model = merge(structure, backbone, weights, inplace=inplace, verify=verify)
    _check_reloadable(model)
    with _staging(out_dir) as tmp:
        model.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        _write_extras(tmp, structure, weights is None, head,
                      {"format": "merged", "architecture": type(model).__name__})
    log.info("wrote merged %s to %s", type(model).__name__, out_dir)
    return Path(out_dir)


# ----------------------------------------------------------------------------- runs and folders

def export_run(structure_path: str | Path, out: str | Path, to: str = "peft", weights_path: str | Path | None = None,
               model: str | None = None) -> Path:
    """Export a structure (file or run directory) with its trained weights.

    ``weights_path`` is a ``delta.safetensors`` written by a retrain (``deltas.`` keys go to the
    modules, ``head.`` keys to head.safetensors); when None, the one beside the structure file
    is used if present, else the modules are exported freshly initialised (a warning: untrained).
    The base model is ``model`` or the structure's ``base_model.name_or_path``; tiny random
    aliases are rebuilt with the run's seed. ``to`` is "peft" or "merged". Writes ``out``
    atomically; returns it.
    """
    if to not in FORMATS:
        raise ConfigError(f"unknown export format {to!r}; use one of {', '.join(FORMATS)}")
    p = Path(structure_path)
    st = S.load(p)
    run_dir = p if p.is_dir() else p.parent
    name = model or st.base_model.get("name_or_path")
    if not name:
        raise StructureError(f"{structure_path}: base_model.name_or_path is empty; pass a model")
    if weights_path is None and (run_dir / "delta.safetensors").is_file():
        weights_path = run_dir / "delta.safetensors"
        log.info("using the weights in %s", weights_path)
    deltas, head = _read_delta_file(weights_path) if weights_path is not None else (None, None)
    backbone = load_backbone(name, seed=_run_seed(run_dir))
    if to == "peft":
        return export_peft(st, backbone, out, deltas, head=head, inplace=True)
    tok = None
    try:
        tok = load_tokenizer(name)
    except ModelError as e:
        log.warning("exporting without a tokenizer: %s", e)
    return export_merged(st, backbone, out, deltas, tokenizer=tok, head=head, inplace=True)


def _read_delta_file(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"weights file not found: {path}")
    try:
        raw = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ConfigError(f"cannot read weights {path}: {e}") from e
    deltas = {k[len("deltas."):]: v for k, v in raw.items() if k.startswith("deltas.")}
    head = {k[len("head."):]: v for k, v in raw.items() if k.startswith("head.")}
    other = sorted(k for k in raw if not k.startswith(("deltas.", "head.")))
    if other:
        what = " (a full fine-tuning run: no PET modules to export)" if other[0].startswith("backbone.") else ""
        raise StructureError(f"{path} holds keys other than 'deltas.' and 'head.'{what}: {_some(other)}")
    if not deltas:
        raise StructureError(f"{path} holds no 'deltas.' weights")
    return deltas, head


def _run_seed(run_dir: Path) -> int:
    try:
        cfg = read_json(run_dir / "config.json")
    except (OSError, ValueError):
        return 0
    for stage in ("train", "search"):
        seed = (cfg.get(stage) or {}).get("seed")
        if isinstance(seed, int):
            return seed
    return 0


def _write_extras(folder: Path, structure: S.Structure, untrained: bool, head: dict[str, Tensor] | None,
                  meta: dict) -> None:
    from safetensors.torch import save_file

    if head:
        save_file({k: v.detach().contiguous().cpu() for k, v in head.items()}, str(folder / "head.safetensors"))
    structure.save(folder / "structure.json")
    write_json(folder / MARKER, {"s3pet_version": s3pet.__version__, "trained": not untrained,
                                 "head": "head.safetensors" if head else None, **meta})


def _check_target(out: str | Path) -> Path:
    """ConfigError unless ``out`` is new, empty, or an earlier s3pet export (safe to replace)."""
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise ConfigError(f"export target {out} exists and is not a folder")
        if any(out.iterdir()) and not (out / MARKER).is_file():
            raise ConfigError(f"export target {out} is a non-empty folder that is not an s3pet export; "
                              "choose a new path")
    return out


@contextlib.contextmanager
def _staging(out: str | Path):
    """Yield a temporary folder beside ``out``; on success it replaces ``out`` by renames.

    An existing ``out`` is replaced only if it is empty or an earlier s3pet export, so a
    mistyped path never wipes a run directory. On error nothing is left behind.
    """
    out = Path(out)
    _recover_killed(out)
    out = _check_target(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # The pid in the name tells a later export whether this folder's writer is still alive.
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.{os.getpid()}.", suffix=".tmp"))
    try:
        yield tmp
        _usual_modes(tmp)
        old = None
        if out.exists():
            old = tmp.with_name(tmp.name + ".old")
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            if old is not None:
                os.replace(old, out)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _recover_killed(out: Path) -> None:
    """Undo what a killed export left beside ``out``: its staging folder is removed, and an
    earlier export it had moved aside (killed between the two renames) is put back."""
    from s3pet.rundir import pid_alive

    if not out.parent.is_dir():
        return
    prefix = f".{out.name}."
    for p in sorted(out.parent.iterdir()):
        if not (p.name.startswith(prefix) and (p.name.endswith(".tmp") or p.name.endswith(".tmp.old"))):
            continue
        pid = p.name[len(prefix):].split(".", 1)[0]
        if not pid.isdigit() or pid_alive(int(pid)):
            continue  # another export's, still running (or not ours at all)
        if p.name.endswith(".old") and not out.exists():
            os.replace(p, out)
            log.warning("restored %s, which a killed export had moved aside", out)
        else:
            shutil.rmtree(p, ignore_errors=True)
            log.info("removed %s, left by a killed export", p)


def _usual_modes(folder: Path) -> None:
    """Temporary files and folders are private; give the export the modes of ordinary files."""
    os.chmod(folder, 0o755)
    for p in folder.rglob("*"):
        os.chmod(p, 0o755 if p.is_dir() else 0o644)


def read_export_info(folder: str | Path) -> dict:
    """The ``s3pet_export.json`` of an export folder."""
    return json.loads((Path(folder) / MARKER).read_text())
