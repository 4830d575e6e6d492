"""Pictures and Graphviz files of a plan: `cachefit.plot`, `cachefit.dot`, `cachefit show`."""

import re

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

import cachefit
from cachefit.cli import main
from cachefit.dot import plan_to_dot, quote
from cachefit.errors import InputError
from cachefit.loading import load_model
from cachefit.plot import block_of, group_breakdown
from cachefit.testing import dags


class TestGroupBreakdown:
    @settings(max_examples=60, deadline=None)
    @given(dags(max_nodes=8, capacity=100), st.sampled_from(["liveness", "additive"]),
           st.sampled_from([1.0, 0.5, 1 / 3]))
    def test_parts_add_up_to_the_sizes(self, graph, memory, fraction):
        plan = cachefit.plan(graph, 100, solver="greedy", memory=memory, chunk_fraction=fraction)
        if not plan.ok:
            return
        parts = group_breakdown(plan)
        for index, size in enumerate(plan.sizes):
            total = parts.weights[index] + parts.produced[index] + parts.passing[index] + parts.buffer[index]
            assert total + parts.other[index] == size
            assert parts.other[index] == 0  # the two models of DESIGN §4 have no other part
            assert min(parts.weights[index], parts.produced[index], parts.passing[index], parts.buffer[index]) >= 0
        if memory == "additive":
            assert not any(parts.passing)

    def test_a_skip_connection_passes_through(self):
        graph = cachefit.graphs.from_layers([{"name": name, "weight_bytes": 10, "activation_bytes": 4}
                                             for name in "abc"])
        graph.add_edge("a", "c")
        plan = cachefit.plan(graph, 22, solver="greedy")  # c alone: 10 + its 4 + a's 4 + b's 4
        assert plan.partitions == (("a",), ("b",), ("c",))
        parts = group_breakdown(plan)
        assert parts.passing == [0, 4, 8]  # a's output into b; a's and b's into c
        assert parts.produced == [4, 4, 4]

    def test_no_plan(self):
        graph = cachefit.graphs.from_layers([100])
        with pytest.raises(InputError, match="has no groups to break down"):
            group_breakdown(cachefit.plan(graph, 50))


def test_block_of():
    assert [block_of(node) for node in ("block.11.fc2", "layers_3_mlp", "linear.0.tile.287", "x", "final_norm")] \
        == ["block.11", "layers_3", "linear.0", "x", "final_norm"]


