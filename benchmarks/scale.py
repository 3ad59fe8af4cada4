"""Where the index stands at scale: a synthetic corpus that brings its own embeddings (issue 19).

Generates N one-chunk documents in .jsonl files (30-60 words from a Zipf-distributed vocabulary, so BM25
sees realistic term statistics; 384-d clustered unit vectors from a seeded numpy generator), then times,
each in its own process with its peak RSS (os.wait4):

1. `trtrag index` of the whole corpus (default recipe, workspace in a temp folder), and `du` of the
   generation it published;
2. a serving process: opens `Pipeline(recipe, max_wait_ms=0, workers=1)`, asks --questions hybrid
   questions made of corpus words, reports its RSS after opening and after the questions and the
   P50/P90/P99 of `ask` (process start and opening excluded);
3. 1% of the files rewritten (some documents get new words and vectors, ids kept), `trtrag index` again:
   its time and its ratio to step 1.

    PYTHONPATH=. python benchmarks/scale.py --chunks 100000 --out benchmarks/results/scale-100000-cpu-<date>.json

The encoder is the recipe's (all-MiniLM-L6-v2 on onnxruntime): indexing does not run it (every document
brings its vector), each question does. Targets checked (issue 19): serving RSS <= 1.2 x vector bytes +
300 MB, hybrid ask P50 <= 50 ms, re-index after 1% of files changed <= 10% of the full index's time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DIM = 384
MODEL = "all-MiniLM-L6-v2"  # the default recipe's encoder; its tokenizer gives the vocabulary
VOCAB = 20_000
CLUSTERS = 256


def vocabulary(size: int, rng: np.random.Generator) -> list[str]:
    """`size` whole words of the encoder's own WordPiece vocabulary, shuffled: one token each, so a document
    of 60 words stays one chunk, and real English words, so the stemmer and stopwords act as on real text."""
    from trtrag_cli.encode.models import load_tokenizer, model_dir

    vocab = load_tokenizer(model_dir(MODEL), 256).get_vocab()
    words = sorted(w for w in vocab if len(w) >= 3 and w.isascii() and w.isalpha() and w.islower())
    rng.shuffle(words)
    return words[:size]


class Synth:
    """Texts and vectors for document k of file f, reproducible from (seed, f, version)."""

    def __init__(self, seed: int):
        rng = np.random.default_rng(seed)
        self.seed = seed
        self.words = np.array(vocabulary(VOCAB, rng))
        p = 1.0 / np.arange(1, len(self.words) + 1) ** 1.07  # Zipf, the exponent of English word frequencies
        self.cdf = np.cumsum(p / p.sum())
        c = rng.standard_normal((CLUSTERS, DIM)).astype(np.float32)
        self.centroids = c / np.linalg.norm(c, axis=1, keepdims=True)

    def file_lines(self, f: int, docs: int, version: int = 0, changed: float = 0.0) -> list[str]:
        """The .jsonl lines of file f: ids d<f>-<k>; with version > 0 a share `changed` of them differ."""
        rng = np.random.default_rng([self.seed, f, 0])
        lengths = rng.integers(30, 61, docs)
        tokens = np.searchsorted(self.cdf, rng.random(int(lengths.sum())))
        vecs = self.centroids[rng.integers(0, CLUSTERS, docs)] + 0.6 * rng.standard_normal((docs, DIM)) / np.sqrt(DIM)
        texts = np.split(self.words[tokens], np.cumsum(lengths)[:-1])
        texts = [" ".join(t) for t in texts]
        if version:
            alt = np.random.default_rng([self.seed, f, version])
            for k in np.flatnonzero(alt.random(docs) < changed):
                n = int(alt.integers(30, 61))
                texts[k] = " ".join(self.words[np.searchsorted(self.cdf, alt.random(n))])
                vecs[k] = self.centroids[alt.integers(0, CLUSTERS)] + 0.6 * alt.standard_normal(DIM) / np.sqrt(DIM)
        vecs = (vecs / np.linalg.norm(vecs, axis=1, keepdims=True)).astype(np.float32)
        rows = np.round(vecs.astype(np.float64), 5).tolist()  # float repr of a list: 5x faster than np.char.mod per value
        return [f'{{"id": "d{f}-{k}", "text": "{texts[k]}", "embedding": [{",".join(map(repr, rows[k]))}]}}'
                for k in range(docs)]

    def question(self, rng: np.random.Generator) -> str:
        """4-7 corpus words, mid-frequency ranks, like a question's content words."""
        ranks = rng.integers(50, 5000, int(rng.integers(4, 8)))
        return "what about " + " ".join(self.words[ranks]) + "?"


def write_file(folder: Path, synth: Synth, f: int, docs: int, version: int = 0, changed: float = 0.0) -> None:
    """Write file f of the corpus (part-<f>.jsonl), at the given version."""
    path = folder / f"part-{f:05d}.jsonl"
    path.write_text("\n".join(synth.file_lines(f, docs, version, changed)) + "\n", encoding="utf-8")


