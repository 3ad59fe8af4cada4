"""`trtrag build-engine --generator`: what the recipe's generator needs before it serves.

  transformers   load the model and run the prompt lengths once (with answer.generator.compile, this is where
                 torch.compile traces and captures; the compiled code is cached by torch on disk, the
                 captured graphs are not: `serve` warms up again in its own process)
  tensorrt-llm   load the checkpoint through the LLM API (a ModelOpt-quantized checkpoint is loaded as it
                 is) and generate once; report the `trtllm-serve` command that runs it as a separate node
  openai         ask every node for its model list: which answer, which do not
"""

from __future__ import annotations

import time

from trtrag_cli.generate.base import SamplingParams
from trtrag_cli.generate.prompt import Prompt
from trtrag_cli.generate.registry import model_context, open_backend
from trtrag_cli.util.errors import TrtragError

WARM_LENGTHS = (128, 512)


def build_generator(recipe) -> dict:
    """Prepare the generator; a report of what was done and measured."""
    gen = recipe.answer.generator
    if gen.backend == "openai":
        return _check_nodes(gen)
    started = time.perf_counter()
    backend = open_backend(gen)
    report = {"generator": gen.backend, "model": gen.model, "load_s": round(time.perf_counter() - started, 2)}
    try:
        context = model_context(backend, gen)
        warm = []
        for length in WARM_LENGTHS:
            n = min(length, context - 16)
            ids = (backend.tokenizer("warm up " * length, add_special_tokens=False)["input_ids"] * 2)[:n]
            t = time.perf_counter()
            out = backend.generate([Prompt("", ids, [])], SamplingParams(max_new_tokens=8))[0]
            warm.append({"prompt_tokens": len(ids), "output_tokens": out.output_tokens,
                         "seconds": round(time.perf_counter() - t, 3)})
        report.update(context=context, warm_up=warm)
        for key in ("device", "static_cache", "compiled"):
            if hasattr(backend, key):
                report[key] = str(getattr(backend, key))
        if gen.backend == "transformers":
            decoder = backend.decoder
            report["decode"] = ("transformers generate" if decoder is None else
                                "graph, Triton kernels" if decoder.kernels is not None else "graph, torch layers")
        if gen.backend == "tensorrt-llm":
            from trtrag_cli.generate.trtllm import serve_command

            report["serve_command"] = serve_command(gen.model, tensor_parallel=gen.tensor_parallel,
                                                    gpu_memory_fraction=gen.gpu_memory_fraction)
    finally:
        backend.close()
    return report


def _check_nodes(gen) -> dict:
    from trtrag_cli.util import deps

    openai = deps.require("openai", "the openai generator")
    nodes = []
    for url in gen.base_urls:
        client = openai.OpenAI(base_url=url, api_key="not-needed", timeout=min(gen.timeout_s, 10), max_retries=0)
        try:
            models = [m.id for m in client.models.list().data]
            nodes.append({"url": url, "ok": True, "models": models})
        except (openai.APIConnectionError, openai.APITimeoutError, openai.APIStatusError) as exc:
            nodes.append({"url": url, "ok": False, "error": type(exc).__name__})
    if not any(n["ok"] for n in nodes):
        raise TrtragError("no generation node answered: " + ", ".join(f"{n['url']} ({n['error']})" for n in nodes),
                          "start a node (trtrag serve --generate-only, trtllm-serve, vLLM) at answer.generator.base_urls")
    return {"generator": "openai", "nodes": nodes}
