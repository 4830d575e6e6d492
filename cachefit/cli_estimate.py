"""`cachefit devices` and `cachefit estimate`: device presets with their sources, and a plan's predicted time."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict

import click
from rich.table import Table
from rich.text import Text

from .clikit import EXIT_NO_PLAN, EXIT_OK, console, friendly, kv_default, model_options, print_table, write_plan
from .errors import InputError
from .units import format_bytes, format_count

__all__ = ["devices_command", "estimate_command", "deploy_command", "print_kv", "print_prefix_kv", "print_deployment",
           "COMMANDS"]


def _size(num_bytes):
    if num_bytes is None:
        return "unpublished"
    binary = num_bytes % 2**20 == 0
    return format_bytes(num_bytes, binary=binary, precision=0 if num_bytes % (2**30 if binary else 10**9) == 0
                        or num_bytes % (2**20 if binary else 10**6) == 0 else 1)


def _rate(value, unit="B/s"):
    if value is None:
        return "unpublished"
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G")):
        if value >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


@click.command("devices")
@click.option("--sources", is_flag=True, help="Also show where every figure comes from.")
@friendly
def devices_command(sources):
    """List the device presets: on-chip and off-chip memory, bandwidths, peak dense BF16 FLOP/s."""
    from .devices import DEVICES, PRESETS

    table = Table(title="device presets (caches in binary units, HBM/GDDR/SRAM decimal)")
    for column in ("device", "on-chip", "off-chip", "off-chip BW", "on-chip BW", "peak BF16"):
        table.add_column(column, justify="left" if column == "device" else "right")
    for device in PRESETS.values():
        off_chip = f"{device.memory_kind} {_size(device.memory_bytes)}" if device.memory_kind else "none"
        table.add_row(device.name, f"{device.on_chip_kind} {_size(device.on_chip_bytes)}", off_chip,
                      _rate(device.memory_bandwidth) if device.memory_kind else "-",
                      _rate(device.on_chip_bandwidth), _rate(device.peak_flops, "FLOP/s"))
    print_table(table)
    console.print(Text("unpublished: the vendor gives no figure (none is guessed). --capacity names: "
                       + ", ".join(DEVICES)), highlight=False)
    if not sources:
        console.print("(`cachefit devices --sources` says where every figure comes from)", highlight=False)
    for device in PRESETS.values() if sources else ():
        console.print(f"[bold]{device.name}[/]: {device.label}", highlight=False)
        for key, text in device.sources.items():
            console.print(Text(f"  {key}: {text}"), highlight=False)
        if device.notes:
            console.print(Text(f"  note: {device.notes}"), highlight=False)
    sys.exit(EXIT_OK)


def print_kv(graph, model, *, memory=None):
    """Print the KV cache a decode (or cached-context) graph carries: per layer, in total, the formula.

    With `memory` (a memory model name), also where the plan puts the cache.
    """
    if "kv_formula" not in graph.graph:
        raise InputError(f"`--phase`/`--context` need attention layers: {model!r} is not an embedded transformer "
                         "or an HF config.json")
    layers = [data["kv_bytes"] for _, data in graph.nodes(data=True) if data.get("kv_bytes")]
    per_layer = layers[0] if layers else 0
    if not graph.graph.get("kv_bytes"):
        console.print(f"KV cache ({graph.graph.get('phase', 'prefill')}, context {graph.graph['context']:,} "
                      "tokens): empty, no token is cached", highlight=False, soft_wrap=True)
        return
    console.print(f"KV cache ({graph.graph.get('phase', 'prefill')}, context {graph.graph['context']:,} tokens): "
                  f"per layer {graph.graph['kv_formula']} ({format_bytes(per_layer)}); "
                  f"{len(layers)} layers: {graph.graph['kv_bytes']:,} B ({format_bytes(graph.graph['kv_bytes'])})",
                  highlight=False, soft_wrap=True)
    if memory is not None:
        from .memory import kv_placement

        where = ("resident: in each group's size S(P), like its weights" if kv_placement(memory) == "resident"
                 else "streamed: not in S(P); read from off-chip memory at every step (`cachefit estimate` counts it)")
        console.print(f"KV cache {where} (memory model {memory})", highlight=False, soft_wrap=True)


def print_prefix_kv(plan, *, memory):
    """Print the chunked-prefill K/V term of `plan` when its chunks split sequences (nothing otherwise).

    A chunk inside a sequence attends to the K/V of the chunks of that
    sequence before it (`cachefit.graphs.kv.prefix_formula`); with `memory`
    a ``+kv`` model it is in each attention node's size, else it is read
    from off-chip memory and not in S(P).
    """
    from .graphs.kv import node_kv_bytes_per_token, prefix_formulas, prefix_tokens
    from .memory import kv_placement

    graph = plan.graph
    if graph is None or plan.chunk_fraction >= 1 or graph.graph.get("phase", "prefill") != "prefill":
        return
    seq_len, batch = graph.graph.get("seq_len"), graph.graph.get("batch", 1)
    per_token = node_kv_bytes_per_token(graph) if seq_len else {}
    if not per_token or not prefix_tokens(seq_len, batch, plan.chunk_fraction):
        return
    where = ("resident: in each attention node's size S(P)" if kv_placement(memory) == "resident"
             else "streamed: not in S(P), read from off-chip memory (--kv resident counts it on chip)")
    console.print(f"K/V of the earlier chunks, per attention node ({len(per_token)}): "
                  f"{prefix_formulas(graph, plan.chunk_fraction)}; {where}",
                  highlight=False, soft_wrap=True)


def _time(seconds):
    return f"{seconds * 1e6:,.1f} µs" if seconds < 1e-3 else f"{seconds * 1e3:,.3f} ms"


def _group_tables(result, max_rows):
    """Per group and pass, stacked to fit 80 columns: what each group holds, then HBM bytes and time per schedule."""
    title = f"per group and pass ({result.tokens_per_pass:,} tokens, {result.chunks} chunk(s))"
    held = Table(title=title)
    for column in ("group", "device", "pinned", "weights", "KV", "flops"):
        held.add_column(column, justify="right")
    traffic = Table(title=f"HBM bytes and time per group and pass ({result.device.name})")
    for column in ("group", "partition-major", "token-major", "batched"):
        traffic.add_column(column, justify="right")
    rows = list(result.groups)
    shown = rows if len(rows) <= max_rows else rows[: max_rows - 4] + [None] + rows[-3:]
    for group in shown:
        if group is None:
            held.add_row("…", *[""] * 5)
            traffic.add_row("…", *[""] * 3)
            continue
        held.add_row(str(group.index), str(group.device), "yes" if group.pinned else "no",
                     format_bytes(group.weight_bytes), format_bytes(group.kv_bytes), format_count(group.flops))
        traffic.add_row(str(group.index), *(f"{format_bytes(item.hbm_bytes)}, {_time(item.time_s)}"
                                            for item in (group.partition_major, group.token_major, group.batched)))
    return held, traffic


def _schedule_tables(result):
    """Per pass and schedule, stacked to fit 80 columns: bytes, flops and launches, then time and throughput."""
    decode = result.phase == "decode"
    where = f"{result.devices} × {result.device.name} ({result.phase})"
    work = Table(title=f"per pass on {where}: traffic and work")
    for column in ("schedule", "HBM bytes", "on-chip bytes", "flops", "launches"):
        work.add_column(column, justify="left" if column == "schedule" else "right")
    speed = Table(title=f"per pass on {where}: time")
    for column in ["schedule", "time / pass", "bound", "tokens/s"] + (["time / output token"] if decode else []):
        speed.add_column(column, justify="left" if column in ("schedule", "bound") else "right")
    for item in result.schedules:
        work.add_row(item.schedule, format_bytes(item.hbm_bytes), format_bytes(item.on_chip_bytes),
                     format_count(item.flops, "FLOP"), f"{item.launches:,}")
        row = [item.schedule, _time(item.time_s), item.bound, f"{item.tokens_per_s:,.0f}"]
        if decode:
            row.append(_time(item.time_per_output_token_s))
        speed.add_row(*row)
    return work, speed


def _read_plan_or_deployment(path):
    from pathlib import Path

    from .result import read_plan

    return read_plan(Path(path))


def _exit_if_check_fails(plan):
    """Exit 1, one line per violation as `cachefit check` prints them, when `cachefit.check` rejects `plan`."""
    from .checker import check

    report = check(plan)
    if report.ok:
        return
    console.print(f"[red]{len(report.violations)} violation(s)[/] (`cachefit check` rejects this plan; "
                  "nothing is estimated):", highlight=False, soft_wrap=True)
    for violation in report.violations:
        console.print(Text(f"  - {violation}"), highlight=False, soft_wrap=True)
    sys.exit(EXIT_NO_PLAN)


@click.command("estimate")
@click.argument("plan_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--device", default="h100", show_default=True,
              help="A preset (see `cachefit devices`) or 'measured' (copy and GEMM probes on this machine, torch).")
@click.option("--devices", type=int, default=1, show_default=True, help="Devices the groups are dealt to, in order.")
@click.option("--kv", type=click.Choice(["streamed", "resident"]), default=None,
              help="Where the KV cache lives (default: the plan's choice, else streamed).")
@click.option("--launch-us", type=float, default=None,
              help="Assumed µs per group launch (default 5 on GPUs, 0 on SRAM-only chips).")
@click.option("--max-rows", type=int, default=12, show_default=True, help="Group rows shown.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the estimate here.")
@friendly
def estimate_command(plan_file, device, devices, kv, launch_us, max_rows, json_path):
    """Predict the time of PLAN_FILE (a plan, or a two-level plan): partition-major, token-major, batched.

    The plan is checked first (`cachefit check`): one that fails is refused, exit 1.
    """
    from .estimate import estimate
    from .result import write_text_atomic

    if launch_us is not None and not 0 <= launch_us < math.inf:  # named as the user spelled it, not as `launch_s`
        raise InputError(f"`--launch-us` must be a non-negative number of microseconds, got {launch_us:g}")
    plan = _read_plan_or_deployment(plan_file)
    _exit_if_check_fails(plan)
    result = estimate(plan, device, devices=devices, kv=kv, launch_s=None if launch_us is None else launch_us * 1e-6)
    for table in _group_tables(result, max_rows):
        print_table(table)
    for table in _schedule_tables(result):
        print_table(table)
    console.print("[bold]assumptions[/]")
    for note in result.assumptions:
        console.print(Text(f"  - {note}"), highlight=False)
    if json_path:
        write_text_atomic(json_path, json.dumps(asdict(result), indent=1, default=str) + "\n")
        console.print(f"estimate written to {json_path}", highlight=False)
    sys.exit(EXIT_OK)


@click.command("deploy")
@click.argument("model")
@click.option("--devices", type=int, required=True, help="Pipeline stages, one per device.")
@click.option("--device-capacity", required=True, help="Memory of one device: bytes or a name (h100-hbm, ...).")
@click.option("--capacity", "-c", required=True, help="On-chip capacity of every group: bytes or a name (h100-l2, ...).")
@click.option("--reserve", default="0", show_default=True, help="Bytes kept free on every device.")
@model_options(decode=True, kv=True, chunk_tokens="auto")
@click.option("--tile", is_flag=True, default=False, help="Tile nodes too large for the on-chip capacity.")
@click.option("--solver", default="auto", show_default=True, help="Solver of the on-chip level.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the deployment here.")
@friendly
def deploy_command(model, devices, device_capacity, capacity, reserve, batch, seq_len, dtype, granularity, phase,
                   context, kv, tile, chunk_tokens, solver, json_path):
    """Plan MODEL on DEVICES devices (stages) with on-chip groups inside each, and check both levels.

    --kv applies to the on-chip groups: the stages always count the K/V cache
    (it lives in device memory).

    The same as `cachefit plan MODEL --devices N --device-capacity C --capacity C2 --kv ...`.
    """
    from .deploy import deploy
    from .loading import load_model

    kv = kv_default(kv, model)
    graph = load_model(model, batch=batch, seq_len=seq_len, dtype=dtype, granularity=granularity, phase=phase,
                       context=context)
    if phase != "prefill" or context:
        print_kv(graph, model, memory="liveness+kv" if kv == "resident" else "liveness")
    if chunk_tokens not in (None, "auto"):
        if not chunk_tokens.isdigit():
            raise InputError(f"`--chunk-tokens` must be a positive integer or 'auto', got {chunk_tokens!r}")
        chunk_tokens = int(chunk_tokens)
    result = deploy(graph, devices=devices, device_capacity=device_capacity, capacity=capacity, reserve=reserve,
                    kv=kv, tile=tile, chunk_tokens=chunk_tokens, solver=solver)
    reports = print_deployment(result)
    if json_path and result.ok:
        write_plan(result, json_path)  # a failed write is one line naming --json
    sys.exit(EXIT_OK if result.ok and all(reports) else EXIT_NO_PLAN)


def print_deployment(result):
    """Print a two-level plan's stages (one row per device) and the check of both levels; return the reports."""
    table = Table(title=f"{result.devices} device(s) × on-chip groups")
    for column in ("stage", "first .. last node", "stage bytes", "stage flops", "groups", "status", "largest group"):
        table.add_column(column, justify="left" if column.startswith("first") else "right")
    flops = result.stages.stats.get("flops") or [0] * result.stages.k
    for index, (nodes, size) in enumerate(zip(result.stages.partitions, result.stages.sizes)):
        sub = result.groups[index] if index < len(result.groups) else None
        table.add_row(str(index), Text(f"{nodes[0]} .. {nodes[-1]}"), format_bytes(size), format_count(flops[index]),
                      str(sub.k) if sub else "-", str(sub.status) if sub else "-",
                      format_bytes(sub.bottleneck) if sub and sub.ok else "-")
    print_table(table)
    capacity = format_bytes(result.capacity) if result.capacity is not None else "?"
    console.print(f"stages: {result.stages.memory}, within {format_bytes(result.device_capacity)} each; "
                  f"on chip: {result.groups[0].memory if result.groups else '-'}, within {capacity}",
                  highlight=False, soft_wrap=True)
    copies = (result.stages.stats.get("table_copies") or {}) if result.stages.ok else {}
    for node, size in copies.items():
        stage = next(index for index, nodes in enumerate(result.stages.partitions) if node in nodes)
        owner = result.graph.nodes[node].get("tied_to")
        console.print(Text(f"tied: {node} (stage {stage}) shares its table with {owner!r} in another stage; "
                           f"stage {stage} counts its own copy, {size:,} B ({format_bytes(size)})"), soft_wrap=True)
    if not result.ok:
        console.print(Text(f"{result.status}: {result.reason}"), soft_wrap=True)
    if not result.stages.ok and result.graph is not None:
        print_device_advice(result.stages)
    reports = result.check() if result.ok else ()
    names = ["stages", *(f"stage {index} on chip" for index in range(len(result.groups)))]
    for name, report in zip(names, reports):
        for violation in report.violations:
            console.print(Text(f"{name}: {violation}"), soft_wrap=True)
    if reports:
        console.print(f"check: {'[green]ok[/]' if all(reports) else '[red]violations[/]'} "
                      f"({len(reports)} plans recomputed independently, and each stage's link to its on-chip plan); "
                      f"{result.k} on-chip groups in all", highlight=False, soft_wrap=True)
    return reports


