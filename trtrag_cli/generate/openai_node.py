"""Generation on OpenAI-compatible nodes (trtllm-serve, vLLM, NIM, another `trtrag serve`).

Requests go through the official `openai` client, one per node, shared by every thread: concurrent
callers (`serve`) reach a node concurrently, which is what lets trtllm-serve or vLLM batch them in flight.
Several base URLs are balanced round-robin; a node that refuses the connection, times out, is rate limited
(429) or answers 5xx is skipped for the next one, and only when every node failed does the call fail (one
line naming the nodes and the fix). Any other refusal (400, 401, 404 ...) would be the same on every node:
it fails at once. A stream fails over only before its first piece: after that, text already shown cannot
be taken back. Every failure is a `GenerationError`, which `answer.fallback: extractive` catches.

Node health: a node that failed cools down (cooldown_s, doubling with each failure in a row up to
max_cooldown_s) and is not asked until then, so a dead node costs a request nothing but the first time;
its first success clears it. When every node is cooling down, the one whose cool-down ends first is asked
rather than failing at once. Connecting is bounded by connect_timeout_s, far below timeout_s (the wait for
an answer), so an unreachable host is given up in seconds.

The prompt is fitted to the served model's context with that model's own tokenizer, so `answer.generator.model`
names a local folder holding it (the node's model folder, or just its tokenizer files).
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from trtrag_cli.generate.base import Generation, GenerationError, SamplingParams, StopFilter, cut_at_stop
from trtrag_cli.generate.prompt import Prompt
from trtrag_cli.util import deps
from trtrag_cli.util.errors import TrtragError


MAX_PARALLEL = 64  # generate(): prompts in flight at once from one call


@dataclass
class Node:
    """One base URL, its client and its health."""

    url: str
    client: object
    failures: int = 0        # in a row; the first success clears them
    until: float = 0.0       # time.monotonic() when its cool-down ends
    last_error: str = ""


class OpenAIBackend:
    """Chat completions over one or more OpenAI-compatible base URLs, with failover; thread-safe."""

    name = "openai"

    def __init__(self, base_urls: list[str], model: str, tokenizer_dir: str, api_key_env: str = "OPENAI_API_KEY",
                 timeout_s: float = 30.0, connect_timeout_s: float = 3.0, cooldown_s: float = 2.0,
                 max_cooldown_s: float = 60.0):
        openai = deps.require("openai", "the openai generator")
        transformers = deps.require("transformers", "fitting prompts for the openai generator")
        if not base_urls:
            raise TrtragError("answer.generator.backend is openai but answer.generator.base_urls is empty",
                              "list the nodes, e.g. answer.generator.base_urls: [http://127.0.0.1:8000/v1]")
        if not tokenizer_dir or not os.path.isdir(tokenizer_dir):
            raise TrtragError(f"the openai generator needs the served model's tokenizer; answer.generator.model is "
                              f"'{tokenizer_dir}'", "set answer.generator.model to a local folder with its tokenizer files")
        self.model = model
        self.base_urls = list(base_urls)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
        key = os.environ.get(api_key_env) or "not-needed"  # local nodes ignore it; the client requires one
        # The client's pool (openai's default: 1000 connections) lets every concurrent caller in at once.
        timeout = openai.Timeout(timeout_s, connect=min(connect_timeout_s, timeout_s))
        self.nodes = [Node(url, openai.OpenAI(base_url=url, api_key=key, timeout=timeout, max_retries=0))
                      for url in self.base_urls]
        self.cooldown_s, self.max_cooldown_s = cooldown_s, max_cooldown_s
        self.api_key_env = api_key_env
        # Worth trying the next node: this one is down, slow, overloaded or broken (APITimeoutError is a
        # connection error). Any other openai.APIError is a refusal the next node would repeat.
        self._skip = (openai.APIConnectionError, openai.RateLimitError, openai.InternalServerError)
        self._refused = openai.APIError
        self._next = itertools.count()
        self._lock = threading.Lock()

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _order(self) -> tuple[list[Node], list[str]]:
        """The nodes to ask, in turn: the healthy ones round-robin, else the one whose cool-down ends first;
        and a note for each node left out."""
        now = time.monotonic()
        with self._lock:
            start = next(self._next) % len(self.nodes)
            turn = [self.nodes[(start + i) % len(self.nodes)] for i in range(len(self.nodes))]
            healthy = [n for n in turn if n.until <= now]
            cooling = sorted((n for n in turn if n.until > now), key=lambda n: n.until)
            ask = healthy or cooling[:1]
            skipped = [f"{n.url}: skipped, {n.failures} failure(s) in a row, cooling down for another "
                       f"{n.until - now:.1f} s (last: {n.last_error})" for n in cooling if n not in ask]
        return ask, skipped

    def _failed(self, node: Node, why: str) -> None:
        """Cool the node down for longer with each failure in a row."""
        with self._lock:
            node.failures += 1
            node.last_error = why
            node.until = time.monotonic() + min(self.max_cooldown_s, self.cooldown_s * 2 ** (node.failures - 1))

    def _worked(self, node: Node) -> None:
        if node.failures or node.until:
            with self._lock:
                node.failures, node.until, node.last_error = 0, 0.0, ""

    def health(self) -> list[dict]:
        """Each node's state for a health endpoint: url, ok, failures in a row, seconds of cool-down left."""
        now = time.monotonic()
        with self._lock:
            return [{"url": n.url, "ok": n.until <= now, "failures": n.failures,
                     "cooldown_s": round(max(0.0, n.until - now), 3), "last_error": n.last_error or None}
                    for n in self.nodes]

    def close(self) -> None:
        """Close every node's connection pool."""
        for node in self.nodes:
            node.client.close()

    def _request(self, prompt: Prompt, params: SamplingParams, stream: bool) -> dict:
        body = {"model": self.model, "messages": prompt.messages, "max_tokens": params.max_new_tokens,
                "temperature": params.temperature, "top_p": params.top_p, "stream": stream}
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = list(params.stop)
        if params.top_k:
            body["extra_body"] = {"top_k": params.top_k}  # not in the OpenAI API; vLLM and trtllm-serve take it
        return body

    def _fail(self, failures: list[str]) -> GenerationError:
        return GenerationError("no generation node answered: " + "; ".join(failures),
                               "start a node at one of answer.generator.base_urls, raise answer.generator.timeout_s, or set "
                               "answer.fallback: extractive")

    def _refusal(self, url: str, exc) -> GenerationError:
        """A node's answer that another node would repeat (bad request, auth, unknown model)."""
        status = getattr(exc, "status_code", None)
        hint = {401: f"set the node's key in ${self.api_key_env}", 403: f"set the node's key in ${self.api_key_env}",
                404: "check answer.generator.served_model against the node's /v1/models"}.get(
            status, "see the node's log, or set answer.fallback: extractive")
        body = getattr(exc, "body", None)  # the reply's "error" object, when the node sent JSON
        said = body.get("message") if isinstance(body, dict) else None
        detail = (str(said or getattr(exc, "message", "") or exc).strip().splitlines() or [""])[0][:200]
        return GenerationError(f"generation node {url} refused the request: {_describe(exc)}: {detail}", hint)

    def generate(self, prompts: list[Prompt], params: SamplingParams) -> list[Generation]:
        """One request per prompt, all in flight at once (up to MAX_PARALLEL), so the node batches them."""
        if len(prompts) <= 1:
            return [self._one(p, params) for p in prompts]
        with ThreadPoolExecutor(min(MAX_PARALLEL, len(prompts)), thread_name_prefix="openai-node") as pool:
            return list(pool.map(lambda p: self._one(p, params), prompts))

    def _one(self, prompt: Prompt, params: SamplingParams) -> Generation:
        nodes, skipped = self._order()
        failures = []
        for node in nodes:
            started = time.perf_counter()
            try:
                reply = node.client.chat.completions.create(**self._request(prompt, params, False))
            except self._skip as exc:
                self._failed(node, _describe(exc))
                failures.append(f"{node.url}: {_describe(exc)}")
                continue
            except self._refused as exc:
                raise self._refusal(node.url, exc) from exc
            self._worked(node)
            choice = reply.choices[0]
            text, stopped = cut_at_stop(choice.message.content or "", params.stop)
            usage = reply.usage
            return Generation(text, usage.prompt_tokens if usage else len(prompt.ids),
                              usage.completion_tokens if usage else self.count_tokens(text), None,
                              (time.perf_counter() - started) * 1e3,
                              "stop" if stopped or choice.finish_reason == "stop" else "length",
                              {"node": node.url})
        raise self._fail(failures + skipped)

    def stream(self, prompt: Prompt, params: SamplingParams) -> Iterator[str]:
        nodes, skipped = self._order()
        failures = []
        for node in nodes:
            started = False
            try:
                chunks = node.client.chat.completions.create(**self._request(prompt, params, True))
                gate = StopFilter(params.stop)
                for chunk in chunks:
                    delta = chunk.choices[0].delta.content if chunk.choices else None
                    out = gate.feed(delta or "")
                    if out:
                        started = True
                        yield out
                tail = gate.flush()
                if tail:
                    yield tail
                self._worked(node)
                return
            except self._refused as exc:
                if started:
                    self._failed(node, _describe(exc))
                    raise GenerationError(f"generation node {node.url} failed mid-answer: "
                                          f"{_describe(exc)}", "ask again; the other nodes are tried first next "
                                          "time") from exc
                if not isinstance(exc, self._skip):
                    raise self._refusal(node.url, exc) from exc
                self._failed(node, _describe(exc))
                failures.append(f"{node.url}: {_describe(exc)}")
        raise self._fail(failures + skipped)


def _describe(exc) -> str:
    """An openai error in a few words: 'HTTP 429 RateLimitError', 'APITimeoutError'."""
    status = getattr(exc, "status_code", None)
    return f"HTTP {status} {type(exc).__name__}" if status else type(exc).__name__
