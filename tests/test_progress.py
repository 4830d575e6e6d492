"""`cachefit.progress`: library code reports, only an installed reporter shows it, stdout never carries it."""

import io

from rich.console import Console

import cachefit
from cachefit.chunks import choose_chunk_tokens
from cachefit.loading import load_model
from cachefit.progress import Reporter, RichReporter, cli_reporter, current_reporter, reporting, task


class Recorder(Reporter):
    def __init__(self):
        self.events = []

    def start(self, name, total=None):
        self.events.append(("start", name, total))
        return len(self.events)

    def update(self, task_id, *, completed=None, advance=0, detail=None):
        self.events.append(("update", task_id, advance, detail))

    def stop(self, task_id):
        self.events.append(("stop", task_id))


def test_without_a_reporter_nothing_happens(capsys):
    assert current_reporter() is None
    with task("quiet", total=3) as progress:
        progress.advance(detail="one")
        progress.update(completed=3)
    assert capsys.readouterr() == ("", "")


def test_chunk_search_reports_every_probe():
    graph = load_model("gpt2")
    recorder = Recorder()
    with reporting(recorder):
        choice = choose_chunk_tokens(graph, "50MiB", tile=True)
    starts = [event for event in recorder.events if event[0] == "start"]
    assert starts == [("start", "chunk search (tiling each chunk)", len(choice.probes))]
    details = [event[3] for event in recorder.events if event[0] == "update"]
    assert details[:2] == ["1 tokens: k = 6", "2 tokens: k = 6"] and details[-1] == "1,024 tokens: no plan"
    assert recorder.events[-1][0] == "stop"
    assert current_reporter() is None  # uninstalled after the block


def test_advice_reports_what_it_tries():
    from cachefit.advice import suggest

    recorder = Recorder()
    with reporting(recorder):
        suggest(load_model("gpt2"), "50MiB")
    details = [event[3] for event in recorder.events if event[0] == "update" and event[3]]
    assert "tile=True, chunk_tokens=auto" in details


def test_cli_reporter_only_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert cli_reporter(quiet=False, stream=io.StringIO()) is None
    assert cli_reporter(quiet=True, stream=Terminal()) is None
    assert isinstance(cli_reporter(quiet=False, stream=Terminal()), RichReporter)


def test_rich_reporter_writes_to_its_console_only(capsys):
    stream = io.StringIO()
    reporter = RichReporter(Console(file=stream, force_terminal=True, width=100))
    with reporting(reporter):
        cachefit.plan(load_model("gpt2"), "50MiB", tile=True, chunk_tokens="auto", solver="greedy")
    assert capsys.readouterr().out == ""
    assert "chunk search" in stream.getvalue()
