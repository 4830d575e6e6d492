"""One stage of a two-level plan (`cachefit.deploy.Deployment`) as a plan the executor runs (no torch).

Stage *i* of a version-2 plan file carries a self-contained on-chip plan of
its sub-graph: the stage's nodes plus one ``stage_input`` node per
activation it receives from an earlier stage.  The executor runs that
sub-graph as a model of its own: each ``stage_input`` is a model input
(seeded random activations of the planned width), and the equivalence
reference is the stage sub-model run unpartitioned on the same inputs.
"""

from __future__ import annotations

from ..errors import InputError

__all__ = ["is_deployment", "stage_plan", "stages_line", "inner_groups"]


def is_deployment(plan):
    """Whether `plan` is a two-level plan (`cachefit.deploy.Deployment`)."""
    from ..deploy import Deployment

    return isinstance(plan, Deployment)


def stages_line(deployment):
    """One line naming the stages of `deployment` and how to run one."""
    count = len(deployment.groups)
    sizes = ", ".join(f"{index} ({group.k} group(s))" for index, group in enumerate(deployment.groups))
    return (f"this is a two-level plan (version 2) of {count} stage(s): {sizes}; run one stage's on-chip plan "
            f"with --stage I (executor: run(plan, stage=I)), I in 0..{count - 1}")


def stage_plan(deployment, stage):
    """The on-chip plan of stage `stage` of `deployment`, after checking both levels.

    Parameters
    ----------
    deployment : cachefit.deploy.Deployment
    stage : int or None

    Returns
    -------
    cachefit.Plan

    Raises
    ------
    InputError
        `stage` is None (the message lists the stages) or out of range, or
        the deployment has no groups.
    cachefit.executor.verify.PlanRejected
        `cachefit.check` rejects the deployment (either level or the link).
    """
    from .verify import PlanRejected

    if not deployment.ok:
        raise InputError(f"the two-level plan has no groups ({deployment.status}): {deployment.reason}")
    if stage is None:
        raise InputError(stages_line(deployment))
    count = len(deployment.groups)
    if isinstance(stage, bool) or not isinstance(stage, int) or not 0 <= stage < count:
        raise InputError(f"`stage` must be an integer in 0..{count - 1} (the plan has {count} stage(s)), "
                         f"got {stage!r}")
    from ..checker import check

    report = check(deployment)
    if not report.ok:
        more = len(report.violations) - 1
        raise PlanRejected(f"`plan` fails cachefit.check: {report.violations[0]}"
                           + (f" (and {more} more)" if more else ""))
    return deployment.groups[stage]


def inner_groups(deployment):
    """Each stage's on-chip groups as runs of the stage's own nodes (for partition-major pipeline stages).

    The on-chip plan of a stage may have tiled nodes (tiles and a join,
    ``parent``) or whole blocks expanded into operators (``block.3.q``):
    each stage node is placed in the group where its output is complete (the
    last group holding a piece of it), so a tiled node runs whole there.
    Groups left without a node (they held only pieces) are dropped.

    Returns
    -------
    list of list of list of str
        Per stage, its groups' stage nodes in the stage's order.
    """
    stages = deployment.stages
    result = []
    for index, nodes in enumerate(stages.partitions):
        plan = deployment.groups[index]
        sub = plan.graph
        members = set(nodes)
        expanded = [block for block in (sub.graph.get("expanded_blocks") or ()) if block in members]

        def owner(node):
            parent = sub.nodes[node].get("parent")
            node = parent if parent is not None and node not in members else node
            if node in members:
                return node
            for block in expanded:  # an operator of an expanded block (the embedding's norm: of the embedding)
                if node.startswith(f"{block}.") or (block == "embed" and node == "embed_norm"):
                    return block
            return None  # a stage_input

        last = {}
        for position, group in enumerate(plan.partitions):
            for node in group:
                stage_node = owner(node)
                if stage_node is not None:
                    last[stage_node] = position
        missing = [node for node in nodes if node not in last]
        if missing:
            raise InputError(f"stage {index}: node {missing[0]!r} is in none of its on-chip groups")
        groups = [[node for node in nodes if last[node] == position] for position in range(plan.k)]
        # A node placed before a node it follows in the stage would break the order: keep runs monotone.
        flat = [node for group in groups for node in group]
        if flat != list(nodes):
            raise InputError(f"stage {index}: its on-chip groups do not keep the stage's node order")
        result.append([group for group in groups if group])
    return result
