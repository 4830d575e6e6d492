"""Chunked prefill's K/V term: the formula, the engine against the checker's reference, and the chunk search."""

import dataclasses

import networkx as nx
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import cachefit
from cachefit.chunks import choose_chunk_tokens
from cachefit.errors import InputError
from cachefit.graphs.kv import chunk_tokens, node_kv_bytes_per_token, prefix_formula, prefix_tokens
from cachefit.instances import load
from cachefit.memory import MODELS, Intervals, LayerTable, group_sizes

GPT2_PER_TOKEN = 2 * 12 * 64 * 2  # 2 × kv_heads × head_dim × bf16 bytes


def _chain(per_token, *, seq_len=16, batch=1):
    """A chain a -> attn -> b whose middle node caches `per_token` K/V bytes per token."""
    g = nx.DiGraph(seq_len=seq_len, batch=batch)
    for name in ("a", "attn", "b"):
        g.add_node(name, weight_bytes=100, activation_bytes=64, buffer_bytes=0)
    g.nodes["attn"]["kv_bytes_per_token"] = per_token
    g.add_edges_from([("a", "attn"), ("attn", "b")])
    return g


class TestFormula:
    def test_gpt2_per_token(self):
        per_token = node_kv_bytes_per_token(load("gpt2"))
        assert len(per_token) == 12 and set(per_token.values()) == {GPT2_PER_TOKEN}
        op = node_kv_bytes_per_token(load("gpt2", granularity="op"))
        assert sorted(op) == sorted(f"block.{i}.attn" for i in range(12))

    def test_prefix_tokens(self):
        assert prefix_tokens(1024, 1, 64 / 1024) == 960          # s − c
        assert prefix_tokens(1000, 1, 300 / 1000) == 900         # last chunk starts at 3 × 300
        assert prefix_tokens(1024, 4, 1024 / 4096) == 0          # whole sequences per chunk
        assert prefix_tokens(1, 8, 1 / 8) == 0                   # decode: one token per sequence
        assert chunk_tokens(0.1, 10) == 1 and chunk_tokens(1 / 3, 6) == 2

    def test_formula_text(self):
        assert prefix_formula(GPT2_PER_TOKEN, 1024, 1, 16 / 1024) == (
            "3,072 B/token × 1,008 tokens before the last 16-token chunk of 1,024 = 3,096,576 B")
        assert prefix_formula(3072, 1024, 2, 0.5).startswith("0 B (chunks of 1,024 tokens")

    def test_mla_latent_width(self):
        g = load("deepseek-v2-lite", granularity="op")
        per_token = node_kv_bytes_per_token(g)
        config = g.graph["config"]
        assert set(per_token.values()) == {(config["kv_lora_rank"] + config["qk_rope_head_dim"]) * 2}

    @pytest.mark.parametrize("bad", [-1, 2.5, True, "8"])
    def test_bad_per_token_named(self, bad):
        g = _chain(bad)
        with pytest.raises(InputError, match=r"^node 'attn': `kv_bytes_per_token` must be a non-negative integer"):
            group_sizes(g, [["a", "attn", "b"]], memory="liveness+kv", chunk_fraction=0.25)

    def test_graph_without_seq_len_refused(self):
        g = _chain(8)
        del g.graph["seq_len"]
        with pytest.raises(InputError, match=r"^the graph's `seq_len` must be a positive integer"):
            group_sizes(g, [["a", "attn", "b"]], memory="liveness+kv", chunk_fraction=0.25)


