"""What every request passes before a route: request id, auth, body size, the concurrency gate, the access log.

One pure ASGI middleware, so that a streamed response holds its slot until its last byte and the body is
measured as it is read (a chunked body has no Content-Length to trust). Past serve.max_concurrent
requests wait in a queue; past serve.max_queued more they get 429 with Retry-After at once. Blocking
work runs on worker threads (`blocking`), bounded by serve.timeout_s (504).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import sys
import time
import uuid
from collections.abc import Callable

import anyio

from trtrag_cli.serve.schemas import RequestError, error_body

PUBLIC = ("/health", "/ready", "/metrics")


def _headers(scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


async def blocking(fn: Callable, *args, timeout: float):
    """fn(*args) on a worker thread; past timeout the request gets 504 (the thread is left to finish)."""
    try:
        with anyio.fail_after(timeout):
            return await anyio.to_thread.run_sync(fn, *args, abandon_on_cancel=True)
    except TimeoutError:
        raise RequestError(504, f"the request took longer than serve.timeout_s ({timeout:g} s)",
                           code="timeout", kind="timeout_error") from None


class Limits:
    """ASGI middleware: X-Request-Id, Bearer auth, serve.max_body_mb, the concurrency gate, access log."""

    def __init__(self, app, cfg, metrics, api_key: str | None, routes: set[str]):
        self.app, self.cfg, self.metrics, self.routes = app, cfg, metrics, routes
        self.key = api_key.encode() if api_key else None
        self.max_body = int(cfg.max_body_mb * 1024 * 1024)
        self.slots = asyncio.Semaphore(cfg.max_concurrent)
        self.waiting = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = _headers(scope)
        rid = headers.get("x-request-id") or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        path, method = scope["path"], scope["method"]
        route = path if path in self.routes else "other"
        started = time.perf_counter()
        status = [0]

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = dict(message, headers=[*message.get("headers", []), (b"x-request-id", rid.encode())])
            await send(message)

        try:
            await self._gated(scope, receive, send_with_id, headers, path)
        except RequestError as exc:
            await _send_error(send_with_id, exc)
        finally:
            took = time.perf_counter() - started
            self.metrics.requests.labels(route, method, str(status[0] or 499)).inc()
            self.metrics.latency.labels(route).observe(took)
            self._log(scope, rid, status[0] or 499, took)

    async def _gated(self, scope, receive, send, headers: dict, path: str) -> None:
        if path in PUBLIC:
            return await self.app(scope, receive, send)
        if self.key is not None and (path == "/ask" or path == "/v1" or path.startswith("/v1/")):
            given = headers.get("authorization", "")
            token = given[7:].strip().encode() if given[:7].lower() == "bearer " else b""
            if not hmac.compare_digest(token, self.key):
                self.metrics.rejected.labels("unauthorized").inc()
                raise RequestError(401, "missing or wrong API key: send Authorization: Bearer <key>",
                                   code="invalid_api_key", kind="authentication_error",
                                   headers={"www-authenticate": "Bearer"})
        receive = await self._read_body(receive, headers)
        if self.slots.locked():
            if self.waiting >= self.cfg.max_queued:
                self.metrics.rejected.labels("queue_full").inc()
                raise RequestError(429, f"the server is busy ({self.cfg.max_concurrent} requests running, "
                                   f"{self.waiting} queued); retry shortly", code="queue_full",
                                   kind="rate_limit_error", headers={"retry-after": "1"})
        queued = time.perf_counter()
        self.waiting += 1
        self.metrics.queued.inc()
        try:
            await self.slots.acquire()
        finally:
            self.waiting -= 1
            self.metrics.queued.dec()
        self.metrics.queue_wait.observe(time.perf_counter() - queued)
        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send)
        finally:
            self.metrics.in_flight.dec()
            self.slots.release()

    async def _read_body(self, receive, headers: dict):
        """The whole body, at most max_body bytes (413 on Content-Length or on the bytes read), replayed."""
        too_large = RequestError(413, f"the request body is larger than serve.max_body_mb "
                                 f"({self.cfg.max_body_mb:g} MB)", code="body_too_large")
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            self.metrics.rejected.labels("body_too_large").inc()
            raise too_large
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return receive
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                self.metrics.rejected.labels("body_too_large").inc()
                raise too_large
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, done = b"".join(chunks), [False]

        async def replay():
            if not done[0]:
                done[0] = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect a stream listens for

        return replay

    def _log(self, scope, rid: str, status: int, took: float) -> None:
        if self.cfg.access_log == "off":
            return
        client = scope.get("client") or ("-", 0)
        if self.cfg.access_log == "json":
            line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "client": client[0],
                               "method": scope["method"], "path": scope["path"], "status": status,
                               "duration_ms": round(took * 1e3, 2), "request_id": rid})
        else:
            line = f'{client[0]} "{scope["method"]} {scope["path"]}" {status} {took * 1e3:.1f} ms id={rid}'
        sys.stderr.write(line + "\n")


async def _send_error(send, exc: RequestError) -> None:
    body = json.dumps(error_body(exc.message, exc.kind, exc.param, exc.code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in exc.headers.items()]
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
