"""Remote encoder: embeddings from OpenAI-compatible `/v1/embeddings` nodes (NIM, `trtllm-serve`, Text
Embeddings Inference, vLLM, another `trtrag serve`).

Requests go through the official `openai` client, one per node, shared by every thread. A call's texts are
cut into requests of `batch_size` texts, up to `concurrency` of them in flight at once (the node batches
them), and put back in input order; rows are L2-normalised here, as the local encoders' are, so a node
that does not normalise gives the same cosine scores.

Failover: the node that answered last is asked first. One that refuses the connection, times out, is rate
limited (429) or answers 5xx is skipped for the next one; when every node failed the call fails with one
line naming them. Any other refusal (400, 401, 404 ...) would be the same on every node: it fails at once.
Connecting is bounded by a few seconds, so a dead host is given up quickly.

Identity: the encoder's name is `openai/<model>` (with `@<dimensions>` when the recipe asks the node for a
shortened vector), never the URL, so the nodes of `encoder.base_url` are interchangeable, and an index
built through one node is queried through another. The dimension is asked of the node once at open (one
probe text) and every answer is checked against it: a node serving another model under the same name is a
one-line error, not a silently wrong index.
"""

from __future__ import annotations

import base64
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import TYPE_CHECKING

from trtrag_cli.util import deps
from trtrag_cli.util.errors import TrtragError

if TYPE_CHECKING:
    import numpy as np

    from trtrag_cli.recipe.sections import EncoderConfig

PROBE = "What is the dimension of this embedding?"
CONNECT_TIMEOUT_S = 3.0


def encoder_name(model: str, dimensions: int | None = None) -> str:
    """The name indexes record for this remote model: the served model id, not the node's address."""
    return f"openai/{model}" + (f"@{dimensions}" if dimensions else "")


