"""Limits on what cachefit reads, checked before anything large is allocated.

Every file cachefit parses goes through `read_json_file` (or `read_text_file`):
it must be a regular file (not a device such as ``/dev/zero``, a FIFO, a
socket or a folder), at most `max_file_bytes` long, UTF-8 text, and (for
JSON) nested at most `MAX_JSON_DEPTH` deep with no ``NaN``/``Infinity`` and
no integer longer than Python converts.  Graphs hold at most `max_nodes`
nodes, counted before they are built, and a transformer config is sized from
its dimensions before its graph is built (`check_config_size`).

=========================  ==================  ===============================
limit                      default             override
=========================  ==================  ===============================
file size                  16 MiB              ``CACHEFIT_MAX_FILE_BYTES``
graph nodes                2,000,000           ``CACHEFIT_MAX_NODES``
JSON values                2 × graph nodes     (with ``CACHEFIT_MAX_NODES``)
JSON nesting               100 levels          (fixed)
a config dimension         2**24               (fixed)
experts                    2**16               (fixed)
batch × seq_len            2**32 tokens        (fixed)
one node's bytes or flops  2**60               (fixed, estimated from config)
=========================  ==================  ===============================

The fixed limits are far above real models (Llama-3.1-405B: width 16,384,
126 blocks; DeepSeek-V3: 256 experts, vocabulary 129,280) and far below
where int64 arithmetic or the memory of one machine gives out.

Examples
--------
>>> max_nodes()
2000000
>>> check_node_count(3, what="`layers`")
>>> check_node_count(10**9, what="`layers`")
Traceback (most recent call last):
...
cachefit.errors.InputError: `layers` would make 1,000,000,000 nodes; cachefit plans graphs of at most 2,000,000 (set CACHEFIT_MAX_NODES to raise the limit)
"""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Mapping

from .errors import InputError

__all__ = ["MAX_JSON_DEPTH", "MAX_DIMENSION", "MAX_EXPERTS", "MAX_TOKENS", "MAX_FIGURE", "max_file_bytes", "max_nodes",
           "read_text_file", "parse_json", "read_json_file", "check_node_count", "check_tokens",
           "check_config_size"]

#: Deepest nesting of lists and objects accepted in a JSON input.
MAX_JSON_DEPTH = 100
#: Largest width, vocabulary, head, expert or position count a config may give.
MAX_DIMENSION = 2**24
#: Largest number of experts of a mixture-of-experts config.
MAX_EXPERTS = 2**16
#: Largest batch × seq_len.
MAX_TOKENS = 2**32
#: Largest byte count or flop count one node may be estimated to need.
MAX_FIGURE = 2**60

# 16 MiB: far above real inputs (a plan of Llama-3.1-405B at op granularity, 1,641 nodes, is 0.5 MB),
# and low enough that parsing a pathological file stays within a second or two and ~300 MB
_DEFAULT_FILE_BYTES = 16 * 2**20
_DEFAULT_NODES = 2_000_000


def _env_limit(variable, default):
    text = os.environ.get(variable)
    if text is None or not text.strip():
        return default
    text = text.strip()
    if not text.isdigit() or len(text) > 30 or int(text) < 1:
        raise InputError(f"environment variable {variable} must be a positive integer, got {text[:40]!r}")
    return int(text)


def max_file_bytes():
    """The largest file cachefit reads, in bytes (``CACHEFIT_MAX_FILE_BYTES``, default 16 MiB)."""
    return _env_limit("CACHEFIT_MAX_FILE_BYTES", _DEFAULT_FILE_BYTES)


def max_nodes():
    """The largest graph cachefit builds or reads, in nodes (``CACHEFIT_MAX_NODES``, default 2,000,000)."""
    return _env_limit("CACHEFIT_MAX_NODES", _DEFAULT_NODES)


def check_node_count(count, *, what):
    """Refuse `count` nodes when it exceeds `max_nodes` (before any is built)."""
    limit = max_nodes()
    if count > limit:
        raise InputError(f"{what} would make {count:,} nodes; cachefit plans graphs of at most {limit:,} "
                         "(set CACHEFIT_MAX_NODES to raise the limit)")


def _open_error(exc, what, path):
    reasons = {errno.ENOENT: "no such file", errno.ELOOP: "a loop of symbolic links",
               errno.EACCES: "permission denied", errno.ENAMETOOLONG: "the name is too long",
               errno.ENOTDIR: "a part of the path is not a folder", errno.EISDIR: "is a folder"}
    reason = reasons.get(exc.errno, exc.strerror or type(exc).__name__)
    return InputError(f"cannot read {what} {_show(path)}: {reason}")


