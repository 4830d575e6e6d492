"""Chunked prefill of imported Hugging Face models (torch.export): chunks inside a sequence against the whole model."""

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import cachefit  # noqa: E402
from cachefit.errors import InputError  # noqa: E402
from cachefit.executor import run  # noqa: E402
from cachefit.executor.chunked import ChunkedSdpa, ChunkPositions  # noqa: E402
from cachefit.graphs import from_torch  # noqa: E402
from cachefit.graphs.kv import node_prefix_bytes  # noqa: E402

pytestmark = pytest.mark.slow

BATCH, SEQ, CHUNK = 2, 16, 4

#: name -> (attention core node of layer 0, KV heads, head_dim, sliding window)
CORES = {"gpt2": ("transformer.h.0.attn", 4, 8, None), "llama": ("model.layers.0.self_attn#2", 2, 8, None),
         "mistral": ("model.layers.0.self_attn#2", 2, 8, 5)}


@pytest.fixture(scope="module")
def imported(import_once, tiny_transformers):
    return lambda name: import_once(tiny_transformers, name, (BATCH, SEQ))


def _plan(graph, chunk=CHUNK):
    total = sum(data["weight_bytes"] + data["activation_bytes"] for _, data in graph.nodes(data=True))
    plan = cachefit.plan(graph, total // 3, solver="greedy", memory="liveness+kv", chunk_tokens=chunk)
    assert plan.ok and cachefit.check(plan).ok
    return plan


class TestImport:
    """What the import carries for a recognised attention module: its K/V per token, window, batch, seq_len."""

    @pytest.mark.parametrize("name", sorted(CORES))
    def test_attention_core_carries_kv_bytes_per_token(self, imported, name):
        _, _, graph = imported(name)
        core, kv_heads, head_dim, window = CORES[name]
        marked = {node: data["kv_bytes_per_token"] for node, data in graph.nodes(data=True)
                  if data.get("kv_bytes_per_token")}
        assert len(marked) == 2 and marked[core] == 2 * kv_heads * head_dim * 4  # a key and a value, fp32
        assert graph.nodes[core].get("sliding_window") == window
        assert (graph.graph["batch"], graph.graph["seq_len"]) == (BATCH, SEQ)

    def test_dtype_override_counts_kv_at_that_dtype(self, tiny_transformers):
        module = tiny_transformers("llama")
        graph = from_torch(module, torch.zeros(1, 8, dtype=torch.long), dtype="bf16")
        assert graph.nodes["model.layers.1.self_attn#2"]["kv_bytes_per_token"] == 2 * 2 * 8 * 2

    def test_unrecognised_attention_carries_no_kv_and_no_seq_len(self, imported):
        _, _, graph = imported("llama-eager")
        assert not any(data.get("kv_bytes_per_token") for _, data in graph.nodes(data=True))
        assert "seq_len" not in graph.graph


class TestRun:
    @pytest.mark.parametrize("name", sorted(CORES))
    def test_chunks_inside_a_sequence_match_the_whole_model(self, imported, name):
        module, tokens, graph = imported(name)
        plan = _plan(graph)
        result = run(plan, module, example_inputs=(tokens,), iters=1, warmup=0,
                     schedule=["partition-major", "token-major"])
        assert (result.chunk_tokens, result.micro_batches) == (CHUNK, BATCH * SEQ // CHUNK)
        assert result.equivalent and max(s.max_abs_diff for s in result.schedules) < 1e-4
        assert f"streams the plan's chunk: {CHUNK} of {BATCH * SEQ} tokens per pass" in result.notes

    @pytest.mark.parametrize("name", sorted(CORES))
    def test_planned_kv_is_the_plan_term_and_measured_the_buffers(self, imported, name):
        module, tokens, graph = imported(name)
        plan = _plan(graph)
        result = run(plan, module, example_inputs=(tokens,), iters=1, warmup=0, schedule=["partition-major"])
        prefix = node_prefix_bytes(plan.graph, plan.chunk_fraction)
        _, kv_heads, head_dim, window = CORES[name]
        per_token = 2 * kv_heads * head_dim * 4
        before = SEQ - CHUNK if window is None else window - 1  # s − c, or w − 1 under the window
        assert set(prefix.values()) == {per_token * before}
        for report, group in zip(result.groups, plan.partitions):
            layers = sum(1 for node in group if node in prefix)
            assert report.planned_kv_bytes == layers * per_token * before
            assert report.held.kv == report.held_at_plan_dtype.kv == layers * per_token * SEQ  # one sequence
        assert sum(1 for node in prefix if any(node in group for group in plan.partitions)) == 2

    def test_default_run_streams_the_plan_chunk_of_a_fraction(self, imported):
        module, tokens, graph = imported("gpt2")
        plan = cachefit.plan(graph, "256KiB", solver="greedy", chunk_fraction=1 / 16)
        result = run(plan, module, example_inputs=(tokens,), iters=1, warmup=0, schedule=["partition-major"])
        assert (result.chunk_tokens, result.micro_batches) == (2, 16) and result.equivalent

    def test_whole_sample_chunks_still_run(self, imported):
        module, tokens, graph = imported("llama")
        plan = _plan(graph, chunk=SEQ)
        result = run(plan, module, example_inputs=(tokens,), iters=1, warmup=0,
                     schedule=["partition-major", "batched"])
        assert (result.chunk_tokens, result.micro_batches) == (SEQ, BATCH) and result.equivalent
        assert all(report.held.kv == 0 for report in result.groups)

    @pytest.mark.parametrize("broken", ["positions", "kv"])
    def test_without_positions_or_kv_the_chunks_do_not_match(self, imported, monkeypatch, broken):
        """The check is not vacuous: positions restarting at 0, or a chunk attending to itself only, fail."""
        module, tokens, graph = imported("llama")
        if broken == "positions":
            monkeypatch.setattr(ChunkPositions, "forward", lambda self, arange: arange)
        else:
            original = ChunkedSdpa._where

            def own_rows_only(self, rows, device):
                positions, end = original(self, rows, device)
                self._key_buffer = self._value_buffer = None  # forget the earlier chunks
                return positions - positions[0], rows

            monkeypatch.setattr(ChunkedSdpa, "_where", own_rows_only)
        result = run(_plan(graph), module, example_inputs=(tokens,), iters=1, warmup=0,
                     schedule=["partition-major"])
        assert not result.equivalent and result.schedules[0].max_abs_diff > 10 * result.schedules[0].atol


class TestRefusals:
    def test_unrecognised_attention_refused_by_module(self, imported):
        module, tokens, _ = imported("llama-eager")
        graph = from_torch(module, tokens)
        graph.graph.update(batch=BATCH, seq_len=SEQ)
        plan = cachefit.plan(graph, "256KiB", solver="greedy")
        with pytest.raises(InputError, match=r"^module 'model\.layers\.0\.self_attn' \(LlamaAttention\): the "
                                             r"attention of an imported \(torch\.export\) model cannot be chunked "
                                             r"inside a sequence: .*; run whole-sequence chunks"):
            run(plan, module, example_inputs=(tokens,), chunk_tokens=CHUNK, iters=1, warmup=0)
        fallback = cachefit.plan(graph, "256KiB", solver="greedy", chunk_fraction=1 / 8)
        result = run(fallback, module, example_inputs=(tokens,), iters=1, warmup=0, schedule=["partition-major"])
        assert result.micro_batches == 1 and result.equivalent
        assert any(note.startswith("the plan's chunk (fraction 0.125 of a pass of 2 sample(s)) lies inside a sample "
                                   "and cannot run here (module 'model.layers.0.self_attn' (LlamaAttention)")
                   for note in result.notes)

    def test_one_unmarked_attention_is_named(self, imported):
        module, tokens, _ = imported("gpt2")
        graph = from_torch(module, tokens)
        del graph.nodes["transformer.h.1.attn"]["kv_bytes_per_token"]
        plan = cachefit.plan(graph, "256KiB", solver="greedy")
        with pytest.raises(InputError, match=r"^module 'transformer\.h\.1\.attn' \(GPT2Attention\): .* it is not a "
                                             r"recognised Hugging Face causal self-attention"):
            run(plan, module, example_inputs=(tokens,), chunk_tokens=CHUNK, iters=1, warmup=0)

    def test_chunk_not_dividing_seq_len_refused(self, tiny_transformers):
        module = tiny_transformers("gpt2")
        tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
        plan = cachefit.plan(from_torch(module, tokens), "256KiB", solver="greedy")
        with pytest.raises(InputError, match=r"^`chunk_tokens` 8 must divide seq_len = 12 \(a chunk inside a "
                                             r"sequence never spans two\) or be a multiple of it$"):
            run(plan, module, example_inputs=(tokens,), chunk_tokens=8, iters=1, warmup=0)

    def test_batched_schedule_refused_in_one_line(self, imported):
        module, tokens, graph = imported("gpt2")
        with pytest.raises(InputError, match=r"^schedule 'batched' cannot run an imported model rebuilt for "
                                             r"chunks inside a sequence") as caught:
            run(_plan(graph), module, example_inputs=(tokens,), iters=1, warmup=0, schedule=["batched"])
        assert "\n" not in str(caught.value)


class TestHeldWithoutWeightsAsValues:
    """An imported graph hands its weights on as values: the held boundary counts activations only."""

    def test_boundary_is_at_most_what_the_plan_hands_over(self, imported):
        module, tokens, graph = imported("gpt2")
        plan = cachefit.plan(graph, "96KiB", solver="greedy", memory="liveness", chunk_tokens=SEQ)
        assert plan.ok and plan.k >= 3
        result = run(plan, module, example_inputs=(tokens,), iters=1, warmup=0, schedule=["partition-major"])
        where = {node: index for index, group in enumerate(plan.partitions) for node in group}
        for index, report in enumerate(result.groups):
            crossing = sum(plan.graph.nodes[u]["activation_bytes"] for u in plan.graph
                           if where[u] < index and any(where[v] >= index for v in plan.graph.successors(u)))
            assert report.held.boundary <= crossing + tokens.numel() * tokens.element_size()


class TestScheduleAll:
    """An imported model rebuilt for chunks inside a sequence has no whole-pass call: 'batched' is left out."""

    def test_all_runs_without_batched_and_says_so(self, imported):
        module, tokens, graph = imported("llama")
        plan = _plan(graph)
        result = run(plan, module, example_inputs=(tokens,), iters=1, warmup=0, schedule="all")
        assert result.equivalent
        assert "batched" not in {schedule.name for schedule in result.schedules}
        assert any(note.startswith("batched left out of 'all'") for note in result.notes)

    def test_explicit_batched_is_refused_before_running(self, imported):
        module, tokens, graph = imported("llama")
        plan = _plan(graph)
        with pytest.raises(InputError, match="^schedule 'batched' cannot run an imported model rebuilt for chunks"):
            run(plan, module, example_inputs=(tokens,), iters=1, warmup=0, schedule=["batched", "partition-major"])
