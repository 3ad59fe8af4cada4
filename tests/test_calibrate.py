"""Calibration pieces on their own: query sets, streaming histograms, the TensorRT cache, the Q/DQ graph."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from trtrag_cli.calibrate import qdq
from trtrag_cli.calibrate.run import _split, read_queries
from trtrag_cli.calibrate.trt_cache import (read_trt_cache, target_trt_version, trt_cache_text,
                                            trt_version_number, write_trt_cache)
from trtrag_cli.calibrate.stats import RangeCollector, TensorHistogram, drift
from trtrag_cli.util import deps
from trtrag_cli.util.errors import TrtragError

# ------------------------------------------------------------------------------------------ query sets

def test_queries_from_text_jsonl_and_folders(tmp_path):
    (tmp_path / "a.txt").write_text("# a comment\nfirst query\n\n  second query  \nfirst query\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"query": "third"}) + "\n" + json.dumps({"text": "fourth"}) + "\n")
    assert read_queries(tmp_path / "a.txt") == ["first query", "second query"]
    assert read_queries(tmp_path) == ["first query", "second query", "third", "fourth"]


def test_bad_query_files_name_the_problem(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"query": "ok"}\nnot json\n')
    with pytest.raises(TrtragError, match=r"bad.jsonl:2: not a JSON object"):
        read_queries(tmp_path / "bad.jsonl")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(TrtragError, match="not UTF-8"):
        read_queries(tmp_path / "latin1.txt")
    with pytest.raises(TrtragError, match="not found"):
        read_queries(tmp_path / "missing.txt")


def test_split_needs_a_full_batch_and_keeps_a_holdout():
    queries = [f"q{i}" for i in range(2600)]
    batches, holdout = _split(queries, 1024, 256)
    assert [len(b) for b in batches] == [1024, 1320] and len(holdout) == 256
    assert not set(holdout) & {q for b in batches for q in b}
    with pytest.raises(TrtragError, match="1000 distinct calibration queries, but one batch needs 1024") as exc:
        _split(queries[:1000], 1024, 256)
    assert "add at least 24 more" in exc.value.hint
    with pytest.raises(TrtragError, match="at least 1024"):
        _split(queries, 512, 0)
    # A set just over one batch gives the gate only what is left over.
    _, holdout = _split(queries[:1100], 1024, 256)
    assert len(holdout) == 76


# ------------------------------------------------------------------------------------------ statistics

def test_histogram_widens_without_losing_counts_and_finds_percentiles():
    rng = np.random.default_rng(0)
    hist = TensorHistogram()
    parts = [rng.normal(0, s, 200_000).astype(np.float32) for s in (0.5, 1.0, 2.0)]  # the range grows twice
    for p in parts:
        hist.add(p)
    values = np.abs(np.concatenate(parts))
    assert hist.counts.sum() == pytest.approx(values.size)
    assert hist.amax("max") == pytest.approx(values.max())
    assert hist.amax("percentile", 99.9) == pytest.approx(np.percentile(values, 99.9), rel=0.03)
    entropy = hist.amax("entropy")
    assert 0 < entropy < hist.amax("max")


def test_entropy_clips_a_lone_outlier_that_max_keeps():
    rng = np.random.default_rng(1)
    hist = TensorHistogram()
    hist.add(np.concatenate([rng.normal(0, 1, 500_000), [80.0]]).astype(np.float32))
    assert hist.amax("max") == pytest.approx(80.0)
    assert hist.amax("entropy") < 10.0
    assert hist.amax("percentile", 99.99) < 10.0


def test_drift_reports_the_tensor_that_moved_most():
    collector = RangeCollector(["a", "b"])
    collector.add({"a": np.array([1.0, -2.0]), "b": np.array([4.0])})
    first = collector.ranges("max")
    collector.add({"a": np.array([3.0]), "b": np.array([4.0])})
    moved, name = drift(first, collector.ranges("max"))
    assert name == "a" and moved == pytest.approx(0.5)


# ----------------------------------------------------------------------------------- TensorRT cache

def test_calibration_cache_matches_the_documented_text_format():
    text = trt_cache_text({"input": 1.0, "layer:0/out": 2.5}, (10, 3, 0))
    lines = text.splitlines()
    # Header: TRT-<getInferLibVersion()>-<calibrator>; lines: name, ': ', big-endian float32 scale in hex.
    assert lines[0] == "TRT-100300-EntropyCalibration2"
    assert lines[1] == "input: 3c010204"  # 1/127 as IEEE-754 big-endian
    assert lines[2] == "layer:0/out: " + struct.pack(">f", 2.5 / 127).hex()
    back = read_trt_cache(text)
    assert back["input"] == pytest.approx(1.0) and back["layer:0/out"] == pytest.approx(2.5)
    assert trt_version_number((8, 2, 3)) == 8203 and trt_version_number((10, 16, 1)) == 101601
    with pytest.raises(ValueError):
        read_trt_cache("input: 3c010204\n")


def test_calibration_cache_is_written_only_for_a_real_tensorrt_version(tmp_path):
    ranges = {"input": 1.0, "layer:0/out": 2.5}
    # A version named for the target machine: its header, whatever is installed here.
    entry = write_trt_cache(tmp_path, ranges, "10.16.1")
    assert entry == {"file": "calibration.cache", "version": "10.16.1", "source": "requested",
                     "algorithm": "EntropyCalibration2"}
    text = (tmp_path / "calibration.cache").read_text()
    assert text.splitlines()[0] == "TRT-101601-EntropyCalibration2" and read_trt_cache(text) == pytest.approx(ranges)
    assert write_trt_cache(tmp_path, ranges, "8.6.1.6")["version"] == "8.6.1"  # a build number is ignored
    assert (tmp_path / "calibration.cache").read_text().startswith("TRT-8601-")
    # None named: the installed TensorRT's version, or no file and the reason (no made-up version).
    bare = tmp_path / "bare"
    bare.mkdir()
    entry = write_trt_cache(bare, ranges)
    if deps.available("tensorrt"):
        import tensorrt

        assert entry["source"] == "installed" and tensorrt.__version__.startswith(entry["version"])
    else:
        assert entry["file"] is None and entry["version"] is None and not (bare / "calibration.cache").exists()
        assert "TensorRT is not installed here" in entry["skipped"] and "trt_version" in entry["skipped"]


def test_a_bad_or_too_new_tensorrt_version_is_a_one_line_error():
    with pytest.raises(TrtragError, match="'ten' is not a TensorRT version") as err:
        target_trt_version("ten")
    assert "10.16.1" in err.value.hint
    with pytest.raises(TrtragError, match="not a TensorRT version"):
        target_trt_version("10.16")  # the header needs the patch number too
    with pytest.raises(TrtragError, match="TensorRT 11.0.0 has no implicit-INT8 calibrator") as err:
        target_trt_version("11.0.0")
    assert "\n" not in str(err.value)
    assert target_trt_version(None) is None and target_trt_version("10.3.0") == (10, 3, 0)


# ------------------------------------------------------------------------------------------- Q/DQ graph

def _tiny_model(k: int = 8, n: int = 6):
    """x[?, k] -> LayerNormalization -> MatMul(W1) and MatMul(W2) on the same input -> Add."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(2)
    inits = [numpy_helper.from_array(rng.normal(0, 0.2, (k, n)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.2, (k, n)).astype(np.float32), "w2"),
             numpy_helper.from_array(np.ones(k, np.float32), "gamma"),
             numpy_helper.from_array(np.zeros(k, np.float32), "beta")]
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["h"], name="ln"),
             helper.make_node("MatMul", ["h", "w1"], ["a"], name="mm1"),
             helper.make_node("MatMul", ["h", "w2"], ["b"], name="mm2"),
             helper.make_node("Add", ["a", "b"], ["y"], name="add")]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])], inits)
    return onnx.helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model, x):
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def test_qdq_graph_is_symmetric_per_channel_and_shares_activation_scales():
    import onnx
    from onnx import numpy_helper

    model = _tiny_model()
    sites = qdq.find_sites(model)
    assert [s.node for s in sites] == ["mm1", "mm2"] and qdq.activation_names(sites) == ["h"]
    x = np.random.default_rng(3).normal(0, 1, (32, 8)).astype(np.float32)
    amax = 3.0
    out = qdq.insert_qdq(model, {"h": amax})
    onnx.checker.check_model(out)
    ops = [n.op_type for n in out.graph.node]
    assert ops.count("QuantizeLinear") == 1 and ops.count("DequantizeLinear") == 3  # one shared activation pair
    inits = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    assert "w1" not in inits and "w2" not in inits  # fp32 weights replaced by int8 ones
    for node in out.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:  # weight DQs read int8 constants
            assert inits[node.input[0]].dtype == np.int8
            assert {a.name: a.i for a in node.attribute}.get("axis") == 1
            assert inits[node.input[1]].shape == (6,) and not inits[node.input[2]].any()
    assert inits["qdq/h_scale"] == pytest.approx(amax / 127)
    ref, got = _run(model, x), _run(out, x)
    assert np.abs(ref - got).max() < 0.05 * np.abs(ref).max()


