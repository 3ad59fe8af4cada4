"""Timing helpers shared by benchmarks and the build steps that choose by measurement."""

from __future__ import annotations

import numpy as np


def percentiles(values: list[float], digits: int = 3) -> dict[str, float]:
    """P50/P90/P99 and mean of a list of milliseconds."""
    a = np.asarray(values, dtype=np.float64)
    return {"p50": round(float(np.percentile(a, 50)), digits), "p90": round(float(np.percentile(a, 90)), digits),
            "p99": round(float(np.percentile(a, 99)), digits), "mean": round(float(a.mean()), digits)}


def ms_percentiles(samples_s: list[float]) -> dict:
    """P50/P90/P99 and mean in ms of samples in seconds (percentiles, keyed for the JSON)."""
    stats = percentiles([s * 1e3 for s in samples_s], digits=4)
    return {**{f"{k}_ms": v for k, v in stats.items()}, "n": len(samples_s)}


def cycled(items: list, n: int) -> list:
    """The first n items of items repeated (a fixed amount of work from a shorter list)."""
    return (items * (n // max(1, len(items)) + 1))[:n]
