"""SmoothQuant-style rescaling: move activation outliers into the weights before INT8.

For a MatMul y = x W whose input x feeds nothing else quantized, y = (x / s) (diag(s) W) for any
positive per-input-channel s. With s_j = max|x_j|^alpha / max|W_j|^(1 - alpha), the few channels with
huge activations (MiniLM's GELU outputs reach 24 where most stay under 5) are divided down and the
matching weight rows scaled up, so one per-tensor activation scale fits every channel. The division is
one Mul node in front of the MatMul (a pointwise op TensorRT fuses); the graph stays FP32-exact.

On MiniLM-L6 with every weight MatMul in INT8 (Debian synopses, 512 held-out queries): mean cosine to
FP32 0.9877 without smoothing, 0.9886 with alpha 0.5, 0.9963 with alpha 0.8.

Q, K and V share one input (and ORT fuses their weights into one), so shared inputs are not smoothed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SUFFIX = "_smoothed"


@dataclass(frozen=True)
class Smoothing:
    """Divide `activation` by `factors` (per channel) on its way into the MatMul reading `weight`."""

    activation: str
    weight: str
    factors: np.ndarray

    @property
    def output(self) -> str:
        return self.activation + SUFFIX


def smoothable(sites) -> list:
    """Sites whose activation feeds exactly one quantized MatMul."""
    counts: dict[str, int] = {}
    for s in sites:
        counts[s.activation] = counts.get(s.activation, 0) + 1
    return [s for s in sites if counts[s.activation] == 1]


def factors(channel_max: np.ndarray, weight: np.ndarray, alpha: float) -> np.ndarray:
    """Per-input-channel s for a [K, N] weight from the activation's per-channel |max| (length K)."""
    w_max = np.abs(weight).max(axis=1)
    s = np.clip(channel_max, 1e-5, None) ** alpha / np.clip(w_max, 1e-5, None) ** (1.0 - alpha)
    return np.clip(s, 1e-5, 1e5).astype(np.float32)


def plan(model, sites, channel_max: dict[str, np.ndarray], alpha: float) -> list[Smoothing]:
    """Smoothing factors for every smoothable site, from per-channel maxima of its activation."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    out = []
    for s in smoothable(sites):
        weight = numpy_helper.to_array(inits[s.weight]).astype(np.float32)
        out.append(Smoothing(s.activation, s.weight, factors(channel_max[s.activation], weight, alpha)))
    return out


def apply(model, smoothings: list[Smoothing]):
    """A copy of model with each smoothing applied (weights rescaled, a Mul before the MatMul)."""
    import onnx
    from onnx import helper, numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = {i.name: i for i in graph.initializer}
    by_weight = {sm.weight: sm for sm in smoothings}
    nodes = []
    for node in graph.node:
        sm = by_weight.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if sm is not None and node.input[0] == sm.activation:
            weight = numpy_helper.to_array(inits[sm.weight]).astype(np.float32)
            inits[sm.weight].CopyFrom(numpy_helper.from_array(weight * sm.factors[:, None], sm.weight))
            inverse = sm.activation + "_smooth_inverse"
            graph.initializer.append(numpy_helper.from_array((1.0 / sm.factors).astype(np.float32), inverse))
            nodes.append(helper.make_node("Mul", [sm.activation, inverse], [sm.output], name=node.name + "_smooth"))
            node.input[0] = sm.output
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    return out


def save(path: Path, smoothings: list[Smoothing], alpha: float) -> None:
    """Write the factors as JSON (they rebuild the CPU engine's graph and document the model)."""
    rows = [{"activation": s.activation, "weight": s.weight, "factors": s.factors.tolist()} for s in smoothings]
    Path(path).write_text(json.dumps({"alpha": alpha, "sites": rows}), encoding="utf-8")


def load(path: Path) -> list[Smoothing]:
    """Read factors written by save(); a missing file means no smoothing."""
    path = Path(path)
    if not path.is_file():
        return []
    data = json.loads(path.read_text(encoding="utf-8"))
    return [Smoothing(r["activation"], r["weight"], np.asarray(r["factors"], dtype=np.float32))
            for r in data["sites"]]
