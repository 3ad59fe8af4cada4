"""The routes of `trtrag serve` (FastAPI): health, readiness, metrics, and the /v1 API.

GET  /health                liveness and the index generation served          (public)
GET  /ready                 200 once loaded; 503 while loading or draining     (public)
GET  /metrics               Prometheus text                                    (public)
GET  /v1/models             the RAG pipeline, the encoder, the generator
POST /v1/ask  (/ask)        what `trtrag ask --json` prints
POST /v1/retrieve           passages with scores and per-stage timings
POST /v1/embeddings         OpenAI embeddings with the recipe's encoder
POST /v1/chat/completions   OpenAI chat: RAG by default; the generator's model id for plain generation

Pipeline calls are blocking: they run on worker threads, so the event loop keeps serving other requests
(and streams) meanwhile. Every failure is the OpenAI error document (schemas.error_body).
"""

from __future__ import annotations

import base64
import json
import time
from contextlib import asynccontextmanager

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from trtrag_cli.serve.chat import Answer
from trtrag_cli.serve.limits import Limits, blocking
from trtrag_cli.serve.metrics import Metrics
from trtrag_cli.serve.schemas import (AskRequest, ChatRequest, EmbeddingsRequest, RequestError, RetrieveRequest,
                                      error_body)
from trtrag_cli.util.errors import TrtragError

ROUTES = {"/health", "/ready", "/metrics", "/v1/models", "/v1/ask", "/ask", "/v1/retrieve", "/v1/embeddings",
          "/v1/chat/completions"}


def make_app(service, api_key: str | None = None, cfg=None) -> Limits:
    """The ASGI app over a Service (loaded or loading), wrapped in the limits middleware.

    cfg: the limits (a ServeConfig); default the recipe's serve section. Several apps may share one service.
    """
    metrics = Metrics()
    cfg = cfg or service.recipe.serve

    def on_index(pipe) -> None:
        metrics.index_chunks.set(len(pipe.retriever.store))
        if service.loaded:
            metrics.index_swaps.inc()

    service.index_listeners.append(on_index)
    if service.loaded and service.generation is not None:
        metrics.index_chunks.set(len(service.pipeline().retriever.store))

    @asynccontextmanager
    async def lifespan(_app):
        # Each request in flight may hold a worker thread: give the pool room for all of them.
        limiter = anyio.to_thread.current_default_thread_limiter()
        limiter.total_tokens = max(limiter.total_tokens, cfg.max_concurrent + 8)
        yield

    app = FastAPI(title="trtrag", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service, app.state.metrics = service, metrics
    _handlers(app)

    def ready() -> None:
        if service.load_error is not None or not service.loaded:
            raise RequestError(503, "the index and models are still loading", code="loading",
                               kind="server_error", headers={"retry-after": "5"})

    def indexed() -> None:
        ready()
        if service.generate_only:
            raise RequestError(404, "this node serves generation only (started with --generate-only): no index",
                               code="not_found")

    @app.get("/health")
    def health() -> dict:
        state = "draining" if service.draining else "ok" if service.loaded else "loading"
        return {"status": state, "generation": service.generation, "ask": not service.generate_only,
                "generate": service.generator_id is not None}

    @app.get("/ready")
    def is_ready() -> JSONResponse:
        ok = service.loaded and not service.draining
        state = "draining" if service.draining else "ready" if ok else "loading"
        return JSONResponse({"ready": ok, "status": state}, status_code=200 if ok else 503)

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[Depends(ready)])
    def models() -> dict:
        return {"object": "list", "data": service.models()}

    @app.post("/v1/ask", dependencies=[Depends(indexed)])
    @app.post("/ask", dependencies=[Depends(indexed)], include_in_schema=False)
    async def ask(req: AskRequest) -> dict:
        def work() -> dict:
            return service.pipeline().ask(req.question, top_k=req.top_k, mode=req.mode)

        result = await blocking(work, timeout=cfg.timeout_s)
        metrics.answered(result["timings_ms"], result.get("generation"))
        return result

    @app.post("/v1/retrieve", dependencies=[Depends(indexed)])
    async def retrieve(req: RetrieveRequest) -> dict:
        def work() -> dict:
            found = service.pipeline().retrieve(req.query, top_k=req.top_k, mode=req.mode)
            return {"object": "list", "generation": found["index_generation"], **found}

        result = await blocking(work, timeout=cfg.timeout_s)
        metrics.answered(result["timings_ms"])
        return result

    @app.post("/v1/embeddings", dependencies=[Depends(indexed)])
    async def embeddings(req: EmbeddingsRequest) -> dict:
        if req.model and req.model not in (service.encoder_id, service.rag_id):
            raise RequestError(404, f"no embedding model '{req.model}'; this server embeds with "
                               f"'{service.encoder_id}'", "model", "model_not_found")
        texts = [req.input] if isinstance(req.input, str) else list(req.input)

        def work() -> dict:
            encoder = service.pipeline().retriever.encoder
            if req.dimensions is not None and req.dimensions != encoder.dim:
                raise RequestError(400, f"'{service.encoder_id}' makes {encoder.dim}-dimensional vectors; "
                                   "dimensions cannot change that", "dimensions")
            vectors = encoder.encode(texts, batch_size=service.recipe.encoder.batch_size)
            data = []
            for i, row in enumerate(vectors):
                emb = base64.b64encode(row.astype("<f4").tobytes()).decode() \
                    if req.encoding_format == "base64" else [float(x) for x in row]
                data.append({"object": "embedding", "index": i, "embedding": emb})
            tokens = sum(service.count_tokens(t) for t in texts)
            return {"object": "list", "model": service.encoder_id, "data": data,
                    "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

        return await blocking(work, timeout=cfg.timeout_s)

    @app.post("/v1/chat/completions", dependencies=[Depends(ready)])
    async def chat(req: ChatRequest, request: Request):
        answer = Answer(service, req)
        if not req.stream and answer.plain:
            text = await blocking(answer.batched, timeout=cfg.timeout_s)
            metrics.answered(answer.timings_ms, answer.generation())
            return answer.completion(text)
        pieces = await blocking(answer.prepare, timeout=cfg.timeout_s)
        if req.stream:
            deadline = time.monotonic() + cfg.timeout_s
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_sse(answer, pieces, deadline, metrics, include_usage),
                                     media_type="text/event-stream", headers={"cache-control": "no-cache"})

        def whole() -> str:
            try:
                return "".join(pieces)
            finally:
                pieces.close()

        text = await blocking(whole, timeout=cfg.timeout_s)
        metrics.answered(answer.timings_ms, answer.generation())
        return answer.completion(text)

    return Limits(app, cfg, metrics, api_key, ROUTES)


