"""Stage plans on torch.distributed.pipelining: split_spec, the materialised module, multi-process runs."""

import json
import multiprocessing

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torch.distributed.pipelining")

from torch import nn  # noqa: E402

import cachefit  # noqa: E402
from cachefit import CachefitError, InputError  # noqa: E402
from cachefit.executor import build, linear_stack  # noqa: E402
from cachefit.executor.pipeline import (StepsModule, bubble_fraction, pipeline_module,  # noqa: E402
                                        run_pipeline, split_spec)
from cachefit.graphs import from_torch, transformer  # noqa: E402
from cachefit.result import Plan  # noqa: E402

TINY_LLAMA = {"model_type": "llama", "name": "tiny-llama", "hidden_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 128}
TINY_GPT2 = {"model_type": "gpt2", "name": "tiny-gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4,
             "n_positions": 16, "vocab_size": 64}


class Net(nn.Module):
    """Modules and functions interleaved: stages can start at fc*/head but not at add or relu."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(32, 64), nn.Linear(64, 64), nn.Linear(64, 64)
        self.head = nn.Linear(64, 8)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        h = self.fc2(h) + h
        return self.head(torch.relu(self.fc3(h)))


class Shared(nn.Module):
    """One submodule called twice."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        return self.a(self.b(self.a(x)))


def net_and_inputs():
    torch.manual_seed(0)
    return Net().eval(), torch.randn(8, 32, generator=torch.Generator().manual_seed(1))


def groups_plan(graph, groups, capacity=10**9):
    """A Plan with the given groups (sizes from the memory model), as a solver would return it."""
    sizes = cachefit.group_sizes(graph, groups, memory="liveness")
    return Plan(tuple(tuple(g) for g in groups), tuple(sizes), capacity, "liveness", 1.0, "test",
                cachefit.Status.FEASIBLE, len(groups), 1, max(sizes), 0.0, {}, "", graph)


def tiny_llama_stages(devices=2):
    graph = transformer(TINY_LLAMA, batch=4, seq_len=8, granularity="op")
    from cachefit.stages import stages

    plan = stages(graph, devices=devices, device_capacity="1MiB", balance="memory")
    assert plan.ok and plan.k == devices
    assert cachefit.check(plan).ok
    return plan


class TestBubble:
    def test_values(self):
        assert bubble_fraction(1, 4) == 0.0
        assert bubble_fraction(2, 4) == pytest.approx(1 / 5)
        assert bubble_fraction(4, 8) == pytest.approx(3 / 11)


class TestStepsModule:
    def test_forward_equals_the_built_model(self):
        graph = transformer(TINY_LLAMA, batch=2, seq_len=8, granularity="op")
        module, inputs = pipeline_module(graph, seed=3)
        reference = build(graph, seed=3).forward()["lm_head"]
        with torch.no_grad():
            torch.testing.assert_close(module(*inputs), reference)
        assert isinstance(module, StepsModule) and module.node_ids == tuple(graph)

    def test_names_are_unique_submodules(self):
        graph = transformer(TINY_LLAMA, batch=1, seq_len=8, granularity="op")
        module, _ = pipeline_module(graph)
        named = dict(module.named_modules())
        qualified = [module.qualified_name(node) for node in graph]
        assert len(set(qualified)) == len(qualified) and all(name in named for name in qualified)

    def test_refuses_a_from_torch_graph(self):
        net, x = net_and_inputs()
        with pytest.raises(InputError, match=r"imported from a torch module"):
            pipeline_module(from_torch(net, x))


class TestSplitSpec:
    def test_materialised_graph(self):
        from torch.distributed.pipelining import SplitPoint

        plan = cachefit.plan(linear_stack(6, 8, batch=2, seq_len=4), 10**6, solver="dp", k=3)
        module, _ = pipeline_module(plan)
        spec = split_spec(plan, module)
        assert spec == {module.qualified_name(group[0]): SplitPoint.BEGINNING for group in plan.partitions[1:]}
        one = cachefit.plan(linear_stack(2, 8, batch=2, seq_len=4), 10**6, solver="dp", k=1)
        assert split_spec(one, pipeline_module(one)[0]) == {}

    def test_runtime_cuts_the_planned_stages(self):
        """pipeline() (in this process, no group) makes exactly the plan's stages, with the plan's nodes."""
        from torch.distributed.pipelining import pipeline

        plan = tiny_llama_stages(3)
        module, inputs = pipeline_module(plan)
        pipe = pipeline(module, tuple(x[:8] for x in inputs), split_spec=split_spec(plan, module))
        assert pipe.num_stages == 3
        for index, group in enumerate(plan.partitions):
            stage = pipe.get_stage_module(index)
            expected = sum(p.numel() for node in group for p in module.nodes[module._names[node]].parameters())
            assert sum(p.numel() for p in stage.parameters()) == expected

    def test_from_torch_module_boundaries(self):
        from torch.distributed.pipelining import SplitPoint

        net, x = net_and_inputs()
        graph = from_torch(net, x)
        assert list(graph) == ["x", "fc1", "relu", "fc2", "add", "fc3", "relu_1", "head"]
        plan = groups_plan(graph, [["x", "fc1", "relu"], ["fc2", "add"], ["fc3", "relu_1", "head"]])
        assert split_spec(plan, net) == {"fc2": SplitPoint.BEGINNING, "fc3": SplitPoint.BEGINNING}

    def test_function_boundary_is_named(self):
        net, x = net_and_inputs()
        graph = from_torch(net, x)
        plan = groups_plan(graph, [["x", "fc1", "relu", "fc2"], ["add", "fc3", "relu_1", "head"]])
        with pytest.raises(InputError, match=r"stage 1 cannot begin at node 'add': it is a call of the "
                                             r"function 'add', not a submodule call"):
            split_spec(plan, net)
        with pytest.raises(InputError, match=r"stage 1 cannot begin at node 'add'"):
            run_pipeline(plan, module=net, example_inputs=(x,), microbatches=2)

    def test_dp_stage_plan_that_cannot_be_split(self):
        """A real cachefit stage plan whose boundary falls on a function gives the named error."""
        from cachefit.stages import stages

        net, x = net_and_inputs()
        graph = from_torch(net, x)
        plan = stages(graph, devices=2, device_capacity=10**6, balance="memory")
        assert plan.ok and plan.partitions[1][0] == "add"
        with pytest.raises(InputError, match=r"cannot begin at node 'add'"):
            split_spec(plan, net)

    def test_shared_submodule_is_refused(self):
        module = Shared()
        graph = from_torch(module, torch.zeros(2, 16))
        nodes = list(graph)
        assert nodes == ["x", "a", "b", "a_1"]
        plan = groups_plan(graph, [["x", "a", "b"], ["a_1"]])
        with pytest.raises(InputError, match=r"stage 1 cannot begin at node 'a_1'|is called 2 times"):
            split_spec(plan, module)

    def test_non_contiguous_stage(self):
        graph = from_torch(*net_and_inputs())
        plan = groups_plan(graph, [["x", "fc1", "relu", "fc2", "add", "fc3"], ["relu_1", "head"]])
        bad = Plan(plan.partitions[:1] + (("head", "relu_1"),), plan.sizes, plan.capacity, plan.memory, 1.0,
                   "test", cachefit.Status.FEASIBLE, 2, 1, plan.bottleneck, 0.0, {}, "", graph)
        with pytest.raises(InputError, match=r"stage 1 is not a contiguous run of the model's execution order "
                                             r"at node 'head'"):
            split_spec(bad, net_and_inputs()[0])

    def test_no_plan(self):
        plan = cachefit.plan(linear_stack(2, 8, batch=1, seq_len=2), 10, solver="dp")
        assert not plan.ok
        with pytest.raises(InputError, match=r"`plan` has no groups to run \(status INFEASIBLE"):
            split_spec(plan, nn.Linear(2, 2))


class TestOptions:
    """Refused before any process starts."""

    def plan(self):
        return cachefit.plan(linear_stack(4, 8, batch=2, seq_len=4), 10**6, solver="dp", k=2)

    @pytest.mark.parametrize("kwargs, message", [
        ({"schedule": "zb"}, r"`schedule` must be one of gpipe, 1f1b, got 'zb'"),
        ({"microbatches": 0}, r"`microbatches` must be an integer ≥ 1, got 0"),
        ({"microbatches": 3}, r"`microbatches` must divide the 8 rows of one step, got 3"),
        ({"schedule": "1f1b", "microbatches": 1}, r"`microbatches` must be at least the number of stages \(2\)"),
        ({"backend": "mpi"}, r"`backend` must be 'gloo' \(CPU\) or 'nccl'"),
        ({"timeout_s": 0}, r"`timeout_s` must be a positive number of seconds"),
        ({"launcher": "ssh"}, r"`launcher` must be 'spawn' or 'torchrun'"),
        ({"launcher": "torchrun"}, r"launcher='torchrun' needs the environment torchrun sets"),
    ])
    def test_bad_options(self, kwargs, message, monkeypatch):
        for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            monkeypatch.delenv(key, raising=False)
        options = {"microbatches": 2, **kwargs}
        with pytest.raises(InputError, match=message):
            run_pipeline(self.plan(), **options)

    @pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="has GPUs for every stage")
    def test_nccl_needs_a_gpu_per_stage(self):
        with pytest.raises(InputError, match=r"'nccl' places one stage per GPU: the plan has 2 stage\(s\)"):
            run_pipeline(self.plan(), microbatches=2, backend="nccl")

    def test_whole_sequences(self):
        plan = tiny_llama_stages(2)
        with pytest.raises(InputError, match=r"micro-batches of 4 tokens, not whole sequences of 8"):
            run_pipeline(plan, microbatches=8)

    def test_from_torch_needs_the_module(self):
        net, x = net_and_inputs()
        plan = groups_plan(from_torch(net, x), [["x", "fc1", "relu"], ["fc2", "add", "fc3", "relu_1", "head"]])
        with pytest.raises(InputError, match=r"pass that `module` and its `example_inputs`"):
            run_pipeline(plan, microbatches=2)

    def test_timeout_stops_every_process(self):
        with pytest.raises(CachefitError, match=r"exceeded `timeout_s`"):
            run_pipeline(self.plan(), microbatches=2, timeout_s=0.5)
        assert multiprocessing.active_children() == []


