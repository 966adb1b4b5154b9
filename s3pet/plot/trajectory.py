"""Search and retrain histories: ``trajectory`` collects the series, ``plot_trajectory`` draws them."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Iterable, NamedTuple

from s3pet.plot.common import _human, _kind_key, _pct
from s3pet.plot.style import _new_figure, kind_colour


class Series(NamedTuple):
    step: tuple[float, ...]
    value: tuple[float, ...]


_EMPTY = Series((), ())


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
    p_max: Series                # spread of the gate probabilities (searches since the derivation stats)
    p_median: Series
    p_kept_min: Series           # the smallest p the derivation keeps: its threshold
    derived_kept: Series         # candidates the derivation keeps at that step
    evals: dict[str, Series]     # every numeric field of the "eval" records ("main", ...)
    derived_by_kind: dict[str, Series] = {}  # parameters of the structure derived at each step, per kind

    @property
    def eval_main(self) -> Series:
        return self.evals.get("main", _EMPTY)

    @property
    def is_search(self) -> bool:
        return bool(self.shift.step or self.loss_alpha.step)

    @property
    def budget_gap(self) -> float | None:
        """Largest |sum_i n_i p_i - budget| / budget over the run (None without both series)."""
        if not (self.expected_params.step and self.budget.step):
            return None
        bud = dict(zip(*self.budget))
        last = self.budget.value[-1]
        return max(abs(v - bud.get(s, last)) / (bud.get(s, last) or 1.0) for s, v in zip(*self.expected_params))


_TRAJ_FIELDS = ("loss_w", "loss_alpha", "loss", "lr", "shift", "expected_params", "budget",
                "gate_entropy", "gates_open", "p_max", "p_median", "p_kept_min", "derived_kept")

# The shift controller holds sum_i n_i p_i at the budget to solver precision: below this
# relative gap the expected-parameters panel could only draw two equal flat lines.
HELD = 0.005


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def trajectory(records: Iterable[dict]) -> Trajectory:
    """Collect the series of history records; missing keys and non-finite values are skipped.

    A record without "step" takes the previous record's step (or its index if none yet). In
    ``derived_params_by_kind`` a kind missing from a record has 0 parameters at that step.
    """
    pts: dict[str, list[tuple[float, float]]] = defaultdict(list)
    evals: dict[str, list[tuple[float, float]]] = defaultdict(list)
    derived: list[tuple[float, dict]] = []
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
        by_kind = rec.get("derived_params_by_kind")
        if isinstance(by_kind, dict):
            derived.append((step, {str(k): v for k, v in by_kind.items() if _number(v) is not None}))

    def series(p):
        return Series(tuple(a for a, _ in p), tuple(b for _, b in p))

    kinds = sorted({k for _, d in derived for k in d}, key=_kind_key)
    return Trajectory(**{f: series(pts[f]) for f in _TRAJ_FIELDS},
                      evals={k: series(v) for k, v in evals.items()},
                      derived_by_kind={k: Series(tuple(s for s, _ in derived),
                                                 tuple(float(d.get(k, 0.0)) for _, d in derived))
                                       for k in kinds})


def trajectory_panels(traj: Trajectory) -> tuple[str, ...]:
    """The panels worth drawing for a history, in order (what ``plot_trajectory`` draws).

    A search: "losses" (eval metric on a twin axis), then "budget" (expected parameters
    against the budget) only when they differ by more than ``HELD``, i.e. for the ``none`` and
    ``l0`` controllers; under the shift controller they are equal at every step, so "derived"
    (the parameters the derivation would keep at each step, per kind, against the budget)
    takes its place when recorded, and histories without it (older runs) draw neither;
    "shift" when the shift moved; "gates" (spread of p, the derivation's threshold,
    entropy). A retrain: "losses", "validation", "lr".
    """
    if traj.is_search:
        panels = ["losses"]
        gap = traj.budget_gap
        if traj.derived_by_kind and (gap is None or gap <= HELD):
            panels.append("derived")
        elif (gap is not None and gap > HELD) or (gap is None and traj.expected_params.step):
            panels.append("budget")  # held and nothing derived recorded (older runs): two equal lines, dropped
        if any(traj.shift.value):
            panels.append("shift")
        if traj.p_max.step or traj.gate_entropy.step or any(traj.gates_open.value):
            panels.append("gates")
        return tuple(panels)
    panels = ["losses"]
    if traj.evals:
        panels.append("validation")
    if traj.lr.step:
        panels.append("lr")
    return tuple(panels)


_TITLES = {"losses": "losses", "budget": "expected parameters", "derived": "derived structure",
           "shift": "shift b of the global sigmoid", "gates": "gates",
           "validation": "validation", "lr": "learning rate"}


def plot_trajectory(traj: Trajectory, axes=None, title: str | None = None):
    """Draw a search or retrain history, one panel per entry of ``trajectory_panels``.

    A search: losses (eval metric on a twin axis); the parameters of the structure derived at
    each step, stacked by kind, against the budget (or, when a controller lets it move, the
    expected parameters sum_i n_i p_i against the budget); the shift b; the spread of p with
    the derivation's threshold (entropy on a twin axis). A retrain: the training loss, the
    validation metrics and the learning rate. Panels without data say so.

    Args:
        axes: Axes to draw on (an array or a flat sequence, at least one per panel; spare ones
            are hidden); None draws a new figure (2 x 2 for four panels, else one row).
        title: figure title (only when drawing a new figure).
    Returns:
        the array of Axes (the given shape, else 2 x 2 for a search of 3 or 4 panels, else 1 x n).
    """
    import numpy as np

    panels = trajectory_panels(traj)
    if axes is None:
        # a search's legends need half a 12-inch figure per panel: 2 x 2 (a spare one hidden)
        rows, cols = (2, 2) if len(panels) == 4 or (traj.is_search and len(panels) == 3) else (1, len(panels))
        fig = _new_figure(12.0 if cols > 1 else 7.0, 7.5 if rows == 2 else 4.2)
        axes = np.asarray(fig.subplots(rows, cols, sharex=True, squeeze=False), dtype=object)
        fig.set_layout_engine("constrained")
        if title:
            fig.suptitle(title, fontsize=10)
    axes = np.asarray(axes, dtype=object)
    flat = list(axes.flat)
    if len(flat) < len(panels):
        raise ValueError(f"plot_trajectory needs {len(panels)} Axes for panels {', '.join(panels)}, "
                         f"got {len(flat)}")
    for a, name in zip(flat, panels):
        _DRAW[name](a, traj)
        a.grid(alpha=0.3)
        a.tick_params(labelsize=8, labelbottom=True)
        a.set_xlabel("step", fontsize=8.5)
    for a in flat[len(panels):]:
        a.set_axis_off()
    return axes


_BLUE, _RED, _GREEN, _PURPLE, _ORANGE, _GREY = "#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#222222"


def _line(a, s: Series, label, colour, **kw):
    if not s.step:
        return []
    kw.setdefault("lw", 1.2)
    return a.plot(s.step, s.value, label=label, color=colour, **kw)


def _twin(a, ylabel):
    t = a.twinx()
    t.set_ylabel(ylabel, fontsize=8.5)
    t.tick_params(labelsize=8)
    return t


def _finish(a, name, handles, what, ncol=None):
    a.set_title(_TITLES.get(name, name), fontsize=9.5, loc="left")
    if handles:
        # above the panel, right of its title: never on top of the curves
        a.legend(handles=handles, loc="lower right", bbox_to_anchor=(1.0, 1.0),
                 ncol=ncol or len(handles), fontsize=7.5, frameon=False, borderaxespad=0.2,
                 handlelength=1.5, columnspacing=1.0)
    else:
        a.text(0.5, 0.5, f"no {what} recorded", transform=a.transAxes, ha="center",
               va="center", color="#777777", fontsize=9)
        a.set_yticks([])


def _note(a, text):
    """A line of explanation inside the panel's top edge (panels leave headroom for it)."""
    a.text(0.015, 0.975, text, transform=a.transAxes, ha="left", va="top", fontsize=7.5, color="#444444",
           bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1.5}, zorder=5)


