"""Tests for streaming chunks: `cachefit.chunks` and `plan(..., chunk_tokens=...)`."""

import networkx as nx
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

import cachefit
from cachefit import instances
from cachefit.chunks import ChunkChoice, choose_chunk_tokens, chunk_candidates, graph_tokens
from cachefit.cli import main
from cachefit.errors import InputError
from cachefit.graphs import tile
from cachefit.memory import LayerTable
from cachefit.solvers import greedy


def streamed_chain(weights, activations, *, batch=2, seq_len=8):
    graph = nx.DiGraph(name="streamed", batch=batch, seq_len=seq_len)
    for index, (weight, activation) in enumerate(zip(weights, activations)):
        graph.add_node(str(index), weight_bytes=weight, activation_bytes=activation, buffer_bytes=0,
                       op="linear", out_features=16)
        if index:
            graph.add_edge(str(index - 1), str(index))
    return graph


class TestCandidates:
    def test_powers_of_two_and_the_whole(self):
        assert chunk_candidates(1) == [1]
        assert chunk_candidates(2) == [1, 2]
        assert chunk_candidates(12) == [1, 2, 4, 8, 12]
        assert chunk_candidates(128 * 10000)[-2:] == [2**20, 1_280_000]
        assert len(chunk_candidates(2**21)) == 22

    def test_graph_tokens(self):
        assert graph_tokens(nx.DiGraph(batch=3, seq_len=5)) == 15
        with pytest.raises(InputError, match=r"`chunk_tokens` needs the graph attributes `batch` and "
                                              r"`seq_len`.*the graph's `batch` is None"):
            graph_tokens(nx.DiGraph(seq_len=5))
        with pytest.raises(InputError, match=r"the graph's `seq_len` is 0"):
            graph_tokens(nx.DiGraph(batch=1, seq_len=0))


class TestChoose:
    def test_fewest_groups_largest_chunk_among_ties(self):
        graph = streamed_chain([40, 40, 40], [64, 64, 64])  # 16 tokens
        choice = choose_chunk_tokens(graph, 130)
        assert isinstance(choice, ChunkChoice)
        # recompute every probe independently
        expected = {}
        for chunk in [1, 2, 4, 8, 16]:
            plan = greedy(graph, 130, chunk_fraction=chunk / 16)
            expected[chunk] = plan.k if plan.ok else None
        assert dict(choice.probes) == expected
        best = min(k for k in expected.values() if k is not None)
        assert choice.k == best
        assert choice.chunk_tokens == max(c for c, k in expected.items() if k == best)
        assert choice.chunk_fraction == choice.chunk_tokens / 16 and choice.tokens == 16

    def test_additive_model_ignores_chunks_and_keeps_the_whole_batch(self):
        graph = streamed_chain([40, 40, 40], [64, 64, 64])
        choice = choose_chunk_tokens(graph, 300, memory="additive")
        assert choice.chunk_tokens == 16
        assert len({k for _, k in choice.probes}) == 1

    def test_nothing_fits(self):
        choice = choose_chunk_tokens(streamed_chain([500], [8]), 100)
        assert (choice.chunk_tokens, choice.k) == (1, None)
        assert all(k is None for _, k in choice.probes)

    def test_with_tiling(self):
        graph = streamed_chain([500, 300], [64, 64])
        without = choose_chunk_tokens(graph, 200)
        assert without.k is None
        with_tiles = choose_chunk_tokens(graph, 200, tile=True)
        assert with_tiles.k is not None
        fraction = with_tiles.chunk_fraction
        plan = greedy(tile(graph, 200, chunk_fraction=fraction), 200, chunk_fraction=fraction)
        assert plan.k == with_tiles.k

    def test_errors(self):
        graph = streamed_chain([1], [1])
        with pytest.raises(InputError, match=r"`solver` must be one of"):
            choose_chunk_tokens(graph, 10, solver="magic")
        with pytest.raises(InputError, match=r"`memory` must be one of"):
            choose_chunk_tokens(graph, 10, memory="peak")
        with pytest.raises(InputError, match=r"got a LayerTable"):
            choose_chunk_tokens(LayerTable.chain([1]), 10)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(weights=st.lists(st.integers(0, 100), min_size=1, max_size=6),
       activation=st.integers(0, 64), capacity=st.integers(1, 400), seq_len=st.integers(1, 40))
def test_property_greedy_k_never_rises_as_the_chunk_shrinks(weights, activation, capacity, seq_len):
    """The monotonicity that makes greedy probing sound: smaller f, no more groups."""
    graph = streamed_chain(weights, [activation * seq_len] * len(weights), batch=1, seq_len=seq_len)
    choice = choose_chunk_tokens(graph, capacity)
    ks = [k for _, k in choice.probes]
    finite = [k for k in ks if k is not None]
    assert finite == sorted(finite)  # k grows (or stays) with the chunk
    seen_none = False
    for k in ks:  # once a chunk is infeasible, every larger one is too
        seen_none = seen_none or k is None
        assert k is None or not seen_none