def _show(path):
    text = os.fspath(path)
    text = text if isinstance(text, str) else text.decode(errors="replace")
    return repr(text if len(text) <= 200 else text[:200] + "…")


def read_text_file(path, *, what, limit=None):
    """The UTF-8 text of regular file `path`, refused before reading when too large.

    Parameters
    ----------
    path : str or os.PathLike
    what : str
        How error messages name the argument, e.g. ``"`MODEL`"``.
    limit : int, optional
        Largest size in bytes; default `max_file_bytes`.

    Raises
    ------
    InputError
        The file is missing, unreadable, not a regular file, larger than the
        limit, or not UTF-8; the message names `what`, the path and the limit.
    """
    limit = max_file_bytes() if limit is None else limit
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; the checks below run on the open file
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except (OSError, ValueError) as exc:
        if isinstance(exc, ValueError):  # an embedded NUL byte
            raise InputError(f"{what} {_show(path)}: not a valid path") from None
        raise _open_error(exc, what, path) from None
    try:
        info = os.fstat(descriptor)
        if stat.S_ISDIR(info.st_mode):
            raise InputError(f"{what} {_show(path)} is a folder, not a file")
        if not stat.S_ISREG(info.st_mode):
            raise InputError(f"{what} {_show(path)} is not a regular file (a device, FIFO or socket)")
        if info.st_size > limit:
            raise InputError(f"{what} {_show(path)} is {info.st_size:,} bytes; cachefit reads files of at most "
                             f"{limit:,} bytes (set CACHEFIT_MAX_FILE_BYTES to raise the limit)")
        with os.fdopen(os.dup(descriptor), "rb") as stream:
            data = stream.read(limit + 1)  # the file may have grown since fstat
    except OSError as exc:
        raise _open_error(exc, what, path) from None
    finally:
        os.close(descriptor)
    if len(data) > limit:
        raise InputError(f"{what} {_show(path)} is over {limit:,} bytes; cachefit reads files of at most "
                         f"{limit:,} bytes (set CACHEFIT_MAX_FILE_BYTES to raise the limit)")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"{what} {_show(path)} is not UTF-8 text (byte 0x{data[exc.start]:02x} "
                         f"at offset {exc.start})") from None


def _refuse_constant(name):
    raise ValueError(f"{name} is not a JSON number")


def parse_json(text, *, what):
    """Parse JSON `text`; a one-line InputError naming `what` for anything cachefit cannot use.

    Refused: invalid JSON, ``NaN``/``Infinity``, integers longer than
    Python converts (``sys.get_int_max_str_digits``), nesting deeper than
    `MAX_JSON_DEPTH`, and more than 2 × `max_nodes` values (objects, lists
    and items, counted from the text's commas and brackets before parsing:
    each costs up to ~80 bytes once parsed).

    >>> parse_json('[1, {"a": [2]}]', what="`x`")
    [1, {'a': [2]}]
    >>> parse_json("[NaN]", what="`x`")
    Traceback (most recent call last):
    ...
    cachefit.errors.InputError: `x` is not valid JSON: NaN is not a JSON number
    """
    values = text.count(",") + text.count("{") + text.count("[")  # an upper bound: strings' commas count too
    if values > 2 * max_nodes():
        raise InputError(f"{what} holds about {values:,} JSON values; cachefit reads at most "
                         f"{2 * max_nodes():,}, twice its node limit (set CACHEFIT_MAX_NODES to raise it)")
    try:
        data = json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise InputError(f"{what} is nested too deeply (cachefit reads JSON at most {MAX_JSON_DEPTH} levels "
                         "deep)") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{what} is not valid JSON: {exc}") from None
    except ValueError as exc:  # NaN/Infinity, or an integer with too many digits
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "digits" in message:
            message = "a number has more digits than cachefit reads (" + message.split(";")[0] + ")"
        raise InputError(f"{what} is not valid JSON: {message}") from None
    _check_depth(data, what)
    return data


