"""FacT (Jie & Deng 2023, "Factor-Tuning"): the weight increments of all linear layers as one
tensor, factored with factors shared across layers; parallel to a linear, y += s * dW x.

The paper stacks the d x d slices of every increment of a ViT (q, k, v, o: one slice each; the
FFN's d x 4d projections: four) into one tensor and factors it along the two width modes with
factors U, V (d x r) shared by all slices. Here a linear from d_in to d_out is cut into
a x b slices of w x w, w = gcd(d_in, d_out) (a = d_out / w, b = d_in / w; BERT's FFN: 4 x 1,
GPT-2's fused qkv: 3 x 1, LLaMA's grouped k/v: the smaller width), and slice (A, B) is

- ``form: "tt"`` (FacT-TT): dW_AB = s * V_w Sigma_AB U_w, Sigma_AB r x r per slice: a site
  owns Sigma (a r x b r), a b r^2 parameters;
- ``form: "tk"`` (FacT-TK): dW_AB = s * V_w (C x_3 p_AB) U_w, C (r, r, r) shared and p_AB
  (r) per slice: a site owns p (a b x r), a b r parameters.

U_w (r x w) and V_w (w x r) are shared by every FacT module of that form and rank whose slices
have width w (``fact_<form>_r<r>_u<w>``, ``..._v<w>``; ``fact_tk_r<r>_core`` for C): paid once,
r w each (r^3 for C). V starts at zero, so a fresh module is the identity; U, Sigma start as
``nn.Linear`` weights do, C and p uniformly (Xavier), as in the paper's code.

Gated as one unit per site (the whole dW): the rank r is the width of the shared factors, the
same for every site, so the search decides where FacT goes, not its rank (a per-site rank
would make the shared cost depend on the largest kept rank).

Linear in the weights, so it folds exactly into its host (merge: W += dW). peft has no FacT.
The scale s is a hyper-parameter (1 by default; the paper tunes it per task: its configs have
1 for CIFAR-100 and 0.01 for DTD, at rank 8 for TT, 16 for TK); it trains at 1e-3, the paper's rate.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from s3pet.deltas.base import Delta, DeltaKind, register
from s3pet.errors import ConfigError

FORMS = ("tt", "tk")


def slices(site) -> tuple[int, int, int]:
    """(w, a, b): the slice width and the number of slices along the output and the input."""
    w = math.gcd(site.d_in, site.d_out)
    return w, site.d_out // w, site.d_in // w


def factor_names(form: str, r: int, w: int) -> tuple[str, str]:
    return f"fact_{form}_r{r}_u{w}", f"fact_{form}_r{r}_v{w}"


def core_name(r: int) -> str:
    return f"fact_tk_r{r}_core"


class FacT(Delta):
    kind = "fact"

    def __init__(self, w: int, a: int, b: int, r: int, form: str, scale: float):
        super().__init__()
        self.w, self.a, self.b, self.r, self.form, self.scale = w, a, b, r, form, scale
        self.u_name, self.v_name = factor_names(form, r, w)
        if form == "tt":
            self.sigma = nn.Parameter(torch.empty(a * r, b * r))
            nn.init.kaiming_uniform_(self.sigma, a=math.sqrt(5))  # nn.Linear(b r, a r)'s initialisation
        else:
            self.p = nn.Parameter(torch.empty(a * b, r))
            nn.init.xavier_uniform_(self.p)

    def core(self, shared: dict[str, Tensor]) -> Tensor:
        """Sigma (a r x b r): the site's own, or (TK) the shared core contracted with p."""
        if self.form == "tt":
            return self.sigma
        a, b, r = self.a, self.b, self.r
        s = torch.einsum("klm,jm->jkl", shared[core_name(r)], self.p)  # (a b, r, r): one r x r per slice
        return s.reshape(a, b, r, r).permute(0, 2, 1, 3).reshape(a * r, b * r)

    def forward(self, x, y, gate, shared):
        u, v = shared[self.u_name], shared[self.v_name]
        xx = x if torch.is_autocast_enabled() else x.to(u.dtype)
        h = (xx.unflatten(-1, (self.b, self.w)) @ u.t()).flatten(-2)  # (..., b r): each input slice by U
        z = (h @ self.core(shared).t()).unflatten(-1, (self.a, self.r))  # (..., a, r)
        out = (z @ v.t()).flatten(-2) * self.scale  # (..., d_out): each output slice by V
        if gate is not None:
            out = out * gate
        return y + out.to(y.dtype)

    def weight_delta(self, shared: dict[str, Tensor]) -> Tensor:
        """dW (d_out x d_in) in float32."""
        u, v = shared[self.u_name].float(), shared[self.v_name].float()
        a, b, r = self.a, self.b, self.r
        sig = self.core(shared).float().reshape(a, r, b, r)
        dw = torch.einsum("pk,akbl,lq->apbq", v, sig, u)
        return self.scale * dw.reshape(a * self.w, b * self.w)


@register
class FacTKind(DeltaKind):
    name = "fact"
    hosts = ("linear",)
    stage = 1  # parallel: adds dW x beside the host, as LoRA
    defaults = {"rank": 8, "form": "tt", "scale": 1.0}
    size_field = "rank"  # what a hand-designed baseline grows to fill a budget
    lr = 1e-3  # the paper's rate (ViT-B, VTAB-1k)
    merge_refusal = None
    peft_refusal = "no peft counterpart (peft has no FacT); merge it"
    code, colour, order = "F", "#44AA99", 11

    def check_params(self, params):
        out = super().check_params(params)
        if out["form"] not in FORMS:
            raise ConfigError(f"field 'form' of kind 'fact' must be one of {list(FORMS)}, got {out['form']!r}")
        return out

    def unit_params(self, site, params):
        _, a, b = slices(site)
        r = int(params["rank"])
        return a * b * r * (r if params["form"] == "tt" else 1)

    def build(self, site, params, units):
        w, a, b = slices(site)
        return FacT(w, a, b, int(params["rank"]), params["form"], float(params["scale"]))

    def shared(self, site, params):
        w, _, _ = slices(site)
        r, form = int(params["rank"]), params["form"]
        u, v = factor_names(form, r, w)
        out = {u: (r, w), v: (w, r)}
        if form == "tk":
            out[core_name(r)] = (r, r, r)
        return out

    def init_shared(self, name, shape):
        t, tail = torch.empty(shape), name.rsplit("_", 1)[-1]
        if tail == "core":
            return nn.init.xavier_uniform_(t)
        if tail.startswith("v"):
            return t.zero_()  # V: zero, so a fresh module is the identity
        return nn.init.kaiming_uniform_(t, a=math.sqrt(5))  # U: nn.Linear(w, r)'s initialisation

    def fold(self, delta, weight, bias, shared):
        return weight + delta.weight_delta(shared), bias
