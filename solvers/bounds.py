"""Lower bounds on the number of groups, valid for every memory model of the registry.

Every bound here is a number L such that no valid plan has fewer than L
groups; `lower_bound` returns the best of them and every solver reports it.

Notes
-----
Write S(P) for the size of a group under the chosen model and f for the chunk
fraction.  Every model of `cachefit.memory.MODELS` has the shape
S(P) = Σ_{v∈P} s(v) + max_{v∈P} b(v) + ⌈f · Σ_{u live in P} a(u)⌉ with its
own per-node terms (`cachefit.memory.Terms`: s summed, b peak, a live; a
term the model lacks counts 0), and the bounds below read only those terms,
so a model added to the registry needs no change here.  The notes write them
for the two base models: ``additive`` is s = w + a + b with no peak or live
term; ``liveness`` is s = w, peak b, live a (the ``+kv`` models add each
node's KV bytes to s).

**Sum bound** (`sum_bound`).  Additive: Σ_p S(p) = Σ_v (w + a + b), so
k ≥ ⌈Σ(w+a+b) / C⌉.  Liveness: Σ_p S(p) ≥ Σ_v w + max_v b + ⌈f Σ_v a⌉,
because every node is live in at least its own group, every group holds its
own largest buffer (so the sum of the maxima is at least the global maximum),
and ⌈x⌉ + ⌈y⌉ ≥ ⌈x + y⌉; hence k ≥ ⌈(Σw + max b + ⌈fΣa⌉) / C⌉.

**Item sizes** (`item_sizes`).  The L2 and head–tail bounds need a size per node,
item(v), with Σ_{v∈P} item(v) ≤ S(P) for every group P of every valid plan,
whatever the other groups are.  Additive: item(v) = w + a + b, and the sum
is S(P) itself.  Liveness: item(v) = w + ⌊f·a⌋.  Every member of P is live
in P (part(v) = p ≤ last(v)), so S(P) ≥ Σ_{v∈P} w + ⌈f Σ_{v∈P} a⌉ ≥
Σ_{v∈P} w + Σ_{v∈P} ⌊f a⌋ (the floor of each term is at most its share of
the sum).  The buffer term is a maximum, not a sum, so it is not spread over
the items; instead every group holds at least one node, hence at least the
smallest buffer, and the bin capacity is taken as C − min_v b.

**Martello–Toth L2** (`l2_bound`).  With those items, every plan is a
packing of the items into k bins of capacity C' (precedence dropped), so any
bin-packing lower bound is a lower bound on k.  L2 = max over α ∈ {0} ∪
{item sizes ≤ C'/2} of |J1| + |J2| + max(0, ⌈(ΣJ3 − (|J2|·C' − ΣJ2)) / C'⌉),
with J1 = {items > C' − α}, J2 = {C' − α ≥ items > C'/2} and
J3 = {C'/2 ≥ items ≥ α}: no two items of J1 ∪ J2 share a bin, no item of J3
shares a bin with one of J1, and what of J3 does not fit in the free space
of the J2 bins needs further bins.

**Head–tail bound** (`head_tail_bound`).  All ancestors of v and v itself
lie in groups 0..part(v), each holding at most C' of item sizes, so
part(v) + 1 ≥ H_v = ⌈items(ancestors(v) ∪ {v}) / C'⌉; v and its descendants
lie in groups part(v)..k−1, so k − part(v) ≥ T_v, the same with
descendants.  Adding, k ≥ H_v + T_v − 1 for every v (the station bounds of
assembly-line balancing).  Needs the reachability matrix (`reachability`:
O(n·e) vectorised row unions, n² bytes), so it is computed for
n ≤ `MAX_REACH_NODES` only.

**Heaviest-path bound** (`path_bound`).  Along any directed path
v₁ → v₂ → … → v_m, part() never decreases, so the path splits into
contiguous runs, each inside one group, distinct runs in distinct groups:
k ≥ the number of runs.  Give each run R a size L(R) ≤ S(group holding R)
that never shrinks when R grows: additive L(R) = Σ_{v∈R}(w + a + b);
liveness L(R) = Σ_{v∈R} w + max_{v∈R} b + ⌈f·Σ_{u ∈ R ∪ pred(R)} a_u⌉, valid
because every member of R is in the group and every predecessor u of a member
is either in the group or in an earlier one with a consumer in this group,
so live in it either way.  Greedy cutting is optimal for such monotone run
sizes (the argument of `cachefit.solvers.greedy`), so greedy's count of runs
on the path with capacity C is at most the number of runs in any plan, hence
at most k.  The path used is the heaviest by item size (longest path in the
DAG, O(n + e)).  For a chain the path is the whole chain and L(R) is exactly
S(R), so the bound equals the optimal k; `lower_bound` then returns it
without computing the others, which cannot exceed it.

**Liveness span bound** (`span_bound`, models with a live term).  The sum bound counts
every activation once, but u's output is live in every group from part(u) to
last(u), so Σ_p live_p = Σ_u a_u · (last(u) − part(u) + 1).  For an edge
u → z, the nodes M(u, z) = {u, z} ∪ (descendants(u) ∩ ancestors(z)) all lie
in the m = part(z) − part(u) + 1 groups part(u)..part(z), and u is live in
each of them.  Each of those groups holds at most C' = C − min b of item
sizes (module notes, item sizes), and each but part(u) also holds u's live
output, at least ⌊f·a_u⌋ more (⌈f·Σ⌉ ≥ Σ⌊f·x⌋ over the live activations), so
m·C' ≥ items(M) + (m − 1)·⌊f·a_u⌋, that is
m ≥ ⌈(items(M) − ⌊f·a_u⌋) / (C' − ⌊f·a_u⌋)⌉ when C' > ⌊f·a_u⌋ (else
m ≥ 1 is all we use).  With span(u) the largest such m over u's successors
(1 for a sink), last(u) − part(u) + 1 ≥ span(u), and as for the sum bound
Σ_p S(p) ≥ Σw + max b + Σ_p ⌈f·live_p⌉ ≥ Σw + max b + ⌈f·Σ_u a_u·span(u)⌉,
so k ≥ ⌈(Σw + max b + ⌈f·Σ_u a_u·span(u)⌉) / C⌉.  It never falls below the
sum bound (span ≥ 1) and it sees what the others miss on graphs whose skip
edges keep outputs live across many groups.  Needs the reachability matrix
(O(e·n) vectorised, in blocks of edges), so n ≤ `MAX_REACH_NODES`.

**Cut bound** (`cut_bound`, models with a live term).  The bounds above
count an activation in the groups of its producer and of its consumers, but
in a graph with parallel branches every boundary between two groups is
crossed by the outputs of a whole layer.  Write D_p = P_0 ∪ … ∪ P_{p−1} for
the first p groups of a plan: a down-set (it holds every predecessor of its
members), ∅ = D_0 ⊂ D_1 ⊂ … ⊂ D_k = V.  A member u of D_p is live in group p
exactly when it has a successor outside D_p (last(u) ≥ p), so group p
carries the outputs of the boundary ∂D_p = {u ∈ D_p : succ(u) ⊄ D_p}, and as
for the item sizes S(P_p) ≥ items(P_p) + ⌊f·live(∂D_p)⌋ + min peak, that is

    items(D_{p+1}) − items(D_p) ≤ C' − ⌊f·live(∂D_p)⌋      (1)

(C' = C − min peak; ∂D_0 = ∅).  *Floors.*  Cut 0..items(V) into slices
[lo, hi] of width ⌊C'/`CUT_PARTS`⌋ (`cut_floors`).  A down-set D with
items(D) in [lo, hi] holds every v with after(v) > items(V) − lo (else v and
its descendants, all outside D, leave items(D) < lo) and no v with
before(v) > hi (before, after: the items of v with its ancestors, with its
descendants, as in the head–tail bound); the first set is closed under
predecessors, the second under successors.  The least live(∂D) over the
down-sets between those two sets is a minimum-weight closure problem, so a
minimum cut (J.-C. Picard, *Maximal closure of a graph and applications to
combinatorial problems*, Management Science 22(11), 1976): x_v = [v ∈ D] for
each undecided node, y_u = [every successor of u in D] for each node that
may stay off the boundary, live(∂D) = Σ live(u)·(x_u − y_u) plus the outputs
of decided members with a successor decided outside, and the implications
y_u ⇒ x_z (z a successor) and x_z ⇒ x_u (u a predecessor) as uncuttable
arcs (`min_boundaries`).  The floor of the slice is the value of a maximum
flow in that network with capacities ⌊c / unit⌋ (unit chosen so they fit
int32; each finite cut then counts at most its bytes / unit, so unit ×
flow ≤ the minimum).  The flow of scipy's solver is re-checked in exact
integers (within the capacities, antisymmetric, conserved), so by weak
duality its value is a lower bound whatever the backend; a flow that fails
the check counts 0.  A slice that no down-set reaches (a node both required
and excluded) is marked and never used.  *Walk.*  Let F(x) be the floor of
x's slice.  D_1 = P_0 carries nothing in, so items(D_1) ≤ C', and by (1)
items(D_{t+1}) ≤ items(D_t) − ⌊f·F(items(D_t))⌋ + C'.  With M_1 = C',
R(M) = max over reachable x ≤ M of x − ⌊f·F(x)⌋ (attained at a slice's
right end or at M) and M_{t+1} = R(M_t) + C', induction gives
items(D_t) ≤ M_t; the last group needs items(V) − items(D_{k−1}) +
⌊f·F(items(D_{k−1}))⌋ ≤ C', so R(M_{k−1}) ≥ items(V) − C'.  The bound is the
first k for which that holds (1 when items(V) ≤ C').  Unlike the sum and
span bounds it is per group: cuts cannot all sit at the narrowest layer,
because consecutive ones are at most a group apart.  An output whose
consumer lies beyond the window is a decided boundary member, so skip edges
count in every slice they cross.  The slices' flows are solved in batches
of about `CUT_BATCH` undecided nodes; past the deadline the slices left
keep the floor 0, which only weakens the bound.  On wide graphs, when the
windows would leave more than `CUT_WORK` undecided nodes in all, the slices
are widened by that ratio: a wider slice admits more down-sets, so its
floor is lower but still valid.  Each slice also costs a few passes over
the whole graph (its window and its network are masks over every node and
edge), so on long narrow graphs, where a slice is cheap in flow but there
are up to 16·n of them, the slices are widened until their count times
(n + e + `CUT_SLICE_CALL`) is at most `CUT_SLICE_WORK`.  Needs the reachability matrix, so
n ≤ `MAX_REACH_NODES`; about `CUT_PARTS`·k slices, each a network over the
nodes its window leaves undecided.
"""

