"""FP32 vs calibrated INT8 encoder on the CPU, side by side in one run; prints figures and writes JSON.

Runs the real commands' functions on a workspace that already holds an FP32 index of the eval corpus:
  1. trtrag calibrate (domain queries, batches of 1024, the accuracy gate with recall@10 on the eval set)
  2. trtrag build-engine --int8 --backend onnxruntime
  3. throughput of both engines at batch 1 (held-out queries) and batch 64 (documents), alternating
     rounds, medians of 3; mean and min cosine INT8 vs FP32 on the same texts
  4. trtrag eval on the FP32 index, then trtrag index with the INT8 engine and trtrag eval again

Usage: python benchmarks/int8_engine.py --workspace /tmp/ws20k --docs data/known-items/corpus/docs.jsonl \
         --calibration data/known-items/calibration.txt --queries data/known-items/queries.jsonl \
         --out benchmarks/results/int8-engine-cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trtrag_cli.recipe.schema import load_recipe
from trtrag_cli.util.timing import cycled


def read_texts(path: Path, limit: int, offset: int = 0) -> list[str]:
    """Document texts from a .jsonl corpus."""
    out = []
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if i >= offset and line.strip():
                out.append(json.loads(line)["text"])
            if len(out) >= limit:
                break
    return out


def speed(factories: dict, queries: list[str], docs: list[str], rounds: int = 5) -> dict:
    """Batch-1 queries/s and batch-64 documents/s per engine: alternating rounds, medians.

    Batch 1 and batch 64 each get a fresh session, warmed with their own kind of input: a query-serving
    session (`ask`, `serve`) never encodes 64-document batches, and `index` runs in its own process. When
    one session did both, the INT8 engine's batch-1 time after a batch-64 warm-up rose by 15-40% and
    moved far more between rounds (run 7 measured 1.27x that way, `speed_method` "shared session"),
    while FP32's moved by about 5%. Sessions are closed after use, so no idle thread pool spins against
    the one being timed. Per-round ratios to the first engine are reported too (paired, so load that
    moves between rounds cancels out).

    All batch-1 rounds run first, then all batch-64 rounds: queries are served apart from bulk
    encoding. With every batch-1 round following seven seconds of batch-64 encoding (runs 8-10), INT8's
    batch-1 rounds came out slower: the same engines measured 1.45x that way and 1.81x without the
    batch-64 rounds in between, five paired rounds each, one after the other.

    This VM's speed moves by 15-30% within seconds (its two vCPUs ran a fixed loop at 33 and 44 loops/s
    in one probe), which moves batch-1 rounds most. So `batch1_best_ms` is reported too: per query, its
    fastest time over all rounds, averaged over queries: the engine's latency with the noise taken out.
    """
    samples = {name: {"batch1_qps": [], "batch64_docs_per_s": []} for name in factories}
    best = {name: [float("inf")] * len(queries) for name in factories}
    for _ in range(rounds):
        for name, factory in factories.items():
            with factory() as enc:
                enc.encode(queries[:32], batch_size=1)
                start = time.perf_counter()
                for i, q in enumerate(queries):
                    t = time.perf_counter()
                    enc.encode([q], batch_size=1)
                    best[name][i] = min(best[name][i], time.perf_counter() - t)
                samples[name]["batch1_qps"].append(len(queries) / (time.perf_counter() - start))
    for _ in range(rounds):
        for name, factory in factories.items():
            with factory() as enc:
                enc.encode(docs[:64], batch_size=64)
                t = time.perf_counter()
                enc.encode(docs, batch_size=64)
                samples[name]["batch64_docs_per_s"].append(len(docs) / (time.perf_counter() - t))
    base = next(iter(factories))
    out = {name: {k: round(statistics.median(v), 1) for k, v in s.items()} for name, s in samples.items()}
    for name in factories:
        out[name]["paired_ratio"] = {
            k: round(statistics.median(a / b for a, b in zip(samples[name][k], samples[base][k])), 2)
            for k in samples[name]}
        out[name]["rounds"] = {k: [round(x, 1) for x in v] for k, v in samples[name].items()}
        out[name]["batch1_best_ms"] = round(statistics.fmean(best[name]) * 1e3, 3)
        out[name]["batch1_best_ratio"] = round(sum(best[base]) / sum(best[name]), 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workspace", required=True, help="workspace root holding an FP32 index (name: default)")
    ap.add_argument("--docs", type=Path, required=True)
    ap.add_argument("--calibration", type=Path, required=True)
    ap.add_argument("--queries", type=Path, required=True)
    ap.add_argument("--method", default="percentile")
    ap.add_argument("--speed-queries", type=int, default=600, help="batch-1 queries per round (the held-out "
                    "queries, cycled): longer rounds average this VM's swings out")
    ap.add_argument("--speed-docs", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=7, help="alternating timing rounds")
    ap.add_argument("--reuse-calibration", action="store_true",
                    help="keep the workspace's calibration (its gate with recall takes minutes per step here)")
    ap.add_argument("--skip-reindex", action="store_true",
                    help="report the gate's recall@10 instead of re-indexing with the INT8 engine (same for a "
                         "static engine: its vectors do not depend on batching)")
    ap.add_argument("--out", type=Path, default=Path("int8-engine-cpu.json"))
    args = ap.parse_args()

    from trtrag_cli.calibrate.run import run_calibrate
    from trtrag_cli.encode.artifacts import HOLDOUT, open_recipe_encoder
    from trtrag_cli.engine.build import run_build_engine
    from trtrag_cli.evaluate.known_items import run_eval
    from trtrag_cli.index.build import run_index
    from trtrag_cli.util.workspace import Workspace

    base = [f"workspace={args.workspace}", f"calibrate.queries={args.calibration}",
            f"calibrate.eval={args.queries}", f"calibrate.method={args.method}"]
    fp32 = load_recipe(None, base + ["encoder.precision=fp32", "encoder.backend=onnxruntime"])
    int8 = load_recipe(None, base + ["encoder.precision=int8", "encoder.backend=onnxruntime"])
    report: dict = {"machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()}}
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731

    log("eval fp32 index ...")
    report["eval_fp32"] = run_eval(fp32, args.queries, ["hybrid", "dense"])["modes"]
    t = time.perf_counter()
    if args.reuse_calibration:
        from trtrag_cli.encode.artifacts import load_calibration

        cal = load_calibration(fp32)[1]
    else:
        cal = run_calibrate(fp32, progress=lambda e: log(json.dumps(e)[:200]))
    report["calibrate"] = {k: cal[k] for k in ("method", "iterations", "stable", "history", "peak_rss_mib",
                                                "calibration_seconds", "queries", "sites")}
    report["calibrate"]["gate"] = {k: cal["gate"][k] for k in ("passed", "final", "kept_float", "steps", "seconds")}
    report["calibrate"]["seconds"] = None if args.reuse_calibration else round(time.perf_counter() - t, 1)
    eng = run_build_engine(int8, "int8", "onnxruntime", progress=lambda e: log(json.dumps(e)[:200]))
    report["engine"] = {k: eng.get(k) for k in ("form", "kept_float", "gate", "gate_passed", "candidates",
                                                 "run_tokens", "build_seconds")}

    holdout = (Path(args.workspace) / "default" / "calibration" / HOLDOUT).read_text().splitlines()
    queries = cycled(holdout, args.speed_queries)
    docs = read_texts(args.docs, args.speed_docs, offset=5000)
    ws = Workspace(fp32.workspace_dir())
    report["speed"] = speed({"fp32": lambda: open_recipe_encoder(fp32, ws),
                             "int8": lambda: open_recipe_encoder(int8, ws)}, queries, docs, args.rounds)
    report["speed_method"] = "separate sessions for batch 1 and batch 64; all batch-1 rounds, then all batch-64"
    with open_recipe_encoder(fp32, ws) as e32, open_recipe_encoder(int8, ws) as e8:
        texts = holdout + docs
        cos = (e32.encode(texts) * e8.encode(texts)).sum(1)
        report["cosine"] = {"texts": len(texts), "mean": round(float(cos.mean()), 5), "min": round(float(cos.min()), 5)}
        report["encoders"] = {"fp32": e32.name, "int8": e8.name}
    s = report["speed"]
    report["ratios"] = {**s["int8"]["paired_ratio"], "batch1_best": s["int8"]["batch1_best_ratio"]}
    log(json.dumps(report["ratios"]))

    r32 = report["eval_fp32"]["hybrid"]["metrics"]["recall@10"]
    if args.skip_reindex:
        r8 = eng["gate"]["recall@10"]
        report["recall@10"] = {"fp32": r32, "int8": r8, "drop": round(r32 - r8, 4), "source": "build-engine gate"}
    else:
        log("index with the int8 engine ...")
        idx = run_index(int8, [args.docs.parent])
        report["index_int8"] = {k: idx.get(k) for k in ("seconds", "docs_per_s", "encoder")}
        report["eval_int8"] = run_eval(int8, args.queries, ["hybrid", "dense"])["modes"]
        r8 = report["eval_int8"]["hybrid"]["metrics"]["recall@10"]
        report["recall@10"] = {"fp32": r32, "int8": r8, "drop": round(r32 - r8, 4), "source": "trtrag eval"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({"speed": report["speed"], "ratios": report["ratios"], "cosine": report["cosine"],
                      "recall@10": report["recall@10"], "calibrate_iterations": report["calibrate"]["iterations"],
                      "peak_rss_mib": report["calibrate"]["peak_rss_mib"], "form": report["engine"]["form"]},
                     indent=2))


if __name__ == "__main__":
    main()
