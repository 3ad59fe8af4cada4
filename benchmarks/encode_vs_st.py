"""Documents/s and query latency: OrtEncoder vs sentence-transformers on the same texts, same run.

    python benchmarks/encode_vs_st.py --out encode.json          # 2,000 synthetic ~70-word paragraphs
    python benchmarks/encode_vs_st.py --jsonl docs.jsonl --n 5000  # your own {"text": ...} lines

Systems run in alternating rounds (rotated order) so background load hits each alike; each figure is
reported as best-of and median over rounds. Human output goes to stderr, the JSON to --out / stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

SUBJECTS = ["The new billing service", "Our support team", "The quarterly report", "A regional hospital",
            "The city council", "This open-source library", "The research group", "A small logistics firm",
            "The mobile app", "Their data platform", "The onboarding guide", "The storage cluster"]
VERBS = ["reduced", "improved", "documented", "replaced", "measured", "delayed", "simplified", "audited",
         "migrated", "tracked", "expanded", "reviewed"]
OBJECTS = ["the average response time", "customer refunds for late deliveries", "the annual energy budget",
           "password reset requests", "the nightly backup schedule", "shipping costs to rural areas",
           "the error rate of payment retries", "staff training on privacy rules", "the search index",
           "invoices older than ninety days", "the public transport timetable", "memory use on old phones"]
CLAUSES = ["after a long review by the finance department", "because several users reported problems",
           "without changing the existing contracts", "during the second half of the year",
           "while keeping the same number of employees", "so that new customers can sign up faster",
           "although the original plan was more ambitious", "before the regulators published new guidance",
           "as part of a wider effort to cut waste", "once the old servers were finally retired"]
DETAILS = ["Most of the savings came from removing duplicate work.",
           "Managers expect the change to pay for itself within eighteen months.",
           "A follow-up study will compare the results with last year's figures.",
           "Some critics argue that the numbers hide seasonal effects.",
           "The team published a short summary for anyone who wants the details.",
           "Feedback from early testers was mostly positive, with a few concerns about speed.",
           "Questions about eligibility should be sent to the help desk by email."]
MONTHS = ["March", "June", "September", "December"]
QUESTIONS = ["how do I reset my password", "what is the refund policy for late deliveries",
             "when does the nightly backup run", "who approved the energy budget",
             "why did response time improve", "where can I find the onboarding guide",
             "how much did shipping to rural areas cost", "which servers were retired last year",
             "what changed in the payment retry logic", "is staff privacy training mandatory"]


def synthetic_docs(n: int, seed: int = 0) -> list[str]:
    """n deterministic English paragraphs of roughly 70 words (55-85)."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        words: list[str] = []
        target = rng.randint(55, 85)
        while len(words) < target:
            if words and rng.random() < 0.35:
                sentence = rng.choice(DETAILS)
            else:
                sentence = (f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} "
                            f"{rng.choice(CLAUSES)}, reaching {rng.randint(2, 97)} percent in "
                            f"{rng.choice(MONTHS)} {rng.randint(2015, 2025)}.")
            words.extend(sentence.split())
        docs.append(" ".join(words[:target]).rstrip(",.") + ".")
    return docs


def questions(n: int, seed: int = 1) -> list[str]:
    """n short deterministic questions (batch-1 latency probes)."""
    rng = random.Random(seed)
    return [f"{rng.choice(QUESTIONS)} in {rng.randint(2015, 2025)}?" for _ in range(n)]


def read_jsonl(path: Path, n: int) -> list[str]:
    """Up to n "text" fields from a JSON-lines file."""
    docs = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                docs.append(json.loads(line)["text"])
                if len(docs) >= n:
                    break
    return docs


def percentile(values: list[float], q: float) -> float:
    """q-th percentile (0-100) by linear interpolation."""
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summary(runs: list[float]) -> dict:
    """Best-of and median of repeated throughput runs."""
    return {"runs": [round(r, 2) for r in runs], "best": round(max(runs), 2),
            "median": round(statistics.median(runs), 2)}


