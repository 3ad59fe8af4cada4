"""Generation with Hugging Face transformers: a local causal LM folder, on the CPU or a CUDA GPU.

On a GPU, Llama-family models decode through our own loop (graph_decode.py: fused weights, static
K/V cache, CUDA graphs, sampling on the device); `answer.generator.decode: transformers` or another architecture
uses transformers' `generate` with its static cache (and with `answer.generator.compile`, a compiled forward).
`answer.generator.compile` (on by default) applies on a GPU only.
Stop sequences end generation early and are cut from the text.

Concurrent requests share the model (`serve.generate_max_batch` rows, `max_batch` here):
  - our decode loop batches continuously (decode/scheduler.py): a request joins the running decode steps
    at the next step boundary and leaves when it ends, with its own sampling settings;
  - transformers' `generate` batches per request: requests that arrive while a `generate` call runs go
    into the next call together (left-padded; one call per distinct sampling setting, seeded per call),
    so they wait for the running call to finish. Simpler and honest: no joining mid-way.
`generate` and `stream` both go through them, so a stream never holds the model for itself; closing a
stream early (the client went away) cancels its request, which leaves its batch at the next step.
A RuntimeError while generating (torch's CUDA out-of-memory and device errors are RuntimeErrors) is
raised as `GenerationError`, so `answer.fallback: extractive` catches it.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Iterator

from trtrag_cli.generate.base import Generation, SamplingParams, StopFilter, cut_at_stop, generation_errors
from trtrag_cli.generate.checkpoint import check_causal_lm
from trtrag_cli.generate.prompt import Prompt
from trtrag_cli.util import deps
from trtrag_cli.util.deps import torch_dtype_kwarg
from trtrag_cli.util.errors import TrtragError

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
_HINT = "free GPU memory, lower answer.passages or answer.sampling.max_new_tokens, or set answer.fallback: extractive"


class TransformersBackend:
    """A causal LM and its tokenizer; `generate` takes a batch of prompts, `stream` one."""

    name = "transformers"

    def __init__(self, model: str, device: str = "auto", dtype: str = "auto", compile: bool = False,
                 static_cache: bool | None = None, decode: str = "auto", kernels: bool = True,
                 deterministic: bool = True, pack_weights: bool = False, max_batch: int = 16):
        torch = deps.require("torch", "the transformers generator")
        transformers = deps.require("transformers", "the transformers generator")
        check_causal_lm(model)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise TrtragError("answer.generator.device asks for CUDA but no CUDA GPU is visible",
                              "set answer.generator.device: auto or cpu")
        if dtype == "auto":
            dtype = "bf16" if device.startswith("cuda") else "fp32"
        if dtype not in DTYPES:
            raise TrtragError(f"unknown answer.generator.dtype {dtype!r}", "use auto, fp32, fp16 or bf16")
        tokenizer = transformers.AutoTokenizer.from_pretrained(model)
        transformers.utils.logging.disable_progress_bar()
        loaded = transformers.AutoModelForCausalLM.from_pretrained(
            model, **{torch_dtype_kwarg(): getattr(torch, DTYPES[dtype])}).to(device).eval()
        self._attach(loaded, tokenizer, torch.device(device), static_cache, decode, compile, kernels, deterministic,
                     pack_weights, max_batch)

    @classmethod
    def from_model(cls, model, tokenizer, static_cache: bool | None = None, decode: str = "auto",
                   compile: bool = False, kernels: bool = True, deterministic: bool = False,
                   pack_weights: bool = True, max_batch: int = 16) -> TransformersBackend:
        """A backend over a model already in memory (benchmarks of random-weight shapes build it on the GPU)."""
        self = cls.__new__(cls)
        self._attach(model.eval(), tokenizer, next(model.parameters()).device, static_cache, decode, compile,
                     kernels, deterministic, pack_weights, max_batch)
        return self

    def _attach(self, model, tokenizer, device, static_cache: bool | None, decode: str, compile: bool,
                kernels: bool, deterministic: bool, pack_weights: bool = False, max_batch: int = 16) -> None:
        """Everything around a loaded model: left padding, context, KV cache, which decode loop, compilation."""
        torch = self._torch = deps.require("torch", "the transformers generator")
        self.model, self.tokenizer, self.device = model, tokenizer, device
        tokenizer.padding_side = "left"  # batched prompts end where generation starts
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.context = int(getattr(model.config, "max_position_embeddings", 2048))
        self.static_cache = device.type == "cuda" if static_cache is None else static_cache
        compile = compile and device.type == "cuda"   # a GPU option; the CPU runs eagerly
        self.decoder = _fast_decoder(model, device, decode, compile, kernels, deterministic, pack_weights)
        if compile and self.decoder is None:
            model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=False)
        self.compiled = compile
        self.max_batch = max(1, int(max_batch))
        if self.decoder is not None:
            self.decoder.max_batch = self.max_batch
        self._batcher = None if self.decoder is not None else _RequestBatcher(self, self.max_batch)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _kwargs(self, params: SamplingParams) -> dict:
        kwargs = {"max_new_tokens": params.max_new_tokens, "pad_token_id": self.tokenizer.pad_token_id}
        if params.temperature > 0:
            kwargs.update(do_sample=True, temperature=params.temperature, top_k=params.top_k or None,
                          top_p=params.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None)
        if params.stop:
            kwargs.update(stop_strings=list(params.stop), tokenizer=self.tokenizer)
        if self.static_cache:
            kwargs["cache_implementation"] = "static"
        return kwargs

    def _seed(self, params: SamplingParams) -> None:
        if params.seed is not None:
            self._torch.manual_seed(params.seed)
            if self.device.type == "cuda":
                self._torch.cuda.manual_seed_all(params.seed)

    def _inputs(self, prompts: list[Prompt]):
        torch = self._torch
        width = max(len(p.ids) for p in prompts)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):  # left padding: the last prompt token sits at the end of each row
            ids[row, width - len(p.ids):] = torch.tensor(p.ids)
            mask[row, width - len(p.ids):] = 1
        return ids.to(self.device), mask.to(self.device)

    def _end_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id}
        configured = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        ids.update(configured if isinstance(configured, list) else [configured])
        return {i for i in ids if i is not None}

    def _cut_at_end(self, ids: list[int]) -> tuple[list[int], bool]:
        """ids up to the first end-of-sequence id, and whether there was one."""
        end = self._end_ids()
        cut = next((i for i, t in enumerate(ids) if t in end), None)
        return (ids, False) if cut is None else (ids[:cut], True)

    def _request(self, prompt: Prompt, params: SamplingParams, stream: bool = False, deadline: float | None = None):
        """A decode/scheduler.Request for this prompt, submitted to the scheduler or the request batcher."""
        from trtrag_cli.generate.decode.scheduler import Request

        if not prompt.ids:
            raise RuntimeError("cannot generate from an empty prompt")
        decode = self.tokenizer.decode
        stop = params.stop

        def stopped(ids: list[int]) -> bool:
            return cut_at_stop(decode(ids, skip_special_tokens=True), stop)[1]

        request = Request(list(prompt.ids), params.max_new_tokens,
                          (params.temperature, params.top_k, params.top_p), frozenset(self._end_ids()),
                          stopped if stop else None, params.seed, stream=stream, deadline=deadline)
        if self.decoder is not None:
            return self.decoder.start_scheduler(self.max_batch).submit(request)
        return self._batcher.submit(request, params)

    def generate(self, prompts: list[Prompt], params: SamplingParams,
                 deadline: float | None = None) -> list[Generation]:
        """Complete a batch of prompts (they join whatever else is decoding); deadline: time.monotonic() after
        which they are cut short."""
        with generation_errors(self.name, (RuntimeError,), _HINT):
            started = time.perf_counter()
            requests = []
            try:
                for p in prompts:
                    requests.append(self._request(p, params, deadline=deadline))
                news = [r.result() for r in requests]
            finally:
                for request in requests:
                    request.cancel()
            total = (time.perf_counter() - started) * 1e3
        results = []
        for p, new in zip(prompts, news):
            new, ended = self._cut_at_end(new)
            text, stopped = cut_at_stop(self.tokenizer.decode(new, skip_special_tokens=True), params.stop)
            finished = stopped or ended or len(new) < params.max_new_tokens
            results.append(Generation(text, len(p.ids), len(new), None, total, "stop" if finished else "length"))
        return results

    def stream(self, prompt: Prompt, params: SamplingParams, deadline: float | None = None) -> Iterator[str]:
        """Text pieces as they are decoded; stop sequences never reach the caller. Closing the iterator early
        cancels the request (its row is freed at the next step)."""
        with generation_errors(self.name, (RuntimeError,), _HINT):
            request = self._request(prompt, params, stream=True, deadline=deadline)
            try:
                yield from _held_at_stops(self._pieces(request), params.stop)
            finally:
                request.cancel()

    def _pieces(self, request) -> Iterator[str]:
        """New text each time the request's tokens grow, a trailing half character held back until it is whole."""
        sent = ""
        ids: list[int] = []
        for ids in request.updates():
            ids, _ = self._cut_at_end(ids)
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            if len(text) > len(sent) and not text.endswith("\ufffd"):
                yield text[len(sent):]
                sent = text
        text = self.tokenizer.decode(self._cut_at_end(ids)[0], skip_special_tokens=True)
        if len(text) > len(sent):
            yield text[len(sent):]

    def close(self) -> None:
        if self._batcher is not None:
            self._batcher.close()
        if self.decoder is not None:
            self.decoder.close()
        self.decoder = None
        self.model = None
        if self.device.type == "cuda":
            self._torch.cuda.empty_cache()



