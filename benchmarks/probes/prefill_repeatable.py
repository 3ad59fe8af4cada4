"""Probe: which part of the prefill is not bitwise repeatable on the GPU (run 29 found its logits differ from run
to run). Llama-2-13B shape, random bf16, a 1024-token prompt, five prefills per setting: the last hidden state
and the logits compared bit for bit, with the layers compiled or eager and attention through cuDNN's SDPA or
the flash backend.
Usage: OUT=dir PYTHONPATH=$PWD python benchmarks/probes/prefill_repeatable.py (run 30)
"""
import json
import os
import sys

import torch

sys.path.insert(0, ".")
sys.path.insert(0, "benchmarks")
from gpu_generation import random_llama_13b  # noqa: E402

from trtrag_cli.generate.decode.graph import GraphDecoder

F = torch.nn.functional
PROMPT = list(range(100, 1124))
model = random_llama_13b()
report = {"gpu": torch.cuda.get_device_name(0)}


def hidden_and_logits(dec):
    """GraphDecoder.prefill, keeping the last layer's output as well as the logits."""
    n = len(PROMPT)
    cos, sin = (t[:n, None, :] for t in dec._rope_tables())
    h = F.embedding(torch.tensor(PROMPT, device="cuda"), dec.embed)
    final = len(dec.layers) - 1
    for index, (layer, (k_cache, v_cache)) in enumerate(zip(dec.layers, dec._cache)):
        h = dec._prefill(h, cos, sin, k_cache[0], v_cache[0], *dec._weights(layer), last=index == final)
    return h.clone(), F.linear(dec._norm(h, dec.final_norm), dec.head)[0].clone()


with torch.inference_mode():
    for compile in (True, False):
        dec = GraphDecoder(model, compile=compile)
        dec._ensure_cache(1, len(PROMPT))
        for cudnn in (True, False):
            torch.backends.cuda.enable_cudnn_sdp(cudnn)
            runs = [hidden_and_logits(dec) for _ in range(5)]
            label = f"{'compiled' if compile else 'eager'}_{'cudnn' if cudnn else 'flash'}"
            report[label] = {"hidden_repeats": all(torch.equal(runs[0][0], r[0]) for r in runs),
                             "logits_repeat": all(torch.equal(runs[0][1], r[1]) for r in runs),
                             "max_logit_diff": max((runs[0][1].float() - r[1].float()).abs().max().item()
                                                   for r in runs)}
        torch.backends.cuda.enable_cudnn_sdp(True)
        dec.close()
    h = torch.randn(1, 5120, device="cuda", dtype=torch.bfloat16)   # the head alone
    heads = [F.linear(h, model.lm_head.weight) for _ in range(5)]
    report["head_linear_repeats"] = all(torch.equal(heads[0], x) for x in heads)
print(json.dumps(report, indent=1))
with open(os.path.join(os.environ.get("OUT", "."), "prefill-repeatable.json"), "w") as f:
    f.write(json.dumps(report, indent=1) + "\n")
