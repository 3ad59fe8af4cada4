"""Two-stage retrieval: ANN recall of top-N candidates, then rerank or fusion down to top-k.

Stage 1 takes the dense top-N from faiss and, for modes that use words, the BM25 top-N over the whole
corpus. Stage 2 scores the union exactly: `dense` (cosine), `bm25`, `rrf` (reciprocal rank fusion) or
`hybrid` (a weighted sum of per-query normalised dense and BM25 scores).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trtrag_cli.recipe.schema import Recipe
from trtrag_cli.util.errors import TrtragError
from trtrag_cli.util.workspace import Workspace

MODES = ("hybrid", "rrf", "bm25", "dense")


@dataclass
class Ranking:
    """Candidate rows best first, their fused scores, and per-stage timings in ms."""

    rows: np.ndarray
    scores: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)
    batch: int = 1  # questions ranked together with this one (rank_many)


def top_indices(scores: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n largest scores, best first."""
    n = min(n, len(scores))
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    part = np.argpartition(-scores, n - 1)[:n]
    return part[np.argsort(-scores[part], kind="stable")]


def _normalise(x: np.ndarray) -> np.ndarray:
    """Min-max over the candidate set, so dense and BM25 scores share a scale per query."""
    lo, hi = float(x.min()), float(x.max())
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


def fuse(mode: str, dense_rows: np.ndarray, lex, query_vec: np.ndarray, vectors_of: Callable[[np.ndarray], np.ndarray],
         top_n: int, rrf_k: int, dense_weight: float) -> tuple[np.ndarray, np.ndarray]:
    """Stage 2: order candidate rows by the mode's score; returns (rows, scores), best first.

    lex: the query's LexicalScores (None for dense); vectors_of: rows -> their vectors (the store's memory
    maps), read only for the candidates.
    """
    if mode == "dense":
        rows = dense_rows
        return rows, vectors_of(rows) @ query_vec
    lex_rows, lex_scores = lex.top(top_n)
    if mode == "bm25":
        return lex_rows, lex_scores
    cand = np.unique(np.concatenate([dense_rows, lex_rows]))
    if mode == "rrf":
        rank_d = {r: i for i, r in enumerate(dense_rows.tolist())}
        rank_l = {r: i for i, r in enumerate(lex_rows.tolist())}
        fused = np.array([(1.0 / (rrf_k + 1 + rank_d[r]) if r in rank_d else 0.0)
                          + (1.0 / (rrf_k + 1 + rank_l[r]) if r in rank_l else 0.0) for r in cand.tolist()])
    else:
        dense = vectors_of(cand) @ query_vec
        fused = dense_weight * _normalise(dense) + (1.0 - dense_weight) * _normalise(lex.at(cand))
    order = np.argsort(-fused, kind="stable")
    return cand[order], fused[order]


def check_built_with(manifest: dict, encoder_name: str, recipe: Recipe) -> None:
    """Refuse to query an index with another encoder than the one that built it."""
    from trtrag_cli.index.build import reindex_command

    built_with = manifest.get("encoder", {}).get("name")
    if built_with != encoder_name:
        raise TrtragError(f"the index was built with encoder '{built_with}' but queries would be encoded "
                          f"by '{encoder_name}'",
                          f"re-index with this recipe: {reindex_command(recipe)}")


def open_stores(recipe: Recipe, gen: Path, manifest: dict):
    """(chunk store, dense search, BM25) of an index generation as the recipe searches them: the segments'
    own files, or (index.backend: milvus) the collection behind both searches. Dense search and BM25 both
    return global rows of the chunk store."""
    from trtrag_cli.index.bm25 import LexicalIndex
    from trtrag_cli.index.build import reindex_command
    from trtrag_cli.index.generation import open_store

    built = (manifest.get("index") or {}).get("backend", "faiss")
    if built != recipe.index.backend:
        raise TrtragError(f"the index in {gen} was built with index.backend {built}, the recipe asks for "
                          f"{recipe.index.backend}", f"set index.backend: {built}, or re-index: "
                          f"{reindex_command(recipe)}")
    store = open_store(gen, manifest)
    try:
        lexical = LexicalIndex.open(recipe.lexical, [s.folder for s in store.segments], store.offsets, store.dead)
        if built == "milvus":
            return store, *_open_milvus(recipe, manifest, store, lexical)
        from trtrag_cli.index.search import SegmentSearch

        return store, SegmentSearch(store, recipe.index), lexical
    except BaseException:
        store.close()
        raise


