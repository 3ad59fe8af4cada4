"""Generation speed of the transformers backend on a GPU: Llama-2-13B shape, random bf16 weights.

Speed does not depend on weight values, so the model is built on the GPU with random weights (the
baseline script does the same). Prints and writes JSON: TTFT (prefill and the first token, through the
backend's generate with one new token) at 512/1024/2048 prompt tokens, and decode tokens/s at batch 1
and 8 (128 new tokens after a 1024-token prompt, minus that prompt's TTFT), with and without the static
KV cache. Run it in the same device call as ../shared/device/baselines/llm_baseline.py.

Usage: python benchmarks/gpu_generation.py --tokenizer DIR [--layers 40] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", required=True, help="a folder with tokenizer.json (ids are random anyway)")
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--out", type=Path, default=Path("gpu-generation.json"))
    args = ap.parse_args()

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from trtrag_cli.generators.base import SamplingParams
    from trtrag_cli.generators.hf import TransformersBackend
    from trtrag_cli.generators.prompt import Prompt

    cfg = LlamaConfig(hidden_size=5120, intermediate_size=13824, num_hidden_layers=args.layers,
                      num_attention_heads=40, num_key_value_heads=40, vocab_size=32000, max_position_embeddings=4096)
    with torch.device("cuda"):
        torch.set_default_dtype(torch.bfloat16)
        model = LlamaForCausalLM(cfg).eval()
    torch.set_default_dtype(torch.float32)
    model.generation_config.eos_token_id = None  # random weights: always generate the full 128 tokens
    params = sum(p.numel() for p in model.parameters())
    report = {"gpu": torch.cuda.get_device_name(0), "params_b": round(params / 1e9, 2), "torch": torch.__version__}
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    gen = torch.Generator().manual_seed(0)

    def prompt(n: int) -> Prompt:
        return Prompt("", torch.randint(1000, 20000, (n,), generator=gen).tolist(), [])

    def timed(fn, reps: int) -> float:
        fn()
        samples = []
        for _ in range(reps):
            torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            samples.append(time.perf_counter() - t)
        return statistics.median(samples)

    for static in (False, True):
        backend = TransformersBackend.from_model(model, tok, static_cache=static)
        label = "static_cache" if static else "dynamic_cache"
        one = SamplingParams(max_new_tokens=1)
        ttft = {}
        for n in (512, 1024, 2048):
            p = prompt(n)
            ttft[n] = timed(lambda: backend.generate([p], one), 3 if static else 5) * 1e3
            print(f"{label} TTFT prompt={n}: {ttft[n]:.1f} ms", flush=True)
        decode = {}
        new = SamplingParams(max_new_tokens=128)
        for batch in (1, 8):
            ps = [prompt(1024) for _ in range(batch)]
            total = timed(lambda: backend.generate(ps, new), 2)
            first = timed(lambda: backend.generate(ps, one), 2)
            decode[batch] = batch * 127 / (total - first)
            print(f"{label} decode batch={batch}: {decode[batch]:.1f} tok/s ({total:.2f} s for 128 tokens)", flush=True)
        report[label] = {"ttft_ms": {str(k): round(v, 1) for k, v in ttft.items()},
                         "decode_tok_s": {str(k): round(v, 1) for k, v in decode.items()}}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
