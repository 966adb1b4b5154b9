"""Heatmap panels drawn with rectangles at exact sizes in inches, legends and colour bars."""

from __future__ import annotations

from typing import Iterable, NamedTuple, Sequence

from s3pet.plot.common import _kind_entry, layer_label
from s3pet.plot.style import _light, _new_figure, _text_width, kind_colour


class _Panel(NamedTuple):
    """One heatmap panel: cells (row, col) -> (fill colours, one vertical stripe each; text;
    text colour[; outline colour]), drawn with rectangles so that a cell can hold several kinds.
    An outlined cell is framed and its text bold (the gate plot's kept modules)."""

    title: str
    x_labels: tuple[str, ...]
    y_labels: tuple[str, ...]
    cells: dict
    col_w: float                  # inches per column
    boundaries: tuple[int, ...]   # dashed lines under these rows (embedding / final rows)


_ROW_H = 0.24     # inches per heatmap row: fits 7 pt text with space to spare
_FONT = 7.0       # cell text
_TICK = 7.5       # tick labels
_PANEL_TITLE = 8.5


def _heatmap_panels(ax, rows: list[list[_Panel]], right: float, title: str | None):
    """Place and draw rows of panels with exact cell sizes in inches.

    Panels of one row share the layer labels (drawn on the first). The figure is as large as
    the panels need (centred under a wider title); ``right`` inches are kept free after the
    widest row for a legend or colour bar. With ``ax`` given, the panels split its area.

    Returns (figure, flat list of Axes, (x, y) figure fraction of the free area's top left).
    """
    title_lines = title.count("\n") + 1 if title else 0
    top_pad = 0.15 + 0.19 * title_lines
    panel_top = 0.3
    layout = []  # per row: [(x offset, width)], height, bottom margin
    for row in rows:
        x, slots, bottom = 0.0, [], 0.0
        for k, p in enumerate(row):
            labelled = k == 0 or p.y_labels != row[k - 1].y_labels
            if labelled:
                x += max(_text_width(t, _TICK) for t in p.y_labels) + 0.38
            w = len(p.x_labels) * p.col_w
            slots.append((x, w, labelled))
            # the next panel starts after this one and after its (left-aligned) title
            x += max(w, _text_width(p.title, _PANEL_TITLE) + 0.05) + 0.2
            lab = max(_text_width(t, _TICK) for t in p.x_labels)
            bottom = max(bottom, lab * 0.72 + 0.2)  # tick labels rotated by 45 degrees
        layout.append((slots, x, max(len(p.y_labels) for p in row) * _ROW_H, bottom))
    content_w = max(x for _, x, _, _ in layout) + right
    total_w = content_w
    if title:
        longest = max(len(line) for line in title.split("\n"))
        total_w = max(total_w, min(longest * 9.5 * 0.6 / 72 + 0.3, 16.0))
    total_w = max(total_w, 3.0)
    shift = (total_w - content_w) / 2
    total_h = top_pad + sum(panel_top + h + b for _, _, h, b in layout)

    if ax is None:
        fig = _new_figure(total_w, total_h)
        if title:
            fig.suptitle(title, fontsize=9.5, y=1 - 0.08 / total_h, va="top")

        def make(rect):
            return fig.add_axes(rect)

        def to_fig(xy):
            return xy
    else:
        fig = ax.figure
        ax.set_axis_off()
        if title:
            ax.set_title(title, fontsize=9.5)

        def make(rect):
            return ax.inset_axes(rect)

        def to_fig(xy):
            return tuple(fig.transFigure.inverted().transform(ax.transAxes.transform(xy)))

    flat = []
    y = total_h - top_pad
    for row, (slots, _, height, bottom) in zip(rows, layout):
        y -= panel_top
        for p, (x, w, labelled) in zip(row, slots):
            h = len(p.y_labels) * _ROW_H  # panels of a row are aligned at the top
            a = make([(x + shift) / total_w, (y - h) / total_h, w / total_w, h / total_h])
            _draw_panel(a, p, show_layers=labelled)
            flat.append(a)
        y -= height + bottom
    anchor = to_fig(((shift + content_w - right + 0.05) / total_w, 1 - top_pad / total_h
                     - panel_top / total_h))
    return fig, flat, anchor


