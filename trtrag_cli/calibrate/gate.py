"""The accuracy gate: an INT8 encoder against the FP32 one, and the per-layer fallback when it misses.

Measured on held-out domain queries and on indexed passages (mean and min cosine to FP32, overlap of
the top-10 dense neighbours in the index), and on eval queries with known relevant documents
(recall@10 in the recipe's retrieval mode, the corpus re-embedded by the INT8 encoder). When the
target is missed, each quantized MatMul is measured alone (the cosine lost when only it is INT8), and
the most sensitive are kept in floating point one at a time until the gate holds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SENSITIVITY_TEXTS = 128
PASSAGES = 256
TOP = 10


@dataclass
class RecallData:
    """What recall@10 needs: eval queries, chunk texts and sources, BM25 over them, FP32 figures."""

    queries: list[dict]
    texts: list[str]
    sources: list[str]
    lexical: object
    baseline: float
    fp32_vectors: np.ndarray


@dataclass
class Probe:
    """Texts the gate embeds, their FP32 embeddings, and what retrieval checks need."""

    info: object
    max_tokens: int
    threads: int
    texts: list[str]
    n_queries: int
    reference: np.ndarray
    recipe: object
    index_vectors: np.ndarray | None = None
    recall: RecallData | None = None
    warnings: list[str] = field(default_factory=list)

    @classmethod
    def build(cls, recipe, info, fp32_path: Path, holdout: list[str], eval_path: Path | None) -> Probe:
        """Held-out queries + sampled indexed passages, embedded once by the FP32 model at fp32_path."""
        from trtrag_cli.corpus.chunking import index_text
        from trtrag_cli.encode.onnxruntime import OrtEncoder
        from trtrag_cli.util.workspace import Workspace

        warnings = []
        gen = Workspace(recipe.workspace_dir()).current_index()
        store = _IndexCopy.read(recipe, gen) if gen is not None else None
        passages = []
        if store is not None:
            rows = np.random.default_rng(0).permutation(len(store.texts))[:PASSAGES]
            passages = [store.texts[r] for r in sorted(rows)]
        else:
            warnings.append("no index yet: the gate measured queries only (no passages, no top-10 overlap)")
        if len(holdout) < 64:
            warnings.append(f"only {len(holdout)} held-out queries for the gate; add domain queries")
        texts = list(holdout) + passages
        with OrtEncoder(fp32_path, info, threads=recipe.encoder.threads or 0, max_tokens=recipe.encoder.max_tokens,
                        label="gate-fp32") as ref:
            reference = ref.encode(texts, batch_size=recipe.encoder.batch_size)
            probe = cls(info, recipe.encoder.max_tokens, recipe.encoder.threads or 0, texts, len(holdout), reference,
                        recipe, store.vectors if store is not None else None, warnings=warnings)
            if eval_path is not None:
                if store is None:
                    warnings.append(f"recall gate skipped: no index to evaluate {eval_path} against")
                else:
                    probe.recall = _recall_data(recipe, store, gen, Path(eval_path), ref, warnings)
        return probe


@dataclass
class _IndexCopy:
    """The live chunks of an index generation in memory, row i = live chunk i (the gate's sets are small)."""
    texts: list[str]
    sources: list[str]
    vectors: np.ndarray

    @classmethod
    def read(cls, recipe, gen: Path) -> "_IndexCopy":
        from trtrag_cli.corpus.chunking import index_text
        from trtrag_cli.index.generation import load_index_manifest, open_store

        store = open_store(gen, load_index_manifest(gen))
        try:
            rows, texts, sources = [], [], []
            for row, (source, title, text) in store.iter_records(("source", "title", "text")):
                rows.append(row)
                texts.append(index_text(title, text))
                sources.append(source)
            return cls(texts, sources, store.vectors_of(np.array(rows, dtype=np.int64)))
        finally:
            store.close()


def _recall_data(recipe, store: _IndexCopy, gen: Path, eval_path: Path, ref,
                 warnings: list[str]) -> RecallData | None:
    from trtrag_cli.evaluate.known_items import load_queries
    from trtrag_cli.index.bm25 import LexicalIndex

    known = set(store.sources)
    queries = load_queries(eval_path)
    usable = [q for q in queries if known & set(q["relevant"])]
    if not usable:
        # e.g. the default recipe's example queries against another corpus: recall would be 0 for both.
        warnings.append(f"recall gate skipped: no query in {eval_path} names a document of this index")
        return None
    if len(usable) < len(queries):
        warnings.append(f"recall gate: {len(queries) - len(usable)} of {len(queries)} queries in {eval_path} "
                        "name no indexed document and were left out")
    queries = usable
    texts = store.texts
    lexical = LexicalIndex.from_texts(recipe.lexical, texts)  # its rows are the copy's rows
    # The index's own vectors are FP32 when the index was built by an FP32 encoder; else re-embed.
    vectors = store.vectors if "fp32" in str(_encoder_name(gen)) else ref.encode(texts, recipe.encoder.batch_size)
    data = RecallData(queries, texts, store.sources, lexical, 0.0, vectors)
    data.baseline = _recall_at(recipe, data, vectors, ref.encode([q["query"] for q in queries], batch_size=1))
    return data


def _encoder_name(gen: Path) -> str:
    from trtrag_cli.index.build import load_index_manifest

    return load_index_manifest(gen)["encoder"]["name"]


def _recall_at(recipe, data: RecallData, doc_vectors: np.ndarray, query_vectors: np.ndarray, k: int = TOP) -> float:
    """Mean recall@k over the eval queries, exact dense search fused the way the recipe retrieves."""
    from trtrag_cli.evaluate.known_items import ranked_sources, score_query
    from trtrag_cli.retrieve.retriever import fuse

    cfg = recipe.retrieve
    total = 0.0
    for q, vec in zip(data.queries, query_vectors):
        dense_rows = np.zeros(0, dtype=np.int64)
        if cfg.mode != "bm25":
            scores = doc_vectors @ vec
            top = min(cfg.top_n, len(scores))
            dense_rows = np.argpartition(-scores, top - 1)[:top]
            dense_rows = dense_rows[np.argsort(-scores[dense_rows], kind="stable")]
        lex = data.lexical.match(q["query"]) if cfg.mode != "dense" else None
        rows, _ = fuse(cfg.mode, dense_rows, lex, vec, doc_vectors.__getitem__, cfg.top_n, cfg.rrf_k,
                       cfg.dense_weight)
        total += score_query(ranked_sources([data.sources[r] for r in rows.tolist()], k),
                             q["relevant"])[f"recall@{k}"]
    return total / max(1, len(data.queries))


def _top_overlap(index_vectors: np.ndarray, ref: np.ndarray, got: np.ndarray, k: int = TOP) -> float:
    k = min(k, len(index_vectors))
    a = np.argpartition(-(ref @ index_vectors.T), k - 1, axis=1)[:, :k]
    b = np.argpartition(-(got @ index_vectors.T), k - 1, axis=1)[:, :k]
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(a, b)]))


