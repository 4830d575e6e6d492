"""`write_dot`: a plan as Graphviz DOT, one cluster per group (no dependencies).

Render it with ``dot -Tsvg plan.dot -o plan.svg``.  Every id and label is a
double-quoted DOT string with backslashes, quotes and line breaks escaped,
so node ids may hold any text.
"""

from __future__ import annotations

import networkx as nx

from .errors import InputError
from .memory import as_table
from .result import write_text_atomic
from .units import format_bytes

__all__ = ["plan_to_dot", "write_dot", "quote", "GROUP_COLOURS"]

#: Group colours (matplotlib's "tab20" cycle), shared with `cachefit.plot`.
GROUP_COLOURS = ("#1f77b4", "#aec7e8", "#ff7f0e", "#ffbb78", "#2ca02c", "#98df8a", "#d62728", "#ff9896",
                 "#9467bd", "#c5b0d5", "#8c564b", "#c49c94", "#e377c2", "#f7b6d2", "#7f7f7f", "#c7c7c7",
                 "#bcbd22", "#dbdb8d", "#17becf", "#9edae5")


def group_colour(index):
    """The colour of group `index`: the ten strong tab20 colours, then the ten light ones, repeating.

    Neighbouring groups always get different hues.

    >>> group_colour(0), group_colour(1), group_colour(10), group_colour(20)
    ('#1f77b4', '#ff7f0e', '#aec7e8', '#1f77b4')
    """
    return GROUP_COLOURS[(2 * index) % 20 + (index // 10) % 2]


def quote(text):
    r"""`text` as a double-quoted DOT string.

    >>> print(quote('a "b" \\ c'))
    "a \"b\" \\ c"
    >>> print(quote("two\nlines"))
    "two\nlines"
    """
    escaped = str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\r", "").replace("\n", "\\n")
    return f'"{escaped}"'


def plan_to_dot(plan, *, name=None):
    """The DOT text of `plan`: its groups as clusters (label: index, size, % of capacity), its edges.

    Examples
    --------
    >>> import cachefit
    >>> g = cachefit.graphs.from_layers([{"name": 'x"1', "weight_bytes": 30}, {"name": "y", "weight_bytes": 30}])
    >>> print(plan_to_dot(cachefit.plan(g, 40)), end="")  # doctest: +ELLIPSIS
    digraph "layers" {
      ...
      subgraph "cluster_0" {
        label="group 0: 30 B, 75.0 % of 40 B";
        ...
        "x\\"1" [label="x\\"1\\n30 B", fillcolor="#1f77b4"];
      }
      ...
      "x\\"1" -> "y";
    }
    """
    if not plan.ok or plan.graph is None:
        raise InputError(f"`plan` has no groups to write (status {plan.status})")
    graph = plan.graph if isinstance(plan.graph, nx.DiGraph) else as_table(plan.graph).to_graph()
    title = name or graph.graph.get("name") or "plan"
    lines = [f"digraph {quote(title)} {{",
             f"  label={quote(f'{title}: k = {plan.k}, lower bound {plan.lower_bound}, {plan.status}')};",
             "  labelloc=t; rankdir=TB; compound=true;",
             '  node [shape=box, style="rounded,filled", fontsize=10];']
    for index, group in enumerate(plan.partitions):
        size = plan.sizes[index]
        label = f"group {index}: {format_bytes(size)}, {100 * size / plan.capacity:.1f} % of {format_bytes(plan.capacity)}"
        lines += [f"  subgraph {quote(f'cluster_{index}')} {{", f"    label={quote(label)};",
                  '    style="rounded"; color="#888888";']
        colour = group_colour(index)
        for node in group:
            data = graph.nodes[node]
            node_label = f"{node}\n{format_bytes(int(data.get('weight_bytes', 0)))}"
            lines.append(f"    {quote(node)} [label={quote(node_label)}, fillcolor={quote(colour)}];")
        lines.append("  }")
    lines += [f"  {quote(u)} -> {quote(v)};" for u, v in graph.edges]
    lines.append("}")
    return "\n".join(lines) + "\n"


def write_dot(plan, path, *, name=None):
    """Write `plan_to_dot(plan)` to `path` (atomically); a failure is an InputError naming ``--dot``."""
    try:
        write_text_atomic(path, plan_to_dot(plan, name=name))
    except OSError as exc:
        raise InputError(f"`--dot` {str(path)!r}: cannot write the DOT file there: "
                         f"{exc.strerror or type(exc).__name__}; nothing was written") from None
