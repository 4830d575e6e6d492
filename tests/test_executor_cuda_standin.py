"""The executor's CUDA orchestration, run on the CPU against a stand-in for torch.cuda.

No GPU here: these tests replace the few ``torch.cuda`` calls the executor
makes (streams, events, graphs, memory counters) and the cuda-bindings runtime
with recording fakes, so that the capture order, the per-group graph
segments, the L2 window calls and the error reporting run and are checked.
What they cannot check — that a real capture and replay compute the right
thing — is what the ``gpu``-marked tests in test_executor.py check on a
device.
"""

import contextlib
import types

import pytest

torch = pytest.importorskip("torch")

import cachefit  # noqa: E402
from cachefit.executor import api as api_module  # noqa: E402
from cachefit.executor import build, check_plan_groups, run  # noqa: E402
from cachefit.executor import cuda as cuda_helpers  # noqa: E402
from cachefit.executor import runner as runner_module  # noqa: E402
from cachefit.executor.runner import (GraphSchedule, ReplaySchedule, compare_outputs, make_runners,  # noqa: E402
                                      measure_group_memory)
from cachefit.graphs import transformer  # noqa: E402

CONFIG = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "intermediate_size": 64, "vocab_size": 64}

def plan_greedy(graph, capacity, **kwargs):
    """`cachefit.plan` with the greedy solver: fast, deterministic, and free of ortools (absent on the GPU image)."""
    return cachefit.plan(graph, capacity, solver="greedy", **kwargs)



class FakeEvent:
    clock = 0.0

    def __init__(self, enable_timing=False):
        self.time = None

    def record(self, stream=None):
        FakeEvent.clock += 1.0
        self.time = FakeEvent.clock

    def synchronize(self):
        pass

    def elapsed_time(self, other):
        return other.time - self.time


class FakeGraph:
    """Records what the executor does with a CUDA graph; the captured work ran eagerly at capture."""

    made = []

    def __init__(self, keep_graph=False):
        self.keep_graph, self.instantiated, self.replays, self.captured = keep_graph, False, 0, False
        self.raw = 1000 + len(FakeGraph.made)
        FakeGraph.made.append(self)

    def pool(self):
        return ("pool", id(self))

    def raw_cuda_graph(self):
        assert self.keep_graph and self.captured and not self.instantiated
        return self.raw

    def instantiate(self):
        self.instantiated = True

    def replay(self):
        assert self.captured and (self.instantiated or not self.keep_graph)
        self.replays += 1

    def reset(self):
        pass


class FakeStream:
    def __init__(self, device=None):
        pass

    def wait_stream(self, other):
        pass


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda's calls used by the executor, as CPU stand-ins."""
    import torch._dynamo  # noqa: F401 - its first import reads torch.cuda's types: before the stand-in replaces them

    FakeGraph.made = []
    pools = []

    @contextlib.contextmanager
    def graph(cuda_graph, pool=None, stream=None):
        pools.append(pool)
        yield
        cuda_graph.captured = True

    fake = types.SimpleNamespace(
        CUDAGraph=FakeGraph, Event=FakeEvent, Stream=FakeStream, graph=graph,
        stream=lambda s: contextlib.nullcontext(), current_stream=lambda device=None: FakeStream(),
        synchronize=lambda device=None: None, empty_cache=lambda: None, init=lambda: None,
        reset_peak_memory_stats=lambda device=None: None, memory_allocated=lambda device=None: 1000,
        max_memory_allocated=lambda device=None: 1500, current_device=lambda: 0,
        get_device_properties=lambda device: types.SimpleNamespace(name="Stand-in GPU", L2_cache_size=50 * 2**20,
                                                                    total_memory=80 * 2**30))
    monkeypatch.setattr(runner_module.torch, "cuda", fake)
    yield types.SimpleNamespace(pools=pools)


