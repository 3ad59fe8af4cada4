"""/v1/chat/completions: the RAG model (retrieve, then answer the last user turn) or plain generation.

Both are written as one iterator of text pieces (`Answer.pieces`), run piece by piece on worker threads:
a stream sends each piece as an SSE chunk, a plain reply joins them. Closing the iterator (a client gone,
serve.timeout_s passed) closes the backend's stream, so the backend can free the request's slot.
The per-request sampling fields go to the backend; the prompt plus max_tokens must fit the model's context
(400 otherwise), so generation never runs past the KV cache.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

from trtrag_cli.generate.base import GenerationError, SamplingParams
from trtrag_cli.generate.prompt import Prompt, build_prompt, citations, render_messages
from trtrag_cli.serve.schemas import ChatRequest, RequestError
from trtrag_cli.util.errors import TrtragError

CHARS_PER_TOKEN_BOUND = 32  # a prompt longer than context * this many characters cannot fit: refused untokenized


def sampling(req: ChatRequest, defaults: SamplingParams, room: int) -> SamplingParams:
    """The request's sampling fields over the recipe's; max_tokens must fit in `room` tokens of context."""
    asked = req.max_completion_tokens or req.max_tokens
    if asked is not None and asked > room:
        raise RequestError(400, f"max_tokens {asked} does not fit: the prompt leaves {room} tokens of the "
                           f"model's context", "max_tokens", "context_length_exceeded")
    return SamplingParams(asked or min(defaults.max_new_tokens, room),
                          defaults.temperature if req.temperature is None else float(req.temperature),
                          defaults.top_k if req.top_k is None else req.top_k,
                          defaults.top_p if req.top_p is None else float(req.top_p),
                          defaults.seed if req.seed is None else req.seed,
                          req.stops() or defaults.stop)


class Answer:
    """One chat completion being made: its pieces, and afterwards its usage, finish reason and citations."""

    def __init__(self, service, req: ChatRequest):
        self.service, self.req = service, req
        self.id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.plain = service.wants_plain(req.model)
        self.model = req.model or (service.generator_id if self.plain else service.rag_id)
        self.passages: list[dict] | None = None
        self.timings_ms: dict = {}
        self.warnings: list[str] = []
        self.prompt_tokens = self.completion_tokens = 0
        self.finish = "stop"
        self.ttft_ms: float | None = None
        self.text = ""
        self.pipeline = None
        if not self.plain and req.model not in ("", service.rag_id):
            names = ", ".join(m["id"] for m in service.models() if m["kind"] != "embeddings")
            raise RequestError(404, f"no chat model '{req.model}'; this server has: {names}", "model",
                               "model_not_found")
        if self.plain and service.backend is None:
            raise RequestError(404, "this server has no language-model generator for plain chat "
                               "(answer.generator.backend is extractive); ask the RAG model "
                               f"'{service.rag_id}' instead", "model", "model_not_found")

    # ------------------------------------------------------------ preparing (on a worker thread)

    def _fit(self, prompt_ids: int) -> SamplingParams:
        room = self.service.context - prompt_ids
        if room < 1:
            raise RequestError(400, f"the prompt takes {prompt_ids} tokens, the model's context is "
                               f"{self.service.context}", "messages", "context_length_exceeded")
        return sampling(self.req, self.service.defaults, room)

    def _plain_prompt(self) -> tuple[Prompt, SamplingParams]:
        svc = self.service
        messages = [{"role": m.role, "content": m.text()} for m in self.req.messages]
        if sum(len(m["content"]) for m in messages) > svc.context * CHARS_PER_TOKEN_BOUND:
            raise RequestError(400, f"the messages cannot fit the model's context of {svc.context} tokens",
                               "messages", "context_length_exceeded")
        text, ids = render_messages(svc.backend.tokenizer, messages)
        return Prompt(text, ids, [], messages=messages), self._fit(len(ids))

    def _rag_prompt(self, question: str) -> tuple[Prompt | None, SamplingParams | None, list[dict]]:
        svc = self.service
        pipe = self.pipeline = svc.pipeline()
        retriever = pipe.retriever  # this request keeps it, whatever a refresh swaps in meanwhile
        ranking, self.timings_ms = pipe.shared.rank(question, self.req.mode, retriever)
        self.passages = pipe.passages(ranking.rows, ranking.scores,
                                      self.req.retrieve_top_k or pipe.recipe.retrieve.top_k, retriever)
        given = self.passages[: pipe.recipe.answer.passages]
        if svc.backend is None:
            return None, None, given
        # max_tokens first, so that the passages are fitted around the answer's room
        bare = render_messages(svc.backend.tokenizer, [{"role": "user", "content": question}])[1]
        params = self._fit(len(bare))
        try:
            prompt = build_prompt(svc.backend.tokenizer, question, given, svc.context, params.max_new_tokens)
        except TrtragError as exc:
            raise RequestError(400, exc.message, "messages", "context_length_exceeded") from None
        if prompt.dropped:
            self.warnings.append(f"{prompt.dropped} passage(s) did not fit the generator's context")
        return prompt, params, given

    def prepare(self) -> Iterator[str]:
        """Retrieve and fit the prompt (blocking); returns the iterator of answer pieces."""
        if self.plain:
            prompt, params = self._plain_prompt()
            return self._generated(prompt, params, None)
        question = self.req.last_user().strip()
        if not question:
            raise RequestError(400, "the last user message is empty", "messages")
        if len(question) > 8192:
            raise RequestError(400, "the last user message is longer than 8192 characters", "messages")
        prompt, params, given = self._rag_prompt(question)
        if prompt is None:
            return self._extractive(question, given)
        return self._generated(prompt, params, (question, given))

    def batched(self) -> str:
        """A plain completion, not streamed (the backend's continuous batching joins it with the others, and
        its Generation knows the exact finish reason)."""
        prompt, params = self._plain_prompt()
        started = time.perf_counter()
        try:
            gen = self.service.backend.generate([prompt], params)[0]
        except GenerationError as exc:
            raise RequestError(502, str(exc), code="generation_failed", kind="server_error") from None
        self.prompt_tokens, self.completion_tokens, self.finish = gen.prompt_tokens, gen.output_tokens, gen.finish
        self._done(gen.text, started)
        return gen.text

    # ------------------------------------------------------------ the pieces

    def _extractive(self, question: str, given: list[dict]) -> Iterator[str]:
        started = time.perf_counter()
        text = self.pipeline.generator.answer(question, given)
        self.ttft_ms = (time.perf_counter() - started) * 1e3
        self.prompt_tokens = self.service.count_tokens(question)
        self.completion_tokens = self.service.count_tokens(text)
        self._done(text, started)
        yield text

    def _generated(self, prompt: Prompt, params: SamplingParams, rag) -> Iterator[str]:
        backend = self.service.backend
        self.prompt_tokens = len(prompt.ids)
        started = time.perf_counter()
        pieces: list[str] = []
        try:
            for piece in backend.stream(prompt, params):
                if piece and self.ttft_ms is None:
                    self.ttft_ms = (time.perf_counter() - started) * 1e3
                pieces.append(piece)
                yield piece
        except GenerationError as exc:
            fallback = getattr(getattr(self.pipeline, "generator", None), "fallback", None)
            if rag is None or pieces or fallback is None:
                raise RequestError(502, str(exc), code="generation_failed", kind="server_error") from None
            self.warnings.append(f"the {backend.name} generator failed ({exc.message}); answered extractively")
            text = fallback.answer(*rag)
            self.completion_tokens = self.service.count_tokens(text)
            self._done(text, started)
            yield text
            return
        text = "".join(pieces)
        self.completion_tokens = backend.count_tokens(text)
        # A backend stream does not say why it ended: a full budget of tokens reads as "length"
        self.finish = "length" if self.completion_tokens >= params.max_new_tokens else "stop"
        self._done(text, started)

    def _done(self, text: str, started: float) -> None:
        self.text = text
        self.timings_ms["answer"] = (time.perf_counter() - started) * 1e3
        self.timings_ms["total"] = sum(v for k, v in self.timings_ms.items() if k != "total")

    # ------------------------------------------------------------ the replies

    def generation(self) -> dict:
        """The figures metrics take (ask's `generation` keys)."""
        return {"ttft_ms": self.ttft_ms, "output_tokens": self.completion_tokens}

    def extra(self) -> dict:
        """trtrag's fields beside OpenAI's: passages and citations of a RAG answer."""
        if self.passages is None:
            return {}
        return {"citations": citations(self.text, self.passages), "passages": self.passages,
                "timings_ms": {k: round(v, 3) for k, v in self.timings_ms.items()}, "warnings": self.warnings}

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def completion(self, text: str) -> dict:
        """The whole chat.completion document."""
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": self.finish, "logprobs": None}],
                "usage": self.usage(), **self.extra()}

    def chunk(self, delta: dict, finish: str | None = None, **extra) -> dict:
        """One chat.completion.chunk of a stream."""
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}
