"""Merged export: the deltas folded into the weights of a plain transformers model."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from torch import Tensor, nn

from s3pet import structure as S
from s3pet.errors import ConfigError, StructureError
from s3pet.export.folders import staging, write_extras, check_target
from s3pet.export.weights import SEQUENTIAL, by_site, check_same, load_deltas, outputs, probe_batch, s3pet_outputs, some
from s3pet.inject import DeltaSet
from s3pet.space import ModuleSpec, is_linear

log = logging.getLogger("s3pet.export")

def _plain_bias_ok(m: nn.Module) -> bool:
    """Whether the module's forward uses ``self.bias`` when one is set (torch's own classes)."""
    return ((isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward)
            or (isinstance(m, nn.LayerNorm) and type(m).forward is nn.LayerNorm.forward))


def merge_problems(specs: list[ModuleSpec], backbone: nn.Module) -> list[str]:
    """What stops ``specs`` from being merged into a model that ``from_pretrained`` reloads."""
    blockers, lost = _merge_check(specs, backbone)
    if lost:
        blockers.append(f"bitfit on bias-free layers whose config has no switch for a bias "
                        f"({type(backbone).__name__}; from_pretrained would drop it): {some(lost)}")
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
    return [f"{what}: {some(where)}" for what, where in bad.items()], lost


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
    ds = load_deltas(specs, backbone, weights)
    ref = s3pet_outputs(backbone, ds) if verify else None
    model = backbone if inplace else copy.deepcopy(backbone)
    added = _fold(model, specs, ds)
    if added:
        switches, lost = _bias_switches(model, added)
        for k in switches:
            setattr(model.config, k, True)
        _complete_biases(model)
        if lost:
            log.warning("biases added at %s are computed in memory, but from_pretrained would drop them "
                        "(no config switch for them): export_merged will refuse", some(lost))
    if hasattr(model.config, "_s3pet_name"):
        del model.config._s3pet_name  # the merged model is no longer the named base model
    model.eval()
    if verify:
        check_same(ref, outputs(model, probe_batch(model)), "the merged model")
    return model


@torch.no_grad()
def _fold(model: nn.Module, specs: list[ModuleSpec], ds: DeltaSet) -> list[str]:
    """Fold every delta into ``model``; returns the paths where a bias was created."""
    added = []
    for path, by_kind in by_site(specs, ds).items():
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
        raise StructureError(f"from_pretrained would drop {some(dropped)}: the {type(model).__name__} config "
                             "has no switch for biases on these layers, so the exported model would silently "
                             "lose the BitFit deltas there. Keep s3pet's own format, or drop bitfit at those sites")
    if missing or shapes:
        raise StructureError(f"the merged model does not match its config: missing {some(missing)}; "
                             f"wrong shape {some(shapes)}")


def export_merged(structure: S.Structure, backbone: nn.Module, out_dir: str | Path,
                  weights: dict[str, Tensor] | None, *, tokenizer=None, head: dict[str, Tensor] | None = None,
                  untrained: bool = False, inplace: bool = False, verify: bool = True) -> Path:
    """Merge (see ``merge``) and ``save_pretrained`` the model (and ``tokenizer`` if given) so
    that ``AutoModel.from_pretrained(out_dir)`` loads it; ``head`` goes to head.safetensors.
    ``weights`` None only with ``untrained``. Returns the folder. Raises StructureError if the
    model cannot be merged or would not reload with every merged tensor."""
    if weights is None and not untrained:
        raise ConfigError("no trained weights given: pass the retrain's delta.safetensors (--weights), "
                          "or --untrained to export freshly initialised modules")
    check_target(out_dir)
    model = merge(structure, backbone, weights, inplace=inplace, verify=verify)
    _check_reloadable(model)
    with staging(out_dir) as tmp:
        model.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        write_extras(tmp, structure, weights is None, head,
                      {"format": "merged", "architecture": type(model).__name__})
    log.info("wrote merged %s to %s", type(model).__name__, out_dir)
    return Path(out_dir)

