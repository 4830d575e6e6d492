"""Pictures of a plan (matplotlib, the `plot` extra; imported only when drawing).

`plot_plan(plan, path)` draws, per group, a stacked bar of where its memory
goes — weights, live activations produced in the group, live activations
produced earlier and passing through (or consumed in) it, the largest buffer
— against the capacity line, with the bottleneck group and the lower bound
marked; below it, the graph in topological layers with every node coloured
by its group (nodes aggregated by block, e.g. ``block.3``, when there are
more than `MAX_NODES`).

`group_breakdown(plan)` gives those parts as numbers.  It is computed with
`cachefit.memory.group_sizes` on copies of the plan's table that keep one
kind of byte each, so the parts add up to the plan's sizes exactly and no
second definition of S(P) is written here.
"""

from __future__ import annotations

from pathlib import Path

import re
from dataclasses import dataclass, replace

import networkx as nx
import numpy as np

from .dot import group_colour
from .errors import InputError
from .memory import as_table, group_sizes, scale_activation
from .units import format_bytes

__all__ = ["GroupBreakdown", "group_breakdown", "plot_plan", "block_of", "MAX_NODES"]

#: Graphs with more nodes are drawn aggregated by block.
MAX_NODES = 150

#: Colours of the parts of a bar.
PART_COLOURS = {"weights": "#4C72B0", "produced": "#DD8452", "passing": "#F2C59B", "buffer": "#8C8C8C",
                "other": "#8172B3"}


@dataclass(frozen=True)
class GroupBreakdown:
    """Where each group's bytes go (lists of int, one entry per group).

    Attributes
    ----------
    weights : list of int
        Σ weight_bytes of the group's nodes.
    produced : list of int
        Live activations produced by the group's own nodes (liveness: the
        share f of them, rounded up; additive: all its activations).
    passing : list of int
        Live activations produced in earlier groups and consumed in or after
        this one (0 under the additive model).
    buffer : list of int
        The largest buffer (liveness) or Σ buffers (additive).
    other : list of int
        Whatever else the memory model counts (the size less the parts above;
        0 for the two models of DESIGN §4).
    """

    weights: list
    produced: list
    passing: list
    buffer: list
    other: list


def group_breakdown(plan):
    """The parts of every group's size (`GroupBreakdown`); they add up to ``plan.sizes``.

    Examples
    --------
    >>> import cachefit
    >>> g = cachefit.graphs.from_layers([{"name": "a", "weight_bytes": 10, "activation_bytes": 4},
    ...                                  {"name": "b", "weight_bytes": 10, "activation_bytes": 4}])
    >>> parts = group_breakdown(cachefit.plan(g, 20))
    >>> parts.weights, parts.produced, parts.passing, parts.buffer
    ([10, 10], [4, 4], [0, 4], [0, 0])
    """
    if not plan.ok or plan.graph is None:
        raise InputError("`plan` has no groups to break down (status "
                         f"{plan.status}{'' if plan.graph is not None else ', no graph'})")
    table = as_table(plan.graph)
    zero = np.zeros(table.n, dtype=np.int64)

    def only(**columns):
        kept = replace(table, weight=columns.get("weight", zero), activation=columns.get("activation", zero),
                       buffer=columns.get("buffer", zero), graph=None)
        return kept

    partitions, fraction = plan.partitions, plan.chunk_fraction
    weights = group_sizes(only(weight=table.weight), partitions, memory="additive")
    buffer = group_sizes(only(buffer=table.buffer), partitions, memory=plan.memory)
    own = group_sizes(only(activation=table.activation), partitions, memory="additive")
    if plan.memory == "liveness":
        live = group_sizes(only(activation=table.activation), partitions, memory="liveness", chunk_fraction=fraction)
        produced = [scale_activation(value, fraction) for value in own]
    else:
        live, produced = own, own
    passing = [total - mine for total, mine in zip(live, produced)]
    other = [size - w - b - a for size, w, b, a in zip(plan.sizes, weights, buffer, live)]
    return GroupBreakdown(weights, produced, passing, buffer, other)