def _losses(a, traj: Trajectory):
    h = (_line(a, traj.loss_w, "loss D_w", _BLUE) + _line(a, traj.loss_alpha, "loss D_alpha", _RED)
         + _line(a, traj.loss, "train loss", _GREEN))
    if h:
        a.set_ylabel("loss", fontsize=8.5)
    if traj.is_search and traj.eval_main.step:  # a retrain has its own validation panel
        h += _twin(a, "validation: main metric").plot(*traj.eval_main, "o-", color=_GREY, ms=3, lw=1,
                                                      label="validation (soft gates)")
    _finish(a, "losses", h, "losses")


def _budget(a, traj: Trajectory):
    from matplotlib.ticker import FuncFormatter

    h = _line(a, traj.expected_params, "Σ n_i p_i", _BLUE)
    b = traj.budget
    if b.step:
        if len(set(b.value)) == 1:
            h.append(a.axhline(b.value[0], color=_RED, ls="--", lw=1.2, label="budget"))
        else:
            h += _line(a, b, "budget", _RED, ls="--")
    if h:
        a.set_ylim(0, 1.18 * max(traj.expected_params.value + b.value))
        a.set_ylabel("parameters", fontsize=8.5)
        a.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _human(v)))
        if traj.budget_gap is not None:
            _note(a, f"largest |Σ n_i p_i − budget| / budget: {_pct(traj.budget_gap)}")
    _finish(a, "budget", h, "expected parameters")