def print_device_advice(stage_plan):
    """Say what makes an INFEASIBLE stage level feasible: more devices or more memory per device, each planned.

    Tiling is named only to say why it cannot help: the stage level keeps
    nodes whole, so a node larger than one device needs a larger device.
    """
    from .advice import suggest_devices
    from .stages import format_device

    stats = stage_plan.stats
    total, reserve = stats.get("device_capacity"), stats.get("reserve", 0)
    if total is None or stats.get("devices") is None:
        return
    advice = suggest_devices(stage_plan.graph, devices=stats["devices"], device_capacity=total, reserve=reserve,
                             memory=stage_plan.memory, balance=stats.get("balance", "flops"))
    lines = ["advice for the stage level (each planned before it is printed):"]
    flags = {words[0]: " ".join(words) for words, _ in advice.options()}
    if advice.devices is not None:
        lines.append(f"  {flags['--devices']}: the fewest devices of {format_device(total)}"
                     + (f" less {format_bytes(reserve)} reserve" if reserve else "") + " that hold the model")
    if advice.device_capacity is not None:
        lines.append(f"  {flags['--device-capacity']}: {advice.device_capacity:,} B per device (reserve included, "
                     f"within 1 % of the least) holds the model on {stats['devices']} device(s)")
    if advice.oversize_node is not None:
        lines.append(f"  node {advice.oversize_node!r} needs {format_bytes(advice.oversize_bytes)} alone, more than "
                     f"one device less its reserve ({format_bytes(total - reserve)}): no number of devices holds it; "
                     "the stage level keeps nodes whole (--tile splits nodes for the on-chip level only, and tensor "
                     "parallelism is not modelled), so only a larger --device-capacity helps")
    if len(lines) == 1:
        lines.append("  none found: no number of devices and no device memory tried gives a stage plan")
    console.print(Text("\n".join(lines)), highlight=False, soft_wrap=True)


#: The commands this module adds to `cachefit`.
COMMANDS = (devices_command, estimate_command, deploy_command)
