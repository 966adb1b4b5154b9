"""peft mapping: how a structure becomes one peft adapter (LoRA, IA3 or LN tuning) on a
backbone, and the copy of the trained deltas into the wrapped model."""

from __future__ import annotations

import copy
import logging
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from s3pet import structure as S
from s3pet.errors import ConfigError, ModelError, StructureError
from s3pet.export.folders import check_target, staging, write_extras
from s3pet.export.merging import merge_problems
from s3pet.export.weights import SEQUENTIAL, by_site, check_same, load_deltas, outputs, probe_batch, s3pet_outputs, some
from s3pet.inject import DeltaSet
from s3pet.models import TINY_ALIASES, model_name, resolve
from s3pet.space import ModuleSpec

log = logging.getLogger("s3pet.export")

ADAPTER = "default"  # peft's adapter name

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
    plan.problems = [f"{what}: {some(where)}" for what, where in bad.items()]
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
    for path, by_kind in by_site(specs, ds).items():
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

    check_target(out_dir)
    plan = plan_peft(structure, backbone)
    specs = S.to_specs(structure, backbone)
    if plan.problems:
        raise StructureError(_peft_refusal(plan, specs, backbone))
    ds = load_deltas(specs, backbone, weights)
    ref = s3pet_outputs(backbone, ds) if verify else None
    base = backbone if inplace else copy.deepcopy(backbone)
    name = _base_name(structure, backbone)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*lora_bias=True.*has no bias")  # known: see the docstring
        warnings.filterwarnings("ignore", message=r"Unsupported layer type .*Norm")  # LN tuning copies any norm
        pm = get_peft_model(base, _peft_config(plan, specs, backbone))
    pm.peft_config[ADAPTER].base_model_name_or_path = name or None  # set after: peft overwrites it on wrapping
    pm.eval()
    _fill_peft(pm, plan, specs, ds)
    diff = check_same(ref, outputs(pm, probe_batch(pm)), "the peft adapter") if verify else None
    meta = {"format": "peft", "peft_method": plan.method, "modules_to_save": plan.save, "lora_bias": plan.lora_bias,
            "bias": "all" if plan.base_bias else "none", "max_abs_diff": diff}
    with staging(out_dir) as tmp:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*LoRA tensor\(s\) have invalid shape")  # lora_B bias
            # No embedding is ever targeted; "auto" would look the base model up on the hub.
            pm.save_pretrained(str(tmp), save_embedding_layers=False)
        write_extras(tmp, structure, weights is None, head, meta)
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

