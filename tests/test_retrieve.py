"""Batched retrieval on the example corpus: rank_many against rank, the pipeline under concurrent callers,
its batch events, and a live index swapped in by refresh(). Real encoder, faiss and bm25s throughout."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import yaml
from conftest import EXAMPLES, ROOT, Cli

from trtrag_cli.recipe.schema import load_recipe
from trtrag_cli.retrieve.retriever import MODES
from trtrag_cli.util import observe

QUESTIONS = [json.loads(line)["query"] for line in (ROOT / "examples" / "queries.jsonl").read_text().splitlines()
             if line.strip()][:12]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A recipe whose workspace holds the example corpus, indexed once for this module."""
    tmp = tmp_path_factory.mktemp("retrieve")
    data = yaml.safe_load((ROOT / "recipes" / "default.yaml").read_text())
    data.update(name="ret", workspace=str(tmp / "ws"))
    data.setdefault("serve", {}).update(retrieve_max_batch=8, retrieve_max_wait_ms=2000)
    path = tmp / "ret.yaml"
    path.write_text(yaml.safe_dump(data))
    Cli().json("index", EXAMPLES, "--recipe", path)
    return path


@pytest.fixture(scope="module")
def retriever(workspace):
    from trtrag_cli.retrieve.retriever import Retriever

    with Retriever(load_recipe(workspace)) as r:
        yield r


@pytest.mark.parametrize("mode", MODES)
def test_rank_many_ranks_like_rank_one_at_a_time(retriever, mode):
    together = retriever.rank_many(QUESTIONS, mode)
    for question, got in zip(QUESTIONS, together):
        alone = retriever.rank(question, mode)
        # Padding a batch changes query vectors in the last float bits, never the ranking.
        np.testing.assert_array_equal(got.rows, alone.rows)
        np.testing.assert_allclose(got.scores, alone.scores, rtol=1e-4, atol=1e-5)
        assert got.batch == len(QUESTIONS) and alone.batch == 1
        assert set(got.timings) == {"encode", "search", "rerank"}


def test_rank_many_takes_a_mode_per_question(retriever):
    modes = [MODES[i % len(MODES)] for i in range(len(QUESTIONS))]
    mixed = retriever.rank_many(QUESTIONS, modes)
    for question, mode, got in zip(QUESTIONS, modes, mixed):
        np.testing.assert_array_equal(got.rows, retriever.rank(question, mode).rows)
    assert retriever.rank_many([], "hybrid") == []
    with pytest.raises(Exception, match="unknown retrieval mode 'fuzzy'"):
        retriever.rank_many(QUESTIONS[:2], ["dense", "fuzzy"])


def _events():
    seen: list[dict] = []
    unsubscribe = observe.subscribe(lambda event, **fields: seen.append({"event": event, **fields}))
    return seen, unsubscribe


def test_concurrent_callers_are_ranked_in_one_batch_with_the_same_results(workspace):
    from trtrag_cli.pipeline import Pipeline

    seen, unsubscribe = _events()
    try:
        with Pipeline(load_recipe(workspace)) as pipe:  # max batch 8, max wait 2 s: 8 callers fill one batch
            results: dict[int, dict] = {}
            barrier = threading.Barrier(8)

            def call(i: int) -> None:
                barrier.wait(10)
                q = QUESTIONS[i]
                results[i] = pipe.ask(q) if i % 2 else pipe.retrieve(q, top_k=5)

            threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            alone = [pipe.retrieve(QUESTIONS[i], top_k=5) for i in range(8)]
    finally:
        unsubscribe()
    batches = [e for e in seen if e["event"] == "batch" and e["stage"] == "retrieve"]
    assert sum(e["size"] for e in batches) == 16 and max(e["size"] for e in batches) > 1
    assert all(len(e["wait_s"]) == e["size"] and min(e["wait_s"]) >= 0 for e in batches)
    for i in range(8):
        got = results[i]
        assert [p["id"] for p in got["passages"][:5]] == [p["id"] for p in alone[i]["passages"]]
        assert {"queue", "encode", "search", "rerank", "total"} <= set(got["timings_ms"])
        if i % 2:
            assert "answer" in got["timings_ms"] and got["citations"] is not None
        else:
            assert got["index_generation"] == pipe.generation and got["mode"] == "hybrid"
    assert sum(r["batch"] for r in alone) == 8  # one at a time after the crowd


def test_refresh_swaps_in_a_new_index_generation(workspace, tmp_path, monkeypatch):
    import shutil

    import trtrag_cli.retrieve.shared as shared_mod
    from trtrag_cli.pipeline import Pipeline

    recipe = yaml.safe_load(workspace.read_text())
    recipe.update(name="live", workspace=str(tmp_path / "ws"))
    path = tmp_path / "live.yaml"
    path.write_text(yaml.safe_dump(recipe))
    corpus = tmp_path / "corpus"
    shutil.copytree(EXAMPLES, corpus)
    Cli().json("index", corpus, "--recipe", path)
    question = "What colour is the Quillby zeppelin's hull?"
    monkeypatch.setattr(shared_mod, "REFRESH_S", 0.0)  # look at the workspace on every call
    with Pipeline(load_recipe(path), max_wait_ms=0) as pipe:
        first, old = pipe.generation, pipe.retriever
        assert pipe.refresh() is False and pipe.generation == first
        (corpus / "quillby.md").write_text("# Quillby\n\nThe Quillby zeppelin's hull is painted ultramarine.\n")
        Cli().json("index", corpus, "--recipe", path)
        assert pipe.refresh() is True and pipe.generation != first
        assert pipe.retriever.encoder is old.encoder  # one encoder session for every generation
        assert pipe.retrieve(question, mode="bm25")["passages"][0]["file"].endswith("quillby.md")
        # A request that began on the old generation finishes there (its files are already gone).
        before = old.rank(question, "bm25")
        assert all(not r.file.endswith("quillby.md") for r in old.store.records_of(before.rows))
        assert pipe.refresh() is False
    assert pipe.retriever.encoder is None  # the live retriever released the shared encoder
