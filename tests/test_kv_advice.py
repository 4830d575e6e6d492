"""Under the ``+kv`` memory models: the oversize-node reason names the KV cache, advice and estimate treat
``liveness+kv`` like ``liveness`` for chunks, and advice offers streaming the cache."""

import pytest

import cachefit
from cachefit.advice import Suggestion, suggest
from cachefit.graphs import from_layers


def with_cache(kv_bytes, weight=300, activation=50):
    graph = from_layers([{"weight_bytes": weight, "activation_bytes": activation}] * 3)
    graph.graph.update(batch=1, seq_len=8)
    graph.nodes["1"]["kv_bytes"] = kv_bytes
    return graph


class TestOversizeReason:
    def test_cache_that_fills_the_capacity_is_not_told_to_tile(self):
        plan = cachefit.plan(with_cache(500), 450, memory="liveness+kv", solver="greedy")
        assert plan.status == "INFEASIBLE"
        assert plan.reason == (
            "node '1' needs 900 B (900 B) alone (weights 300 B + KV cache 500 B + buffer 0 B + live activations) "
            "> capacity 450 B (450 B); its KV cache alone fills the capacity and "
            "tiling does not split a KV cache: stream the cache (kv='streamed', memory without '+kv'), shorten the "
            "context or batch, or raise the capacity")

    def test_cache_below_the_capacity_tiling_splits_the_weights(self):
        plan = cachefit.plan(with_cache(500), 700, memory="additive+kv", solver="greedy")
        assert plan.reason == (
            "node '1' needs 850 B (850 B) alone (weights 300 B + KV cache 500 B + activation 50 B + buffer 0 B) "
            "> capacity 700 B (700 B); tiling splits its weights, not its KV cache: tile it (tile=True), stream the "
            "cache (kv='streamed', memory without '+kv') or raise the capacity")

    def test_weightless_node_with_a_cache(self):
        plan = cachefit.plan(with_cache(500, weight=0), 520, memory="liveness+kv", solver="greedy")
        assert plan.reason.endswith("> capacity 520 B (520 B); it has no weights to tile and tiling does not split "
                                    "a KV cache: stream the cache (kv='streamed', memory without '+kv'), shorten the "
                                    "context or batch, or raise the capacity")

    @pytest.mark.parametrize("memory", ["liveness", "additive"])
    def test_streamed_cache_keeps_the_old_reason(self, memory):
        plan = cachefit.plan(with_cache(10**6, weight=800), 700, memory=memory, solver="greedy")
        assert "KV cache" not in plan.reason and plan.reason.endswith("; tile it (tile=True) or raise the capacity")

    def test_every_solver_agrees(self):
        for solver in ("greedy", "dp", "brute"):
            plan = cachefit.plan(with_cache(500), 450, memory="liveness+kv", solver=solver)
            assert "KV cache 500 B" in plan.reason, solver


class TestAdvice:
    def test_liveness_kv_gets_chunks_and_streaming(self):
        graph = from_layers([{"weight_bytes": 300, "activation_bytes": 400}] * 3)
        graph.graph.update(batch=1, seq_len=8)
        graph.nodes["1"]["kv_bytes"] = 300
        advice = suggest(graph, 800, memory="liveness+kv")
        assert not advice.fits and advice.considered == ("tile", "chunk_tokens", "kv")
        assert [(suggestion.options(), suggestion.k) for suggestion in advice.suggestions] == [
            (["--chunk-tokens", "auto"], 3)]
        assert advice.suggestions[0].plan.memory == "liveness+kv"

    def test_streaming_the_cache_is_verified(self):
        advice = suggest(with_cache(700, weight=100), 600, memory="additive+kv")
        assert ["--kv", "streamed"] in [suggestion.options() for suggestion in advice.suggestions]
        streamed = next(s for s in advice.suggestions if s.options() == ["--kv", "streamed"])
        assert streamed.plan.memory == "additive" and streamed.plan.ok

    def test_options_order(self):
        assert Suggestion({"kv": "streamed", "tile": True}, None).options() == ["--tile", "--kv", "streamed"]


class TestEstimateChunks:
    @pytest.mark.parametrize("memory", ["liveness", "liveness+kv"])
    def test_chunked_liveness_plans_count_their_chunks(self, memory):
        graph = from_layers([{"weight_bytes": 300, "activation_bytes": 400, "flops": 1000}] * 3)
        graph.graph.update(batch=1, seq_len=8)
        plan = cachefit.plan(graph, 10_000, memory=memory, chunk_tokens=2, solver="greedy")
        assert plan.ok and plan.chunk_fraction == 0.25
        assert cachefit.estimate(plan, "h100").chunks == 4
