"""Probe: TTFT(1024)'s prefill, side by side on one card: the last layer over every position (before) against
the last layer for the last position only (now), with cuDNN SDPA (default) and with the flash backend; a
kernel trace of the new prefill. Variants take turns so that the card's clock affects them alike.
In run 13 the "flash" decoder reused the layer function already compiled with cuDNN (0.2 s to compile, the
same kernels in its trace), so its figures are cuDNN's too: the flash backend was not measured.
Usage: OUT=dir PYTHONPATH=$PWD python benchmarks/probes/prefill_last_layer.py (run 13)
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
F = torch.nn.functional
model = random_llama_13b()

def every_position(dec, ids, row=0):
    """The prefill as it was: the last layer over every position."""
    n = len(ids)
    cos, sin = (t[:n, None, :] for t in dec._rope_tables())
    h = F.embedding(torch.tensor(ids, device="cuda"), dec.embed)
    for layer, (k, v) in zip(dec.layers, dec._cache):
        h = dec._prefill(h, cos, sin, k[row], v[row], *dec._weights(layer))
    return F.linear(dec._norm(h[-1:], dec.final_norm), dec.head)[0]

ids = list(range(100, 1124))
decoders = {}
report = {"gpu": torch.cuda.get_device_name(0)}
with torch.inference_mode():
    for name, cudnn in (("cudnn", True), ("flash", False)):
        torch.backends.cuda.enable_cudnn_sdp(cudnn)
        started = time.perf_counter()
        dec = GraphDecoder(model, compile=True, kernels=False)
        dec._ensure_cache(1, 2100)
        for n in (512, 2048, 1024, 1024):      # as the benchmark does: dynamic lengths after the second
            x = list(range(100, 100 + n))
            dec.prefill(x, 0)
            if name == "cudnn":
                every_position(dec, x)
        torch.cuda.synchronize()
        report[f"compile_s_{name}"] = round(time.perf_counter() - started, 1)
        decoders[name] = (dec, cudnn)
    variants = {"every_position_cudnn": ("cudnn", every_position), "last_only_cudnn": ("cudnn", None),
                "last_only_flash": ("flash", None)}
    walls = {v: [] for v in variants}
    for _ in range(9):
        for label, (name, fn) in variants.items():
            dec, cudnn = decoders[name]
            torch.backends.cuda.enable_cudnn_sdp(cudnn)
            run = (lambda: fn(dec, ids)) if fn else (lambda: dec.prefill(ids, 0))
            torch.cuda.synchronize()
            s = time.perf_counter()
            run()
            torch.cuda.synchronize()
            walls[label].append((time.perf_counter() - s) * 1e3)
    report["prefill_1024_ms"] = {k: round(statistics.median(v), 2) for k, v in walls.items()}
    report["prefill_1024_ms_all"] = {k: [round(x, 2) for x in v] for k, v in walls.items()}
    torch.backends.cuda.enable_cudnn_sdp(True)
    dec = decoders["cudnn"][0]
    a, b = every_position(dec, ids), dec.prefill(ids, 0)
    torch.backends.cuda.enable_cudnn_sdp(False)
    c = decoders["flash"][0].prefill(ids, 0)
    report["logits_max_diff"] = {"last_only_vs_every": (a.float() - b.float()).abs().max().item(),
                                 "flash_vs_cudnn": (c.float() - b.float()).abs().max().item()}
    for name in ("cudnn", "flash"):
        dec, cudnn = decoders[name]
        torch.backends.cuda.enable_cudnn_sdp(cudnn)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            dec.prefill(ids, 0)
            torch.cuda.synchronize()
        kernels = {}
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                entry = kernels.setdefault(e.name[:100], [0, 0.0])
                entry[0] += 1
                entry[1] += e.device_time_total / 1e3
        top = sorted(kernels.items(), key=lambda kv: -kv[1][1])[:14]
        report[f"trace_{name}"] = {"busy_ms": round(sum(v[1] for v in kernels.values()), 2),
                                   "top": {k: [v[0], round(v[1], 3)] for k, v in top}}
print(json.dumps(report, indent=1))
open(f"{OUT}/probe-prefill2.json", "w").write(json.dumps(report, indent=1) + "\n")
