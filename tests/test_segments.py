"""Segments: BM25 postings scored like bm25s with statistics shared across segments, exact search over
memory-mapped vectors, incremental runs that write only the change, dead rows that never come back,
compaction (by hand, by threshold, killed with SIGKILL) and the garbage collection of old segments."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from trtrag_cli.index.bm25 import Analyzer, LexicalIndex, Postings
from trtrag_cli.recipe.schema import LexicalConfig, load_recipe
from trtrag_cli.util import workspace
from test_index_crash import _kill_when, _start_index
from test_index_robust import _contents, _index, _ws

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
WORDS = ("sensor gateway battery warranty invoice turbine pressure relay firmware pairing signal cable "
         "mount bracket alarm threshold calibration report vendor refund shipping").split()


def _texts(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(0, 30)))) for _ in range(n)]


# --- BM25 -----------------------------------------------------------------------------------------------


def test_bm25_scores_equal_bm25s_and_do_not_depend_on_the_segment_split():
    import bm25s

    cfg = LexicalConfig()
    texts = _texts(300, 0)
    analyzer = Analyzer(cfg)
    ref = bm25s.BM25(k1=cfg.k1, b=cfg.b)
    ref.index([analyzer.terms(t) or ["\x00empty"] for t in texts], show_progress=False)
    one = LexicalIndex.from_texts(cfg, texts)
    split = LexicalIndex(cfg, [Postings.build(analyzer.terms(t) for t in texts[:170]),
                               Postings.build(analyzer.terms(t) for t in texts[170:])], np.array([0, 170, 300]))
    for query in ("battery warranty", "relay relay firmware", "refund shipping vendor alarm", "nothing known"):
        terms = [t for t in analyzer.terms(query) if t in ref.vocab_dict]
        want = ref.get_scores(terms) if terms else np.zeros(len(texts))
        for lex in (one, split):
            got = np.zeros(len(texts), dtype=np.float32)
            m = lex.match(query)
            got[m.rows] = m.scores
            # bm25s gives an empty text one placeholder token; that moves the average length by < 1%
            np.testing.assert_allclose(got, want, rtol=2e-2, atol=1e-4)
        np.testing.assert_allclose(split.match(query).scores, one.match(query).scores, rtol=1e-6)
        assert split.match(query).rows.tolist() == one.match(query).rows.tolist()


def test_merged_postings_equal_postings_built_from_the_live_texts():
    analyzer = Analyzer(LexicalConfig())
    a, b = _texts(120, 1), _texts(80, 2)
    dead_a = np.zeros(120, dtype=bool)
    dead_a[[0, 5, 6, 119]] = True
    dead_b = np.zeros(80, dtype=bool)
    dead_b[40:] = True
    merged = Postings.merge([(Postings.build(analyzer.terms(t) for t in a), dead_a),
                             (Postings.build(analyzer.terms(t) for t in b), dead_b)])
    live = [t for t, d in zip(a, dead_a) if not d] + [t for t, d in zip(b, dead_b) if not d]
    want = Postings.build(analyzer.terms(t) for t in live)
    for name in ("terms", "indptr", "docs", "tfs", "doclen"):
        np.testing.assert_array_equal(getattr(merged, name), getattr(want, name), err_msg=name)


def test_dead_rows_are_not_matched_and_top_breaks_ties_by_row():
    cfg = LexicalConfig()
    texts = ["alarm relay", "alarm relay", "alarm", "relay cable"]
    lex = LexicalIndex.from_texts(cfg, texts)
    rows, scores = lex.match("alarm relay").top(10)
    assert rows.tolist()[:2] == [0, 1] and scores[0] == scores[1]
    dead = [np.array([True, False, False, False])]
    rows, _ = LexicalIndex(cfg, lex.postings, lex.offsets, dead).match("alarm relay").top(10)
    assert 0 not in rows.tolist() and set(rows.tolist()) == {1, 2, 3}


# --- exact search over memory-mapped vectors ------------------------------------------------------------


def test_mapped_exact_search_equals_brute_force_across_blocks(tmp_path):
    from trtrag_cli.index.search import MappedExact

    rng = np.random.default_rng(3)
    x = rng.standard_normal((70_000, 8)).astype(np.float32)  # two blocks of 65,536 rows
    np.save(tmp_path / "v.npy", x)
    dead = np.zeros(len(x), dtype=bool)
    dead[rng.choice(len(x), 5000, replace=False)] = True
    q = rng.standard_normal((3, 8)).astype(np.float32)
    scores, rows = MappedExact(np.load(tmp_path / "v.npy", mmap_mode="r"), dead).search(q, 10)
    full = q @ x.T
    full[:, dead] = -np.inf
    want = np.argsort(-full, axis=1)[:, :10]
    assert rows.tolist() == want.tolist()
    np.testing.assert_allclose(scores, np.take_along_axis(full, want, 1), rtol=1e-5)
    assert not dead[rows].any()


# --- incremental runs -----------------------------------------------------------------------------------


def _corpus(tmp_path: Path) -> Path:
    dst = tmp_path / "corpus"
    shutil.copytree(EXAMPLES / "corpus", dst)
    return dst


def _queries() -> list[str]:
    return [json.loads(line)["query"] for line in (EXAMPLES / "queries.jsonl").read_text().splitlines()
            if line.strip()][:40]


def _rankings(recipe_path: Path, mode: str) -> list[tuple[list[str], np.ndarray]]:
    from trtrag_cli.retrieve.retriever import Retriever

    with Retriever(load_recipe(recipe_path)) as r:
        out = []
        for q in _queries():
            ranking = r.rank(q, mode=mode)
            out.append(([c.id for c in r.store.records_of(ranking.rows[:10])], ranking.scores[:10]))
        return out


def _edit(corpus: Path) -> None:
    """Change one file, remove one, add one."""
    faq = corpus / "faq" / "customer-faq.jsonl"
    lines = faq.read_text().splitlines()
    faq.write_text("\n".join(lines[:-1]) + "\n")
    victim = sorted((corpus / "products").iterdir())[0]
    victim.unlink()
    (corpus / "products" / "zx-9-relay.md").write_text("# ZX-9 relay\nThe ZX-9 relay switches 40 A loads and "
                                                      "carries a five-year warranty.\n")


def test_a_re_index_writes_only_the_change_and_compaction_equals_a_full_build(tmp_path, make_recipe):
    corpus = _corpus(tmp_path)
    recipe = make_recipe("inc", index={"compact_above": None})
    first = _index(recipe, corpus)["counts"]
    _edit(corpus)
    report = _index(recipe, corpus)
    c = report["counts"]
    assert (c["files_changed"], c["files_removed"], c["files_added"]) == (1, 1, 1)
    assert c["segments"] == 2 and c["dead_rows"] == c["chunks_dropped"] > 0
    assert c["chunks_total"] == first["chunks_total"] - c["chunks_dropped"] + c["chunks_new"]
    assert c["chunks_embedded"] < c["chunks_new"]  # the FAQ's unchanged records keep their vectors
    manifest = json.loads((_ws(recipe).current_index() / "manifest.json").read_text())
    delta = _ws(recipe).index_root / "segments" / manifest["segments"][1]["name"]
    assert manifest["segments"][1]["rows"] == c["chunks_new"] and not (delta / "vectors.faiss").exists()

    clean = make_recipe("clean")  # the same corpus indexed in one go, in another workspace
    data = yaml.safe_load(clean.read_text())
    data["workspace"] = str(tmp_path / "clean-ws")
    clean.write_text(yaml.safe_dump(data))
    _index(clean, corpus)
    assert _rankings(recipe, "dense")[0][0] == _rankings(clean, "dense")[0][0]
    for (got, _), (want, _) in zip(_rankings(recipe, "dense"), _rankings(clean, "dense")):
        assert got == want  # exact search: the split into segments changes nothing

    compacted = _index(recipe, corpus, compact=True)
    assert compacted["compacted"]["why"] == "--compact" and compacted["counts"]["segments"] == 1
    assert compacted["counts"]["chunks_embedded"] == 0 and compacted["counts"]["dead_rows"] == 0
    (got_r, got_v), (want_r, want_v) = _contents(recipe), _contents(clean)
    got_order, want_order = np.argsort([r.id for r in got_r]), np.argsort([r.id for r in want_r])
    assert [got_r[i] for i in got_order] == [want_r[i] for i in want_order]  # rows in another order
    np.testing.assert_allclose(got_v[got_order], want_v[want_order], atol=1e-6)
    for mode in ("bm25", "hybrid", "rrf"):
        for (got, got_s), (want, want_s) in zip(_rankings(recipe, mode), _rankings(clean, mode)):
            if mode != "rrf":  # rrf ties often (rank a of one list vs rank b of the other): rows break them
                assert got == want, mode
            np.testing.assert_allclose(got_s, want_s, rtol=1e-5)


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_removed_and_replaced_chunks_never_come_back(tmp_path, make_recipe, kind):
    corpus = _corpus(tmp_path)
    recipe = make_recipe("dead", index={"kind": kind, "compact_above": None})
    unique = corpus / "products" / "zx-9-relay.md"
    unique.write_text("# ZX-9 relay\nThe ZX-9 relay is rated for forty amperes at the Quillmont plant.\n")
    _index(recipe, corpus)
    unique.write_text("# ZX-9 relay\nThe ZX-9 relay was discontinued in 2024.\n")
    _index(recipe, corpus)
    from trtrag_cli.retrieve.retriever import Retriever

    with Retriever(load_recipe(recipe)) as r:
        for mode in ("dense", "bm25", "hybrid", "rrf"):
            ranking = r.rank("ZX-9 relay rated forty amperes Quillmont plant", mode=mode)
            texts = [c.text for c in r.store.records_of(ranking.rows)]
            assert not any("Quillmont" in t for t in texts), mode
            assert any("discontinued" in t for t in texts[:5]), mode
            assert r.store.alive(ranking.rows).all()


@pytest.mark.parametrize("limits,why", [({"compact_above": 0.3, "max_segments": 100}, "index.compact_above 0.3"),
                                        ({"compact_above": None, "max_segments": 3}, "index.max_segments 3")])
def test_compaction_starts_by_itself_past_a_limit_and_old_segments_go(tmp_path, make_recipe, monkeypatch, limits,
                                                                      why):
    monkeypatch.setattr(workspace, "GRACE_S", 0.0)
    corpus = _corpus(tmp_path)
    recipe = make_recipe("auto", index=limits)
    _index(recipe, corpus)
    files = sorted(corpus.rglob("*.md"), key=lambda p: p.stat().st_size)  # small edits first
    segments_seen = []
    for n, path in enumerate(files):
        path.write_text(path.read_text() + f"\nRevision {n}.\n")
        report = _index(recipe, corpus)
        segments_seen.append(report["counts"]["segments"])
        if report["compacted"]:
            break
    assert report["compacted"] and why in report["compacted"]["why"]
    assert max(segments_seen) >= 3 and segments_seen[-1] == 1
    ws = _ws(recipe)
    listed = (ws.current_index() / "SEGMENTS").read_text().split()
    assert sorted(p.name for p in (ws.index_root / "segments").iterdir()) == listed


def test_kill_9_during_compaction_leaves_the_live_index_answering(cli, tmp_path, make_recipe):
    corpus = _corpus(tmp_path)
    recipe = make_recipe("kill", index={"kind": "ivf", "compact_above": None})
    cli.json("index", corpus, "--recipe", recipe)
    _edit(corpus)
    cli.json("index", corpus, "--recipe", recipe)
    ws = _ws(recipe)
    question = "What warranty does the ZX-9 relay carry?"
    before = cli.json("ask", question, "--recipe", recipe)["passages"]
    segments = ws.index_root / "segments"
    killed = 0
    for attempt in range(4):
        live = ws.current_index()
        proc = _start_index(recipe, corpus, tmp_path / "index.log", "--compact")
        landed = _kill_when(proc, lambda: any(p.name.startswith(".tmp-seg-") for p in segments.iterdir()),
                            tmp_path / "index.log", 0.001)
        killed += landed
        if landed:
            assert ws.current_index() == live
            assert cli.json("ask", question, "--recipe", recipe)["passages"] == before
            cli("doctor", "--recipe", recipe)
            break
        _edit_again = corpus / "faq" / "customer-faq.jsonl"  # the compaction landed: give the next one work
        _edit_again.write_text(_edit_again.read_text().splitlines()[0] + "\n")
        cli.json("index", corpus, "--recipe", recipe)
        before = cli.json("ask", question, "--recipe", recipe)["passages"]
    assert killed, "every compaction finished before the kill landed"
    report = cli.json("index", corpus, "--recipe", recipe, "--compact")
    assert report["counts"]["segments"] == 1
    listed = (ws.current_index() / "SEGMENTS").read_text().split()
    left = [p.name for p in segments.iterdir() if p.name.startswith(".tmp-seg-")]
    assert left == [] and set(listed) <= {p.name for p in segments.iterdir()}
    assert [p["id"] for p in cli.json("ask", question, "--recipe", recipe)["passages"]] == [p["id"] for p in before]
