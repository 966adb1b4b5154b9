"""Heatmap renderers: a structure (combined or per kind), an average of structures, gates."""

from __future__ import annotations

import math

from s3pet.errors import ConfigError, StructureError
from s3pet.plot.common import _code, _kind_entry, _shows_rank, ranked
from s3pet.plot.grids import GateGrid, StructureGrid, cell_label, gates_title, structure_title
from s3pet.plot.panels import (_boundaries, _col_width, _colour_bar, _heatmap_panels, _kind_legend,
                               _Panel, _result, _y_labels)
from s3pet.plot.style import _light, _text_colour, _text_width, kind_colour

KEPT = "#FF5A36"  # outline of the gate cells the derived structure keeps: stands out on all of viridis


def _panel(grid, s: str, title: str, roles: tuple[str, ...], cell, col_w: float | None = None) -> _Panel:
    """A panel of stack ``s`` with one column per role. ``cell(layer, role)`` gives a cell's
    (fills, text, text colour), or None to leave it empty; columns fit the texts unless
    ``col_w`` (inches) is given."""
    cells = {}
    for i, layer in enumerate(grid.layers[s]):
        for j, r in enumerate(roles):
            c = cell(layer, r)
            if c is not None:
                cells[(i, j)] = c
    return _Panel(title, roles, _y_labels(grid, s), cells,
                  _col_width(c[1] for c in cells.values()) if col_w is None else col_w,
                  _boundaries(grid.layers[s], grid.n_layers[s]))


def _kind_rows(grid, name, cell, col_w: float | None = None) -> list[list[_Panel]]:
    """Per-kind panels: one row per stack, one panel per kind present in it, titled
    ``name(kind)`` (after the stack when there are several). ``cell(key)`` is ``_panel``'s
    cell for key = (stack, layer, role, kind). Stacks without panels get no row."""
    rows = []
    for s in grid.stacks:
        row = []
        for kind in grid.kinds:
            roles = grid.roles_of(s, kind)
            if roles:
                title = f"{s}: {name(kind)}" if len(grid.stacks) > 1 else name(kind)
                row.append(_panel(grid, s, title, roles,
                                  lambda layer, r, s=s, k=kind: cell((s, layer, r, k)), col_w))
        if row:
            rows.append(row)
    return rows


def plot_structure(grid: StructureGrid, ax=None, mode: str = "combined"):
    """Draw a structure as a layers x roles heatmap.

    mode "combined": one panel per stack (encoder and decoder side by side), each cell split
    into one stripe per kind kept there and labelled with kind codes and ranks ("L2+B").
    "per-kind": one panel per (stack, kind), cells shaded by rank and labelled with it.

    Returns the Axes, or an array of Axes for several panels.

    Raises:
        ConfigError: unknown mode.
    """
    if mode == "per-kind":
        return _plot_per_kind(grid, ax, average=False)
    if mode != "combined":
        raise ConfigError(f"structure plot mode must be 'combined' or 'per-kind', not {mode!r}")

    def cell(s, layer, role):
        kinds = grid.cell(s, layer, role)
        if not kinds:
            return None
        fills = [_light(kind_colour(k, grid.kinds)) for k in kinds]
        return fills, cell_label(kinds), _text_colour(fills)

    panels = []
    for s in grid.stacks:
        name = (f"{s} ({grid.n_layers[s]} layers)" if len(grid.stacks) > 1
                else "kept modules: kind code + rank")
        panels.append(_panel(grid, s, name, grid.roles[s] or ("(none kept)",),
                             lambda layer, r, s=s: cell(s, layer, r)))
    legend_w = (max(_text_width(_kind_entry(k), 7.5) for k in grid.kinds) + 0.55
                if grid.kinds else 0.2)
    fig, axes, anchor = _heatmap_panels(ax, [panels], legend_w, structure_title(grid))
    if grid.kinds:
        _kind_legend(fig, grid.kinds, anchor)
    return _result(axes)


def _plot_per_kind(grid: StructureGrid, ax, average: bool):
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap

    # Blues without its white end, so that a module kept once in many still shows
    blues = colormaps["Blues"]
    cmap = ListedColormap([blues(0.15 + 0.85 * i / 255) for i in range(256)], name="kept")
    max_rank = {kind: max(v for k, v in grid.rank.items() if k[3] == kind) for kind in grid.kinds}

    def cell(key):
        if key not in grid.keep:
            return None
        kind, rank, keep = key[3], grid.rank[key], grid.keep[key]
        text = f"{rank:.2g}" if _shows_rank(kind, rank) else ""
        if average:
            colour, tcol = cmap(keep), "white" if keep > 0.55 else "black"
        else:
            # larger ranks darker, on a log scale (ranks are mostly powers of 2):
            # from 60% white (rank 1) to the kind's own colour (largest rank)
            top = max_rank[kind]
            frac = math.log(rank) / math.log(top) if top > 1 else 0.5
            colour = _light(kind_colour(kind, grid.kinds), 0.6 * (1 - frac))
            tcol = _text_colour([colour])
        return [colour], text, tcol

    rows = _kind_rows(grid, lambda kind: f"{kind} ({_code(kind)})", cell)
    if not rows:  # nothing kept: the combined plot shows the empty grid
        return plot_structure(grid, ax, mode="combined")
    title = structure_title(grid)
    if average:
        title += ("\ncolour: fraction of the structures keeping the module (white: none)"
                  " · number: mean rank when kept")
    else:
        fixed = [k for k in grid.kinds if not ranked(k)
                 and all(abs(v - 1) < 1e-9 for key, v in grid.rank.items() if key[3] == k)]
        title += "\nnumber and shade: rank" + (
            f" ({', '.join(fixed)}: rank 1, not written)" if fixed else "")
    fig, axes, anchor = _heatmap_panels(ax, rows, 1.1 if average else 0.1, title)
    if average:
        _colour_bar(fig, anchor, cmap, "fraction kept")
    return _result(axes)


def plot_average(grid: StructureGrid, ax=None):
    """Draw an averaged structure (``average_grid``): one panel per (stack, kind), each cell
    shaded by the fraction of structures keeping the module, labelled with its mean rank."""
    return _plot_per_kind(grid, ax, average=True)


def plot_gates(grid: GateGrid, ax=None):
    """Draw gate probabilities: one panel per (stack, kind), cells coloured by p on a fixed
    0..1 scale and labelled with it; blank cells have no candidate. Cells holding a module of
    the derived structure (``grid.kept``) are outlined. Returns Axes (or array)."""
    from matplotlib import colormaps

    cmap = colormaps["viridis"]

    def cell(key):
        p = grid.p.get(key)
        if p is None:
            return None
        return [cmap(p)], f"{p:.2f}", "black" if p > 0.6 else "white", KEPT if key in grid.kept else None

    rows = _kind_rows(grid, lambda kind: kind, cell, col_w=_col_width(["0.00"]))
    if not rows:
        raise StructureError("no gate probabilities to plot")
    title = gates_title(grid)
    fig, axes, anchor = _heatmap_panels(ax, rows, 0.9, title)
    _colour_bar(fig, anchor, cmap, f"{grid.agg} p")
    return _result(axes)
