"""Graph rewrites behind the CPU engines: each must give the same numbers with fewer or cheaper ops.

Tiny hand-built graphs run in ONNX Runtime before and after the rewrite.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from trtrag_cli.calibrate import smooth
from trtrag_cli.encode.onnxruntime import new_session, session_options, split_skip_layernorm
from trtrag_cli.engine import ort_static as cpu

H = 8


def _model(nodes, inits, inputs, output="y", width=H):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(name, TensorProto.FLOAT, [None, None, H]) for name in inputs],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, [None, None, width])],
        [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets)


def _run(model, **feeds):
    return new_session(model.SerializeToString(), session_options(1)).run(None, feeds)[0]


def test_split_skip_layernorm_gives_the_fused_op_numbers_and_stays_split(tmp_path):
    rng = np.random.default_rng(0)
    inits = {"gamma": rng.normal(1, 0.1, H), "beta": rng.normal(0, 0.1, H), "bias": rng.normal(0, 1, H)}
    fused = _model([helper.make_node("SkipLayerNormalization", ["x", "skip", "gamma", "beta", "bias"], ["y"],
                                     domain="com.microsoft", epsilon=1e-12)], inits, ["x", "skip"])
    split = onnx.ModelProto()
    split.CopyFrom(fused)
    assert split_skip_layernorm(split) == 1
    assert [n.op_type for n in split.graph.node] == ["Add", "Add", "LayerNormalization"]
    x, skip = (rng.normal(0, 3, (2, 5, H)).astype(np.float32) for _ in range(2))
    np.testing.assert_allclose(_run(split, x=x, skip=skip), _run(fused, x=x, skip=skip), atol=1e-5)
    # Sessions leave SkipLayerNormFusion off, so what ORT runs is the split form.
    options = session_options(1)
    options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    new_session(split.SerializeToString(), options)
    assert "SkipLayerNormalization" not in {n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node}


def test_attention_output_smoothing_folds_into_v_exactly():
    rng = np.random.default_rng(1)
    inits = {"qkv_w": rng.normal(0, 0.5, (H, 3 * H)), "qkv_b": rng.normal(0, 0.5, 3 * H),
             "w_o": rng.normal(0, 0.5, (H, H))}
    nodes = [helper.make_node("Attention", ["x", "qkv_w", "qkv_b"], ["ctx"], domain="com.microsoft", num_heads=2),
             helper.make_node("MatMul", ["ctx", "w_o"], ["y"], name="out")]
    model = _model(nodes, inits, ["x"])
    factors = rng.uniform(0.2, 5.0, H).astype(np.float32)
    sm = smooth.Smoothing("ctx", "w_o", factors)
    with_mul = smooth.apply(model, [sm])
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    assert cpu._fold_into_attention(folded, [sm]) == [sm]
    assert [n.op_type for n in folded.graph.node] == ["Attention", "MatMul"]
    x = rng.normal(0, 1, (2, 6, H)).astype(np.float32)
    reference = _run(model, x=x)
    np.testing.assert_allclose(_run(with_mul, x=x), reference, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(_run(folded, x=x), reference, rtol=1e-4, atol=1e-4)


def test_biases_after_integer_matmuls_move_into_them():
    rng = np.random.default_rng(2)
    w = rng.integers(-127, 128, (H, H)).astype(np.int8)
    consts = {"a_scale": 0.05, "b_scale": np.full(H, 0.01), "bias": rng.normal(0, 1, H),
              "skip_bias": rng.normal(0, 1, H)}
    nodes = [helper.make_node("QuantizeLinear", ["x", "a_scale", "a_zero"], ["xq"]),
             helper.make_node("MatMulIntegerToFloat", ["xq", "w", "a_scale", "b_scale", "a_zero"], ["mm1"],
                              domain="com.microsoft"),
             helper.make_node("BiasGelu", ["mm1", "bias"], ["g"], domain="com.microsoft"),
             helper.make_node("MatMulIntegerToFloat", ["xq", "w", "a_scale", "b_scale", "a_zero"], ["mm2"],
                              domain="com.microsoft"),
             helper.make_node("Add", ["mm2", "skip_bias"], ["b2"]),
             helper.make_node("Add", ["g", "b2"], ["y"])]
    model = _model(nodes, consts, ["x"])
    model.graph.initializer.extend([numpy_helper.from_array(w, "w"),
                                    numpy_helper.from_array(np.array(128, np.uint8), "a_zero")])
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    new_nodes = cpu._fold_biases(list(rewritten.graph.node), {i.name for i in rewritten.graph.initializer})
    del rewritten.graph.node[:]
    rewritten.graph.node.extend(new_nodes)
    ops = [n.op_type for n in rewritten.graph.node]
    assert ops == ["QuantizeLinear", "MatMulIntegerToFloat", "Gelu", "MatMulIntegerToFloat", "Add"]
    assert [list(n.input)[-1] for n in rewritten.graph.node if n.op_type == "MatMulIntegerToFloat"] == \
        ["bias", "skip_bias"]
    x = rng.normal(0, 2, (2, 3, H)).astype(np.float32)
    np.testing.assert_allclose(_run(rewritten, x=x), _run(model, x=x), rtol=1e-5, atol=1e-5)
