"""Plots of searched structures, gate probabilities and search trajectories.

Split in two, like Optuna's visualisation: a *compute* function turns run files into a
small NamedTuple of what to draw (pure Python, unit-tested on its values), and a *renderer*
draws it (``ax=None`` draws on a new Agg figure; it returns the Axes, or an array of Axes
for several panels). matplotlib and networkx are imported only when needed.

    grid = structure_grid(read_structure("run/structure.json"))
    ax = plot_structure(grid)                 # or plot_structure(grid, ax=my_ax)
    ax.figure.savefig("structure.png")

``plot_paths`` draws every plot that a run directory or structure file allows (the CLI).

Modules: ``read`` (run files), ``grids`` (structure and gate grids), ``trajectory``,
``graph``, ``heatmaps`` (renderers of the grids) on ``panels`` and ``style``, ``paths``
(``plot_paths``), ``common`` (roles; kinds' codes and order, asked of the kinds). Everything public is importable from
``s3pet.plot``.
"""

from __future__ import annotations

from s3pet.plot.common import ROLES, Key, kind_code, layer_label, ranked
from s3pet.plot.graph import graph_layout, module_label, plot_graph, role_sublayer, structure_graph
from s3pet.plot.grids import (GateGrid, StructureGrid, average_grid, cell_label, gate_grid, gates_title,
                              structure_grid, structure_title, task_label)
from s3pet.plot.heatmaps import plot_average, plot_gates, plot_structure
from s3pet.plot.paths import DPI, FORMATS, STAGES, plot_paths
from s3pet.plot.read import read_alphas, read_history, read_structure
from s3pet.plot.style import kind_colour
from s3pet.plot.trajectory import Series, Trajectory, plot_trajectory, trajectory, trajectory_panels

__all__ = [
    "DPI", "FORMATS", "ROLES", "STAGES", "GateGrid",
    "Key", "Series", "StructureGrid", "Trajectory", "average_grid", "cell_label", "gate_grid", "gates_title",
    "graph_layout",
    "kind_code", "kind_colour", "layer_label", "module_label", "plot_average", "plot_gates", "plot_graph", "plot_paths",
    "plot_structure", "plot_trajectory", "ranked", "read_alphas", "read_history", "read_structure", "role_sublayer",
    "structure_graph", "structure_grid", "structure_title", "task_label", "trajectory", "trajectory_panels",
]
