"""Continuous batching on the CPU: tokens/s of one stream against 16 concurrent streams, side by side in one run.

The tiny random Llama of the tests (tests/conftest.py make_tiny_llama: 2 layers, hidden 64, BPE tokenizer on
examples/corpus) decodes through our loop (answer.generator.decode: graph) with the scheduler of
trtrag_cli/generate/decode/scheduler.py. Each round streams the 16 prompts one at a time (one stream),
then all 16 at once from 16 threads (concurrent), greedy, and counts the tokens the scheduler delivered
(util.observe "tokens" events) over the wall time. Rounds alternate so that load from other processes
hits both alike; the median round is reported, and whether every concurrent text matched its text alone.
torch runs one intra-op thread by default (--threads): the tiny model's matmuls are too small to split,
and on a shared 2-core machine two OpenMP threads made each step 10-80x slower and the figures noise.

Usage: python benchmarks/continuous_batching.py [--rounds 3] [--new-tokens 64] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import make_tiny_llama  # noqa: E402 - after the path is set
from trtrag_cli.generate.base import SamplingParams  # noqa: E402
from trtrag_cli.generate.prompt import build_prompt  # noqa: E402
from trtrag_cli.util import observe  # noqa: E402

QUESTIONS = ["How fast is the TH-50 replaced?", "warranty?", "Who pays for shipping a faulty sensor back?",
             "Can I get an advance replacement?"]
PASSAGES = [{"n": i, "id": f"d{i}#0", "source": f"doc{i}.md", "file": f"doc{i}.md", "title": "",
             "text": f"Passage {i}: the TH-50 sensor is replaced within {i + 2} working days under warranty. " * 3}
            for i in range(1, 5)]


class TokenCount:
    """Tokens delivered by the decode loop, from its "tokens" events."""

    def __init__(self):
        self.count = 0
        self._lock = threading.Lock()

    def __call__(self, event: str, **fields) -> None:
        if event == "tokens":
            with self._lock:
                self.count += fields["count"]


def one_stream(backend, prompts, params) -> tuple[list[str], float]:
    """The prompts streamed one after another: texts and wall seconds."""
    started = time.perf_counter()
    texts = ["".join(backend.stream(p, params)) for p in prompts]
    return texts, time.perf_counter() - started


def concurrent(backend, prompts, params) -> tuple[list[str], float]:
    """The prompts streamed at once, one thread each: texts and wall seconds."""
    texts: list = [None] * len(prompts)
    barrier = threading.Barrier(len(prompts) + 1)

    def run(i: int) -> None:
        barrier.wait()
        texts[i] = "".join(backend.stream(prompts[i], params))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    return texts, time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" /
                    f"continuous-batching-cpu-{time.strftime('%Y-%m-%d')}.json")
    args = ap.parse_args()

    import torch

    from trtrag_cli.generate.hf import TransformersBackend

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        model = make_tiny_llama(Path(folder))
        backend = TransformersBackend(str(model), device="cpu", decode="graph", max_batch=args.streams)
    prompts = [build_prompt(backend.tokenizer, QUESTIONS[i % 4], PASSAGES[:1 + (i // 4) % 4], 512, args.new_tokens)
               for i in range(args.streams)]
    params = SamplingParams(max_new_tokens=args.new_tokens)
    counter = TokenCount()
    unsubscribe = observe.subscribe(counter)
    one_stream(backend, prompts[:2], params)            # warm-up
    rounds, matched = [], True
    try:
        for r in range(args.rounds):
            row = {}
            for name, run in (("one_stream", one_stream), ("concurrent", concurrent)):
                before = counter.count
                texts, seconds = run(backend, prompts, params)
                tokens = counter.count - before
                row[name] = {"tokens": tokens, "seconds": round(seconds, 3), "tok_s": round(tokens / seconds, 1)}
                row.setdefault("texts", {})[name] = texts
            row["texts_match"] = row["texts"]["one_stream"] == row["texts"].pop("concurrent")
            row.pop("texts")
            matched = matched and row["texts_match"]
            row["speedup"] = round(row["concurrent"]["tok_s"] / row["one_stream"]["tok_s"], 2)
            rounds.append(row)
            print(f"round {r + 1}: one stream {row['one_stream']['tok_s']} tok/s, {args.streams} concurrent "
                  f"{row['concurrent']['tok_s']} tok/s ({row['speedup']}x), texts match: {row['texts_match']}",
                  flush=True)
    finally:
        unsubscribe()
        backend.close()
    median = sorted(rounds, key=lambda row: row["speedup"])[len(rounds) // 2]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    report = {
        "benchmark": "continuous batching, tiny random Llama (2 layers, hidden 64), CPU, greedy",
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads()},
        "commit": commit, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "streams": args.streams, "new_tokens": args.new_tokens,
        "prompt_tokens": [len(p.ids) for p in prompts],
        "one_stream_tok_s": median["one_stream"]["tok_s"], "concurrent_tok_s": median["concurrent"]["tok_s"],
        "speedup": median["speedup"], "speedup_median_of": len(rounds),
        "speedup_all": statistics.median(row["speedup"] for row in rounds),
        "texts_match": matched, "rounds": rounds,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"one stream {report['one_stream_tok_s']} tok/s, {args.streams} concurrent {report['concurrent_tok_s']} "
          f"tok/s: {report['speedup']}x (median of {len(rounds)} rounds); texts match: {matched}; wrote {args.out}")


if __name__ == "__main__":
    main()
