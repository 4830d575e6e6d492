"""Rich tables of a `RunResult`: `render` (no torch; used by ``cachefit run`` and the benchmark)."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text

from ..units import format_bytes
from .results import BASELINES

__all__ = ["render", "summary_lines"]


def _ms(value):
    return "-" if value is None else (f"{value:.3f}" if value < 100 else f"{value:.1f}")


def _times(value):
    return "-" if value is None else f"{value:.2f}×"


def _bytes(value):
    return "n/a" if value is None else format_bytes(value)


def schedules_table(result):
    """One row per schedule: time, throughput, speedups, launches, HBM floor ratio, equivalence."""
    table = Table(title=f"{result.model} on {result.device_name} ({result.device}, {result.dtype}): "
                        f"{result.micro_batches} chunk(s) × {result.chunk_tokens} tokens, "
                        f"{result.plan['k']} group(s)")
    table.add_column("schedule", no_wrap=True)
    table.add_column("ms/pass", justify="right", no_wrap=True)
    table.add_column("tokens/s", justify="right")
    for baseline in BASELINES:
        table.add_column(f"vs {baseline}", justify="right")
    table.add_column("launches/pass", justify="right")
    table.add_column("graphs/pass", justify="right")
    table.add_column("× HBM floor", justify="right")
    table.add_column("equivalence (max |Δ|, rel)", justify="left")
    for schedule in result.schedules:
        speedups = result.speedups.get(schedule.name, {})
        verdict = Text("PASS" if schedule.equivalent else "FAIL",
                       style="green" if schedule.equivalent else "bold red")
        verdict.append(f" {schedule.max_abs_diff:.2e}, {schedule.rel_error:.1e}")
        table.add_row(
            schedule.name, _ms(schedule.ms_per_pass), f"{schedule.tokens_per_s:,.0f}",
            *[_times(speedups.get(baseline)) for baseline in BASELINES],
            "-" if schedule.launches_per_pass is None else f"{schedule.launches_per_pass:,}",
            str(schedule.graph_replays_per_pass),
            "-" if schedule.hbm_floor_ratio is None else f"{schedule.hbm_floor_ratio:.1f}",
            verdict)
    return table


def _held(group):
    """The group's `HeldBytes` at the plan's dtype when known, else as allocated (None when not measured)."""
    return group.held_at_plan_dtype if group.held_at_plan_dtype is not None else group.held


def groups_table(result, *, max_rows=24):
    """One row per group: planned size and K/V against what one chunk held, weights, activations, ms.

    Held bytes are counted at the plan's dtype when the graph names one (the
    title says which); the CUDA allocator's peak is a column of its own when
    it was measured.
    """
    per_group = None
    try:
        per_group = result.schedule("partition-major").per_group_ms
    except KeyError:
        pass
    rows = list(result.groups)
    counted = next((_held(group).dtype for group in rows if _held(group) is not None), None)
    allocator = any(group.measured_bytes is not None for group in rows)
    title = "groups: planned vs measured, one chunk" + (f" (tensor bytes at {counted})" if counted else "")
    table = Table(title=title)
    columns = ["group", "nodes", "first .. last", "planned", "measured", "planned K/V", "measured K/V", "weights",
               "activations"] + (["allocator peak"] if allocator else []) + ["ms (partition-major)"]
    for column in columns:
        table.add_column(column, justify="left" if column.startswith("first") else "right")
    shown = rows if len(rows) <= max_rows else rows[: max_rows - 4] + [None] + rows[-3:]
    for group in shown:
        if group is None:
            table.add_row("…", f"{len(rows) - max_rows + 1} more", *[""] * (len(columns) - 2))
            continue
        span = group.first if group.first == group.last else f"{group.first} .. {group.last}"
        ms = per_group[group.index] if per_group and group.index < len(per_group) else None
        held = _held(group)
        cells = [_bytes(held.total if held else None), "-" if group.planned_kv_bytes is None else
                 _bytes(group.planned_kv_bytes), _bytes(held.kv if held else None),
                 _bytes(held.weights if held else group.weight_bytes), _bytes(held.activations if held else None)]
        table.add_row(str(group.index), str(group.nodes), Text(span), _bytes(group.planned_bytes), *cells,
                      *([_bytes(group.measured_bytes)] if allocator else []), _ms(ms))
    return table


def summary_lines(result):
    """Plain sentences: equivalence, HBM floor, methods, L2, best schedule, notes."""
    lines = []
    passed = sum(schedule.equivalent for schedule in result.schedules)
    lines.append(f"equivalence with the unpartitioned model: {passed}/{len(result.schedules)} schedule(s) "
                 f"pass torch.testing.assert_close ({'PASS' if result.equivalent else 'FAIL'})")
    lines.append(f"HBM floor: {result.hbm_floor_ms:.3f} ms per pass = weights {format_bytes(result.weight_bytes)} "
                 f"/ copy bandwidth {result.copy_bandwidth / 1e9:.1f} GB/s (read + write; "
                 f"{result.bandwidth_method})")
    lines.append(f"timing: {result.timing_method}, {result.warmup} warm-up + {result.iters} timed passes")
    methods = sorted({schedule.launch_method for schedule in result.schedules})
    lines.append("launches: " + "; ".join(methods))
    if result.replay_overhead_us_per_group is not None:
        lines.append(f"graph boundary cost: {result.replay_overhead_us_per_group:.2f} µs per group "
                     "((partition-major − partition-major-fused) / k)")
    if result.replay_overhead_us_per_chunk is not None:
        lines.append(f"per-chunk replay cost: {result.replay_overhead_us_per_chunk:.2f} µs per group and chunk "
                     "((partition-major-replay − partition-major-fused) / (k × chunks), copies included)")
    if result.l2.get("requested"):
        lines.append(f"L2 persistence: {result.l2.get('status', 'not run')}; kernel nodes with a window: "
                     f"{result.l2.get('kernel_nodes_with_window', 0)}")
    best = result.best
    if best is not None:
        text = f"fastest passing schedule: {best.name} ({best.ms_per_pass:.3f} ms/pass)"
        try:
            batched = result.schedule("batched")
            text += f", {batched.ms_per_pass / best.ms_per_pass:.2f}× the batched baseline"
        except KeyError:
            pass
        lines.append(text)
    plan = result.plan
    lines.append(f"plan: k={plan['k']} ({plan['solver']}, {plan['status']}), capacity "
                 f"{format_bytes(plan['capacity'])}, {plan['memory']} memory, chunk fraction "
                 f"{plan['chunk_fraction']:g} (run: {result.run_chunk_fraction:g})")
    lines.extend(f"note: {note}" for note in result.notes)
    return lines


def render(result):
    """The renderables `cachefit run` prints: the schedules table, the groups table, the summary."""
    return [schedules_table(result), groups_table(result), Text("\n".join(summary_lines(result)))]
