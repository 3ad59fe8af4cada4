"""`trtrag serve`: the pipeline over HTTP, and an OpenAI-compatible generation node.

Endpoints (JSON):
  GET  /health                 {"ok": true, ...}
  POST /ask                    {"question", "top_k"?, "mode"?} -> what `ask --json` prints
  GET  /v1/models              the generator's model, OpenAI style
  POST /v1/chat/completions    OpenAI chat completions, streamed (server-sent events) or not

The chat endpoint makes any trtrag with a language-model generator a node that another trtrag (or any
OpenAI client) can generate on. Concurrent non-streamed requests with the same sampling settings are
batched into one `generate` call by the Batcher; streams run one at a time on the model.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from trtrag_cli.generate.base import SamplingParams
from trtrag_cli.generate.prompt import Prompt, render_messages
from trtrag_cli.retrieve.batcher import Batcher
from trtrag_cli.util.errors import TrtragError


def chat_prompt(tokenizer, messages: list[dict]) -> Prompt:
    """An OpenAI messages list as a Prompt, through the tokenizer's chat template where it has one."""
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise ValueError("messages must be a non-empty list of {role, content} objects")
    text, ids = render_messages(tokenizer, messages)
    return Prompt(text, ids, [], messages=messages)


def request_params(body: dict, defaults: SamplingParams) -> SamplingParams:
    """SamplingParams from an OpenAI request body (unknown fields ignored, bad ones rejected)."""
    stop = body.get("stop") or ()
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    try:
        return SamplingParams(int(body.get("max_tokens") or defaults.max_new_tokens),
                              float(body.get("temperature", defaults.temperature) or 0.0),
                              int(body.get("top_k", defaults.top_k) or 0),
                              float(body.get("top_p", defaults.top_p) or 1.0),
                              body.get("seed", defaults.seed), stop)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"bad sampling field: {exc}") from None


class Service:
    """What the HTTP handler calls: a pipeline (for /ask) and a generation backend (for /v1)."""

    def __init__(self, pipeline=None, backend=None, model_name: str = "trtrag", defaults: SamplingParams | None = None,
                 max_batch: int = 8, max_wait_ms: float = 2.0):
        self.pipeline = pipeline
        self.backend = backend
        self.model_name = model_name
        self.defaults = defaults or SamplingParams()
        self._model_lock = threading.Lock()
        self._ask_lock = threading.Lock()
        self.batcher = Batcher(self._generate_batch, max_batch=max_batch, max_wait_ms=max_wait_ms,
                               name="generate") if backend is not None else None

    def _generate_batch(self, items: list[tuple[Prompt, SamplingParams]]) -> list:
        """One generate call per distinct sampling setting among the waiting requests."""
        out: list = [None] * len(items)
        groups: dict[SamplingParams, list[int]] = {}
        for i, (_, params) in enumerate(items):
            groups.setdefault(params, []).append(i)
        with self._model_lock:
            for params, rows in groups.items():
                for row, result in zip(rows, self.backend.generate([items[r][0] for r in rows], params)):
                    out[row] = result
        return out

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()


class _Handler(BaseHTTPRequestHandler):
    service: Service  # set on the subclass made by make_server
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet: the CLI reports what matters
        pass

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        self._send(status, {"error": {"message": message, "type": kind}})

    def _body(self) -> dict | None:
        try:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
        except (ValueError, OSError):
            self._error(400, "the body is not JSON")
            return None
        if not isinstance(body, dict):
            self._error(400, "the body must be a JSON object")
            return None
        return body

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        svc = self.service
        if self.path == "/health":
            self._send(200, {"ok": True, "ask": svc.pipeline is not None, "generate": svc.backend is not None})
        elif self.path == "/v1/models" and svc.backend is not None:
            model = {"id": svc.model_name, "object": "model", "owned_by": "trtrag"}
            self._send(200, {"object": "list", "data": [model]})
        else:
            self._error(404, f"no such endpoint: GET {self.path}")

    def do_POST(self) -> None:  # noqa: N802
        body = self._body()
        if body is None:
            return
        if self.path == "/ask":
            self._ask(body)
        elif self.path == "/v1/chat/completions":
            self._chat(body)
        else:
            self._error(404, f"no such endpoint: POST {self.path}")

    def _ask(self, body: dict) -> None:
        svc = self.service
        if svc.pipeline is None:
            self._error(404, "this node serves generation only (no index)")
            return
        try:
            with svc._ask_lock:
                result = svc.pipeline.ask(str(body.get("question", "")), top_k=body.get("top_k"), mode=body.get("mode"))
        except TrtragError as exc:
            self._error(400, f"{exc.message} ({exc.hint})" if exc.hint else exc.message)
            return
        self._send(200, result)

    def _chat(self, body: dict) -> None:
        svc = self.service
        if svc.backend is None:
            self._error(404, "this node has no language-model generator (answer.generator.backend is extractive)")
            return
        try:
            prompt = chat_prompt(svc.backend.tokenizer, body.get("messages"))
            params = request_params(body, svc.defaults)
        except ValueError as exc:
            self._error(400, str(exc))
            return
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:16]}", int(time.time())
        if body.get("stream"):
            self._stream(prompt, params, rid, created)
            return
        try:
            gen = svc.batcher((prompt, params))
        except Exception as exc:  # noqa: BLE001 - a failed generation is the client's 500, not a crash
            self._error(500, f"generation failed: {type(exc).__name__}: {exc}", "server_error")
            return
        self._send(200, {
            "id": rid, "object": "chat.completion", "created": created, "model": svc.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": gen.text},
                         "finish_reason": gen.finish}],
            "usage": {"prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.output_tokens,
                      "total_tokens": gen.prompt_tokens + gen.output_tokens}})

    def _stream(self, prompt: Prompt, params: SamplingParams, rid: str, created: int) -> None:
        svc = self.service
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

        def event(delta: dict, finish: str | None = None) -> None:
            chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": svc.model_name,
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()

        try:
            event({"role": "assistant", "content": ""})
            with svc._model_lock:
                for piece in svc.backend.stream(prompt, params):
                    event({"content": piece})
            event({}, "stop")
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away


def make_server(service: Service, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """A threading HTTP server bound to host:port (port 0: any free port; see server.server_address)."""
    handler = type("Handler", (_Handler,), {"service": service})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server
