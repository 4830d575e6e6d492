"""The checker ties each stage's on-chip graph to the model, and resident K/V stays within exact integers."""

import json

import networkx as nx
import pytest

import cachefit
from cachefit import check
from cachefit.memory import group_sizes
from cachefit.result import graph_from_data, read_plan
from cachefit.solvers import SOLVERS


def chain(n=6):
    graph = nx.DiGraph()
    for index in range(n):
        graph.add_node(f"n{index}", weight_bytes=10**9, activation_bytes=10**9, buffer_bytes=5 * 10**8, flops=10)
        if index:
            graph.add_edge(f"n{index - 1}", f"n{index}")
    return graph


def tamper(data, change):
    """Apply `change` to every stage's on-chip graph and restate its sizes so that they agree with the edit."""
    for stage in data["stages"]:
        plan = stage["plan"]
        change(plan["graph"])
        sub = graph_from_data(plan["graph"])
        plan["sizes"] = [int(size) for size in group_sizes(sub, plan["partitions"], memory=plan["memory"],
                                                           chunk_fraction=plan["chunk_fraction"])]
        plan["bottleneck"] = max(plan["sizes"])
    return read_plan(json.dumps(data))


class TestOnChipGraphMatchesItsStage:
    def setup_method(self):
        self.plan = cachefit.plan(chain(), 5 * 10**9, devices=2, device_capacity=10**10, solver="dp")
        assert check(self.plan).ok

    def test_changed_activation_bytes_are_caught(self):
        def zero(graph):
            for node in graph["nodes"]:
                if node.get("op") != "stage_input":
                    node["activation_bytes"] = node["buffer_bytes"] = 0
        report = check(tamper(self.plan.to_dict(), zero))
        assert not report.ok
        assert "stage 0 on chip: node 'n0' has activation_bytes 0 B on chip, 1000000000 B in the model" in report.violations

    def test_dropped_edge_is_caught(self):
        def drop(graph):
            graph["edges"] = [edge for edge in graph["edges"] if edge["source"] not in ("n1", "n4")]
        report = check(tamper(self.plan.to_dict(), drop))
        assert "stage 0 on chip: the on-chip graph lacks the model's edge 'n1' -> 'n2'" in report.violations

    def test_tiled_stages_still_check(self):
        # Tiled nodes and their joins are not "kept as they are": the per-node comparison must skip them.
        graph = cachefit.instances.load("gpt2", batch=1, seq_len=16, granularity="op")
        plan = cachefit.plan(graph, "20MiB", devices=2, device_capacity="200MB", tile=True, solver="greedy")
        assert plan.ok
        assert any("tile" in data for group in plan.groups for _, data in group.graph.nodes(data=True))
        assert check(plan).ok


@pytest.mark.parametrize("memory", ["liveness+kv", "additive+kv"])
def test_resident_kv_beyond_int64_is_refused(memory):
    graph = nx.DiGraph()
    graph.add_node("a", weight_bytes=0, activation_bytes=2**62, buffer_bytes=0, kv_bytes=2**62)
    for name in ("greedy", "dp"):
        with pytest.raises(ValueError, match=r"add up beyond 2\*\*62 B"):
            SOLVERS[name](graph, 2**62, memory=memory)
