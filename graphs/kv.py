"""The KV cache of a transformer's attention layers: bytes per token, per layer, per step.

During decode every attention layer reads the keys and values of all the
tokens already generated.  `kv_bytes` is that cache for one layer:

standard attention (multi-head, grouped-query, multi-query)
    2 × kv_heads × head_dim × dtype bytes × cached tokens × batch
    (a key and a value vector per KV head and token);
latent attention (DeepSeek MLA: the config has ``kv_lora_rank``)
    (kv_lora_rank + qk_rope_head_dim) × dtype bytes × cached tokens × batch
    (one compressed latent plus the shared RoPE key per token; the per-head
    keys and values are re-expanded from it);

where cached tokens = context, or min(context, w − 1) on a layer with a
sliding window of w tokens.  The window is HF transformers' (``sliding_window``
in the config): a query at position q attends to the keys at positions
q − w < t ≤ q, w tokens counting itself (``masking_utils.sliding_window_overlay``:
``kv_idx > q_idx - sliding_window``; its sliding cache keeps the last w − 1
tokens), the same for mistral, mixtral, gemma2, gemma3, qwen2/3, phi3 and
starcoder2.  So a query needs at most w − 1 earlier tokens
(`attended_tokens`); that one function caps the decode cache here and the
chunked-prefill prefix below.  Which layers are local follows the HF config
(`layer_window`, `layer_is_local`): ``layer_types`` when given; gemma2
every other layer, gemma3_text five of every ``sliding_window_pattern`` = 6;
Qwen2/Qwen3 the layers from ``max_window_layers`` on and only with
``use_sliding_window``; every other family (Mistral) all layers when
``sliding_window`` is set.  `mark_windows` writes each local attention
node's w as its ``sliding_window`` attribute (prefill and decode graphs
alike), the one place the memory models read it from.

`annotate` sets ``kv_bytes`` on the attention nodes (and on whole-block
nodes, which hold their attention) of a graph the transformer builder is
making, and adds the flops of attending to the cached tokens.

Chunked prefill (a sequence streamed in chunks of c < s tokens) holds K/V
too: the chunk's queries attend to the keys and values of the tokens of its
sequence before it, the N = ``context`` tokens already cached (the graph
attribute `annotate` sets; 0 when absent) and the P = c × (⌈s / c⌉ − 1)
new tokens before the last chunk.  Under a sliding window w the last
chunk's first query reaches back over min(N + P, w − 1) of them, of which
the cache (``kv_bytes``) already holds min(N, w − 1).
`node_kv_bytes_per_token` says what each attention node caches per token
(the same per-token formula), `node_windows` which nodes have a sliding
window, `graph_context` the cached tokens, `chunk_tokens` and
`prefix_tokens` how many tokens a chunk attends to beyond the cache at a
chunk fraction f — attended(N + P) − attended(N), which is P without a
window — and `prefix_formula` writes it out; the memory models count
kv_prefix_bytes(v) = kv_bytes_per_token(v) × prefix_tokens (see
`cachefit.memory`).

Examples
--------
>>> llama8b = {"num_key_value_heads": 8, "head_dim": 128}
>>> kv_bytes(llama8b, context=4096, batch=8, dtype_size=2)
134217728
>>> kv_bytes({"kv_lora_rank": 512, "qk_rope_head_dim": 64}, context=4096, batch=1, dtype_size=2)
4718592
"""

from __future__ import annotations

from numbers import Integral

from ..errors import InputError

__all__ = ["PHASES", "ATTENTION_OPS", "WINDOW_KEYS", "kv_bytes", "kv_bytes_per_token", "cached_tokens", "layer_is_local",
           "layer_window", "attended_tokens", "kv_formula", "annotate", "mark_windows", "check_phase",
           "node_kv_bytes_per_token", "node_windows", "graph_context", "chunk_tokens", "prefix_tokens",
           "prefix_formula", "node_prefix_bytes", "prefix_formulas"]