def block_of(node):
    """The block a node id belongs to: ``name.N`` or ``name_N`` when its second part is a number.

    A tile (``v.tile.i``) belongs to the block of its parent ``v``; an id
    without a numbered second part is its own block.

    >>> block_of("block.3.attn"), block_of("blocks_6_conv2"), block_of("embed.tile.1"), block_of("lm_head")
    ('block.3', 'blocks_6', 'embed', 'lm_head')
    >>> block_of("linear.2.tile.17"), block_of("7")
    ('linear.2', '7')
    """
    node = re.sub(r"\.tile\.\d+$", "", str(node))
    match = re.match(r"([^._]+[._]\d+)(?:[._]|$)", node)
    return match.group(1) if match else node


def _unit(capacity):
    for name, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if capacity >= 2 * scale:
            return name, scale
    return "B", 1


def plot_plan(plan, path=None, *, title=None, max_nodes=MAX_NODES):
    """Draw `plan` (bars of every group's memory and the graph coloured by group); save to `path`.

    Parameters
    ----------
    plan : Plan
        A plan with groups (OPTIMAL or FEASIBLE) that carries its graph.
    path : str or Path, optional
        Where to save; the suffix picks the format (.png, .svg, .pdf).
    title : str, optional
        Defaults to the graph's ``name``.
    max_nodes : int
        Above this many nodes the graph is drawn aggregated by block.

    Returns
    -------
    matplotlib.figure.Figure

    Raises
    ------
    InputError
        A plan without groups, or matplotlib is not installed.
    """
    try:
        import matplotlib

        if path is not None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("drawing needs matplotlib: pip install 'cachefit[plot]'") from None
    parts = group_breakdown(plan)
    graph = plan.graph if isinstance(plan.graph, nx.DiGraph) else as_table(plan.graph).to_graph()
    name = title or graph.graph.get("name") or "plan"
    part = {node: index for index, group in enumerate(plan.partitions) for node in group}
    shown = _aggregate(graph, part) if graph.number_of_nodes() > max_nodes else graph
    if nx.is_directed_acyclic_graph(shown):
        position = _layers(shown)
    else:  # blocks that feed each other: one row in the node order
        position = {node: (index, 0.0) for index, node in enumerate(shown.nodes)}
    slots = max((abs(y) for _, y in position.values()), default=0)
    width = float(np.clip(6 + 0.12 * max(plan.k, len(position) / 4), 10, 16))
    graph_height = 0.45 + 0.3 * min(slots, 4)
    figure, (bars, drawing) = plt.subplots(2, 1, figsize=(width, 5.5 + 3 * graph_height),
                                           height_ratios=[1.6, graph_height], layout="constrained")
    _draw_bars(bars, plan, parts, name)
    _draw_graph(drawing, plan, graph, shown, position, part)
    if path is not None:
        _save(figure, path)
        plt.close(figure)
    return figure


#: the picture formats `plot_plan` writes, by file suffix
PICTURE_FORMATS = ("png", "svg", "pdf")


def _save(figure, path):
    """Render `figure` in the format its suffix names, then write it atomically (never over a device or FIFO)."""
    import io

    from .result import write_text_atomic

    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in PICTURE_FORMATS:
        raise InputError(f"`--plot` {str(path)!r}: the file name must end in .png, .svg or .pdf, got "
                         f"{('.' + suffix) if suffix else 'no suffix'}")
    buffer = io.BytesIO()
    figure.savefig(buffer, format=suffix, dpi=150)
    try:
        write_text_atomic(path, buffer.getvalue())
    except OSError as exc:
        raise InputError(f"`--plot` {str(path)!r}: cannot write the picture there: "
                         f"{exc.strerror or type(exc).__name__}; nothing was written") from None


