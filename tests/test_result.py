import json

import networkx as nx
import pytest
from hypothesis import given, strategies as st

from cachefit import InputError, Plan, Status, check
from cachefit.graphs import from_layers
from cachefit.solvers import greedy
from strategies import capacities, graphs


class TestStatus:
    def test_compares_to_name(self):
        assert Status.OPTIMAL == "OPTIMAL" and str(Status.INFEASIBLE) == "INFEASIBLE"
        assert {s.value for s in Status} == {"OPTIMAL", "FEASIBLE", "INFEASIBLE", "UNKNOWN"}


class TestJson:
    def test_fields(self):
        plan = greedy(from_layers([10, 20, 30]), 30)
        data = json.loads(plan.to_json())
        assert data["format"] == "cachefit.plan" and data["version"] == 1
        for key in ("graph", "capacity", "memory", "chunk_fraction", "solver", "status", "k", "lower_bound",
                    "partitions", "sizes", "bottleneck", "wall_s"):
            assert key in data
        assert data["partitions"] == [["0", "1"], ["2"]] and data["status"] == "OPTIMAL"

    @given(st.data())
    def test_round_trip(self, data):
        g = data.draw(graphs(max_nodes=10))
        plan = greedy(g, data.draw(capacities(g)), memory=data.draw(st.sampled_from(["additive", "liveness"])))
        again = Plan.from_json(plan.to_json())
        assert again == plan
        assert check(again).ok == check(plan).ok
        assert nx.utils.graphs_equal(again.graph, g)

    def test_write_atomically(self, tmp_path):
        plan = greedy(from_layers([10, 20]), 30)
        path = tmp_path / "plan.json"
        text = plan.to_json(path)
        assert path.read_text() == text + "\n"
        assert Plan.from_json(path) == plan
        assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]

    def test_failed_write_leaves_nothing(self, tmp_path):
        plan = greedy(from_layers([10]), 30)
        with pytest.raises(OSError):
            plan.to_json(tmp_path / "missing-dir" / "plan.json")
        assert list(tmp_path.iterdir()) == []

    @pytest.mark.parametrize("text, message", [
        ("{not json", r"plan is not valid JSON"),
        ('{"format": "other"}', r'not a cachefit plan: expected "format": "cachefit.plan"'),
        ('{"format": "cachefit.plan", "version": 9}', r"unsupported plan version 9; this cachefit reads version 1"),
        ('{"format": "cachefit.plan", "version": 1}', r"plan field 'graph' is missing"),
    ])
    def test_bad_files(self, text, message):
        with pytest.raises(InputError, match=message):
            Plan.from_json(text)

    def test_wrong_field_type(self):
        data = json.loads(greedy(from_layers([10]), 30).to_json())
        data["k"] = "one"
        with pytest.raises(InputError, match=r"plan field 'k' has the wrong type: str"):
            Plan.from_json(json.dumps(data))
        data["k"] = 1
        data["status"] = "GREAT"
        with pytest.raises(InputError, match=r"plan field 'status' must be one of OPTIMAL, FEASIBLE"):
            Plan.from_json(json.dumps(data))

    def test_missing_file(self, tmp_path):
        with pytest.raises(InputError, match=r"cannot read plan file"):
            Plan.from_json(tmp_path / "nope.json")


class TestProperties:
    def test_balance_and_gap(self):
        plan = greedy(from_layers([10, 20, 30]), 30)
        assert plan.gap == 0 and plan.balance == pytest.approx(30 * 2 / 60)
        infeasible = greedy(from_layers([100]), 30)
        assert infeasible.gap is None and infeasible.balance is None and not infeasible.ok


class TestFromJsonValidatesTheGraph:
    def test_fractional_bytes_in_file(self):
        data = json.loads(greedy(from_layers([10, 20]), 30).to_json())
        data["graph"]["nodes"][0]["activation_bytes"] = 4.5
        with pytest.raises(InputError, match=r"node '0': `activation_bytes` must be a non-negative integer, got 4.5"):
            Plan.from_json(json.dumps(data))