def docs_per_file(n: int, files: int) -> list[int]:
    """n documents spread over `files` files, the first ones one more where it does not divide."""
    base, extra = divmod(n, files)
    return [base + (1 if f < extra else 0) for f in range(files)]


def run_timed(cmd: list[str], env: dict) -> dict:
    """Run cmd; return its wall seconds, its own peak RSS in MB (os.wait4) and its JSON stdout."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd[:4])}... failed ({proc.returncode}):\n{stderr[-3000:]}")
    return {"wall_s": round(wall, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "json": json.loads(stdout) if stdout.strip() else {}}


def du_mb(path: Path) -> float:
    """Bytes of every file under path, in MB (the apparent size, as `du --apparent-size`)."""
    total = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return round(total / 1e6, 1)


SERVE = r"""
import json, sys, time, resource
import numpy as np
def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS'):
            return int(line.split()[1]) / 1024
from trtrag_cli.recipe.schema import load_recipe
from trtrag_cli.pipeline import Pipeline
questions = json.loads(sys.argv[2])
recipe = load_recipe(None, ["workspace=" + sys.argv[1]] + json.loads(sys.argv[3]))
t0 = time.perf_counter()
with Pipeline(recipe, max_wait_ms=0, workers=1) as p:
    open_s = time.perf_counter() - t0
    rss_open = rss()
    p.ask(questions[0])  # the first question pays lazy setup (onnxruntime arenas); not timed
    lat, stages = [], []
    for q in questions[1:]:
        t = time.perf_counter()
        a = p.ask(q, mode="hybrid")
        lat.append((time.perf_counter() - t) * 1000)
        stages.append(a.get("timings_ms", {}))
    rss_after = rss()
keys = sorted({k for s in stages for k in s})
print(json.dumps({"open_s": open_s, "rss_open_mb": rss_open, "rss_after_mb": rss_after,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "latency_ms": lat,
                  "stage_p50_ms": {k: float(np.percentile([s.get(k, 0) for s in stages], 50)) for k in keys}}))
"""


def pct(values, q) -> float:
    """The q-th percentile, rounded for the report."""
    return round(float(np.percentile(values, q)), 2)


def current_generation(ws: Path) -> Path:
    """The index generation the workspace's CURRENT names."""
    index = next(ws.glob("*/index"))
    return index / (index / "CURRENT").read_text().strip()


