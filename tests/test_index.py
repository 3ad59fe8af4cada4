"""Vector index (faiss) and BM25 index (bm25s) on their own: build, search, delete, save, load."""

from __future__ import annotations

import numpy as np
import pytest

from trtrag_cli.index.bm25 import LexicalIndex
from trtrag_cli.index.vectors import VectorIndex, placement_for
from trtrag_cli.recipe.schema import IndexConfig, LexicalConfig
from trtrag_cli.retrieve.retriever import fuse
from trtrag_cli.util.errors import TrtragError
from trtrag_cli.util.gpu import gpu_count, torch_gpu_count


def _unit(rng, n, d=32):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("kind", ["flat", "ivf", "ivfpq", "hnsw"])
def test_kinds_find_exact_neighbour_and_round_trip(tmp_path, kind):
    rng = np.random.default_rng(0)
    x = _unit(rng, 2000)
    ids = np.arange(1000, 3000, dtype=np.int64)
    cfg = IndexConfig(kind=kind, nlist=16, nprobe=16, hnsw_m=16, pq_m=16, device="cpu")
    vi = VectorIndex(cfg, 32)
    vi.build(x, ids)
    _, got = vi.search(x[:50], 5)
    assert (got[:, 0] == ids[:50]).mean() >= 0.98
    vi.save(tmp_path / "v.faiss")
    back = VectorIndex.load(tmp_path / "v.faiss", cfg, 32)
    assert back.ntotal == 2000
    np.testing.assert_array_equal(back.search(x[:50], 5)[1], vi.search(x[:50], 5)[1])


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_delete_in_place_keeps_the_other_ids_right(kind):
    rng = np.random.default_rng(1)
    x = _unit(rng, 500)
    ids = np.arange(500, dtype=np.int64) * 10 + 7
    vi = VectorIndex(IndexConfig(kind=kind, nlist=4, nprobe=4, device="cpu"), 32)
    vi.build(x, ids)
    assert vi.remove(ids[:10]) == 10
    _, got = vi.search(x[:10], 3)
    assert not set(got.ravel().tolist()) & set(ids[:10].tolist())
    assert vi.ntotal == 490
    # Each survivor still finds itself under its own id (an IDMap around an IVF got this wrong).
    _, got = vi.search(x[10:60], 1)
    np.testing.assert_array_equal(got[:, 0], ids[10:60])


def test_ivf_in_an_idmap_from_older_versions_is_rebuilt_not_edited(tmp_path):
    import faiss

    x = _unit(np.random.default_rng(4), 400)
    old = faiss.IndexIDMap2(faiss.IndexIVFFlat(faiss.IndexFlatIP(32), 32, 4, faiss.METRIC_INNER_PRODUCT))
    old.train(x)
    old.add_with_ids(x, np.arange(400, dtype=np.int64))
    faiss.write_index(old, str(tmp_path / "v.faiss"))
    vi = VectorIndex.load(tmp_path / "v.faiss", IndexConfig(kind="ivf", device="cpu"), 32)
    assert vi.kind() == "ivf" and not vi.supports_remove()
    with pytest.raises(TrtragError, match="rebuild"):
        vi.remove(np.arange(3, dtype=np.int64))


def test_ivfpq_needs_a_divisor_of_the_dimension():
    vi = VectorIndex(IndexConfig(kind="ivfpq", pq_m=5, device="cpu"), 32)
    with pytest.raises(TrtragError, match="does not divide"):
        vi.build(_unit(np.random.default_rng(5), 100), np.arange(100, dtype=np.int64))


def test_torch_exact_matches_faiss_flat_and_slabs_agree():
    from trtrag_cli.index.torch_exact import TorchExact

    rng = np.random.default_rng(6)
    x = _unit(rng, 3000, 48)
    ids = rng.permutation(10_000)[:3000].astype(np.int64)
    q = _unit(rng, 40, 48)
    vi = VectorIndex(IndexConfig(kind="flat", device="cpu"), 48)
    vi.build(x, ids)
    want_s, want_i = vi.search(q, 100)
    whole = TorchExact(x, ids, ["cpu"], select="topk")
    # 64 KiB of scores: slabs of 256 rows for 40 queries, then a merge.
    slabs = TorchExact(x, ids, ["cpu"], budget_mb=1 / 16)
    grouped = TorchExact(x, ids, ["cpu"], select="grouped")  # 3000 = 11 groups of 256 + a ragged tail
    for engine in (whole, slabs, grouped):
        got_s, got_i = engine.search(q, 100)
        np.testing.assert_allclose(got_s, want_s, rtol=1e-5, atol=1e-5)
        # Ids may differ only where two neighbours' scores tie to float32 rounding.
        for gs, gi, ws, wi in zip(got_s, got_i, want_s, want_i):
            differ = gi != wi
            assert set(gi[ws > ws[-1] + 1e-5].tolist()) <= set(wi.tolist())
            assert np.all(np.abs(gs[differ] - ws[differ]) < 1e-5)
    # Fewer vectors than k: padded with -1 ids, like faiss.
    small = TorchExact(x[:5], ids[:5], ["cpu"])
    s, i = small.search(q[:2], 8)
    assert (i[:, 5:] == -1).all() and set(i[0, :5].tolist()) == set(ids[:5].tolist())
    with pytest.raises(TrtragError, match="selection"):
        TorchExact(x, ids, ["cpu"], select="fast")


