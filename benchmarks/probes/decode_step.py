"""Probe: the batch-1 decode step on one card, variants side by side (taking turns, so that the card's clock
affects them alike), Llama-2-13B shape with random bf16 weights after a 1024-token prompt:
  - ms per step of the captured step replayed 64 times (the bare loop), per variant;
  - decode tok/s through generate() as bench_generation measures it (a 128-token generate minus a one-token
    one), and inside one request (from the first token's arrival to the end), per variant;
  - whether every variant decodes the same greedy tokens as the first;
  - a kernel timeline of one step (how much each kind of kernel extends the step) and of one generate()
    (idle gaps between kernels: host syncs, graph boundaries).
Variants (VARIANTS below, --variants picks them) set decode_kernels.ATTENTION entries, GraphDecoder.fused_greedy
and .deterministic, and whether the matrix tiles are gpu_kernels.py's best (--tiles) rather than decode_kernels.TILES.
Run 19 compared an L2 prefetch of each attention program's run before its wait (and 1 or 3 programs per SM,
blocks of 32) with the plain kernel; run 20 the greedy token taken in the head kernel, and register caps;
run 28 answer.generator.deterministic (down without K splits); runs 32 and 35 a second weight tile or cache block loaded
before the PDL wait, runs 34 and 36 the step's kernels waiting for each other through counters of finished
programs rather than PDL's grid wait (kernel changes that were not kept: docs/benchmarks.md, "Tried and dropped").
Every variant sets GraphDecoder.deterministic itself (plain: False, as in the recorded runs).
Usage: OUT=dir PYTHONPATH=$PWD python benchmarks/probes/decode_step.py --tokenizer DIR [--tiles F]
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, ".")
sys.path.insert(0, "benchmarks")
from gpu_generation import random_llama_13b, step_loop_ms  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from trtrag_cli.generate.decode import kernels as dk
from trtrag_cli.generate.hf import TransformersBackend

VARIANTS = {"plain": {}, "argmax_after": {"fused_greedy": False}, "ordered": {"deterministic": True},
            "tuned": {"tiles": True}, "tuned_argmax_after": {"tiles": True, "fused_greedy": False}}
GREEDY = (0.0, 0, 1.0)
PROMPT = list(range(100, 1124))
NEW = 128


def clock() -> int | None:
    try:
        return torch.cuda.clock_rate()
    except Exception:  # noqa: BLE001 - pynvml missing
        return None


def kernels_of(fn) -> list[tuple[str, float, float]]:
    """(name, start us, end us) of the CUDA kernels fn runs, in start order."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    found = []
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and "emcpy" not in e.name and "emset" not in e.name:
            found.append((e.name, e.time_range.start, e.time_range.end))
    return sorted(found, key=lambda k: k[1])


