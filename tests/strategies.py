"""The core tests' graph draws, on top of the public `cachefit.testing` strategies.

`graphs` picks chains or DAGs; `capacities` draws a capacity around the
largest single node so that infeasible, exact-fit and loose cases all occur.
"""

from hypothesis import strategies as st

from cachefit.testing import chains, dags

SCALE = 100  # the byte scale the public strategies draw sizes around


def graphs(*, min_nodes=0, max_nodes=10, chain=False, activations=True, buffers=True):
    options = {"min_nodes": min_nodes, "max_nodes": max_nodes, "capacity": SCALE}
    if not activations:
        options["max_activation"] = 0
    if not buffers:
        options["max_buffer"] = 0
    return chains(**options) if chain else dags(**options)


@st.composite
def capacities(draw, graph):
    """A capacity around the largest single node, so exact fits and infeasible cases occur."""
    largest = max((d["weight_bytes"] + d["activation_bytes"] + d["buffer_bytes"] for _, d in graph.nodes(data=True)),
                  default=1)
    return draw(st.integers(max(1, largest // 2), 3 * largest + 1))
