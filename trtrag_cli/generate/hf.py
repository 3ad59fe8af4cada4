"""Generation with Hugging Face transformers: a local causal LM folder, on the CPU or a CUDA GPU.

On a GPU, Llama-family models decode through our own loop (graph_decode.py: fused weights, static
K/V cache, CUDA graphs, sampling on the device); `answer.generator.decode: transformers` or another architecture
uses transformers' `generate` with its static cache (and with `answer.generator.compile`, a compiled forward).
`answer.generator.compile` (on by default) applies on a GPU only.
Stop sequences end generation early and are cut from the text. Streaming: the fast decoder hands over
tokens every few steps; `generate` streams through `TextIteratorStreamer` on a worker thread.
A RuntimeError while generating (torch's CUDA out-of-memory and device errors are RuntimeErrors) is
raised as `GenerationError`, so `answer.fallback: extractive` catches it.
"""

from __future__ import annotations

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
                 deterministic: bool = True, pack_weights: bool = False):
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
                     pack_weights)

    @classmethod
    def from_model(cls, model, tokenizer, static_cache: bool | None = None, decode: str = "auto",
                   compile: bool = False, kernels: bool = True, deterministic: bool = False,
                   pack_weights: bool = True) -> TransformersBackend:
        """A backend over a model already in memory (benchmarks of random-weight shapes build it on the GPU)."""
        self = cls.__new__(cls)
        self._attach(model.eval(), tokenizer, next(model.parameters()).device, static_cache, decode, compile,
                     kernels, deterministic, pack_weights)
        return self

    def _attach(self, model, tokenizer, device, static_cache: bool | None, decode: str, compile: bool,
                kernels: bool, deterministic: bool, pack_weights: bool = False) -> None:
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

    def _fast(self, prompts: list[Prompt], params: SamplingParams, on_tokens=None) -> list[list[int]]:
        """New token ids per prompt from the fast decoder, stopping rows at an end id or stop string."""
        decode = self.tokenizer.decode

        def stopped(row: int, ids: list[int]) -> bool:
            return cut_at_stop(decode(ids, skip_special_tokens=True), params.stop)[1]

        return self.decoder.generate([p.ids for p in prompts], params.max_new_tokens,
                                     (params.temperature, params.top_k, params.top_p), self._end_ids(),
                                     stopped if params.stop else None, on_tokens, params.seed)

    def generate(self, prompts: list[Prompt], params: SamplingParams) -> list[Generation]:
        """Complete a batch of prompts together (the fast decoder, or one `generate` call)."""
        with generation_errors(self.name, (RuntimeError,), _HINT):
            return self._generate(prompts, params)

    def _generate(self, prompts: list[Prompt], params: SamplingParams) -> list[Generation]:
        started = time.perf_counter()
        if self.decoder is not None:
            news = self._fast(prompts, params)
        else:
            ids, mask = self._inputs(prompts)
            self._seed(params)
            with self._torch.inference_mode():
                out = self.model.generate(input_ids=ids, attention_mask=mask, **self._kwargs(params))
            news = [out[row, ids.shape[1]:].tolist() for row in range(len(prompts))]
        total = (time.perf_counter() - started) * 1e3
        results = []
        for p, new in zip(prompts, news):
            new, ended = self._cut_at_end(new)
            text, stopped = cut_at_stop(self.tokenizer.decode(new, skip_special_tokens=True), params.stop)
            finished = stopped or ended or len(new) < params.max_new_tokens
            results.append(Generation(text, len(p.ids), len(new), None, total, "stop" if finished else "length"))
        return results

    def stream(self, prompt: Prompt, params: SamplingParams) -> Iterator[str]:
        """Text pieces as they are decoded; stop sequences never reach the caller."""
        with generation_errors(self.name, (RuntimeError,), _HINT):
            yield from self._stream(prompt, params)

    def _stream(self, prompt: Prompt, params: SamplingParams) -> Iterator[str]:
        if self.decoder is not None:
            yield from self._stream_fast(prompt, params)
            return
        transformers = deps.require("transformers", "the transformers generator")
        streamer = transformers.TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True,
                                                     timeout=600)
        ids, mask = self._inputs([prompt])
        self._seed(params)
        failure: list[BaseException] = []

        def work() -> None:
            try:
                with self._torch.inference_mode():
                    self.model.generate(input_ids=ids, attention_mask=mask, streamer=streamer,
                                        **self._kwargs(params))
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                failure.append(exc)
                streamer.end()

        worker = threading.Thread(target=work, name="generate", daemon=True)
        worker.start()
        yield from _held_at_stops(streamer, params.stop)
        worker.join()
        if failure:
            raise failure[0]

    def _stream_fast(self, prompt: Prompt, params: SamplingParams) -> Iterator[str]:
        """Stream from the fast decoder: it runs on a worker thread and hands over tokens every few steps."""
        import queue

        pieces: queue.Queue = queue.Queue()
        sent = [""]

        def on_tokens(ids: list[int], last: bool = False) -> None:
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            # Hold back a trailing half character until its other bytes arrive (or generation ends).
            if len(text) > len(sent[0]) and (last or not text.endswith("\ufffd")):
                pieces.put(text[len(sent[0]):])
                sent[0] = text

        def work() -> None:
            try:
                on_tokens(self._fast([prompt], params, on_tokens)[0], last=True)  # ends before any end id
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                pieces.put(exc)
            pieces.put(None)

        def received() -> Iterator[str]:
            while (piece := pieces.get()) is not None:
                if isinstance(piece, BaseException):
                    raise piece
                yield piece

        worker = threading.Thread(target=work, name="generate", daemon=True)
        worker.start()
        yield from _held_at_stops(received(), params.stop)
        worker.join()

    def close(self) -> None:
        if self.decoder is not None:
            self.decoder.close()
        self.decoder = None
        self.model = None
        if self.device.type == "cuda":
            self._torch.cuda.empty_cache()



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
