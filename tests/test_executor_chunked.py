"""Chunked prefill in the executor: chunks inside a sequence against the unchunked model."""

import pytest

torch = pytest.importorskip("torch")

import cachefit  # noqa: E402
from cachefit.errors import InputError  # noqa: E402
from cachefit.executor import build, run  # noqa: E402
from cachefit.executor.chunked import (ChunkedAttention, enable_chunked_prefill, prepare_chunks,  # noqa: E402
                                       replay_positions)
from cachefit.executor.nodes import Attention  # noqa: E402
from cachefit.graphs import transformer  # noqa: E402

LLAMA = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 100}
GPT2 = {"model_type": "gpt2", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 128, "vocab_size": 100, "max_position_embeddings": 64}
BERT = {"model_type": "bert", "hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
        "intermediate_size": 128, "vocab_size": 100, "max_position_embeddings": 64}


def _plan(config, granularity="op", chunk=8, memory="liveness+kv"):
    graph = transformer(config, batch=2, seq_len=32, granularity=granularity)
    return cachefit.plan(graph, "120KiB", solver="dp", memory=memory, chunk_tokens=chunk, tile=True)


class TestChunkedAttention:
    @pytest.mark.parametrize("rope,kv_heads", [(True, 2), (False, 4)])
    def test_chunks_match_whole_sequence(self, rope, kv_heads):
        attrs = {"num_heads": 4, "num_kv_heads": kv_heads, "head_dim": 8, "causal": True, "rope": rope}
        whole = Attention("attn", attrs, 16, "cpu")
        chunked = ChunkedAttention(Attention("attn", attrs, 16, "cpu"), "attn")
        generator = torch.Generator().manual_seed(0)
        q = torch.randn(32, 32, generator=generator)
        k, v = (torch.randn(32, 8 * kv_heads, generator=generator) for _ in range(2))
        expected = whole(q, k, v)
        parts = [chunked(q[i:i + 4], k[i:i + 4], v[i:i + 4]) for i in range(0, 32, 4)]
        torch.testing.assert_close(torch.cat(parts), expected, rtol=1e-5, atol=1e-5)
        assert chunked.cursor == 0

    @pytest.mark.parametrize("window", [None, 6])
    def test_position_tensor_mode_matches_whole_sequence(self, window):
        """What a replayed one-chunk CUDA graph runs: the position from a tensor, the whole (zeroed) buffer
        attended with later keys masked; a second sequence over the first one's stale rows."""
        attrs = {"num_heads": 4, "num_kv_heads": 2, "head_dim": 8, "causal": True, "rope": True,
                 "sliding_window": window}
        generator = torch.Generator().manual_seed(2)
        q = torch.randn(32, 32, generator=generator)
        k, v = (torch.randn(32, 16, generator=generator) for _ in range(2))
        expected = Attention("attn", attrs, 16, "cpu")(q, k, v)
        chunked = ChunkedAttention(Attention("attn", attrs, 16, "cpu"), "attn")
        chunked.position = torch.zeros((), dtype=torch.int64)
        parts = []
        for start in range(0, 32, 4):
            chunked.position.fill_(start % 16)
            parts.append(chunked(q[start:start + 4], k[start:start + 4], v[start:start + 4]))
            assert chunked.cursor == 0  # after every chunk (the cursor would read 4, 8, 12): not read or moved
        torch.testing.assert_close(torch.cat(parts), expected, rtol=1e-5, atol=1e-5)
        assert chunked.cursor == 0  # the Python cursor is not read or moved

    def test_non_causal_refused(self):
        attrs = {"num_heads": 4, "num_kv_heads": 4, "head_dim": 8, "causal": False}
        with pytest.raises(InputError, match=r"^node 'enc\.attn': non-causal attention cannot be chunked"):
            ChunkedAttention(Attention("enc.attn", attrs, 16, "cpu"), "enc.attn")

    def test_chunk_spanning_sequences_refused(self):
        attrs = {"num_heads": 4, "num_kv_heads": 4, "head_dim": 8, "causal": True}
        chunked = ChunkedAttention(Attention("attn", attrs, 16, "cpu"), "attn")
        x = torch.zeros(12, 32)
        chunked(x, x, x)
        with pytest.raises(InputError, match=r"^node 'attn': a chunk of 12 tokens at position 12 spans two"):
            chunked(x, x, x)