def _draw_panel(ax, panel: _Panel, show_layers: bool = True):
    from matplotlib.patches import Rectangle

    n_rows, n_cols = len(panel.y_labels), len(panel.x_labels)
    outlines = []
    for (i, j), (fills, text, tcol, *outline) in panel.cells.items():
        w = 1.0 / max(len(fills), 1)
        for k, c in enumerate(fills):
            ax.add_patch(Rectangle((j + k * w, i), w, 1, facecolor=c, edgecolor="none"))
        if text:
            ax.text(j + 0.5, i + 0.53, text, ha="center", va="center", fontsize=_FONT,
                    color=tcol, fontweight="bold" if outline and outline[0] else "normal")
        if outline and outline[0]:
            outlines.append((i, j, outline[0]))
    for j in range(n_cols + 1):
        ax.axvline(j, color="#c8c8c8", lw=0.6)
    for i in range(n_rows + 1):
        ax.axhline(i, color="#c8c8c8", lw=0.6)
    for i in panel.boundaries:
        ax.axhline(i, color="#555555", lw=1.0, ls=(0, (3, 2)))
    for i, j, colour in outlines:  # over the grid lines
        ax.add_patch(Rectangle((j + 0.06, i + 0.08), 0.88, 0.84, facecolor="none", edgecolor=colour, lw=1.8,
                               zorder=3))
    ax.set_xlim(0, n_cols)
    ax.set_ylim(n_rows, 0)
    ax.set_xticks([j + 0.5 for j in range(n_cols)])
    ax.set_xticklabels(panel.x_labels, rotation=45, ha="right", rotation_mode="anchor",
                       fontsize=_TICK)
    ax.set_yticks([i + 0.5 for i in range(n_rows)])
    if show_layers:
        ax.set_yticklabels(panel.y_labels, fontsize=_TICK)
        ax.set_ylabel("layer", fontsize=_TICK)
    else:
        ax.set_yticklabels([])
    ax.tick_params(length=0, pad=3)
    for side in ax.spines.values():
        side.set_color("#888888")
    ax.set_title(panel.title, fontsize=_PANEL_TITLE, loc="left")


def _boundaries(layers: Sequence[int], n_layers: int) -> tuple[int, ...]:
    """Row positions of the lines between the embedding / final rows and the blocks."""
    out = []
    if layers and layers[0] < 0:
        out.append(1)
    if layers and layers[-1] >= n_layers:
        out.append(len(layers) - 1)
    return tuple(out)


def _col_width(labels: Iterable[str], size: float = _FONT) -> float:
    return max(0.42, max((_text_width(t, size) for t in labels), default=0) + 0.14)


def _kind_legend(fig, kinds: Sequence[str], anchor, title: str = "kind"):
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=_light(kind_colour(k, kinds)), edgecolor="#888888",
                     label=_kind_entry(k)) for k in kinds]
    fig.legend(handles=handles, loc="upper left", bbox_to_anchor=anchor, fontsize=7.5,
               title=title, title_fontsize=8, frameon=False, alignment="left")


def _colour_bar(fig, anchor, cmap, label: str):
    """A 0..1 colour bar in the free area right of the panels."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    fw, fh = fig.get_figwidth(), fig.get_figheight()
    x, y = anchor
    h = min(2.2, 0.75 * fh * y)
    cax = fig.add_axes([x + 0.1 / fw, y - h / fh, 0.14 / fw, h / fh])
    cb = fig.colorbar(ScalarMappable(norm=Normalize(0, 1), cmap=cmap), cax=cax)
    cb.set_ticks([0, 0.25, 0.5, 0.75, 1])
    cb.ax.tick_params(labelsize=7)
    cb.set_label(label, fontsize=7.5)


def _result(axes: list):
    import numpy as np

    return axes[0] if len(axes) == 1 else np.array(axes, dtype=object)


def _y_labels(grid, stack: str) -> tuple[str, ...]:
    return tuple(layer_label(x, grid.n_layers[stack]) for x in grid.layers[stack])
