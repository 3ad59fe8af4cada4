"""Generation speed of the transformers backend on a GPU: Llama-2-13B shape, random bf16 weights.

Speed does not depend on weight values, so the model is built on the GPU with random weights (the
baseline script does the same). Prints and writes JSON: TTFT (prefill and the first token, through the
backend's generate with one new token) at 512/1024/2048 prompt tokens, and decode tokens/s at batch 1
and 8 (128 new tokens after a 1024-token prompt, minus that prompt's TTFT), per variant
(trtrag_cli/bench/run.py bench_generation, which `trtrag bench --generate` runs on the recipe's generator):
  kernels         our decode loop (generate/decode/graph.py), CUDA graphs, its Triton decode kernels
                  (generate/decode/kernels.py) over 12-bit packed matrices (answer.generator.pack_weights: true) and
                  the compiled prefill
  kernels_unpacked  the same reading the bf16 matrices themselves (answer.generator.pack_weights: false)
  graph           our decode loop with torch layer functions, eager (answer.generator.compile: false, kernels: false)
  graph_compiled  the same with its layer functions compiled (answer.generator.compile: true, kernels: false)
  static          transformers' generate with its static cache (answer.generator.decode: transformers)
  dynamic         transformers' generate with its default dynamic cache
Both kernel variants set answer.generator.deterministic: false, as every recorded run did (true costs
~0.2% a step).
Run it in the same device call as ../shared/device/baselines/llm_baseline.py.

Usage: python benchmarks/gpu_generation.py --tokenizer DIR [--layers 40] [--variants graph,static] [--out F]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _kernels(prof, top_n: int = 12) -> dict:
    """CUDA kernels of a profile: how many, their GPU time, and the top ones by time."""
    import torch

    kernels: dict = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            entry = kernels.setdefault(event.name[:90], [0, 0.0])
            entry[0] += 1
            entry[1] += event.device_time_total / 1e3
    top = sorted(kernels.items(), key=lambda kv: -kv[1][1])[:top_n]
    return {"kernels": sum(v[0] for v in kernels.values()),
            "kernel_ms": round(sum(v[1] for v in kernels.values()), 3),
            "top": [{"name": k, "count": v[0], "ms": round(v[1], 3)} for k, v in top]}


def profile_step(model, tok, setting: dict) -> dict:
    """Kernels of our prefill (1024 tokens) and of one decode step after it (batch 1, not in a graph), and the
    prefill's wall time (median of 5)."""
    import torch

    from trtrag_cli.generate.hf import TransformersBackend

    backend = TransformersBackend.from_model(model, tok, **setting)
    dec = backend.decoder
    dec._ensure_cache(1, 1152)
    greedy = (0.0, 0, 1.0)
    out = {}
    with torch.inference_mode():
        for _ in range(2):
            dec.tokens[:1].copy_(dec._sample(dec.prefill(list(range(100, 1124)), 0)[None], 0, True, None))
        dec.positions[:1].fill_(1024)
        for _ in range(3):
            dec._advance(1, 1280, greedy)
        torch.cuda.synchronize()
        walls, queued = [], []
        for _ in range(5):   # the prefill alone: host to host, and until the host has queued it all
            started = time.perf_counter()
            dec.prefill(list(range(100, 1124)), 0)
            queued.append((time.perf_counter() - started) * 1e3)
            torch.cuda.synchronize()
            walls.append((time.perf_counter() - started) * 1e3)
        out["prefill_1024_wall_ms"] = round(sorted(walls)[2], 3)
        out["prefill_1024_queued_ms"] = round(sorted(queued)[2], 3)
        activities = [torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            dec.prefill(list(range(100, 1124)), 0)
            torch.cuda.synchronize()
        out["prefill_1024"] = _kernels(prof)
        with torch.profiler.profile(activities=activities) as prof:
            dec._advance(1, 1280, greedy)
            torch.cuda.synchronize()
        out["decode_step"] = _kernels(prof, 20)
    print(json.dumps(out, indent=1), flush=True)
    backend.close()
    return out


def random_llama_13b(layers: int = 40):
    """The Llama-2-13B shape with random bf16 weights, built on the GPU (speed does not depend on the values);
    the default dtype is left at float32."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=5120, intermediate_size=13824, num_hidden_layers=layers, num_attention_heads=40,
                      num_key_value_heads=40, vocab_size=32000, max_position_embeddings=4096)
    with torch.device("cuda"):
        torch.set_default_dtype(torch.bfloat16)
        model = LlamaForCausalLM(cfg).eval()
    torch.set_default_dtype(torch.float32)
    return model


def step_loop_ms(dec, graph, steps: int = 64, position: int = 1024) -> float:
    """ms per step of a decoder's captured one-row step replayed `steps` times from `position` (the probes'
    bare step loop: no host checks between steps)."""
    import torch

    dec.tokens[:1].fill_(1000)
    dec.positions[:1].fill_(position)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / steps


def step_rounds(dec, owner, attribute: str, variants: dict, save_as: str, rounds: int = 7, layers: int = 40,
                steps: int = 64, watch: bool = False) -> dict:
    """The probes' side-by-side comparison after a 1024-token prompt: ms per step of each variant's captured
    one-row greedy step replayed `steps` times, taking turns `rounds` times (so that the card's clock affects
    them alike). A variant is a value of owner.attribute (a kernel of decode_kernels, the decoder's kernels
    module), set while its step is captured and restored after; the first is the reference. watch: the GPU's
    clock and power during each variant's replays too (doctor.GpuWatch), and joules a step from them. The
    report (medians, tok/s, µs a layer saved against the reference, every round) is printed, written to
    $OUT/save_as and returned."""
    import os
    import statistics

    import torch

    from trtrag_cli.generate.decode.graph import _rounded
    from trtrag_cli.util.gpu import GpuWatch

    greedy = (0.0, 0, 1.0)
    graphs = {}
    with torch.inference_mode():
        # room for every position the replays reach (1024 + steps): the kernels' attention writes each step's
        # K/V at its position whatever the cache's length (runs 42-47 replayed 500 steps in 1280 positions and
        # wrote rows past each head's end; their timings stand, but run 48 crashed on it once the packed
        # matrices were allocated after the cache)
        span = max(1280, _rounded(1024 + steps))
        dec._ensure_cache(1, span)
        dec.prefill(list(range(100, 1124)), 0)
        original = getattr(owner, attribute)
        try:
            for name, value in variants.items():
                setattr(owner, attribute, value)
                dec._graphs = {}
                dec.tokens[:1].fill_(1000)
                dec.positions[:1].fill_(1024)
                graphs[name] = dec._graph(1, span, greedy)
        finally:
            setattr(owner, attribute, original)
        timed: dict[str, list[float]] = {name: [] for name in variants}
        seen: dict[str, list[dict]] = {name: [] for name in variants}
        for _ in range(rounds):
            for name, graph in graphs.items():
                with GpuWatch(every_ms=100) if watch else contextlib.nullcontext() as gpu:
                    timed[name].append(round(step_loop_ms(dec, graph, steps), 4))
                if watch:
                    seen[name].append(gpu.summary())
    medians = {name: statistics.median(v) for name, v in timed.items()}
    reference = medians[next(iter(variants))]
    report = {"gpu": torch.cuda.get_device_name(0), "steps_a_round": steps, "ms_per_step": medians,
              "tok_s": {name: round(1e3 / m, 1) for name, m in medians.items()},
              "us_per_layer_saved": {name: round((reference - m) * 1e3 / layers, 2) for name, m in medians.items()},
              "rounds_ms": timed}
    if watch:
        power = {name: statistics.median(r["power_w"]["median"] for r in rounds_seen if r)
                 for name, rounds_seen in seen.items() if any(rounds_seen)}
        report["median_power_w"] = power
        report["joules_per_step"] = {name: round(w * medians[name] / 1e3, 3) for name, w in power.items()}
        report["gpu_during"] = seen
    print(json.dumps(report, indent=1))
    Path(os.environ.get("OUT", "."), save_as).write_text(json.dumps(report, indent=1) + "\n")
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", required=True, help="a folder with tokenizer.json (ids are random anyway)")
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--out", type=Path, default=Path("gpu-generation.json"))
    ap.add_argument("--profile", default="", help="graph,graph_compiled,kernels: kernel times of the prefill and "
                    "of one decode step (batch 1) for these variants")
    ap.add_argument("--variants", default="kernels,graph_compiled,static", help="which decode paths to time")
    ap.add_argument("--tiles", type=Path, help="gpu_kernels.py's JSON: use its best matvec tile per shape and "
                    "its best attention programs per SM, block and warps")
    args = ap.parse_args()

    import torch
    from transformers import AutoTokenizer

    from trtrag_cli.bench.run import bench_generation
    from trtrag_cli.generate.hf import TransformersBackend

    model = random_llama_13b(args.layers)
    model.generation_config.eos_token_id = None  # random weights: always generate the full 128 tokens
    params = sum(p.numel() for p in model.parameters())
    report = {"gpu": torch.cuda.get_device_name(0), "params_b": round(params / 1e9, 2), "torch": torch.__version__}
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    if args.tiles:
        from trtrag_cli.generate.decode import kernels as decode_kernels

        tuned = json.loads(args.tiles.read_text())
        for shape, tile in tuned["best_tiles"].items():
            decode_kernels.TILES[tuple(int(v) for v in shape.split("x"))] = tuple(int(v) for v in tile.split("x"))
        if "attention" in tuned:
            best = map(int, tuned["attention"]["best"].split("x"))
            decode_kernels.ATTENTION.update(zip(("programs_per_sm", "block", "warps"), best))
        report["tiles"] = {str(k): v for k, v in decode_kernels.TILES.items()}
        report["attention"] = dict(decode_kernels.ATTENTION)
    # the kernel variants name pack_weights and deterministic, so that they measure the same thing whatever
    # the recipe's defaults are (docs/benchmarks.md's figures were taken with these settings)
    settings = {"kernels": {"decode": "graph", "compile": True, "pack_weights": True, "deterministic": False},
                "kernels_unpacked": {"decode": "graph", "compile": True, "pack_weights": False,
                                     "deterministic": False},
                "graph": {"decode": "graph", "kernels": False},
                "graph_compiled": {"decode": "graph", "compile": True, "kernels": False},
                "static": {"decode": "transformers", "static_cache": True},
                "dynamic": {"decode": "transformers", "static_cache": False}}
    for label in args.variants.split(","):
        started = time.perf_counter()
        backend = TransformersBackend.from_model(model, tok, **settings[label])
        report[label] = bench_generation(backend, (512, 1024, 2048), (1, 8), 128, reps=3,
                                         log=lambda m, label=label: print(f"{label} {m}", flush=True))
        report[label]["seconds_with_warmup"] = round(time.perf_counter() - started, 1)
        report[label]["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
        backend.close()
        torch.cuda.reset_peak_memory_stats()
    if args.profile:
        report["profile"] = {label: profile_step(model, tok, settings[label]) for label in args.profile.split(",")}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