class FakeRuntime:
    """cuda.bindings.runtime, recording calls; each graph has three kernel nodes and one memset."""

    class cudaError_t:
        cudaSuccess = 0

    class cudaDeviceAttr:
        cudaDevAttrMaxPersistingL2CacheSize = "max-persist"
        cudaDevAttrMaxAccessPolicyWindowSize = "max-window"

    class cudaLimit:
        cudaLimitPersistingL2CacheSize = "persist-limit"

    class cudaGraphNodeType:
        cudaGraphNodeTypeKernel = "kernel"

    class cudaAccessProperty:
        cudaAccessPropertyPersisting = "persisting"
        cudaAccessPropertyStreaming = "streaming"

    class cudaKernelNodeAttrID:
        cudaLaunchAttributeAccessPolicyWindow = "apw"

    def __init__(self, *, fail_limit=False):
        self.limit, self.calls, self.fail_limit, self.windows = 0, [], fail_limit, []

    def cudaGetErrorString(self, error):
        return 0, b"fake error"

    def cudaDeviceGetAttribute(self, attr, device):
        return 0, {"max-persist": 30 * 2**20, "max-window": 128 * 2**20}[attr]

    def cudaDeviceGetLimit(self, limit):
        return 0, self.limit

    def cudaDeviceSetLimit(self, limit, value):
        self.calls.append(("set-limit", value))
        if self.fail_limit:
            return 1,
        self.limit = value
        return 0,

    def cudaCtxResetPersistingL2Cache(self):
        self.calls.append(("reset",))
        return 0,

    def cudaGraphGetNodes(self, graph, numNodes=0):
        nodes = [(graph, i) for i in range(4)]
        return (0, None, 4) if numNodes == 0 else (0, nodes[:numNodes], 4)

    def cudaGraphNodeGetType(self, node):
        return 0, ("memset" if node[1] == 3 else "kernel")

    def cudaKernelNodeAttrValue(self):
        return types.SimpleNamespace(accessPolicyWindow=types.SimpleNamespace())

    def cudaGraphKernelNodeSetAttribute(self, node, attribute, value):
        window = value.accessPolicyWindow
        self.windows.append((node, attribute, window.base_ptr, window.num_bytes, window.hitRatio,
                             window.hitProp, window.missProp))
        return 0,


def small():
    graph = transformer(CONFIG, batch=4, seq_len=8, granularity="op")
    plan = plan_greedy(graph, "20KiB", chunk_fraction=0.25)
    assert plan.ok and plan.k >= 3
    model = build(graph, plan)
    groups = check_plan_groups(plan)
    return plan, model, groups, make_runners(model, groups)


