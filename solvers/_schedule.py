"""Orders of a DAG's nodes and their groups: `search`'s constructions and repackings, `cpsat`'s hints.

`cut_order` cuts a node order into dp's balanced groups; `ListScheduler`
finds orders by exact list scheduling.

Groups are filled one at a time from the *ready* nodes (all predecessors
placed) in the order of a priority, a node joining the open group when it
fits; a node made ready by a member may join the same group; the group
closes when no ready node fits.  Sizes are exact (the memory engine's
`cachefit.memory.OpenGroup` over the model's terms), because the live set
carried into the open group (earlier nodes with an unplaced successor) is
fixed while the group grows.
"""

from __future__ import annotations

import numpy as np

from ..memory import OpenGroup, get_model, group_sizes
from .dp import balanced_cut

__all__ = ["ListScheduler", "Incumbent", "cut_order", "DP_S_PER_NODE"]

#: Seconds per node of `cut_order` (dp on one order; liveness, 2,000 nodes: ~0.3 s on a 2-core machine
#: at load 8, with a margin of 2×).  Solvers cut an order by dp only when this estimate fits in the time left.
DP_S_PER_NODE = 3e-4


def cut_order(table, order, capacity, memory, chunk_fraction, k, flops=None, deadline=None):
    """dp's balanced groups (sorted lists of positions of `table`) for the topological `order`, or None.

    Parameters
    ----------
    table : LayerTable
    order : sequence of int
        A topological order of `table`'s positions.
    capacity, memory, chunk_fraction, k
        As for `cachefit.solvers.dp.balanced_cut` (`k` None: the fewest groups).
    flops : numpy.ndarray, optional
        Per position of `table`: balance the runs by flops instead of bytes.
    deadline : Deadline, optional
        dp's Σ S² stage stops when it passes (`cachefit.solvers.dp.balanced_cut`).

    Returns
    -------
    list of lists of int, or None
        None when dp finds no cut, or when a group does not fit once sized on
        `table` itself: a reordered table keeps no graph, so dp does not see
        node attributes beyond the byte columns (the ``+kv`` models'
        ``kv_bytes``).
    """
    order = list(order)
    bounds, _ = balanced_cut(table.reorder(order), capacity, memory=memory, chunk_fraction=chunk_fraction, k=k,
                             flops=None if flops is None else flops[np.asarray(order, dtype=np.int64)],
                             deadline=deadline)
    if bounds is None:
        return None
    groups = [sorted(order[s:e]) for s, e in zip(bounds[:-1].tolist(), bounds[1:].tolist())]
    ids = table.ids
    sizes = group_sizes(table, [[ids[v] for v in group] for group in groups], memory=memory,
                        chunk_fraction=chunk_fraction)
    return groups if max(sizes) <= capacity else None