class TestRun:
    @pytest.mark.parametrize("config", [LLAMA, GPT2], ids=["llama", "gpt2"])
    @pytest.mark.parametrize("granularity", ["op", "block"])
    def test_plan_chunk_runs_by_default_and_matches(self, config, granularity):
        plan = _plan(config, granularity)
        assert cachefit.check(plan).ok
        result = run(plan, schedule=["partition-major", "token-major"], iters=1, warmup=0)
        assert (result.chunk_tokens, result.micro_batches) == (8, 8)
        assert result.equivalent and all(s.equivalent for s in result.schedules)
        assert any("inside sequences of 32 (chunked prefill" in note for note in result.notes)
        assert any(note.startswith("planned chunked-prefill K/V per group (in S(P), resident; 24 tokens")
                   for note in result.notes)

    def test_whole_sequence_chunks_still_run(self):
        plan = _plan(LLAMA, chunk=32)
        result = run(plan, iters=1, warmup=0)
        assert (result.chunk_tokens, result.micro_batches) == (32, 2) and result.equivalent

    def test_pooler_refused_by_name(self):
        plan = _plan(BERT, chunk=8, memory="liveness")
        with pytest.raises(InputError, match=r"^node 'pooler': a pooler reads each sequence's first row"):
            run(plan, chunk_tokens=8, iters=1, warmup=0)

    def test_pooler_default_falls_back_to_the_whole_pass(self):
        plan = _plan(BERT, chunk=8, memory="liveness")
        result = run(plan, iters=1, warmup=0)
        assert result.micro_batches == 1 and result.equivalent
        assert any(note.startswith("the plan's chunk of 8 tokens cannot run here (node 'pooler'")
                   for note in result.notes)

    def test_chunk_not_dividing_seq_len_refused(self):
        model = build(transformer(LLAMA, batch=2, seq_len=24, granularity="op"))
        plan = cachefit.plan(model.graph, "1GiB", solver="greedy")
        with pytest.raises(InputError, match=r"^`chunk_tokens` 16 must divide seq_len = 24"):
            prepare_chunks(plan, model, 16, None)


def _attention_layers(plan, group):
    return sum(plan.graph.nodes[node].get("op") in ("attention", "block") for node in group)


