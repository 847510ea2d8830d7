"""Timing shared by the subcommands: one Timer for CPU (perf_counter) and
CUDA (events, CUDA-graph replay), the machine's memory bandwidth, and facts
about the run."""
from __future__ import annotations

import contextlib
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch


class Timer:
    """Times ``fn(i)`` (i = sample index, so callers can rotate inputs).

    Before every sample (outside the timed region) a buffer larger than the
    last-level cache is rewritten, so each op starts from DRAM as a decode
    step does once the other layers have run. On CUDA each sample is bracketed
    by events on the current stream, which excludes host launch jitter before
    the first kernel but includes gaps between the op's kernels.
    """

    def __init__(self, device: torch.device, flush: bool = True):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._flush_buf = None
        if flush:
            nbytes = 2 * _last_level_cache_bytes(self.device)
            self._flush_buf = torch.empty(nbytes // 4, dtype=torch.float32, device=self.device)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def _flush(self) -> None:
        if self._flush_buf is not None:
            self._flush_buf.fill_(1.0)

    def measure(self, fn: Callable[[int], object], repeats: int, warmup: int = 2,
                max_seconds: Optional[float] = None, flush: bool = True) -> dict:
        """Run ``warmup`` untimed calls then up to ``repeats`` timed ones.

        With ``max_seconds``, sampling stops early once that much time was
        spent on at least 3 samples: slow baselines then cost a bounded time
        while fast ops still get every repeat.
        """
        for i in range(warmup):
            fn(i)
        self.sync()
        samples: list[float] = []
        spent = 0.0
        for i in range(max(1, repeats)):
            if flush:
                self._flush()
            ms = self._one(fn, warmup + i)
            samples.append(ms)
            spent += ms / 1e3
            if max_seconds is not None and len(samples) >= 3 and spent >= max_seconds:
                break
        return {"ms": statistics.median(samples), "min_ms": min(samples), "n": len(samples)}

    def measure_calls(self, calls: Sequence[Callable[[], object]], repeats: int, warmup: int = 2,
                      max_seconds: Optional[float] = None) -> dict:
        """Median time of one call, rotating among ``calls`` (the same op over
        different input sets). On CUDA each call is captured once into a CUDA
        graph and replayed, so the timed region holds the op's kernels only
        (no host launch gaps, no host-side validation); if capture fails the
        calls run eagerly with kvcomp's host-side validation off. The result
        says which (``graph``)."""
        graphs = capture_graphs(calls) if self.cuda else None
        if graphs is not None:
            r = self.measure(lambda i: graphs[i % len(graphs)].replay(), repeats, warmup, max_seconds)
            del graphs  # frees the graphs' private memory
            return dict(r, graph=True)
        with cuda_validation(False) if self.cuda else contextlib.nullcontext():
            r = self.measure(lambda i: calls[i % len(calls)](), repeats, warmup, max_seconds)
        return dict(r, graph=False)

    def _one(self, fn: Callable[[int], object], i: int) -> float:
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn(i)
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn(i)
        return (time.perf_counter() - t0) * 1e3


@contextlib.contextmanager
def cuda_validation(enabled: bool):
    """kvcomp's host-side data checks of CUDA inputs (they synchronize with
    the host) switched on or off for a block, then restored. A no-op without
    CUDA or in a build without the switch."""
    from kvcomp import ops
    setter = getattr(ops, "set_cuda_validation", None)
    previous = None
    if setter is not None and torch.cuda.is_available():
        try:
            previous = setter(enabled)
        except AttributeError:  # extension built without CUDA support
            setter = None
    try:
        yield
    finally:
        if setter is not None and previous is not None:
            setter(previous)


def capture_graph(fn: Callable[[], object], pool=None) -> "torch.cuda.CUDAGraph":
    """``fn`` captured into a CUDA graph (warmed up first on a side stream, as
    torch requires: lazy initialisation and allocations happen outside the
    capture). Validation is off while capturing."""
    with cuda_validation(False):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            fn()
    return graph


def capture_graphs(calls: Sequence[Callable[[], object]]):
    """One graph per call, sharing one memory pool; None (with a note on
    stderr) if the op cannot be captured."""
    graphs = []
    try:
        for fn in calls:
            graphs.append(capture_graph(fn, graphs[0].pool() if graphs else None))
    except RuntimeError as e:
        print(f"  note: CUDA graph capture failed, timing eager calls: {str(e).splitlines()[0]}",
              file=sys.stderr)
        torch.cuda.synchronize()
        return None
    return graphs


def _last_level_cache_bytes(device: torch.device) -> int:
    """L2 size on CUDA; L3 (else 32 MiB) on CPU. At least 16 MiB either way."""
    if device.type == "cuda":
        size = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
        return max(int(size), 16 << 20)
    size = 32 << 20
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        size = int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
    except (OSError, ValueError):
        pass
    return max(size, 16 << 20)


def read_bandwidth_gbps(timer: Timer, mib: int = 512, repeats: int = 5) -> float:
    """Best-of-N read bandwidth of a large read-only reduction (sum of fp32).

    Best rather than median, as STREAM does: this is the machine's ceiling,
    against which the ops' medians are compared.
    """
    x = torch.empty((mib << 20) // 4, dtype=torch.float32, device=timer.device).fill_(1.0)
    r = timer.measure(lambda i: x.sum(), repeats=repeats, warmup=1, flush=False)
    return x.numel() * 4 / (r["min_ms"] / 1e3) / 1e9


def copy_bandwidth_gbps(timer: Timer, mib: int = 512, repeats: int = 5) -> float:
    """Best-of-N bandwidth of a buffer copy, counting bytes read plus written."""
    return copy_bandwidth(timer, mib, repeats)["best"]


def copy_bandwidth(timer: Timer, mib: int = 512, repeats: int = 5) -> dict:
    """A device-to-device copy of a ``mib`` MiB buffer (bytes read + written
    counted): best and median GB/s over ``repeats`` copies."""
    src = torch.empty((mib << 20) // 4, dtype=torch.float32, device=timer.device).fill_(1.0)
    dst = torch.empty_like(src).fill_(0.0)
    r = timer.measure(lambda i: dst.copy_(src), repeats=repeats, warmup=1, flush=False)
    moved = 2 * src.numel() * 4
    return {"best": moved / (r["min_ms"] / 1e3) / 1e9, "median": moved / (r["ms"] / 1e3) / 1e9,
            "bytes": moved}


def cuda_free_bytes(device) -> int:
    """Bytes a new allocation can get: free device memory plus what torch's
    caching allocator holds unused (after returning that to the driver)."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    return int(torch.cuda.mem_get_info(device)[0])


def device_name(device: torch.device) -> str:
    """GPU name, or the CPU model name from /proc/cpuinfo."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine() or "cpu"


def git_commit() -> Optional[str]:
    """$KVCOMP_COMMIT if it is a hex sha (a copy of the tree without .git, as
    on the device machine), else HEAD of the checkout kvcomp is imported
    from, else None (e.g. a wheel)."""
    env = os.environ.get("KVCOMP_COMMIT", "").strip().lower()
    if re.fullmatch(r"[0-9a-f]{40}", env):
        return env
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and len(sha) == 40 else None