from __future__ import annotations

import numpy as np

from ..memory import Intervals, OpenGroup, get_model, scale_activation, scale_activation_array
from ..validation import MAX_BYTES

__all__ = ["forced_bytes", "sum_bound", "item_sizes", "l2_bound", "head_tail", "head_tail_bound",
           "path_bound", "live_spans", "span_bound", "min_boundaries", "cut_floors", "cut_bound", "reachability",
           "lower_bound", "all_bounds", "MAX_REACH_NODES", "BOUNDS_SHARE", "CUT_PARTS", "CUT_BATCH", "CUT_WORK",
           "CUT_SLICE_WORK", "CUT_SLICE_CALL"]

#: Above this many nodes the n×n reachability matrix (and the head–tail bound) is skipped.
MAX_REACH_NODES = 4000

#: The share of a solver's time limit after which it leaves out the O(n·e) bounds (`all_bounds`' `deadline`).
BOUNDS_SHARE = 0.4


def _ceil_div(numerator, denominator):
    return -((-int(numerator)) // int(denominator))


def _terms(table, memory):
    """The model's per-node terms over `table` (`cachefit.memory.Terms`)."""
    return get_model(memory).terms(table)


def forced_bytes(table, *, memory="liveness", chunk_fraction=1.0):
    """A lower bound on Σ_p S(P_p) over the groups of any plan (module notes, sum bound).

    Σ summed + max peak + ⌈f·Σ live⌉ of the model's terms.

    Examples
    --------
    >>> from cachefit.memory import LayerTable
    >>> forced_bytes(LayerTable.chain([10, 20], [4, 4], [3, 1]), chunk_fraction=0.5)
    37
    """
    if table.n == 0:
        return 0
    terms = _terms(table, memory)
    return _total(terms, None if terms.live is None else int(terms.live.sum()), chunk_fraction)


def _total(terms, live, chunk_fraction):
    """Σ summed + max peak + ⌈f·live⌉ (a term the model lacks counts 0)."""
    total = int(terms.summed.sum())
    if terms.peak is not None:
        total += int(terms.peak.max())
    if terms.live is not None:
        total += scale_activation(live, chunk_fraction)
    return total


def sum_bound(table, capacity, *, memory="liveness", chunk_fraction=1.0):
    """⌈total forced bytes / C⌉ (see the module notes for the argument).

    Examples
    --------
    >>> from cachefit.memory import LayerTable
    >>> sum_bound(LayerTable.chain([30, 30, 30]), 60, memory="additive")
    2
    """
    if table.n == 0:
        return 0
    return max(1, _ceil_div(forced_bytes(table, memory=memory, chunk_fraction=chunk_fraction), capacity))


def item_sizes(table, *, memory="liveness", chunk_fraction=1.0):
    """Per-node sizes whose sum over any group is at most the group's size, and the bin slack.

    Returns
    -------
    items : numpy.ndarray of int64
        item(v) (module notes): the summed term plus ⌊f·live⌋, that is ``w + a + b``
        (additive) or ``w + ⌊f·a⌋`` (liveness).
    reserved : int
        Bytes every group needs beyond its items: the smallest peak term (liveness: the
        smallest buffer; 0 for a model without one).

    Examples
    --------
    >>> from cachefit.memory import LayerTable
    >>> items, reserved = item_sizes(LayerTable.chain([10, 20], [5, 5], [1, 3]), chunk_fraction=0.5)
    >>> items.tolist(), reserved
    ([12, 22], 1)
    """
    terms = _terms(table, memory)
    items = terms.summed
    if terms.live is not None:
        items = items + scale_activation_array(terms.live, chunk_fraction, ceil=False)
    reserved = int(terms.peak.min()) if terms.peak is not None and table.n else 0
    return items, reserved


def l2_bound(items, capacity):
    """Martello–Toth L2 lower bound on the bins needed to pack `items` into bins of `capacity`.

    Parameters
    ----------
    items : array of int
        Item sizes (bytes).
    capacity : int
        Bin capacity (bytes), positive.

    Returns
    -------
    int

    Notes
    -----
    O(n log n): the items are sorted once and every candidate α is evaluated
    with prefix sums and `numpy.searchsorted`.  See the module notes.

    References
    ----------
    S. Martello and P. Toth, "Lower bounds and reduction procedures for the
    bin packing problem", Discrete Applied Mathematics 28 (1990) 59–70.

    Examples
    --------
    >>> l2_bound([6, 6, 6, 2, 2, 2], 10)  # sum bound says 3; no two 6s share a bin
    3
    >>> l2_bound([6, 6, 6, 5, 5, 5], 10)  # sum bound 4; the 6s go alone, no 5 joins them
    5
    """
    sizes = np.sort(np.asarray(items, dtype=np.int64))
    if sizes.size == 0:
        return 0
    if capacity <= 0:
        return int(sizes.size)
    prefix = np.zeros(sizes.size + 1, dtype=np.int64)
    np.cumsum(sizes, out=prefix[1:])
    n = sizes.size
    half_index = int(np.searchsorted(sizes, capacity // 2, side="right"))  # items <= C/2 are sizes[:half_index]
    n_half = n - half_index  # items > C/2
    small = sizes[:half_index]
    alphas = np.unique(np.concatenate(([0], small)))
    over_index = np.searchsorted(sizes, capacity - alphas, side="right")  # items <= C - α
    n1 = n - over_index
    n2 = n_half - n1
    sum2 = prefix[over_index] - prefix[half_index]
    start3 = np.searchsorted(sizes, alphas, side="left")
    sum3 = prefix[half_index] - prefix[start3]
    spill = sum3 - (n2 * capacity - sum2)
    extra = np.where(spill > 0, -((-spill) // capacity), 0)
    return int((n1 + n2 + extra).max())


def _heaviest_path(table, weights):
    """Positions of a path of the DAG with the largest total of `weights` (O(n + e))."""
    n = table.n
    best = weights.astype(np.int64).tolist()
    parent = [-1] * n
    predecessors = table.predecessors()
    for v in range(n):
        top, top_parent = 0, -1
        for u in predecessors[v]:
            if best[u] > top or (best[u] == top and top_parent == -1):
                top, top_parent = best[u], u
        best[v] += top
        parent[v] = top_parent
    v = int(np.argmax(best))
    path = []
    while v != -1:
        path.append(v)
        v = parent[v]
    path.reverse()
    return path, predecessors


def reachability(table, *, deadline=None):
    """Boolean n×n matrix with ``reach[u, v]`` when a path u ⇝ v exists (u ≠ v); None above `MAX_REACH_NODES`.

    O(n·e) vectorised row unions in reverse topological order.  Also None
    when `deadline` (a `cachefit.solvers._deadline.Deadline`) passes first.

    Examples
    --------
    >>> from cachefit.memory import LayerTable
    >>> reachability(LayerTable.chain([1, 1, 1])).astype(int).tolist()
    [[0, 1, 1], [0, 0, 1], [0, 0, 0]]
    """
    n = table.n
    if n > MAX_REACH_NODES:
        return None
    reach = np.zeros((n, n), dtype=bool)
    successors = table.successors()
    for u in range(n - 1, -1, -1):  # reverse topological order
        if deadline is not None and (n - 1 - u) % 256 == 0 and deadline.expired():
            return None
        row = reach[u]
        for v in successors[u]:
            row[v] = True
            row |= reach[v]
    return reach


def head_tail(table, capacity, *, memory="liveness", chunk_fraction=1.0, reach=None, deadline=None, closure=None):
    """(H, T): per node, the groups needed up to and including its own, and from its own on.

    See the module notes.  Returns None when the reachability matrix is not
    available (too many nodes), no byte of a group is free for items, or
    `deadline` (a `cachefit.solvers._deadline.Deadline`) passes first.
    `closure`: the (before, after) item sums of `_closure_items` for these
    items and `reach`, when the caller has them (`all_bounds`).
    """
    if reach is None:
        reach = reachability(table)
    if reach is None or table.n == 0:
        return None
    items, reserved = item_sizes(table, memory=memory, chunk_fraction=chunk_fraction)
    room = int(capacity) - reserved
    if room <= 0:
        return None
    closure = closure or _closure_items(items, reach, deadline)
    if closure is None:
        return None
    before, after = closure
    return -((-before) // room), -((-after) // room)


def head_tail_bound(table, capacity, *, memory="liveness", chunk_fraction=1.0, reach=None, deadline=None,
                    closure=None):
    """max over v of H_v + T_v − 1 (module notes); 0 when not computed.

    Examples
    --------
    >>> from cachefit.memory import LayerTable
    >>> table = LayerTable.chain([51, 50, 51])
    >>> head_tail_bound(table, 100, memory="additive"), sum_bound(table, 100, memory="additive")
    (3, 2)
    """
    result = head_tail(table, capacity, memory=memory, chunk_fraction=chunk_fraction, reach=reach, deadline=deadline,
                       closure=closure)
    if result is None:
        return 0
    head, tail = result
    return int((head + tail - 1).max())


def path_bound(table, capacity, *, memory="liveness", chunk_fraction=1.0):
    """Greedy run count along the heaviest path (module notes); exact for a chain.

    Examples
    --------
    >>> import networkx as nx
    >>> from cachefit.memory import LayerTable
    >>> g = nx.DiGraph()
    >>> for name in "abcd":
    ...     g.add_node(name, weight_bytes=40, activation_bytes=0, buffer_bytes=0)
    >>> g.add_edges_from([("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")])
    >>> path_bound(LayerTable.from_graph(g), 100, memory="additive")  # a-b-d: 40+40 | 40
    2
    """
    n = table.n
    if n == 0:
        return 0
    if table.is_chain:
        intervals = Intervals(table, memory, chunk_fraction)
        count, start = 0, 0
        while start < n:
            start = max(intervals.end(start, capacity), start + 1)  # an oversize node is a group of its own
            count += 1
        return count
    items, _ = item_sizes(table, memory=memory, chunk_fraction=chunk_fraction)
    path, predecessors = _heaviest_path(table, items)
    run = _PathRun(_terms(table, memory), predecessors, chunk_fraction)
    count = 0
    index = 0
    while index < len(path):
        count += 1
        run.reset()
        # Take the path's nodes while the run fits (the first even if it is oversize: one group anyway).
        while index < len(path) and (not run.members or run.size_with(path[index]) <= capacity):
            run.add(path[index])
            index += 1
    return count


class _PathRun:
    """L(R) of a run R along a path (module notes, heaviest-path bound), grown one node at a time.

    An `OpenGroup` of the run's members, into which every predecessor of a
    member from outside the run is carried (it is live in the run's group).
    """

    def __init__(self, terms, predecessors, chunk_fraction):
        self._group = OpenGroup(terms, chunk_fraction)
        self._live = terms.live.tolist() if terms.live is not None else None
        self._predecessors = predecessors
        self.reset()

    def reset(self):
        """Start an empty run."""
        self._group.reset()
        self.members = self._group.members
        self._counted = set()  # members and their predecessors: live bytes already in the group

    def _inputs(self, v):
        """Live bytes of v's predecessors not yet counted in the run."""
        if self._live is None:
            return 0
        return sum(self._live[u] for u in self._predecessors[v] if u not in self._counted)

    def size_with(self, v):
        """L of the run with `v` appended."""
        inputs = self._inputs(v)
        self._group.live += inputs  # carried in for the probe, taken back below
        size = self._group.size_with(v)
        self._group.live -= inputs
        return size

    def add(self, v):
        """Append `v` to the run."""
        inputs = self._inputs(v)
        self._group.live += inputs
        self._group.add(v)
        self._counted.update(self._predecessors[v])
        self._counted.add(v)


def live_spans(table, capacity, *, memory="liveness", chunk_fraction=1.0, reach=None, deadline=None):
    """span(u): groups in which u's output is live in any plan, at least (module notes, span bound).

    Returns
    -------
    numpy.ndarray of int64 or None
        One entry per position (1 for a sink); None when the model has no
        live term, the reachability matrix is not available (too many
        nodes), no byte of a group is free for items, or `deadline` passed first.

    Examples
    --------
    >>> from cachefit.memory import LayerTable
    >>> live_spans(LayerTable.chain([60, 60, 60], [10, 10, 0]), 100).tolist()  # u alone: 60+10 fits, 60+60 not
    [2, 2, 1]
    """
    if reach is None:
        reach = reachability(table)
    if reach is None or table.n == 0:
        return None
    live = _terms(table, memory).live
    if live is None:
        return None
    items, reserved = item_sizes(table, memory=memory, chunk_fraction=chunk_fraction)
    room = int(capacity) - reserved
    if room <= 0 or int(items.sum()) >= 2**62:
        return None
    passing = scale_activation_array(live, chunk_fraction, ceil=False)  # ⌊f·a_u⌋
    spans = np.ones(table.n, dtype=np.int64)
    sources, targets = table.sources, table.targets
    for start in range(0, sources.size, 256):
        if deadline is not None and deadline.expired():
            return None
        source, target = sources[start:start + 256], targets[start:start + 256]
        between = reach[source] & reach[:, target].T  # descendants(u) ∩ ancestors(z), one row per edge
        held = between.astype(np.int64) @ items + items[source] + items[target]
        free = room - passing[source]
        usable = free > 0
        span = np.ones(source.size, dtype=np.int64)
        span[usable] = -((-(held[usable] - passing[source][usable])) // free[usable])
        np.maximum.at(spans, source, np.maximum(span, 1))
    return spans


def span_bound(table, capacity, *, memory="liveness", chunk_fraction=1.0, reach=None, deadline=None):
    """⌈(Σw + max b + ⌈f·Σ a·span⌉) / C⌉ under liveness (module notes); 0 when not computed.

    In the model's terms: Σ summed + max peak + ⌈f·Σ live·span⌉.  A model
    without a live term (additive) gets 0: the sum bound covers it.

    Examples
    --------
    >>> from cachefit.memory import LayerTable
    >>> table = LayerTable.chain([60, 60, 60], [10, 10, 0])
    >>> span_bound(table, 100), sum_bound(table, 100)  # each output is live in two groups
    (3, 2)
    """
    if table.n == 0:
        return 0
    spans = live_spans(table, capacity, memory=memory, chunk_fraction=chunk_fraction, reach=reach, deadline=deadline)
    if spans is None:
        return 0
    terms = _terms(table, memory)
    live = sum(int(a) * int(s) for a, s in zip(terms.live.tolist(), spans.tolist()))
    return max(1, _ceil_div(_total(terms, live, chunk_fraction), capacity))


# -- cut bound ---------------------------------------------------------------------------------------

#: Flow networks are solved in int32 (`scipy.sparse.csgraph.maximum_flow`): finite capacities sum below this.
_FLOW_TOTAL = 1 << 30

#: The cut bound's slices of item bytes per group (`cut_floors`): finer slices, narrower windows, more flows.
CUT_PARTS = 16

#: Undecided nodes (the flow networks' size) of the slices that go to the backend together in one call;
#: the deadline is read between calls.
CUT_BATCH = 4_000

#: Undecided nodes summed over all slices above which the slices are widened (`cut_floors`): bounds the flows'
#: size on wide graphs, where a window spans many parallel branches, so the bound stays cheap without a deadline.
CUT_WORK = 40_000

#: Slices × (nodes + edges) above which the slices are widened (`cut_floors`): each slice costs a few passes over
#: the whole graph, so this bounds the bound's cost on long narrow graphs (many slices, each cheap in flow), where
#: 16·n slices of a 4,000-node graph took seconds without a deadline.
CUT_SLICE_WORK = 40_000_000

#: What one slice costs beyond its passes over the graph, in the same units (its ~20 numpy calls' overhead).
CUT_SLICE_CALL = 10_000


def _verified_flow(tails, heads, capacities, nodes):
    """A maximum flow from node 0 to node 1, re-checked exactly: its value on each arc, or None if not confirmed.

    `capacities` (int64) are non-negative and the finite ones sum below
    `_FLOW_TOTAL`; an uncuttable arc has `_FLOW_TOTAL`.  The flow that scipy
    returns is checked in int64 (antisymmetric, within the capacities,
    conserved at every node but the terminals), so it is a feasible flow
    whatever the backend does, and by weak duality its value is at most the
    capacity of every cut.
    """
    import scipy.sparse as sparse
    from scipy.sparse.csgraph import maximum_flow

    order = np.lexsort((heads, tails))
    tails, heads, capacities = tails[order], heads[order], capacities[order]
    indptr = np.zeros(nodes + 1, dtype=np.int64)
    np.cumsum(np.bincount(tails, minlength=nodes), out=indptr[1:])
    network = sparse.csr_matrix((capacities.astype(np.int32), heads.astype(np.int32), indptr.astype(np.int32)),
                                shape=(nodes, nodes))
    flow = maximum_flow(network, 0, 1, method="dinic").flow.tocoo()
    rows, cols, values = flow.row.astype(np.int64), flow.col.astype(np.int64), flow.data.astype(np.int64)
    keys = rows * nodes + cols
    by_key = np.argsort(keys)
    keys, values = keys[by_key], values[by_key]
    mirror = (cols * nodes + rows)[by_key]
    at = np.minimum(np.searchsorted(keys, mirror), keys.size - 1)
    arc_keys = tails * nodes + heads  # sorted by the lexsort above
    where = np.minimum(np.searchsorted(arc_keys, keys), max(arc_keys.size - 1, 0))
    bound = np.where(arc_keys[where] == keys, capacities[where], 0) if arc_keys.size else np.zeros_like(values)
    balance = np.zeros(nodes, dtype=np.int64)
    np.add.at(balance, rows[by_key], values)
    if (np.any(keys[1:] == keys[:-1]) or np.any(keys[at] != mirror) or np.any(values[at] != -values)
            or np.any(values > bound) or balance[2:].any()):
        return None
    arc_flow = np.zeros(arc_keys.size, dtype=np.int64)
    hit = np.searchsorted(keys, arc_keys)
    present = hit < keys.size
    present[present] = keys[hit[present]] == arc_keys[present]
    arc_flow[present] = values[hit[present]]
    restore = np.empty_like(order)
    restore[order] = np.arange(order.size)
    return arc_flow[restore]


def _boundary_network(sources, targets, live, inside, outside):
    """The flow network of one cut (module notes, cut bound), in local node numbers (0 source, 1 sink).

    Returns (fixed, tails, heads, capacities, nodes, doubled): capacities in
    bytes with -1 for uncuttable arcs, and the positions of the covered free
    nodes, whose price a finite cut counts once too often.
    """
    n = live.size
    free = ~inside & ~outside
    into_free = free[targets]
    # A member of D with a successor outside every admissible D is always on the boundary.
    fixed = int(live[np.unique(sources[inside[sources] & outside[targets]])].sum())
    flags = np.zeros((3, n), dtype=bool)  # has a successor / one outside / one free
    flags[0, sources] = True
    flags[1, sources[outside[targets]]] = True
    flags[2, sources[into_free]] = True
    # Variables: x_v = [v ∈ D] for the free nodes; y_u = [every successor of u in D] for the covered nodes.
    priced = np.flatnonzero(free & flags[0])  # x_u = 1 costs live(u) (arc x_u → sink)
    covered = np.flatnonzero(~outside & flags[2] & ~flags[1])  # y_u = 0 costs live(u) (arc source → y_u)
    free_nodes = np.flatnonzero(free)
    index = np.full((2, n), -1, dtype=np.int64)
    index[0, free_nodes] = 2 + np.arange(free_nodes.size)
    index[1, covered] = 2 + free_nodes.size + np.arange(covered.size)
    # Uncuttable: y_u → x_z for a free successor z of a covered u; x_z → x_u for an edge u → z between free nodes.
    cover_edges = (index[1, sources] >= 0) & into_free
    free_edges = free[sources] & into_free
    tails = np.concatenate((index[0, priced], np.zeros(covered.size, dtype=np.int64),
                            index[1, sources[cover_edges]], index[0, targets[free_edges]]))
    heads = np.concatenate((np.ones(priced.size, dtype=np.int64), index[1, covered],
                            index[0, targets[cover_edges]], index[0, sources[free_edges]]))
    capacities = np.concatenate((live[priced], live[covered],
                                 np.full(int(cover_edges.sum() + free_edges.sum()), -1, dtype=np.int64)))
    return fixed, tails, heads, capacities, 2 + free_nodes.size + covered.size, covered[free[covered]]


def min_boundaries(table, live, windows):
    """Per window (inside, outside): a lower bound on min live(∂D) over down-sets inside ⊆ D ⊆ V ∖ outside.

    ∂D is the set of members of D with a successor outside D (module notes,
    cut bound).

    Parameters
    ----------
    table : LayerTable
    live : array of int
        Bytes of each position's output (the model's live term).
    windows : list of (inside, outside)
        Boolean arrays over the positions: `inside` closed under
        predecessors, `outside` under successors, the two disjoint.

    Returns
    -------
    list of int
        One floor per window: the minimum up to the flooring of the
        capacities to int32, never above it; only the forced part (outputs
        of `inside` nodes with a successor in `outside`) when the backend's
        flow fails the exact check.

    Notes
    -----
    Every window is one component of a single flow network, solved by one
    `scipy.sparse.csgraph.maximum_flow` call (Dinic) and re-checked in int64.

    Examples
    --------
    >>> import numpy as np
    >>> from cachefit.memory import LayerTable
    >>> table = LayerTable.chain([1, 1, 1, 1])  # D holds the first node, not the last: cheapest cut after the 5
    >>> first, last = np.array([1, 0, 0, 0], bool), np.array([0, 0, 0, 1], bool)
    >>> min_boundaries(table, [9, 5, 7, 0], [(first, last), (first | [0, 1, 0, 0], last)])
    [5, 5]
    """
    sources, targets = table.sources.astype(np.int64), table.targets.astype(np.int64)
    live = np.asarray(live, dtype=np.int64)
    networks = [_boundary_network(sources, targets, live, np.asarray(inside, dtype=bool),
                                  np.asarray(outside, dtype=bool)) for inside, outside in windows]
    total = sum(int(capacities[capacities > 0].sum()) for _, _, _, capacities, _, _ in networks)
    if total == 0:
        return [fixed for fixed, *_ in networks]
    unit = total // (_FLOW_TOTAL - 1) + 1  # Σ ⌊capacity / unit⌋ < _FLOW_TOTAL
    parts, base = [], 2
    for _, tails, heads, capacities, nodes, _ in networks:
        def place(local, base=base):
            return np.where(local < 2, local, local + base - 2)
        scaled = np.where(capacities < 0, _FLOW_TOTAL, capacities // unit)
        parts.append((place(tails), place(heads), scaled))
        base += nodes - 2
    tails, heads, scaled = (np.concatenate(column) for column in zip(*parts))
    arc_flow = _verified_flow(tails, heads, scaled, base)
    result, start = [], 0
    for (fixed, local_tails, _, capacities, _, doubled), (_, _, part_scaled) in zip(networks, parts):
        stop = start + local_tails.size
        if arc_flow is None:
            result.append(fixed)
        else:
            # The component's flow (out of the source) is at most its every cut: over any D, the scaled
            # Σ_{priced u ∈ D} + Σ_{covered u, y_u = 0}, where a covered free u is counted once too often.
            value = int(arc_flow[start:stop][local_tails == 0].sum())
            result.append(fixed + max(0, unit * (value - int((live[doubled] // unit).sum()))))
        start = stop
    return result


def _closure_items(items, reach, deadline=None):
    """(before, after): items of each node with its ancestors, with its descendants; None past `deadline`.

    Exact integer products, a block of 256 columns/rows at a time (no n×n int64 copy).
    """
    n = items.size
    before = items.astype(np.int64).copy()
    after = items.astype(np.int64).copy()
    for start in range(0, n, 256):
        if deadline is not None and deadline.expired():
            return None
        block = slice(start, min(start + 256, n))
        before[block] += items @ reach[:, block].astype(np.int64)
        after[block] += reach[block].astype(np.int64) @ items
    return before, after


def _undecided(before, after, total, width):
    """Per slice of width `width`: how many nodes its window leaves undecided (the size of its flow network).

    Node v is undecided in slice [lo, hi] when before(v) ≤ hi and after(v) ≤ total − lo: for the
    slices j from ⌈(before(v) − width + 1) / width⌉ to ⌊(total − after(v)) / width⌋.
    """
    slices = total // width + 1
    first = np.clip(-(-(before - width + 1) // width), 0, slices)
    last = np.clip((total - after) // width + 1, 0, slices)
    steps = np.zeros(slices + 1, dtype=np.int64)
    spans = first < last
    np.add.at(steps, first[spans], 1)
    np.add.at(steps, last[spans], -1)
    return np.cumsum(steps[:-1])


def cut_floors(table, capacity, *, memory="liveness", chunk_fraction=1.0, reach=None, deadline=None, closure=None):
    """Per slice [lo, hi] of the item bytes a down-set can hold: a lower bound on the live bytes it leaves across.

    Returns
    -------
    (lows, highs, floors) : three int64 arrays, or None
        Slices of width ⌊C'/`CUT_PARTS`⌋ (wider on wide graphs, `CUT_WORK`,
        and on long narrow ones, `CUT_SLICE_WORK`) covering 0..items(V)
        (C' = C − min peak); ``floors[j]`` ≤ live(∂D) for every down-set D with items(D)
        in [lows[j], highs[j]] (module notes, cut bound), -1 for a slice no
        down-set can reach; 0 for the slices left when `deadline` passed.
        None for a model without a live term, without the reachability
        matrix (too many nodes), or when no byte of a group is free for items.
    """
    n = table.n
    terms = _terms(table, memory)
    if n == 0 or terms.live is None:
        return None
    if reach is None:
        reach = reachability(table, deadline=deadline)
    if reach is None:
        return None
    items, reserved = item_sizes(table, memory=memory, chunk_fraction=chunk_fraction)
    room = int(capacity) - reserved
    total = int(items.sum())
    if room <= 0 or total >= 2**62 // max(n, 1):
        return None
    closure = closure or _closure_items(items, reach, deadline)
    if closure is None:
        return None
    before, after = closure
    width = max(1, room // CUT_PARTS, total // (CUT_PARTS * n))
    undecided = _undecided(before, after, total, width)
    work = int(undecided.sum())
    widened = width
    if work > CUT_WORK:  # wide windows (many parallel branches): wider slices, fewer and smaller flows in all
        widened *= -(-work // CUT_WORK)
    passes = (total // widened + 1) * (n + table.sources.size + CUT_SLICE_CALL)
    if passes > CUT_SLICE_WORK:  # many slices (long narrow graphs): each costs passes over the whole graph
        widened *= -(-passes // CUT_SLICE_WORK)
    if widened != width:
        width, undecided = widened, _undecided(before, after, total, widened)
    lows = np.arange(0, total + 1, width, dtype=np.int64)
    highs = np.minimum(lows + width - 1, total)
    floors = np.zeros(lows.size, dtype=np.int64)
    live = terms.live.astype(np.int64)
    # Batches of consecutive slices, each of at most CUT_BATCH nodes undecided in all (one backend call).
    batch_of = np.cumsum(undecided) // CUT_BATCH
    for batch in np.split(np.arange(lows.size), np.flatnonzero(np.diff(batch_of)) + 1):
        if deadline is not None and deadline.expired():
            break  # the slices left keep the floor 0
        solved, windows = [], []
        for j in batch.tolist():
            # v ∈ D forces items(D) ≥ before(v); v ∉ D forces items(D) ≤ items(V) − after(v).
            outside, inside = before > highs[j], after > total - lows[j]
            if (inside & outside).any():
                floors[j] = -1  # no down-set has its items in this slice
            else:
                solved.append(j)
                windows.append((inside, outside))
        if windows:
            floors[solved] = min_boundaries(table, live, windows)
    return lows, highs, floors


def cut_bound(table, capacity, *, memory="liveness", chunk_fraction=1.0, reach=None, deadline=None, closure=None):
    """The fewest groups that carry every cut's live outputs, a walk over the slices (module notes); 0 if not computed.

    Examples
    --------
    >>> from cachefit.memory import LayerTable
    >>> table = LayerTable.chain([60, 60, 60], [10, 10, 0])
    >>> cut_bound(table, 100), sum_bound(table, 100)  # every cut carries a 10: 60 + 10 + 60 > 100
    (3, 2)
    """
    profile = cut_floors(table, capacity, memory=memory, chunk_fraction=chunk_fraction, reach=reach, deadline=deadline,
                         closure=closure)
    if profile is None:
        return 0
    lows, highs, floors = profile
    items, reserved = item_sizes(table, memory=memory, chunk_fraction=chunk_fraction)
    room, total = int(capacity) - reserved, int(items.sum())
    carried = scale_activation_array(np.maximum(floors, 0), chunk_fraction, ceil=False)
    # best_to[j]: over slices 0..j, the most items a down-set there can hold less the live bytes the next
    # group must carry for it (R of the module notes at the slice's right end); unreachable slices never count.
    reach_from = np.where(floors < 0, np.iinfo(np.int64).min // 2, highs - carried)
    best_to = np.maximum.accumulate(reach_from)
    if total <= room:
        return 1
    furthest, groups = room, 1  # items(D_1) ≤ C' (the first group carries nothing in)
    while groups < table.n:
        j = int(np.searchsorted(lows, furthest, side="right")) - 1  # the slice holding `furthest`
        start = best_to[j - 1] if j > 0 else np.iinfo(np.int64).min // 2
        if floors[j] >= 0:
            start = max(start, furthest - int(carried[j]))
        if start >= total - room:  # the last group fits after D_groups
            return groups + 1
        furthest, groups = min(total, int(start) + room), groups + 1
    return table.n


def all_bounds(table, capacity, *, memory="liveness", chunk_fraction=1.0, reach=None, deadline=None):
    """Every bound by name: ``{"sum": ..., "l2": ..., "path": ..., "head_tail": ..., "span": ..., "cut": ...}``.

    With a `deadline` (`cachefit.solvers._deadline.Deadline`), the bounds
    that need the reachability matrix (head–tail, span, cut: O(n·e) and the
    cut bound's flows) are left at 0 once it has passed, and the cut bound
    keeps the floor 0 for the slices it had not reached; the others
    (O(n + e)) are always computed.  A bound left out, or computed from
    fewer slices, only weakens the maximum, never makes it invalid.

    Examples
    --------
    >>> from cachefit.memory import LayerTable
    >>> all_bounds(LayerTable.chain([6, 6, 6, 2, 2, 2]), 10, memory="additive")
    {'sum': 3, 'l2': 3, 'path': 4, 'head_tail': 3, 'span': 0, 'cut': 0}
    """
    if table.n == 0:
        return {"sum": 0, "l2": 0, "path": 0, "head_tail": 0, "span": 0, "cut": 0}
    capacity = min(int(capacity), MAX_BYTES)  # every group of a valid graph fits 2**62 (`lower_bound`)
    items, reserved = item_sizes(table, memory=memory, chunk_fraction=chunk_fraction)
    bounds = {
        "sum": sum_bound(table, capacity, memory=memory, chunk_fraction=chunk_fraction),
        # With no room left after the reserved part, every item must be 0 (else no plan
        # exists and the solvers say so first), and one bin may hold them all.
        "l2": max(1, l2_bound(items, capacity - reserved)) if capacity > reserved else 1,
        "path": path_bound(table, capacity, memory=memory, chunk_fraction=chunk_fraction),
        "head_tail": 0,
        "span": 0,
        "cut": 0,
    }
    late = deadline.expired if deadline is not None else (lambda: False)
    if reach is None and not late():
        reach = reachability(table, deadline=deadline)
    if reach is None:
        return bounds
    # The head–tail and cut bounds read the same closure sums (items with ancestors, with descendants): once.
    closure = _closure_items(items, reach, deadline)
    if closure is None:
        return bounds
    options = dict(memory=memory, chunk_fraction=chunk_fraction, reach=reach, deadline=deadline)
    bounds["head_tail"] = head_tail_bound(table, capacity, closure=closure, **options)
    if not late():
        bounds["span"] = span_bound(table, capacity, **options)
    if not late():
        bounds["cut"] = cut_bound(table, capacity, closure=closure, **options)
    return bounds


def lower_bound(table, capacity, *, memory="liveness", chunk_fraction=1.0, reach=None, deadline=None):
    """The best proven lower bound on k for `table` under `memory`: the max of all bounds.

    For a chain this is the path bound alone, which is then the optimal k
    (module notes); the others never exceed it.

    Parameters
    ----------
    table : LayerTable
    capacity : int
        C in bytes.
    memory : str
        A name in `cachefit.memory.MODELS`.
    chunk_fraction : float in (0, 1]
    reach : numpy.ndarray, optional
        A `reachability` matrix to reuse.
    deadline : Deadline, optional
        Past it, the O(n·e) bounds are left out (`all_bounds`).

    Returns
    -------
    int
        0 for an empty table, else at least 1.

    Notes
    -----
    O(n log n + n·e): one sort for L2, one longest-path pass and one greedy
    pass along the path, the reachability matrix for the head–tail, span and
    cut bounds (pass `reach` to reuse one), and for models with a live term
    the cut bound's maximum flows (about `CUT_PARTS`·k small networks of at
    most `CUT_WORK` nodes in all, solved in batches of `CUT_BATCH`, and
    at most `CUT_SLICE_WORK` / (n + e + `CUT_SLICE_CALL`) slices).  For
    chains, O(k log n).  A capacity above 2**62 counts as 2**62
    (`cachefit.validation.MAX_BYTES`: every group of a valid graph fits it).

    Examples
    --------
    >>> from cachefit.memory import LayerTable
    >>> lower_bound(LayerTable.chain([40, 30, 20, 50, 10]), 60, memory="additive")
    3
    """
    if table.n == 0:
        return 0
    capacity = min(int(capacity), MAX_BYTES)
    if table.is_chain:
        return path_bound(table, capacity, memory=memory, chunk_fraction=chunk_fraction)
    return max(all_bounds(table, capacity, memory=memory, chunk_fraction=chunk_fraction, reach=reach,
                          deadline=deadline).values())
