"""`trtrag eval`: recall@k and MRR@k over known-item queries, and latency percentiles per stage.

A query file has one JSON object per line: {"query": "...", "relevant": ["<source>", ...]}, where a source
is a file path relative to the indexed folder or a .jsonl document id. Chunks are folded into their
sources before scoring, so k counts distinct sources.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from trtrag_cli.recipe.schema import Recipe
from trtrag_cli.util.errors import TrtragError
from trtrag_cli.util.timing import percentiles

KS = (1, 5, 10, 100)


def load_queries(path: Path) -> list[dict]:
    """Read and validate a queries .jsonl file."""
    if not path.is_file():
        raise TrtragError(f"queries file '{path}' does not exist", "pass --queries FILE.jsonl")
    out = []
    for no, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as exc:
            raise TrtragError(f"{path}:{no}: not valid JSON ({exc.msg})", "one JSON object per line") from None
        rel = item.get("relevant") if isinstance(item, dict) else None
        if not isinstance(item, dict) or not str(item.get("query", "")).strip() or not isinstance(rel, list) or not rel:
            raise TrtragError(f"{path}:{no}: needs a non-empty 'query' and a non-empty 'relevant' list",
                              '{"query": "...", "relevant": ["docs/a.md"]}')
        out.append({"query": str(item["query"]), "relevant": [str(r) for r in rel]})
    if not out:
        raise TrtragError(f"queries file '{path}' holds no queries", "add one JSON object per line")
    return out


def ranked_sources(sources: list[str], limit: int) -> list[str]:
    """Distinct sources in rank order (a source's best chunk decides its place), from each ranked row's."""
    seen: dict[str, None] = {}
    for source in sources:
        seen.setdefault(source, None)
        if len(seen) >= limit:
            break
    return list(seen)


def score_query(ranked: list[str], relevant: list[str]) -> dict[str, float]:
    """recall@k and reciprocal rank@k for one query."""
    rel = set(relevant)
    out = {}
    first = next((i for i, s in enumerate(ranked) if s in rel), None)
    for k in KS:
        out[f"recall@{k}"] = len(rel & set(ranked[:k])) / len(rel)
        out[f"mrr@{k}"] = 1.0 / (first + 1) if first is not None and first < k else 0.0
    return out


def run_eval(recipe: Recipe, queries_path: Path, modes: list[str] | None = None,
             progress=None) -> dict:
    """Evaluate each retrieval mode on the same queries; the query is encoded once per query."""
    from trtrag_cli.retrieve.retriever import Retriever

    queries = load_queries(queries_path)
    modes = modes or [recipe.retrieve.mode]
    known = None
    with Retriever(recipe) as retriever:
        known = retriever.store.sources()
        missing = sorted({s for q in queries for s in q["relevant"]} - known)
        per_mode = {m: {"scores": [], "timings": {}} for m in modes}
        for i, q in enumerate(queries):
            t0 = time.perf_counter()
            vec = retriever.encode([q["query"]])[0]
            encode_ms = (time.perf_counter() - t0) * 1e3
            for m in modes:
                ranking = retriever.rank(q["query"], mode=m, query_vec=vec)
                ranking.timings["encode"] = encode_ms
                ranked = ranked_sources(retriever.store.sources_of(ranking.rows), max(KS))
                acc = per_mode[m]
                acc["scores"].append(score_query(ranked, q["relevant"]))
                for stage, ms in ranking.timings.items():
                    acc["timings"].setdefault(stage, []).append(ms)
                acc["timings"].setdefault("total", []).append(sum(ranking.timings.values()))
            if progress:
                progress("eval", i + 1, len(queries))
        encoder = retriever.encoder.name
    results = {}
    for m, acc in per_mode.items():
        metrics = {key: round(float(np.mean([s[key] for s in acc["scores"]])), 4) for key in acc["scores"][0]}
        results[m] = {"metrics": metrics, "latency_ms": {st: percentiles(v) for st, v in acc["timings"].items()}}
    return {"queries": len(queries), "queries_file": str(queries_path), "encoder": encoder,
            "unknown_relevant_sources": missing[:20], "unknown_relevant_count": len(missing), "modes": results}
