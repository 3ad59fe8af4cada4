"""A large synthetic index in a recipe's workspace, written by the library's own segment writer.

For retrieval benchmarks at sizes where a real corpus would take longest to read (1M chunks of 768-d vectors
would be ~7 GB of JSON for `trtrag index`): N one-chunk documents of 30-60 pseudo-words drawn from a Zipf
distribution (so BM25 sees realistic postings) and clustered unit vectors (2,000 centres plus noise, as
../shared/device/baselines/retrieval_baseline.py), written as one base segment with the recipe's index kind
and published as a generation the recipe's encoder can query (its name and dimension are recorded; the
dimension must match). Questions made of corpus words are written beside it for `bench --serve`.

    PYTHONPATH=. python benchmarks/synth_index.py --chunks 1000000 --set workspace=/tmp/ws \
        --set encoder.model=/tmp/enc [--set index.kind=ivf] --questions /tmp/q.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VOCAB = 50_000
CENTRES = 2000


def main(argv=None) -> dict:
    from trtrag_cli.encode.artifacts import open_recipe_encoder, resolve_recipe_backend
    from trtrag_cli.index.bm25 import Analyzer
    from trtrag_cli.index.build import publish_generation
    from trtrag_cli.index.chunks import ChunkRecord
    from trtrag_cli.index.generation import write_segment
    from trtrag_cli.recipe.schema import load_recipe
    from trtrag_cli.util.workspace import Workspace

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=int, default=1_000_000)
    ap.add_argument("--recipe", type=Path, default=None)
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--questions", type=Path, default=None, help="write 1,000 questions here (jsonl)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    recipe = load_recipe(args.recipe, args.sets)
    ws = Workspace(recipe.workspace_dir())
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    choice = resolve_recipe_backend(recipe)
    with ws.lock(), open_recipe_encoder(recipe, ws, choice=choice) as encoder:
        dim = encoder.dim
        words = np.array([f"w{i:05d}" for i in range(VOCAB)])
        p = 1.0 / np.arange(1, VOCAB + 1) ** 1.07
        cdf = np.cumsum(p / p.sum())
        lengths = rng.integers(30, 61, args.chunks)
        tokens = words[np.searchsorted(cdf, rng.random(int(lengths.sum())))]
        texts = [" ".join(t) for t in np.split(tokens, np.cumsum(lengths)[:-1])]
        del tokens
        centres = rng.standard_normal((CENTRES, dim)).astype(np.float32)
        vectors = np.empty((args.chunks, dim), dtype=np.float32)
        for lo in range(0, args.chunks, 100_000):  # in blocks: the noise of 1M x 768 at once is 6 GB of float64
            n = min(100_000, args.chunks - lo)
            block = centres[rng.integers(0, CENTRES, n)] + 0.6 * rng.standard_normal((n, dim), dtype=np.float32)
            vectors[lo:lo + n] = block / np.linalg.norm(block, axis=1, keepdims=True)
        records = [ChunkRecord(id=f"s{i}#0", source=f"s{i}", file=f"synth/{i // 1000:05d}.jsonl", ordinal=0,
                               title="", text=t, hash=f"{i:016x}") for i, t in enumerate(texts)]
        made = time.perf_counter() - t0
        name, meta = write_segment(ws.index_root, records, vectors, Analyzer(recipe.lexical), recipe.index,
                                   faiss_base=recipe.index.kind != "flat", texts=texts)
        files = {}
        for r in records:
            files.setdefault(r.file, {"sha256": "synthetic", "size": 0, "sources": []})["sources"].append(r.source)
        counts = {"chunks_total": args.chunks, "chunks_new": args.chunks, "segments": 1, "dead_rows": 0}
        gen = publish_generation(ws, recipe, encoder, choice.backend,
                                 [(name, args.chunks, np.zeros(args.chunks, dtype=bool))], counts, files)
    report = {"chunks": args.chunks, "dim": dim, "kind": recipe.index.kind, "generation": str(gen),
              "segment": name, "nlist_built": meta.get("nlist_built"), "generate_s": round(made, 1),
              "total_s": round(time.perf_counter() - t0, 1), "encoder": encoder.name}
    if args.questions:
        qrng = np.random.default_rng(args.seed + 1)
        with open(args.questions, "w") as fh:
            for i in range(1000):
                ranks = qrng.integers(50, 5000, int(qrng.integers(4, 8)))
                fh.write(json.dumps({"query": "what about " + " ".join(words[ranks]) + "?",
                                     "relevant": [f"s{qrng.integers(0, args.chunks)}"]}) + "\n")
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
