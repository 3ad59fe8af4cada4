"""The CPU INT8 engine: the calibrated ranges on ORT's fused encoder graph, with u8 x s8 integer kernels.

ONNX Runtime runs the Q/DQ model (the TensorRT artifact) slowly on an AVX2 CPU: at batch 1 it was four
times slower than FP32, because its signed-activation Q/DQ MatMuls miss the fast u8 x s8 kernels and the
unfused attention costs a third of the time in small reshapes. This form keeps the Q/DQ model's numbers
(per-output-channel symmetric INT8 weights, the calibrated per-tensor activation ranges, the same layers
in float) and changes only how they run:

  - it starts from the fused graph (one Attention op per layer, LayerNorm, BiasGelu; see
    encoders/onnxruntime.py split_skip_layernorm);
  - ORT's dynamic quantizer places DynamicQuantizeMatMul / DynamicQuantizeLinear + QAttention;
  - each dynamic range is then replaced by the calibrated one: QuantizeLinear with a constant scale and
    zero point 128 (u8 on the same grid as the symmetric s8 one: scale = amax / 127);
  - where the quantizer left MatMulInteger -> Cast -> Mul (where it cannot type the input), the chain
    becomes one MatMulIntegerToFloat (same outputs, cosine 0.9999993);
  - the bias after each INT8 MatMul moves into it (_fold_biases), and the smoothing of attention
    outputs moves into V's weights (_fold_into_attention): fewer elementwise ops, the same arithmetic
    up to rounding.
    With the LayerNorm split these took a query's best-case time from 2.04 to 1.65 ms and a passage's
    from 13.2 to 11.2 ms (per-query minimum over 7 interleaved rounds, this 2-core VM).

Dynamic quantization alone was as fast, but it measures each activation's range per run, so a text's
vector depended on the batch it was encoded with (up to 3e-2 per component between batch 1 and batch
20), and recall measured on batched queries did not hold for queries asked one at a time. With constant
ranges a text always gets the same vector.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from trtrag_cli.util.errors import TrtragError

INT8_MAX = 127.0
U8_ZERO = 128
_QKV = re.compile(r"layer\.(\d+)/attention/self/(query|key|value)/MatMul$")


def fused_node_names(fused_model, plain_nodes) -> list[str]:
    """Names in the fused graph of plain-graph MatMuls: Q, K and V of layer i became `Attention` node i."""
    attention = [n.name for n in fused_model.graph.node if n.op_type == "Attention"]
    present = {n.name for n in fused_model.graph.node}
    out = set()
    for name in plain_nodes:
        match = _QKV.search(name)
        if match and int(match.group(1)) < len(attention):
            out.add(attention[int(match.group(1))])
        elif name in present:
            out.add(name)
        else:
            raise TrtragError(f"{name} has no counterpart in the fused encoder graph",
                              "delete the encoder cache folder and run trtrag calibrate again")
    return sorted(out)


def _fused_ranges(fused_model, ranges: dict[str, float], qkv_inputs: list[str]) -> dict[str, float]:
    """Calibrated amax for fused-graph tensors: same names, except each Attention's input (layer order)."""
    out = dict(ranges)
    attention = [n for n in fused_model.graph.node if n.op_type == "Attention"]
    for node, plain in zip(attention, qkv_inputs):
        out[node.input[0]] = ranges[plain]
    return out