class TestRuns:
    """Two processes on 127.0.0.1 with gloo; each run takes about 10 s on two cores."""

    def test_stage_plan_matches_single_process(self):
        plan = tiny_llama_stages(2)
        result = run_pipeline(plan, schedule="gpipe", microbatches=4, warmup=0, iters=2, timeout_s=120)
        module, inputs = pipeline_module(plan)
        with torch.no_grad():
            reference = module(*inputs)
        torch.testing.assert_close(result.output, reference, rtol=1e-4, atol=1e-4)
        assert result.equivalent and "PASS" in result.equivalence_line
        assert result.stages == 2 and len(result.stage_reports) == 2
        assert [(s.first, s.last) for s in result.stage_reports] == [(g[0], g[-1]) for g in plan.partitions]
        assert result.bubble_theoretical == pytest.approx(1 / 5)
        assert 0.0 <= result.bubble_measured <= 1.0 and result.tokens == 32 and result.tokens_per_s > 0
        assert all(s.busy_ms > 0 and s.params > 0 for s in result.stage_reports)
        data = json.loads(result.to_json())
        assert data["format"] == "cachefit.pipeline" and "output" not in data
        assert multiprocessing.active_children() == []

    def test_user_module_1f1b(self):
        net, x = net_and_inputs()
        graph = from_torch(net, x)
        plan = groups_plan(graph, [["x", "fc1", "relu"], ["fc2", "add", "fc3", "relu_1", "head"]])
        result = run_pipeline(plan, schedule="1f1b", microbatches=4, module=net, example_inputs=(x,),
                              warmup=0, iters=1, timeout_s=120)
        with torch.no_grad():
            torch.testing.assert_close(result.output, net(x), rtol=1e-5, atol=1e-5)
        assert result.equivalent and result.rows == 8
        assert [s.params for s in result.stage_reports] == [32 * 64 + 64, 2 * (64 * 64 + 64) + 64 * 8 + 8]