class TestGraphSchedule:
    @pytest.mark.parametrize("name, replays", [("partition-major", "k"), ("token-major", 4), ("batched", 1),
                                               ("partition-major-fused", 1)])
    def test_capture_segments_replay_and_outputs(self, fake_cuda, monkeypatch, name, replays):
        monkeypatch.setattr(cuda_helpers, "cuda_runtime", lambda: FakeRuntime())
        plan, model, _, runners = small()
        job = GraphSchedule(name, model, runners, 8, 4)
        assert job.prepare() == 0
        expected = plan.k if replays == "k" else replays
        assert len(job.graphs) == job.graph_replays == expected
        assert all(g.keep_graph and g.instantiated for g in job.graphs)
        assert job.kernel_nodes == 3 * expected  # memset nodes are not kernels
        # one pool shared by every graph of the schedule, the first capture making it
        assert fake_cuda.pools[0] is None and all(p == job.graphs[0].pool() for p in fake_cuda.pools[1:])
        timing = job.time(warmup=2, iters=3)
        assert all(g.replays == 2 + 3 for g in job.graphs)
        assert len(timing.per_segment) == expected and timing.median > 0
        max_abs, _, ok, _, _ = compare_outputs(job.outputs(), model.reference(), model.dtype)
        assert ok and max_abs < 1e-5  # the outputs the captures computed
        job.release()
        assert job.graphs == [] and job.stores is None

    def test_replay_schedule_static_buffers(self, fake_cuda, monkeypatch):
        monkeypatch.setattr(cuda_helpers, "cuda_runtime", lambda: FakeRuntime())
        plan, model, _, runners = small()
        job = ReplaySchedule("partition-major-replay", model, runners, 8, 4)
        assert job.prepare() == 0
        assert len(job.graphs) == plan.k and job.graph_replays == 4 * plan.k
        assert job.kernel_nodes == 3 * plan.k * 4
        assert set(job.static_in[0]) == {"@tokens", "@positions"}
        for runner, outs in zip(runners, job.static_out):
            assert set(outs) == {s.node for s in runner.steps} & runner.keep
        job.time(warmup=1, iters=2)
        assert all(g.replays == 4 * 3 for g in job.graphs)
        assert set(job.outputs()) == {"lm_head"} and job.outputs()["lm_head"].shape == (32, 64)
        job.release()

    def test_launch_count_from_graph_kernel_nodes_else_profiler(self, fake_cuda, monkeypatch):
        monkeypatch.setattr(cuda_helpers, "cuda_runtime", lambda: FakeRuntime())
        monkeypatch.setattr(runner_module, "count_kernels", lambda function, device: 99)
        _, model, _, runners = small()
        job = GraphSchedule("token-major", model, runners, 8, 4)
        job.prepare()
        count, method, nodes = job.launches()
        assert count == nodes == 12 and "kernel nodes" in method
        job.kernel_nodes = None  # no cuda-bindings: the profiler's count
        count, method, nodes = job.launches()
        assert count == 99 and "torch.profiler" in method and nodes is None

    def test_l2_windows_on_every_kernel_node_of_each_group_graph(self, fake_cuda, monkeypatch):
        runtime = FakeRuntime()
        monkeypatch.setattr(cuda_helpers, "cuda_runtime", lambda: runtime)
        monkeypatch.setattr(cuda_helpers, "torch", types.SimpleNamespace(
            device=torch.device, cuda=runner_module.torch.cuda))
        plan, model, groups, runners = small()
        spans = [(buffer.data_ptr(), buffer.numel()) for buffer in model.group_buffers]
        with cuda_helpers.L2Persistence("cpu") as l2:
            assert l2.available and l2.set_aside == 30 * 2**20 and "set-aside" in l2.status
            job = GraphSchedule("partition-major", model, runners, 8, 4)
            windows = job.prepare(l2=l2, spans=spans)
            fused = GraphSchedule("partition-major-fused", model, runners, 8, 4)
            assert fused.prepare(l2=l2, spans=spans) == 0  # several groups per graph: no window
        assert windows == 3 * plan.k == l2.windows
        for graph, (base, extent) in zip(job.graphs, spans):
            mine = [w for w in runtime.windows if w[0][0] == graph.raw]
            assert len(mine) == 3 and all(w[2] == base and w[3] == extent for w in mine)
            assert all(w[1] == "apw" and w[5] == "persisting" and w[6] == "streaming" for w in mine)
            assert all(w[4] == pytest.approx(min(1.0, 30 * 2**20 / extent)) for w in mine)
        assert runtime.calls[0] == ("set-limit", 30 * 2**20)
        assert runtime.calls[-2:] == [("reset",), ("set-limit", 0)]  # lines reset, limit restored

    def test_l2_unavailable_is_reported_not_raised(self, monkeypatch):
        monkeypatch.setattr(cuda_helpers, "cuda_runtime", lambda: None)
        with cuda_helpers.L2Persistence("cpu") as l2:
            assert not l2.available and "cuda-bindings" in l2.status
            assert l2.window(object(), 0, 100) == 0
        runtime = FakeRuntime(fail_limit=True)
        monkeypatch.setattr(cuda_helpers, "cuda_runtime", lambda: runtime)
        monkeypatch.setattr(cuda_helpers, "torch", types.SimpleNamespace(
            device=torch.device, cuda=types.SimpleNamespace(init=lambda: None, current_device=lambda: 0,
                                                            synchronize=lambda device=None: None)))
        with cuda_helpers.L2Persistence("cpu") as l2:
            assert not l2.available and "cudaDeviceSetLimit" in l2.status
        assert l2.to_dict()["available"] is False

    def test_group_memory_measurement(self, fake_cuda):
        plan, model, groups, runners = small()
        weights = [100] * len(groups)
        measured = measure_group_memory(model, runners, 8, 4, weights)
        # weights + live values at the group's start (tokens/positions for group 0) + fake peak 500 B
        assert len(measured) == plan.k
        assert measured[0] == 100 + 2 * 8 * 8 + 500
        assert all(m > 600 for m in measured[1:])


class TestRunCudaPath:
    def test_run_takes_the_cuda_branch_end_to_end(self, fake_cuda, monkeypatch):
        """`run` with the CUDA path forced on a CPU model: graphs, L2 windows, memory, overhead."""
        runtime = FakeRuntime()
        monkeypatch.setattr(cuda_helpers, "cuda_runtime", lambda: runtime)
        monkeypatch.setattr(api_module, "_is_cuda", lambda device: True)
        graph = transformer(CONFIG, batch=4, seq_len=8, granularity="op")
        plan = plan_greedy(graph, "20KiB", chunk_fraction=0.25)
        result = run(plan, micro_batches=4, schedule="all", l2_persist=True, warmup=1, iters=2)
        assert [s.name for s in result.schedules] == ["eager", "batched", "token-major", "partition-major",
                                                      "partition-major-fused", "partition-major-replay"]
        # the stand-in replays nothing: one-chunk graphs replayed per chunk cannot compute here
        assert all(s.equivalent for s in result.schedules if s.name != "partition-major-replay")
        assert result.device_name == "Stand-in GPU"
        pm = result.schedule("partition-major")
        assert pm.graph_replays_per_pass == plan.k and pm.l2_windows == 3 * plan.k
        replay = result.schedule("partition-major-replay")
        assert replay.graph_replays_per_pass == 4 * plan.k and replay.l2_windows == 3 * plan.k
        assert len(replay.per_group_ms) == plan.k
        assert result.schedule("partition-major-fused").l2_windows == 0
        assert result.l2["available"] and result.l2["kernel_nodes_with_window"] == 6 * plan.k
        assert result.replay_overhead_us_per_group is not None
        assert result.replay_overhead_us_per_chunk is not None
        assert all(g.measured_bytes is not None for g in result.groups)
        assert result.schedule("token-major").graph_replays_per_pass == 4
        assert result.warmup == 1 and result.iters == 2
        assert ("reset",) in runtime.calls