class _RequestBatcher:
    """transformers' `generate` for concurrent requests: what arrives while a call runs goes into the next call,
    up to max_batch prompts with equal sampling settings (others wait for a call of their own). Streams read
    their rows through a streamer that splits the batch's tokens; a cancelled request's row is stopped by a
    stopping criterion, and the call ends when every row has."""

    def __init__(self, backend: TransformersBackend, max_batch: int):
        self.backend, self.max_batch = backend, max_batch
        self._queue: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def submit(self, request, params: SamplingParams):
        request.submitted = time.monotonic()
        with self._cond:
            self._queue.append((request, params))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="generate-batcher", daemon=True)
                self._thread.start()
        return request

    def close(self) -> None:
        with self._cond:
            for request, _ in self._queue:
                request.cancel()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _run(self) -> None:
        from trtrag_cli.util.observe import emit

        while True:
            with self._cond:
                if not self._queue:
                    self._thread = None
                    return
                params = self._queue[0][1]
                batch = [item for item in self._queue if item[1] == params][:self.max_batch]
                for item in batch:
                    self._queue.remove(item)
            requests = []
            for request, _ in batch:
                if request.cancelled:
                    request._end("cancelled")
                else:
                    requests.append(request)
            if not requests:
                continue
            now = time.monotonic()
            emit("batch", stage="generate", size=len(requests), wait_s=[now - r.submitted for r in requests])
            try:
                self._generate(requests, params)
            except Exception as exc:  # noqa: BLE001 - re-raised in each caller's thread
                for request in requests:
                    request._end(error=exc)

    def _generate(self, requests: list, params: SamplingParams) -> None:
        backend = self.backend
        torch = backend._torch
        transformers = deps.require("transformers", "the transformers generator")
        ids, mask = backend._inputs([Prompt("", r.ids, []) for r in requests])
        end = backend._end_ids()

        class Rows(transformers.generation.streamers.BaseStreamer):
            def put(self, value) -> None:
                if value.dim() != 1:   # the prompt comes first, as one [batch, length] tensor
                    return
                from trtrag_cli.util.observe import emit

                emit("tokens", stage="generate", count=len(requests))
                for request, token in zip(requests, value.tolist()):
                    if request.finish is None and token in end:
                        request.finish = "stop"
                    elif request.finish is None:
                        request.out.append(token)
                        if request.stream:
                            request._updates.put(list(request.out))

            def end(self) -> None:
                pass

        class Cancelled(transformers.StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.tensor([r.cancelled for r in requests], device=input_ids.device)

        backend._seed(params)
        with torch.inference_mode():
            out = backend.model.generate(input_ids=ids, attention_mask=mask, streamer=Rows(),
                                         stopping_criteria=transformers.StoppingCriteriaList([Cancelled()]),
                                         **backend._kwargs(params))
        for row, request in enumerate(requests):
            request.out = out[row, ids.shape[1]:].tolist()
            request._end("cancelled" if request.cancelled else "stop")


def wants_fast_decoder(decode: str, on_gpu: bool) -> bool:
    """Whether answer.generator.decode asks for our decode loop on this device (the model must still support it)."""
    if decode not in ("auto", "graph", "transformers"):
        raise TrtragError(f"unknown answer.generator.decode {decode!r}", "use auto, graph or transformers")
    return decode == "graph" or (decode == "auto" and on_gpu)


def _fast_decoder(model, device, decode: str, compile: bool = False, kernels: bool = True,
                  deterministic: bool = True, pack_weights: bool = False):
    """graph_decode.GraphDecoder for this model when the recipe's answer.generator.decode allows it, else None."""
    if not wants_fast_decoder(decode, device.type == "cuda"):
        return None
    from trtrag_cli.generate.decode.graph import GraphDecoder, supports

    reason = supports(model)
    if reason is None:
        decoder = GraphDecoder(model, compile=compile, kernels=kernels, deterministic=deterministic)
        if pack_weights:
            decoder.pack_weights()
        return decoder
    if decode == "graph":
        raise TrtragError(f"answer.generator.decode is graph, but the fast decoder cannot run this model: {reason}",
                          "set answer.generator.decode: auto or transformers")
    return None


def _held_at_stops(pieces, stop: tuple[str, ...]) -> Iterator[str]:
    """The text pieces with stop sequences cut and any possible start of one held back (StopFilter)."""
    gate = StopFilter(stop)
    for piece in pieces:
        out = gate.feed(piece)
        if out:
            yield out
    tail = gate.flush()
    if tail:
        yield tail
