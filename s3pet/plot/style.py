"""Colours, text widths and figures shared by the renderers (matplotlib imported when called)."""

from __future__ import annotations

from typing import Sequence

# Each kind declares its colour (``DeltaKind.colour``; the first six are Okabe-Ito's, colour-blind
# safe), lightened in the renderers so black text stays legible. Kinds without one take these
# (Paul Tol's muted palette, picked to differ in hue from Okabe-Ito's).
_EXTRA_COLOURS = ("#999933", "#332288", "#882255", "#44AA99", "#999999", "#AA4499")


def _new_figure(width: float, height: float):
    """A Figure on an Agg canvas (no pyplot state, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _light(colour: str, amount: float = 0.35) -> tuple[float, float, float]:
    """Blend a colour with white so that black text on it stays readable."""
    from matplotlib.colors import to_rgb

    r, g, b = to_rgb(colour)
    return (r + (1 - r) * amount, g + (1 - g) * amount, b + (1 - b) * amount)


def _text_colour(fills) -> str:
    """Black on light fills, white on dark ones (mean relative luminance of the stripes)."""
    from matplotlib.colors import to_rgb

    def lum(c):
        r, g, b = (x / 12.92 if x <= 0.04045 else ((x + 0.055) / 1.055) ** 2.4 for x in to_rgb(c))
        return 0.2126 * r + 0.7152 * g + 0.0722 * b

    return "black" if sum(map(lum, fills)) / len(fills) > 0.18 else "white"


def _own_colour(kind: str) -> str:
    from s3pet.plot.common import _kind

    k = _kind(kind)
    return k.colour if k is not None else ""


def kind_colour(kind: str, kinds: Sequence[str] = ()) -> str:
    """Fixed colour of a kind (its own); kinds without one take spare colours in their order in ``kinds``."""
    if _own_colour(kind):
        return _own_colour(kind)
    extra = [k for k in kinds if not _own_colour(k)]
    i = extra.index(kind) if kind in extra else sum(map(ord, kind))
    return _EXTRA_COLOURS[i % len(_EXTRA_COLOURS)]


def _text_width(text: str, size: float) -> float:
    """Rough width in inches of ``text`` at font ``size`` (DejaVu Sans averages ~0.6 em)."""
    return len(text) * size * 0.6 / 72
