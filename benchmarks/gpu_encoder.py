"""Eager vs CUDA-graph latency of the torch encoder's forward, per shape, on one GPU.

    python benchmarks/gpu_encoder.py --random-weights --out gpu_encoder.json     # MiniLM-L6 shape
    python benchmarks/gpu_encoder.py --model-dir path/to/all-MiniLM-L6-v2 --out gpu_encoder.json
    python benchmarks/gpu_encoder.py --random-weights --device cpu --reps 5 --out /tmp/x.json  # smoke

Token ids go straight to TorchEncoder._run (the path `encode` takes after tokenizing), padded to the
encoder's shape buckets. Each figure is the median and p90 of --reps runs after --warmup runs, with
torch.cuda.synchronize before and after each. Speed does not depend on the weights, so --random-weights
builds a BertModel with all-MiniLM-L6-v2's shape. Outputs: graph vs eager (max abs diff, min cosine) and
fp16 vs an fp32 eager copy. Human output goes to stderr, the JSON to --out (or stdout).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# The figure to beat, from the issue: an H200, all-MiniLM-L6-v2, batch 1 x 32 tokens.
REFERENCE = {"gpu": "NVIDIA H200", "model": "all-MiniLM-L6-v2", "batch": 1, "tokens": 32,
             "eager_ms": 4.04, "graph_ms": 0.28, "source": "issue"}
MINILM_L6 = {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12,
             "intermediate_size": 1536, "vocab_size": 30522, "max_position_embeddings": 512}
DEFAULT_SHAPES = "1x32,32x128,256x128"
QUERY = "how do I reset my password when the recovery email no longer works"


def log(msg: str = "") -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """'1x32,32x128' -> [(1, 32), (32, 128)]."""
    shapes = []
    for part in text.split(","):
        batch, _, tokens = part.strip().lower().partition("x")
        shapes.append((int(batch), int(tokens)))
    return shapes


def random_bert(seed: int):
    """A BertModel shaped like all-MiniLM-L6-v2 (SDPA attention), random weights, fp32 on the CPU."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.BertConfig(**MINILM_L6)
    try:
        return transformers.BertModel._from_config(config, attn_implementation="sdpa")
    except (TypeError, ValueError, AttributeError):
        config._attn_implementation = "sdpa"
        return transformers.BertModel(config)


def make_encoders(args, device):
    """(encoder under test, fp32 eager reference or None, description of the model)."""
    from trtrag_cli.encode import torch as torchenc

    if args.random_weights:
        model = random_bert(args.seed)
        reference = copy.deepcopy(model) if device.type == "cuda" else None
        common = dict(dim=MINILM_L6["hidden_size"], pooling="mean", max_tokens=args.max_tokens, device=device)
        enc = torchenc.TorchEncoder(model, None, name=f"torch-{args.precision}/random-minilm-l6",
                                    variant=args.precision, **common)
        ref = (torchenc.TorchEncoder(reference, None, name="torch-fp32/random-minilm-l6", variant="fp32",
                                     graphs=False, **common) if reference is not None else None)
        return enc, ref, "random weights, all-MiniLM-L6-v2 shape " + json.dumps(MINILM_L6)
    cache = Path(tempfile.mkdtemp(prefix="gpu-encoder-"))
    enc = torchenc.open_encoder(str(args.model_dir), cache, max_tokens=args.max_tokens,
                                variant=args.precision, device=device)
    ref = (torchenc.open_encoder(str(args.model_dir), cache, max_tokens=args.max_tokens, variant="fp32",
                                 device=device, graphs=False) if device.type == "cuda" else None)
    return enc, ref, str(Path(args.model_dir).resolve())


