"""Generation with Hugging Face transformers: a local causal LM folder, on the CPU or a CUDA GPU.

On a GPU the KV cache is transformers' static cache (allocated once, kept on the device) and, with
`answer.compile`, the decode step is compiled so it replays without per-token Python and launch
overhead. Sampling (temperature, top-k, top-p) runs on the device inside `generate`. Stop sequences
end generation early (`stop_strings`) and are cut from the text; streaming goes through
`TextIteratorStreamer` with the generation on a worker thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

from .. import deps
from ..encoders.torch import _dtype_kwarg
from ..errors import TrtragError
from .base import Generation, SamplingParams, StopFilter, cut_at_stop
from .prompt import Prompt

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def check_causal_lm(path: str):
    """The model folder's config, or a TrtragError saying why it is not a usable causal LM."""
    transformers = deps.require("transformers", "the transformers generator")
    folder = Path(path).expanduser()
    if not str(path) or not folder.is_dir():
        raise TrtragError(f"generator model folder '{path}' does not exist",
                          "set answer.model to a local Hugging Face model folder (config.json, weights, tokenizer)")
    if not (folder / "config.json").is_file():
        raise TrtragError(f"'{folder}' has no config.json: not a Hugging Face model folder",
                          "point answer.model at the folder written by save_pretrained()")
    config = transformers.AutoConfig.from_pretrained(str(folder))
    causal = transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    # BERT has a causal-LM head class too; what the checkpoint was saved as tells an encoder apart.
    heads = [a for a in (config.architectures or []) if a.endswith(("ForCausalLM", "LMHeadModel"))]
    if config.model_type not in causal or (config.architectures and not heads):
        raise TrtragError(f"'{folder}' holds a {config.model_type} model, which is not a causal language model",
                          "use a decoder model (Llama, Mistral, Qwen, ...) for answer.generator transformers")
    return config


class TransformersBackend:
    """A causal LM and its tokenizer; `generate` takes a batch of prompts, `stream` one."""

    name = "transformers"

    def __init__(self, model: str, device: str = "auto", dtype: str = "auto", compile: bool = False,
                 static_cache: bool | None = None):
        torch = deps.require("torch", "the transformers generator")
        transformers = deps.require("transformers", "the transformers generator")
        config = check_causal_lm(model)
        self._torch = torch
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise TrtragError("answer.device asks for CUDA but no CUDA GPU is visible",
                              "set answer.device: auto or cpu")
        self.device = torch.device(device)
        if dtype == "auto":
            dtype = "bf16" if self.device.type == "cuda" else "fp32"
        if dtype not in DTYPES:
            raise TrtragError(f"unknown answer.dtype {dtype!r}", "use auto, fp32, fp16 or bf16")
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(model)
        self.tokenizer.padding_side = "left"  # batched prompts end where generation starts
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        transformers.utils.logging.disable_progress_bar()
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            model, **{_dtype_kwarg(): getattr(torch, DTYPES[dtype])}).to(self.device).eval()
        self.context = int(getattr(config, "max_position_embeddings", 2048))
        self.static_cache = self.device.type == "cuda" if static_cache is None else static_cache
        if compile:
            self.model.forward = torch.compile(self.model.forward, mode="reduce-overhead", fullgraph=False)
        self.compiled = compile

    @classmethod
    def from_model(cls, model, tokenizer, static_cache: bool | None = None) -> TransformersBackend:
        """A backend over a model already in memory (benchmarks of random-weight shapes build it on the GPU)."""
        self = cls.__new__(cls)
        self._torch = deps.require("torch", "the transformers generator")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.device = next(model.parameters()).device
        self.context = int(getattr(model.config, "max_position_embeddings", 2048))
        self.static_cache = self.device.type == "cuda" if static_cache is None else static_cache
        self.compiled = False
        return self

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

    def generate(self, prompts: list[Prompt], params: SamplingParams) -> list[Generation]:
        """Complete a batch of prompts in one `generate` call."""
        ids, mask = self._inputs(prompts)
        self._seed(params)
        started = time.perf_counter()
        with self._torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=mask, **self._kwargs(params))
        total = (time.perf_counter() - started) * 1e3
        results = []
        for row, p in enumerate(prompts):
            new = out[row, ids.shape[1]:].tolist()
            eos = self.tokenizer.eos_token_id
            ended = eos is not None and eos in new
            if ended:
                new = new[:new.index(eos)]
            text, stopped = cut_at_stop(self.tokenizer.decode(new, skip_special_tokens=True), params.stop)
            results.append(Generation(text, len(p.ids), len(new), None, total,
                                      "stop" if (stopped or ended) else "length"))
        return results

    def stream(self, prompt: Prompt, params: SamplingParams) -> Iterator[str]:
        """Text pieces as they are decoded; stop sequences never reach the caller."""
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
        gate = StopFilter(params.stop)
        for piece in streamer:
            out = gate.feed(piece)
            if out:
                yield out
        tail = gate.flush()
        if tail:
            yield tail
        worker.join()
        if failure:
            raise failure[0]

    def close(self) -> None:
        self.model = None
        if self.device.type == "cuda":
            self._torch.cuda.empty_cache()

