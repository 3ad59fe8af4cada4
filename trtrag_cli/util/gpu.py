"""What GPUs this machine has, asked in one place.

torch_gpu_count (and gpu_present from it): CUDA devices torch can run on, what the encoders, the exact
search and the generators use. gpu_count: GPUs faiss-gpu can use. gpus(): what nvidia-smi lists (name,
memory, driver) for reports, without importing torch.
"""

from __future__ import annotations

import importlib.util
import shutil
import statistics
import subprocess
import threading
from contextlib import contextmanager
from pathlib import Path

from trtrag_cli.util.deps import available


def torch_gpu_count() -> int:
    """CUDA devices PyTorch sees (0 without torch or a GPU; without NVIDIA device nodes torch is not imported)."""
    if not any(Path("/dev").glob("nvidia[0-9]*")) or importlib.util.find_spec("torch") is None:
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def gpu_present() -> bool:
    """Whether torch sees a CUDA GPU: the probe the encoders and generators decide by."""
    return torch_gpu_count() > 0


def gpu_count() -> int:
    """GPUs faiss can use (0 without faiss-gpu)."""
    if not available("faiss"):
        return 0
    import faiss

    return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0


def gpus() -> list[dict]:
    """GPUs seen by nvidia-smi (empty when there is none or no driver)."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        out = subprocess.run([exe, "--query-gpu=name,memory.total,driver_version,compute_cap",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    rows = []
    for line in out.stdout.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 4:
            rows.append({"name": parts[0], "memory_mib": int(float(parts[1])), "driver": parts[2],
                         "compute_capability": parts[3]})
    return rows


class GpuWatch:
    """nvidia-smi sampling every GPU's SM clock and power every `every_ms` while a block runs, so that a
    benchmark's figures come with whether the card held its clock (a card at its power limit lowers it, and
    memory-bound decoding loses a few percent with it). summary(): for the busiest GPU (highest median power),
    {"gpu", "samples", "sm_clock_mhz": {min, median, max}, "power_w": {median, max}, "power_limit_w",
    "at_power_limit"}; {} where there is no nvidia-smi or no sample came."""

    FIELDS = "index,clocks.sm,power.draw,power.limit"

    def __init__(self, every_ms: int = 200):
        self.every_ms = every_ms
        self._process = None
        self._rows: list[list[str]] = []

    def __enter__(self) -> GpuWatch:
        exe = shutil.which("nvidia-smi")
        if exe:
            try:
                self._process = subprocess.Popen(
                    [exe, f"--query-gpu={self.FIELDS}", "--format=csv,noheader,nounits", f"--loop-ms={self.every_ms}"],
                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            except OSError:
                self._process = None
        return self

    def __exit__(self, *exc) -> None:
        if self._process is None:
            return
        self._process.terminate()
        try:
            out, _ = self._process.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            out, _ = self._process.communicate()
        self._rows = [[p.strip() for p in line.split(",")] for line in out.splitlines()]

    def summary(self) -> dict:
        by_gpu: dict[str, list[tuple[float, float, float]]] = {}
        for row in self._rows:
            try:
                index, clock, power, limit = row[0], float(row[1]), float(row[2]), float(row[3])
            except (IndexError, ValueError):   # "[N/A]" fields, a line cut off at the end
                continue
            by_gpu.setdefault(index, []).append((clock, power, limit))
        if not by_gpu:
            return {}
        median = statistics.median
        index, samples = max(by_gpu.items(), key=lambda kv: median(p for _, p, _ in kv[1]))
        clocks, powers, limit = [c for c, _, _ in samples], [p for _, p, _ in samples], samples[-1][2]
        return {"gpu": int(index), "samples": len(samples),
                "sm_clock_mhz": {"min": min(clocks), "median": median(clocks), "max": max(clocks)},
                "power_w": {"median": round(median(powers), 1), "max": max(powers)}, "power_limit_w": limit,
                "at_power_limit": max(powers) >= 0.97 * limit}


_CAPTURE = threading.Lock()


@contextmanager
def graph_capture(torch, graph, **kwargs):
    """torch.cuda.graph(graph, **kwargs), one capture at a time in this process, thread-local.

    A service captures CUDA graphs from several threads (the encoder's shape buckets on a retrieval worker,
    the decoder's batch buckets on its scheduler, exact search): two captures at once collide in the
    allocator ("already recording to mempool"), and in the default global mode another thread's CUDA call
    during a capture invalidates it. Seen on an H100 under 32 concurrent chat clients.
    """
    with _CAPTURE, torch.cuda.graph(graph, capture_error_mode="thread_local", **kwargs):
        yield