def test_keep_float_leaves_a_matmul_untouched():
    model = _tiny_model()
    out = qdq.insert_qdq(model, {"h": 3.0}, frozenset({"mm2"}))
    by_name = {n.name: n for n in out.graph.node}
    assert list(by_name["mm2"].input) == ["h", "w2"]
    assert by_name["mm1"].input[1].endswith("_dequantized")


def test_with_outputs_exposes_intermediate_tensors():
    model = _tiny_model()
    x = np.ones((2, 8), np.float32)
    import onnxruntime as ort

    sess = ort.InferenceSession(qdq.with_outputs(model, ["h"]).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    y, h = sess.run(["y", "h"], {"x": x})
    assert h.shape == (2, 8) and np.allclose(h, 0.0, atol=1e-3)  # LayerNorm of a constant row


def _ffn_model(k: int = 8, n: int = 6):
    """x[?, k] -> MatMul(w1) -> MatMul(w2): two single-consumer sites."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(4)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (k, n)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.3, (n, n)).astype(np.float32), "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
             helper.make_node("MatMul", ["h", "w2"], ["y"], name="mm2")]
    graph = helper.make_graph(nodes, "ffn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])], inits)
    return onnx.helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_smoothing_is_exact_in_fp32_and_tames_outlier_channels(tmp_path):
    from trtrag_cli.calibrate import smooth

    model = _ffn_model()
    x = np.random.default_rng(5).normal(0, 1, (256, 8)).astype(np.float32)
    x[:, 3] *= 40.0  # one outlier channel, as in a transformer's LayerNorm/GELU outputs
    sites = qdq.find_sites(model)
    assert [s.node for s in smooth.smoothable(sites)] == ["mm1", "mm2"]
    from onnx import numpy_helper

    w1 = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "w1"))
    channel_max = {"x": np.abs(x).max(0), "h": np.abs(x @ w1).max(0)}
    plan = smooth.plan(model, sites, channel_max, alpha=0.8)
    smoothed = smooth.apply(model, plan)
    assert np.allclose(_run(smoothed, x), _run(model, x), rtol=1e-4, atol=1e-4)
    # The quantized input of mm1 is now the smoothed tensor, with far more even channels.
    assert qdq.find_sites(smoothed)[0].activation == "x_smoothed"
    def spread(a):
        return np.abs(a).max(0).max() / np.abs(a).max(0).min()

    assert spread(x / plan[0].factors) < spread(x) / 5
    smooth.save(tmp_path / "s.json", plan, 0.8)
    back = smooth.load(tmp_path / "s.json")
    assert [b.activation for b in back] == ["x", "h"] and np.allclose(back[0].factors, plan[0].factors)
    assert smooth.load(tmp_path / "missing.json") == []


def test_tuning_picks_smoothing_and_a_percentile_that_keeps_rare_huge_values():
    from onnx import numpy_helper

    from trtrag_cli.calibrate import smooth
    from trtrag_cli.calibrate.run import _RowSample

    model = _ffn_model()
    rng = np.random.default_rng(6)
    x = rng.normal(0, 1, (4000, 8)).astype(np.float32)
    x[:, 3] *= 30.0                     # an outlier channel: smoothing should win for x
    w1 = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "w1"))
    h = x @ w1
    h[::997] *= 60.0                    # four huge rows, as MiniLM's GELU outputs have: clipping them hurts
    sites = qdq.find_sites(model)
    channel_max = {"x": np.abs(x).max(0), "h": np.abs(h).max(0)}
    tuning = smooth.search(model, sites, channel_max, {"x": x, "h": h}, (0.5, 0.8), (99.9, 100.0))
    chosen = {r["tensor"]: r for r in tuning.report}
    assert chosen["x_smoothed"]["alpha"] in (0.5, 0.8)
    assert chosen["x_smoothed"]["error"] < chosen["x_smoothed"]["error_untuned"]["none@99.9"]
    h_row = chosen.get("h_smoothed") or chosen["h"]
    assert h_row["percentile"] == 100.0   # 99.9 would clip the huge rows that dominate the product
    assert h_row["error_untuned"]["none@99.9"] > 10 * h_row["error_untuned"]["none@100"]
    # Plain names always get their own best unsmoothed percentile (for TensorRT's legacy cache).
    assert {"x", "h"} <= set(tuning.percentiles) and "x_smoothed" in tuning.percentiles
    assert [s.activation for s in tuning.smoothings][0] == "x"
    # The chosen percentile is applied to that tensor only.
    collector = RangeCollector(["x_smoothed", "other"])
    values = np.concatenate([np.ones(99_990), np.full(10, 50.0)]).astype(np.float32)
    collector.add({"x_smoothed": values, "other": values})
    ranges = collector.ranges("percentile", 99.9, {"x_smoothed": 100.0})
    assert ranges["x_smoothed"] == pytest.approx(50.0) and ranges["other"] < 2.0
    # Row sampling keeps at most its size, drawn from every batch that passed.
    sample = _RowSample(100)
    for batch in range(5):
        sample.add(np.full((80, 2), batch, np.float32))
    assert sample.rows.shape == (100, 2) and len(set(sample.rows[:, 0].tolist())) == 5