def _draw_bars(axes, plan, parts, name):
    unit, scale = _unit(plan.capacity)
    positions = np.arange(plan.k)
    bottom = np.zeros(plan.k)
    labels = {"weights": "weights", "produced": "activations made in the group",
              "passing": "activations from earlier groups", "buffer": "buffer (workspace)", "other": "other"}
    for part, label in labels.items():
        values = np.asarray(getattr(parts, part), dtype=float) / scale
        if part == "other" and not values.any():
            continue
        axes.bar(positions, values, bottom=bottom, width=0.8 if plan.k < 200 else 1.0,
                 color=PART_COLOURS[part], label=label, linewidth=0)
        bottom += values
    capacity = plan.capacity / scale
    axes.axhline(capacity, color="#C44E52", linestyle="--", linewidth=1.5)
    worst = int(np.argmax(plan.sizes))
    right = worst < plan.k / 2  # the capacity's label away from the bottleneck's arrow
    axes.text(0.995 if right else 0.005, capacity, f"capacity {format_bytes(plan.capacity)}", color="#C44E52",
              va="bottom", ha="right" if right else "left", transform=axes.get_yaxis_transform(), fontsize=9)
    side = "center" if 0.2 * plan.k < worst < 0.8 * plan.k else ("left" if worst <= 0.2 * plan.k else "right")
    axes.annotate(f"bottleneck: group {worst}, {format_bytes(plan.bottleneck)} "
                  f"({100 * plan.bottleneck / plan.capacity:.1f} % of capacity)",
                  xy=(worst, plan.sizes[worst] / scale), xytext=(worst, capacity * 1.09), ha=side, fontsize=9,
                  arrowprops={"arrowstyle": "->", "color": "black"})
    axes.set_ylim(0, capacity * 1.3)
    axes.set_xlim(-0.6, plan.k - 0.4)
    axes.set_ylabel(f"memory per group ({unit})")
    axes.set_xlabel("group (execution order)")
    if plan.k > 40:
        step = int(np.ceil(plan.k / 20))
        axes.set_xticks(positions[::step])
    else:
        axes.set_xticks(positions)
    model = plan.memory + (f", chunk fraction {plan.chunk_fraction:.4g}" if plan.memory == "liveness" else "")
    axes.set_title(f"{name}: k = {plan.k}, lower bound {plan.lower_bound}, {plan.status}   "
                   f"({model}; solver {plan.solver})", fontsize=11, loc="left")
    axes.legend(loc="upper left", ncols=5, fontsize=8, frameon=False)


def _layers(graph):
    """{node: (layer, slot)}: topological generations, slots centred on 0."""
    position, rank = {}, {node: index for index, node in enumerate(graph.nodes)}
    for layer, nodes in enumerate(nx.topological_generations(graph)):
        order = sorted(nodes, key=rank.__getitem__)
        for slot, node in enumerate(order):
            position[node] = (layer, slot - (len(order) - 1) / 2)
    return position


def _aggregate(graph, part):
    """The block graph: a node per block (in first-seen order), members and the groups they fall in."""
    blocks = {}
    for node in graph.nodes:
        blocks.setdefault(block_of(node), []).append(node)
    of = {node: block for block, members in blocks.items() for node in members}
    quotient = nx.DiGraph()
    for block, members in blocks.items():
        groups = sorted({part[node] for node in members})
        quotient.add_node(block, members=len(members), groups=groups)
    quotient.add_edges_from((of[u], of[v]) for u, v in graph.edges if of[u] != of[v])
    return quotient