#: The config fields that say which layers are local and their window (`layer_window`); the
#: transformer builder keeps them in its graph's normalised config so a rebuild (tiling's
#: operator graph) windows the same layers.
WINDOW_KEYS = ("sliding_window", "use_sliding_window", "layer_types", "sliding_window_pattern", "max_window_layers")

#: The phases a transformer graph can be built for.
PHASES = ("prefill", "decode")

#: Ops whose node holds an attention over its sequence (a whole ``block`` holds its layer's attention).
ATTENTION_OPS = ("attention", "mla_attention", "block")


def check_phase(phase, context, seq_len):
    """Validate `phase` and `context`; return (phase, context) with the default context filled in.

    Decode's default context is `seq_len` (the prompt already in the cache);
    prefill's is 0 (no cache before the prompt).
    """
    if phase not in PHASES:
        raise InputError(f"`phase` must be one of {', '.join(map(repr, PHASES))}, got {phase!r}")
    if context is None:
        return phase, (seq_len if phase == "decode" else 0)
    if isinstance(context, bool) or not isinstance(context, Integral) or context < 0:
        raise InputError(f"`context` must be a non-negative integer (tokens already in the KV cache), "
                         f"got {context!r}")
    return phase, int(context)


def _positive_key(config, key):
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise InputError(f"`config['{key}']` must be a positive integer for the KV cache, got {value!r}")
    return int(value)


def kv_bytes_per_token(config, dtype_size):
    """Bytes one attention layer caches per token of one sequence (see the module docstring)."""
    if config.get("kv_lora_rank"):
        return (_positive_key(config, "kv_lora_rank")
                + int(config.get("qk_rope_head_dim") or 0)) * dtype_size
    return 2 * _positive_key(config, "num_key_value_heads") * _positive_key(config, "head_dim") * dtype_size


# Families whose sliding window covers only some layers when the config has no `layer_types`:
# gemma2 alternates local and global layers (0, 2, 4, ... local); gemma3_text has `sliding_window_pattern`
# (default 6: five local layers, then one global); Qwen2/Qwen3 (and their MoE) window the layers from
# `max_window_layers` on, and only with `use_sliding_window`.
_QWEN = ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe")


def _window(config):
    """The config's sliding window in tokens, or None (none, null, 0, or switched off)."""
    window = config.get("sliding_window")
    if window is None or window == 0 or config.get("use_sliding_window") is False:
        return None
    if config.get("model_type") in _QWEN and not config.get("use_sliding_window"):
        return None  # HF Qwen2/Qwen3 drop the window unless use_sliding_window is true
    if isinstance(window, bool) or not isinstance(window, Integral) or window < 0:
        raise InputError(f"`config['sliding_window']` must be a non-negative integer (tokens), got {window!r}")
    return int(window)


def _positive_setting(config, key, default):
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise InputError(f"`config['{key}']` must be a positive integer, got {value!r}")
    return int(value)


def layer_is_local(config, layer):
    """Whether attention layer `layer` (0-based; None: "every layer") is a sliding-window layer.

    Follows the HF configs: an explicit ``layer_types`` list
    (``"sliding_attention"`` / ``"full_attention"``) wins; else gemma2 has
    every other layer local (0, 2, ...), gemma3_text all but every
    ``sliding_window_pattern``-th (default 6), Qwen2/Qwen3 the layers from
    ``max_window_layers`` on; every other family windows all layers.

    >>> [layer_is_local({"model_type": "gemma3_text", "sliding_window": 512}, i) for i in range(6)]
    [True, True, True, True, True, False]
    """
    if _window(config) is None:
        return False
    types = config.get("layer_types")
    if types is not None:
        if not isinstance(types, list) or not all(isinstance(kind, str) for kind in types):
            raise InputError(f"`config['layer_types']` must be a list of strings, got {types!r}")
        if layer is None:
            return bool(types) and all(kind == "sliding_attention" for kind in types)
        if layer >= len(types):
            raise InputError(f"`config['layer_types']` has {len(types)} entries; layer {layer} has none")
        return types[layer] == "sliding_attention"
    family = config.get("model_type")
    if family == "gemma2":
        return layer is not None and (layer + 1) % 2 != 0
    if family == "gemma3_text":
        pattern = _positive_setting(config, "sliding_window_pattern", 6)
        return layer is not None and (layer + 1) % pattern != 0
    if family in _QWEN:
        first = config.get("max_window_layers", 28)
        if isinstance(first, bool) or not isinstance(first, Integral) or first < 0:
            raise InputError(f"`config['max_window_layers']` must be a non-negative integer, got {first!r}")
        return first == 0 if layer is None else layer >= first
    return True


