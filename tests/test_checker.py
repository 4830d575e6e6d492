from dataclasses import replace

import networkx as nx

from cachefit import Status, check
from cachefit.graphs import from_layers
from cachefit.solvers import greedy


def good_plan():
    return greedy(from_layers([{"weight_bytes": 10, "activation_bytes": 5}] * 4), 40)


class TestCheck:
    def test_good(self):
        report = check(good_plan())
        assert report.ok and bool(report) and report.violations == ()

    def test_detects_each_violation(self):
        plan = good_plan()
        g = plan.graph
        cases = {
            "missing node": replace(plan, partitions=plan.partitions[:-1]),
            "empty group": replace(plan, partitions=plan.partitions + ((),), k=plan.k + 1),
            "duplicate": replace(plan, partitions=plan.partitions + (plan.partitions[0],)),
            "unknown node": replace(plan, partitions=plan.partitions[:-1] + (plan.partitions[-1] + ("ghost",),)),
            "backwards": replace(plan, partitions=tuple(reversed(plan.partitions))),
            "wrong size": replace(plan, sizes=tuple(s - 1 for s in plan.sizes)),
            "over capacity": replace(plan, capacity=plan.bottleneck - 1),
            "wrong k": replace(plan, k=plan.k + 1),
            "wrong bottleneck": replace(plan, bottleneck=plan.bottleneck + 1),
            "bound above k": replace(plan, lower_bound=plan.k + 1),
            "order inside group": replace(plan, partitions=(tuple(reversed(plan.partitions[0])),)
                                          + plan.partitions[1:]),
        }
        expected = {
            "missing node": "node(s) in no group",
            "empty group": "group 2 is empty",
            "duplicate": "is listed in groups 0 and 2",
            "unknown node": "which is not in the graph",
            "backwards": "goes backwards",
            "wrong size": "differ from recomputed",
            "over capacity": "> capacity",
            "wrong k": "but the plan holds",
            "wrong bottleneck": "differs from the largest group",
            "bound above k": "exceeds k",
            "order inside group": "goes backwards inside group 0",
        }
        for name, bad in cases.items():
            report = check(bad, g)
            assert not report.ok, name
            assert any(expected[name] in v for v in report.violations), (name, report.violations)

    def test_no_plan_must_hold_nothing_and_say_why(self):
        plan = greedy(from_layers([100]), 30)
        assert plan.status == Status.INFEASIBLE and check(plan).ok
        assert not check(replace(plan, reason="")).ok
        assert not check(replace(plan, partitions=(("0",),))).ok

    def test_needs_a_graph(self):
        plan = replace(good_plan(), graph=None)
        assert check(plan).violations == ("the plan carries no graph and none was given",)
        assert check(plan, good_plan().graph).ok

    def test_recomputes_liveness_independently(self):
        g = nx.DiGraph()
        for name, a in (("a", 100), ("b", 0), ("c", 0)):
            g.add_node(name, weight_bytes=1, activation_bytes=a, buffer_bytes=0)
        g.add_edges_from([("a", "b"), ("b", "c"), ("a", "c")])
        plan = greedy(g, 300, memory="liveness", k=3)
        assert plan.sizes == (101, 101, 101)  # a's output passes through b's group to c
        assert check(plan).ok