class TestHeldBytes:
    """What one chunk held per group, against the K/V formula written out from the config."""

    @pytest.mark.parametrize("config", [LLAMA, GPT2], ids=["llama", "gpt2"])
    @pytest.mark.parametrize("granularity", ["op", "block"])
    def test_measured_kv_is_kv_bytes_per_token_times_tokens_held(self, config, granularity):
        plan = _plan(config, granularity)
        result = run(plan, schedule=["partition-major"], iters=1, warmup=0)
        heads = config["num_attention_heads"]
        kv_heads, head_dim = config.get("num_key_value_heads", heads), config["hidden_size"] // heads
        assert (result.chunk_tokens, result.micro_batches) == (8, 8)
        layers_seen = 0
        for report, group in zip(result.groups, plan.partitions):
            layers = _attention_layers(plan, group)
            layers_seen += layers
            # a buffer of one sequence (32 tokens) per layer: 2 × kv_heads × head_dim × bytes × tokens
            assert report.held.kv == layers * 2 * kv_heads * head_dim * 4 * 32  # as allocated, float32
            assert report.held_at_plan_dtype.kv == layers * 2 * kv_heads * head_dim * 2 * 32  # the plan's bf16
            # the plan's term: the 24 tokens before the last 8-token chunk
            assert report.planned_kv_bytes == layers * 2 * kv_heads * head_dim * 2 * 24
        assert layers_seen == config["num_hidden_layers"]

    def test_held_terms_add_up_and_weights_are_the_allocated_parameters(self):
        plan = _plan(LLAMA)
        result = run(plan, schedule=["partition-major"], iters=1, warmup=0)
        for report in result.groups:
            held, at_plan = report.held, report.held_at_plan_dtype
            assert held.total == held.weights + held.kv + held.activations
            assert held.weights == report.weight_bytes and at_plan.weights * 2 == held.weights
            assert 0 < held.boundary <= held.activations
            assert (held.dtype, at_plan.dtype) == ("float32", "bf16")
        # group 0's boundary is the chunk's rows of the model inputs: 8 token ids and 8 positions, int64
        assert result.groups[0].held.boundary == 8 * 8 * 2 == result.groups[0].held_at_plan_dtype.boundary

    def test_whole_sequence_chunks_hold_no_kv_buffer(self):
        plan = _plan(LLAMA, chunk=32)
        result = run(plan, schedule=["partition-major"], iters=1, warmup=0)
        assert all(report.held.kv == 0 and report.planned_kv_bytes is None for report in result.groups)

    def test_measuring_leaves_the_cursors_at_zero_and_the_run_equivalent(self, monkeypatch):
        from cachefit.executor import held as held_module

        plan = _plan(GPT2)
        model = build(plan.graph, plan)
        after_measuring = []

        def measured(model, *args):  # the cursors right after measuring, before any timed schedule resets them
            result = real(model, *args)
            after_measuring.extend(m.cursor for step in model.steps for m in step.module.modules()
                                   if isinstance(m, ChunkedAttention))
            return result

        real = held_module.measure_held
        monkeypatch.setattr(held_module, "measure_held", measured)
        result = run(plan, model, schedule=["partition-major", "token-major"], iters=1, warmup=0)
        assert result.equivalent
        chunked = [m for step in model.steps for m in step.module.modules() if isinstance(m, ChunkedAttention)]
        assert chunked and all(module.cursor == 0 for module in chunked)
        assert len(after_measuring) == len(chunked) and set(after_measuring) == {0}

    def test_json_and_table_carry_the_kv_terms(self, tmp_path):
        from rich.console import Console

        from cachefit.executor.report import groups_table

        plan = _plan(LLAMA)
        result = run(plan, schedule=["partition-major"], iters=1, warmup=0)
        data = result.to_dict()
        group = data["groups"][0]
        assert group["planned_kv_bytes"] == 3072 and group["held"]["kv"] == 8192
        assert group["held_at_plan_dtype"] == {**group["held_at_plan_dtype"], "kv": 4096, "dtype": "bf16"}
        console = Console(width=200, record=True)
        console.print(groups_table(result))
        text = console.export_text()
        assert "tensor bytes at bf16" in text and "planned K/V" in text and "measured K/V" in text
        assert any(note.startswith("K/V: each attention's buffer holds one sequence, 32 tokens: the 24 before "
                                   "the last 8-token chunk") for note in result.notes)
        assert any("take 2× that" in note for note in result.notes)


# Imported Hugging Face models (torch.export) chunked inside a sequence: tests/test_executor_hf_chunked.py.


def _windowed(graph, window):
    """`graph` with a sliding window on every attention node (what the planner's `mark_windows` sets)."""
    for _, data in graph.nodes(data=True):
        if data.get("op") in ("attention", "block"):
            data["sliding_window"] = window
    return graph