def open_candidate(probe: Probe, path: Path, label: str = "gate-int8"):
    """An ORT encoder over a candidate model file, with the probe's settings."""
    from trtrag_cli.encode.onnxruntime import OrtEncoder

    return OrtEncoder(path, probe.info, threads=probe.threads, max_tokens=probe.max_tokens, label=label)


def measure(probe: Probe, encoder) -> dict:
    """Cosine to FP32 (all, queries, passages) and top-10 overlap in the index; recall() adds recall@10."""
    got = encoder.encode(probe.texts, batch_size=probe.recipe.encoder.batch_size)
    cos = (got * probe.reference).sum(1)
    q = cos[:probe.n_queries]
    p = cos[probe.n_queries:]
    out = {"mean_cosine": round(float(cos.mean()), 5), "min_cosine": round(float(cos.min()), 5),
           "queries_mean_cosine": round(float(q.mean()), 5) if len(q) else None,
           "passages_mean_cosine": round(float(p.mean()), 5) if len(p) else None}
    if probe.index_vectors is not None and len(q):
        out["top10_overlap"] = round(_top_overlap(probe.index_vectors, probe.reference[:len(q)], got[:len(q)]), 4)
    return out


def recall(probe: Probe, encoder) -> dict:
    """recall@10 of encoder on the eval queries against FP32's, when the probe has eval data."""
    data = probe.recall
    if data is None:
        return {}
    docs = encoder.encode(data.texts, batch_size=probe.recipe.encoder.batch_size)
    # One at a time, as `ask` encodes them: a form whose vectors depend on the batch would show it here.
    queries = encoder.encode([x["query"] for x in data.queries], batch_size=1)
    got = round(_recall_at(probe.recipe, data, docs, queries), 4)
    return {"recall@10": got, "recall@10_fp32": round(data.baseline, 4),
            "recall@10_drop": round(data.baseline - got, 4)}


