"""Answer generators behind one small interface: `answer(question, passages) -> text` with [n] citations.

`extractive` picks cited sentences from the passages. The language-model generators (`transformers`,
`openai`, `tensorrt-llm`) share `base.LanguageModelGenerator`, which fits the prompt to the model's
context (prompt.py) and can also `stream` the answer. The recipe's `answer.generator` section holds only
the chosen backend's settings; `answer.sampling` the ones they share. With `answer.fallback: extractive`, a
language-model generator that fails at answer time (a node down, a timeout) hands the question to the
extractive one and says so, instead of failing the request.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from trtrag_cli.generate.base import GenerationError, closing_stream
from trtrag_cli.util.errors import TrtragError


class Generator(Protocol):
    name: str

    def answer(self, question: str, passages: list[dict]) -> str:
        """Answer text with [n] citations, n being the 1-based position in `passages`."""


def open_backend(gen, max_batch: int = 16):
    """The language-model backend of the recipe's `answer.generator` section; extractive has none (an error).
    max_batch: sequences decoded together (the recipe's serve.generate_max_batch; transformers only)."""
    if gen.backend == "extractive":
        raise TrtragError("answer.generator.backend is extractive: nothing to build, time or serve (it has no "
                          "language model)", "set answer.generator: {backend: transformers (or openai, "
                          "tensorrt-llm), model: <folder>}")
    if gen.backend == "transformers":
        from trtrag_cli.generate.hf import TransformersBackend

        return TransformersBackend(gen.model, gen.device, gen.dtype, gen.compile,
                                   decode=gen.decode, kernels=gen.kernels, deterministic=gen.deterministic,
                                   pack_weights=gen.pack_weights, max_batch=max_batch)
    if gen.backend == "openai":
        from trtrag_cli.generate.openai_node import OpenAIBackend

        return OpenAIBackend(gen.base_urls, served_name(gen), gen.model, gen.api_key_env, gen.timeout_s)
    if gen.backend == "tensorrt-llm":
        from trtrag_cli.generate.trtllm import TensorRTLLMBackend

        return TensorRTLLMBackend(gen.model, tensor_parallel=gen.tensor_parallel,
                                  kv_cache_reuse=gen.kv_cache_reuse, gpu_memory_fraction=gen.gpu_memory_fraction)
    raise TrtragError(f"unknown generator '{gen.backend}'", "use extractive, transformers, openai or tensorrt-llm")


def served_name(gen) -> str:
    """The model name a node serves (openai: served_model, else the model setting); 'trtrag' without one."""
    return getattr(gen, "served_model", None) or getattr(gen, "model", None) or "trtrag"


def model_context(backend, gen) -> int:
    """Tokens prompt + answer may use: answer.generator.context, else what the model or its tokenizer says."""
    if gen.context is not None:
        return gen.context
    for value in (getattr(backend, "context", None), getattr(backend.tokenizer, "model_max_length", None)):
        if isinstance(value, int) and 0 < value < 10_000_000:
            return value
    raise TrtragError("cannot tell the generator model's context length",
                      "set answer.generator.context in the recipe")


def open_generator(recipe, lexical) -> Generator:
    """The generator the recipe names; backends are imported only when chosen."""
    from trtrag_cli.generate.extractive import ExtractiveGenerator

    answer = recipe.answer
    extractive = ExtractiveGenerator(lexical, answer.max_sentences)
    if answer.generator.backend == "extractive":
        return extractive
    from trtrag_cli.generate.base import LanguageModelGenerator, SamplingParams

    backend = open_backend(answer.generator, recipe.serve.generate_max_batch)
    generator = LanguageModelGenerator(backend, SamplingParams.from_recipe(answer.sampling),
                                       model_context(backend, answer.generator))
    return FallbackGenerator(generator, extractive) if answer.fallback == "extractive" else generator


class FallbackGenerator:
    """A language-model generator that answers extractively when it fails, with a warning.

    It catches `base.GenerationError`, the one type every backend raises for a failed request. A stream
    falls back only before its first piece: the extractive answer then comes as one piece. After text
    was sent, mixing in a second answer would read as one contradictory reply, so the stream ends with
    a GenerationError saying the answer is incomplete instead. The warning goes into the caller's `report`
    dict ("warning"), with "generation" None, so concurrent requests keep their own.
    """

    def __init__(self, primary, fallback):
        self.primary, self.fallback = primary, fallback
        self.name = primary.name

    def __getattr__(self, item):  # prompt, params, backend, close ... come from the primary
        return getattr(self.primary, item)

    def _fell_back(self, exc, report: dict | None) -> None:
        if report is not None:
            report["warning"] = f"the {self.primary.name} generator failed ({exc.message}); answered extractively"
            report["generation"] = None  # no language-model figures for an answer it did not give

    def answer(self, question: str, passages: list[dict], report: dict | None = None) -> str:
        """The primary's answer, or the fallback's when the primary raises GenerationError."""
        try:
            return self.primary.answer(question, passages, report)
        except GenerationError as exc:
            self._fell_back(exc, report)
            return self.fallback.answer(question, passages)

    def stream(self, question: str, passages: list[dict], report: dict | None = None) -> Iterator[str]:
        """The primary's pieces; before the first one, a failure streams the fallback's answer instead."""
        sent = False
        try:
            with closing_stream(self.primary.stream(question, passages, report)) as stream:
                for piece in stream:
                    sent = sent or bool(piece)
                    yield piece
        except GenerationError as exc:
            if sent:
                raise GenerationError(f"the {self.primary.name} generator failed mid-answer ({exc.message}); "
                                      "the text above is incomplete",
                                      "ask again; the extractive fallback replaces only an answer that has not "
                                      "started") from exc
            self._fell_back(exc, report)
            yield self.fallback.answer(question, passages)