class TestSlidingWindow:
    """A node's ``sliding_window`` w: keys q − w < j ≤ q (HF transformers' convention), chunked or not."""

    def _reference(self, q, k, v, window, heads, kv_heads, head_dim):
        """Attention written out in float64: softmax over the allowed keys of each query, per head."""
        rows = q.shape[0]
        q = q.double().view(rows, heads, head_dim)
        k = k.double().view(rows, kv_heads, head_dim).repeat_interleave(heads // kv_heads, dim=1)
        v = v.double().view(rows, kv_heads, head_dim).repeat_interleave(heads // kv_heads, dim=1)
        out = torch.zeros(rows, heads, head_dim, dtype=torch.float64)
        for i in range(rows):
            keys = range(max(0, i - window + 1), i + 1)
            scores = torch.stack([(q[i] * k[j]).sum(-1) for j in keys]) / head_dim ** 0.5
            weights = scores.softmax(dim=0)
            out[i] = sum(weights[n][:, None] * v[j] for n, j in enumerate(keys))
        return out.view(rows, heads * head_dim)

    def test_whole_and_chunked_match_the_written_out_window(self):
        attrs = {"num_heads": 4, "num_kv_heads": 2, "head_dim": 8, "causal": True, "sliding_window": 5}
        generator = torch.Generator().manual_seed(3)
        q = torch.randn(16, 32, generator=generator)
        k, v = (torch.randn(16, 16, generator=generator) for _ in range(2))
        expected = self._reference(q, k, v, 5, 4, 2, 8).float()
        whole = Attention("attn", attrs, 16, "cpu")(q, k, v)
        chunked = ChunkedAttention(Attention("attn", attrs, 16, "cpu"), "attn")
        parts = torch.cat([chunked(q[i:i + 4], k[i:i + 4], v[i:i + 4]) for i in range(0, 16, 4)])
        torch.testing.assert_close(whole, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(parts, expected, rtol=1e-5, atol=1e-5)
        full = Attention("attn", {**attrs, "sliding_window": None}, 16, "cpu")(q, k, v)
        assert not torch.allclose(full, whole, atol=1e-3)  # the window changes the output

    def test_bad_window_refused_by_node(self):
        attrs = {"num_heads": 4, "num_kv_heads": 4, "head_dim": 8, "causal": True, "sliding_window": 0}
        with pytest.raises(InputError, match=r"^node 'b\.attn': `sliding_window` must be a positive integer"):
            Attention("b.attn", attrs, 16, "cpu")

    @pytest.mark.parametrize("granularity", ["op", "block"])
    def test_windowed_model_runs_chunked_and_matches(self, granularity):
        graph = _windowed(transformer(LLAMA, batch=2, seq_len=32, granularity=granularity), 12)
        plan = cachefit.plan(graph, "120KiB", solver="dp", memory="liveness+kv", chunk_tokens=8, tile=True)
        model = build(plan.graph, plan)
        windows = [m.window for step in model.steps for m in step.module.modules() if isinstance(m, Attention)]
        assert windows == [12, 12]
        result = run(plan, model, schedule=["partition-major", "token-major"], iters=1, warmup=0)
        assert result.chunk_tokens == 8 and result.equivalent


DEEPSEEK = {"model_type": "deepseek_v2", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "intermediate_size": 128, "vocab_size": 100, "q_lora_rank": 0, "kv_lora_rank": 32,
            "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16}


class TestLatentAttention:
    """DeepSeek's MLA: the executor's module against the definition written out, whole and chunked."""

    ATTRS = {"num_heads": 4, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16, "causal": True}

    def _reference(self, module, q, kv_a, kv_b):
        """Per head and query in float64: softmax over keys j ≤ i of [q_nope, R_i q_pe]·[k_nope_j, R_j k_pe_j]
        / √(nope + rope), times v_j."""
        from cachefit.executor.nodes import rotate

        rows, heads, nope, rope, v_dim = q.shape[0], 4, 16, 8, 16
        q = q.double().view(rows, heads, nope + rope)
        kv = kv_b.double().view(rows, heads, nope + v_dim)
        k_pe = rotate(kv_a.double()[:, -rope:], module.cos.double(), module.sin.double())  # (rows, rope)
        q_pe = torch.stack([rotate(q[:, h, nope:], module.cos.double(), module.sin.double()) for h in range(heads)],
                           dim=1)
        out = torch.zeros(rows, heads, v_dim, dtype=torch.float64)
        for i in range(rows):
            for h in range(heads):
                scores = torch.stack([(q[i, h, :nope] * kv[j, h, :nope]).sum() + (q_pe[i, h] * k_pe[j]).sum()
                                      for j in range(i + 1)]) / (nope + rope) ** 0.5
                out[i, h] = (scores.softmax(0)[:, None] * kv[: i + 1, h, nope:]).sum(0)
        return out.view(rows, heads * v_dim).float()

    def test_whole_and_chunked_match_the_definition(self):
        from cachefit.executor.chunked import ChunkedLatentAttention
        from cachefit.executor.nodes import LatentAttention

        generator = torch.Generator().manual_seed(5)
        q = torch.randn(16, 4 * 24, generator=generator)
        kv_a = torch.randn(16, 32 + 8, generator=generator)
        expand = torch.nn.Linear(32, 4 * 32, bias=False)
        kv_b = expand(kv_a[:, :32]).detach()
        whole = LatentAttention("attn", self.ATTRS, 16, "cpu")
        expected = self._reference(whole, q, kv_a, kv_b)
        torch.testing.assert_close(whole(q, kv_a, kv_b), expected, rtol=1e-5, atol=1e-5)
        chunked = ChunkedLatentAttention(LatentAttention("attn", self.ATTRS, 16, "cpu"), "attn",
                                         lambda latent: expand(latent[:, :32]).detach())
        parts = torch.cat([chunked(q[i:i + 4], kv_a[i:i + 4], kv_b[i:i + 4]) for i in range(0, 16, 4)])
        torch.testing.assert_close(parts, expected, rtol=1e-5, atol=1e-5)
        assert chunked.cursor == 0 and chunked.kv_tensors()[0].shape == (16, 40)  # the latent of one sequence

    @pytest.mark.parametrize("granularity", ["op", "block"])
    def test_deepseek_runs_chunked_with_a_latent_cache(self, granularity):
        graph = transformer(DEEPSEEK, batch=2, seq_len=16, granularity=granularity)
        plan = cachefit.plan(graph, "200KiB", solver="greedy", memory="liveness+kv", chunk_fraction=4 / 32)
        result = run(plan, schedule=["partition-major", "token-major"], iters=1, warmup=0)
        assert (result.chunk_tokens, result.micro_batches) == (4, 8) and result.equivalent
        for report, group in zip(result.groups, plan.partitions):
            layers = sum(plan.graph.nodes[node].get("op") in ("mla_attention", "block") for node in group)
            # (kv_lora_rank + qk_rope_head_dim) × bytes × tokens per layer
            assert report.held.kv == layers * (32 + 8) * 4 * 16
            assert report.held_at_plan_dtype.kv == layers * (32 + 8) * 2 * 16
            assert report.planned_kv_bytes == layers * (32 + 8) * 2 * 12
        assert any(note.startswith("latent attention (MLA) caches each token's kv_a row") for note in result.notes)

    def test_whole_sequence_run_matches(self):
        plan = cachefit.plan(transformer(DEEPSEEK, batch=2, seq_len=16, granularity="op"), "200KiB",
                             solver="greedy", chunk_fraction=0.5)
        result = run(plan, schedule=["partition-major", "batched"], iters=1, warmup=0)
        assert result.micro_batches == 2 and result.equivalent

    def test_tiled_kv_b_re_expands_through_its_tiles(self):
        graph = transformer(DEEPSEEK, batch=2, seq_len=16, granularity="op")
        plan = cachefit.plan(graph, "10KiB", solver="greedy", chunk_fraction=4 / 32, tile=True)
        assert "block.0.kv_b.tile.1" in plan.graph
        result = run(plan, schedule=["partition-major"], iters=1, warmup=0)
        assert result.chunk_tokens == 4 and result.equivalent

    def test_kv_b_that_is_not_a_linear_refused_by_node(self):
        from cachefit.executor.nodes import Add

        graph = transformer(DEEPSEEK, batch=2, seq_len=16, granularity="op")
        model = build(graph)
        next(step for step in model.steps if step.node == "block.0.kv_b").module = Add()
        with pytest.raises(InputError, match=r"^node 'block\.0\.attn': latent attention re-expands the earlier "
                                             r"chunks' latents through its layer's kv_a_norm and kv_b; "
                                             r"'block\.0\.kv_b' is not kv_b"):
            enable_chunked_prefill(model)


def test_a_run_leaves_no_kv_buffers_behind():
    """After `run`, a kept model holds no sequence's keys and values; a second run allocates them again."""
    import cachefit
    from cachefit.executor import build, run
    from cachefit.executor.chunked import kv_buffers

    config = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128, "max_position_embeddings": 64}
    graph = cachefit.graphs.transformer(config, batch=1, seq_len=16, granularity="op")
    plan = cachefit.plan(graph, 2**40, solver="greedy", chunk_fraction=0.25)
    model = build(plan.graph, plan)
    for _ in range(2):
        result = run(plan, model, iters=1, warmup=0)
        assert result.equivalent and result.chunk_tokens == 4
        assert any(group.held.kv for group in result.groups)
        assert kv_buffers(model.steps) == []