def passes(result: dict, cfg) -> bool:
    """Whether a measurement meets the recipe's targets."""
    if result["mean_cosine"] < cfg.min_mean_cosine:
        return False
    return result.get("recall@10_drop", 0.0) <= cfg.max_recall_drop + 1e-9


def sensitivity(probe: Probe, build: Callable[[frozenset[str]], Path], nodes: list[str]) -> dict[str, float]:
    """Cosine lost (1 - mean cosine to FP32) when only that MatMul is INT8, per MatMul."""
    texts = probe.texts[:SENSITIVITY_TEXTS]
    reference = probe.reference[:SENSITIVITY_TEXTS]
    out = {}
    for node in nodes:
        path = build(frozenset(n for n in nodes if n != node))
        with open_candidate(probe, path) as enc:
            got = enc.encode(texts, batch_size=probe.recipe.encoder.batch_size)
        out[node] = float(1.0 - (got * reference).sum(1).mean())
    return out


def run(probe: Probe, build: Callable[[frozenset[str]], Path], sites, cfg, progress=None) -> dict:
    """Measure the fully quantized model; on a miss, keep the most sensitive MatMuls in float until it holds."""
    started = time.perf_counter()
    nodes = [s.node for s in sites]
    kept: list[str] = []
    steps = []

    def step(reason: str) -> dict:
        with open_candidate(probe, build(frozenset(kept))) as enc:
            result = measure(probe, enc)
            # Recall re-embeds the corpus: only worth it once the cheap cosine check passes.
            if result["mean_cosine"] >= cfg.min_mean_cosine:
                result.update(recall(probe, enc))
        steps.append({"kept_float": len(kept), "reason": reason, **result})
        if progress:
            progress({"gate": steps[-1]})
        return result

    result = step("all weight MatMuls INT8")
    ranking: dict[str, float] = {}
    if not passes(result, cfg):
        ranking = sensitivity(probe, build, nodes)
        for node in sorted(ranking, key=ranking.get, reverse=True)[:cfg.max_float_layers]:
            kept.append(node)
            result = step(f"{node} kept in float (alone it lost {ranking[node]:.5f} cosine)")
            if passes(result, cfg):
                break
    return {"passed": passes(result, cfg), "target": {"min_mean_cosine": cfg.min_mean_cosine,
                                                      "max_recall_drop": cfg.max_recall_drop},
            "final": result, "kept_float": kept, "quantized": len(nodes) - len(kept), "total": len(nodes),
            "steps": steps,
            "sensitivity": {n: round(v, 6) for n, v in sorted(ranking.items(), key=lambda kv: -kv[1])},
            "seconds": round(time.perf_counter() - started, 1)}
