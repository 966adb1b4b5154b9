"""peft mapping: how a structure becomes one peft adapter (LoRA, IA3, LoKr or LN tuning) on a
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
from s3pet.errors import ConfigError, StructureError
from s3pet.export.folders import HUB_IDS, check_target, model_card, staging, write_extras
from s3pet.export.merging import merge_problems
from s3pet.deltas import KINDS
from s3pet.export.weights import by_site, check_same, load_deltas, outputs, probe_batch, s3pet_outputs, some
from s3pet.inject import DeltaSet
from s3pet.models import model_name
from s3pet.space import ModuleSpec

log = logging.getLogger("s3pet.export")

ADAPTER = "default"  # peft's adapter name

@dataclass
class PeftPlan:
    """How a structure maps onto one peft adapter: the method and what goes where."""

    method: str  # "lora" | "ia3" | "lokr" | "ln_tuning"
    targets: list[str] = field(default_factory=list)  # module paths the method wraps
    save: list[str] = field(default_factory=list)  # norms saved whole with their deltas folded in
    lora_bias: bool = False  # BitFit rides on LoRA's B bias (peft's lora_bias)
    bias_only: list[str] = field(default_factory=list)  # BitFit sites without LoRA: a zero rank-1 LoRA carries it
    fields: dict = field(default_factory=dict)  # config fields the modules ask for (DeltaKind.peft_fields)
    problems: list[str] = field(default_factory=list)


def plan_peft(structure: S.Structure, backbone: nn.Module) -> PeftPlan:
    """Work out how ``structure`` maps onto a peft adapter; ``problems`` lists what cannot.

    Each kind says which part of a peft adapter carries it (``DeltaKind.peft_part``): LoRA
    layers, the bias of LoRA's B (``lora_bias``: BitFit on a linear, undone by
    ``disable_adapter()`` like every other part), IA3 vectors, or trained norm copies. A
    ``lora_bias`` site without a LoRA gets a rank-1 LoRA whose factors are zero (exact: it adds
    only the bias; it costs d_in + d_out zeros in the file).
    """
    specs = S.to_specs(structure, backbone)
    if not specs:
        raise StructureError("the structure has no modules: nothing to export")
    return plan_specs(specs, backbone)


def plan_specs(specs: list[ModuleSpec], backbone: nn.Module) -> PeftPlan:
    """``plan_peft`` of a list of modules (a structure's, or candidates of a space)."""
    sites: dict[str, dict[str, tuple[ModuleSpec, str | None]]] = {}
    for spec in specs:
        kind = KINDS[spec.kind]
        sites.setdefault(spec.site.path, {})[spec.kind] = (spec, kind.peft_part(spec.site)
                                                           if kind.peft_problem(spec) is None else None)
    parts = {part: sorted({k for by_kind in sites.values() for k, (_, p) in by_kind.items() if p == part})
             for part in ("lora", "lora_bias", "ia3", "lokr", "norm")}
    # A peft adapter is one method: the linears' parts must all be one method's.
    families = {"ia3": parts["ia3"], "lokr": parts["lokr"], "lora": parts["lora"] + parts["lora_bias"]}
    present = [m for m in ("ia3", "lokr", "lora") if families[m]]
    method = present[0] if present else "ln_tuning"
    others = [k for m in present[1:] for k in families[m]]
    plan = PeftPlan(method)
    has_lora_bias = "lora_bias" in _lora_config_fields()
    bad: dict[str, list[str]] = {}
    for path, by_kind in sites.items():
        host = backbone.get_submodule(path)
        ranked = [k for k, (s, p) in by_kind.items() if p is not None and KINDS[k].peft_rank(s)]
        if len(ranked) > 1:
            bad.setdefault(f"{'/'.join(sorted(ranked))} at one linear (a peft layer has one rank)", []).append(path)
        for kind, (spec, part) in by_kind.items():
            where = f"{path} ({spec.site.role})"
            if part is None:
                bad.setdefault(f"{kind} ({KINDS[kind].peft_problem(spec)})", []).append(where)
            elif others and part in ("ia3", "lokr", "lora", "lora_bias") and kind in families[method]:
                bad.setdefault(f"{'/'.join(families[method])} together with {'/'.join(others)} "
                               "on linears (a peft adapter is one method)", []).append(where)
            elif part == "lokr" and not isinstance(host, nn.Linear):
                bad.setdefault(f"{kind} on a {type(host).__name__} (peft's LoKr wraps nn.Linear only)",
                               []).append(where)
            elif part == "lora_bias":
                if not has_lora_bias:
                    bad.setdefault(f"{kind} on a linear (needs peft >= 0.14 for lora_bias)", []).append(where)
                plan.lora_bias = True
                if not any(KINDS[k].peft_rank(s) for k, (s, p) in by_kind.items() if p is not None):
                    plan.bias_only.append(path)
            elif part == "norm" and KINDS[kind].adds_bias and getattr(host, "bias", None) is None:
                bad.setdefault(f"{kind} on a norm without a bias", []).append(where)
            if part is not None:
                for key, value in KINDS[kind].peft_fields(spec).items():
                    if plan.fields.setdefault(key, value) != value:
                        bad.setdefault(f"{kind} with different {key} ({plan.fields[key]} and {value}; one per "
                                       "peft adapter)", []).append(where)
        got = {p for _, p in by_kind.values()}
        if got & {"lora", "ia3", "lokr"} or path in plan.bias_only:
            plan.targets.append(path)
        if "norm" in got:
            (plan.targets if method == "ln_tuning" else plan.save).append(path)
    plan.problems = [f"{what}: {some(where)}" for what, where in bad.items()]
    if method != "lora":
        plan.lora_bias, plan.bias_only = False, []
    return plan


def _lora_config_fields() -> set[str]:
    from peft import LoraConfig

    return set(LoraConfig.__dataclass_fields__)


def _target_spec(paths: list[str], root: nn.Module) -> list[str] | str:
    """``target_modules`` that select exactly ``paths``: the plain list where peft's suffix rule
    picks nothing else, else a fullmatch regex."""
    wanted = set(paths)
    for name, _ in root.named_modules():
        if name not in wanted and any(name.endswith("." + p) for p in paths):
            return "|".join(re.escape(p) for p in sorted(paths))
    return sorted(paths)


def peft_config(plan: PeftPlan, specs: list[ModuleSpec], root: nn.Module, prefix: str = "",
                task_type: str | None = None, heads: tuple[str, ...] = ()):
    """The peft config of ``plan`` for a model ``root`` whose backbone sits at ``prefix``
    (``""``: root is the backbone; ``"bert."`` in ``BertForSequenceClassification``).
    ``heads`` are top-level modules saved whole (``modules_to_save``), ``task_type`` peft's."""
    import peft

    targets = _target_spec([prefix + p for p in plan.targets], root)
    common = {"inference_mode": True, "task_type": task_type}
    if plan.method == "ln_tuning":
        exact = "|".join(re.escape(prefix + p) for p in sorted(plan.targets))  # norm names collide by suffix
        return peft.LNTuningConfig(target_modules=exact, modules_to_save=list(heads) or None, **common)
    save = sorted(prefix + p for p in plan.save) + list(heads) or None
    # GPT-2 Conv1D keeps W as (in, out); peft wants to be told (it would fix it per layer, with a warning).
    hosts = [root.get_submodule(prefix + p) for p in plan.targets]
    if hosts and not any(isinstance(h, nn.Linear) for h in hosts):
        common["fan_in_fan_out"] = True
    if plan.method == "ia3":
        return peft.IA3Config(target_modules=targets, feedforward_modules=[], modules_to_save=save, **common)
    ranks, alphas = {}, {}
    for s in specs:
        ra = KINDS[s.kind].peft_rank(s) if KINDS[s.kind].peft_problem(s) is None else None
        if ra:
            ranks[re.escape(prefix + s.site.path)], alphas[re.escape(prefix + s.site.path)] = ra
    if plan.method == "lokr":  # peft's alpha / r is s3pet's scaling; no dropout, W1 kept whole
        common.pop("fan_in_fan_out", None)
        return peft.LoKrConfig(target_modules=targets, r=max(ranks.values(), default=1),
                               alpha=max(alphas.values(), default=1.0), rank_pattern=ranks, alpha_pattern=alphas,
                               rank_dropout=0.0, module_dropout=0.0, decompose_both=False,
                               modules_to_save=save, **plan.fields, **common)
    for path in plan.bias_only:  # zero rank-1 LoRA, scaling 1: it adds exactly its B bias
        ranks[re.escape(prefix + path)], alphas[re.escape(prefix + path)] = 1, 1.0
    extra = {"lora_bias": True} if plan.lora_bias else {}
    return peft.LoraConfig(target_modules=targets, r=max(ranks.values(), default=1),
                           lora_alpha=max(alphas.values(), default=8.0), rank_pattern=ranks, alpha_pattern=alphas,
                           lora_dropout=0.0, bias="none", modules_to_save=save, **extra, **common)


@torch.no_grad()
def fill_peft(pm: nn.Module, plan: PeftPlan, specs: list[ModuleSpec], ds: DeltaSet, prefix: str = "") -> None:
    """Copy the trained deltas into the freshly wrapped peft model (backbone at ``prefix``):
    norm parts folded into the norm copies, every other part by its kind's ``peft_fill``."""
    root = pm.base_model.model
    for path, by_kind in by_site(specs, ds).items():
        mod = root.get_submodule(prefix + path)
        items = sorted(by_kind.values(), key=lambda t: KINDS[t[0].kind].stage)
        if plan.method == "ln_tuning" or path in plan.save:
            norm = mod.ln_tuning_layers[ADAPTER] if plan.method == "ln_tuning" else mod.modules_to_save[ADAPTER]
            _fold_norm(norm, items, path)
            continue
        scaling = mod.scaling[ADAPTER] if hasattr(mod, "scaling") else 1.0
        if path in plan.bias_only:
            mod.lora_A[ADAPTER].weight.zero_()
            mod.lora_B[ADAPTER].weight.zero_()
        for spec, d in items:
            try:
                KINDS[spec.kind].peft_fill(d, mod, ADAPTER, scaling)
            except StructureError as e:
                raise StructureError(f"{spec.kind} at {path}: {e}") from e


def _fold_norm(norm: nn.Module, items: list, path: str) -> None:
    w = norm.weight.float()
    b = norm.bias.float() if getattr(norm, "bias", None) is not None else None
    for spec, d in items:
        w, b = KINDS[spec.kind].fold(d, w, b)
    if b is not None and getattr(norm, "bias", None) is None:
        raise StructureError(f"{'/'.join(s.kind for s, _ in items)} at {path}: the norm has no bias to fold into")
    norm.weight.copy_(w.to(norm.weight.dtype))
    if b is not None:
        norm.bias.copy_(b.to(norm.bias.dtype))


def export_peft(structure: S.Structure, backbone: nn.Module, out_dir: str | Path,
                weights: dict[str, Tensor] | None, *, head: dict[str, Tensor] | None = None,
                untrained: bool = False, inplace: bool = False, verify: bool = True) -> Path:
    """Write ``structure`` with ``weights`` as a peft adapter on the bare backbone (``AutoModel``;
    ``AutoModelForSeq2SeqLM`` for T5), for feature extraction. For a task model that loads
    into ``AutoModelForSequenceClassification`` use ``s3pet.export.task.export_task``.

    Args: ``weights`` keyed as ``DeltaSet.state_dict()``; None only with ``untrained=True``
    (freshly initialised modules); ``head`` the task head's state dict, saved as
    ``head.safetensors``; ``inplace`` lets the peft wrapper take over ``backbone`` instead of a
    copy (saves memory; the backbone is then changed); ``verify`` compares the peft model with
    s3pet's on a probe batch before writing.
    Returns the folder. Raises StructureError naming what peft cannot express.
    """
    check_target(out_dir)
    plan, specs, ds = prepare(structure, backbone, weights, untrained)
    ref = s3pet_outputs(backbone, ds) if verify else None
    base = backbone if inplace else copy.deepcopy(backbone)
    pm = wrap(base, peft_config(plan, specs, base), base_name(structure, backbone))
    fill_peft(pm, plan, specs, ds)
    diff = check_same(ref, outputs(pm, probe_batch(pm)), "the peft adapter") if verify else None
    meta = {"format": "peft", "peft_method": plan.method, "modules_to_save": plan.save, "lora_bias": plan.lora_bias,
            "max_abs_diff": diff}
    return save_adapter(pm, out_dir, structure, weights is None, head, meta)


def prepare(structure: S.Structure, backbone: nn.Module, weights: dict[str, Tensor] | None,
            untrained: bool) -> tuple[PeftPlan, list[ModuleSpec], DeltaSet]:
    """(plan, specs, DeltaSet holding ``weights``); StructureError, one line, naming what peft
    cannot express and the alternative; ConfigError for missing weights without ``untrained``."""
    import importlib.util

    if importlib.util.find_spec("peft") is None:
        raise ConfigError("exporting to peft needs the peft package: pip install 's3pet[peft]'")
    if weights is None and not untrained:
        raise ConfigError("no trained weights given: pass the retrain's delta.safetensors (--weights), "
                          "or --untrained to export freshly initialised modules")
    plan = plan_peft(structure, backbone)
    specs = S.to_specs(structure, backbone)
    if plan.problems:
        raise StructureError(_peft_refusal(plan, specs, backbone))
    return plan, specs, load_deltas(specs, backbone, weights)


def wrap(model: nn.Module, config, name: str) -> nn.Module:
    """``get_peft_model`` in eval mode, naming ``name`` as the base model."""
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*lora_bias=True.*has no bias")  # known: see the docstring
        warnings.filterwarnings("ignore", message=r"Unsupported layer type .*Norm")  # LN tuning copies any norm
        pm = get_peft_model(model, config)
    pm.peft_config[ADAPTER].base_model_name_or_path = name or None  # set after: peft overwrites it on wrapping
    pm.eval()
    return pm


def save_adapter(pm: nn.Module, out_dir: str | Path, structure: S.Structure, untrained: bool,
                 head: dict[str, Tensor] | None, meta: dict, card: str | None = None) -> Path:
    """Save the adapter, s3pet's extras and the model card ``README.md`` into ``out_dir`` atomically."""
    with staging(out_dir) as tmp:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*LoRA tensor\(s\) have invalid shape")  # lora_B bias
            # No embedding is ever targeted; "auto" would look the base model up on the hub.
            pm.save_pretrained(str(tmp), save_embedding_layers=False)
        write_extras(tmp, structure, untrained, head, meta)
        name = pm.peft_config[ADAPTER].base_model_name_or_path
        (tmp / "README.md").write_text(card or model_card(structure, name, meta, untrained))
    log.info("wrote peft adapter (%s) to %s", meta.get("peft_method"), out_dir)
    return Path(out_dir)


def _peft_refusal(plan: PeftPlan, specs: list[ModuleSpec], backbone: nn.Module) -> str:
    msg = "this structure cannot be expressed as a peft adapter: " + "; ".join(plan.problems)
    blockers = merge_problems(specs, backbone)
    if not blockers:
        return msg + ". Export it merged instead (--merge / to='merged'), or search a space of exportable kinds."
    return (msg + ". Merging is not possible either (" + "; ".join(blockers) + "): keep s3pet's own format "
            "(structure.json + delta.safetensors), or search a space of exportable kinds.")


def base_name(structure: S.Structure, backbone: nn.Module) -> str:
    """What the adapter names as its base model: the hub id or the name it was given (never the
    local folder an alias resolves to, which exists only inside one installation)."""
    name = model_name(backbone) or structure.base_model.get("name_or_path") or ""
    return HUB_IDS.get(name, name)