def latency_ms(encode_one, qs: list[str]) -> list[float]:
    """Milliseconds per single-text encode call, one per question."""
    for q in qs[:20]:
        encode_one(q)
    out = []
    for q in qs:
        t = time.perf_counter()
        encode_one(q)
        out.append((time.perf_counter() - t) * 1e3)
    return out


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print a table to stderr and return/write the JSON result."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="all-MiniLM-L6-v2")
    p.add_argument("--jsonl", type=Path, help='JSON-lines file with a "text" field (default: synthetic)')
    p.add_argument("--n", type=int, default=2000, help="documents (default 2000)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--st-batch", type=int, nargs="+", default=[32, 64])
    p.add_argument("--ort-batch", type=int, default=64)
    p.add_argument("--variants", nargs="+", default=["fused", "plain"], help="ONNX graphs to time")
    p.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0 = physical cores)")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "trtrag-bench-cache")
    p.add_argument("--no-st", action="store_true", help="skip sentence-transformers")
    p.add_argument("--out", type=Path, help="write the JSON result here")
    args = p.parse_args(argv)

    from trtrag_cli.encode.models import model_dir
    from trtrag_cli.encode.onnxruntime import RUN_TOKENS, open_encoder, physical_cores

    docs = read_jsonl(args.jsonl, args.n) if args.jsonl else synthetic_docs(args.n)
    qs = questions(args.queries)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731

    encoders = {f"ort-{v}": open_encoder(args.model, args.cache_dir, threads=args.threads, variant=v)
                for v in args.variants}
    systems = {name: (lambda texts, e=enc: e.encode(texts, batch_size=args.ort_batch))
               for name, enc in encoders.items()}
    st = None
    if not args.no_st:
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(str(model_dir(args.model)), device="cpu")
        for bs in args.st_batch:
            systems[f"st-b{bs}"] = (lambda texts, bs=bs: st.encode(
                texts, batch_size=bs, normalize_embeddings=True, convert_to_numpy=True))
    tokenizer = next(iter(encoders.values()))._tokenizer
    mean_tokens = statistics.mean(len(e.ids) for e in tokenizer.encode_batch(docs))
    log(f"{len(docs)} docs, {statistics.mean(len(d.split()) for d in docs):.1f} words and "
        f"{mean_tokens:.1f} tokens on average; {args.rounds} rounds")

    for fn in systems.values():  # warm-up: first-call allocations, lazy inits
        fn(docs[:64])
    runs: dict[str, list[float]] = {name: [] for name in systems}
    loads: dict[str, list[float]] = {name: [] for name in systems}
    names = list(systems)
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            t = time.perf_counter()
            systems[name](docs)
            runs[name].append(len(docs) / (time.perf_counter() - t))
            loads[name].append(round(os.getloadavg()[0], 2))
            log(f"  round {r + 1} {name:10s} {runs[name][-1]:7.1f} docs/s  (load {os.getloadavg()[0]:.2f})")

    one = {name: (lambda q, e=enc: e.encode([q], batch_size=1)) for name, enc in encoders.items()}
    if st is not None:
        one["st"] = lambda q: st.encode([q], batch_size=1, normalize_embeddings=True)
    latencies = {}
    for name, fn in one.items():
        ms = latency_ms(fn, qs)
        latencies[name] = {"p50": round(percentile(ms, 50), 3), "p90": round(percentile(ms, 90), 3),
                           "mean": round(statistics.mean(ms), 3)}

    throughput = {name: {**summary(v), "load_avg_1m": loads[name]} for name, v in runs.items()}
    result = {
        "model": args.model,
        "docs": {"n": len(docs), "source": str(args.jsonl or "synthetic"),
                 "mean_tokens": round(mean_tokens, 1)},
        "settings": {"rounds": args.rounds, "ort_batch": args.ort_batch, "ort_run_tokens": RUN_TOKENS,
                     "st_batch": args.st_batch,
                     "threads": args.threads or physical_cores()},
        "throughput_docs_per_s": throughput,
        "query_latency_ms": latencies,
        "host": {"cpus": os.cpu_count(), "python": platform.python_version(),
                 "machine": platform.processor() or platform.machine()},
    }
    st_names = [n for n in throughput if n.startswith("st-")]
    if st_names:
        for stat in ("best", "median"):
            best_st = max(throughput[n][stat] for n in st_names)
            result.setdefault("ratio_vs_best_st", {})[stat] = {
                n: round(throughput[n][stat] / best_st, 2) for n in encoders}
    for enc in encoders.values():
        enc.close()

    log(f"{'system':12s} {'best':>8s} {'median':>8s}  docs/s")
    for name, s in throughput.items():
        log(f"{name:12s} {s['best']:8.1f} {s['median']:8.1f}")
    for name, lat in latencies.items():
        log(f"query {name:10s} p50 {lat['p50']:6.2f} ms  p90 {lat['p90']:6.2f} ms")
    if "ratio_vs_best_st" in result:
        log(f"ratio vs best sentence-transformers: {result['ratio_vs_best_st']}")
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
    else:
        print(text)
    return result


if __name__ == "__main__":
    main()