def generation_files(gen: Path) -> dict[str, float]:
    """MB per file of a generation: its own files and those of the segments it lists (segment/file)."""
    out = {p.name: p.stat().st_size / 1e6 for p in gen.iterdir() if p.is_file()}
    for name in (gen / "SEGMENTS").read_text().split():
        seg = gen.parent / "segments" / name
        out.update({f"{name}/{p.relative_to(seg)}": p.stat().st_size / 1e6 for p in seg.rglob("*") if p.is_file()})
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=int, default=10_000)
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--questions", type=int, default=200)
    ap.add_argument("--changed-files", type=float, default=0.01, help="share of files rewritten")
    ap.add_argument("--changed-docs", type=float, default=0.2, help="share of a rewritten file's documents")
    ap.add_argument("--seed", type=int, default=19)
    ap.add_argument("--dir", type=Path, default=None, help="work folder (default: a temp folder, removed)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--set", dest="sets", action="append", default=[],
                    help="recipe override for every index run and the serving process, e.g. index.kind=ivf")
    args = ap.parse_args(argv)
    sets = [x for kv in args.sets for x in ("--set", kv)]

    work = Path(tempfile.mkdtemp(prefix="trtrag-scale-", dir=args.dir))
    corpus, ws = work / "corpus", work / "ws"
    corpus.mkdir()
    # One export cache for every workspace here ($TRTRAG_CACHE if set), filled by a warm-up index of one
    # small file first: the ONNX export of the encoder (about 15 s, 1.2 GB: torch) is paid once per cache,
    # not per index, so it is reported apart and left out of the full index's time.
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    env.setdefault("TRTRAG_CACHE", str(work / "cache"))
    trtrag = [sys.executable, "-m", "trtrag_cli"]
    res: dict = {"benchmark": "scale", "chunks": args.chunks, "files": args.files, "dim": DIM,
                 "vector_bytes": args.chunks * DIM * 4, "host": platform.node(), "cpus": os.cpu_count(),
                 "python": platform.python_version(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        synth = Synth(args.seed)
        sizes = docs_per_file(args.chunks, args.files)
        t = time.perf_counter()
        for f, n in enumerate(sizes):
            write_file(corpus, synth, f, n)
        res["generate"] = {"wall_s": round(time.perf_counter() - t, 2), "corpus_mb": du_mb(corpus)}
        log(f"corpus: {args.chunks} docs in {args.files} files, {res['generate']['corpus_mb']} MB, "
            f"{res['generate']['wall_s']} s")

        warm = work / "warm"
        warm.mkdir()
        write_file(warm, synth, 0, 10)
        export = run_timed(trtrag + ["index", str(warm), "--set", f"workspace={work / 'ws-warm'}", "--json"], env)
        res["encoder_export"] = {"wall_s": export["wall_s"], "peak_rss_mb": export["peak_rss_mb"],
                                 "note": "warm-up index of 10 documents: ONNX export into the shared cache"}
        log(f"encoder export (warm-up, not counted): {export['wall_s']} s, peak RSS {export['peak_rss_mb']} MB")

        res["sets"] = args.sets
        full = run_timed(trtrag + ["index", str(corpus), "--set", f"workspace={ws}", *sets, "--json"], env)
        rss_full = full["peak_rss_mb"]
        files = generation_files(current_generation(ws))
        res["index_full"] = {"wall_s": full["wall_s"], "peak_rss_mb": rss_full,
                             "disk_mb": round(sum(files.values()), 1),
                             "files": {k: round(v, 1) for k, v in sorted(files.items()) if v >= 0.05},
                             "report": {k: full["json"].get(k) for k in ("counts", "seconds", "docs_per_s")}}
        log(f"index full: {full['wall_s']} s, peak RSS {rss_full} MB, disk {res['index_full']['disk_mb']} MB")

        qrng = np.random.default_rng(args.seed + 1)
        questions = [synth.question(qrng) for _ in range(args.questions + 1)]
        serve = run_timed([sys.executable, "-c", SERVE, str(ws), json.dumps(questions), json.dumps(args.sets)], env)
        s = serve["json"]
        lat = s["latency_ms"]
        res["serve"] = {"open_s": round(s["open_s"], 2), "rss_open_mb": round(s["rss_open_mb"], 1),
                        "rss_after_mb": round(s["rss_after_mb"], 1), "peak_rss_mb": round(s["peak_rss_mb"], 1),
                        "questions": len(lat), "mode": "hybrid",
                        "ask_ms": {"p50": pct(lat, 50), "p90": pct(lat, 90), "p99": pct(lat, 99),
                                   "mean": round(float(np.mean(lat)), 2)},
                        "stage_p50_ms": {k: round(v, 2) for k, v in s["stage_p50_ms"].items()}}
        log(f"serve: open {res['serve']['open_s']} s, RSS {res['serve']['rss_open_mb']} -> "
            f"{res['serve']['rss_after_mb']} MB, ask P50/P90/P99 {res['serve']['ask_ms']['p50']}/"
            f"{res['serve']['ask_ms']['p90']}/{res['serve']['ask_ms']['p99']} ms")

        n_changed = max(1, round(args.files * args.changed_files))
        picks = np.random.default_rng(args.seed + 2).choice(args.files, n_changed, replace=False)
        for f in sorted(picks):
            write_file(corpus, synth, int(f), sizes[f], version=1, changed=args.changed_docs)
        time.sleep(0.01)
        again = run_timed(trtrag + ["index", str(corpus), "--set", f"workspace={ws}", *sets, "--json"], env)
        res["index_1pct"] = {"files_changed": n_changed, "wall_s": again["wall_s"],
                             "ratio_to_full": round(again["wall_s"] / full["wall_s"], 3),
                             "peak_rss_mb": again["peak_rss_mb"],
                             "disk_added_mb": round(sum(generation_files(current_generation(ws)).values())
                                                    - sum(files.values()), 1),
                             "report": {k: again["json"].get(k) for k in ("counts", "seconds", "docs_per_s")}}
        log(f"re-index after {n_changed} files changed: {again['wall_s']} s "
            f"({res['index_1pct']['ratio_to_full']:.1%} of the full index)")

        after = run_timed([sys.executable, "-c", SERVE, str(ws), json.dumps(questions), json.dumps(args.sets)], env)
        lat2 = after["json"]["latency_ms"]
        res["serve_after_reindex"] = {"rss_after_mb": round(after["json"]["rss_after_mb"], 1),
                                      "segments": again["json"].get("counts", {}).get("segments"),
                                      "ask_ms": {"p50": pct(lat2, 50), "p90": pct(lat2, 90), "p99": pct(lat2, 99)}}
        log(f"serve after the re-index: RSS {res['serve_after_reindex']['rss_after_mb']} MB, ask P50/P99 "
            f"{res['serve_after_reindex']['ask_ms']['p50']}/{res['serve_after_reindex']['ask_ms']['p99']} ms")

        budget = 1.2 * res["vector_bytes"] / 1e6 + 300
        res["targets"] = {
            "serve_rss": {"limit_mb": round(budget, 1), "measured_mb": res["serve"]["rss_after_mb"],
                          "pass": res["serve"]["rss_after_mb"] <= budget},
            "ask_p50": {"limit_ms": 50, "measured_ms": res["serve"]["ask_ms"]["p50"],
                        "pass": res["serve"]["ask_ms"]["p50"] <= 50},
            "reindex_1pct": {"limit_ratio": 0.10, "measured_ratio": res["index_1pct"]["ratio_to_full"],
                             "pass": res["index_1pct"]["ratio_to_full"] <= 0.10},
        }
        for name, t in res["targets"].items():
            log(f"target {name}: {'PASS' if t['pass'] else 'FAIL'} {t}")
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(res, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return res


def log(msg: str) -> None:
    """A timestamped progress line on stderr."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
