"""Peak RSS of `trtrag index` on one generated file of 2, 8 and 19 MB: does memory follow file size?

Each size runs in a fresh interpreter (ru_maxrss is a high-water mark), which indexes one generated file
into a temporary workspace and reports its own peak RSS and the RSS before indexing (imports, tokenizer).
The encoder is a stub (deterministic random unit vectors) unless --real-encoder: embedding 25k chunks on
a laptop CPU takes minutes and its memory does not depend on file size (the encoder sees one batch at a
time). Everything else is the real `run_index`: scan, load, chunk, BM25, faiss, write.

    PYTHONPATH=. python benchmarks/index_memory.py [--kinds txt,html,jsonl] [--sizes 2,8,19]
    PYTHONPATH=<other checkout> python benchmarks/index_memory.py --label before   # the same, other code
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("retrieval augmented generation uses an index of passages tokenization encoder quick answers from "
         "documents sensors gateway warranty battery firmware calibration pressure vibration").split()


def _sentence(k: int) -> str:
    n = 6 + (k * 7) % 9
    return " ".join(WORDS[(k * 5 + j * 3) % len(WORDS)] for j in range(n)).capitalize() + "."


def write_corpus(folder: Path, kind: str, mb: float) -> Path:
    """One file of about mb megabytes: paragraphs of sentences (HTML: <p>s; .jsonl: 2 KB records)."""
    path = folder / f"big.{kind}"
    target, k, rec = int(mb * 1e6), 0, 0
    with open(path, "w", encoding="utf-8") as fh:
        if kind == "html":
            fh.write("<html><head><title>Big page</title></head><body>\n")
        while fh.tell() < target:
            para = " ".join(_sentence(k + j) for j in range(12))
            k += 12
            if kind == "html":
                fh.write(f"<p>{para}</p>\n")
            elif kind == "jsonl":
                fh.write(json.dumps({"id": f"r{rec}", "text": para}) + "\n")
                rec += 1
            else:
                fh.write(para + "\n\n")
        if kind == "html":
            fh.write("</body></html>\n")
    return path


class StubEncoder:
    """Deterministic unit vectors; memory per call is one batch, like the real encoder's."""

    name, dim, max_tokens = "stub-encoder", 384, 256

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def encode(self, texts, batch_size=64, progress=None):
        import numpy as np

        out = np.random.default_rng(len(texts)).standard_normal((len(texts), self.dim)).astype(np.float32)
        if progress:
            progress(len(texts))
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(kind: str, mb: float, real_encoder: bool) -> dict:
    """Index one generated file in this process; returns sizes, times and RSS figures."""
    import trtrag_cli.index.build as build
    from trtrag_cli.recipe.schema import load_recipe

    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus"
        corpus.mkdir()
        path = write_corpus(corpus, kind, mb)
        recipe = load_recipe(None, [f"workspace={tmp}/ws", "name=mem"])
        if not real_encoder:
            build.open_recipe_encoder = lambda *a, **k: StubEncoder()
        build.chunk_tokenizer(recipe)  # the tokenizer's own memory counts as the baseline
        before = _rss_mb()
        t0 = time.perf_counter()
        report = build.run_index(recipe, [corpus])
        return {"kind": kind, "file_mb": round(path.stat().st_size / 1e6, 2), "chunks": report["counts"]["chunks_total"],
                "seconds": round(time.perf_counter() - t0, 2), "rss_before_mb": round(before, 1),
                "peak_rss_mb": round(_rss_mb(), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kinds", default="txt", help="comma-separated: txt, md, html, jsonl")
    ap.add_argument("--sizes", default="2,8,19", help="file sizes in MB")
    ap.add_argument("--real-encoder", action="store_true", help="embed with the recipe's encoder (slow)")
    ap.add_argument("--label", default="", help="a name for this code version in the output")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/index-memory-<label>-<date>.json)")
    ap.add_argument("--child", nargs=2, metavar=("KIND", "MB"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], float(args.child[1]), args.real_encoder)))
        return
    rows = []
    for kind in args.kinds.split(","):
        for mb in args.sizes.split(","):
            cmd = [sys.executable, __file__, "--child", kind, mb] + (["--real-encoder"] if args.real_encoder else [])
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                rows.append({"kind": kind, "file_mb": float(mb), "error": out.stderr.strip().splitlines()[-1:]})
            else:
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), file=sys.stderr)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=os.environ.get("PYTHONPATH", ".").split(":")[0] or ".").stdout.strip()
    result = {"benchmark": "index_memory", "label": args.label, "commit": commit,
              "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} {os.cpu_count()} cpus",
              "encoder": "real" if args.real_encoder else "stub (random unit vectors)", "runs": rows}
    out = Path(args.out or Path(__file__).parent / "results" /
               f"index-memory{'-' + args.label if args.label else ''}-{result['date']}.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
