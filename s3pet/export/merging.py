"""Merged export: the deltas folded into the weights of a plain transformers model.

Each kind folds itself (``DeltaKind.fold``), in stage order at its host, on float32 copies of
the host's weight and bias; a kind that cannot says why (``DeltaKind.merge_refusal``)."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from torch import Tensor, nn

from s3pet import structure as S
from s3pet.errors import ConfigError, StructureError
from s3pet.export.folders import staging, write_extras, check_target
from s3pet.deltas import KINDS
from s3pet.export.weights import by_site, check_same, load_deltas, outputs, probe_batch, s3pet_outputs, some
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
        kinds = "/".join(sorted({s.kind for s in specs if s.site.path in lost and KINDS[s.kind].adds_bias}))
        blockers.append(f"{kinds} on bias-free layers whose config has no switch for a bias "
                        f"({type(backbone).__name__}; from_pretrained would drop it): {some(lost)}")
    return blockers


def mergeable(specs: list[ModuleSpec], backbone: nn.Module) -> list[ModuleSpec]:
    """The modules of ``specs`` that merge into a model ``from_pretrained`` reloads, each on
    its own (what ``merge_problems`` of one of them would not refuse), in one pass."""
    blockers, lost = _merge_check(specs, backbone, per_spec=True)
    return [s for s in specs if s.key not in blockers and not (KINDS[s.kind].adds_bias and s.site.path in lost)]


def _merge_check(specs: list[ModuleSpec], backbone: nn.Module, per_spec: bool = False):
    """(what cannot be folded at all, sites whose created bias from_pretrained would drop);
    with ``per_spec`` the first is the set of the keys of the modules that cannot."""
    bad: dict[str, list[str]] = {}
    keys = set()
    new_bias = []
    for spec in specs:
        where = f"{spec.site.path} ({spec.site.role})"
        kind = KINDS[spec.kind]
        if kind.merge_refusal is not None:
            bad.setdefault(f"{spec.kind} ({kind.merge_refusal})", []).append(where)
            keys.add(spec.key)
        elif kind.adds_bias:
            host = backbone.get_submodule(spec.site.path)
            if getattr(host, "bias", None) is not None:
                continue
            if not _plain_bias_ok(host):
                bad.setdefault(f"{spec.kind} on a {type(host).__name__} without a bias (its forward has none)",
                               []).append(where)
                keys.add(spec.key)
            else:
                new_bias.append(spec.site.path)
    lost = _bias_switches(backbone, sorted(set(new_bias)))[1] if new_bias else []
    return (keys if per_spec else [f"{what}: {some(where)}" for what, where in bad.items()]), lost


def merge(structure: S.Structure, backbone: nn.Module, weights: dict[str, Tensor] | None, *,
          inplace: bool = False, verify: bool = True) -> nn.Module:
    """Fold the structure's deltas into the weights of (a copy of) ``backbone``.

    Each kind folds as its ``DeltaKind.fold`` says; a bias is created where a kind adds one
    (BitFit) and the module allows it, and config switches (LLaMA's
    ``attention_bias`` / ``mlp_bias``) are turned on so that the model reloads with it
    (layers they cover get zero biases). ``verify`` compares with s3pet's model on a probe
    batch. Returns the merged model (a plain transformers model, in eval mode).
    Raises StructureError for kinds that cannot be folded (adapters) or a bias the module cannot take.
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
    """Fold every delta into ``model``, kinds in stage order at each host; returns the paths
    where a bias was created."""
    added = []
    for path, by_kind in by_site(specs, ds).items():
        mod = model.get_submodule(path)
        conv1d = is_linear(mod) and not isinstance(mod, nn.Linear)  # GPT-2 Conv1D stores W as (in, out)
        w = mod.weight
        w32 = w.float().T if conv1d else w.float()
        b32 = mod.bias.float() if getattr(mod, "bias", None) is not None else None
        for spec, d in sorted(by_kind.values(), key=lambda t: KINDS[t[0].kind].stage):
            w32, b32 = KINDS[spec.kind].fold(d, w32, b32, **ds.shared_kwargs(spec))
        w.copy_((w32.T if conv1d else w32).to(w.dtype))
        if b32 is not None:
            if getattr(mod, "bias", None) is None:
                mod.bias = nn.Parameter(torch.zeros(b32.shape[0], dtype=w.dtype, device=w.device),
                                        requires_grad=w.requires_grad)
                added.append(path)
            mod.bias.copy_(b32.to(mod.bias.dtype))
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

