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

from .errors import CachefitError

__all__ = ["EXIT_OK", "EXIT_NO_PLAN", "EXIT_BAD_INPUT", "console", "error_console", "friendly", "model_options"]

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


def model_options(function):
    """The options that turn a model name into a graph: batch, sequence length, dtype, granularity."""
    options = [
        click.option("--batch", type=int, default=None, help="Batch size (default: the model's, else 1)."),
        click.option("--seq-len", type=int, default=None, help="Tokens per sequence (default: the model's, else 2048)."),
        click.option("--dtype", default="bf16", show_default=True,
                     type=click.Choice(["bf16", "fp16", "fp32", "fp8", "int8"])),
        click.option("--granularity", default="block", show_default=True, type=click.Choice(["block", "op"]),
                     help="One node per transformer block, or per operator."),
    ]
    for option in reversed(options):
        function = option(function)
    return function
