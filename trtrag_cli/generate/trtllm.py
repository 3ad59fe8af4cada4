"""Generation with TensorRT-LLM's LLM API (PyTorch backend): a local Hugging Face model folder, no engine build.

The folder is a plain `save_pretrained()` checkpoint or one quantized by ModelOpt and written with
`modelopt.torch.export.export_hf_checkpoint` (safetensors with scaling factors plus an `hf_quant_config.json`);
the LLM API reads the quantization from the checkpoint itself, so nothing here asks for it. Prompts go in as
token ids, exactly as `prompt.build_prompt` fitted them, and a whole batch is one `LLM.generate` call so the
runtime batches it in flight. `serve_command` gives the `trtllm-serve` line that runs the same model as a
separate OpenAI-compatible node for `generate/openai_node.py`. A request the runtime fails (its
`RequestError`, e.g. a prompt over max_num_tokens; CUDA out of memory; a dead executor: all RuntimeErrors)
or refuses (ValueError from its argument checks) is raised as `GenerationError`, so `answer.fallback`
catches it.

Written against these pages (TensorRT-LLM 1.x, PyTorch backend):
- LLM, RequestOutput, SamplingParams: https://nvidia.github.io/TensorRT-LLM/llm-api/reference.html
- KvCacheConfig: https://nvidia.github.io/TensorRT-LLM/llm-api/reference/KvCacheConfig.html
  and https://nvidia.github.io/TensorRT-LLM/examples/kvcacheconfig.html
- CompletionOutput (text, token_ids, finish_reason, text_diff):
  https://nvidia.github.io/TensorRT-LLM/llm-api/reference/CompletionOutput.html
- streaming: https://nvidia.github.io/TensorRT-LLM/examples/llm_inference_async_streaming.html
- greedy and sampling: https://nvidia.github.io/TensorRT-LLM/examples/llm_sampling.html,
  https://nvidia.github.io/TensorRT-LLM/features/sampling.html
- pre-quantized checkpoints: https://nvidia.github.io/TensorRT-LLM/features/quantization.html,
  https://nvidia.github.io/Model-Optimizer/deployment/3_unified_hf.html
- trtllm-serve: https://nvidia.github.io/TensorRT-LLM/commands/trtllm-serve/trtllm-serve.html
"""

from __future__ import annotations

import asyncio
import queue
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from trtrag_cli.generate.base import Generation, SamplingParams, StopFilter, cut_at_stop, generation_errors
from trtrag_cli.generate.checkpoint import check_causal_lm
from trtrag_cli.generate.prompt import Prompt
from trtrag_cli.util import deps

_END = object()  # closes a stream's queue
# tensorrt_llm.executor.RequestError subclasses RuntimeError, as do torch's CUDA and out-of-memory errors.
_FAILURES = (RuntimeError, ValueError)
_HINT = "see the TensorRT-LLM log; lower answer.passages or answer.sampling.max_new_tokens, or set answer.fallback: extractive"


def sampling_params(params: SamplingParams, tensorrt_llm_module) -> object:
    """Our sampling settings as a `tensorrt_llm.SamplingParams`."""
    kwargs: dict = {"max_tokens": params.max_new_tokens, "stop": list(params.stop) or None,
                    # The docs give None as "the runtime default seed 0", which would make unseeded runs repeat.
                    "seed": secrets.randbits(31) if params.seed is None else params.seed}
    if params.temperature <= 0:
        kwargs["temperature"] = 0.0  # "Setting temperature = 0 results in greedy sampling."
    else:
        # Same conventions as ours: top_k 0 means all logits, top_p 1.0 the whole distribution.
        kwargs.update(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p)
    return tensorrt_llm_module.SamplingParams(**kwargs)


def serve_command(model: str, host: str = "127.0.0.1", port: int = 8000, tensor_parallel: int = 1,
                  gpu_memory_fraction: float = 0.9, max_batch_size: int = 8) -> list[str]:
    """The `trtllm-serve` command that serves `model` on its own node over the OpenAI API."""
    # --kv_cache_free_gpu_memory_fraction is the name older releases know; newer ones also accept
    # --free_gpu_memory_fraction. KV cache block reuse is on by default there, as here.
    return ["trtllm-serve", str(model), "--host", host, "--port", str(port), "--backend", "pytorch",
            "--tp_size", str(tensor_parallel), "--max_batch_size", str(max_batch_size),
            "--kv_cache_free_gpu_memory_fraction", str(gpu_memory_fraction)]


