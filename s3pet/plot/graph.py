"""The structure as a graph of the residual stream: ``structure_graph`` builds it (networkx),
``graph_layout`` places it, ``plot_graph`` draws it."""

from __future__ import annotations

import math

from s3pet.plot.common import _code, _kind_entry, _kind_key, _role_key, _shows_rank, _stack_sort
from s3pet.plot.grids import structure_grid, structure_title
from s3pet.plot.read import _modules_of
from s3pet.plot.style import _light, _new_figure, _text_colour, _text_width, kind_colour


# Encoder-only and post-LN models: the norm follows its sublayer (only used to order the graph).
_POST_LN = frozenset({"bert", "roberta", "xlm-roberta", "electra", "distilbert", "albert",
                      "deberta", "deberta-v2", "camembert", "ernie", "mpnet", "bart", "marian",
                      "xlm", "flaubert", "mobilebert", "megatron-bert"})


def _sublayers(model_type: str | None, cross: bool) -> tuple[str, ...]:
    """Sublayers of a block in forward order (pre-LN unless the family is post-LN)."""
    post = (model_type or "").lower() in _POST_LN
    out: list[str] = []
    for s in ("attn", "xattn", "ffn") if cross else ("attn", "ffn"):
        out += [s, f"norm.{s}"] if post else [f"norm.{s}", s]
    return tuple(out)


def role_sublayer(role: str) -> str:
    """The sublayer a role's module attaches to: 'attn', 'xattn', 'ffn', 'norm.attn', ...,
    'in' (embedding norm), 'out' (final norm), or 'block' for unknown roles."""
    if role in ("norm.attn", "norm.xattn", "norm.ffn"):
        return role
    if role == "norm.emb":
        return "in"
    if role == "norm.final":
        return "out"
    head = role.split(".")[0]
    return head if head in ("attn", "xattn", "ffn") else "block"


_SUB_LABELS = {"attn": "attention", "xattn": "x-attention", "ffn": "FFN", "norm.attn": "norm",
               "norm.xattn": "norm", "norm.ffn": "norm"}


def module_label(kind: str, rank: float) -> str:
    """Graph label of a kept module: kind, plus the rank for kinds whose rank is searched."""
    if _shows_rank(kind, rank):
        return f"{kind} r{rank:g}"
    return kind


def structure_graph(structure: dict):
    """A networkx DiGraph of the model's residual stream with the kept modules attached.

    Nodes (attribute ``type``): ``"{stack}.in"`` (embeddings, "embed"), ``"{stack}.{i}"``
    (block i, "block"), ``"{stack}.{i}.{sublayer}"`` ("sublayer" or "norm"; sublayer in
    attn, xattn, ffn, norm.attn, norm.xattn, norm.ffn), ``"{stack}.out"`` ("output") and one
    "module" node per kept module (``"{site}:{kind}"``; attributes kind, rank, role, site,
    n_params, label). Edges (attribute ``type``): "residual" along the stream (in -> block ->
    its sublayers -> next block -> ... -> out), "delta" from a sublayer to each of its
    modules, and "cross" from the encoder output to each decoder cross-attention.

    Raises:
        StructureError: ``structure`` is not an s3pet structure.
    """
    import networkx as nx

    stacks, mods = _modules_of(structure)
    model_type = (structure.get("base_model") or {}).get("model_type")
    g = nx.DiGraph(title=structure_title(structure_grid(structure)), model_type=model_type)
    order = _stack_sort(stacks)
    g.graph["stacks"] = {s: stacks[s] for s in order}
    g.graph["sublayers"] = {}
    for s in order:
        cross = (s == "decoder" and "encoder" in stacks) or any(
            m.stack == s and m.role.startswith("xattn.") for m in mods)
        subs = _sublayers(model_type, cross)
        g.graph["sublayers"][s] = subs
        chain = [f"{s}.in"]
        g.add_node(f"{s}.in", type="embed", stack=s, layer=-1, label="embeddings")
        for i in range(stacks[s]):
            g.add_node(f"{s}.{i}", type="block", stack=s, layer=i, label=str(i))
            chain.append(f"{s}.{i}")
            for sub in subs:
                g.add_node(f"{s}.{i}.{sub}", type="norm" if sub.startswith("norm") else "sublayer",
                           stack=s, layer=i, sublayer=sub, label=_SUB_LABELS[sub])
                chain.append(f"{s}.{i}.{sub}")
        g.add_node(f"{s}.out", type="output", stack=s, layer=stacks[s], label="output")
        chain.append(f"{s}.out")
        nx.add_path(g, chain, type="residual")
    if "encoder" in stacks and "decoder" in stacks:
        for i in range(stacks["decoder"]):
            g.add_edge("encoder.out", f"decoder.{i}.xattn", type="cross")
    for m in mods:
        sub = role_sublayer(m.role)
        host = {"in": f"{m.stack}.in", "out": f"{m.stack}.out",
                "block": f"{m.stack}.{m.layer}"}.get(sub, f"{m.stack}.{m.layer}.{sub}")
        if host not in g:  # a role this block lacks, or a layer outside the blocks
            host = (f"{m.stack}.{m.layer}" if f"{m.stack}.{m.layer}" in g
                    else f"{m.stack}.in" if m.layer < 0 else f"{m.stack}.out")
        node, n = f"{m.site}:{m.kind}", 1
        while node in g:
            n += 1
            node = f"{m.site}:{m.kind}#{n}"
        g.add_node(node, type="module", stack=m.stack, layer=m.layer, role=m.role, kind=m.kind,
                   rank=m.rank, n_params=m.n_params, site=m.site, host=host,
                   label=module_label(m.kind, m.rank))
        g.add_edge(host, node, type="delta")
    return g


