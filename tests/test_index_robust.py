"""`trtrag index` under stress: readers during re-indexing, damaged generations, killed runs, documents that
bring their own embeddings, and the scaling defaults (nlist, search threads)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import yaml

from trtrag_cli.index.build import run_index
from trtrag_cli.recipe.schema import load_recipe
from trtrag_cli.util import workspace
from trtrag_cli.util.errors import TrtragError
from trtrag_cli.util.workspace import Workspace

TEXTS = {
    "gateway.txt": "The Hub G4 gateway pairs with up to 200 sensors over LoRaWAN. Its battery lasts ten hours.",
    "warranty.md": "# Warranty\nThe VX-200 sensor carries a three-year warranty. Advance replacement is free.",
    "returns.txt": "Opened sensors may be returned within 30 days; a restocking fee of 15 percent applies.",
    "office.txt": "Corvane moved its headquarters to Fife in April 2025. The old office closed in May.",
}


@pytest.fixture
def small(tmp_path, make_recipe):
    """A four-file corpus and a recipe path for it."""
    root = tmp_path / "small"
    root.mkdir()
    for name, text in TEXTS.items():
        (root / name).write_text(text)
    return root, make_recipe()


def _ws(recipe_path: Path) -> Workspace:
    return Workspace(load_recipe(recipe_path).workspace_dir())


def _index(recipe_path: Path, corpus: Path, *sets: str, **kw) -> dict:
    return run_index(load_recipe(recipe_path, list(sets)), [corpus], **kw)


# --- 1. readers during re-indexing ---------------------------------------------------------------------


def test_readers_never_fail_while_the_index_is_rebuilt(small, monkeypatch):
    """One thread re-indexes in a loop while another opens the index and asks, again and again. With no
    grace period, only the readers' leases keep the generations they open on disk."""
    from trtrag_cli.retrieve.retriever import Retriever

    corpus, recipe = small
    monkeypatch.setattr(workspace, "GRACE_S", 0.0)
    _index(recipe, corpus)
    stop, failures, asked = threading.Event(), [], []

    def reader():
        while not stop.is_set():
            try:
                with Retriever(load_recipe(recipe)) as retriever:
                    ranking = retriever.rank("restocking fee for an opened sensor")
                    assert retriever.store.records_of(ranking.rows[:1])[0].file == "returns.txt"
                asked.append(1)
            except Exception as exc:  # noqa: BLE001 - every failure counts
                failures.append(repr(exc))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for k in range(8):
            (corpus / "office.txt").write_text(TEXTS["office.txt"] + f" Revision {k}.")
            _index(recipe, corpus)
    finally:
        stop.set()
        thread.join()
    assert failures == [] and len(asked) >= 3
    # Nobody reads now: the next publish prunes every superseded generation.
    _index(recipe, corpus)
    ws = _ws(recipe)
    assert [p.name for p in ws.index_root.glob("gen-*")] == [ws.current_index().name]
    # so are the segments that only superseded generations listed
    listed = (ws.current_index() / "SEGMENTS").read_text().split()
    assert sorted(p.name for p in (ws.index_root / "segments").iterdir()) == sorted(listed)


def test_pruning_keeps_leased_and_recent_generations(small, monkeypatch):
    corpus, recipe = small
    ws = _ws(recipe)
    _index(recipe, corpus)
    first = ws.current_index()
    lease = ws.lease_index()
    monkeypatch.setattr(workspace, "GRACE_S", 0.0)
    _index(recipe, corpus)
    _index(recipe, corpus)
    assert first.is_dir() and lease.path == first  # leased: kept through two publishes
    lease.release()
    _index(recipe, corpus)
    assert not first.exists()
    second = ws.current_index()
    monkeypatch.setattr(workspace, "GRACE_S", 3600.0)
    _index(recipe, corpus)
    _index(recipe, corpus)
    assert second.is_dir()  # superseded within the grace period: kept


# --- 2. damaged generations -----------------------------------------------------------------------------


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _segment(gen: Path) -> Path:
    """The first (base) segment folder a generation reads."""
    return gen.parent / "segments" / (gen / "SEGMENTS").read_text().split()[0]