def layer_window(config, layer=None):
    """The sliding window w (tokens, the query counted) of attention layer `layer`, or None for a global layer.

    `layer` None asks for a layer of a model whose layers are all alike: the
    window applies only when every layer is local (Mistral), not to
    gemma's alternating local/global layers.

    >>> [layer_window({"model_type": "gemma2", "sliding_window": 4096}, i) for i in range(3)]
    [4096, None, 4096]
    """
    return _window(config) if layer_is_local(config, layer) else None


def attended_tokens(tokens, window=None):
    """Of `tokens` earlier tokens, how many a query attends to: all, or w − 1 under a sliding window w.

    HF's window counts the query itself (keys at q − w < t ≤ q), so a query
    reaches back over at most w − 1 earlier tokens.  The one home of that
    convention: the decode cache (`cached_tokens`) and the chunked-prefill
    prefix (`prefix_tokens`) both cap with it.

    >>> attended_tokens(8192), attended_tokens(8192, 4096), attended_tokens(100, 4096), attended_tokens(5, 1)
    (8192, 4095, 100, 0)
    """
    return tokens if window is None else min(tokens, window - 1)


def cached_tokens(config, context, layer=None):
    """Cached tokens attention layer `layer` reads: `context`, or w − 1 of them under its sliding window w."""
    return attended_tokens(context, layer_window(config, layer))


def kv_bytes(config, *, context, batch, dtype_size, layer=None):
    """Attention layer `layer`'s KV cache in bytes at `context` tokens for `batch` sequences."""
    return kv_bytes_per_token(config, dtype_size) * cached_tokens(config, context, layer) * batch


def _one_formula(config, *, tokens, context, batch, dtype_size):
    window = (f" (sliding window {_window(config):,}, the new token's included, of context {context:,})"
              if tokens != context else "")
    if config.get("kv_lora_rank"):
        head = (f"({config['kv_lora_rank']} kv_lora_rank + {int(config.get('qk_rope_head_dim') or 0)} "
                f"qk_rope_head_dim)")
    else:
        head = f"2 × {config['num_key_value_heads']} kv_heads × {config['head_dim']} head_dim"
    total = kv_bytes_per_token(config, dtype_size) * tokens * batch
    return f"{head} × {dtype_size} B × {tokens:,} tokens{window} × {batch} batch = {total:,} B"


def kv_formula(config, *, context, batch, dtype_size, layers=None):
    """The KV formula of one layer with the numbers, e.g. ``'2 × 8 kv_heads × 128 head_dim × 2 B × ...'``.

    With `layers` (the attention layers' indices) and a model that mixes
    sliding-window and global layers, one formula per kind with its count.

    >>> kv_formula({"num_key_value_heads": 8, "head_dim": 128}, context=4096, batch=8, dtype_size=2)
    '2 × 8 kv_heads × 128 head_dim × 2 B × 4,096 tokens × 8 batch = 134,217,728 B'
    """
    if not layers:
        return _one_formula(config, tokens=cached_tokens(config, context), context=context, batch=batch,
                            dtype_size=dtype_size)
    counts = {}
    for layer in layers:
        tokens = cached_tokens(config, context, layer)
        counts[tokens] = counts.get(tokens, 0) + 1
    if len(counts) == 1:
        return _one_formula(config, tokens=next(iter(counts)), context=context, batch=batch, dtype_size=dtype_size)
    return "; ".join(f"{_one_formula(config, tokens=tokens, context=context, batch=batch, dtype_size=dtype_size)}"
                     f" on {count} {'local' if tokens != context else 'global'} layer{'s' * (count != 1)}"
                     for tokens, count in sorted(counts.items(), reverse=True))


