"""Streaming activation statistics: one |x| histogram per tensor, memory bounded by its bin count.

ONNX Runtime's histogram calibrators keep every activation until the end, which ran this 24 GiB
machine out of memory at 2,048 queries. Here each batch of activations is folded into a fixed-size
histogram and dropped: memory is tensors x BINS counts, whatever the number of queries.

Ranges (amax, the symmetric clipping threshold) come from the histogram by one of three methods:
  max         the largest |x| seen
  percentile  the |x| below which `percentile`% of the values fall
  entropy     the threshold whose 128-level quantized distribution has the least KL divergence from
              the reference distribution (TensorRT's entropy calibration, computed on our histogram)
"""

from __future__ import annotations

import numpy as np

BINS = 2048
QUANT_LEVELS = 128  # positive int8 levels of a symmetric quantizer
METHODS = ("entropy", "percentile", "max")


class TensorHistogram:
    """|x| histogram over [0, edge] that widens (by merging into a wider grid) when larger values arrive."""

    def __init__(self, bins: int = BINS):
        self.bins = bins
        self.counts = np.zeros(bins, dtype=np.float64)
        self.edge = 0.0
        self.max = 0.0
        self.seen = 0

    def add(self, values: np.ndarray) -> None:
        """Fold one batch of activations into the histogram."""
        a = np.abs(np.asarray(values, dtype=np.float32).ravel())
        if a.size == 0:
            return
        top = float(a.max())
        self.max = max(self.max, top)
        self.seen += a.size
        if top > self.edge:
            self._widen(top)
        counts, _ = np.histogram(a, bins=self.bins, range=(0.0, self.edge))
        self.counts += counts

    def _widen(self, top: float) -> None:
        # Grow by at least 1.5x so a slowly rising maximum does not re-bin every batch.
        new_edge = top if self.edge == 0.0 else max(top, self.edge * 1.5)
        if self.counts.any():
            width = self.edge / self.bins
            centers = (np.arange(self.bins) + 0.5) * width
            self.counts, _ = np.histogram(centers, bins=self.bins, range=(0.0, new_edge), weights=self.counts)
        self.edge = new_edge

    def amax(self, method: str, percentile: float = 99.99) -> float:
        """The clipping threshold for method (see module docstring)."""
        if self.seen == 0:
            raise ValueError("no values were collected")
        if method == "max":
            return self.max
        if method == "percentile":
            cdf = np.cumsum(self.counts) / self.counts.sum()
            index = int(np.searchsorted(cdf, percentile / 100.0))
            return min(self.max, (index + 1) * self.edge / self.bins)
        if method == "entropy":
            return min(self.max, _entropy_threshold(self.counts) * self.edge / self.bins)
        raise ValueError(f"unknown method {method!r}")

    def state(self) -> dict:
        """Plain data for calibration.json."""
        return {"edge": self.edge, "max": self.max, "seen": self.seen}


def _entropy_threshold(counts: np.ndarray, levels: int = QUANT_LEVELS) -> int:
    """Bin index (exclusive upper edge) whose clipped distribution loses least information at `levels`.

    For each candidate i: P = counts[:i] with everything above folded into the last bin; Q = P merged
    into `levels` groups and spread back evenly over each group's non-empty bins; minimise KL(P || Q).
    """
    nbins = len(counts)
    last_nonzero = int(np.nonzero(counts)[0][-1]) + 1 if counts.any() else nbins
    if last_nonzero <= levels:
        return last_nonzero
    best_i, best_kl = nbins, np.inf
    tail = np.cumsum(counts[::-1])[::-1]  # tail[i] = sum(counts[i:])
    # Coarse stride over candidates keeps this at a few ms per tensor; refine around the best.
    candidates = list(range(levels, last_nonzero + 1, 8))
    for refine in (False, True):
        for i in candidates:
            kl = _kl_for(counts, tail, i, levels)
            if kl < best_kl:
                best_kl, best_i = kl, i
        if not refine:
            candidates = range(max(levels, best_i - 8), min(last_nonzero, best_i + 8) + 1)
    return best_i


def _kl_for(counts: np.ndarray, tail: np.ndarray, i: int, levels: int) -> float:
    p = counts[:i].copy()
    if i < len(counts):
        p[-1] += tail[i]
    nonzero = p > 0
    # Group the i bins into `levels` nearly equal groups.
    group = (np.arange(i) * levels) // i
    group_sum = np.bincount(group, weights=counts[:i], minlength=levels)
    group_nonzero = np.bincount(group, weights=nonzero.astype(np.float64), minlength=levels)
    q = np.where(nonzero, group_sum[group] / np.maximum(group_nonzero[group], 1.0), 0.0)
    p_sum, q_sum = p.sum(), q.sum()
    if p_sum == 0 or q_sum == 0:
        return np.inf
    p = p / p_sum
    q = q / q_sum
    mask = p > 0
    with np.errstate(divide="ignore"):
        return float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))


class RangeCollector:
    """A TensorHistogram per named tensor, and the ranges and drift they give after each batch."""

    def __init__(self, names: list[str], bins: int = BINS):
        self.hists = {name: TensorHistogram(bins) for name in names}

    def add(self, outputs: dict[str, np.ndarray]) -> None:
        """Fold one run's activations, keyed by tensor name."""
        for name, values in outputs.items():
            self.hists[name].add(values)

    def ranges(self, method: str, percentile: float = 99.99,
               chosen: dict[str, float] | None = None) -> dict[str, float]:
        """amax per tensor; a tensor in `chosen` takes its own percentile (100: the maximum) instead."""
        chosen = chosen or {}
        out = {}
        for name, h in self.hists.items():
            if name in chosen:
                out[name] = h.amax("max") if chosen[name] >= 100.0 else h.amax("percentile", chosen[name])
            else:
                out[name] = h.amax(method, percentile)
        return out


def drift(previous: dict[str, float], current: dict[str, float]) -> tuple[float, str]:
    """Largest relative change of any tensor's range between two iterations, and that tensor."""
    worst, worst_name = 0.0, ""
    for name, now in current.items():
        before = previous.get(name, 0.0)
        change = abs(now - before) / before if before > 0 else (0.0 if now == 0 else np.inf)
        if change > worst:
            worst, worst_name = change, name
    return float(worst), worst_name
