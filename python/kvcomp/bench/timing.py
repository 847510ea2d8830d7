"""Timing shared by the subcommands: one Timer for CPU (perf_counter) and
CUDA (events), the machine's memory bandwidth, and facts about the run."""
from __future__ import annotations

import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional

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
    src = torch.empty((mib << 20) // 4, dtype=torch.float32, device=timer.device).fill_(1.0)
    dst = torch.empty_like(src).fill_(0.0)
    r = timer.measure(lambda i: dst.copy_(src), repeats=repeats, warmup=1, flush=False)
    return 2 * src.numel() * 4 / (r["min_ms"] / 1e3) / 1e9


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
    """HEAD of the checkout kvcomp is imported from, or None (e.g. a wheel)."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and len(sha) == 40 else None