def sample_ids(batch: int, tokens: int, vocab: int, seed: int) -> list[list[int]]:
    """Token id lists: batch 1 is exactly `tokens` long; larger batches vary in [tokens/2, tokens]."""
    import numpy as np

    rng = np.random.default_rng(seed)
    rows = []
    for row in range(batch):
        n = tokens if row == 0 or batch == 1 else int(rng.integers(tokens // 2, tokens + 1))
        rows.append([101] + rng.integers(1000, vocab, size=max(0, n - 2)).tolist() + [102])
    return rows


def time_ms(fn, reps: int, warmup: int, sync) -> dict:
    """Median/p90/min/mean milliseconds of fn over reps runs, synchronised before and after each."""
    for _ in range(warmup):
        fn()
    sync()
    samples = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        samples.append((time.perf_counter() - start) * 1e3)
    samples.sort()
    p90 = samples[min(len(samples) - 1, int(round(0.9 * (len(samples) - 1))))]
    return {"median_ms": round(statistics.median(samples), 4), "p90_ms": round(p90, 4),
            "min_ms": round(samples[0], 4), "mean_ms": round(statistics.fmean(samples), 4), "reps": reps}


def compare(a, b) -> dict:
    """Max abs difference and min row cosine between two [n, dim] float tensors."""
    import torch

    a, b = a.float(), b.float()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=1)
    return {"max_abs_diff": float((a - b).abs().max()), "min_cosine": float(cos.min())}


def bench_shape(enc, ref, batch: int, tokens: int, args, sync, graphs_ok: bool) -> dict:
    """Eager and graph timings plus output agreement for one (batch, tokens) shape."""
    vocab = enc._model.config.vocab_size
    ids = sample_ids(batch, tokens, vocab, args.seed + batch * 1000 + tokens)
    packed = enc._pack(ids).to(enc.device)
    row = {"batch": batch, "tokens": tokens, "bucket": list(packed.shape[1:]),
           "real_tokens": sum(map(len, ids))}
    enc.graphs = False
    row["eager"] = time_ms(lambda: enc._run(packed), args.reps, args.warmup, sync)
    eager_out = enc._run(packed)[:batch].clone()
    if ref is not None:
        row["vs_fp32_eager"] = compare(eager_out, ref._run(packed.to(ref.device))[:batch])
    row["graph"] = None
    if graphs_ok:
        enc.graphs = True
        try:
            start = time.perf_counter()
            enc.warmup([(batch, tokens)])
            sync()
            row["capture_s"] = round(time.perf_counter() - start, 3)
            row["graph"] = time_ms(lambda: enc._run(packed), args.reps, args.warmup, sync)
            row["graph_vs_eager"] = compare(enc._run(packed)[:batch].clone(), eager_out)
            row["speedup"] = round(row["eager"]["median_ms"] / row["graph"]["median_ms"], 2)
        except Exception as exc:  # record and go on with eager figures: this run may be the only one
            row["graph_error"] = f"{type(exc).__name__}: {exc}"[:2000]
        enc.graphs = False
    row["tokens_per_s_eager"] = round(row["real_tokens"] / row["eager"]["median_ms"] * 1e3)
    if row["graph"]:
        row["tokens_per_s_graph"] = round(row["real_tokens"] / row["graph"]["median_ms"] * 1e3)
    return row


def bench_query(enc, args, sync, graphs_ok: bool) -> dict | None:
    """End-to-end encode([query]) (tokenize, pad, copy, forward, read back), eager and graph."""
    if enc._tokenizer is None:
        return None
    out = {"text_tokens": len(enc._tokenizer.encode(QUERY).ids)}
    for mode in ("eager", "graph") if graphs_ok else ("eager",):
        enc.graphs = mode == "graph"
        out[mode] = time_ms(lambda: enc.encode([QUERY]), args.reps, args.warmup, sync)
    enc.graphs = False
    return out


def render(report: dict) -> None:
    """The table, on stderr."""
    log(f"\n{report['gpu']} | torch {report['torch']} (CUDA {report['cuda']}) | transformers "
        f"{report['transformers']} | {report['precision']} | mask form {report['mask_form']}")
    log(f"{'batch x tokens':>14} {'bucket':>8} {'eager ms p50':>12} {'p90':>7} {'graph ms p50':>12} "
        f"{'p90':>7} {'speedup':>7} {'capture s':>9} {'max |diff|':>10} {'min cos':>9}")
    cell = lambda v, f: format(v, f) if v is not None else "-"  # noqa: E731
    for r in report["results"]:
        g = r.get("graph") or {}
        agree = r.get("graph_vs_eager") or {}
        log(f"{r['batch']:>7} x {r['tokens']:<4} {'x'.join(map(str, r['bucket'])):>8} "
            f"{r['eager']['median_ms']:>12.3f} {r['eager']['p90_ms']:>7.3f} "
            f"{cell(g.get('median_ms'), '.3f'):>12} {cell(g.get('p90_ms'), '.3f'):>7} "
            f"{cell(r.get('speedup'), '.2f'):>7} {cell(r.get('capture_s'), '.2f'):>9} "
            f"{cell(agree.get('max_abs_diff'), '.2e'):>10} {cell(agree.get('min_cosine'), '.6f'):>9}")
        if r.get("graph_error"):
            log(f"           graph failed: {r['graph_error'][:300]}")
        if r.get("vs_fp32_eager"):
            log(f"           {report['precision']} vs fp32 eager: min cosine "
                f"{r['vs_fp32_eager']['min_cosine']:.6f}")
    if report.get("query"):
        q = report["query"]
        graph = f", graph p50 {q['graph']['median_ms']:.3f} ms" if "graph" in q else ""
        log(f"encode([query]) end to end ({q['text_tokens']} tokens): "
            f"eager p50 {q['eager']['median_ms']:.3f} ms{graph}")
    ref = report["reference"]
    log(f"reference ({ref['source']}, {ref['gpu']}, {ref['batch']}x{ref['tokens']}): "
        f"eager {ref['eager_ms']} ms, graph {ref['graph_ms']} ms")
    if report["memory"]:
        log(f"peak GPU memory {report['memory']['max_allocated_mib']} MiB allocated, "
            f"{report['memory']['reserved_mib']} MiB reserved")


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run every shape, print the table and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model-dir", type=Path, help="a sentence-transformers model folder")
    source.add_argument("--random-weights", action="store_true", help="BertModel of MiniLM-L6 shape")
    parser.add_argument("--device", default=None, help="cuda (default when available), cuda:N or cpu")
    parser.add_argument("--precision", default="fp16", choices=["fp16", "bf16", "fp32"],
                        help="on the CPU only fp32 runs; fp16/bf16 fall back to it there")
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help=f"batch x tokens list ({DEFAULT_SHAPES})")
    parser.add_argument("--reps", type=int, default=200, help="timed runs per figure (>= 200 for reports)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs first (20 on GPU, 1 on CPU)")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the JSON here (default: stdout)")
    args = parser.parse_args(argv)

    import torch
    import transformers

    from trtrag_cli.encode import torch as torchenc

    device = torchenc.resolve_device(args.device)
    cuda = device.type == "cuda"
    if not cuda and args.precision != "fp32":
        log(f"note: {args.precision} needs a CUDA GPU; measuring fp32 eager on the CPU")
        args.precision = "fp32"
    if args.warmup is None:
        args.warmup = 20 if cuda else 1
    if cuda and args.reps < 200:
        log(f"note: --reps {args.reps} is below the 200 a reported figure needs")
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)

    enc, ref, model = make_encoders(args, device)
    graphs_ok = enc.graphs
    probe = enc._pack([[101, 7592, 102], [101, 102]]).to(device)
    with torch.inference_mode():
        host_syncs = torchenc._host_syncs(enc._forward_ids, probe[0], probe[1])
    if host_syncs:
        log(f"warning: the forward synchronises with the host ({sorted(set(host_syncs))}); capture will fail")
    log(f"{enc.name} on {device}: mask form {enc._mask_form}, graphs {'on' if graphs_ok else 'off'}")

    results = []
    for batch, tokens in parse_shapes(args.shapes):
        log(f"measuring {batch}x{tokens} ...")
        results.append(bench_shape(enc, ref, batch, tokens, args, sync, graphs_ok))
        if results[-1].get("graph_error"):
            graphs_ok = False  # a failed capture may leave the context unusable for more captures
    report = {
        "benchmark": "gpu_encoder",
        "model": model,
        "encoder": enc.name,
        "precision": args.precision,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine(),
        "capability": ".".join(map(str, torch.cuda.get_device_capability(device))) if cuda else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "mask_form": enc._mask_form,
        "host_syncs_in_forward": host_syncs,
        "graphs": graphs_ok,
        "captured": [list(b) for b in enc.captured],
        "reps": args.reps,
        "warmup": args.warmup,
        "reference": REFERENCE,
        "results": results,
        "query": bench_query(enc, args, sync, graphs_ok),
        "memory": ({"max_allocated_mib": round(torch.cuda.max_memory_allocated(device) / 2**20),
                    "reserved_mib": round(torch.cuda.memory_reserved(device) / 2**20)} if cuda else {}),
    }
    enc.close()
    if ref is not None:
        ref.close()
    render(report)
    text = json.dumps(report, indent=2) + "\n"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
        log(f"wrote {args.out}")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