class TestPlanOptions:
    def test_chunk_tokens_sets_the_fraction_and_is_recorded(self):
        graph = streamed_chain([40, 40, 40], [64, 64, 64])
        plan = cachefit.plan(graph, 130, chunk_tokens=4)
        assert plan.chunk_fraction == 0.25 and plan.stats["chunk_tokens"] == 4
        assert cachefit.check(plan).ok

    def test_auto(self):
        graph = streamed_chain([40, 40, 40], [64, 64, 64])
        plan = cachefit.plan(graph, 130, chunk_tokens="auto")
        choice = choose_chunk_tokens(graph, 130)
        assert plan.stats["chunk_tokens"] == choice.chunk_tokens
        assert plan.stats["chunk_probes"] == {str(c): k for c, k in choice.probes}
        assert plan.k == choice.k and cachefit.check(plan).ok

    def test_both_chunk_options_is_an_error(self):
        graph = streamed_chain([1], [1])
        with pytest.raises(InputError, match=r"give `chunk_tokens` or `chunk_fraction`, not both"):
            cachefit.plan(graph, 10, chunk_fraction=0.5, chunk_tokens=2)

    @pytest.mark.parametrize("bad", [0, 17, 2.5, "four", True])
    def test_bad_chunk_tokens(self, bad):
        with pytest.raises(InputError, match=r"`chunk_tokens` must be 'auto' or an integer from 1 to "
                                              r"batch × seq_len = 16"):
            cachefit.plan(streamed_chain([1], [1]), 10, chunk_tokens=bad)

    def test_graph_without_batch(self):
        graph = cachefit.graphs.from_layers([1, 2])
        with pytest.raises(InputError, match=r"`chunk_tokens` needs the graph attributes"):
            cachefit.plan(graph, 10, chunk_tokens=1)

    def test_bad_tile_flag(self):
        with pytest.raises(InputError, match=r"`tile` must be True or False, got 'yes'"):
            cachefit.plan(streamed_chain([1], [1]), 10, tile="yes")


class TestPaperModels:
    def test_paper_4x15gb(self):
        graph = instances.load("paper-4x15gb")
        plan = cachefit.plan(graph, "h100-l2", tile=True, chunk_tokens="auto")
        assert plan.ok and cachefit.check(plan).ok
        # 15 GB per layer over 16,384 output units: 57 units (52.2 MB) per tile fit 50 MiB, 58 do not
        assert plan.stats["tiles"] == 4 * 288 and plan.stats["chunk_tokens"] == 2
        # no plan at all with the whole batch resident: 41.9 GB of activations per layer
        assert plan.stats["chunk_probes"]["1280000"] is None

    def test_paper_shape(self):
        plan = cachefit.plan(instances.load("paper-shape"), "h100-l2", tile=True, chunk_tokens="auto")
        assert plan.ok and cachefit.check(plan).ok
        assert plan.stats["expanded_blocks"] == 4


class TestCommandLine:
    def test_tile_and_auto_chunk(self, tmp_path):
        path = tmp_path / "p.json"
        result = CliRunner().invoke(main, ["plan", "paper-shape", "--capacity", "h100-l2", "--tile",
                                           "--chunk-tokens", "auto", "--json", str(path)])
        assert result.exit_code == 0, result.output
        assert "split 4 whole-block node(s) into their operators; tiled 8 node(s) into 24 tiles" in result.output
        assert "chunk: 64 of 1,280,000 tokens per pass" in result.output
        check = CliRunner().invoke(main, ["check", str(path)])
        assert check.exit_code == 0 and "ok" in check.output

    def test_fixed_chunk(self):
        result = CliRunner().invoke(main, ["plan", "paper-4x15gb", "--capacity", "h100-l2", "--tile",
                                           "--chunk-tokens", "1"])
        assert result.exit_code == 0, result.output
        assert "chunk: 1 of 1,280,000 tokens per pass" in result.output

    def test_bad_chunk_tokens_exit_2(self):
        result = CliRunner().invoke(main, ["plan", "paper-4x15gb", "--capacity", "h100-l2",
                                           "--chunk-tokens", "lots"])
        assert result.exit_code == 2
        assert "`--chunk-tokens` must be a positive integer or 'auto'" in result.output

    def test_untiled_is_infeasible_exit_1(self):
        result = CliRunner().invoke(main, ["plan", "paper-4x15gb", "--capacity", "h100-l2"])
        assert result.exit_code == 1
        assert "INFEASIBLE" in result.output
