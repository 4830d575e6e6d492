"""`cachefit devices` and `cachefit estimate`: device presets with their sources, and a plan's predicted time."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict

import click
from rich.table import Table
from rich.text import Text

from .clikit import EXIT_OK, console, friendly
from .errors import InputError
from .units import format_bytes, format_count

__all__ = ["devices_command", "estimate_command", "print_kv", "COMMANDS"]


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
    console.print(table)
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


def print_kv(graph, model):
    """Print the KV cache a decode (or cached-context) graph carries: per layer, in total, the formula."""
    if "kv_formula" not in graph.graph:
        raise InputError(f"`--phase`/`--context` need attention layers: {model!r} is not an embedded transformer "
                         "or an HF config.json")
    layers = [data["kv_bytes"] for _, data in graph.nodes(data=True) if data.get("kv_bytes")]
    per_layer = layers[0] if layers else 0
    console.print(f"KV cache ({graph.graph.get('phase', 'prefill')}, context {graph.graph['context']:,} tokens): "
                  f"per layer {graph.graph['kv_formula']} ({format_bytes(per_layer)}); "
                  f"{len(layers)} layers: {graph.graph['kv_bytes']:,} B ({format_bytes(graph.graph['kv_bytes'])})",
                  highlight=False, soft_wrap=True)


def _time(seconds):
    return f"{seconds * 1e6:,.1f} µs" if seconds < 1e-3 else f"{seconds * 1e3:,.3f} ms"


def _group_table(result, max_rows):
    table = Table(title=f"per group and pass ({result.tokens_per_pass:,} tokens, {result.chunks} chunk(s))")
    for column in ("group", "dev", "pinned", "weights", "KV", "flops",
                   "part.-major HBM", "time", "token-major HBM", "time", "batched HBM", "time"):
        table.add_column(column, justify="right")
    rows = list(result.groups)
    shown = rows if len(rows) <= max_rows else rows[: max_rows - 4] + [None] + rows[-3:]
    for group in shown:
        if group is None:
            table.add_row("…", *[""] * 11)
            continue
        cells = [str(group.index), str(group.device), "yes" if group.pinned else "no",
                 format_bytes(group.weight_bytes), format_bytes(group.kv_bytes), format_count(group.flops)]
        for traffic in (group.partition_major, group.token_major, group.batched):
            cells += [format_bytes(traffic.hbm_bytes), _time(traffic.time_s)]
        table.add_row(*cells)
    return table


def _schedule_table(result):
    decode = result.phase == "decode"
    table = Table(title=f"per pass on {result.devices} × {result.device.name} ({result.phase})")
    columns = ["schedule", "HBM bytes", "on-chip bytes", "flops", "launches", "time / pass", "bound", "tokens/s"]
    for column in columns + (["time / output token"] if decode else []):
        table.add_column(column, justify="left" if column in ("schedule", "bound") else "right",
                         no_wrap=column == "schedule", min_width=15 if column == "schedule" else None)
    for item in result.schedules:
        row = [item.schedule, format_bytes(item.hbm_bytes), format_bytes(item.on_chip_bytes),
               format_count(item.flops, "FLOP"), f"{item.launches:,}", _time(item.time_s), item.bound,
               f"{item.tokens_per_s:,.0f}"]
        if decode:
            row.append(_time(item.time_per_output_token_s))
        table.add_row(*row)
    return table


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
    """Predict the time of PLAN_FILE: partition-major, token-major and batched, with the assumptions."""
    from .estimate import estimate
    from .result import Plan, write_text_atomic

    plan = Plan.from_json(plan_file)
    result = estimate(plan, device, devices=devices, kv=kv, launch_s=None if launch_us is None else launch_us * 1e-6)
    console.print(_group_table(result, max_rows))
    console.print(_schedule_table(result))
    console.print("[bold]assumptions[/]")
    for note in result.assumptions:
        console.print(Text(f"  - {note}"), highlight=False)
    if json_path:
        write_text_atomic(json_path, json.dumps(asdict(result), indent=1, default=str) + "\n")
        console.print(f"estimate written to {json_path}", highlight=False)
    sys.exit(EXIT_OK)


#: The commands this module adds to `cachefit`.
COMMANDS = (devices_command, estimate_command)