class TestChunkedPrefillOnCuda:
    """Chunks inside a sequence on the CUDA path, against the stand-in.  Untested on a GPU (none here)."""

    def _plan(self):
        graph = transformer(CONFIG, batch=2, seq_len=16, granularity="op")
        plan = cachefit.plan(graph, "40KiB", solver="dp", memory="liveness+kv", chunk_tokens=4, tile=True)
        assert plan.ok and plan.k >= 2
        return plan

    @pytest.mark.parametrize("name", ["partition-major", "token-major", "partition-major-fused"])
    def test_captured_passes_hold_each_chunks_positions(self, fake_cuda, monkeypatch, name):
        """The stand-in runs each captured body once, at capture: the outputs are the capture's, whose
        chunk positions (the cursor's, from 0) are what every replay of those graphs repeats."""
        from cachefit.executor.chunked import enable_chunked_prefill

        monkeypatch.setattr(cuda_helpers, "cuda_runtime", lambda: FakeRuntime())
        plan = self._plan()
        model = enable_chunked_prefill(build(plan.graph, plan))
        runners = make_runners(model, check_plan_groups(plan))
        reference = model.reference()
        job = GraphSchedule(name, model, runners, 4, 8)
        job.prepare()
        job.time(warmup=1, iters=2)
        assert compare_outputs(job.outputs(), reference, model.dtype).equivalent
        job.release()

    def test_replay_fills_the_position_tensor_per_chunk(self, fake_cuda, monkeypatch):
        """partition-major-replay: each group's one-chunk graph replayed per chunk.  The stand-in's replay
        runs the group on the static inputs' current values and writes the captured output tensors, as a
        graph does; the attention reads its position from the tensor the schedule fills."""
        from cachefit.executor.chunked import ChunkedAttention, enable_chunked_prefill

        monkeypatch.setattr(cuda_helpers, "cuda_runtime", lambda: FakeRuntime())
        plan = self._plan()
        model = enable_chunked_prefill(build(plan.graph, plan))
        chunked = [m for step in model.steps for m in step.module.modules() if isinstance(m, ChunkedAttention)]
        runners = make_runners(model, check_plan_groups(plan))
        reference = model.reference()
        job = ReplaySchedule("partition-major-replay", model, runners, 4, 8)
        job.prepare()
        assert job.position is not None and all(m.position is job.position for m in chunked)
        cursors = []
        for index, (graph, runner) in enumerate(zip(job.graphs, runners)):
            def replay(index=index, runner=runner):
                store = dict(job.static_in[index])
                runner.run(store)
                cursors.extend(m.cursor for m in chunked)  # after each replay (the cursor would read 4, 8, 12)
                for name, captured in job.static_out[index].items():
                    captured.copy_(store[name])

            graph.replay = replay
        job.time(warmup=1, iters=1)
        comparison = compare_outputs(job.outputs(), reference, model.dtype)
        assert comparison.equivalent, comparison
        assert cursors and set(cursors) == {0}  # the replays never used the Python cursor
        assert all(m.cursor == 0 for m in chunked)
        job.release()
        assert all(m.position is None for m in chunked)

    def test_run_on_the_cuda_path_streams_the_plans_chunk(self, fake_cuda, monkeypatch):
        monkeypatch.setattr(cuda_helpers, "cuda_runtime", lambda: FakeRuntime())
        monkeypatch.setattr(api_module, "_is_cuda", lambda device: True)
        result = run(self._plan(), schedule=["partition-major", "token-major"], warmup=0, iters=1)
        assert (result.chunk_tokens, result.micro_batches) == (4, 8) and result.equivalent
        assert all(g.measured_bytes is not None and g.held.kv >= 0 for g in result.groups)
        assert sum(g.held.kv for g in result.groups) == 2 * 2 * 2 * 8 * 4 * 16  # 2 layers × K, V × 2 kv heads