def _draw_graph(axes, plan, graph, shown, position, part):
    aggregated = shown is not graph
    for u, v in shown.edges:
        (x0, y0), (x1, y1) = position[u], position[v]
        axes.plot([x0, x1], [y0, y1], color="#B0B0B0", linewidth=0.6, zorder=1)
    if aggregated:
        _draw_blocks(axes, plan, shown, position)
    else:
        _draw_nodes(axes, plan, shown, position, part)
    layers = max(x for x, _ in position.values()) + 1
    slots = max(abs(y) for _, y in position.values())
    axes.set_xlim(-1, layers)
    axes.set_ylim(-slots - (2.6 if aggregated else 1.2), slots + 1.6)
    axes.set_yticks([])
    from matplotlib.ticker import MaxNLocator

    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("topological layer (→ execution)" + (f"; {graph.number_of_nodes()} nodes drawn as "
                                                          f"{shown.number_of_nodes()} blocks" if aggregated else ""))
    for side in ("top", "right", "left"):
        axes.spines[side].set_visible(False)
    axes.set_title(f"the graph, each node coloured by its group ({graph.number_of_nodes()} nodes, "
                   f"{graph.number_of_edges()} edges)", fontsize=10, loc="left")


def _draw_nodes(axes, plan, graph, position, part):
    nodes = list(graph.nodes)
    xs = [position[node][0] for node in nodes]
    ys = [position[node][1] for node in nodes]
    colours = [group_colour(part[node]) for node in nodes]
    size = 60 if len(nodes) <= 60 else 28
    axes.scatter(xs, ys, s=size, c=colours, edgecolors="black", linewidths=0.4, zorder=2)
    for index, group in enumerate(plan.partitions):  # the group's number above its first node
        x, y = position[group[0]]
        axes.annotate(str(index), (x, y), xytext=(0, 7), textcoords="offset points", ha="center",
                      fontsize=7 if plan.k > 30 else 8, color="black", zorder=3)
    seen, last_x = set(), None
    layers = max(xs) + 1
    bottom = min(ys)
    for node in nodes:  # landmarks: the first node of each block, below the drawing, never crowded
        block = block_of(node)
        x = position[node][0]
        if block in seen or (last_x is not None and x - last_x < layers / 40):
            continue
        seen.add(block)
        last_x = x
        axes.annotate(block, (x, bottom), xytext=(0, -10), textcoords="offset points", rotation=45, ha="right",
                      va="top", fontsize=7)


def _draw_blocks(axes, plan, quotient, position):
    largest = max(data["members"] for _, data in quotient.nodes(data=True))
    blocks = list(quotient.nodes(data=True))
    crowded = len(blocks) > 12
    every = max(1, -(-len(blocks) // 30))  # label at most about 30 blocks when crowded
    first_block_of = {}
    for index, (block, data) in enumerate(blocks):
        x, y = position[block]
        groups = data["groups"]
        height = 0.3 + 0.5 * data["members"] / largest
        stripes = groups[:: -(-len(groups) // 64)]  # at most 64 stripes, evenly sampled
        for stripe, group in enumerate(stripes):  # a stripe per group the block falls in, in execution order
            axes.add_patch(_rectangle(x - 0.35 + stripe * 0.7 / len(stripes), y - height / 2, 0.7 / len(stripes),
                                      height, group_colour(group)))
        for group in groups:
            first_block_of.setdefault(group, (x, y + height / 2))
        span = f"group {groups[0]}" if len(groups) == 1 else f"groups {groups[0]}–{groups[-1]}"
        if not crowded:
            axes.annotate(f"{block}\n{data['members']} nodes\n{span}", (x, y - height / 2), xytext=(0, -4),
                          textcoords="offset points", ha="center", va="top", fontsize=8)
        elif index % every == 0:
            axes.annotate(block, (x, y - height / 2), xytext=(0, -4), textcoords="offset points", ha="right",
                          va="top", rotation=45, fontsize=7)
    if crowded:  # each group's number above the block where it starts, never crowded
        last_x = None
        for group, (x, top) in sorted(first_block_of.items()):
            if last_x is None or x - last_x >= len(blocks) / 40:
                axes.annotate(str(group), (x, top), xytext=(0, 3), textcoords="offset points", ha="center",
                              fontsize=7)
                last_x = x


def _rectangle(x, y, width, height, colour):
    from matplotlib.patches import Rectangle

    return Rectangle((x, y), width, height, facecolor=colour, edgecolor="none", zorder=2)