def test_grouped_selection_is_exact_on_long_rows():
    from trtrag_cli.index.torch_exact import TorchExact

    rng = np.random.default_rng(8)
    x, q = _unit(rng, 70_000, 16), _unit(rng, 16, 16)
    ids = np.arange(70_000, dtype=np.int64)
    plain = TorchExact(x, ids, ["cpu"], select="topk").search(q, 10)
    grouped = TorchExact(x, ids, ["cpu"], select="grouped").search(q, 10)
    np.testing.assert_array_equal(grouped[1], plain[1])
    np.testing.assert_array_equal(grouped[0], plain[0])


def test_torch_exact_shards_merge_like_one_device():
    from trtrag_cli.index.torch_exact import TorchExact

    rng = np.random.default_rng(7)
    x, q = _unit(rng, 1000, 16), _unit(rng, 8, 16)
    ids = np.arange(1000, dtype=np.int64)
    one = TorchExact(x, ids, ["cpu"]).search(q, 20)
    three = TorchExact(x, ids, ["cpu", "cpu", "cpu"]).search(q, 20)
    np.testing.assert_array_equal(one[1], three[1])


@pytest.mark.parametrize("kind,device,exact,faiss_gpus,torch_gpus,engines,problem", [
    ("ivf", "cpu", "auto", 2, 2, (), None),                       # index.device: cpu wins over any GPU
    ("hnsw", "gpu", "auto", 1, 1, (), None),                      # no GPU HNSW in faiss: the CPU, not an error
    ("hnsw", "gpu", "auto", 0, 0, (), None),
    ("flat", "auto", "auto", 1, 1, ("torch", "faiss"), None),     # both present: measured at load
    ("flat", "auto", "faiss", 0, 2, (), "index.exact is faiss"),  # the named engine has no GPU here
    ("flat", "gpu", "torch", 1, 1, ("torch",), None),
    ("flat", "auto", "auto", 0, 0, (), None),                     # no GPU: faiss on the CPU
    ("flat", "gpu", "auto", 0, 0, (), "index.device is gpu"),
    ("ivfpq", "auto", "auto", 0, 1, (), None),                    # torch's GPU cannot run IVF: the CPU
    ("ivfpq", "gpu", "auto", 0, 1, (), "index.device is gpu"),
    ("ivf", "gpu", "auto", 2, 0, ("faiss",), None),
])
def test_placement_rules(kind, device, exact, faiss_gpus, torch_gpus, engines, problem):
    plan = placement_for(kind, device, exact, faiss_gpus, torch_gpus)
    assert plan.engines == engines, plan
    if problem is None:
        assert plan.problem is None, plan
    else:
        assert plan.problem and plan.problem[0].startswith(problem), plan
    assert plan.why


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
@pytest.mark.parametrize("device", ["auto", "gpu", "cpu"])
def test_index_and_doctor_follow_the_same_placement(kind, device):
    """On this machine, whatever it has: VectorIndex moves (or refuses) as placement_for says, and doctor
    reports the same."""
    from trtrag_cli.doctor import vector_index_stage
    from trtrag_cli.recipe.schema import load_recipe
    from trtrag_cli.util.gpu import gpus

    plan = placement_for(kind, device, "auto", gpu_count(), torch_gpu_count() if kind == "flat" else 0)
    rng = np.random.default_rng(0)
    vi = VectorIndex(IndexConfig(kind=kind, nlist=4, nprobe=4, device=device), 32)
    vectors = _unit(rng, 256)
    if plan.problem:
        with pytest.raises(TrtragError, match=plan.problem[0].split(" (")[0]):
            vi.build(vectors, np.arange(256))
            vi.to_device()
    else:
        vi.build(vectors, np.arange(256))
        assert vi.to_device().startswith("gpu" if plan.engines else "cpu")
    stage = vector_index_stage(load_recipe(None, [f"index.kind={kind}", f"index.device={device}"]), gpus())
    assert stage["ok"] == (plan.problem is None)
    assert (stage["backend"] in ("faiss-cpu", "none")) == (not plan.engines)


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
    lex = LexicalIndex.from_texts(LexicalConfig(), texts)
    m = lex.match("turbine inspections")
    assert m.rows.tolist() == [0, 2] and (m.scores > 0).all()
    assert lex.idf("invoic") > 0 and lex.idf("zzz") == 0
    lex.postings[0].save(tmp_path / "bm25")
    back = LexicalIndex.open(LexicalConfig(), [tmp_path], np.array([0, 4]))
    np.testing.assert_allclose(back.match("turbine inspections").scores, m.scores)
    assert not len(back.match("the and of").rows)
    assert isinstance(back.postings[0].terms, np.memmap)  # read from disk, not loaded
    np.testing.assert_array_equal(np.asarray(back.postings[0].docs), lex.postings[0].docs)


def test_fusion_modes():
    from trtrag_cli.index.bm25 import LexicalScores

    vectors = np.eye(4, dtype=np.float32)
    q = np.array([0.9, 0.1, 0.0, 0.0], np.float32)
    dense_rows = np.array([0, 1, 2, 3])
    lex = LexicalScores(np.array([2, 3]), np.array([5.0, 1.0], np.float32))
    vec = vectors.__getitem__
    assert fuse("dense", dense_rows, None, q, vec, 10, 60, 0.5)[0].tolist() == [0, 1, 2, 3]
    assert fuse("bm25", dense_rows, lex, q, vec, 10, 60, 0.5)[0].tolist() == [2, 3]
    rows, scores = fuse("rrf", dense_rows, lex, q, vec, 10, 60, 0.5)
    assert set(rows.tolist()) == {0, 1, 2, 3} and np.all(np.diff(scores) <= 0)
    assert fuse("hybrid", dense_rows, lex, q, vec, 10, 60, 1.0)[0][0] == 0
    assert fuse("hybrid", dense_rows, lex, q, vec, 10, 60, 0.0)[0][0] == 2
