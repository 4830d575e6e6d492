"""The `Plan` every solver returns, its `Status`, and its JSON form (docs/concepts.md §5)."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import stat
import tempfile
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path

from .errors import InputError, short_repr

__all__ = ["Status", "Plan", "PLAN_FORMAT", "PLAN_VERSION", "TWO_LEVEL_VERSION", "PLAN_VERSIONS", "read_plan", "check_version",
           "check_graph_attributes", "check_capacity", "graph_to_data", "graph_from_data", "write_text_atomic"]

PLAN_FORMAT = "cachefit.plan"
#: A single-level plan: one capacity, one list of groups (`Plan`).
PLAN_VERSION = 1
#: A two-level plan: stages across devices, an on-chip plan inside each (`cachefit.deploy.Deployment`).
TWO_LEVEL_VERSION = 2
#: The plan-file versions this cachefit reads.
PLAN_VERSIONS = (PLAN_VERSION, TWO_LEVEL_VERSION)


class Status(str, Enum):
    """Outcome of a solve; a `str`, equal to its name.

    OPTIMAL
        A plan whose k is proved minimal (k equals the proven lower bound),
        or, for an explicit k, whose balance is proved optimal.
    FEASIBLE
        A valid plan, not proved optimal.
    INFEASIBLE
        Proved: no plan exists; `Plan.reason` says why.
    UNKNOWN
        No plan was found and none was proved impossible (time ran out, or a
        heuristic found no plan in the order it searched).
    """

    OPTIMAL = "OPTIMAL"
    FEASIBLE = "FEASIBLE"
    INFEASIBLE = "INFEASIBLE"
    UNKNOWN = "UNKNOWN"

    def __str__(self):
        return self.value


@dataclass(frozen=True)
class Plan:
    """An ordered partition of a model graph into groups, and what is proved of it.

    Attributes
    ----------
    partitions : tuple of tuple of str
        Node ids of each group, groups in execution order, nodes in a
        topological order within each group.  Empty when there is no plan.
    sizes : tuple of int
        S of each group in bytes under `memory`.
    capacity : int
        The capacity C in bytes.
    memory : str
        ``"additive"`` or ``"liveness"``.
    chunk_fraction : float
        The streaming fraction f used by the liveness model.
    solver : str
        Name of the solver that made the plan.
    status : Status
    k : int
        Number of groups (0 when there is no plan).
    lower_bound : int
        The best proven lower bound on the number of groups.
    bottleneck : int
        The largest group size in bytes (0 when there is no plan).
    wall_s : float
        Solver wall time in seconds.
    stats : dict
        Solver-specific counters (JSON-serialisable).
    reason : str
        Why the plan is INFEASIBLE or UNKNOWN (empty otherwise).
    graph : networkx.DiGraph or LayerTable or None
        The graph the plan was made for (not compared, not in the repr).
    """

    partitions: tuple
    sizes: tuple
    capacity: int
    memory: str
    chunk_fraction: float
    solver: str
    status: Status
    k: int
    lower_bound: int
    bottleneck: int
    wall_s: float
    stats: dict = field(default_factory=dict, hash=False)
    reason: str = ""
    graph: object = field(default=None, compare=False, repr=False, hash=False)

    @property
    def ok(self):
        """True when the plan holds groups (status OPTIMAL or FEASIBLE)."""
        return self.status in (Status.OPTIMAL, Status.FEASIBLE)

    @property
    def gap(self):
        """k − lower_bound (0 means k is proved minimal); None without a plan."""
        return self.k - self.lower_bound if self.ok else None

    @property
    def balance(self):
        """bottleneck / mean group size (1.0 is perfectly balanced); None without a plan."""
        if not self.ok or not sum(self.sizes):
            return None
        return self.bottleneck * self.k / sum(self.sizes)

    def with_stats(self, **stats):
        """A copy with `stats` updated."""
        return replace(self, stats={**self.stats, **stats})

    # -- JSON ---------------------------------------------------------------
    def to_dict(self):
        """The JSON object of the plan (docs/concepts.md §5)."""
        if self.graph is None:
            raise InputError("this plan carries no graph, so it cannot be written self-contained")
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "graph": graph_to_data(self.graph),
            "capacity": self.capacity,
            "memory": self.memory,
            "chunk_fraction": self.chunk_fraction,
            "solver": self.solver,
            "status": str(self.status),
            "k": self.k,
            "lower_bound": self.lower_bound,
            "partitions": [list(group) for group in self.partitions],
            "sizes": list(self.sizes),
            "bottleneck": self.bottleneck,
            "wall_s": self.wall_s,
            "reason": self.reason,
            "stats": self.stats,
        }

    def to_json(self, path=None, *, indent=None):
        """Return the plan as JSON text; with `path`, also write it atomically."""
        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            write_text_atomic(path, text + "\n")
        return text

    @classmethod
    def from_json(cls, source):
        """Read a plan from JSON text or from a path to a plan file.

        Raises
        ------
        InputError
            Not JSON, not a cachefit plan, an unsupported version, or a field
            missing or of the wrong type.
        """
        from .limits import parse_json, read_json_file

        if isinstance(source, os.PathLike) or (isinstance(source, str) and not source.lstrip().startswith("{")):
            data = read_json_file(source, what="plan file")
        else:
            data = parse_json(source, what="plan")
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data):
        """Build a plan from its JSON object (see `from_json`)."""
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise InputError(f"not a cachefit plan: expected \"format\": \"{PLAN_FORMAT}\"")
        if data.get("version") == TWO_LEVEL_VERSION:
            raise InputError("this is a two-level plan (version 2: stages across devices, on-chip groups in each), "
                             "not a single-level plan; `cachefit check`/`estimate`/`show` and "
                             "cachefit.result.read_plan read it, and each stage's \"plan\" field is a single-level plan")
        check_version(data)
        expected = {"graph": dict, "capacity": int, "memory": str, "chunk_fraction": (int, float),
                    "solver": str, "status": str, "k": int, "lower_bound": int, "partitions": list,
                    "sizes": list, "bottleneck": int, "wall_s": (int, float)}
        for key, kind in expected.items():
            if key not in data:
                raise InputError(f"plan field {key!r} is missing")
            if not isinstance(data[key], kind) or isinstance(data[key], bool):
                raise InputError(f"plan field {key!r} has the wrong type: {type(data[key]).__name__}")
        if not isinstance(data.get("stats", {}), dict):
            raise InputError(f"plan field 'stats' has the wrong type: {type(data['stats']).__name__} "
                             "(expected an object)")
        if not isinstance(data.get("reason", ""), str):
            raise InputError(f"plan field 'reason' has the wrong type: {type(data['reason']).__name__} "
                             "(expected a string)")
        check_capacity(data["capacity"], "capacity")
        if data["status"] not in Status.__members__:
            raise InputError(f"plan field 'status' must be one of {', '.join(Status.__members__)}, got {data['status']!r}")
        partitions = data["partitions"]
        if not all(isinstance(group, list) and all(isinstance(node, str) for node in group) for group in partitions):
            raise InputError("plan field 'partitions' must be a list of lists of node ids (strings)")
        if not all(isinstance(size, int) and not isinstance(size, bool) for size in data["sizes"]):
            raise InputError("plan field 'sizes' must be a list of integers")
        return cls(
            partitions=tuple(tuple(group) for group in partitions),
            sizes=tuple(data["sizes"]),
            capacity=data["capacity"],
            memory=data["memory"],
            chunk_fraction=float(data["chunk_fraction"]),
            solver=data["solver"],
            status=Status(data["status"]),
            k=data["k"],
            lower_bound=data["lower_bound"],
            bottleneck=data["bottleneck"],
            wall_s=float(data["wall_s"]),
            stats=dict(data.get("stats", {})),
            reason=str(data.get("reason", "")),
            graph=_validated(graph_from_data(data["graph"])),  # ids are strings: partitions can name them
        )


def check_version(data):
    """Refuse a plan object whose ``version`` this cachefit does not read (`InputError`, one line)."""
    version = data.get("version")
    if isinstance(version, bool) or version not in PLAN_VERSIONS:
        raise InputError(f"unsupported plan version {version!r}; this cachefit reads versions "
                         f"{' and '.join(map(str, PLAN_VERSIONS))}")


def check_capacity(value, field):
    """Refuse a capacity read from a plan file beyond `cachefit.validation.MAX_BYTES` (2**62 B).

    Every byte count of a graph is at most that, so no plan needs more; a
    larger integer (JSON has no limit) is refused in one line naming `field`.
    """
    from .validation import MAX_BYTES

    if value > MAX_BYTES:
        text = str(value) if value < 10**30 else f"an integer of {len(str(value))} digits"
        raise InputError(f"plan field '{field}' must be at most 2**62 B (4 EiB), the most cachefit's exact integer "
                         f"arithmetic holds, got {text}")


def read_plan(source):
    """Read a plan file of any version: a `Plan` (version 1) or a two-level `Deployment` (version 2).

    Parameters
    ----------
    source : str or os.PathLike
        JSON text, or a path to a plan file.

    Returns
    -------
    Plan or cachefit.deploy.Deployment

    Raises
    ------
    InputError
        Not JSON, not a cachefit plan, an unknown version, or a malformed
        field (see `Plan.from_json` and `cachefit.deploy.Deployment.from_dict`).
    """
    from .limits import parse_json, read_json_file

    if isinstance(source, os.PathLike) or (isinstance(source, str) and not source.lstrip().startswith("{")):
        data = read_json_file(source, what="plan file")
    else:
        data = parse_json(source, what="plan")
    if isinstance(data, dict) and data.get("format") in (PLAN_FORMAT, "cachefit.deployment"):
        if data.get("version") == TWO_LEVEL_VERSION or data.get("format") == "cachefit.deployment":
            from .deploy import Deployment

            return Deployment.from_dict(data)
    return Plan.from_dict(data)


def _validated(graph):
    """`graph` (a plan's, read from a file) validated: its nodes (`cachefit.validation.validate`) and graph attributes.

    The one check of every graph a plan file holds: a version-1 plan's, a
    version-2 plan's model graph and each of its stages' on-chip graphs.
    """
    from .validation import validate  # networkx and numpy load only once a graph is read (fast refusals)

    check_graph_attributes(graph.graph)
    return validate(graph)


#: A dtype name as the builders and importers write it (``bf16``, ``fp32``, torch's ``float64``, ...).
_DTYPE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,15}")


def check_graph_attributes(attributes, *, field="graph.graph"):
    """Refuse a malformed graph attribute that the memory models, the estimator or the executor read.

    ``seq_len`` and ``batch`` positive integers (batch × seq_len at most
    `cachefit.limits.MAX_TOKENS`), ``context`` and ``stage`` non-negative
    integers, ``dtype`` a name of `cachefit.units.DTYPE_BYTES` or a torch
    dtype's name (``float64``: an imported graph), ``phase``
    ``"prefill"`` or ``"decode"``, ``config`` an object, and a transformer
    config (one with ``hidden_size``) one that
    `cachefit.graphs.transformer.normalize_config` accepts; each may be
    absent (or null).

    Raises
    ------
    InputError
        ``plan field 'graph.graph.KEY' ...``, naming the attribute (`field` is the prefix).
    """
    from .limits import MAX_TOKENS
    from .units import DTYPE_BYTES

    def integer(key, minimum, what):
        value = attributes.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum
                                  or value > MAX_TOKENS):
            raise InputError(f"plan field '{field}.{key}' must be {what} (at most {MAX_TOKENS:,}), "
                             f"got {short_repr(value)}")

    integer("seq_len", 1, "a positive integer of tokens")
    integer("batch", 1, "a positive integer of sequences")
    integer("context", 0, "a non-negative integer of tokens")
    integer("stage", 0, "a non-negative integer (the stage's index)")
    if (attributes.get("seq_len") or 1) * (attributes.get("batch") or 1) > MAX_TOKENS:
        raise InputError(f"plan field '{field}': batch × seq_len = "
                         f"{attributes['batch'] * attributes['seq_len']:,} tokens, more than {MAX_TOKENS:,}")
    dtype = attributes.get("dtype")
    if dtype is not None and (not isinstance(dtype, str) or not _DTYPE_NAME.fullmatch(dtype)):
        raise InputError(f"plan field '{field}.dtype' must name a data type ({', '.join(DTYPE_BYTES)}, or a "
                         f"torch dtype such as float64 for an imported graph), got {short_repr(dtype)}")
    phase = attributes.get("phase")
    if phase is not None and phase not in ("prefill", "decode"):
        raise InputError(f"plan field '{field}.phase' must be 'prefill' or 'decode', got {short_repr(phase)}")
    config = attributes.get("config")
    if config is not None and not isinstance(config, dict):
        raise InputError(f"plan field '{field}.config' must be an object, got {type(config).__name__}")
    if isinstance(config, dict) and "hidden_size" in config:
        from .graphs.transformer import normalize_config

        try:
            normalize_config(config)
        except InputError as error:
            raise InputError(f"plan field '{field}.config': {error}") from None


def graph_to_data(graph):
    """networkx node-link data of `graph` (a DiGraph or a LayerTable), JSON-ready."""
    from .memory import LayerTable

    if isinstance(graph, LayerTable):
        graph = graph.to_graph()
    return {
        "directed": True,
        "multigraph": False,
        "graph": _jsonable(dict(graph.graph)),
        "nodes": [{"id": node, **_jsonable(dict(data))} for node, data in graph.nodes(data=True)],
        "edges": [{"source": u, "target": v, **_jsonable(dict(data))} for u, v, data in graph.edges(data=True)],
    }


def graph_from_data(data, *, what="plan field 'graph'"):
    """The DiGraph of node-link `data` (inverse of `graph_to_data`).

    Node ids must be strings and unique, and every edge must join two listed
    nodes; the node count is checked against `cachefit.limits.max_nodes`
    before any node is built.

    Raises
    ------
    InputError
        Naming `what` and the node or edge at fault.
    """
    import networkx as nx

    from .limits import check_node_count

    if not isinstance(data, dict):
        raise InputError(f"{what} must be node-link data (an object with \"nodes\"), got {type(data).__name__}")
    nodes, links = data.get("nodes"), data.get("edges", data.get("links", []))
    if not isinstance(nodes, list) or not isinstance(links, list):
        raise InputError(f"{what} must be node-link data: \"nodes\" and \"edges\" must be lists")
    if not isinstance(data.get("graph", {}), dict):
        raise InputError(f"{what}: \"graph\" (the graph's attributes) must be an object")
    check_node_count(len(nodes), what=what)
    graph = nx.DiGraph()
    graph.graph.update(data.get("graph", {}))
    for index, node in enumerate(nodes):
        if not isinstance(node, dict) or "id" not in node:
            raise InputError(f"{what}: nodes[{index}] must be an object with an \"id\"")
        node_id = node["id"]
        if not isinstance(node_id, str):
            raise InputError(f"{what}: nodes[{index}] has id {node_id!r}; node ids must be strings")
        if node_id in graph:
            raise InputError(f"{what}: duplicate node id {node_id!r} (nodes[{index}])")
        attributes = {key: value for key, value in node.items() if key != "id"}
        if isinstance(attributes.get("tile"), list):
            attributes["tile"] = tuple(attributes["tile"])
        graph.add_node(node_id, **attributes)
    for index, link in enumerate(links):
        if not isinstance(link, dict):
            raise InputError(f"{what}: edges[{index}] must be an object with \"source\" and \"target\"")
        for end in ("source", "target"):
            if not isinstance(link.get(end), str) or link[end] not in graph:
                raise InputError(f"{what}: edges[{index}] {end} {link.get(end)!r} is not a listed node id")
        graph.add_edge(link["source"], link["target"],
                       **{key: value for key, value in link.items() if key not in ("source", "target")})
    return graph


def _jsonable(value):
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return value.item()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def write_text_atomic(path, text):
    """Write `text` to `path` all at once: a temporary file in the same folder, fsync, rename, fsync the folder.

    An existing file keeps its permission bits; a new one gets the ordinary
    ``0o666 & ~umask``.  On any failure the temporary file is removed and the
    target is left as it was.  `text` may also be `bytes` (pictures).

    Raises
    ------
    OSError
        The folder is missing or not writable, the disk is full, the target
        exists and is not an ordinary file (a device such as /dev/null, a
        FIFO, a folder: renaming over it would replace it), ...; the error's
        ``filename`` is `path` (never the temporary file).
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    try:
        status = os.stat(path)
        if not stat.S_ISREG(status.st_mode):
            raise OSError(errno.EINVAL, "it exists and is not an ordinary file (cachefit writes only ordinary "
                                        "files)", str(path))
        mode = stat.S_IMODE(status.st_mode)
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    try:
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    try:
        os.fchmod(handle, mode)  # mkstemp makes 0600
        binary = isinstance(text, (bytes, bytearray))
        with os.fdopen(handle, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException as exc:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError):
            raise OSError(exc.errno, exc.strerror, str(path)) from None
        raise
    _fsync_directory(directory)


def _fsync_directory(directory):
    """Make a rename in `directory` durable (where the platform allows opening a folder)."""
    try:
        descriptor = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(descriptor)
    except OSError:  # pragma: no cover - some file systems refuse fsync on a folder
        pass
    finally:
        os.close(descriptor)
