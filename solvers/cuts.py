"""Exact fewest groups for narrow DAGs: breadth-first search over the graph's cuts (down-sets).

Every valid plan is a chain of down-sets ∅ = D₀ ⊂ D₁ ⊂ … ⊂ D_k = V (a
down-set holds every predecessor of its members), the p-th group being
D_p \\ D_{p−1}.  The size of that group depends on the pair (D_{p−1}, D_p)
alone: its members, and (liveness) the carried nodes of D_{p−1}, those with
a successor outside D_{p−1}, whose outputs are exactly the earlier
activations live in it.  So the fewest groups is the length of a shortest
path from ∅ to V in the graph whose arcs are the pairs D ⊂ D' with
S(D' \\ D) ≤ C, and a breadth-first search finds it: level i holds every
down-set first reached with i groups, and the first level that holds V is
the optimal k, a proof independent of any other solver.  The arcs out of D
are enumerated by growing D' from D one ready node at a time while the
group fits (both memory models are monotone: a node more never shrinks the
group, so a set that does not fit has no fitting superset on that branch).

The number of down-sets is exponential in the graph's width, so the search
has a state budget and a deadline and gives up (returns None) beyond them:
it is meant for the narrow graphs of sequential models with residual and
branch blocks, where it has a few thousand states for a thousand nodes.
The same enumeration over all pairs is what `cachefit.solvers.brute` does
for n ≤ 12; this one only visits the down-sets reachable within the capacity.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..memory import OpenGroup, get_model

__all__ = ["CutSearch", "fewest_groups", "MAX_CUT_STATES"]

#: The most down-sets `fewest_groups` keeps before it gives up.
MAX_CUT_STATES = 200_000

#: Group sets tried between two looks at the clock.
_CLOCK_EVERY = 256

#: Group sets tried between two projections of the arcs still to come.
_PROJECT_EVERY = 2048


@dataclass(frozen=True)
class CutSearch:
    """The result of `fewest_groups`: the optimal k, one plan with k groups, the down-sets and arcs visited."""

    k: int
    groups: list
    states: int
    arcs: int


class _Masks:
    """The graph as bit masks of positions, and the model's terms for the engine's `OpenGroup`."""

    def __init__(self, table, capacity, memory, chunk_fraction):
        n = table.n
        self.n = n
        self.capacity = int(capacity)
        self.terms = get_model(memory).terms(table)
        self.chunk_fraction = chunk_fraction
        self.live = self.terms.live.tolist() if self.terms.live is not None else [0] * n
        self.pred_mask = [0] * n
        self.succ_mask = [0] * n
        self.successors = table.successors()
        for u, v in zip(table.sources.tolist(), table.targets.tolist()):
            self.pred_mask[v] |= 1 << u
            self.succ_mask[u] |= 1 << v
        self.roots = [v for v in range(n) if not self.pred_mask[v]]

    def ready(self, down, carried):
        """Nodes outside `down` whose predecessors all lie in it (successors of carried nodes, or roots)."""
        candidates = {z for u in carried for z in self.successors[u]}
        candidates.update(self.roots)
        return [z for z in candidates if not (down >> z) & 1 and not self.pred_mask[z] & ~down]

    def open_group(self, carried):
        """An empty `OpenGroup` into which the outputs of the `carried` nodes enter."""
        return OpenGroup(self.terms, self.chunk_fraction, carried=sum(self.live[u] for u in carried))


def _state(group):
    """The aggregates of an `OpenGroup` (Σ summed, max peak, live bytes): all its size depends on."""
    return group.summed, group.peak, group.live


def _load(group, state):
    """Put `OpenGroup` `group` in a branch's `state` (the enumeration branches; one group serves them all)."""
    group.summed, group.peak, group.live = state
    group.members.clear()


def _bits(mask):
    positions = []
    while mask:
        low = mask & -mask
        positions.append(low.bit_length() - 1)
        mask ^= low
    return positions