class TestSizes:
    def test_resident_adds_the_prefix_streamed_does_not(self):
        g = _chain(10)  # c = 4 of 16: 12 tokens before the last chunk
        plain = group_sizes(g, [["a"], ["attn"], ["b"]], memory="liveness", chunk_fraction=0.25)
        resident = group_sizes(g, [["a"], ["attn"], ["b"]], memory="liveness+kv", chunk_fraction=0.25)
        assert [r - p for r, p in zip(resident, plain)] == [0, 10 * 12, 0]
        whole = group_sizes(g, [["a"], ["attn"], ["b"]], memory="liveness+kv", chunk_fraction=1.0)
        assert whole == group_sizes(g, [["a"], ["attn"], ["b"]], memory="liveness", chunk_fraction=1.0)

    def test_gpt2_per_group(self):
        g = load("gpt2", granularity="op")
        plan = cachefit.plan(g, "50MiB", solver="dp", memory="liveness+kv", chunk_tokens=64, tile=True)
        assert cachefit.check(plan).ok and plan.k == 7
        plain = group_sizes(plan.graph, plan.partitions, memory="liveness", chunk_fraction=plan.chunk_fraction)
        attention = [sum(1 for v in group if v.endswith(".attn")) for group in plan.partitions]
        assert [s - p for s, p in zip(plan.sizes, plain)] == [n * GPT2_PER_TOKEN * 960 for n in attention]

    def test_forged_size_caught(self):
        g = _chain(10)
        plan = cachefit.plan(g, 10_000, solver="dp", memory="liveness+kv", chunk_fraction=0.25)
        assert cachefit.check(plan).ok
        forged = dataclasses.replace(plan, sizes=(plan.sizes[0] - 120,), bottleneck=plan.sizes[0] - 120)
        assert any("differ from recomputed" in v for v in cachefit.check(forged).violations)

    @settings(max_examples=60, deadline=None)
    @given(st.data())
    @example(data=None)
    def test_engine_matches_reference(self, data):
        if data is None:  # pinned: a chunk that does not divide the sequence (c = 3 of 10, last chunk at 9)
            seq_len, batch, chunk, per_token, cuts = 10, 1, 3, [0, 5, 0, 7], [2]
        else:
            seq_len = data.draw(st.integers(1, 40))
            batch = data.draw(st.integers(1, 3))
            chunk = data.draw(st.integers(1, seq_len * batch))
            per_token = data.draw(st.lists(st.integers(0, 50), min_size=1, max_size=7))
            cuts = sorted(set(data.draw(st.lists(st.integers(1, max(1, len(per_token) - 1)), max_size=3))))
        n = len(per_token)
        g = nx.DiGraph(seq_len=seq_len, batch=batch)
        for index, value in enumerate(per_token):
            g.add_node(str(index), weight_bytes=5, activation_bytes=3 * index, buffer_bytes=index % 2,
                       kv_bytes_per_token=value, kv_bytes=index)
        g.add_edges_from((str(i), str(i + 1)) for i in range(n - 1))
        bounds = [0] + [c for c in cuts if c < n] + [n]
        groups = [[str(v) for v in range(s, e)] for s, e in zip(bounds, bounds[1:]) if e > s]
        group_of = {v: i for i, group in enumerate(groups) for v in group}
        fraction = chunk / (seq_len * batch)
        for memory in ("liveness+kv", "additive+kv"):
            reference = MODELS[memory].reference(g, groups, group_of, fraction)
            assert group_sizes(g, groups, memory=memory, chunk_fraction=fraction) == reference
            intervals = Intervals(LayerTable.from_graph(g), memory, fraction)
            spans = [(int(groups[i][0]), int(groups[i][-1]) + 1) for i in range(len(groups))]
            assert [intervals.size(s, e) for s, e in spans] == reference


class TestChunkSearch:
    def test_gpt2_50mib_chunk_changes(self):
        """Before the K/V term (streamed) 64 tokens; resident, the search trades chunk size for the prefix."""
        g = load("gpt2", granularity="op")
        streamed = choose_chunk_tokens(g, "50MiB", memory="liveness", tile=True)
        resident = choose_chunk_tokens(g, "50MiB", memory="liveness+kv", tile=True)
        assert (streamed.chunk_tokens, streamed.k) == (64, 6)
        assert (resident.chunk_tokens, resident.k) == (16, 6)
        assert dict(resident.probes)[64] == 7