def _open_milvus(recipe: Recipe, manifest: dict, store, lexical):
    """The collection, checked against the generation (chain and sync token), as dense search and BM25."""
    from trtrag_cli.index.build import reindex_command
    from trtrag_cli.index.milvus import SYNC, MilvusIndex

    enc, fix = manifest["encoder"], f"re-index: {reindex_command(recipe)}"
    milvus = MilvusIndex(recipe.index, recipe.workspace_dir(), recipe.name)
    try:
        milvus.open(enc["name"], int(enc["dim"]), fix)
        synced = milvus.properties().get(SYNC)
        if synced != (manifest.get("milvus") or {}).get("sync"):
            raise TrtragError(f"Milvus collection '{milvus.name}' at {milvus.uri} was changed by another index run "
                              f"than this workspace's current one", fix + " (give each workspace its own "
                              "index.collection on a shared server)")
    except BaseException:
        milvus.close()
        raise
    return MilvusDense(milvus, store), MilvusLexical(milvus, lexical, store, recipe.retrieve.top_n)


class MilvusDense:
    """Milvus dense search returning the chunk store's global rows, as SegmentSearch does."""

    def __init__(self, milvus, store):
        self.milvus, self.store = milvus, store
        self.placement = milvus.placement

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, global rows), -1 where Milvus returned fewer hits or an id the store does not hold."""
        scores, ids = self.milvus.search(queries, k)
        return scores, self.store.rows_of(ids.ravel()).reshape(ids.shape)

    def close(self) -> None:
        """Close the Milvus connection."""
        self.milvus.close()


class MilvusLexical:
    """BM25 recall done in Milvus, shaped as LexicalIndex.match_many: a query's top_n hits with their
    scores (hybrid then scores a dense candidate past them as 0, where our postings give its small score).
    The generation's own postings still supply the analyser (the terms Milvus indexed) and the idf the
    extractive answer weighs words by."""

    def __init__(self, milvus, local, store, top_n: int):
        self.milvus, self.local, self.store, self.top_n = milvus, local, store, top_n
        self.analyzer = local.analyzer

    def idf(self, term: str) -> float:
        """The idf of an analysed term over the generation's postings (the corpus Milvus holds)."""
        return self.local.idf(term)

    def match_many(self, queries: list[str | None]):
        """Per query (None for None): its Milvus BM25 hits as LexicalScores over global rows."""
        from trtrag_cli.index.bm25 import LexicalScores

        asked = [i for i, q in enumerate(queries) if q is not None]
        out: list = [None] * len(queries)
        hits = self.milvus.text_search([" ".join(self.analyzer.terms(queries[i])) for i in asked], self.top_n)
        for i, (ids, scores) in zip(asked, hits):
            rows = self.store.rows_of(ids)
            keep = rows >= 0
            order = np.argsort(rows[keep], kind="stable")
            out[i] = LexicalScores(rows[keep][order], np.asarray(scores, dtype=np.float32)[keep][order])
        return out