def _descendants(pid):
    """Pids of every process below `pid` (Linux /proc)."""
    import os

    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stream:
                    fields = stream.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as stream:
            return stream.read()
    except OSError:
        return b""


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as stream:
            return stream.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="reads /proc")
class TestSignals:
    """``cachefit pipeline`` killed mid-run leaves no stage process and no temp folder behind."""

    @pytest.fixture(scope="class")
    def plan_file(self, tmp_path_factory):
        plan = cachefit.plan(linear_stack(4, 16, batch=2, seq_len=4), 10**6, solver="dp", k=2)
        path = tmp_path_factory.mktemp("plan") / "stages.json"
        plan.to_json(path)
        return path

    @pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGKILL", "SIGINT"])
    def test_signal_to_the_parent_ends_every_stage(self, plan_file, tmp_path, signal_name):
        import os
        import signal
        import subprocess
        import sys
        import time

        temp = tmp_path / "tmp"
        temp.mkdir()
        env = dict(os.environ, TMPDIR=str(temp), PYTHONWARNINGS="ignore")
        parent = subprocess.Popen(
            [sys.executable, "-m", "cachefit.cli_stages", "pipeline", str(plan_file), "--microbatches", "2",
             "--warmup", "0", "--iters", "1000000", "--timeout", "300"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 120
            stages = []
            while time.monotonic() < deadline and parent.poll() is None:
                stages = [pid for pid in _descendants(parent.pid) if b"spawn_main" in _cmdline(pid)]
                if len(stages) >= 2:
                    break
                time.sleep(0.2)
            assert parent.poll() is None and len(stages) == 2, "the stage processes never started"
            time.sleep(3.0)  # let them build, trace and start their steps
            stages = _descendants(parent.pid)  # the stages and whatever they or the parent started
            parent.send_signal(getattr(signal, signal_name))
            parent.wait(60)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and any(_alive(pid) for pid in stages):
                time.sleep(0.2)
            assert [pid for pid in stages if _alive(pid)] == []
            assert sorted(path.name for path in temp.iterdir()) == []
        finally:
            if parent.poll() is None:
                parent.kill()
                parent.wait(10)
