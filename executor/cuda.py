"""CUDA helpers of the executor: L2 persistence, graph node counts, copy bandwidth (imports torch).

The L2 calls go through NVIDIA's ``cuda-bindings`` package (``cuda.bindings.runtime``),
which shares PyTorch's primary context.  Every call is checked; any failure
(package missing, a driver that refuses the limit, a graph PyTorch did not
keep) is reported in the result as a sentence, never swallowed and never
fatal: the run goes on without the L2 window.

What `L2Persistence` does, in CUDA terms:

1. reads ``cudaDevAttrMaxPersistingL2CacheSize`` and
   ``cudaDevAttrMaxAccessPolicyWindowSize``;
2. saves ``cudaLimitPersistingL2CacheSize`` and sets it to the requested
   set-aside, never above the device maximum;
3. per captured group graph (``torch.cuda.CUDAGraph(keep_graph=True)``, before
   ``instantiate``), sets a ``cudaLaunchAttributeAccessPolicyWindow`` over the
   group's contiguous weight buffer on every kernel node
   (``cudaGraphKernelNodeSetAttribute``), hit property persisting, miss
   property streaming, hit ratio min(1, set-aside / window);
4. on exit resets the persisting lines (``cudaCtxResetPersistingL2Cache``) and
   restores the saved limit.
"""

from __future__ import annotations

import logging
import statistics
import time

import torch

__all__ = ["cuda_runtime", "L2Persistence", "kernel_node_count", "new_cuda_graph", "copy_bandwidth",
           "count_kernels"]

logger = logging.getLogger(__name__)


class CudaCallError(RuntimeError):
    """A cuda-bindings call returned an error code."""


