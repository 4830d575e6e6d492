"""Small local strategies for the core tests (cachefit.testing has the public ones)."""

import networkx as nx
from hypothesis import strategies as st

byte_values = st.one_of(st.just(0), st.integers(0, 100))


@st.composite
def graphs(draw, *, min_nodes=0, max_nodes=10, chain=False, activations=True, buffers=True):
    n = draw(st.integers(min_nodes, max_nodes))
    graph = nx.DiGraph(name="drawn")
    for index in range(n):
        graph.add_node(f"n{index}", weight_bytes=draw(byte_values),
                       activation_bytes=draw(byte_values) if activations else 0,
                       buffer_bytes=draw(byte_values) if buffers else 0)
    for index in range(1, n):
        if chain:
            graph.add_edge(f"n{index - 1}", f"n{index}")
        else:
            for source in draw(st.sets(st.integers(0, index - 1), max_size=3)):
                graph.add_edge(f"n{source}", f"n{index}")
    return graph


@st.composite
def capacities(draw, graph):
    """A capacity around the largest single node, so exact fits and infeasible cases occur."""
    largest = max((d["weight_bytes"] + d["activation_bytes"] + d["buffer_bytes"] for _, d in graph.nodes(data=True)),
                  default=1)
    return draw(st.integers(max(1, largest // 2), 3 * largest + 1))