class Retriever:
    """Holds the encoder, the vector index, the BM25 index and the chunk store of one workspace."""

    def __init__(self, recipe: Recipe, encoder=None):
        from trtrag_cli.encode.artifacts import open_recipe_encoder
        from trtrag_cli.index.build import follow_index, load_index_manifest

        self.recipe = recipe
        ws = Workspace(recipe.workspace_dir())
        # The lease keeps this generation on disk while it is loaded (and while this retriever lives),
        # even if a re-index publishes another one meanwhile.
        self._lease = ws.lease_index()
        gen = self._lease.path
        self.encoder, self._owns_encoder = None, False
        try:
            if encoder is None:
                follow_index(recipe, gen)
            self.manifest = load_index_manifest(gen)
            self.encoder = encoder or open_recipe_encoder(recipe, ws)
            self._owns_encoder = encoder is None
            check_built_with(self.manifest, self.encoder.name, recipe)
            self.store, self.vindex, self.lexical = open_stores(recipe, gen, self.manifest)
        except BaseException:
            self.close()
            raise
        self.generation = Path(gen)

    def __enter__(self) -> "Retriever":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release the encoder session if this retriever opened it, a Milvus connection, and the lease on
        its generation."""
        if self._owns_encoder and self.encoder is not None:
            self.encoder.close()
            self.encoder = None
        closer = getattr(getattr(self, "vindex", None), "close", None)
        if closer is not None:
            closer()
        store = getattr(self, "store", None)
        if store is not None:
            store.close()
        self._lease.release()

    def encode(self, questions: list[str]) -> np.ndarray:
        """Query vectors, one row per question."""
        return self.encoder.encode(questions, batch_size=max(1, len(questions)))

    def rank(self, question: str, mode: str | None = None, query_vec: np.ndarray | None = None) -> Ranking:
        """Run both stages for one question; pass query_vec to skip encoding (eval re-uses it)."""
        return self.rank_many([question], mode, None if query_vec is None else query_vec[None, :])[0]

    def rank_many(self, questions: list[str], modes: str | Sequence[str | None] | None = None,
                  query_vecs: np.ndarray | None = None) -> list[Ranking]:
        """Both stages for several questions at once: one encoder call, one faiss search, then BM25 and
        fusion per question. Rankings are those of rank() one at a time; each carries the whole batch's
        stage times (what each of its questions waited for) and the batch size.

        modes: one mode for all, or one per question (None: retrieve.mode). query_vecs: [n, dim] to skip
        encoding.
        """
        cfg = self.recipe.retrieve
        n = len(questions)
        if isinstance(modes, str) or modes is None:
            modes = [modes] * n
        modes = [m or cfg.mode for m in modes]
        if len(modes) != n:
            raise ValueError(f"{len(modes)} modes for {n} questions")
        for m in modes:
            if m not in MODES:
                raise TrtragError(f"unknown retrieval mode '{m}'", "use one of: " + ", ".join(MODES))
        if not n:
            return []
        t0 = time.perf_counter()
        dense_at = [i for i, m in enumerate(modes) if m != "bm25"]  # bm25 alone needs no query vector
        if query_vecs is None:
            query_vecs = np.zeros((n, self.store.dim), dtype=np.float32)
            if dense_at:
                query_vecs[dense_at] = self.encode([questions[i] for i in dense_at])
        t1 = time.perf_counter()
        dense_rows = [np.zeros(0, dtype=np.int64)] * n
        if dense_at:
            _, found = self.vindex.search(query_vecs[dense_at], cfg.top_n)
            for i, rows in zip(dense_at, found):
                dense_rows[i] = rows[rows >= 0]
        lex = self.lexical.match_many([q if m != "dense" else None for q, m in zip(questions, modes)])
        t2 = time.perf_counter()
        fused = [fuse(m, dense_rows[i], lex[i], query_vecs[i], self.store.vectors_of, cfg.top_n, cfg.rrf_k,
                      cfg.dense_weight) for i, m in enumerate(modes)]
        t3 = time.perf_counter()
        timings = {"encode": (t1 - t0) * 1e3, "search": (t2 - t1) * 1e3, "rerank": (t3 - t2) * 1e3}
        return [Ranking(rows, scores, dict(timings), batch=n) for rows, scores in fused]
