"""Vector index (faiss) and BM25 index (bm25s) on their own: build, search, delete, save, load."""

from __future__ import annotations

import numpy as np
import pytest

from trtrag_cli.errors import TrtragError
from trtrag_cli.index import VectorIndex
from trtrag_cli.lexical import LexicalIndex
from trtrag_cli.recipe import IndexConfig, LexicalConfig
from trtrag_cli.retrieve import fuse
from trtrag_cli.store import ChunkRecord, ChunkStore


def _unit(rng, n, d=32):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_kinds_find_exact_neighbour_and_round_trip(tmp_path, kind):
    rng = np.random.default_rng(0)
    x = _unit(rng, 2000)
    ids = np.arange(1000, 3000, dtype=np.int64)
    cfg = IndexConfig(kind=kind, nlist=16, nprobe=16, hnsw_m=16)
    vi = VectorIndex(cfg, 32)
    vi.build(x, ids)
    _, got = vi.search(x[:50], 5)
    assert (got[:, 0] == ids[:50]).mean() >= 0.98
    vi.save(tmp_path / "v.faiss")
    back = VectorIndex.load(tmp_path / "v.faiss", cfg, 32)
    assert back.ntotal == 2000
    np.testing.assert_array_equal(back.search(x[:50], 5)[1], vi.search(x[:50], 5)[1])


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_delete_in_place(kind):
    rng = np.random.default_rng(1)
    x = _unit(rng, 500)
    ids = np.arange(500, dtype=np.int64)
    vi = VectorIndex(IndexConfig(kind=kind, nlist=4, nprobe=4), 32)
    vi.build(x, ids)
    assert vi.remove(ids[:10]) == 10
    _, got = vi.search(x[:10], 3)
    assert not set(got.ravel().tolist()) & set(range(10))
    assert vi.ntotal == 490


def test_hnsw_refuses_in_place_delete():
    vi = VectorIndex(IndexConfig(kind="hnsw"), 32)
    vi.build(_unit(np.random.default_rng(2), 100), np.arange(100, dtype=np.int64))
    assert not vi.supports_remove()
    with pytest.raises(TrtragError, match="rebuild"):
        vi.remove(np.arange(3, dtype=np.int64))


def test_dimension_mismatch_is_a_user_error(tmp_path):
    vi = VectorIndex(IndexConfig(), 32)
    vi.build(_unit(np.random.default_rng(3), 10), np.arange(10, dtype=np.int64))
    with pytest.raises(TrtragError, match="dimension 16"):
        vi.search(np.zeros((1, 16), np.float32), 3)
    vi.save(tmp_path / "v.faiss")
    with pytest.raises(TrtragError, match="expected 64"):
        VectorIndex.load(tmp_path / "v.faiss", IndexConfig(), 64)
    (tmp_path / "bad.faiss").write_bytes(b"not an index")
    with pytest.raises(TrtragError, match="cannot read vector index"):
        VectorIndex.load(tmp_path / "bad.faiss", IndexConfig(), 32)


def test_bm25_stems_and_round_trips(tmp_path):
    texts = ["The turbines were inspected in March.", "Invoices are paid within thirty days.",
             "Wind turbine inspection schedule", ""]
    lex = LexicalIndex(LexicalConfig())
    lex.build(texts)
    s = lex.scores("turbine inspections")
    assert s.shape == (4,) and s[0] > 0 and s[2] > 0 and s[1] == 0 and s[3] == 0
    assert lex.idf("invoic") > 0 and lex.idf("zzz") == 0
    lex.save(tmp_path / "bm25")
    back = LexicalIndex.load(tmp_path / "bm25", LexicalConfig())
    np.testing.assert_allclose(back.scores("turbine inspections"), s)
    assert not back.scores("the and of").any()


def test_store_maps_ids_to_rows_and_rejects_duplicates(tmp_path):
    recs = [ChunkRecord(f"d{i}#0", f"d{i}", f"d{i}.txt", 0, "", f"text {i}", f"h{i}") for i in range(5)]
    store = ChunkStore(recs, np.eye(5, dtype=np.float32))
    rows = store.rows_of(np.array([store.ids[3], -1, store.ids[0]]))
    assert rows.tolist() == [3, -1, 0]
    store.save(tmp_path)
    assert ChunkStore.load(tmp_path).records == recs
    with pytest.raises(TrtragError, match="share an id"):
        ChunkStore(recs + recs[:1], np.eye(6, dtype=np.float32))


def test_fusion_modes():
    vectors = np.eye(4, dtype=np.float32)
    q = np.array([0.9, 0.1, 0.0, 0.0], np.float32)
    dense_rows = np.array([0, 1, 2, 3])
    lex = np.array([0.0, 0.0, 5.0, 1.0], np.float32)
    assert fuse("dense", dense_rows, None, q, vectors, 10, 60, 0.5)[0].tolist() == [0, 1, 2, 3]
    assert fuse("bm25", dense_rows, lex, q, vectors, 10, 60, 0.5)[0].tolist() == [2, 3]
    rows, scores = fuse("rrf", dense_rows, lex, q, vectors, 10, 60, 0.5)
    assert set(rows.tolist()) == {0, 1, 2, 3} and np.all(np.diff(scores) <= 0)
    assert fuse("hybrid", dense_rows, lex, q, vectors, 10, 60, 1.0)[0][0] == 0
    assert fuse("hybrid", dense_rows, lex, q, vectors, 10, 60, 0.0)[0][0] == 2
