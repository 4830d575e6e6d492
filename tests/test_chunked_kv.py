"""Chunked prefill's K/V term: the formula, the engine against the checker's reference, and the chunk search."""

import dataclasses

import networkx as nx
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import cachefit
from cachefit.chunks import choose_chunk_tokens
from cachefit.errors import InputError
from cachefit.graphs.kv import (chunk_tokens, node_kv_bytes_per_token, node_prefix_bytes, prefix_formula,
                               prefix_formulas, prefix_tokens)
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

    @settings(max_examples=80, deadline=None)
    @given(st.data())
    @example(data=None)
    def test_engine_matches_reference(self, data):
        """Engine (group_sizes, Intervals) against the checker's reference, with and without windows, after a context."""
        if data is None:  # pinned: c = 3 of 10 (last chunk at 9); windows 1 (no earlier token), 30 > s, 4 < 9
            seq_len, batch, chunk, per_token, windows, cuts = 10, 1, 3, [0, 5, 7, 9], [None, 1, 30, 4], [2]
            context = 2  # the window of 4 then spans cache and prefix: 3 − min(2, 3) = 1 token more
        else:
            context = data.draw(st.integers(0, 80))
            seq_len = data.draw(st.integers(1, 40))
            batch = data.draw(st.integers(1, 3))
            chunk = data.draw(st.integers(1, seq_len * batch))
            per_token = data.draw(st.lists(st.sampled_from([0, 1, 4096, 8192, 10**9]), min_size=1, max_size=7))
            windows = data.draw(st.lists(st.one_of(st.none(), st.integers(1, 60)), min_size=len(per_token),
                                         max_size=len(per_token)))
            cuts = sorted(set(data.draw(st.lists(st.integers(1, max(1, len(per_token) - 1)), max_size=3))))
        n = len(per_token)
        g = nx.DiGraph(seq_len=seq_len, batch=batch, context=context)
        for index, (value, window) in enumerate(zip(per_token, windows)):
            g.add_node(str(index), weight_bytes=10**8, activation_bytes=3 * 10**8 * index, buffer_bytes=index % 2,
                       kv_bytes_per_token=value, kv_bytes=index)
            if window is not None:
                g.nodes[str(index)]["sliding_window"] = window
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


# ---------------------------------------------------------------------------
# sliding windows: a local layer's chunk attends to at most w − 1 earlier tokens
# ---------------------------------------------------------------------------

def _brute_prefix(seq_len, chunk, window):
    """Most earlier tokens any chunk's queries attend to, from HF's own mask (every query, every key)."""
    torch = pytest.importorskip("torch")
    masking = pytest.importorskip("transformers.masking_utils")
    mask_function = (masking.causal_mask_function if window is None
                     else masking.sliding_window_causal_mask_function(window))
    positions = torch.arange(seq_len)
    mask = mask_function(0, 0, positions[:, None], positions[None, :])  # mask[q, t]: query q attends to key t
    most, widest = 0, None
    for start in range(0, seq_len, chunk):
        earlier = mask[start:start + chunk, :start].any(dim=0).nonzero().flatten().tolist()
        if earlier:  # the earlier keys any query of this chunk reads: one contiguous run ending at start − 1
            assert earlier == list(range(earlier[0], start))
        if len(earlier) >= most:
            most, widest = len(earlier), (start, earlier)
    return most, widest


def _alone_prefix(graph, fraction, memory):
    """kv_prefix of every node, each in a group of its own: the +kv size less the plain one."""
    order = list(graph)
    groups = [[v] for v in order]
    plain = group_sizes(graph, groups, memory=memory.removesuffix("+kv"), chunk_fraction=fraction)
    resident = group_sizes(graph, groups, memory=memory, chunk_fraction=fraction)
    group_of = {v: i for i, v in enumerate(order)}
    reference = MODELS[memory].reference(graph, groups, group_of, fraction)
    assert reference == resident
    return {v: r - p - (graph.nodes[v].get("kv_bytes") or 0) for v, r, p in zip(order, resident, plain)}


GEMMA2_PER_TOKEN = 2 * 8 * 256 * 2  # gemma-2-9b: 8,192 B
MISTRAL_PER_TOKEN = 2 * 8 * 128 * 2  # mistral-7b: 4,096 B