_CROSS = "#0072B2"  # frames of the encoder output and the cross-attentions reading it
# Graph layout units are inches: one sublayer column is _GX wide, one text line _GY high.
_GX, _GY = 0.85, 0.2


def graph_layout(graph) -> dict[str, tuple[float, float]]:
    """Deterministic positions (inches) for ``plot_graph``: one row per layer (embeddings on
    top, output at the bottom), the block then its sublayers left to right in forward order,
    each sublayer's modules listed under it; stacks side by side (encoder left)."""
    pos: dict[str, tuple[float, float]] = {}
    x0 = 0.0
    for s, n in graph.graph["stacks"].items():
        subs = graph.graph["sublayers"][s]
        y = 0.0
        for layer in range(-1, n + 1):
            if layer < 0:
                hosts = [f"{s}.in"]
            elif layer == n:
                hosts = [f"{s}.out"]
            else:
                hosts = [f"{s}.{layer}"] + [f"{s}.{layer}.{sub}" for sub in subs]
            depth = 0
            for j, h in enumerate(hosts):
                pos[h] = (x0 + j * _GX, y)
                kids = sorted((v for v in graph.successors(h)
                               if graph.nodes[v].get("type") == "module"),
                              key=lambda v: (_role_key(graph.nodes[v]["role"]),
                                             _kind_key(graph.nodes[v]["kind"]), v))
                for k, v in enumerate(kids, 1):
                    pos[v] = (x0 + j * _GX - 0.36 * _GX, y - k * _GY)
                depth = max(depth, len(kids))
            y -= (depth + 1.8) * _GY
        x0 += (len(subs) + 1) * _GX + 0.9
    return pos


