"""The explicit-quantization graph: Q/DQ pairs on the inputs of the encoder's weight MatMuls.

Placement follows what TensorRT fuses into INT8 GEMMs and what keeps a BERT encoder accurate:
  - every MatMul/Gemm with a constant weight gets DequantizeLinear(int8 weight, per-output-channel
    scale, axis=1) on its weight and a QuantizeLinear -> DequantizeLinear pair on its activation input;
  - one activation pair per tensor, shared by all its consumers (Q, K and V read the same LayerNorm
    output, so they share one scale and TensorRT can merge them into one GEMM);
  - attention's activation x activation MatMuls (QK^T, softmax x V), softmax, LayerNorm, GELU and the
    pooling stay in floating point: quantizing them cost a MiniLM encoder most of its accuracy
    (mean cosine 0.87 with every MatMul in INT8, measured on this project's probe).
Scales are symmetric (zero point 0), as TensorRT requires: scale = amax / 127.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

INT8_MAX = 127.0


@dataclass(frozen=True)
class Site:
    """One quantizable weight MatMul: its node name, activation input and weight initializer."""

    node: str
    activation: str
    weight: str


def find_sites(model) -> list[Site]:
    """Weight MatMuls (2-D constant weight, [K, N]) in graph order."""
    inits = {i.name: i for i in model.graph.initializer}
    sites = []
    for node in model.graph.node:
        if node.op_type != "MatMul" or len(node.input) != 2:
            continue
        act, weight = node.input
        if weight in inits and len(inits[weight].dims) == 2 and act not in inits:
            sites.append(Site(node.name, act, weight))
    return sites


def activation_names(sites: list[Site]) -> list[str]:
    """Distinct activation tensors feeding the sites, in graph order."""
    return list(dict.fromkeys(s.activation for s in sites))


def with_outputs(model, names: list[str]):
    """A copy of model that also returns the named intermediate tensors (for statistics)."""
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    present = {o.name for o in copy.graph.output}
    for name in names:
        if name not in present:
            copy.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return copy


def weight_scales(weight: np.ndarray) -> np.ndarray:
    """Per-output-channel symmetric scales of a [K, N] MatMul weight (max calibration, as is usual)."""
    amax = np.abs(weight).max(axis=0)
    return np.where(amax > 0, amax / INT8_MAX, 1.0).astype(np.float32)


def quantize_weight(weight: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Round-to-nearest symmetric int8 of a [K, N] weight with per-column scales."""
    return np.clip(np.rint(weight / scales[None, :]), -INT8_MAX, INT8_MAX).astype(np.int8)


def insert_qdq(model, ranges: dict[str, float], keep_float: frozenset[str] = frozenset()):
    """A copy of model with Q/DQ on every site except the MatMul nodes named in keep_float.

    ranges maps activation tensor -> amax. Weights of quantized sites are stored as int8 initializers,
    so the file is about a quarter of the fp32 one.
    """
    import onnx
    from onnx import helper, numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    sites = [s for s in find_sites(out) if s.node not in keep_float]
    inits = {i.name: i for i in graph.initializer}
    new_nodes: dict[str, list] = {}  # node name -> Q/DQ nodes to place before it
    act_out: dict[str, str] = {}
    weight_out: dict[str, str] = {}
    for site in sites:
        if site.activation not in act_out:
            amax = float(ranges[site.activation])
            tag = _tag(site.activation)
            scale, zero = f"{tag}_scale", f"{tag}_zero_point"
            graph.initializer.extend([
                numpy_helper.from_array(np.array(max(amax, 1e-8) / INT8_MAX, dtype=np.float32), scale),
                numpy_helper.from_array(np.array(0, dtype=np.int8), zero)])
            q, dq = f"{tag}_quantized", f"{tag}_dequantized"
            new_nodes.setdefault(site.node, []).extend([
                helper.make_node("QuantizeLinear", [site.activation, scale, zero], [q], name=f"{tag}_Q"),
                helper.make_node("DequantizeLinear", [q, scale, zero], [dq], name=f"{tag}_DQ")])
            act_out[site.activation] = dq
        if site.weight not in weight_out:
            w = numpy_helper.to_array(inits[site.weight]).astype(np.float32)
            scales = weight_scales(w)
            tag = _tag(site.weight)
            wq = numpy_helper.from_array(quantize_weight(w, scales), f"{tag}_int8")
            graph.initializer.extend([
                wq, numpy_helper.from_array(scales, f"{tag}_scale"),
                numpy_helper.from_array(np.zeros(scales.shape, dtype=np.int8), f"{tag}_zero_point")])
            dq = f"{tag}_dequantized"
            new_nodes.setdefault(site.node, []).append(helper.make_node(
                "DequantizeLinear", [wq.name, f"{tag}_scale", f"{tag}_zero_point"], [dq], name=f"{tag}_DQ",
                axis=1))
            weight_out[site.weight] = dq
    quantized = {s.node: s for s in sites}
    nodes = []
    for node in graph.node:
        nodes.extend(new_nodes.get(node.name, []))
        if node.name in quantized:
            site = quantized[node.name]
            node.input[0] = act_out[site.activation]
            node.input[1] = weight_out[site.weight]
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    # fp32 weights no longer read by any node are dropped.
    used = {name for node in graph.node for name in node.input}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    del graph.value_info[:]
    return out


def _tag(name: str) -> str:
    return "qdq/" + name.strip("/").replace("::", "_")
