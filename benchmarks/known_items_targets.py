"""Issue 19's three targets on a real corpus: the known-item set (scripts/make_known_items.py) split into
files, indexed with the recipe's encoder, served, and re-indexed after 1% of its files changed.

Steps, each in its own process (peak RSS from os.wait4, as benchmarks/scale.py): the jsonl corpus is
split into --files files of equal document counts (ids kept); `trtrag index` of all of them; a serving
process asks the set's queries (hybrid, one at a time; RSS after); 1% of the files get one sentence
appended to each of a fifth of their documents; `trtrag index` again; the ratio of the two index times.

    PYTHONPATH=. python benchmarks/known_items_targets.py --corpus /work/ki20k/corpus/docs.jsonl \
        --queries /work/ki20k/queries.jsonl --out benchmarks/results/known-items-20k-targets.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import SERVE, pct, run_timed  # noqa: E402  (same measuring code as the synthetic run)


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, required=True, help="one jsonl file of documents")
    ap.add_argument("--queries", type=Path, required=True)
    ap.add_argument("--files", type=int, default=200)
    ap.add_argument("--questions", type=int, default=300)
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="trtrag-ki-", dir=args.dir))
    corpus, ws = work / "corpus", work / "ws"
    corpus.mkdir()
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    trtrag = [sys.executable, "-m", "trtrag_cli"]
    try:
        lines = [x for x in args.corpus.read_text(encoding="utf-8").splitlines() if x.strip()]
        parts = np.array_split(np.arange(len(lines)), args.files)
        for f, rows in enumerate(parts):
            (corpus / f"part-{f:04d}.jsonl").write_text("\n".join(lines[i] for i in rows) + "\n", encoding="utf-8")
        full = run_timed(trtrag + ["index", str(corpus), "--set", f"workspace={ws}", "--json"], env)
        chunks = full["json"]["counts"]["chunks_total"]
        questions = [json.loads(x)["query"] for x in args.queries.read_text().splitlines() if x.strip()]
        questions = questions[:args.questions + 1]
        serve = run_timed([sys.executable, "-c", SERVE, str(ws), json.dumps(questions), "[]"], env)["json"]
        rng = np.random.default_rng(0)
        changed = rng.choice(args.files, max(1, args.files // 100), replace=False)
        for f in changed:
            path = corpus / f"part-{f:04d}.jsonl"
            docs = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]
            for d in docs[: max(1, len(docs) // 5)]:
                d["text"] += " This package description was revised."
            path.write_text("\n".join(json.dumps(d) for d in docs) + "\n", encoding="utf-8")
        again = run_timed(trtrag + ["index", str(corpus), "--set", f"workspace={ws}", "--json"], env)
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    vector_bytes = chunks * 384 * 4
    lat = serve["latency_ms"]
    res = {"documents": len(lines), "files": args.files, "chunks": chunks, "vector_bytes": vector_bytes,
           "index_full": {"wall_s": full["wall_s"], "peak_rss_mb": full["peak_rss_mb"]},
           "serve": {"rss_open_mb": round(serve["rss_open_mb"], 1), "rss_after_mb": round(serve["rss_after_mb"], 1),
                     "questions": len(lat), "ask_ms": {"p50": pct(lat, 50), "p90": pct(lat, 90), "p99": pct(lat, 99)},
                     "stage_p50_ms": {k: round(v, 2) for k, v in serve["stage_p50_ms"].items()}},
           "index_1pct": {"files_changed": len(changed), "wall_s": again["wall_s"],
                          "ratio_to_full": round(again["wall_s"] / full["wall_s"], 3),
                          "counts": again["json"].get("counts")}}
    budget = 1.2 * vector_bytes / 1e6 + 300
    res["targets"] = {"serve_rss": {"limit_mb": round(budget, 1), "measured_mb": res["serve"]["rss_after_mb"],
                                    "pass": res["serve"]["rss_after_mb"] <= budget},
                      "ask_p50": {"limit_ms": 50, "measured_ms": res["serve"]["ask_ms"]["p50"],
                                  "pass": res["serve"]["ask_ms"]["p50"] <= 50},
                      "reindex_1pct": {"limit_ratio": 0.1, "measured_ratio": res["index_1pct"]["ratio_to_full"],
                                       "pass": res["index_1pct"]["ratio_to_full"] <= 0.1}}
    text = json.dumps(res, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return res


if __name__ == "__main__":
    main()