class ListScheduler:
    """Exact list scheduling of a table's nodes into groups (module notes).

    Positions are the table's; group sizes come from the memory engine's
    `OpenGroup` over the model's terms.
    """

    def __init__(self, table, capacity, memory, chunk_fraction):
        self.table = table
        self.capacity = int(capacity)
        terms = get_model(memory).terms(table)
        self.group = OpenGroup(terms, chunk_fraction)
        self.has_live = terms.live is not None  # freeing carried outputs matters only then
        self.live = terms.live.tolist() if self.has_live else [0] * table.n
        self.predecessors = table.predecessors()
        self.successors = table.successors()

    def pack(self, nodes, carried_nodes, priority, rule="fit", *, deadline=None):
        """(groups, sizes) holding `nodes` (lists of positions, exact S), or None when a node cannot start a group.

        Also None when `deadline` (a `cachefit.solvers._deadline.Deadline`)
        passes before the packing is complete (checked once per group).

        Parameters
        ----------
        nodes : list of int
            The nodes to place; every predecessor of one is in `nodes` or placed earlier.
        carried_nodes : dict of int to int
            Every earlier-placed node with a successor not placed earlier, and
            how many such successors it has (its output is live until they are placed).
        priority : sequence of float
            Higher goes first among the ready nodes that fit.
        rule : {"fit", "free", "strict"}
            ``"fit"``: the ready node of highest priority among those that fit;
            ``"free"``: the same, preferring first a node that is the last
            unplaced consumer of a carried output (it frees those bytes after
            its group); ``"strict"``: the ready node of highest priority, the
            group closing when it does not fit (a cut of the priority's order).
        """
        predecessors, successors, live = self.predecessors, self.successors, self.live
        member = set(nodes)
        waiting = {v: sum(1 for u in predecessors[v] if u in member) for v in nodes}
        open_successors = dict(carried_nodes)
        carried = sum(live[u] for u in carried_nodes)
        closed = set(carried_nodes)
        for v in nodes:
            open_successors[v] = len(successors[v])
        ready = [v for v in nodes if not waiting[v]]
        groups, sizes = [], []
        remaining = len(nodes)
        while remaining:
            if deadline is not None and deadline.expired():
                return None
            group, size = self._fill(ready, waiting, carried, priority, rule, open_successors, closed)
            if not group:
                return None
            for v in group:
                for u in predecessors[v]:
                    open_successors[u] -= 1
                    if not open_successors[u] and u in closed:
                        carried -= live[u]
            for v in group:
                closed.add(v)
                if open_successors[v]:
                    carried += live[v]
            remaining -= len(group)
            groups.append(group)
            sizes.append(size)
        return groups, sizes

    def _fill(self, ready, waiting, carried, priority, rule, open_successors, closed):
        """One group from the ready nodes (updates `ready` and `waiting`); `rule` as for `pack`."""
        capacity, predecessors, successors = self.capacity, self.predecessors, self.successors
        group = self.group
        group.reset(carried)
        size = 0
        while True:
            best, best_key = -1, None
            for v in ready:
                if rule != "strict" and group.size_with(v) > capacity:
                    continue
                key = priority[v]
                if rule == "free":
                    key = (sum(1 for u in predecessors[v] if u in closed and open_successors[u] == 1), key)
                if best_key is None or key > best_key:
                    best, best_key = v, key
            if best >= 0 and rule == "strict" and group.size_with(best) > capacity:
                best = -1  # the next node of the priority order does not fit: close the group
            if best < 0:
                return list(group.members), size
            size = group.add(best)
            ready.remove(best)
            for z in successors[best]:
                if z in waiting:
                    waiting[z] -= 1
                    if not waiting[z]:
                        ready.append(z)

    def measure(self, groups, carried_nodes):
        """Exact sizes of `groups` placed in turn after the carried state, or None when they are not valid.

        Not valid: a node placed before one of its predecessors among the
        groups' nodes, or an empty group.  `carried_nodes` as for `pack`
        (every earlier-placed node with a successor among `groups` or later).
        A repacking found by another method (`cachefit.solvers._window`) is
        measured here before it is kept.
        """
        predecessors, successors, live = self.predecessors, self.successors, self.live
        member = {v for group in groups for v in group}
        open_successors = dict(carried_nodes)
        carried = sum(live[u] for u in carried_nodes)
        placed = set()
        sizes = []
        for group in groups:
            if not group:
                return None
            inside = set(group)
            group_now = self.group
            group_now.reset(carried)
            size = 0
            for v in group:
                if any(u in member and u not in placed and u not in inside for u in predecessors[v]):
                    return None
                size = group_now.add(v)
            for v in group:
                for u in predecessors[v]:
                    if u not in inside:
                        open_successors[u] -= 1
                        if not open_successors[u]:
                            carried -= live[u]
            for v in group:
                open_successors[v] = len(successors[v]) - sum(1 for z in successors[v] if z in inside)
                if open_successors[v]:
                    carried += live[v]
            placed |= inside
            sizes.append(size)
        return sizes


class Incumbent:
    """The best plan so far: its groups, their sizes, and each node's group and last consumer's group.

    `search`'s window repacking and `cachefit.solvers._window`'s exact one
    both work on it; `packer` is the problem's `ListScheduler`.
    """

    def __init__(self, packer, groups, sizes):
        self.packer = packer
        self.replace(groups, sizes)

    def replace(self, groups, sizes):
        self.groups = [list(group) for group in groups]
        self.sizes = list(sizes)
        table = self.packer.table
        part = np.empty(table.n, dtype=np.int64)
        for index, group in enumerate(self.groups):
            part[group] = index
        last = part.copy()
        np.maximum.at(last, table.sources, part[table.targets])
        self.part, self.last = part, last
        self.part_list = part.tolist()

    @property
    def k(self):
        return len(self.groups)

    def carried_into(self, index):
        """{u: successors of u in group `index` or later} over nodes before it with such a successor."""
        part = self.part_list
        before = np.flatnonzero((self.part < index) & (self.last >= index)).tolist()
        successors = self.packer.successors
        return {u: sum(1 for z in successors[u] if part[z] >= index) for u in before}

    def window(self, start, width):
        """The nodes of groups start..start+width−1, in the plan's order."""
        return [v for group in self.groups[start:start + width] for v in group]

    def try_window(self, start, width, priority, rule):
        """Repack groups start..start+width−1; keep the result when it is no worse.  True when k dropped."""
        nodes = self.window(start, width)
        packed = self.packer.pack(nodes, self.carried_into(start), priority, rule)
        if packed is None:
            return None
        groups, sizes = packed
        old = self.sizes[start:start + width]
        if len(groups) > width:
            return None
        if len(groups) == width and _worse(sizes, old):
            return None
        self.replace(self.groups[:start] + groups + self.groups[start + width:],
                     self.sizes[:start] + sizes + self.sizes[start + width:])
        return len(groups) < width


def _worse(sizes, old):
    """Whether a repacked window with as many groups is worse: more bytes in all, or (as many) less uneven."""
    total, old_total = sum(sizes), sum(old)
    if total != old_total:
        return total > old_total
    return sum(x * x for x in sizes) < sum(x * x for x in old)