DAMAGE = {
    "truncated vectors.faiss": lambda g: _truncate(_segment(g) / "vectors.faiss"),
    "deleted chunks.sqlite": lambda g: (_segment(g) / "chunks.sqlite").unlink(),
    "truncated chunks.sqlite": lambda g: _truncate(_segment(g) / "chunks.sqlite"),
    "garbage vectors.npy": lambda g: (_segment(g) / "vectors.npy").write_bytes(np.random.default_rng(0).bytes(4000)),
    "truncated BM25 postings": lambda g: _truncate(_segment(g) / "bm25" / "docs.npy"),
    "deleted segment": lambda g: __import__("shutil").rmtree(_segment(g)),
    "garbled manifest": lambda g: (g / "manifest.json").write_text('{"encoder": {"name": '),
    "garbage dead rows": lambda g: (g / f"dead-{_segment(g).name}.npy").write_bytes(b"\x93NUMPY garbage"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_index_repairs_a_damaged_generation(cli, small, damage):
    corpus, recipe = small
    # ivf: the base segment carries a faiss file; the second run leaves dead rows in it (a dead-rows file)
    data = yaml.safe_load(recipe.read_text())
    data["index"]["kind"] = "ivf"
    recipe.write_text(yaml.safe_dump(data))
    cli.json("index", corpus, "--recipe", recipe)
    (corpus / "office.txt").write_text(TEXTS["office.txt"] + " Revised.")
    first = cli.json("index", corpus, "--recipe", recipe)
    ws = _ws(recipe)
    for kept in ("calibration", "engines/onnxruntime-int8"):  # what a rebuild must never touch
        (ws.root / kept).mkdir(parents=True)
        (ws.root / kept / "keep.txt").write_text("x")
    DAMAGE[damage](ws.current_index())
    asked = cli("ask", "restocking fee", "--recipe", recipe, ok=False)
    assert "trtrag index <corpus> --rebuild" in asked.stderr and "delete" not in asked.stderr
    report = cli.json("index", corpus, "--recipe", recipe)
    assert any(n.startswith("full rebuild: the previous index") for n in report["notes"])
    assert report["counts"]["chunks_total"] == first["counts"]["chunks_total"]
    assert cli.json("ask", "restocking fee", "--recipe", recipe)["passages"][0]["source"] == "returns.txt"
    assert all((ws.root / kept / "keep.txt").is_file() for kept in ("calibration", "engines/onnxruntime-int8"))


def test_rebuild_flag_starts_from_scratch(cli, small):
    corpus, recipe = small
    first = cli.json("index", corpus, "--recipe", recipe)["counts"]
    report = cli.json("index", corpus, "--recipe", recipe, "--rebuild")
    assert report["notes"] == ["full rebuild: --rebuild"]
    assert report["counts"]["chunks_embedded"] == first["chunks_total"] == report["counts"]["chunks_total"]


# --- 4. a killed run resumes ----------------------------------------------------------------------------


def test_a_killed_run_resumes_from_its_checkpoint(small, make_recipe, monkeypatch, tmp_path):
    import trtrag_cli.index.checkpoint as checkpoint

    corpus, recipe = small
    for k in range(6):
        (corpus / f"extra-{k}.txt").write_text(f"Note {k}: sensor model {k} reports every {k + 2} seconds.")
    monkeypatch.setattr(checkpoint, "CHECKPOINT_BATCHES", 1)
    sets = ("encoder.batch_size=2",)

    def killed(stage, done, total):
        if stage == "embed" and done >= 8:
            raise KeyboardInterrupt  # like Ctrl-C during the fourth batch: three parts of two are saved

    with pytest.raises(KeyboardInterrupt):
        _index(recipe, corpus, *sets, progress=killed)
    assert _ws(recipe).current_index() is None
    report = _index(recipe, corpus, *sets)["counts"]
    assert report["chunks_resumed"] == 6 and report["chunks_embedded"] == report["chunks_total"] - 6
    assert not list((_ws(recipe).root / "_cache").rglob("part-*.npz"))  # cleared once published

    clean_recipe = tmp_path / "clean.yaml"
    data = yaml.safe_load(recipe.read_text())
    data["workspace"] = str(tmp_path / "clean-ws")
    clean_recipe.write_text(yaml.safe_dump(data))
    clean = _index(clean_recipe, corpus, *sets)["counts"]
    assert clean["chunks_embedded"] == clean["chunks_total"] and clean["chunks_resumed"] == 0
    (got_records, got_vectors), (want_records, want_vectors) = _contents(recipe), _contents(clean_recipe)
    assert got_records == want_records
    np.testing.assert_allclose(got_vectors, want_vectors, atol=1e-5)


def _contents(recipe_path: Path) -> tuple[list, np.ndarray]:
    """Every live chunk record of a workspace's index (row order) and its vectors."""
    from trtrag_cli.index.generation import load_index_manifest, open_store

    gen = _ws(recipe_path).current_index()
    store = open_store(gen, load_index_manifest(gen))
    try:
        rows = store.live_rows()
        return store.records_of(rows), store.vectors_of(rows)
    finally:
        store.close()


# --- 5. documents with their own embeddings -------------------------------------------------------------


def _encoder_vectors(recipe_path: Path, texts: list[str]) -> np.ndarray:
    from trtrag_cli.encode.artifacts import open_recipe_encoder

    recipe = load_recipe(recipe_path)
    with open_recipe_encoder(recipe, _ws(recipe_path)) as enc:
        return enc.encode(texts, batch_size=8)


def test_jsonl_embeddings_are_indexed_without_encoding(cli, small, tmp_path):
    _, recipe = small
    texts = {"ferry": "Boats to Zanzibar leave at nine and at noon.", "bus": "Airport buses leave every 20 minutes."}
    vecs = _encoder_vectors(recipe, list(texts.values()))
    root = tmp_path / "byo"
    root.mkdir()
    lines = [{"id": k, "text": t, "embedding": (v * 3).tolist()} for (k, t), v in zip(texts.items(), vecs)]
    lines.append({"id": "plain", "text": "Invoices are paid within thirty days."})
    lines.append({"id": "odd", "text": "x", "embedding": ["a"]})
    (root / "docs.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    report = cli.json("index", root, "--recipe", recipe)
    c = report["counts"]
    assert (c["chunks_with_embeddings"], c["chunks_embedded"], c["chunks_total"]) == (2, 1, 3)
    assert report["skipped"] == {"malformed-jsonl": 1}
    gen = _ws(recipe).current_index()
    records, stored = _contents(recipe)
    rows = [r.id for r in records]
    np.testing.assert_allclose(stored[rows.index("ferry#0")], vecs[0], atol=1e-6)  # normalised, not re-encoded
    assert json.loads((gen / "manifest.json").read_text())["encoder"]["model"] == "all-MiniLM-L6-v2"
    res = cli.json("ask", "When do boats to Zanzibar leave?", "--mode", "dense", "--recipe", recipe)
    assert res["passages"][0]["source"] == "ferry"


@pytest.mark.parametrize("problem,line,error", [
    ("dimension", {"id": "a", "text": "short", "embedding": [0.1] * 7},
     "its embedding has 7 values but encoder.model all-MiniLM-L6-v2 makes 384"),
    ("too long", {"id": "a", "text": "word " * 600, "embedding": [0.1] * 384},
     "documents with embeddings must fit one chunk"),
])
def test_jsonl_embeddings_that_cannot_be_used_are_one_line_errors(cli, small, tmp_path, problem, line, error):
    _, recipe = small
    root = tmp_path / "byo"
    root.mkdir()
    (root / "docs.jsonl").write_text(json.dumps(line) + "\n")
    res = cli("index", root, "--recipe", recipe, ok=False)
    err = res.stderr.strip()
    assert res.exit_code == 1 and "Traceback" not in res.output and error in err
    assert ("set encoder.model" if problem == "dimension" else "raise chunking.max_tokens or split them") in err


# --- 6. defaults that scale -----------------------------------------------------------------------------


def test_nlist_defaults_to_four_sqrt_n_and_explicit_values_hold(small):
    from trtrag_cli.index.vectors import VectorIndex, default_nlist
    from trtrag_cli.recipe.schema import IndexConfig

    x = np.random.default_rng(0).standard_normal((40_000, 8)).astype(np.float32)
    ids = np.arange(len(x), dtype=np.int64)
    auto = VectorIndex(IndexConfig(kind="ivf", device="cpu"), 8)
    auto.build(x, ids)
    assert auto.nlist() == default_nlist(40_000) == 800
    fixed = VectorIndex(IndexConfig(kind="ivf", nlist=64, device="cpu"), 8)
    fixed.build(x, ids)
    assert fixed.nlist() == 64

    corpus, recipe = small
    _index(recipe, corpus, "index.kind=ivf")
    recorded = json.loads((_ws(recipe).current_index() / "manifest.json").read_text())["index"]
    assert recorded["nlist"] is None and recorded["nlist_built"] == 1  # 4 chunks: clamped to n / 39
    assert _index(recipe, corpus, "index.kind=ivf")["notes"] == []  # a null nlist does not force rebuilds


@pytest.mark.parametrize("threads", [None, 2])
def test_search_sets_the_thread_count_once_in_the_searching_thread(monkeypatch, threads):
    import faiss

    from trtrag_cli.index.vectors import VectorIndex
    from trtrag_cli.recipe.schema import IndexConfig

    real, calls = faiss.omp_set_num_threads, []
    monkeypatch.setattr(faiss, "omp_set_num_threads", lambda n: (calls.append(n), real(n)))
    x = np.random.default_rng(1).standard_normal((500, 16)).astype(np.float32)
    vi = VectorIndex(IndexConfig(device="cpu", threads=threads), 16)
    vi.build(x, np.arange(500, dtype=np.int64))
    before = faiss.omp_get_max_threads()

    def worker():
        for batch in (1, 32, 1, 64):
            vi.search(x[:batch], 5)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert calls == [threads or 1]
    assert faiss.omp_get_max_threads() == before  # the caller's thread is left as it was


def test_a_damaged_generation_is_a_user_error_for_readers(small):
    corpus, recipe = small
    _index(recipe, corpus)
    (_ws(recipe).current_index() / "manifest.json").write_text("[1, 2]")
    from trtrag_cli.retrieve.retriever import Retriever

    with pytest.raises(TrtragError, match="not an index manifest"):
        Retriever(load_recipe(recipe))