def _arcs(masks, down, carried, clock):
    """Every (D', group mask) with D' ⊃ `down` a down-set whose new group fits (see the module notes)."""
    capacity = masks.capacity
    seen = set()
    sizes = masks.open_group(carried)
    stack = [(0, _state(sizes), masks.ready(down, carried))]
    while stack:
        group, state, ready = stack.pop()
        for v in ready:
            _load(sizes, state)
            if sizes.size_with(v) > capacity:
                continue
            grown = group | (1 << v)
            if grown in seen:
                continue
            seen.add(grown)
            clock()
            after = down | grown
            next_ready = [z for z in ready if z != v]
            next_ready.extend(z for z in masks.successors[v] if not masks.pred_mask[z] & ~after)
            yield after, grown
            sizes.add(v)
            stack.append((grown, _state(sizes), next_ready))


class _OutOfBudget(Exception):
    pass


def fewest_groups(table, capacity, *, memory="liveness", chunk_fraction=1.0, max_states=MAX_CUT_STATES,
                  max_arcs=None, deadline=None):
    """The optimal k over every valid grouping, and a plan with k groups, or None beyond the budget.

    Parameters
    ----------
    table : LayerTable
    capacity : int
    memory : str
        A name in `cachefit.memory.MODELS`.
    chunk_fraction : float in (0, 1]
    max_states : int
        Give up after this many down-sets.
    max_arcs : int, optional
        Give up after enumerating this many (down-set, group) pairs (default 200 × `max_states`), or
        as soon as the pairs so far, divided by the share of the nodes the deepest down-set reached
        holds, project beyond it (the signature of a wide graph, after one or two levels).
    deadline : Deadline, optional
        A `cachefit.solvers._deadline.Deadline` to give up at.

    Returns
    -------
    CutSearch or None
        None when the budget ran out or no plan exists (some node never fits).

    Notes
    -----
    Breadth-first over down-sets (module notes): O(Σ_D arcs(D)) set
    operations on n-bit integers, each down-set expanded once.

    Examples
    --------
    >>> from cachefit.memory import LayerTable
    >>> result = fewest_groups(LayerTable.chain([40, 30, 20, 50, 10]), 60, memory="additive")
    >>> result.k, result.groups
    (3, [[0], [1, 2], [3, 4]])
    """
    masks = _Masks(table, capacity, memory, chunk_fraction)
    full = (1 << masks.n) - 1
    parent = {0: None}
    carried_of = {0: ()}
    level, k = [0], 0
    ticks, deepest = [0], [0]

    most_arcs = 200 * max_states if max_arcs is None else max_arcs

    def clock():
        ticks[0] += 1
        if ticks[0] > most_arcs:
            raise _OutOfBudget
        if ticks[0] % _CLOCK_EVERY == 0:
            # Projected arcs: those so far over the share of the nodes the deepest down-set holds.
            if ticks[0] % _PROJECT_EVERY == 0 and ticks[0] * masks.n > most_arcs * max(deepest[0], 1):
                raise _OutOfBudget
            if deadline is not None and deadline.expired():
                raise _OutOfBudget

    if deadline is not None and deadline.expired():
        return None
    try:
        while full not in parent:
            k += 1
            level = _next_level(masks, level, parent, carried_of, clock, max_states, deepest)
            if not level:
                return None
    except _OutOfBudget:
        return None
    groups, down = [], full
    while down:
        before = parent[down]
        groups.append(_bits(down & ~before))
        down = before
    return CutSearch(k, groups[::-1], len(parent) - 1, ticks[0])


def _next_level(masks, level, parent, carried_of, clock, max_states, deepest):
    """The down-sets first reached with one group more than those of `level`."""
    reached = []
    succ_mask = masks.succ_mask
    for down in level:
        carried = carried_of[down]
        for after, group in _arcs(masks, down, carried, clock):
            if after in parent:
                continue
            parent[after] = down
            carried_of[after] = tuple(u for u in (*carried, *_bits(group)) if succ_mask[u] & ~after)
            reached.append(after)
            deepest[0] = max(deepest[0], after.bit_count())
            if len(parent) > max_states:
                raise _OutOfBudget
    return reached
