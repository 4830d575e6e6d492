"""Exhaustive search over every valid grouping (n ≤ 12): the oracle for tests."""

from __future__ import annotations

from ..errors import InputError
from ..memory import get_model, scale_activation
from ..result import Status
from ._common import Problem, check_k, finish, no_plan, oversize_node

__all__ = ["brute", "MAX_BRUTE_NODES"]

MAX_BRUTE_NODES = 12


def _downsets(n, pred_mask):
    """All node sets closed under predecessors, as bitmasks, smallest first."""
    closed = []
    for mask in range(1 << n):
        ok = True
        rest = mask
        while rest:
            low = rest & -rest
            v = low.bit_length() - 1
            if pred_mask[v] & ~mask:
                ok = False
                break
            rest ^= low
        if ok:
            closed.append(mask)
    return closed


def brute(graph, capacity, *, memory="liveness", chunk_fraction=1.0, k=None, time_limit_s=None, seed=0,
          balance="memory"):
    """Exact plan by exhaustive search over all valid groupings of a DAG (n ≤ 12).

    Every valid ordered grouping is a chain of predecessor-closed node sets
    ∅ = D₀ ⊂ D₁ ⊂ … ⊂ D_k = V, the p-th group being D_p \\ D_{p-1}; and the
    size of that group depends only on (D_{p-1}, D_p): its members, and the
    nodes of D_{p-1} with a successor outside it, which are exactly the
    earlier activations live in it.  The search enumerates every such pair
    (at most 3ⁿ) and runs three exact dynamic programmes over them: the
    fewest groups (or the given k), then the smallest bottleneck (bisection
    over the sizes that occur), then the smallest Σ S² under that bottleneck.
    With ``balance="flops"`` the bottleneck is the largest group's Σ
    ``flops`` (every group still within the capacity in bytes), and Σ S² of
    the bytes breaks ties.

    Its search shares no code with the other solvers (only input
    normalisation, the memory model's per-node terms, the wording of reasons
    and the Plan assembly), so it serves
    as their oracle: it decides infeasibility by its own search, and only
    borrows `oversize_node`'s sentence to say why.  Refuses graphs of more
    than 12 nodes.

    Examples
    --------
    >>> from cachefit.graphs import from_layers
    >>> plan = brute(from_layers([40, 30, 20, 50, 10]), 60, memory="additive")
    >>> plan.sizes, plan.status
    ((40, 50, 60), <Status.OPTIMAL: 'OPTIMAL'>)
    """
    problem = Problem.make(graph, capacity, memory=memory, chunk_fraction=chunk_fraction, k=k,
                           time_limit_s=time_limit_s, seed=seed, balance=balance)
    table = problem.table
    n = table.n
    if n > MAX_BRUTE_NODES:
        raise InputError(f"`graph` has {n} nodes; brute force handles at most {MAX_BRUTE_NODES}")
    if n == 0:
        reason = check_k(problem, 0)
        if reason:
            return no_plan(problem, "brute", Status.INFEASIBLE, reason, lower=0)
        return finish(problem, "brute", [], status=Status.OPTIMAL, lower=0)
    # The memory model's per-node terms (S = Σ summed + max peak + ⌈f·live⌉, `cachefit.memory.Terms`),
    # summed here by the search's own plain-Python loops.
    terms = get_model(problem.memory).terms(table)
    summed = terms.summed.tolist()
    peak = terms.peak.tolist() if terms.peak is not None else None
    live = terms.live.tolist() if terms.live is not None else [0] * n
    pred_mask = [0] * n
    succ_mask = [0] * n
    for u, v in zip(table.sources.tolist(), table.targets.tolist()):
        pred_mask[v] |= 1 << u
        succ_mask[u] |= 1 << v
    full = (1 << n) - 1
    downsets = _downsets(n, pred_mask)
    is_downset = set(downsets)

    def members(mask):
        return [v for v in range(n) if mask >> v & 1]

    flops = problem.flops.tolist() if problem.flops is not None else [0] * n
    # Edges of the search: (D, D') with D ⊂ D' both closed, S(D' \ D), and the value the
    # bottleneck is taken over: S itself, or Σ flops (balance="flops").
    transitions = {}
    for before in downsets:
        outside = full & ~before
        carried = sum(live[u] for u in members(before) if succ_mask[u] & outside)
        sub = outside
        while sub:
            after = before | sub
            if after in is_downset:
                group = members(sub)
                size = sum(summed[v] for v in group)
                if peak is not None:
                    size += max(peak[v] for v in group)
                if terms.live is not None:
                    size += scale_activation(carried + sum(live[v] for v in group), problem.chunk_fraction)
                if size <= problem.capacity:
                    key = sum(flops[v] for v in group) if problem.balance == "flops" else size
                    transitions.setdefault(before, []).append((after, size, key))
            sub = (sub - 1) & outside

    def fewest(limit):
        """Fewest groups, each of size <= limit, to go from ∅ to V (None if impossible)."""
        best = {0: 0}
        for before in downsets:  # increasing masks: a superset comes later
            if before not in best:
                continue
            for after, size, _ in transitions.get(before, ()):
                if size <= limit and best.get(after, n + 1) > best[before] + 1:
                    best[after] = best[before] + 1
        return best.get(full)

    def reachable_with(count, limit):
        """Is V reachable in exactly `count` groups whose bottleneck value is <= limit?"""
        layer = {0}
        for _ in range(count):
            layer = {after for before in layer for after, _, key in transitions.get(before, ()) if key <= limit}
        return full in layer

    minimum_k = fewest(problem.capacity)
    if minimum_k is None:  # proved by the search above; say why in the common words when one node is to blame
        reason = oversize_node(problem) or ("no valid grouping fits: activations passing through every order "
                                            "overflow the capacity")
        return no_plan(problem, "brute", Status.INFEASIBLE, reason)
    reason = check_k(problem, minimum_k)
    if reason:
        return no_plan(problem, "brute", Status.INFEASIBLE, reason, lower=minimum_k)
    target = problem.k or minimum_k
    if not reachable_with(target, float("inf")):
        return no_plan(problem, "brute", Status.INFEASIBLE,
                       f"no valid grouping has exactly k = {target} groups within the capacity", lower=minimum_k)
    candidates = sorted({key for edges in transitions.values() for _, _, key in edges})
    low, high = 0, len(candidates) - 1  # candidates[high] always works
    while low < high:
        middle = (low + high) // 2
        if reachable_with(target, candidates[middle]):
            high = middle
        else:
            low = middle + 1
    bottleneck = candidates[low]
    # Smallest Σ S² with exactly `target` groups, each <= bottleneck; keep the argmin path.
    layer = {0: (0, [])}
    for _ in range(target):
        following = {}
        for before, (cost, path) in layer.items():
            for after, size, key in transitions.get(before, ()):
                if key <= bottleneck:
                    candidate = cost + size * size
                    if after not in following or candidate < following[after][0]:
                        following[after] = (candidate, path + [after])
        layer = following
    _, path = layer[full]
    groups, previous = [], 0
    for mask in path:
        groups.append(members(mask & ~previous))
        previous = mask
    return finish(problem, "brute", groups, status=Status.OPTIMAL, lower=minimum_k,
                  stats={"downsets": len(downsets), "transitions": sum(map(len, transitions.values()))})
