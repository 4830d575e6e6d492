"""``cachefit run`` defaults (the CPU quick check) and progress for ``run`` and ``bench solvers``."""

import json

import pytest

torch = pytest.importorskip("torch")

from click.testing import CliRunner  # noqa: E402

from cachefit import executor  # noqa: E402
from cachefit.cli_run import run as run_command  # noqa: E402
from cachefit.executor import linear_stack  # noqa: E402
from cachefit.progress import Reporter, reporting  # noqa: E402
from cachefit.result import graph_to_data  # noqa: E402


class Recorder(Reporter):
    def __init__(self):
        self.events = []

    def start(self, name, total=None):
        self.events.append(("start", name, total))
        return name

    def update(self, task_id, *, completed=None, advance=0, detail=None):
        self.events.append(("update", task_id, advance, detail))

    def stop(self, task_id):
        self.events.append(("stop", task_id))


@pytest.fixture()
def stack_file(tmp_path):
    path = tmp_path / "stack.json"
    path.write_text(json.dumps(graph_to_data(linear_stack(4, 64, batch=2, seq_len=16))))
    return path


def test_cpu_default_is_the_quick_check(stack_file, tmp_path):
    out = tmp_path / "result.json"
    result = CliRunner().invoke(run_command, [str(stack_file), "--capacity", "20KiB", "--micro-batches", "4",
                                              "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert ("quick check: partition-major against eager (the reference), 1 warm-up + 3 timed passes; every "
            "schedule: --schedule all --passes 10") in " ".join(result.output.split())
    data = json.loads(out.read_text())
    assert [s["name"] for s in data["schedules"]] == ["eager", "partition-major"]
    assert data["warmup"] == 1 and data["iters"] == 3


def test_asking_for_schedules_or_passes_leaves_the_quick_check(stack_file, tmp_path):
    out = tmp_path / "result.json"
    result = CliRunner().invoke(run_command, [str(stack_file), "--capacity", "20KiB", "--micro-batches", "4",
                                              "--schedule", "all", "--passes", "1", "--warmup", "0",
                                              "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "quick check" not in result.output
    data = json.loads(out.read_text())
    assert [s["name"] for s in data["schedules"]] == ["eager", "batched", "token-major", "partition-major"]
    assert data["iters"] == 1


def test_progress_is_never_in_captured_output(stack_file):
    # CliRunner's stderr is not a terminal: no progress line, with or without --quiet.
    for extra in ([], ["--quiet"]):
        result = CliRunner().invoke(run_command, [str(stack_file), "--capacity", "20KiB", *extra])
        assert result.exit_code == 0, result.output
        assert "pass 1/4" not in result.output


def test_run_reports_every_pass_of_every_schedule():
    import cachefit

    plan = cachefit.plan(linear_stack(4, 32, batch=2, seq_len=4), "5KiB", chunk_fraction=0.5, solver="greedy")
    recorder = Recorder()
    with reporting(recorder):
        executor.run(plan, micro_batches=2, schedule=["eager", "partition-major"], warmup=1, iters=2)
    assert recorder.events[0] == ("start", "run", 6)
    details = [event[3] for event in recorder.events if event[0] == "update"]
    assert details == ["eager: pass 1/3 (warm-up)", "eager: pass 2/3 (timed)", "eager: pass 3/3 (timed)",
                       "partition-major: pass 1/3 (warm-up)", "partition-major: pass 2/3 (timed)",
                       "partition-major: pass 3/3 (timed)"]
    assert recorder.events[-1] == ("stop", "run")


def test_bench_reports_every_run():
    from cachefit.bench.solvers import run_benchmark

    recorder = Recorder()
    with reporting(recorder):
        results = run_benchmark(quick=True, families=["chain-uniform"], ns=[20], solvers=["greedy", "dp"], peers=[],
                                time_limit_s=5, repeats=1, capacity_modes=("tight",))
    assert recorder.events[0][:2] == ("start", "benchmark")
    advanced = sum(event[2] or 0 for event in recorder.events if event[0] == "update")
    assert advanced == recorder.events[0][2] == len(results["runs"]) == 2
    details = [event[3] for event in recorder.events if event[0] == "update" and event[3]]
    assert any(detail.endswith(": dp") and detail.startswith(results["runs"][0]["instance"]) for detail in details)


def test_plan_file_over_the_file_limit_is_refused_by_the_one_limit(stack_file, monkeypatch):
    import cachefit

    plan = cachefit.plan(linear_stack(4, 64, batch=2, seq_len=16), "20KiB", solver="greedy")
    path = stack_file.parent / "plan.json"
    plan.to_json(path)
    monkeypatch.setenv("CACHEFIT_MAX_FILE_BYTES", "1000")
    result = CliRunner().invoke(run_command, [str(path)])
    assert result.exit_code == 2
    assert "bytes; cachefit reads files of at most 1,000 bytes (set CACHEFIT_MAX_FILE_BYTES" in " ".join(result.output.split())
    assert "Traceback" not in result.output
