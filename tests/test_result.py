import errno
import json
import os
import stat

import networkx as nx
import pytest
from hypothesis import given, strategies as st

from cachefit import InputError, Plan, Status, check
from cachefit.result import graph_from_data, write_text_atomic
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
        ('{"format": "cachefit.plan", "version": 9}',
         r"^unsupported plan version 9; this cachefit reads versions 1 and 2$"),
        ('{"format": "cachefit.plan", "version": 2}', r"^this is a two-level plan \(version 2"),
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


def _node_link(nodes, edges=()):
    return {"directed": True, "nodes": [{"id": node, "weight_bytes": 1, "activation_bytes": 0, "buffer_bytes": 0}
                                        for node in nodes],
            "edges": [{"source": u, "target": v} for u, v in edges]}


class TestNodeLinkIds:
    """Node ids are strings and unique: every plan file cachefit writes, cachefit reads back (issue 10)."""

    @pytest.mark.parametrize("bad", [True, 1, 1.5, None, ["a"]])
    def test_non_string_ids_refused(self, bad):
        with pytest.raises(InputError, match=r"nodes\[1\] has id .*; node ids must be strings$"):
            graph_from_data(_node_link(["a", bad]))

    def test_duplicate_ids_refused_not_merged(self):
        with pytest.raises(InputError, match=r"duplicate node id 'a' \(nodes\[2\]\)"):
            graph_from_data(_node_link(["a", "b", "a"]))

    @pytest.mark.parametrize("edge, end", [(("a", "zz"), "target 'zz'"), ((1, "a"), "source 1")])
    def test_edge_to_unlisted_node_refused(self, edge, end):
        with pytest.raises(InputError, match=rf"edges\[0\] {end} is not a listed node id"):
            graph_from_data(_node_link(["a", "b"], [edge]))

    @pytest.mark.parametrize("data, message", [
        ([1], r"must be node-link data \(an object"),
        ({"nodes": {}}, r"\"nodes\" and \"edges\" must be lists"),
        ({"nodes": [1]}, r"nodes\[0\] must be an object with an \"id\""),
        ({"nodes": [], "graph": []}, r"\"graph\" \(the graph's attributes\) must be an object"),
    ])
    def test_malformed(self, data, message):
        with pytest.raises(InputError, match=message):
            graph_from_data(data)

    def test_node_count_limit(self, monkeypatch):
        monkeypatch.setenv("CACHEFIT_MAX_NODES", "2")
        with pytest.raises(InputError, match=r"would make 3 nodes; cachefit plans graphs of at most 2 "
                                             r"\(set CACHEFIT_MAX_NODES"):
            graph_from_data(_node_link(["a", "b", "c"]))


class TestPlanFieldTypes:
    @pytest.mark.parametrize("key, value, message", [
        ("stats", [1], r"plan field 'stats' has the wrong type: list \(expected an object\)"),
        ("reason", 3, r"plan field 'reason' has the wrong type: int"),
        ("capacity", 1.5, r"plan field 'capacity' has the wrong type: float"),
        ("partitions", [[1]], r"plan field 'partitions' must be a list of lists of node ids"),
        ("graph", {"nodes": [{"id": 1}]}, r"node ids must be strings"),
    ])
    def test_wrong_types_refused(self, key, value, message):
        data = json.loads(greedy(from_layers([10]), 30).to_json())
        data[key] = value
        with pytest.raises(InputError, match=message):
            Plan.from_json(json.dumps(data))

    @pytest.mark.parametrize("text, message", [
        ('{"format": NaN}', r"not valid JSON: NaN is not a JSON number"),
        ("[" * 1000 + "]" * 1000, r"nested too deeply"),
        ('{"k": ' + "9" * 5000 + "}", r"a number has more digits than cachefit reads"),
    ])
    def test_hostile_json_text(self, text, message):
        with pytest.raises(InputError, match=message):
            Plan.from_json(text if text.startswith("{") else "{" + '"a": ' + text + "}")

    def test_not_a_regular_file(self):
        with pytest.raises(InputError, match=r"plan file '/dev/zero' is not a regular file"):
            Plan.from_json("/dev/zero")


class TestAtomicWrite:
    def test_keeps_existing_permissions(self, tmp_path):
        path = tmp_path / "plan.json"
        path.write_text("old")
        path.chmod(0o600)
        greedy(from_layers([10]), 30).to_json(path)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600 and Plan.from_json(path).k == 1

    def test_new_file_ordinary_permissions(self, tmp_path):
        umask = os.umask(0o022)
        try:
            greedy(from_layers([10]), 30).to_json(tmp_path / "plan.json")
        finally:
            os.umask(umask)
        assert stat.S_IMODE((tmp_path / "plan.json").stat().st_mode) == 0o644

    def test_missing_folder_names_the_target(self, tmp_path):
        target = tmp_path / "missing-dir" / "plan.json"
        with pytest.raises(FileNotFoundError) as raised:
            write_text_atomic(target, "x")
        assert raised.value.filename == str(target)

    def test_fsyncs_file_and_folder(self, tmp_path, monkeypatch):
        synced = []
        real_fsync = os.fsync
        monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(stat.S_ISDIR(os.fstat(fd).st_mode)), real_fsync(fd)))
        write_text_atomic(tmp_path / "plan.json", "x")
        assert synced == [False, True]

    def test_disk_full_leaves_old_file_and_no_temporary(self, tmp_path, monkeypatch):
        path = tmp_path / "plan.json"
        path.write_text("old")

        def full(fd):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(os, "fsync", full)
        with pytest.raises(OSError) as raised:
            write_text_atomic(path, "new")
        assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(path)
        assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["plan.json"]
