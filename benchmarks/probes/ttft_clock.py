"""Probe: where TTFT(1024) goes on one card. The compiled prefill (kernels variant's), 1024 tokens:
back to back against spaced (0.5 s idle before each), with CUDA-event GPU time and the SM clock after each;
the kernel trace's busy time and first-to-last span; our generate() of one token; cuBLAS as is against
PyTorch's TunableOp (cuBLAS/cuBLASLt algorithms timed per GEMM shape), taking turns. TunableOp writes its
choices to the file set_filename names when the process ends.
Usage: OUT=dir PYTHONPATH=$PWD python benchmarks/probes/ttft_clock.py (run 14)
"""
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, ".")
sys.path.insert(0, "benchmarks")
from gpu_generation import random_llama_13b

from trtrag_cli.generate.decode.graph import GraphDecoder

OUT = os.environ.get("OUT", ".")
model = random_llama_13b()
dec = GraphDecoder(model, compile=True)
ids = list(range(100, 1124))
report = {"gpu": torch.cuda.get_device_name(0)}

def one(fn):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    s = time.perf_counter()
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - s) * 1e3
    return round(wall, 2), round(start.elapsed_time(end), 2), torch.cuda.clock_rate()

def series(fn, n, pause=0.0):
    rows = []
    for _ in range(n):
        if pause:
            time.sleep(pause)
        rows.append(one(fn))
    return {"wall_ms": statistics.median(r[0] for r in rows), "gpu_ms": statistics.median(r[1] for r in rows),
            "rows": rows}

with torch.inference_mode():
    dec._ensure_cache(1, 2100)
    t = time.perf_counter()
    for n in (512, 2048, 1024, 1024):
        dec.prefill(list(range(100, 100 + n)), 0)
    torch.cuda.synchronize()
    report["warmup_s"] = round(time.perf_counter() - t, 1)
    def prefill():
        return dec.prefill(ids, 0)
    report["back_to_back"] = series(prefill, 10)
    report["spaced_0.5s"] = series(prefill, 6, 0.5)
    report["back_to_back_again"] = series(prefill, 10)
    dec.generate([ids], 1)
    report["generate_1_token_back_to_back"] = series(lambda: dec.generate([ids], 1), 10)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        prefill()
        torch.cuda.synchronize()
    spans = [(e.time_range.start, e.time_range.end) for e in prof.events()
             if e.device_type == torch.autograd.DeviceType.CUDA]
    report["trace"] = {"busy_ms": round(sum(b - a for a, b in spans) / 1e3, 2),
                       "first_to_last_ms": round((max(b for _, b in spans) - min(a for a, _ in spans)) / 1e3, 2),
                       "ops": len(spans)}
    print(json.dumps({k: v for k, v in report.items()}, indent=0)[:3000], flush=True)
    try:
        tunable = torch.cuda.tunable
        tunable.set_filename(f"{OUT}/tunableop_results.csv")
        tunable.enable(True)
        tunable.tuning_enable(True)
        tunable.set_max_tuning_iterations(20)
        t = time.perf_counter()
        prefill()
        prefill()
        torch.cuda.synchronize()
        report["tunable_tuning_s"] = round(time.perf_counter() - t, 1)
        tunable.tuning_enable(False)
        rows = {"cublas": [], "tunable": []}
        for _ in range(8):
            for label in rows:
                tunable.enable(label == "tunable")
                rows[label].append(one(prefill))
        report["tunable_vs_cublas"] = {k: {"wall_ms": statistics.median(r[0] for r in v),
                                           "gpu_ms": statistics.median(r[1] for r in v), "rows": v}
                                       for k, v in rows.items()}
        tunable.enable(True)
        a = prefill()
        tunable.enable(False)
        b = prefill()
        report["tunable_logits_max_diff"] = (a.float() - b.float()).abs().max().item()
    except Exception as exc:
        report["tunable_error"] = repr(exc)[:500]
print(json.dumps(report, indent=1))
open(f"{OUT}/probe-ttft3.json", "w").write(json.dumps(report, indent=1) + "\n")
