"""Lower bounds on the number of groups, valid for both memory models.

Every bound here is a number L such that no valid plan has fewer than L
groups; `lower_bound` returns the best of them and every solver reports it.

Notes
-----
Sum bound.  Additive: Σ_p S(p) = Σ_v (w + a + b), so k ≥ ⌈Σ(w+a+b) / C⌉.
Liveness: Σ_p S(p) ≥ Σ_v w + max_v b + ⌈f Σ_v a⌉, because every node is
live in at least its own group, every group holds its own largest buffer
(so the sum of maxima is at least the global maximum), and ⌈x⌉ + ⌈y⌉ ≥ ⌈x + y⌉;
hence k ≥ ⌈(Σw + max b + ⌈fΣa⌉) / C⌉.  Both are at least ⌈Σw / C⌉.
"""

from __future__ import annotations

from ..memory import scale_activation

__all__ = ["sum_bound", "lower_bound"]


def _ceil_div(numerator, denominator):
    return -((-int(numerator)) // int(denominator))


def sum_bound(table, capacity, *, memory="liveness", chunk_fraction=1.0):
    """⌈total forced bytes / C⌉ (see the module notes for the argument)."""
    if table.n == 0:
        return 0
    if memory == "additive":
        total = int(table.weight.sum()) + int(table.activation.sum()) + int(table.buffer.sum())
    else:
        total = (int(table.weight.sum()) + int(table.buffer.max())
                 + scale_activation(int(table.activation.sum()), chunk_fraction))
    return max(1, _ceil_div(total, capacity))


def lower_bound(table, capacity, *, memory="liveness", chunk_fraction=1.0):
    """The best proven lower bound on k for `table` under `memory`."""
    return sum_bound(table, capacity, memory=memory, chunk_fraction=chunk_fraction)
