"""CPU benchmark of the embedded default, side by side in one run; prints figures and writes JSON.

1. Index throughput: `trtrag index` (load, chunk, embed, faiss, BM25, publish) on N documents versus
   sentence-transformers encoding the same documents, in alternating rounds so load hits both alike.
2. `ask` latency at the full corpus size (process start-up excluded): per-stage P50/P90/P99.
3. Single-query encode latency.

Usage: python benchmarks/cpu_pipeline.py --jsonl data/known-items/corpus/docs.jsonl --queries
       data/known-items/queries.jsonl --out bench-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trtrag_cli.recipe.schema import load_recipe
from trtrag_cli.util.timing import cycled, percentiles


def read_docs(path: Path, limit: int) -> list[dict]:
    """The first `limit` documents of a .jsonl corpus."""
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                out.append(json.loads(line))
            if len(out) >= limit:
                break
    return out


def write_corpus(docs: list[dict], folder: Path) -> Path:
    """Write documents as one .jsonl corpus file."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "docs.jsonl", "w", encoding="utf-8") as fh:
        for d in docs:
            fh.write(json.dumps({"id": d["id"], "text": d["text"]}) + "\n")
    return folder


ST_SCRIPT = """
import json, sys, time
from sentence_transformers import SentenceTransformer
texts = json.load(open(sys.argv[1]))
model = SentenceTransformer(sys.argv[2], device="cpu")
model.encode(texts[:64], batch_size=32)  # warm-up
t = time.perf_counter()
model.encode(texts, batch_size=int(sys.argv[3]), normalize_embeddings=True)
print(len(texts) / (time.perf_counter() - t))
"""


def st_docs_per_s(texts: list[str], batch_size: int, work: Path) -> float:
    """sentence-transformers' own encode on the same texts, in a process of its own.

    A separate process keeps ONNX Runtime's and OpenMP's worker threads of this process from
    competing with torch's (in-process it measured about half its stand-alone speed).
    """
    import subprocess

    from trtrag_cli.encode.models import model_dir

    data = work / "st-texts.json"
    data.write_text(json.dumps(texts))
    out = subprocess.run([sys.executable, "-c", ST_SCRIPT, str(data), str(model_dir("all-MiniLM-L6-v2")),
                          str(batch_size)], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def trtrag_docs_per_s(docs: list[dict], work: Path, name: str, precision: str) -> tuple[float, dict]:
    """Full `trtrag index` of the documents into a fresh workspace (encoder export already cached)."""
    from trtrag_cli.index.build import run_index

    corpus = write_corpus(docs, work / f"corpus-{name}")
    recipe = load_recipe(None, [f"workspace={work / 'ws'}", f"name={name}", f"encoder.precision={precision}"])
    t = time.perf_counter()
    report = run_index(recipe, [corpus])
    return len(docs) / (time.perf_counter() - t), report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jsonl", type=Path, default=Path("data/known-items/corpus/docs.jsonl"))
    ap.add_argument("--queries", type=Path, default=Path("data/known-items/queries.jsonl"))
    ap.add_argument("--throughput-docs", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--corpus-docs", type=int, default=20000)
    ap.add_argument("--asks", type=int, default=300)
    ap.add_argument("--recipe", type=Path, default=None)
    ap.add_argument("--precision", choices=("fp32", "int8"), default="fp32", help="encoder of the ask run")
    ap.add_argument("--out", type=Path, default=Path("bench-cpu.json"))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(tempfile.mkdtemp(prefix="trtrag-bench-"))
    os.environ.setdefault("TRTRAG_CACHE", str(work / "cache"))
    docs = read_docs(args.jsonl, args.corpus_docs)
    sample = docs[: args.throughput_docs]
    words = statistics.mean(len(d["text"].split()) for d in sample)
    print(f"{len(docs)} documents, throughput sample {len(sample)} (mean {words:.0f} words)", flush=True)

    trtrag_docs_per_s(sample[:50], work, "warm", "fp32")  # export the encoders once, outside the timing
    rounds = []
    for r in range(1, args.rounds + 1):
        row = {"sentence_transformers": st_docs_per_s([d["text"] for d in sample], 32, work)}
        for precision in ("fp32", "int8"):
            row[f"trtrag_index_{precision}"] = trtrag_docs_per_s(sample, work, f"r{r}-{precision}", precision)[0]
        rounds.append(row)
        print(f"round {r}: " + ", ".join(f"{k} {v:.1f} docs/s" for k, v in row.items()), flush=True)
    med = {k: statistics.median(x[k] for x in rounds) for k in rounds[0]}

    from trtrag_cli.index.build import run_index
    from trtrag_cli.pipeline import Pipeline

    recipe = load_recipe(args.recipe, [f"workspace={work / 'ws'}", "name=full",
                                       f"encoder.precision={args.precision}"])
    t = time.perf_counter()
    full = run_index(recipe, [write_corpus(docs, work / "corpus-full")])
    index_s = time.perf_counter() - t
    print(f"indexed {len(docs)} docs ({full['counts']['chunks_total']} chunks) in {index_s:.1f} s", flush=True)
    questions = [json.loads(line)["query"] for line in open(args.queries, encoding="utf-8") if line.strip()]
    questions = cycled(questions, args.asks)
    stages: dict[str, list[float]] = {}
    wall = []
    with Pipeline(recipe) as pipe:
        for q in questions[:20]:
            pipe.ask(q)  # warm-up
        for q in questions:
            t = time.perf_counter()
            res = pipe.ask(q)
            wall.append((time.perf_counter() - t) * 1e3)
            for stage, ms in res["timings_ms"].items():
                stages.setdefault(stage, []).append(ms)
        encode = []
        for q in questions[:200]:
            t = time.perf_counter()
            pipe.retriever.encode([q])
            encode.append((time.perf_counter() - t) * 1e3)
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "throughput": {"docs": len(sample), "mean_words": round(words, 1), "rounds": rounds,
                       "median_docs_per_s": {k: round(v, 1) for k, v in med.items()},
                       "ratio_to_sentence_transformers": {
                           k: round(v / med["sentence_transformers"], 2) for k, v in med.items()}},
        "ask": {"corpus_docs": len(docs), "precision": args.precision, "chunks": full["counts"]["chunks_total"],
                "index_seconds": round(index_s, 1),
                "queries": len(questions), "mode": recipe.retrieve.mode,
                "wall_ms": percentiles(wall), "stages_ms": {s: percentiles(v) for s, v in stages.items()}},
        "single_query_encode_ms": percentiles(encode),
    }
    print(json.dumps({k: result[k] for k in ("throughput", "ask", "single_query_encode_ms")}, indent=2))
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