def _check_depth(data, what):
    """Refuse nesting deeper than MAX_JSON_DEPTH (iteratively: no recursion on hostile input)."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            value = value.values()
        elif not isinstance(value, list):
            continue
        if depth > MAX_JSON_DEPTH:
            raise InputError(f"{what} is nested too deeply (cachefit reads JSON at most {MAX_JSON_DEPTH} "
                             "levels deep)")
        stack.extend((item, depth + 1) for item in value if isinstance(item, (dict, list)))


def read_json_file(path, *, what, limit=None):
    """`parse_json` of `read_text_file` (the same arguments and errors)."""
    return parse_json(read_text_file(path, what=what, limit=limit), what=f"{what} {_show(path)}")


def check_tokens(batch, seq_len):
    """Refuse a `batch` or `seq_len` that is not a positive integer, or batch × seq_len over `MAX_TOKENS`.

    None means "the model's default" and is accepted.
    """
    for name, value in (("batch", batch), ("seq_len", seq_len)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise InputError(f"`{name}` must be a positive integer, got {value!r}")
    if batch is not None and seq_len is not None and batch * seq_len > MAX_TOKENS:
        raise InputError(f"`batch` × `seq_len` = {batch * seq_len:,} tokens; cachefit sizes at most "
                         f"{MAX_TOKENS:,} tokens")
    for name, value in (("batch", batch), ("seq_len", seq_len)):
        if value is not None and value > MAX_TOKENS:
            raise InputError(f"`{name}` must be at most {MAX_TOKENS:,}, got {value:,}")


_DIMENSIONS = ("hidden_size", "intermediate_size", "vocab_size", "num_attention_heads", "num_key_value_heads",
               "head_dim", "num_local_experts", "max_position_embeddings", "type_vocab_size")


def check_config_size(config, *, batch=1, seq_len=2048, granularity="block"):
    """Refuse a transformer config whose graph would be too large, before building it.

    The config is normalised as `cachefit.graphs.transformer.transformer`
    would (so its own field errors come first); then every dimension must be
    at most `MAX_DIMENSION`, the node count (``num_hidden_layers`` × ops per
    block at ``"op"`` granularity) at most `max_nodes`, batch × seq_len at
    most `MAX_TOKENS`, and one block's estimated bytes and flops at most
    `MAX_FIGURE`.

    Raises
    ------
    InputError
        Naming the field or the estimate at fault.

    Examples
    --------
    >>> cfg = {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 10**9,
    ...        "num_attention_heads": 32, "intermediate_size": 14336, "vocab_size": 128256}
    >>> check_config_size(cfg)
    Traceback (most recent call last):
    ...
    cachefit.errors.InputError: `config` (1,000,000,000 layers × 17 operators per layer) would make 17,000,000,004 nodes; cachefit plans graphs of at most 2,000,000 (set CACHEFIT_MAX_NODES to raise the limit)
    """
    from .graphs.transformer import normalize_config

    if isinstance(config, Mapping) and "model_type" in config and not isinstance(config["model_type"], str):
        raise InputError(f"`config['model_type']` must be a string, got {config['model_type']!r}")
    check_tokens(batch, seq_len)
    cfg = normalize_config(config)
    for key in _DIMENSIONS:
        value = cfg.get(key)
        if isinstance(value, int) and value > MAX_DIMENSION:
            raise InputError(f"`config['{key}']` must be at most {MAX_DIMENSION:,}, got {value:,}")
    if (cfg.get("num_local_experts") or 0) > MAX_EXPERTS:
        raise InputError(f"`config['num_local_experts']` must be at most {MAX_EXPERTS:,}, "
                         f"got {cfg['num_local_experts']:,}")
    layers, experts = cfg["num_hidden_layers"], max(1, cfg.get("num_local_experts") or 0)
    # the builder's work is layers × operators per block at either granularity
    check_node_count(layers * (16 + experts) + 4,
                     what=f"`config` ({layers:,} layers × {16 + experts:,} operators per layer)")
    hidden, inner = cfg["hidden_size"], cfg["intermediate_size"]
    heads, head_dim = cfg["num_attention_heads"], cfg["head_dim"]
    tokens = batch * seq_len
    block_params = 4 * hidden * heads * head_dim + 3 * hidden * inner * experts
    widest = max(hidden, inner * experts, cfg["vocab_size"], heads * seq_len)
    estimates = {"weight bytes": 4 * max(block_params, hidden * cfg["vocab_size"]),
                 "activation bytes": 4 * tokens * widest,
                 "flops": 2 * tokens * max(block_params, hidden * cfg["vocab_size"]) + 4 * tokens * seq_len * heads
                 * head_dim}
    for figure, value in estimates.items():
        if value > MAX_FIGURE:
            raise InputError(f"`config` is too large for cachefit: one node would need about {value:.2e} {figure} "
                             f"(at most {MAX_FIGURE:.2e}; width {hidden:,}, {experts:,} expert(s), "
                             f"{tokens:,} tokens)")