def _event(data) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


async def _sse(answer: Answer, pieces, deadline: float, metrics: Metrics, include_usage: bool):
    """The chat stream as server-sent events; a client that leaves closes the pieces (and the backend's stream)."""
    finished = False
    try:
        first = {"passages": answer.passages} if answer.passages is not None else {}
        yield _event(answer.chunk({"role": "assistant", "content": ""}, **first))
        while True:
            if time.monotonic() > deadline:
                yield _event(error_body("the stream took longer than serve.timeout_s", "timeout_error",
                                        code="timeout"))
                break
            try:
                piece = await anyio.to_thread.run_sync(next, pieces, None)
            except (RequestError, TrtragError) as exc:
                yield _event(error_body(getattr(exc, "message", str(exc)), "server_error", code="generation_failed"))
                break
            if piece is None:
                extra = {k: v for k, v in answer.extra().items() if k in ("citations", "warnings", "timings_ms")}
                yield _event(answer.chunk({}, answer.finish, **extra))
                if include_usage:
                    yield _event(dict(answer.chunk({}), choices=[], usage=answer.usage()))
                metrics.answered(answer.timings_ms, answer.generation())
                break
            if piece:
                yield _event(answer.chunk({"content": piece}))
        yield _event("[DONE]")
        finished = True
    finally:
        try:
            pieces.close()  # a cancelled await above waited for its next() to return...
        except ValueError:
            pass  # ...unless uvicorn cancelled it past serve.drain_s: the worker thread still runs it
        if not finished:
            metrics.cancelled.inc()


def _handlers(app: FastAPI) -> None:
    """Every failure as the OpenAI error document; validation errors are 400, never a dropped connection."""

    def reply(status: int, body: dict, headers: dict | None = None) -> JSONResponse:
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(RequestError)
    async def refused(_request, exc: RequestError):
        return reply(exc.status, error_body(exc.message, exc.kind, exc.param, exc.code), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            message, param = "the body is not valid JSON", None
        else:
            message = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ()) if x != 'body') or 'body'}: "
                                f"{e.get('msg')}" for e in errors[:5])
            param = ".".join(loc) or None
        return reply(400, error_body(message, param=param, code="invalid_value"))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        message = f"no such route: {request.method} {request.url.path}" if exc.status_code == 404 else str(exc.detail)
        return reply(exc.status_code, error_body(message, code="not_found" if exc.status_code == 404 else None),
                     getattr(exc, "headers", None))

    @app.exception_handler(TrtragError)
    async def user_error(_request, exc: TrtragError):
        return reply(400, error_body(str(exc)))

    @app.exception_handler(Exception)
    async def bug(_request, exc: Exception):
        return reply(500, error_body(f"internal error ({type(exc).__name__}: {exc})", "server_error"))