def plot_graph(graph, ax=None):
    """Draw ``structure_graph`` output: one row per layer (embeddings on top, output at the
    bottom), the residual stream left to right through each block's sublayers and down to the
    next layer, kept modules listed under the sublayer they modify. Deterministic layout
    (``graph_layout``); the figure grows with the model. Returns the Axes."""
    from matplotlib.lines import Line2D

    pos = graph_layout(graph)
    xs = [p[0] for p in pos.values()]
    ys = [p[1] for p in pos.values()]
    kinds = sorted({d["kind"] for _, d in graph.nodes(data=True) if d.get("type") == "module"},
                   key=_kind_key)
    multi = len(graph.graph["stacks"]) > 1
    legend = [(_kind_entry(k), _light(kind_colour(k, kinds))) for k in kinds]
    legend.append(("block (its residual input)", "#3a3a3a"))
    if any(str(k).endswith(".block") for _, k in graph.nodes(data="role")):
        legend.append(("post = sequential adapter after the sublayer", None))
    if multi:
        legend.append(("encoder output, read by every x-attention", "cross"))
    # one inch per layout unit, so the text sizes fit the spacing at any model size
    w = max(xs) - min(xs) + 1.5
    h = max(ys) - min(ys) + 0.6
    width = max(w, 6.0)
    per_line = max(1, int(width // 2.2))
    legend_h = 0.2 * math.ceil(len(legend) / per_line) + 0.15
    title = graph.graph.get("title", "")
    title_h = 0.2 * (title.count("\n") + 1) + 0.15 if title else 0.0
    if ax is None:
        fig = _new_figure(width, h + legend_h + title_h)
        ax = fig.add_axes([0, 0, 1, h / (h + legend_h + title_h)])
        if title:
            fig.suptitle(title, fontsize=9, y=1 - 0.06 / fig.get_figheight(), va="top")
    x_min = min(xs) - 0.6 - (width - w) / 2
    ax.set_xlim(x_min, x_min + width)
    ax.set_ylim(min(ys) - 0.3, max(ys) + 0.3)
    ax.set_axis_off()
    nodes = graph.nodes
    half: dict[str, float] = {}

    def label(v):
        d = nodes[v]
        t = d["type"]
        if t == "block":
            return (d["stack"][:3] + " " if multi else "layer ") + str(d["layer"])
        if t == "module":
            role = d["role"]
            head, _, tail = role.partition(".")
            short = "post" if tail == "block" else ("" if head == "norm" else tail or role)
            code = _code(d["kind"])
            if _shows_rank(d["kind"], d["rank"]):
                code += f"{d['rank']:g}"
            return f"{short} {code}".strip()
        return d["label"] + (f" ({d['stack'][:3]})" if multi and t in ("embed", "output") else "")

    dark = dict(fc="#3a3a3a", ec="#3a3a3a", color="white")  # the residual stream's nodes
    styles = {"block": dark, "embed": dark, "output": dark,
              "sublayer": dict(fc="#e4e4e4", ec="#9a9a9a", color="black"),
              "norm": dict(fc="#f7f7f7", ec="#b0b0b0", color="#444444")}
    for v, (x, y) in pos.items():
        d = nodes[v]
        text = label(v)
        if d["type"] == "module":
            fc = _light(kind_colour(d["kind"], kinds))
            st = dict(fc=fc, ec="none", color=_text_colour([fc]))
            ax.text(x + 0.06, y, text, ha="left", va="center", fontsize=6.5, color=st["color"],
                    bbox=dict(boxstyle="round,pad=0.18", fc=st["fc"], ec=st["ec"]), zorder=3)
        else:
            st = dict(styles[d["type"]], lw=0.6)
            if any(e == "cross" for _, _, e in graph.out_edges(v, data="type")) or any(
                    e == "cross" for _, _, e in graph.in_edges(v, data="type")):
                st.update(ec=_CROSS, lw=1.3)
            ax.text(x, y, text, ha="center", va="center", fontsize=7, color=st["color"],
                    bbox=dict(boxstyle="round,pad=0.25", fc=st["fc"], ec=st["ec"], lw=st["lw"]),
                    zorder=3)
            half[v] = _text_width(text, 7) / 2 + 0.07

    arrow = dict(arrowstyle="-|>", color="#777777", lw=0.8, mutation_scale=7,
                 shrinkA=0, shrinkB=0)
    for u, v, d in graph.edges(data=True):
        if u not in pos or v not in pos:
            continue
        (x1, y1), (x2, y2) = pos[u], pos[v]
        if d.get("type") == "delta":
            # a bracket: down from the sublayer along the left of its module list
            ax.plot([x2, x2, x2 + 0.05], [y1 - 0.1, y2, y2], color="#aaaaaa", lw=0.6, zorder=1)
        elif d.get("type") == "cross":
            continue  # drawn as blue frames: lines to every decoder layer would cross it all
        elif abs(y1 - y2) < 1e-9:  # along a row
            ax.annotate("", xy=(x2 - half[v], y2), xytext=(x1 + half[u], y1),
                        arrowprops=arrow, zorder=2)
        elif abs(x1 - x2) < 1e-9:  # straight down (embeddings -> first block)
            ax.annotate("", xy=(x2, y2 + 0.09), xytext=(x1, y1 - 0.09), arrowprops=arrow,
                        zorder=2)
        else:  # to the next layer: right, down to the gap under the row, left, down
            xr = x1 + half[u] + 0.15
            yg = y2 + 0.75 * _GY
            ax.plot([x1 + half[u], xr, xr, x2], [y1, y1, yg, yg], color="#777777", lw=0.8,
                    zorder=1)
            ax.annotate("", xy=(x2, y2 + 0.09), xytext=(x2, yg), arrowprops=arrow, zorder=2)
    handles = []
    for text, colour in legend:
        if colour == "cross":
            handles.append(Line2D([], [], marker="s", ls="", ms=7, mfc="white", mec=_CROSS,
                                  mew=1.3, label=text))
        elif colour is None:
            handles.append(Line2D([], [], ls="", label=text))
        else:
            handles.append(Line2D([], [], marker="s", ls="", ms=7, mec="none", mfc=colour,
                                  label=text))
    left = (min(xs) - 0.6 - x_min) / width
    ax.legend(handles=handles, loc="lower left", bbox_to_anchor=(left, 1.0), ncol=per_line,
              fontsize=7, frameon=False, handlelength=1.0, columnspacing=1.2,
              borderaxespad=0.1)
    return ax
