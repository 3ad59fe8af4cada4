"""`trtrag serve` on one GPU with a 13B-shape generator: 32 streamed chat clients against one, and the same
questions one at a time through transformers' eager `generate`.

The service is the product's own (serve.state.Service + serve.app.make_app on uvicorn, RAG chat over the
recipe's index, hybrid retrieval, our decode loop with continuous batching). Only the generator's weights
differ from a real deployment: a Llama-2-13B-shape model with random bf16 weights built on the GPU (speed
does not depend on the values; ../shared/device/baselines/llm_baseline.py does the same), handed to the
service in place of the backend the recipe would load from disk (26 GB to write and read back otherwise).
Its tokenizer is the small BPE one from tests/conftest.make_tiny_llama (ids fit the 32,000 vocabulary).

Phases, one call, same card:
  1. served, continuous batching (answer.generator.decode: auto): 1 client for --baseline-s, then --clients
     for --duration; requests/s, time to first streamed content and end to end P50/P99, errors;
  2. served, static batches (decode: transformers: requests grouped and run through transformers' generate);
  3. eager baseline: --eager questions, each prompt built by the pipeline, `model.generate` one at a time.

Usage (GPU machine, repository root, deps importable; the index from benchmarks/synth_index.py):
  python benchmarks/gpu_serve_13b.py --set workspace=WS --set encoder.model=ENC --tokenizer TOK \
      --questions Q.jsonl --out OUT.json [--layers 40] [--clients 32] [--duration 60]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def served(recipe, model, tokenizer, decode: str, questions: list[str], clients: int, duration: float,
           baseline_s: float) -> dict:
    """Load the service with the in-memory model as its generator backend and run the load benchmark."""
    import trtrag_cli.generate.registry as registry
    from trtrag_cli.bench.load import run_load
    from trtrag_cli.generate.hf import TransformersBackend
    from trtrag_cli.serve.app import make_app
    from trtrag_cli.serve.run import running
    from trtrag_cli.serve.state import Service

    gen = recipe.answer.generator
    real = registry.open_backend

    def in_memory(cfg, max_batch: int = 16):
        return TransformersBackend.from_model(model, tokenizer, decode=decode, compile=False, kernels=gen.kernels,
                                              pack_weights=gen.pack_weights, max_batch=max_batch)

    registry.open_backend = in_memory
    try:
        service = Service(recipe).preflight().load()
    finally:
        registry.open_backend = real
    app = make_app(service)
    with running(app, service) as url:
        report = run_load(url, ("chat",), clients, duration, questions, baseline_s=baseline_s,
                          model=service.rag_id, timeout_s=300, log=log, stream=True)
    sample = service.pipeline().ask(questions[0])
    report["prompt_tokens_sample"] = (sample.get("generation") or {}).get("prompt_tokens")
    service.close()
    return report


def eager(retrieval_recipe, model, tokenizer, questions: list[str], new_tokens: int) -> dict:
    """Each question's RAG prompt (the pipeline's retrieval, the generator's prompt builder) through
    transformers' eager generate, one at a time. retrieval_recipe: the recipe with the extractive answer."""
    import torch

    from trtrag_cli.generate.prompt import build_prompt
    from trtrag_cli.pipeline import Pipeline

    device = next(model.parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times, lengths = [], []
    with Pipeline(retrieval_recipe) as pipe:
        for q in questions:
            passages = pipe.retrieve(q)["passages"]
            prompt = build_prompt(tokenizer, q, passages, model.config.max_position_embeddings, new_tokens)
            ids = torch.tensor([prompt.ids], device=device)
            sync()
            t = time.perf_counter()
            with torch.inference_mode():
                model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id or 0)
            sync()
            times.append(time.perf_counter() - t)
            lengths.append(ids.shape[1])
    return {"questions": len(questions), "new_tokens": new_tokens, "prompt_tokens_median": statistics.median(lengths),
            "seconds_median": round(statistics.median(times), 3), "req_per_s": round(len(times) / sum(times), 3)}


def main() -> None:
    from transformers import AutoTokenizer

    from gpu_generation import random_llama_13b
    from trtrag_cli.recipe.schema import load_recipe

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--questions", type=Path, required=True)
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--duration", type=float, default=60)
    ap.add_argument("--baseline-s", type=float, default=20)
    ap.add_argument("--eager", type=int, default=6, help="questions for the eager baseline")
    ap.add_argument("--phases", default="continuous,static,eager")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    questions = [json.loads(line)["query"] for line in args.questions.read_text().splitlines() if line.strip()]
    recipe = load_recipe(None, [f"answer.generator.model={args.tokenizer}", "answer.generator.backend=transformers",
                                "serve.access_log=off", *args.sets])
    t = time.perf_counter()
    model = random_llama_13b(args.layers)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    log(f"random {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B-parameter Llama on the GPU in "
        f"{time.perf_counter() - t:.1f} s")
    import torch

    report = {"card": torch.cuda.get_device_name(0), "layers": args.layers, "clients": args.clients,
              "duration_s": args.duration, "new_tokens": recipe.answer.sampling.max_new_tokens, "sets": args.sets}
    phases = args.phases.split(",")
    for phase, decode in (("continuous", "auto"), ("static", "transformers")):
        if phase in phases:
            log(f"served, {phase} batching")
            report[phase] = served(recipe, model, tokenizer, decode, questions, args.clients, args.duration,
                                   args.baseline_s)
            args.out.write_text(json.dumps(report, indent=2))
    if "eager" in phases:
        log("eager transformers generate, one question at a time")
        plain = load_recipe(None, ["serve.access_log=off",
                                   *(x for x in args.sets if not x.startswith("answer.generator."))])
        report["eager"] = eager(plain, model, tokenizer, questions[:args.eager], recipe.answer.sampling.max_new_tokens)
        log(json.dumps(report["eager"]))
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