def cuda_runtime():
    """``cuda.bindings.runtime``, or None when the package is missing."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        return None
    return runtime


def _check(runtime, result, what):
    """Unpack a cuda-bindings ``(error, *outputs)`` tuple; raise `CudaCallError` on an error."""
    error, *outputs = result
    if error != runtime.cudaError_t.cudaSuccess:
        try:
            _, text = runtime.cudaGetErrorString(error)
            text = text.decode() if isinstance(text, bytes) else str(text)
        except Exception:  # noqa: BLE001 - the message is best effort
            text = ""
        raise CudaCallError(f"{what} failed: {error!r} {text}".strip())
    if not outputs:
        return None
    return outputs[0] if len(outputs) == 1 else tuple(outputs)


def new_cuda_graph():
    """A ``torch.cuda.CUDAGraph`` that keeps its cudaGraph_t (for editing), and whether it does."""
    try:
        return torch.cuda.CUDAGraph(keep_graph=True), True
    except TypeError:  # a torch without keep_graph
        return torch.cuda.CUDAGraph(), False


def _kernel_nodes(runtime, raw_graph):
    if isinstance(raw_graph, int) and hasattr(runtime, "cudaGraph_t"):
        raw_graph = runtime.cudaGraph_t(init_value=raw_graph)
    count = _check(runtime, runtime.cudaGraphGetNodes(raw_graph), "cudaGraphGetNodes(count)")
    count = count[1] if isinstance(count, tuple) else count
    if not count:
        return []
    nodes = _check(runtime, runtime.cudaGraphGetNodes(raw_graph, count), "cudaGraphGetNodes")
    nodes = nodes[0] if isinstance(nodes, tuple) else nodes
    kernel = runtime.cudaGraphNodeType.cudaGraphNodeTypeKernel
    return [node for node in nodes
            if node is not None and _check(runtime, runtime.cudaGraphNodeGetType(node),
                                           "cudaGraphNodeGetType") == kernel]


def kernel_node_count(graph):
    """Kernel nodes of a captured ``CUDAGraph`` made with keep_graph=True, or None if unknown."""
    runtime = cuda_runtime()
    if runtime is None:
        return None
    try:
        return len(_kernel_nodes(runtime, graph.raw_cuda_graph()))
    except Exception as exc:  # noqa: BLE001 - counting is diagnostic
        logger.info("kernel node count unavailable: %s", exc)
        return None


class L2Persistence:
    """Persisting-L2 set-aside for the duration of a ``with`` block, and windows on graph nodes.

    Attributes
    ----------
    available : bool
        The set-aside was made; `window` can be called.
    status : str
        One sentence: what was set, or why nothing was.
    set_aside : int
        Bytes of L2 set aside for persisting accesses (0 when unavailable).
    max_set_aside, max_window : int
        The device's limits (0 when unknown).
    windows : int
        Kernel nodes given a window so far.
    """

    def __init__(self, device, requested_bytes=None):
        self.device = torch.device(device)
        self.requested = requested_bytes
        self.available = False
        self.status = "not started"
        self.set_aside = self.max_set_aside = self.max_window = 0
        self.windows = 0
        self.window_failures = []
        self._runtime = None
        self._saved_limit = None

    def __enter__(self):
        runtime = cuda_runtime()
        if runtime is None:
            self.status = "unavailable: the cuda-bindings package (cuda.bindings.runtime) is not installed"
            return self
        self._runtime = runtime
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        try:
            torch.cuda.init()
            attr = runtime.cudaDeviceAttr
            self.max_set_aside = int(_check(runtime, runtime.cudaDeviceGetAttribute(
                attr.cudaDevAttrMaxPersistingL2CacheSize, index), "cudaDeviceGetAttribute(MaxPersistingL2)"))
            self.max_window = int(_check(runtime, runtime.cudaDeviceGetAttribute(
                attr.cudaDevAttrMaxAccessPolicyWindowSize, index), "cudaDeviceGetAttribute(MaxWindow)"))
            if self.max_set_aside <= 0 or self.max_window <= 0:
                self.status = (f"unavailable: the device reports no persisting L2 (max set-aside "
                               f"{self.max_set_aside} B, max window {self.max_window} B)")
                return self
            limit = runtime.cudaLimit.cudaLimitPersistingL2CacheSize
            self._saved_limit = int(_check(runtime, runtime.cudaDeviceGetLimit(limit), "cudaDeviceGetLimit"))
            wanted = self.max_set_aside if self.requested is None else min(int(self.requested),
                                                                           self.max_set_aside)
            _check(runtime, runtime.cudaDeviceSetLimit(limit, wanted), "cudaDeviceSetLimit(PersistingL2)")
            self.set_aside = int(_check(runtime, runtime.cudaDeviceGetLimit(limit), "cudaDeviceGetLimit"))
            self.available = self.set_aside > 0
            self.status = (f"set-aside {self.set_aside} B of L2 for persisting accesses (device max "
                           f"{self.max_set_aside} B, max window {self.max_window} B)")
        except Exception as exc:  # noqa: BLE001 - reported, the run goes on without persistence
            self.status = f"unavailable: {exc}"
            self.available = False
        return self

    def window(self, graph, base_ptr, num_bytes):
        """Set a persisting window [base_ptr, base_ptr + num_bytes) on every kernel node of `graph`.

        `graph` is a captured, not yet instantiated ``CUDAGraph(keep_graph=True)``.
        Returns the number of kernel nodes set (0 and a reason in
        `window_failures` when it could not).
        """
        if not self.available or num_bytes <= 0:
            return 0
        runtime = self._runtime
        try:
            nodes = _kernel_nodes(runtime, graph.raw_cuda_graph())
            size = min(int(num_bytes), self.max_window)
            value = runtime.cudaKernelNodeAttrValue()
            value.accessPolicyWindow.base_ptr = int(base_ptr)
            value.accessPolicyWindow.num_bytes = size
            value.accessPolicyWindow.hitRatio = float(min(1.0, self.set_aside / size))
            value.accessPolicyWindow.hitProp = runtime.cudaAccessProperty.cudaAccessPropertyPersisting
            value.accessPolicyWindow.missProp = runtime.cudaAccessProperty.cudaAccessPropertyStreaming
            ids = getattr(runtime, "cudaKernelNodeAttrID", None) or runtime.cudaLaunchAttributeID
            attribute = getattr(ids, "cudaLaunchAttributeAccessPolicyWindow", None)
            if attribute is None:
                attribute = ids.cudaKernelNodeAttributeAccessPolicyWindow
            for node in nodes:
                _check(runtime, runtime.cudaGraphKernelNodeSetAttribute(node, attribute, value),
                       "cudaGraphKernelNodeSetAttribute(AccessPolicyWindow)")
            self.windows += len(nodes)
            return len(nodes)
        except Exception as exc:  # noqa: BLE001 - reported
            self.window_failures.append(str(exc))
            return 0

    def __exit__(self, *exc_info):
        runtime = self._runtime
        if runtime is None or self._saved_limit is None:
            return False
        try:
            torch.cuda.synchronize(self.device)
            _check(runtime, runtime.cudaCtxResetPersistingL2Cache(), "cudaCtxResetPersistingL2Cache")
            _check(runtime, runtime.cudaDeviceSetLimit(runtime.cudaLimit.cudaLimitPersistingL2CacheSize,
                                                       self._saved_limit), "cudaDeviceSetLimit(restore)")
        except Exception as exc:  # noqa: BLE001 - reported
            self.status += f"; reset failed: {exc}"
        return False

    def to_dict(self):
        return {"available": self.available, "status": self.status, "set_aside_bytes": self.set_aside,
                "max_set_aside_bytes": self.max_set_aside, "max_window_bytes": self.max_window,
                "kernel_nodes_with_window": self.windows, "window_failures": self.window_failures[:3]}


_BANDWIDTH = {}


def copy_bandwidth(device, *, nbytes=None, repeats=7, cached=True):
    """Measured copy bandwidth in bytes/s, counting bytes read plus bytes written, and the method.

    Measured once per device and process (`cached`); later calls return the
    first measurement.

    CUDA: a device-to-device ``copy_`` of a 512 MiB buffer (several times
    any L2), timed with CUDA events, median of `repeats`.  CPU: the same
    ``copy_`` on a 64 MiB host buffer (a memcpy), timed with
    ``time.perf_counter``.
    """
    device = torch.device(device)
    key = (str(device), nbytes, repeats)
    if cached and key in _BANDWIDTH:
        return _BANDWIDTH[key]
    if device.type == "cuda":
        nbytes = nbytes or 512 * 2**20
        source = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
        target = torch.empty_like(source)
        target.copy_(source)
        torch.cuda.synchronize(device)
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            target.copy_(source)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        seconds = statistics.median(times)
        del source, target
        torch.cuda.empty_cache()
        method = f"device-to-device copy of {nbytes // 2**20} MiB, CUDA events, median of {repeats}"
    else:
        nbytes = nbytes or 64 * 2**20
        source = torch.ones(nbytes, dtype=torch.uint8)
        target = torch.empty_like(source)
        target.copy_(source)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            target.copy_(source)
            times.append(time.perf_counter() - started)
        seconds = statistics.median(times)
        method = f"host memcpy (tensor copy_) of {nbytes // 2**20} MiB, median of {repeats}"
    _BANDWIDTH[key] = (2 * nbytes / seconds, method)
    return _BANDWIDTH[key]


def count_kernels(function, device):
    """CUDA kernels launched by one call of `function`, counted with torch.profiler, or None."""
    try:
        from torch.profiler import ProfilerActivity, profile
        from torch.autograd import DeviceType
    except ImportError:
        return None
    try:
        torch.cuda.synchronize(device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            function()
            torch.cuda.synchronize(device)
        count = 0
        for event in prof.events():
            if event.device_type != DeviceType.CUDA:
                continue
            name = event.name.lower()
            if name.startswith(("memcpy", "memset")):
                continue
            count += 1
        return count
    except Exception as exc:  # noqa: BLE001 - counting is diagnostic
        logger.info("profiler kernel count unavailable: %s", exc)
        return None