class TestWindowedPrefix:
    @pytest.mark.parametrize("seq_len, chunk, window", [
        (64, 8, 16), (64, 8, 9), (64, 8, 8), (64, 8, 1), (64, 8, 2), (64, 1, 5), (64, 63, 5), (64, 64, 5),
        (100, 30, 45), (100, 30, 91), (100, 30, 92), (100, 30, 200), (100, 7, 13), (97, 10, 31), (50, 49, 3),
        (257, 16, 100), (257, 100, 256), (300, 64, None), (300, 7, None), (1000, 300, 512), (1000, 300, 901),
    ])
    def test_formula_is_the_mask(self, seq_len, chunk, window):
        """prefix_tokens = max over chunks of the earlier tokens HF's mask lets the chunk's queries read."""
        most, widest = _brute_prefix(seq_len, chunk, window)
        assert prefix_tokens(seq_len, 1, chunk / seq_len, window) == most
        g = _chain(GEMMA2_PER_TOKEN, seq_len=seq_len)
        if window is not None:
            g.nodes["attn"]["sliding_window"] = window
        for memory in ("liveness+kv", "additive+kv"):
            assert _alone_prefix(g, chunk / seq_len, memory)["attn"] == GEMMA2_PER_TOKEN * most
        if most:  # the largest is the last chunk's, its earliest key max(0, p − w + 1)
            start, earlier = widest
            assert start == chunk * (-(-seq_len // chunk) - 1)
            assert earlier[0] == (0 if window is None else max(0, start - window + 1))

    def test_gemma2_9b_alternating_layers_at_8192(self):
        """Local layers hold 4,095 tokens of K/V (w − 1), global ones all 7,168 before the last 1,024-token chunk."""
        g = load("gemma-2-9b", granularity="op", seq_len=8192)
        assert _brute_prefix(8192, 1024, 4096)[0] == 4095 and _brute_prefix(8192, 1024, None)[0] == 7168
        prefix = _alone_prefix(g, 1024 / 8192, "liveness+kv")
        attention = {v: b for v, b in prefix.items() if b}
        assert attention == {f"block.{i}.attn": GEMMA2_PER_TOKEN * (4095 if i % 2 == 0 else 7168) for i in range(42)}
        assert attention["block.0.attn"] == 33_546_240 and attention["block.1.attn"] == 58_720_256
        assert prefix_formula(GEMMA2_PER_TOKEN, 8192, 1, 1024 / 8192, window=4096) == (
            "8,192 B/token × 4,095 tokens (sliding window 4,096: w − 1 of the 7,168 before the last 1,024-token "
            "chunk of 8,192) = 33,546,240 B")

    def test_gemma2_9b_chunk_not_dividing_the_sequence(self):
        """c = 3,000 of 8,192: the last chunk starts at 6,000; local 4,095, global 6,000 tokens."""
        g = load("gemma-2-9b", seq_len=8192)
        fraction = 3000 / 8192
        assert _brute_prefix(8192, 3000, 4096)[0] == 4095 and _brute_prefix(8192, 3000, None)[0] == 6000
        prefix = _alone_prefix(g, fraction, "additive+kv")
        assert {prefix[f"block.{i}"] for i in range(0, 42, 2)} == {GEMMA2_PER_TOKEN * 4095}
        assert {prefix[f"block.{i}"] for i in range(1, 42, 2)} == {GEMMA2_PER_TOKEN * 6000}

    @pytest.mark.parametrize("seq_len, chunk, tokens", [(8192, 512, 4095), (8192, 4096, 4095), (4096, 512, 3584),
                                                        (2048, 256, 1792)])
    def test_mistral_every_layer(self, seq_len, chunk, tokens):
        """Every mistral-7b layer has w = 4,096; a sequence of ≤ 4,096 tokens never reaches the cap."""
        g = load("mistral-7b", seq_len=seq_len)
        assert _brute_prefix(seq_len, chunk, 4096)[0] == tokens
        prefix = _alone_prefix(g, chunk / seq_len, "liveness+kv")
        assert {v: b for v, b in prefix.items() if b} == {f"block.{i}": MISTRAL_PER_TOKEN * tokens for i in range(32)}

    def test_gemma3_1b_five_local_one_global(self):
        g = load("gemma-3-1b", granularity="op", seq_len=2048)
        per_token = 2 * 1 * 256 * 2
        prefix = _alone_prefix(g, 128 / 2048, "liveness+kv")
        assert _brute_prefix(2048, 128, 512)[0] == 511
        assert {v: b for v, b in prefix.items() if b} == {
            f"block.{i}.attn": per_token * (1920 if (i + 1) % 6 == 0 else 511) for i in range(26)}

    def test_window_beyond_the_sequence_changes_nothing(self):
        """gemma-2 at 2,048 tokens: w − 1 = 4,095 > 1,984, every layer holds the whole prefix."""
        g = load("gemma-2-9b", seq_len=2048)
        prefix = _alone_prefix(g, 64 / 2048, "liveness+kv")
        assert {prefix[f"block.{i}"] for i in range(42)} == {GEMMA2_PER_TOKEN * 1984}

    def test_plan_checks_and_forgery_caught(self):
        g = load("gemma-2-9b", seq_len=8192)
        plan = cachefit.plan(g, "2GiB", solver="greedy", memory="liveness+kv", chunk_tokens=1024)
        assert plan.ok and cachefit.check(plan).ok
        uncapped = GEMMA2_PER_TOKEN * (7168 - 4095)  # what a local layer would hold without its window
        local = next(i for i, group in enumerate(plan.partitions) if "block.0" in group)
        sizes = list(plan.sizes)
        sizes[local] += uncapped
        forged = dataclasses.replace(plan, sizes=tuple(sizes), bottleneck=max(sizes))
        assert any("differ from recomputed" in v for v in cachefit.check(forged).violations)

    @pytest.mark.parametrize("bad", [0, -4, 2.5, True, "4096"])
    def test_bad_window_named(self, bad):
        g = _chain(10)
        g.nodes["attn"]["sliding_window"] = bad
        with pytest.raises(InputError, match=r"^node 'attn': `sliding_window` must be a positive integer of tokens"):
            group_sizes(g, [["a", "attn", "b"]], memory="liveness+kv", chunk_fraction=0.25)


class TestWindowedChunkSearch:
    def test_gemma3_1b_groq_chunk_and_k_change(self):
        """The cap frees 22 of 26 layers' prefixes: 32 tokens and k = 10, where charging every layer its whole
        prefix (the windows left out, main's model before the cap) picks 64 tokens and needs k = 11."""
        g = load("gemma-3-1b", granularity="op", seq_len=8192)
        uncapped = g.copy()
        for _, data in uncapped.nodes(data=True):
            data.pop("sliding_window", None)
        capped = choose_chunk_tokens(g, "groq-lpu-sram", memory="liveness+kv", tile=True)
        before = choose_chunk_tokens(uncapped, "groq-lpu-sram", memory="liveness+kv", tile=True)
        assert (capped.chunk_tokens, capped.k) == (32, 10)
        assert (before.chunk_tokens, before.k) == (64, 11)
        assert all(k_capped <= k_before for (_, k_capped), (_, k_before) in zip(capped.probes, before.probes)
                   if k_capped is not None and k_before is not None)
        plan = cachefit.plan(g, "groq-lpu-sram", memory="liveness+kv", chunk_tokens=32, tile=True, solver="greedy")
        assert plan.k == 10 and cachefit.check(plan).ok


# ---------------------------------------------------------------------------
# a prefill after a context: the chunk's window spans the cache and the new tokens before it
# ---------------------------------------------------------------------------

def _brute_context_prefix(context, seq_len, chunk, window):
    """(resident, cached) from HF's mask over N = `context` cached tokens then `seq_len` new ones in `chunk`s.

    resident: the most earlier tokens any chunk's queries attend to (every query, every key); cached: the keys
    the first new token (position N) attends to, the decode cache of N tokens.  The prefix is their difference.
    """
    torch = pytest.importorskip("torch")
    masking = pytest.importorskip("transformers.masking_utils")
    mask_function = (masking.causal_mask_function if window is None
                     else masking.sliding_window_causal_mask_function(window))
    positions = torch.arange(context + seq_len)
    mask = mask_function(0, 0, positions[:, None], positions[None, :])  # mask[q, t]: query q attends to key t
    cached = int(mask[context, :context].sum())
    resident = 0
    for start in range(context, context + seq_len, chunk):
        earlier = mask[start:start + chunk, :start].any(dim=0).nonzero().flatten().tolist()
        if earlier:  # one contiguous run ending at start − 1, reaching into the cache at most as far as it goes
            assert earlier == list(range(earlier[0], start))
        resident = max(resident, len(earlier))
    return resident, cached


def _context_chain(per_token, *, context, seq_len, window):
    """`_chain` after a context of N tokens: the attention node caches its N (capped) tokens as `kv_bytes`."""
    g = _chain(per_token, seq_len=seq_len)
    g.graph["context"] = context
    if window is not None:
        g.nodes["attn"]["sliding_window"] = window
    g.nodes["attn"]["kv_bytes"] = per_token * (context if window is None else min(context, window - 1))
    return g


class TestContextPrefix:
    """Issue 16: with N cached tokens the last chunk's resident K/V is min(N + P, w − 1) tokens, not
    min(N, w − 1) + min(P, w − 1): the prefix term is attended(N + P) − attended(N)."""

    @pytest.mark.parametrize("window", [None, 1, 2, 5, 9, 16, 33, 64, 100, 300])
    def test_formula_is_the_mask(self, window):
        """Every (N, s, c) of a grid, against HF's mask; includes w − 1 < N (prefix 0) and c ≥ s (prefix 0)."""
        checked = capped_to_zero = 0
        for context in (0, 1, 4, 8, 15, 32, 63, 64, 99, 150):
            for seq_len in (1, 2, 7, 16, 50, 97):
                for chunk in sorted({1, 3, 8, 16, 30, seq_len - 1, seq_len} - {0}):
                    resident, cached = _brute_context_prefix(context, seq_len, chunk, window)
                    tokens = prefix_tokens(seq_len, 1, chunk / seq_len, window, context=context)
                    assert tokens == resident - cached, (context, seq_len, chunk, window)
                    assert cached == (context if window is None else min(context, window - 1))
                    if window is None:  # without a window the sum N + P stays exact
                        assert tokens == prefix_tokens(seq_len, 1, chunk / seq_len)
                    elif window - 1 <= context:
                        assert tokens == 0
                        capped_to_zero += chunk < seq_len
                    checked += 1
        assert checked > 300 and (window is None or window > 151 or capped_to_zero)

    @pytest.mark.parametrize("context, seq_len, chunk, window", [
        (0, 64, 8, 16), (10, 64, 8, 16), (15, 64, 8, 16), (16, 64, 8, 16), (40, 64, 8, 16), (5, 64, 8, 9),
        (7, 100, 30, 45), (44, 100, 30, 45), (60, 100, 30, 91), (100, 100, 30, 200), (3, 97, 10, None),
        (200, 97, 10, None), (2, 50, 49, 3), (0, 50, 49, 3), (120, 257, 16, 100),
    ])
    def test_engine_and_reference_agree_with_the_mask(self, context, seq_len, chunk, window):
        """group_sizes (engine) and the checker's reference both add per_token × (resident − cached)."""
        resident, cached = _brute_context_prefix(context, seq_len, chunk, window)
        g = _context_chain(GEMMA2_PER_TOKEN, context=context, seq_len=seq_len, window=window)
        for memory in ("liveness+kv", "additive+kv"):
            assert _alone_prefix(g, chunk / seq_len, memory)["attn"] == GEMMA2_PER_TOKEN * (resident - cached)
        assert node_prefix_bytes(g, chunk / seq_len) == {"attn": GEMMA2_PER_TOKEN * (resident - cached)}

    @pytest.mark.parametrize("context, local, old_local", [(1024, 3071, 3072), (2048, 2047, 3072), (4095, 0, 3072),
                                                           (4096, 0, 3072), (0, 3072, 3072)])
    def test_gemma2_9b_after_a_context(self, context, local, old_local):
        """gemma-2-9b, 4,096 new tokens in 1,024-token chunks after N cached: local layers (w = 4,096) hold
        min(N + 3,072, 4,095) tokens in all, cache included; global ones the cache plus 3,072."""
        g = load("gemma-2-9b", granularity="op", seq_len=4096, context=context)
        assert g.graph.get("context", 0) == context  # recorded by the builder (kv.annotate) when N > 0
        fraction = 1024 / 4096
        assert (_brute_context_prefix(context, 4096, 1024, 4096)[0]
                == min(context + 3072, 4095) == min(context, 4095) + local)
        prefix = _alone_prefix(g, fraction, "liveness+kv")
        attention = {v: b for v, b in prefix.items() if b or v.endswith(".attn")}
        assert attention == {f"block.{i}.attn": GEMMA2_PER_TOKEN * (local if i % 2 == 0 else 3072)
                             for i in range(42)}
        assert node_prefix_bytes(g, fraction) == {v: attention.get(v, 0) for v in node_prefix_bytes(g, fraction)}
        over = GEMMA2_PER_TOKEN * (old_local - local) * 21  # what adding min(N, w − 1) + min(P, w − 1) charged
        assert over == {1024: 172_032, 2048: 172_032 * 1025, 4095: 528_482_304, 4096: 528_482_304, 0: 0}[context]

    def test_mistral_7b_context_beyond_the_window_adds_nothing(self):
        """Every mistral-7b layer has w = 4,096: after 8,192 cached tokens the cache already fills each window,
        so resident sizes are the plain ones plus kv_bytes (4,095 tokens × 4,096 B per layer) and nothing more."""
        g = load("mistral-7b", seq_len=4096, context=8192)
        groups = [[v] for v in g]
        fraction = 512 / 4096
        plain = group_sizes(g, groups, memory="liveness", chunk_fraction=fraction)
        resident = group_sizes(g, groups, memory="liveness+kv", chunk_fraction=fraction)
        kv = [g.nodes[v].get("kv_bytes") or 0 for v in g]
        assert {value for value in kv if value} == {MISTRAL_PER_TOKEN * 4095}
        assert [r - p for r, p in zip(resident, plain)] == kv
        assert not any(node_prefix_bytes(g, fraction).values())

    def test_no_window_keeps_the_sum(self):
        """llama-3.1-8b (no window): after 8,192 cached tokens the prefix is still P = 3,584 tokens per layer."""
        per_token = 2 * 8 * 128 * 2
        with_context = load("llama-3.1-8b", seq_len=4096, context=8192)
        without = load("llama-3.1-8b", seq_len=4096)
        fraction = 512 / 4096
        assert _alone_prefix(with_context, fraction, "liveness+kv") == _alone_prefix(without, fraction, "liveness+kv")
        assert set(node_prefix_bytes(with_context, fraction).values()) - {0} == {per_token * 3584}

    def test_decode_is_unaffected(self):
        """A decode graph's sequence is one new token: no chunk splits it, whatever the chunk, so no prefix."""
        g = load("gemma-2-9b", phase="decode", batch=8, context=8000)
        groups = [[v] for v in g]
        for fraction in (1.0, 1 / 8):
            assert not any(node_prefix_bytes(g, fraction).values())
            plain = group_sizes(g, groups, memory="additive", chunk_fraction=fraction)
            resident = group_sizes(g, groups, memory="additive+kv", chunk_fraction=fraction)
            assert [r - p for r, p in zip(resident, plain)] == [g.nodes[v].get("kv_bytes") or 0 for v in g]

    def test_plan_checks_and_the_old_sum_is_caught(self):
        g = load("gemma-2-9b", seq_len=4096, context=2048)
        plan = cachefit.plan(g, "2GiB", solver="greedy", memory="liveness+kv", chunk_tokens=1024)
        assert plan.ok and cachefit.check(plan).ok
        again = cachefit.Plan.from_json(plan.to_json())  # the context travels with the plan's graph
        assert again.graph.graph["context"] == 2048 and cachefit.check(again).ok
        local = next(i for i, group in enumerate(plan.partitions) if "block.0" in group)
        sizes = list(plan.sizes)
        sizes[local] += GEMMA2_PER_TOKEN * (3072 - 2047)  # min(2,048, 4,095) + min(3,072, 4,095) tokens
        forged = dataclasses.replace(plan, sizes=tuple(sizes), bottleneck=max(sizes))
        assert any("differ from recomputed" in v for v in cachefit.check(forged).violations)

    def test_formula_text_after_a_context(self):
        g = load("gemma-2-9b", seq_len=4096, context=2048)
        assert prefix_formulas(g, 1024 / 4096) == (
            "8,192 B/token × 3,072 tokens before the last 1,024-token chunk of 4,096 = 25,165,824 B on 21 nodes; "
            "8,192 B/token × 2,047 tokens (sliding window 4,096: w − 1 = 4,095 of the 2,048 cached + 3,072 before "
            "the last 1,024-token chunk of 4,096, less the 2,048 in the cache) = 16,769,024 B on 21 nodes")

    @pytest.mark.parametrize("bad", [-1, 2.5, True, "2048"])
    def test_bad_context_named(self, bad):
        g = _chain(10)
        g.graph["context"] = bad
        with pytest.raises(InputError, match=r"^the graph's `context` must be a non-negative integer \(tokens "
                                             r"already in the KV cache\), got "):
            group_sizes(g, [["a", "attn", "b"]], memory="liveness+kv", chunk_fraction=0.25)


def test_prefix_reports_need_the_shape_the_memory_models_need():
    """A graph without ``batch`` is refused by the +kv models; the report helpers report nothing for it."""
    import pytest

    from cachefit import InputError
    from cachefit.graphs.kv import prefix_formulas
    from cachefit.memory import as_table

    g = _chain(3_072, seq_len=1_024)
    assert node_prefix_bytes(g, 64 / 1_024) and prefix_formulas(g, 64 / 1_024)
    del g.graph["batch"]
    with pytest.raises(InputError, match="`batch` must be a positive integer"):
        group_sizes(as_table(g), [["a", "attn", "b"]], memory="liveness+kv", chunk_fraction=64 / 1_024)
    assert node_prefix_bytes(g, 64 / 1_024) == {}
    assert prefix_formulas(g, 64 / 1_024) is None