class TestPlot:
    @pytest.fixture(scope="class")
    def gpt2_plan(self):
        pytest.importorskip("matplotlib")
        return cachefit.plan(load_model("gpt2", granularity="op"), "50MiB", solver="greedy", tile=True,
                             chunk_tokens="auto")

    def test_png_and_svg(self, gpt2_plan, tmp_path):
        from cachefit.plot import plot_plan

        plot_plan(gpt2_plan, tmp_path / "plan.png")
        plot_plan(gpt2_plan, tmp_path / "plan.svg")
        assert (tmp_path / "plan.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        svg = (tmp_path / "plan.svg").read_text()
        assert "<svg" in svg and "lower bound" in svg

    def test_aggregated_by_block(self, gpt2_plan):
        from cachefit.plot import plot_plan

        figure = plot_plan(gpt2_plan, max_nodes=20)
        texts = [text.get_text() for axes in figure.axes for text in axes.texts]
        assert "block.3" in texts  # 15 blocks: names only, and each group's number where it starts
        assert figure.axes[1].get_xlabel().endswith("drawn as 15 blocks")
        import matplotlib.pyplot as plt
        plt.close(figure)

    def test_few_blocks_say_their_groups(self):
        from cachefit.plot import plot_plan

        plan = cachefit.plan(load_model("paper-4x15gb"), "h100-l2", solver="greedy", tile=True, chunk_tokens="auto")
        figure = plot_plan(plan)
        texts = [text.get_text() for text in figure.axes[1].texts]
        assert texts == [f"linear.{i}\n289 nodes\ngroups {288 * i}–{288 * i + 287}" for i in range(4)]
        import matplotlib.pyplot as plt
        plt.close(figure)

    def test_units_and_marks(self, gpt2_plan):
        from cachefit.plot import plot_plan

        figure = plot_plan(gpt2_plan)
        bars = figure.axes[0]
        assert bars.get_ylabel() == "memory per group (MiB)"
        assert bars.get_title(loc="left").startswith(f"gpt2: k = {gpt2_plan.k}, lower bound {gpt2_plan.lower_bound}")
        texts = [text.get_text() for text in bars.texts]
        assert "capacity 50.0 MiB" in texts and any(text.startswith("bottleneck: group") for text in texts)
        import matplotlib.pyplot as plt
        plt.close(figure)


class TestDot:
    def test_clusters_and_every_node_once(self):
        plan = cachefit.plan(load_model("gpt2", granularity="op"), "100MiB", solver="greedy")
        text = plan_to_dot(plan)
        assert text.count("subgraph \"cluster_") == plan.k
        declared = re.findall(r'^    "((?:[^"\\]|\\.)*)" \[label=', text, flags=re.M)
        assert sorted(declared) == sorted(plan.graph.nodes)
        assert text.count(" -> ") == plan.graph.number_of_edges()

    @given(st.text(min_size=1, max_size=12))
    def test_quote_round_trips(self, text):
        quoted = quote(text)
        assert quoted[0] == quoted[-1] == '"' and "\n" not in quoted
        body = quoted[1:-1]
        assert re.fullmatch(r'(?:[^"\\]|\\.)*', body)  # no bare quote ends the string early
        unescaped = re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), body)
        assert unescaped == text.replace("\r", "")


class TestCli:
    def test_plan_plot_dot_and_show(self, tmp_path):
        pytest.importorskip("matplotlib")
        runner = CliRunner()
        plan_file, png, dot = tmp_path / "plan.json", tmp_path / "plan.png", tmp_path / "plan.dot"
        result = runner.invoke(main, ["plan", "llama-3.1-8b", "--capacity", "h100-hbm", "--k", "2", "--json",
                                      str(plan_file), "--plot", str(png), "--dot", str(dot), "--quiet"])
        assert result.exit_code == 0, result.output
        assert png.exists() and dot.read_text().startswith('digraph "llama-3.1-8b"')
        again = tmp_path / "again.svg"
        shown = runner.invoke(main, ["show", str(plan_file), "--plot", str(again)])
        assert shown.exit_code == 0, shown.output
        assert "picture written to" in shown.output and again.read_text().lstrip().startswith("<?xml")

    def test_show_a_plan_without_groups(self, tmp_path):
        plan_file = tmp_path / "none.json"
        result = CliRunner().invoke(main, ["plan", "gpt2", "--capacity", "50MiB", "--json", str(plan_file)])
        assert result.exit_code == 1
        shown = CliRunner().invoke(main, ["show", str(plan_file), "--plot", str(tmp_path / "x.png")])
        assert shown.exit_code == 1
        assert not (tmp_path / "x.png").exists()
        planned = CliRunner().invoke(main, ["plan", "gpt2", "--capacity", "50MiB", "--dot", str(tmp_path / "x.dot")])
        assert planned.exit_code == 1 and not (tmp_path / "x.dot").exists()
        assert "nothing to draw: the plan is INFEASIBLE (no groups); no file written" in planned.output
        refused = CliRunner().invoke(main, ["plan", "gpt2", "--capacity", "1GiB", "--solver", "all", "--plot", "x.png"])
        assert refused.exit_code == 2

    def test_a_model_file_is_named_by_the_file(self, tmp_path):
        layers = tmp_path / "my_model.json"
        layers.write_text("[1000, 2000, 3000]")
        result = CliRunner().invoke(main, ["plan", str(layers), "--capacity", "4000"])
        assert result.output.startswith("my_model: 3 nodes")