class TensorRTLLMBackend:
    """A `tensorrt_llm.LLM` over a local model folder and the same folder's tokenizer; a context manager."""

    name = "tensorrt-llm"

    def __init__(self, model: str, *, tensor_parallel: int = 1, kv_cache_reuse: bool = True,
                 gpu_memory_fraction: float = 0.9, max_batch_size: int = 8, max_seq_len: int = 0):
        # The folder first: a wrong path is the likelier mistake, and the check needs only transformers.
        config = check_causal_lm(model)
        trtllm = deps.require("tensorrt_llm", "the tensorrt-llm generator")
        transformers = deps.require("transformers", "the tensorrt-llm generator")
        from tensorrt_llm.llmapi import KvCacheConfig

        folder = Path(model).expanduser()
        self._trtllm = trtllm
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
        self.quantized = (folder / "hf_quant_config.json").is_file()  # a ModelOpt export
        self.context = max_seq_len or int(getattr(config, "max_position_embeddings", 2048))
        kv_cache = KvCacheConfig(enable_block_reuse=kv_cache_reuse, free_gpu_memory_fraction=gpu_memory_fraction)
        extra = {"max_seq_len": max_seq_len} if max_seq_len else {}  # unset: deduced from the model config
        self.llm = trtllm.LLM(model=str(folder), tensor_parallel_size=tensor_parallel, kv_cache_config=kv_cache,
                              max_batch_size=max_batch_size, **extra)

    def __enter__(self) -> TensorRTLLMBackend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def generate(self, prompts: list[Prompt], params: SamplingParams) -> list[Generation]:
        """Complete a batch in one `LLM.generate` call; total_ms is the batch's wall time."""
        if not prompts:
            return []
        sp = sampling_params(params, self._trtllm)
        started = time.perf_counter()
        # A TokensPrompt dict per prompt: a bare list of ints would be read as one prompt, not a batch.
        with generation_errors(self.name, _FAILURES, _HINT):
            outputs = self.llm.generate([{"prompt_token_ids": list(p.ids)} for p in prompts], sp, use_tqdm=False)
        total = (time.perf_counter() - started) * 1e3
        results = []
        for out in outputs:
            done = out.outputs[0]
            # TensorRT-LLM matches stop strings as token sequences; one spelled across other tokens still
            # shows in the text, so cut it here too.
            text, stopped = cut_at_stop(done.text, params.stop)
            results.append(Generation(text, len(out.prompt_token_ids), len(done.token_ids), None, total,
                                      "stop" if stopped or done.finish_reason == "stop" else "length"))
        return results

    def stream(self, prompt: Prompt, params: SamplingParams) -> Iterator[str]:
        """Text pieces as they are generated; stop sequences never reach the caller."""
        pieces: queue.Queue = queue.Queue()
        cancel = threading.Event()
        job = asyncio.run_coroutine_threadsafe(self._produce(prompt, params, pieces, cancel), self._event_loop())
        with generation_errors(self.name, _FAILURES, _HINT):
            try:
                while (piece := pieces.get()) is not _END:
                    yield piece
            finally:
                cancel.set()  # a caller that stops reading early ends the request at its next step
                job.result()  # the producer's exception, if it had one

    async def _produce(self, prompt: Prompt, params: SamplingParams, sink: queue.Queue,
                       cancel: threading.Event) -> None:
        gate = StopFilter(params.stop)
        sent = ""
        try:
            # Called inside the running loop: the result binds its async queue to the loop it finds.
            request = self.llm.generate_async({"prompt_token_ids": list(prompt.ids)},
                                              sampling_params(params, self._trtllm), streaming=True)
            async for out in request:
                done = out.outputs[0]
                if out.finished:
                    # The last output is authoritative (the runtime may trim a stop string it matched after
                    # part of it streamed); what was sent is a prefix of it, since the gate held such tails.
                    final = cut_at_stop(done.text, gate.stop)[0]
                    piece = final[len(sent):] if final.startswith(sent) else gate.flush()
                else:
                    # `.text` is cumulative (the docs' example prints 'an', then 'an exc'); text_diff is what
                    # this step added.
                    piece = gate.feed(done.text_diff)
                if piece:
                    sent += piece
                    sink.put(piece)
                if out.finished:
                    break
                if gate.stopped or cancel.is_set():
                    request.abort()
                    break
        finally:
            sink.put(_END)

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        """One loop on a daemon thread drives every stream; started on the first stream."""
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                self._loop_thread = threading.Thread(target=self._loop.run_forever, name="trtllm-stream",
                                                     daemon=True)
                self._loop_thread.start()
            return self._loop

    def close(self) -> None:
        """Stop the stream loop and shut the LLM down (its executor and GPU memory); safe to call twice."""
        with self._lock:
            loop, thread, self._loop, self._loop_thread = self._loop, self._loop_thread, None, None
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
            loop.close()
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.shutdown()