def label(names: list[str]) -> list[str]:
    """Kernel names with the matrix kernels named by their place in the step."""
    out, matvecs = [], 0
    for name in names:
        if "_matvec_kernel" in name:
            out.append("head" if matvecs == 160 else ("qkv", "o", "gate_up", "down")[matvecs % 4])
            matvecs += 1
        else:
            out.append(name[:60])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--tiles", help="gpu_kernels.py's JSON, for the variants with tiles")
    ap.add_argument("--variants", default="plain,argmax_after,ordered,tuned,tuned_argmax_after",
                    help="which of VARIANTS, comma-separated (the first is the reference)")
    args = ap.parse_args()
    chosen = args.variants.split(",")
    for name in [name for name in VARIANTS if name not in chosen]:
        del VARIANTS[name]
    tuned = dict(dk.TILES)
    if args.tiles:
        for shape, tile in json.loads(open(args.tiles).read())["best_tiles"].items():
            tuned[tuple(int(v) for v in shape.split("x"))] = tuple(int(v) for v in tile.split("x"))
    else:
        for name in [name for name, setting in VARIANTS.items() if setting.get("tiles")]:
            del VARIANTS[name]
    out_dir = os.environ.get("OUT", ".")
    model = random_llama_13b()
    model.generation_config.eos_token_id = None
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    backend = TransformersBackend.from_model(model, tok, decode="graph", compile=True)
    dec = backend.decoder
    default, tiles = dict(dk.ATTENTION), dict(dk.TILES)
    report = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "default": default,
              "variants": VARIANTS, "tiles": {str(k): v for k, v in tiles.items()},
              "tuned_tiles": {str(k): v for k, v in tuned.items()}}
    graphs, tokens = {}, {}
    started = time.perf_counter()
    with torch.inference_mode():
        dec.generate([PROMPT], NEW, GREEDY)            # compiles the prefill and captures the default graph
        for name, setting in VARIANTS.items():
            dk.ATTENTION.clear()
            dk.ATTENTION.update(default, **{k: v for k, v in setting.items() if k in default})
            dk.TILES.clear()
            dk.TILES.update(tuned if setting.get("tiles") else tiles)
            dec.fused_greedy = setting.get("fused_greedy", True)
            dec.deterministic = setting.get("deterministic", False)
            dec._graphs = {}
            dec.tokens[:1].fill_(1000)
            dec.positions[:1].fill_(1024)
            graph = dec._graph(1, 1280, GREEDY)
            graphs[name] = dec._graphs
            passes = []
            for _ in range(2):                         # the same 48 steps twice: do they repeat?
                dec.tokens[:1].fill_(1000)
                dec.positions[:1].fill_(1024)
                seen = []
                for _ in range(48):
                    graph.replay()
                    seen.append(int(dec.tokens[0]))
                passes.append(seen)
            tokens[name] = passes
        dk.ATTENTION.clear()
        dk.ATTENTION.update(default)
        dk.TILES.clear()
        dk.TILES.update(tiles)
        dec.fused_greedy, dec.deterministic = True, False
        report["setup_s"] = round(time.perf_counter() - started, 1)
        report["same_tokens"] = {name: passes[0] == tokens[chosen[0]][0] for name, passes in tokens.items()}
        report["repeats"] = {name: passes[0] == passes[1] for name, passes in tokens.items()}

        def request(name: str, new: int) -> tuple[float, float]:
            """Seconds of one generate() and seconds from its first token's arrival to its end."""
            dec._graphs = graphs[name]
            arrived = []
            begin = time.perf_counter()
            dec.generate([PROMPT], new, GREEDY, on_tokens=lambda ids: arrived.append(time.perf_counter()))
            end = time.perf_counter()
            return end - begin, end - arrived[0]

        step_ms = {name: [] for name in VARIANTS}
        totals = {name: [] for name in VARIANTS}
        firsts = {name: [] for name in VARIANTS}
        inside = {name: [] for name in VARIANTS}
        clocks = []
        for _ in range(args.rounds):
            for name in VARIANTS:
                step_ms[name].append(round(step_loop_ms(dec, graphs[name][1, 1280, GREEDY]), 4))
                total, after_first = request(name, NEW)
                totals[name].append(total)
                inside[name].append(after_first)
                firsts[name].append(request(name, 1)[0])
            clocks.append(clock())
        med = statistics.median
        report["rounds"] = args.rounds
        report["loop_ms_per_step"] = {k: round(med(v), 4) for k, v in step_ms.items()}
        report["loop_tok_s"] = {k: round(1e3 / med(v), 1) for k, v in step_ms.items()}
        report["loop_rounds_ms"] = step_ms
        report["bench_tok_s"] = {k: round((NEW - 1) / (med(totals[k]) - med(firsts[k])), 1) for k in VARIANTS}
        report["in_request_tok_s"] = {k: round((NEW - 1) / med(v), 1) for k, v in inside.items()}
        report["ttft_ms"] = {k: round(med(v) * 1e3, 2) for k, v in firsts.items()}
        report["sm_clock_mhz_after_rounds"] = clocks
        print(json.dumps(report, indent=1), flush=True)

        # Timelines: one step of each variant and one generate() of 32 tokens (the first variant).
        report["step_timeline"] = {}
        for name in reversed(list(VARIANTS)):   # ending on the first, for the generate() timeline
            dec._graphs = graphs[name]
            graph = graphs[name][1, 1280, GREEDY]
            dec.positions[:1].fill_(1024)
            graph.replay()
            extends: dict = {}
            spans = []
            for _ in range(3):
                dec.positions[:1].fill_(1024)
                torch.cuda.synchronize()
                found = kernels_of(graph.replay)
                names = label([k[0] for k in found])
                spans.append(found[-1][2] - found[0][1])
                for i in range(1, len(found)):
                    extends.setdefault(names[i], []).append(found[i][2] - found[i - 1][2])
            report["step_timeline"][name] = {
                "kernels": len(found), "span_us": [round(s, 1) for s in spans],
                "extends_us": {k: {"count_per_step": len(v) // 3, "median": round(med(v), 2),
                                   "total_per_step": round(sum(v) / 3, 1)} for k, v in extends.items()}}
        found = kernels_of(lambda: dec.generate([PROMPT], 32, GREEDY))
        gaps, reached = [], found[0][2]
        for name, start, end in found[1:]:
            gaps.append((start - reached, name[:50]))
            reached = max(reached, end)
        gaps.sort(reverse=True)
        report["generate_timeline"] = {
            "kernels": len(found), "span_ms": round((found[-1][2] - found[0][1]) / 1e3, 3),
            "idle_ms": round(sum(g for g, _ in gaps if g > 0) / 1e3, 3),
            "largest_gaps_us": [[round(g, 1), n] for g, n in gaps[:20]]}
    print(json.dumps({k: report[k] for k in ("step_timeline", "generate_timeline")}, indent=1), flush=True)
    with open(f"{out_dir}/decode-step.json", "w") as f:
        f.write(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
