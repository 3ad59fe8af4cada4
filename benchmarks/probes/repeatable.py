"""Probe: does greedy generation on the GPU repeat bit for bit? Llama-2-13B shape, random bf16 weights (nearly
level logits, so the smallest difference changes a token), a 1024-token prompt: the prefill's logits five
times, and 64 new tokens three times, with answer.generator.deterministic on and off.
Usage: OUT=dir PYTHONPATH=$PWD python benchmarks/probes/repeatable.py (run 29)
"""
import json
import os
import sys

import torch

sys.path.insert(0, ".")
sys.path.insert(0, "benchmarks")
from gpu_generation import random_llama_13b  # noqa: E402

from trtrag_cli.generate.decode.graph import GraphDecoder

PROMPT = list(range(100, 1124))
model = random_llama_13b()
dec = GraphDecoder(model, compile=True, deterministic=True)
report = {"gpu": torch.cuda.get_device_name(0)}
with torch.inference_mode():
    dec._ensure_cache(1, len(PROMPT) + 64)
    logits = [dec.prefill(PROMPT, 0).clone() for _ in range(5)]
    report["prefill_logits_repeat"] = all(torch.equal(logits[0], other) for other in logits)
    for deterministic in (True, False):
        dec.deterministic = deterministic
        dec._graphs = {}                       # the step is captured again with the other kernels
        runs = [dec.generate([PROMPT], 64) for _ in range(3)]
        report[f"tokens_repeat_deterministic_{deterministic}"] = all(run == runs[0] for run in runs)
        report[f"first_difference_deterministic_{deterministic}"] = [
            next((i for i, (a, b) in enumerate(zip(runs[0][0], run[0])) if a != b), None) for run in runs[1:]]
print(json.dumps(report, indent=1))
with open(os.path.join(os.environ.get("OUT", "."), "repeatable.json"), "w") as f:
    f.write(json.dumps(report, indent=1) + "\n")
