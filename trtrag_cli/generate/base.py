"""What every language-model generator shares: sampling settings, results, and stop-sequence handling.

A backend implements `generate(prompts, params) -> list[Generation]` (a batch, in order) and
`stream(prompt, params) -> Iterator[str]` (text pieces as they come), where a prompt is a
`prompt.Prompt` (rendered text, token ids, the passages it holds). `LanguageModelGenerator` turns
that into the `answer(question, passages)` that `ask` calls, with the prompt fitted to the context.
Concurrent callers share one generator: what a request cost (its Generation, its Prompt, a fallback's
warning) comes back through the `report` dict the caller passes, never through the generator's attributes.

A request that fails at answer time (a node down or rate limited, the GPU out of memory, a runtime
error inside TensorRT-LLM) raises `GenerationError` from every backend: one type for the CLI to print
as one line and for `answer.fallback: extractive` to catch. Bugs (TypeError and the like) are not wrapped.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from trtrag_cli.generate.prompt import Prompt, build_prompt
from trtrag_cli.util.errors import TrtragError


class GenerationError(TrtragError):
    """A generator could not answer this request; the fallback generator may answer instead."""


@contextmanager
def generation_errors(backend: str, kinds: tuple[type[BaseException], ...], hint: str):
    """Turn the library exceptions `kinds` raised in the block into a one-line GenerationError."""
    try:
        yield
    except GenerationError:
        raise
    except kinds as exc:
        detail = (str(exc).strip().splitlines() or [""])[0][:300]
        raise GenerationError(f"the {backend} generator failed: {type(exc).__name__}"
                              + (f": {detail}" if detail else ""), hint) from exc


@contextmanager
def closing_stream(pieces):
    """An iterator over `pieces` that is closed on the way out of the block, early or not (a generator's close
    runs its cleanup at once: the backends cancel the request there)."""
    stream = iter(pieces)
    try:
        yield stream
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy; top_k 0 and top_p 1.0 turn those filters off."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = 0
    stop: tuple[str, ...] = ()

    @classmethod
    def from_recipe(cls, sampling) -> SamplingParams:
        """The recipe's `answer.sampling` section as the backends' parameters (top_k null -> 0, off)."""
        return cls(sampling.max_new_tokens, sampling.temperature, sampling.top_k or 0, sampling.top_p,
                   sampling.seed, tuple(sampling.stop))


@dataclass
class Generation:
    """One completion and what it cost."""

    text: str
    prompt_tokens: int
    output_tokens: int
    ttft_ms: float | None = None
    total_ms: float | None = None
    finish: str = "length"          # "stop" (a stop sequence or end of text) or "length"
    extra: dict = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float | None:
        """Decode rate after the first token."""
        if not self.total_ms or self.ttft_ms is None or self.output_tokens < 2:
            return None
        return (self.output_tokens - 1) / max(1e-9, (self.total_ms - self.ttft_ms) / 1e3)


def cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """text up to the earliest stop sequence, and whether one was found."""
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return (text[:min(hits)], True) if hits else (text, False)


class StopFilter:
    """Streams text pieces while holding back what could be the start of a stop sequence."""

    def __init__(self, stop: tuple[str, ...]):
        self.stop = tuple(s for s in stop if s)
        self.held = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.held += piece
        text, hit = cut_at_stop(self.held, self.stop)
        if hit:
            self.stopped = True
            self.held = ""
            return text
        keep = max((len(s) - 1 for s in self.stop), default=0)
        # Hold back the longest tail that is a prefix of some stop sequence.
        tail = 0
        for n in range(min(keep, len(self.held)), 0, -1):
            if any(s.startswith(self.held[-n:]) for s in self.stop):
                tail = n
                break
        out, self.held = self.held[:len(self.held) - tail], self.held[len(self.held) - tail:]
        return out

    def flush(self) -> str:
        out, self.held = ("" if self.stopped else self.held), ""
        return out


class LanguageModelGenerator:
    """The `answer()` generator `ask` uses, over a backend with generate/stream and a tokenizer. Safe for
    concurrent callers: each call's figures go into the `report` dict it passes (see `stream`)."""

    def __init__(self, backend, params: SamplingParams, context: int):
        self.backend = backend
        self.params = params
        self.context = context
        self.name = backend.name

    def prompt(self, question: str, passages: list[dict]) -> Prompt:
        """The prompt for this question; one that cannot fit the context is this request's GenerationError."""
        try:
            return build_prompt(self.backend.tokenizer, question, passages, self.context, self.params.max_new_tokens)
        except TrtragError as exc:
            raise GenerationError(exc.message, exc.hint) from None

    def answer(self, question: str, passages: list[dict], report: dict | None = None) -> str:
        """The whole answer; generated as a stream so that time to first token is measured too."""
        return "".join(self.stream(question, passages, report)).strip()

    def stream(self, question: str, passages: list[dict], report: dict | None = None) -> Iterator[str]:
        """Answer pieces as they are generated. report, when given, gets "prompt" (the Prompt) at once and
        "generation" (the Generation: tokens, TTFT, total) once the stream ends. Closing the iterator early
        closes the backend's stream, which cancels the request."""
        prompt = self.prompt(question, passages)
        if report is not None:
            report["prompt"] = prompt
        started = time.perf_counter()
        first = None
        pieces = []
        with closing_stream(self.backend.stream(prompt, self.params)) as stream:
            for piece in stream:
                if first is None and piece:
                    first = time.perf_counter()
                pieces.append(piece)
                yield piece
        text = "".join(pieces)
        total = (time.perf_counter() - started) * 1e3
        if report is not None:
            report["generation"] = Generation(text, len(prompt.ids), self.backend.count_tokens(text),
                                              None if first is None else (first - started) * 1e3, total)

    def close(self) -> None:
        closer = getattr(self.backend, "close", None)
        if closer:
            closer()