def _derived(a, traj: Trajectory):
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter

    kinds = list(traj.derived_by_kind)
    steps = next(iter(traj.derived_by_kind.values())).step
    base = [0.0] * len(steps)
    h = []
    for k in kinds:  # stacked: the top edge is the derived structure's size
        top = [x + v for x, v in zip(base, traj.derived_by_kind[k].value)]
        colour = kind_colour(k, kinds)
        a.fill_between(steps, base, top, step="post", color=colour, alpha=0.75, lw=0)
        h.append(Patch(facecolor=colour, alpha=0.75, label=k))
        base = top
    bud = traj.budget.value[-1] if traj.budget.step else None
    if bud:
        h.append(a.axhline(bud, color=_RED, ls="--", lw=1.2, label="budget"))
    a.set_ylim(0, 1.18 * max(base + [bud or 0.0, 1.0]))
    a.set_ylabel("parameters the derivation keeps", fontsize=8.5)
    a.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _human(v)))
    if traj.budget_gap is not None:  # why this panel stands where the expected size would
        _note(a, f"Σ n_i p_i = budget at every step (largest gap {_pct(traj.budget_gap)})")
    _finish(a, "derived", h, "derived structure")


def _shift(a, traj: Trajectory):
    h = _line(a, traj.shift, "shift b", _PURPLE)
    if h:
        a.set_ylabel("shift b", fontsize=8.5)
    _finish(a, "shift", h, "shift")


def _gates(a, traj: Trajectory):
    from matplotlib.ticker import MaxNLocator

    h = (_line(a, traj.p_max, "largest p", _BLUE) + _line(a, traj.p_kept_min, "smallest kept p", _GREEN)
         + _line(a, traj.p_median, "median p", _PURPLE))
    if h:
        a.set_ylabel("gate probability p", fontsize=8.5)
        lo = min(v for s in (traj.p_max, traj.p_kept_min, traj.p_median) for v in s.value)
        if lo > 0:
            from matplotlib.ticker import FuncFormatter

            a.set_yscale("log")  # p sits near the budget share: a linear 0..1 axis shows flat lines
            plain = FuncFormatter(lambda v, _: f"{v:.2g}")
            a.yaxis.set_major_formatter(plain)
            a.yaxis.set_minor_formatter(plain)
            a.tick_params(axis="y", which="minor", labelsize=7)
    elif any(traj.gates_open.value):  # histories before the derivation statistics
        h = _line(a, traj.gates_open, "gates p > 0.5", _GREEN, drawstyle="steps-post")
        a.set_ylabel("gates with p > 0.5", fontsize=8.5)
        a.yaxis.set_major_locator(MaxNLocator(integer=True))
        a.set_ylim(bottom=0)
    if traj.gate_entropy.step:
        if h:
            h += _line(_twin(a, "gate entropy"), traj.gate_entropy, "entropy", _ORANGE)
        else:  # nothing else recorded: the entropy gets the axis
            h = _line(a, traj.gate_entropy, "entropy", _ORANGE)
            a.set_ylabel("gate entropy", fontsize=8.5)
    _finish(a, "gates", h, "gate statistics")


def _validation(a, traj: Trajectory):
    h = []
    others = [k for k in traj.evals if k != "main"]
    for i, k in enumerate(others):
        h += _line(a, traj.evals[k], k, (_BLUE, _RED, _GREEN, _PURPLE, _ORANGE)[i % 5], marker="o", ms=2.5, lw=1)
    if traj.eval_main.step and not any(traj.evals[k] == traj.eval_main for k in others):
        h += _line(a, traj.eval_main, "main", _GREY, marker="o", ms=3)
    if h:
        a.set_ylabel("metric", fontsize=8.5)
        a.margins(y=0.25)  # headroom for the note
        best = max(range(len(traj.eval_main.value)), key=traj.eval_main.value.__getitem__, default=None)
        if best is not None:
            s, v = traj.eval_main.step[best], traj.eval_main.value[best]
            a.plot([s], [v], marker="*", ms=11, color=_RED, ls="none", zorder=4)
            _note(a, f"best main metric {v:.4f} at step {s:.0f} (★: the checkpoint kept)")
    _finish(a, "validation", h, "validation")


def _lr(a, traj: Trajectory):
    h = _line(a, traj.lr, "learning rate", _PURPLE)
    if h:
        from matplotlib.ticker import FuncFormatter

        a.set_ylabel("learning rate", fontsize=8.5)
        a.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.1e}" if v else "0"))  # no offset by the title
    _finish(a, "lr", h, "learning rate")


_DRAW = {"losses": _losses, "budget": _budget, "derived": _derived, "shift": _shift, "gates": _gates,
         "validation": _validation, "lr": _lr}