class RemoteEncoder:
    """Texts -> float32 L2-normalised embeddings from OpenAI-compatible embedding nodes; thread-safe."""

    def __init__(self, base_urls: list[str], model: str, *, api_key_env: str = "OPENAI_API_KEY",
                 dimensions: int | None = None, max_tokens: int = 256, concurrency: int = 4,
                 timeout_s: float = 30.0, expect_dim: int | None = None, expect_why: str = ""):
        openai = deps.require("openai", "the openai encoder")
        if not base_urls:
            raise TrtragError("encoder.backend is openai but encoder.base_url is not set",
                              "set encoder.base_url to the node's /v1 address, e.g. http://127.0.0.1:8000/v1")
        self.base_urls = list(base_urls)
        self.model = model
        self.dimensions = dimensions
        self.name = encoder_name(model, dimensions)
        self.max_tokens = max_tokens
        self.api_key_env = api_key_env
        key = os.environ.get(api_key_env) or "not-needed"  # local nodes ignore it; the client requires one
        timeout = openai.Timeout(timeout_s, connect=min(CONNECT_TIMEOUT_S, timeout_s))
        self._clients = [openai.OpenAI(base_url=url, api_key=key, timeout=timeout, max_retries=0)
                         for url in self.base_urls]
        # Worth trying the next node: this one is down, slow, overloaded or broken (APITimeoutError is a
        # connection error). Any other openai.APIError is a refusal the next node would repeat.
        self._skip = (openai.APIConnectionError, openai.RateLimitError, openai.InternalServerError)
        self._refused = openai.APIError
        self._first = 0  # the node that answered last
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max(1, concurrency), thread_name_prefix="trtrag-embed")
        self.concurrency = max(1, concurrency)
        self.dim = 0
        try:
            self.dim = self._probe(expect_dim, expect_why)
        except BaseException:
            self.close()
            raise

    @property
    def answering(self) -> str:
        """The node that answered last (asked first next time)."""
        return self.base_urls[self._first]

    # ------------------------------------------------------------------ requests

    def _probe(self, expect_dim: int | None, expect_why: str) -> int:
        """The node's dimension, checked against what the recipe or the index expects."""
        node, rows = self._request([PROBE])
        dim = len(rows[0])
        want = self.dimensions or expect_dim
        if want and dim != want:
            why = f"encoder.dimensions is {want}" if self.dimensions else f"{expect_why or 'expected'}: {want}"
            raise TrtragError(f"embedding node {node} answers {dim}-dimensional vectors for '{self.model}', "
                              f"{why}", self._same_model_hint(node))
        return dim

    def _same_model_hint(self, node: str) -> str:
        return (f"every node in encoder.base_url must serve '{self.model}' (check {node}/models), or set "
                "encoder.model to the model they serve and re-index")

    def _request(self, texts: list[str]):
        """(node url, list of embedding rows) for texts, from the first node that answers."""
        with self._lock:
            start = self._first
        order = [(start + i) % len(self._clients) for i in range(len(self._clients))]
        failures = []
        for i in order:
            url, client = self.base_urls[i], self._clients[i]
            args = {"model": self.model, "input": texts}
            if self.dimensions:
                args["dimensions"] = self.dimensions
            try:
                reply = client.embeddings.create(**args)
            except self._skip as exc:
                failures.append(f"{url}: {_describe(exc)}")
                continue
            except self._refused as exc:
                raise self._refusal(url, client, exc) from exc
            except ValueError as exc:  # the client's parser: an answer without embeddings
                raise TrtragError(f"embedding node {url} answered without embeddings: {exc}",
                                  "check that encoder.base_url is an OpenAI-compatible embeddings node") from exc
            if i != start:
                with self._lock:
                    self._first = i
            data = sorted(reply.data, key=lambda d: d.index)
            if len(data) != len(texts):
                raise TrtragError(f"embedding node {url} answered {len(data)} vectors for {len(texts)} texts",
                                  "check the node's log; it is not an OpenAI-compatible embeddings endpoint")
            return url, [_floats(d.embedding) for d in data]
        raise TrtragError("no embedding node answered: " + "; ".join(failures),
                          "start an OpenAI-compatible embeddings node at one of encoder.base_url, or fix "
                          "encoder.base_url (its /v1 address)")

    def _refusal(self, url: str, client, exc) -> TrtragError:
        """A node's answer another node would repeat (bad request, auth, unknown model), in one line."""
        status = getattr(exc, "status_code", None)
        body = getattr(exc, "body", None)
        said = body.get("message") if isinstance(body, dict) else None
        detail = (str(said or getattr(exc, "message", "") or exc).strip().splitlines() or [""])[0][:200]
        if status in (401, 403):
            hint = f"set the node's API key in ${self.api_key_env} (encoder.api_key_env)"
        elif status == 404:
            hint = f"set encoder.model to an id {url}/models lists" + _served(client)
        else:
            hint = "see the node's log; check encoder.model and encoder.dimensions"
        return TrtragError(f"embedding node {url} refused the request: {_describe(exc)}: {detail}", hint)

    def _batch(self, texts: list[str]) -> np.ndarray:
        import numpy as np

        node, rows = self._request(texts)
        wrong = next((len(r) for r in rows if len(r) != self.dim), None)
        if wrong is not None:
            raise TrtragError(f"embedding node {node} answered {wrong}-dimensional vectors for '{self.model}', "
                              f"the encoder opened with {self.dim}", self._same_model_hint(node))
        out = np.asarray(rows, dtype=np.float32)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-12)

    # ------------------------------------------------------------------ the Encoder interface

    def encode(self, texts: list[str], batch_size: int = 64,
               progress: Callable[[int], None] | None = None) -> np.ndarray:
        """Embed texts in input order as float32 [len(texts), dim]: requests of batch_size texts, up to
        `concurrency` in flight."""
        import numpy as np

        if self._pool is None:
            raise RuntimeError(f"{self.name} is closed")
        if batch_size < 1:
            raise TrtragError(f"batch_size must be at least 1, got {batch_size}")
        texts = list(texts)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        starts = list(range(0, len(texts), batch_size))
        if len(starts) == 1:  # one request: no thread hop (queries)
            out[:] = self._batch(texts)
            if progress is not None:
                progress(len(texts))
            return out
        futures = {self._pool.submit(self._batch, texts[s:s + batch_size]): s for s in starts}
        done = 0
        try:
            for future in as_completed(futures):
                s = futures[future]
                rows = future.result()
                out[s:s + len(rows)] = rows
                done += len(rows)
                if progress is not None:
                    progress(done)
        finally:
            for future in futures:
                future.cancel()
        return out

    def close(self) -> None:
        """Stop the request threads and close every node's connection pool."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        for client in self._clients:
            client.close()

    def __enter__(self) -> RemoteEncoder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _floats(embedding):
    """One embedding row as floats: the client decodes base64 itself unless asked not to; both kinds."""
    if isinstance(embedding, str):
        import numpy as np

        return np.frombuffer(base64.b64decode(embedding), dtype="<f4")
    return embedding


def _served(client) -> str:
    """': it serves a, b' from the node's /models, or '' when that cannot be read quickly."""
    try:
        ids = [m.id for m in client.models.list().data]
    except Exception:  # noqa: BLE001 - only a hint; the refusal itself is the error
        return ""
    return f": it serves {', '.join(ids[:8])}" if ids else ""


def _describe(exc) -> str:
    """An openai error in a few words: 'HTTP 503 InternalServerError', 'APIConnectionError'."""
    status = getattr(exc, "status_code", None)
    return f"HTTP {status} {type(exc).__name__}" if status else type(exc).__name__


def open_remote(enc: EncoderConfig, expect_dim: int | None = None, expect_why: str = "") -> RemoteEncoder:
    """The remote encoder a recipe's encoder section names; the node is asked for its dimension now.

    expect_dim: the dimension an index built under the same name holds (expect_why says so in errors).
    """
    urls = enc.base_urls()
    if not urls:
        raise TrtragError("the openai encoder needs its nodes: encoder.base_url is not set (an index built "
                          "through remote nodes makes encoder.backend follow it)",
                          "set encoder.backend: openai and encoder.base_url: http://<host>:8000/v1 in the recipe")
    started = time.perf_counter()
    encoder = RemoteEncoder(urls, enc.model, api_key_env=enc.api_key_env, dimensions=enc.dimensions,
                            max_tokens=enc.max_tokens, concurrency=enc.concurrency, timeout_s=enc.timeout_s,
                            expect_dim=expect_dim, expect_why=expect_why)
    encoder.open_ms = (time.perf_counter() - started) * 1e3
    return encoder


def open_encoder(model_id, cache_dir, **_):
    """The registry's entry point: a remote encoder opens from a recipe (its nodes), never from a model."""
    raise TrtragError(f"the openai encoder embeds on remote nodes; '{model_id}' cannot be opened locally",
                      "name the nodes in a recipe: encoder.backend: openai, encoder.base_url: http://<host>:8000/v1")