def annotate(graph, config, *, context, dtype_size):
    """Set ``kv_bytes`` and the cached tokens' attention flops on `graph`'s attention and block nodes.

    For the batch × seq_len new query tokens, attending to the cached
    tokens costs 4 × batch × seq_len × cached tokens × heads × head_dim
    flops (QKᵀ and AV), added to the node's ``flops``.  A node's cached
    tokens are those of its layer (its ``layer`` attribute): `context`, or
    the sliding window for a local layer (`cached_tokens`).  Sets graph
    attributes ``phase``-independent ``context``, ``kv_bytes`` (the total
    over layers), ``kv_layers`` (how many layers hold a cache, also when
    `context` is 0) and ``kv_formula``.  Works on the graph being built
    (the builder's own), whose windows `mark_windows` has marked, and caps
    each node's cache by its ``sliding_window``.
    """
    batch, seq_len = graph.graph["batch"], graph.graph["seq_len"]
    total, layers, per_token = 0, [], None
    for _, data in graph.nodes(data=True):
        if data.get("op") in ATTENTION_OPS:  # mla_attention too: DeepSeek's op graphs had no KV
            layer = data.get("layer")
            per_token = kv_bytes_per_token(config, dtype_size) if per_token is None else per_token
            tokens = attended_tokens(context, data.get("sliding_window"))
            data["kv_bytes"] = per_token * tokens * batch
            data["flops"] = data.get("flops", 0) + (4 * batch * seq_len * tokens * config["num_attention_heads"]
                                                    * config["head_dim"])
            total += data["kv_bytes"]
            layers.append(layer)
    graph.graph.update(context=context, kv_bytes=total, kv_layers=len(layers),
                       kv_formula=kv_formula(config, context=context, batch=batch, dtype_size=dtype_size,
                                             layers=None if None in layers else layers))
    return graph


def mark_windows(graph, config):
    """Set ``sliding_window`` (w, `layer_window`) on `graph`'s attention and block nodes of local layers.

    Every node whose ``op`` is in `ATTENTION_OPS` and whose ``layer`` is
    local in `config` gets its window; a global one gets none.  The
    transformer builder calls it for every phase, so prefill graphs carry the
    windows the chunked-prefill term caps with (`node_windows`) and decode
    graphs the ones their cache is capped with (`annotate`).  Works on the
    graph being built; returns it.
    """
    for _, data in graph.nodes(data=True):
        if data.get("op") in ATTENTION_OPS:
            window = layer_window(config, data.get("layer"))
            if window is None:
                data.pop("sliding_window", None)
            else:
                data["sliding_window"] = window
    return graph


def node_windows(graph):
    """The sliding window w of every node of `graph` that has one (its ``sliding_window`` attribute).

    w counts the query itself, as in HF transformers: a query attends to at
    most w − 1 earlier tokens (`attended_tokens`).  `mark_windows` sets it
    on transformer graphs; any graph may set it on its attention nodes.

    Returns
    -------
    dict
        node → w (a positive integer), only for nodes with a window.

    Raises
    ------
    InputError
        A ``sliding_window`` that is not a positive integer, naming the node.

    Examples
    --------
    >>> from cachefit.instances import load
    >>> windows = node_windows(load("gemma-2-9b"))
    >>> len(windows), windows["block.0"], "block.1" in windows  # 21 local layers of 42
    (21, 4096, False)
    """
    windows = {}
    for node, data in graph.nodes(data=True):
        value = data.get("sliding_window")
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
            raise InputError(f"node {node!r}: `sliding_window` must be a positive integer of tokens (the query "
                             f"counted), got {value!r}")
        windows[node] = int(value)
    return windows