def build_static(fused: Path, dst: Path, keep_float_plain, ranges: dict[str, float], qkv_inputs: list[str],
                 smoothings=()) -> None:
    """Write the static CPU INT8 model of `fused` to dst (see module docstring).

    smoothings (quantize/smooth.py) are applied first, exactly as calibration applied them to the plain
    graph: the MatMuls and their weights keep their names through ORT's fusions.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from trtrag_cli.calibrate import smooth
    from trtrag_cli.encode.onnxruntime import quiet_root_logger

    fused_model = onnx.load(str(fused))
    folded = _fold_into_attention(fused_model, list(smoothings))
    in_v = {sm.activation for sm in folded}
    fused_model = smooth.apply(fused_model, [sm for sm in smoothings if sm.activation not in in_v])
    exclude = fused_node_names(fused_model, keep_float_plain)
    amax = _fused_ranges(fused_model, ranges, qkv_inputs)
    amax.update({sm.activation: ranges[sm.output] for sm in folded})  # that tensor now is the smoothed one
    source = dst.with_name(dst.stem + ".smoothed.onnx")
    onnx.save(fused_model, str(source))
    with quiet_root_logger():
        # ORT's shape inference cannot type com.microsoft ops; their outputs are float here.
        quantize_dynamic(str(source), str(dst), per_channel=True, weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul", "Attention"], nodes_to_exclude=exclude,
                         extra_options={"DefaultTensorType": TensorProto.FLOAT})
    source.unlink()
    model = onnx.load(str(dst))
    graph = model.graph
    consts, nodes = [], []

    def scale_of(tensor: str) -> tuple[str, str]:
        if tensor not in amax:
            raise TrtragError(f"no calibrated range for {tensor}", "run: trtrag calibrate")
        tag = "static/" + tensor.strip("/")
        if not any(c.name == f"{tag}_scale" for c in consts):
            consts.extend([numpy_helper.from_array(np.array(max(amax[tensor], 1e-8) / INT8_MAX, np.float32),
                                                   f"{tag}_scale"),
                           numpy_helper.from_array(np.array(U8_ZERO, np.uint8), f"{tag}_zero_point")])
        return f"{tag}_scale", f"{tag}_zero_point"

    for node in graph.node:
        if node.op_type == "DynamicQuantizeMatMul":
            a, b, b_scale, b_zero = node.input[:4]
            bias = node.input[4] if len(node.input) > 4 else ""
            scale, zero = scale_of(a)
            quantized = f"{node.name}_input_u8"
            nodes.append(helper.make_node("QuantizeLinear", [a, scale, zero], [quantized], name=f"{node.name}_Q"))
            nodes.append(helper.make_node("MatMulIntegerToFloat", [quantized, b, scale, b_scale, zero, b_zero, bias],
                                          list(node.output), name=node.name, domain="com.microsoft"))
        elif node.op_type == "DynamicQuantizeLinear":
            x = node.input[0]
            y, y_scale, y_zero = node.output
            scale, zero = scale_of(x)
            nodes.append(helper.make_node("QuantizeLinear", [x, scale, zero], [y], name=node.name))
            nodes.append(helper.make_node("Identity", [scale], [y_scale], name=f"{node.name}_scale"))
            nodes.append(helper.make_node("Identity", [zero], [y_zero], name=f"{node.name}_zero_point"))
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(_fold_biases(_fuse_integer_matmuls(nodes), {i.name for i in graph.initializer}))
    graph.initializer.extend(consts)
    onnx.save(model, str(dst))


def _fold_into_attention(model, smoothings: list) -> list:
    """Apply the smoothings of attention outputs to V's weights and bias; return those applied.

    The attention output's channel j is a weighted sum of V's channel j, so dividing V's column j by
    s_j divides the output channel by s_j: the arithmetic of the Mul that smoothing would add, without
    the op (best-case query time 1.76 -> 1.65 ms on this 2-core VM; each elementwise op at batch 1 costs
    a thread-pool round trip). The consumer's weight rows are multiplied by s here too.
    """
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    attention = {n.output[0]: n for n in model.graph.node if n.op_type == "Attention"}
    folded = []
    for sm in smoothings:
        node = attention.get(sm.activation)
        if node is None:
            continue
        folded.append(sm)
        weight, bias = (numpy_helper.to_array(inits[name]).astype(np.float32) for name in node.input[1:3])
        hidden = weight.shape[1] // 3
        weight[:, 2 * hidden:] /= sm.factors
        bias[2 * hidden:] /= sm.factors
        consumer = numpy_helper.to_array(inits[sm.weight]).astype(np.float32) * sm.factors[:, None]
        for name, value in ((node.input[1], weight), (node.input[2], bias), (sm.weight, consumer)):
            inits[name].CopyFrom(numpy_helper.from_array(value, name))
    return folded


def _links(nodes: list) -> tuple[dict, dict]:
    """The node producing each tensor, and the nodes reading each tensor."""
    producer = {out: n for n in nodes for out in n.output}
    consumers: dict[str, list] = {}
    for n in nodes:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    return producer, consumers


def _fuse_integer_matmuls(nodes: list) -> list:
    """MatMulInteger -> Cast -> Mul(a_scale x b_scale) chains become one MatMulIntegerToFloat.

    ORT's dynamic quantizer emits the chain where it cannot type the MatMul's input (after the fused
    Attention op); it runs as three ops where one fused kernel does the same arithmetic.
    """
    from onnx import helper

    producer, consumers = _links(nodes)
    dropped, replaced = set(), {}
    for mm in nodes:
        if mm.op_type != "MatMulInteger" or len(mm.input) != 4:
            continue
        cast = consumers.get(mm.output[0], [])
        mul = consumers.get(cast[0].output[0], []) if len(cast) == 1 and cast[0].op_type == "Cast" else []
        if len(mul) != 1 or mul[0].op_type != "Mul":
            continue
        scales = producer.get(mul[0].input[1])
        if scales is None or scales.op_type != "Mul" or len(consumers.get(scales.output[0], [])) != 1:
            continue
        a_scale, b_scale = scales.input
        a, b, a_zero, b_zero = mm.input
        replaced[id(mul[0])] = helper.make_node(
            "MatMulIntegerToFloat", [a, b, a_scale, b_scale, a_zero, b_zero], list(mul[0].output),
            name=mm.name, domain="com.microsoft")
        dropped.update({id(mm), id(cast[0]), id(scales)})
    return [replaced.get(id(n), n) for n in nodes if id(n) not in dropped]


def _fold_biases(nodes: list, constants: set[str]) -> list:
    """Move the bias after an INT8 MatMul into it: MatMulIntegerToFloat adds a bias in its own output loop.

    Add(y, bias) goes away; BiasGelu(y, bias) becomes Gelu(y). The float engine cannot do the same: a
    MatMul has no bias input. Saves an elementwise pass per MatMul (4 of the 6 per layer).
    """
    from onnx import helper

    producer, consumers = _links(nodes)
    out = []
    for node in nodes:
        if node.op_type not in ("Add", "BiasGelu") or len(node.input) != 2 or node.input[1] not in constants:
            out.append(node)
            continue
        y, bias = node.input
        mm = producer.get(y)
        if (mm is None or mm.op_type != "MatMulIntegerToFloat" or len(consumers.get(y, [])) != 1
                or any(mm.input[6:7])):
            out.append(node)
            continue
        del mm.input[6:]
        mm.input.extend([""] * (6 - len(mm.input)) + [bias])
        if node.op_type == "Add":
            mm.output[0] = node.output[0]
        else:
            out.append(helper.make_node("Gelu", [y], list(node.output), name=node.name, domain="com.microsoft"))
    return out
