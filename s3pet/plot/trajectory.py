"""Search and retrain histories: ``trajectory`` collects the series, ``plot_trajectory`` draws them."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Iterable, NamedTuple

from s3pet.plot.common import _human, _pct
from s3pet.plot.style import _new_figure


class Series(NamedTuple):
    step: tuple[float, ...]
    value: tuple[float, ...]


class Trajectory(NamedTuple):
    """Series of a ``history.jsonl``; a key absent from every record gives an empty Series."""

    loss_w: Series
    loss_alpha: Series
    loss: Series                 # retrain runs
    lr: Series                   # retrain runs
    shift: Series
    expected_params: Series
    budget: Series
    gate_entropy: Series
    gates_open: Series
    evals: dict[str, Series]     # every numeric field of the "eval" records ("main", ...)

    @property
    def eval_main(self) -> Series:
        return self.evals.get("main", Series((), ()))


_TRAJ_FIELDS = ("loss_w", "loss_alpha", "loss", "lr", "shift", "expected_params", "budget",
                "gate_entropy", "gates_open")


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def trajectory(records: Iterable[dict]) -> Trajectory:
    """Collect the series of history records; missing keys and non-finite values are skipped.

    A record without "step" takes the previous record's step (or its index if none yet).
    """
    pts: dict[str, list[tuple[float, float]]] = defaultdict(list)
    evals: dict[str, list[tuple[float, float]]] = defaultdict(list)
    step = None
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            continue
        s = _number(rec.get("step"))
        step = s if s is not None else (step if step is not None else float(i))
        for f in _TRAJ_FIELDS:
            v = _number(rec.get(f))
            if v is not None:
                pts[f].append((step, v))
        ev = rec.get("eval")
        if isinstance(ev, dict):
            for name, v in ev.items():
                v = _number(v)
                if v is not None:
                    evals[str(name)].append((step, v))

    def series(p):
        return Series(tuple(a for a, _ in p), tuple(b for _, b in p))

    return Trajectory(**{f: series(pts[f]) for f in _TRAJ_FIELDS},
                      evals={k: series(v) for k, v in evals.items()})


def plot_trajectory(traj: Trajectory, axes=None, title: str | None = None):
    """Draw a search (or retrain) history on a 2x2 grid: losses (eval metric on a twin axis),
    expected parameters against the budget, the shift b (or the learning rate of a retrain
    run), and gates with p > 0.5 (entropy on a twin axis). Panels without data say so.

    Args:
        axes: four Axes (a 2x2 array or a flat sequence); None draws a new figure.
        title: figure title (only when drawing a new figure).
    Returns:
        the 2x2 array of Axes.
    """
    import numpy as np
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    if axes is None:
        fig = _new_figure(12.0, 7.5)
        axes = fig.subplots(2, 2, sharex=True)
        fig.set_layout_engine("constrained")
        if title:
            fig.suptitle(title, fontsize=10)
    axes = np.asarray(axes, dtype=object).reshape(2, 2)
    blue, red, green, purple, orange = "#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00"

    def plot(a, s: Series, label, colour, **kw):
        if not s.step:
            return []
        kw.setdefault("lw", 1.2)
        return a.plot(s.step, s.value, label=label, color=colour, **kw)

    def twin(a, ylabel):
        t = a.twinx()
        t.set_ylabel(ylabel, fontsize=8.5)
        t.tick_params(labelsize=8)
        return t

    def finish(a, name, handles, what):
        a.set_title(name, fontsize=9.5, loc="left")
        if handles:
            # above the panel, right of its title: never on top of the curves
            a.legend(handles=handles, loc="lower right", bbox_to_anchor=(1.0, 1.0),
                     ncol=len(handles), fontsize=7.5, frameon=False, borderaxespad=0.2,
                     handlelength=1.5, columnspacing=1.0)
        else:
            a.text(0.5, 0.5, f"no {what} recorded", transform=a.transAxes, ha="center",
                   va="center", color="#777777", fontsize=9)
            a.set_yticks([])

    # 1. losses, the main eval metric on a twin axis
    a = axes[0, 0]
    h = (plot(a, traj.loss_w, "loss D_w", blue) + plot(a, traj.loss_alpha, "loss D_alpha", red)
         + plot(a, traj.loss, "train loss", green))
    if h:
        a.set_ylabel("loss", fontsize=8.5)
    if traj.eval_main.step:
        h += twin(a, "eval: main metric").plot(*traj.eval_main, "o-", color="#222222", ms=3,
                                               lw=1, label="eval main")
    finish(a, "losses", h, "losses")

    # 2. expected parameters against the budget; from 0 so that tiny solver noise looks tiny
    a = axes[0, 1]
    h = plot(a, traj.expected_params, "Σ n_i p_i", blue)
    b = traj.budget
    if b.step:
        if len(set(b.value)) == 1:
            h.append(a.axhline(b.value[0], color=red, ls="--", lw=1.2, label="budget"))
        else:
            h += plot(a, b, "budget", red, ls="--")
    if h:
        top = max(traj.expected_params.value + b.value)
        a.set_ylim(0, 1.12 * top)
        a.set_ylabel("parameters", fontsize=8.5)
        a.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _human(v)))
        if traj.expected_params.step and b.step:
            bud = dict(zip(*b))
            gaps = [abs(v - bud.get(s, b.value[-1])) for s, v in zip(*traj.expected_params)]
            ref = b.value[-1] or 1
            a.text(0.98, 0.04, f"largest |Σ n_i p_i − budget|: {max(gaps):,.0f} "
                   f"({_pct(max(gaps) / ref)})", transform=a.transAxes, ha="right",
                   va="bottom", fontsize=7.5, color="#444444")
    finish(a, "expected parameters", h, "expected parameters")

    # 3. shift b (search) or the learning rate (retrain)
    a = axes[1, 0]
    if traj.shift.step:
        h = plot(a, traj.shift, "shift b", purple)
        a.set_ylabel("shift b", fontsize=8.5)
        finish(a, "shift b of the global sigmoid", h, "shift")
    else:
        h = plot(a, traj.lr, "learning rate", purple)
        if h:
            a.set_ylabel("learning rate", fontsize=8.5)
            a.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        finish(a, "learning rate" if h else "shift b", h, "shift b")

    # 4. gates above 0.5, their entropy on a twin axis
    a = axes[1, 1]
    h = plot(a, traj.gates_open, "gates p > 0.5", green, drawstyle="steps-post")
    if h:
        a.set_ylabel("gates with p > 0.5", fontsize=8.5)
        a.yaxis.set_major_locator(MaxNLocator(integer=True))
        a.set_ylim(bottom=0, top=max(1.0, max(traj.gates_open.value) * 1.1))  # a count: never below 0
    if traj.gate_entropy.step:
        h += plot(twin(a, "gate entropy"), traj.gate_entropy, "entropy", orange)
    finish(a, "gates", h, "gate statistics")

    for a in axes[1]:
        a.set_xlabel("step", fontsize=8.5)
    for a in axes.flat:
        a.grid(alpha=0.3)
        a.tick_params(labelsize=8, labelbottom=True)
    return axes
