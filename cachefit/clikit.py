"""What every `cachefit` command shares: consoles, exit codes, error handling, model options.

Commands defined in their own modules (`cli_run`, `cli_bench`, `cli_stages`)
import from here, not from `cachefit.cli`, which imports them.
"""

from __future__ import annotations

import functools
import sys

import click
from rich.console import Console
from rich.markup import escape

from .errors import CachefitError, InputError

__all__ = ["EXIT_OK", "EXIT_NO_PLAN", "EXIT_BAD_INPUT", "console", "error_console", "friendly", "model_options",
           "memory_option", "stream_options", "kv_default", "OneLineGroup", "write_plan", "print_table", "DTYPES",
           "MEMORY_MODELS", "MEMORY_MODELS_KV"]

console = Console()
error_console = Console(stderr=True)

#: 0 success, 1 no plan (INFEASIBLE/UNKNOWN) or a violation, 2 bad input.
EXIT_OK, EXIT_NO_PLAN, EXIT_BAD_INPUT = 0, 1, 2


def friendly(function):
    """Turn cachefit's input errors into a one-line message and exit code 2 (no traceback)."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except (CachefitError, FileNotFoundError) as exc:
            error_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            sys.exit(EXIT_BAD_INPUT)
    return wrapper


def _one_line(text):
    text = " ".join(str(text).split())
    return text if len(text) <= 400 else text[:400] + "…"


class OneLineGroup(click.Group):
    """A click group whose usage errors are one line on stderr, exit 2 (no usage block).

    ``cachefit plan x --k abc`` answers ``error: --k: 'abc' is not a valid
    integer. (see `cachefit plan --help`)``.
    """

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:  # `cachefit` alone: the help, as click prints it
            exc.show()
            sys.exit(exc.exit_code)
        except click.UsageError as exc:
            command = exc.ctx.command_path if exc.ctx is not None else "cachefit"
            error_console.print(f"[bold red]error:[/] {escape(_one_line(exc.format_message()))} "
                                f"(see `{escape(command)} --help`)", highlight=False, soft_wrap=True)
            sys.exit(EXIT_BAD_INPUT)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click.Abort:
            error_console.print("aborted", highlight=False)
            sys.exit(EXIT_NO_PLAN)
        sys.exit(code if isinstance(code, int) else EXIT_OK)


def print_table(table):
    """Print a rich table whose cells are never cut or wrapped (only its headers may wrap).

    Every column is at least as wide as its widest cell; when that is wider
    than the console (80 columns when piped), the table is printed at its
    narrowest width rather than cut to "3,335…" or "block.2.f…".
    """
    for column in table.columns:
        widest = max((console.measure(cell).maximum for cell in column.cells), default=0)
        word = max(map(len, str(column.header).split()), default=0)
        column.min_width = max(column.min_width or 0, widest, word)
    narrowest = console.measure(table, options=console.options.update_width(10**4)).minimum
    if narrowest > console.width:
        console.print(table, width=narrowest, crop=False)
    else:
        console.print(table)


def write_plan(plan, json_path):
    """Write `plan` to `--json` atomically; a failure is a one-line InputError naming ``--json``."""
    try:
        plan.to_json(json_path)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise InputError(f"`--json` {str(json_path)!r}: cannot write the plan there: {reason}; "
                         "nothing was written") from None
    console.print(f"plan written to {json_path}", highlight=False)


#: The dtypes a model's graph can be built in (bytes planned per element).
DTYPES = ("bf16", "fp16", "fp32", "fp8", "int8")

#: Memory models a command that plans offers with ``--memory``; ``+kv`` ones count resident K/V.
MEMORY_MODELS = ("liveness", "additive")  # the plain models (K/V streamed), default first
MEMORY_MODELS_KV = (*MEMORY_MODELS, *(f"{name}+kv" for name in MEMORY_MODELS))  # the registry's four


def _apply(function, options):
    for option in reversed(options):
        function = option(function)
    return function


def model_options(function=None, *, granularity="block", granularity_why=None, decode=False, kv=False,
                  chunk_tokens=None):
    """The options that turn a model name into a graph, the same in every command that takes a MODEL.

    Always ``--batch``, ``--seq-len``, ``--dtype``, ``--granularity``.  Use
    as ``@model_options`` or ``@model_options(...)``.

    Parameters
    ----------
    granularity : {"block", "op"}
        The default granularity; a command whose default is not ``"block"``
        says why in `granularity_why` (shown in ``--help``).
    decode : bool
        Add ``--phase`` and ``--context`` (a decode step over a cached context).
    kv : bool
        Add ``--kv streamed|resident`` (where the K/V cache is counted).
    chunk_tokens : {None, "auto", "int"}
        Add ``--chunk-tokens``: ``"auto"`` takes ``N`` or ``auto`` (a string
        the command parses), ``"int"`` a positive integer.
    """
    if function is None:
        return functools.partial(model_options, granularity=granularity, granularity_why=granularity_why,
                                 decode=decode, kv=kv, chunk_tokens=chunk_tokens)
    why = f" Default {granularity}, {granularity_why}" if granularity_why else ""
    options = [
        click.option("--batch", type=int, default=None, help="Batch size (default: the model's, else 1)."),
        click.option("--seq-len", type=int, default=None, help="Tokens per sequence (default: the model's, else 2048)."),
        click.option("--dtype", default="bf16", show_default=True, type=click.Choice(DTYPES),
                     help="The graph's dtype (bytes planned per element)."),
        click.option("--granularity", default=granularity, show_default=True, type=click.Choice(["block", "op"]),
                     help="One node per transformer block, or per operator." + why),
    ]
    return _apply(function, options + _stream_list(decode, kv, chunk_tokens))


def stream_options(function=None, *, decode=False, kv=False, chunk_tokens=None):
    """`model_options`' ``--phase``/``--context``, ``--kv`` and ``--chunk-tokens`` alone (same parameters),
    for a command that lists them apart from the others in its ``--help``."""
    if function is None:
        return functools.partial(stream_options, decode=decode, kv=kv, chunk_tokens=chunk_tokens)
    return _apply(function, _stream_list(decode, kv, chunk_tokens))


def _stream_list(decode, kv, chunk_tokens):
    options = []
    if decode:
        options += [
            click.option("--phase", default="prefill", show_default=True, type=click.Choice(["prefill", "decode"]),
                         help="decode: one generation step, BATCH new tokens attending to --context cached tokens."),
            click.option("--context", type=int, default=None,
                         help="Tokens already in the KV cache (decode default: --seq-len); sets kv_bytes per "
                              "attention layer."),
        ]
    if kv:
        options.append(click.option(
            "--kv", default=None, type=click.Choice(["streamed", "resident"]),
            help="K/V cache (decode context, earlier chunks of a sequence) in each group's size (resident: memory "
                 "model NAME+kv) or read from off-chip memory (streamed).  Default: a plan file's choice, else "
                 "streamed."))
    if chunk_tokens == "auto":
        options.append(click.option(
            "--chunk-tokens", default=None, metavar="N|auto",
            help="Tokens per streaming pass (sets the chunk fraction from batch × seq_len); 'auto' picks the "
                 "largest chunk among those giving the fewest groups."))
    elif chunk_tokens == "int":
        options.append(click.option(
            "--chunk-tokens", type=int, default=None,
            help="Tokens per streaming pass (sets the chunk fraction from batch × seq_len); a chunk smaller "
                 "than seq_len attends to the K/V of its sequence's earlier chunks."))
    return options


def kv_default(kv, model):
    """`kv` when given, else what MODEL records if it is a plan file planned with a ``+kv`` model
    ("resident"), else "streamed" (so re-planning a plan file keeps where its K/V cache lives)."""
    if kv is not None:
        return kv
    from pathlib import Path

    from .limits import read_json_file
    from .result import PLAN_FORMAT

    path = Path(model)
    try:
        data = read_json_file(path, what="`MODEL`") if path.suffix == ".json" and path.is_file() else None
    except (CachefitError, OSError):
        data = None  # not a plan file: the loader says what is wrong with it
    memory = data.get("memory") if isinstance(data, dict) and data.get("format") == PLAN_FORMAT else None
    return "resident" if isinstance(memory, str) and memory.endswith("+kv") else "streamed"


def memory_option(*, plus_kv=False, why=None):
    """``--memory``: the memory model, liveness by default; `plus_kv` also offers the ``+kv`` models
    (for commands without ``--kv``: ``NAME+kv`` is ``--kv resident``)."""
    text = "How a group's bytes are counted (liveness: activations while live; additive: all of them)."
    if plus_kv:
        text += " NAME+kv also counts the K/V cache in each group (plan's --kv resident)."
    return click.option("--memory", default="liveness", show_default=True,
                        type=click.Choice(MEMORY_MODELS_KV if plus_kv else MEMORY_MODELS),
                        help=text + (f" {why}" if why else ""))