def node_kv_bytes_per_token(graph):
    """K/V bytes per token of one sequence of every node of `graph` that holds an attention.

    A node's ``kv_bytes_per_token`` attribute when it has one (any graph: an
    importer that recognises an attention module sets it); otherwise, in a
    transformer graph (graph attributes ``config`` and ``dtype``, as
    `cachefit.graphs.transformer` builds), every node whose ``op`` is in
    `ATTENTION_OPS` caches `kv_bytes_per_token` (config, dtype bytes).  A
    graph whose ``config`` has neither ``num_key_value_heads`` and
    ``head_dim`` nor ``kv_lora_rank`` (not a transformer config) derives
    nothing.

    Returns
    -------
    dict
        node → bytes per token (only nodes with a positive value).

    Raises
    ------
    InputError
        A ``kv_bytes_per_token`` that is not a non-negative integer (naming
        the node), or a config without the KV fields.

    Examples
    --------
    >>> from cachefit.instances import load
    >>> node_kv_bytes_per_token(load("gpt2"))["block.0"]  # 2 × 12 kv_heads × 64 head_dim × 2 B
    3072
    """
    from ..units import dtype_bytes

    attributes = graph.graph if isinstance(getattr(graph, "graph", None), dict) else {}
    config = attributes.get("config")
    transformer = isinstance(config, dict) and (config.get("kv_lora_rank")
                                                or {"num_key_value_heads", "head_dim"} <= config.keys())
    dtype_size = dtype_bytes(attributes.get("dtype", "bf16")) if transformer else None
    per_token = {}
    derived = None
    for node, data in graph.nodes(data=True):
        value = data.get("kv_bytes_per_token")
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, Integral) or value < 0:
                raise InputError(f"node {node!r}: `kv_bytes_per_token` must be a non-negative integer of bytes, "
                                 f"got {value!r}")
        elif dtype_size is not None and data.get("op") in ATTENTION_OPS:
            if derived is None:
                derived = kv_bytes_per_token(config, dtype_size)
            value = derived
        if value:
            per_token[node] = int(value)
    return per_token


def chunk_tokens(chunk_fraction, tokens):
    """Tokens per chunk at fraction f of `tokens` = batch × seq_len: f × tokens to the nearest integer, ≥ 1.

    f is taken as the exact rational its float denotes, so ``64 / 1024`` of
    1,024 tokens is 64 and ``0.1`` of 10 is 1 (the float is a hair above).

    >>> chunk_tokens(0.0625, 1024), chunk_tokens(0.1, 10), chunk_tokens(1 / 3, 3), chunk_tokens(1e-9, 8)
    (64, 1, 1, 1)
    """
    from fractions import Fraction

    scaled = Fraction(chunk_fraction) * tokens
    return max(1, int(scaled + Fraction(1, 2)))  # the nearest integer, halves up (scaled > 0)


