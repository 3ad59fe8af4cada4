"""Generation speed of the transformers backend on a GPU: Llama-2-13B shape, random bf16 weights.

Speed does not depend on weight values, so the model is built on the GPU with random weights (the
baseline script does the same). Prints and writes JSON: TTFT (prefill and the first token, through the
backend's generate with one new token) at 512/1024/2048 prompt tokens, and decode tokens/s at batch 1
and 8 (128 new tokens after a 1024-token prompt, minus that prompt's TTFT), with and without the static
KV cache (trtrag_cli/bench.py bench_generation, which `trtrag bench --generate` runs on the recipe's
generator). Run it in the same device call as ../shared/device/baselines/llm_baseline.py.

Usage: python benchmarks/gpu_generation.py --tokenizer DIR [--layers 40] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", required=True, help="a folder with tokenizer.json (ids are random anyway)")
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--out", type=Path, default=Path("gpu-generation.json"))
    ap.add_argument("--caches", default="dynamic,static", help="which KV caches to time")
    args = ap.parse_args()

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from trtrag_cli.bench import bench_generation
    from trtrag_cli.generators.hf import TransformersBackend

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
    for static in [c == "static" for c in args.caches.split(",")]:
        label = "static_cache" if static else "dynamic_cache"
        backend = TransformersBackend.from_model(model, tok, static_cache=static)
        report[label] = bench_generation(backend, (512, 1024, 2048), (1, 8), 128, reps=3 if static else 5,
                                         log=lambda m, label=label: print(f"{label} {m}", flush=True))
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