def _chunk_start(seq_len, chunk):
    """Where a sequence's last chunk starts: c × (⌈s / c⌉ − 1), or 0 when c ≥ s (whole sequences)."""
    return 0 if chunk >= seq_len else chunk * (-(-seq_len // chunk) - 1)


def graph_context(graph):
    """The tokens already in `graph`'s KV cache: its ``context`` attribute, 0 when absent.

    `annotate` records it on decode graphs and on prefill graphs built with a
    context (`cachefit.graphs.transformer`); a prefill graph without one
    starts from an empty cache.

    Raises
    ------
    InputError
        A ``context`` that is not a non-negative integer.

    >>> from cachefit.instances import load
    >>> graph_context(load("gemma-2-9b", seq_len=4096, context=2048)), graph_context(load("gemma-2-9b"))
    (2048, 0)
    """
    value = graph.graph.get("context") or 0
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 0:
        raise InputError(f"the graph's `context` must be a non-negative integer (tokens already in the KV cache), "
                         f"got {value!r}")
    return int(value)


def prefix_tokens(seq_len, batch, chunk_fraction, window=None, context=0):
    """Tokens a sequence's chunk attends to beyond its cache, at most over its chunks (0 unless chunks split sequences).

    With c = `chunk_tokens` (f, batch × seq_len) < seq_len = s, a sequence is
    streamed in ⌈s / c⌉ chunks of c tokens (the last may be shorter; a chunk
    never spans two sequences) after the N = `context` tokens already in
    the cache; chunk j starts at position N + p, p = j·c.  Its first query
    reaches back furthest, under causal attention to every earlier token
    (N + p of them), under a sliding window w to the keys at
    N + p − w < t < N + p; later queries of the chunk reach back less far.
    So the chunk attends to `attended_tokens` (N + p, w) = min(N + p, w − 1)
    earlier tokens, which grows with p: the largest is the last chunk's,
    p = P = c × (⌈s / c⌉ − 1) (s − c when c divides s).  The cache
    (``kv_bytes``) holds attended(N) = min(N, w − 1) of them, so the chunk
    needs

        attended(N + P) − attended(N)

    tokens more: P without a window, min(P, w − 1) with N = 0, and 0 once
    the cache fills the window (w − 1 ≤ N).  With c ≥ s a chunk holds whole
    sequences and nothing before it: 0.

    >>> prefix_tokens(1024, 1, 0.0625), prefix_tokens(1000, 1, 0.3), prefix_tokens(8, 4, 0.25)
    (960, 900, 0)
    >>> prefix_tokens(8192, 1, 1024 / 8192, window=4096), prefix_tokens(8192, 1, 1024 / 8192, window=8192)
    (4095, 7168)
    >>> prefix_tokens(4096, 1, 1024 / 4096, window=4096, context=2048)  # 4,095 − 2,048 cached
    2047
    >>> prefix_tokens(4096, 1, 1024 / 4096, window=4096, context=4096), prefix_tokens(4096, 1, 0.25, context=4096)
    (0, 3072)
    """
    before = _chunk_start(seq_len, chunk_tokens(chunk_fraction, seq_len * batch))
    return attended_tokens(context + before, window) - attended_tokens(context, window)


def prefix_formula(per_token, seq_len, batch, chunk_fraction, window=None, context=0):
    """The chunked-prefill K/V term of one node (sliding window `window`, or None), written out with its numbers.

    >>> prefix_formula(3072, 1024, 1, 0.0625)
    '3,072 B/token × 960 tokens before the last 64-token chunk of 1,024 = 2,949,120 B'
    >>> prefix_formula(8192, 8192, 1, 1024 / 8192, window=4096)  # gemma-2-9b's local layers
    '8,192 B/token × 4,095 tokens (sliding window 4,096: w − 1 of the 7,168 before the last 1,024-token chunk of 8,192) = 33,546,240 B'
    >>> prefix_formula(8192, 4096, 1, 1024 / 4096, window=4096, context=2048)
    '8,192 B/token × 2,047 tokens (sliding window 4,096: w − 1 = 4,095 of the 2,048 cached + 3,072 before the last 1,024-token chunk of 4,096, less the 2,048 in the cache) = 16,769,024 B'
    """
    chunk = chunk_tokens(chunk_fraction, seq_len * batch)
    before = _chunk_start(seq_len, chunk)
    tokens = prefix_tokens(seq_len, batch, chunk_fraction, window, context)
    if not before:
        return f"0 B (chunks of {chunk:,} tokens hold whole sequences of {seq_len:,})"
    if tokens != before and context:
        reach, cached = attended_tokens(context + before, window), attended_tokens(context, window)
        return (f"{per_token:,} B/token × {tokens:,} tokens (sliding window {window:,}: w − 1 = {reach:,} of the "
                f"{context:,} cached + {before:,} before the last {chunk:,}-token chunk of {seq_len:,}, less the "
                f"{cached:,} in the cache) = {per_token * tokens:,} B")
    if tokens != before:
        return (f"{per_token:,} B/token × {tokens:,} tokens (sliding window {window:,}: w − 1 of the {before:,} "
                f"before the last {chunk:,}-token chunk of {seq_len:,}) = {per_token * tokens:,} B")
    return (f"{per_token:,} B/token × {tokens:,} tokens before the last {chunk:,}-token chunk of {seq_len:,} = "
            f"{per_token * tokens:,} B")


def node_prefix_bytes(graph, chunk_fraction):
    """kv_prefix(v) = kv_bytes_per_token(v) × `prefix_tokens` (with v's window and the graph's context) of every K/V node.

    For reports (the CLI, the executor's planned-vs-measured note); the
    memory models compute the same term over a `LayerTable`.  Reads the
    graph attributes ``seq_len``, ``batch`` and ``context``
    (`graph_context`); a graph without ``seq_len`` or ``batch`` (which the
    memory models refuse to plan with K/V per token) or without K/V nodes
    gives {}.

    >>> from cachefit.instances import load
    >>> prefix = node_prefix_bytes(load("gemma-2-9b", seq_len=8192), 1024 / 8192)
    >>> prefix["block.0"], prefix["block.1"]  # local (4,095 tokens), global (7,168) × 8,192 B/token
    (33546240, 58720256)
    >>> prefix = node_prefix_bytes(load("gemma-2-9b", seq_len=4096, context=2048), 1024 / 4096)
    >>> prefix["block.0"], prefix["block.1"]  # local (4,095 − 2,048 cached), global (3,072) × 8,192 B/token
    (16769024, 25165824)
    """
    per_token = node_kv_bytes_per_token(graph)
    seq_len, batch = graph.graph.get("seq_len"), graph.graph.get("batch")
    if not per_token or not seq_len or not batch:
        return {}
    windows, context = node_windows(graph), graph_context(graph)
    return {node: value * prefix_tokens(seq_len, batch, chunk_fraction, windows.get(node), context)
            for node, value in per_token.items()}


def prefix_formulas(graph, chunk_fraction):
    """`prefix_formula` of each kind of K/V node of `graph` (bytes per token, window) with its count, or None.

    One kind (every node alike): its formula alone.  None when no node
    holds K/V, the graph lacks ``seq_len`` or ``batch``, or the chunks hold
    whole sequences.

    >>> from cachefit.instances import load
    >>> print(prefix_formulas(load("gemma-3-1b", seq_len=8192), 32 / 8192).replace("; ", ";\\n"))
    1,024 B/token × 8,160 tokens before the last 32-token chunk of 8,192 = 8,355,840 B on 4 nodes;
    1,024 B/token × 511 tokens (sliding window 512: w − 1 of the 8,160 before the last 32-token chunk of 8,192) = 523,264 B on 22 nodes
    """
    per_token = node_kv_bytes_per_token(graph)
    seq_len, batch = graph.graph.get("seq_len"), graph.graph.get("batch")
    if not per_token or not seq_len or not batch or not prefix_tokens(seq_len, batch, chunk_fraction):
        return None
    windows, context = node_windows(graph), graph_context(graph)
    counts = {}
    for node, value in per_token.items():
        kind = value, windows.get(node)
        counts[kind] = counts.get(kind, 0) + 1
    kinds = sorted(counts, key=lambda kind: (-kind[0] * prefix_tokens(seq_len, batch, chunk_fraction, kind[1],
                                                                      context), kind[1] or 0))
    if len(kinds) == 1:
        value, window = kinds[0]
        return prefix_formula(value, seq_len, batch, chunk_fraction, window, context)
    return "; ".join(f"{prefix_formula(value, seq_len, batch, chunk_fraction, window, context)} on "
                     f"{counts[value, window]} node{'s' * (counts[value, window] != 1)}" for value, window in kinds)
