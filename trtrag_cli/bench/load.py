"""`trtrag bench --serve URL`: load on a running service, from this process, over HTTP.

First one client asks in turn for `baseline_s` (what a lone user sees), then `clients` clients ask at
once for `duration_s`, each waiting for its answer before the next question (closed loop, as chat users
do). Every route's requests per second, latency P50/P90/P99 and errors by kind are reported per phase,
and the ratio of the two phases side by side: how much the service gains from concurrency (batching)
and what it costs each request.

Threads with one httpx client each: at the request rates a RAG service reaches, the GIL is no limit,
and blocking calls keep each latency honest (an event loop would add its own scheduling to it).
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Callable

from trtrag_cli.util import deps
from trtrag_cli.util.errors import TrtragError
from trtrag_cli.util.timing import ms_percentiles

SCHEMA = "trtrag.bench.load/1"
ROUTES = {"ask": "/v1/ask", "retrieve": "/v1/retrieve", "chat": "/v1/chat/completions"}


def request_body(route: str, question: str, model: str, stream: bool = False) -> dict:
    """The JSON a route takes for one question (stream: chat's answer as server-sent events)."""
    if route == "ask":
        return {"question": question}
    if route == "retrieve":
        return {"query": question}
    return {"model": model, "messages": [{"role": "user", "content": question}], **({"stream": True} if stream else {})}


def _has_content(data: str) -> bool:
    """Whether one server-sent chat chunk carries answer text (not the role-only first chunk, nor [DONE])."""
    try:
        choices = json.loads(data).get("choices") or []
    except ValueError:
        return False
    return any((c.get("delta") or {}).get("content") for c in choices)


def _streamed(http, path: str, body: dict, t0: float) -> tuple[str | None, float | None]:
    """POST a streamed chat request and read it to the end: (error or None, seconds to the first content)."""
    first = None
    with http.stream("POST", path, json=body) as reply:
        if not reply.is_success:
            reply.read()
            return f"http {reply.status_code}", None
        for line in reply.iter_lines():
            if first is None and line.startswith("data:") and _has_content(line[5:]):
                first = time.perf_counter() - t0
    return None, first


def parse_routes(text: str) -> tuple[str, ...]:
    """'ask' or 'ask,retrieve' -> the routes, checked."""
    routes = tuple(r.strip() for r in text.split(",") if r.strip())
    unknown = [r for r in routes if r not in ROUTES]
    if not routes or unknown:
        raise TrtragError(f"unknown route(s) {', '.join(unknown) or '(none)'}",
                          "use --route ask, retrieve or chat (several: ask,retrieve)")
    return routes


def _error_kind(exc) -> str:
    httpx = deps.require("httpx", "the load benchmark")
    if isinstance(exc, httpx.TimeoutException):
        return "timeout"
    if isinstance(exc, httpx.ConnectError):
        return "connect"
    return type(exc).__name__


class _Results:
    """Latencies of answered requests and error counts, per route; filled from many threads."""

    def __init__(self, routes: tuple[str, ...]):
        self.lock = threading.Lock()
        self.latency = {r: [] for r in routes}
        self.first = {r: [] for r in routes}
        self.errors = {r: {} for r in routes}

    def add(self, route: str, seconds: float, error: str | None, first: float | None = None) -> None:
        with self.lock:
            if error is None:
                self.latency[route].append(seconds)
                if first is not None:
                    self.first[route].append(first)
            else:
                self.errors[route][error] = self.errors[route].get(error, 0) + 1


def _phase(base_url: str, routes: tuple[str, ...], clients: int, duration_s: float, questions: list[str],
           headers: dict, timeout_s: float, model: str, stream: bool = False) -> dict:
    """`clients` closed-loop clients for duration_s: per route, answered requests/s, latency, errors, and
    (stream) the time to the first streamed content of chat answers."""
    httpx = deps.require("httpx", "the load benchmark")
    results = _Results(routes)
    start = time.perf_counter()
    end = start + duration_s

    def client(c: int) -> None:
        turn = itertools.count(c * 7919)  # clients start at different questions and routes
        with httpx.Client(base_url=base_url, headers=headers, timeout=timeout_s) as http:
            while time.perf_counter() < end:
                i = next(turn)
                route = routes[i % len(routes)]
                streamed = stream and route == "chat"
                body = request_body(route, questions[i % len(questions)], model, streamed)
                t, first = time.perf_counter(), None
                try:
                    if streamed:
                        error, first = _streamed(http, ROUTES[route], body, t)
                    else:
                        reply = http.post(ROUTES[route], json=body)
                        error = None if reply.is_success else f"http {reply.status_code}"
                except httpx.HTTPError as exc:
                    error = _error_kind(exc)
                results.add(route, time.perf_counter() - t, error, first)

    threads = [threading.Thread(target=client, args=(c,), name=f"load-{c}", daemon=True) for c in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - start
    per_route = {}
    for route in routes:
        done = results.latency[route]
        per_route[route] = {"requests": len(done) + sum(results.errors[route].values()), "ok": len(done),
                            "qps": round(len(done) / wall, 2),
                            "latency": ms_percentiles(done) if done else None, "errors": results.errors[route]}
        if results.first[route]:
            per_route[route]["first_content"] = ms_percentiles(results.first[route])
    ok = sum(r["ok"] for r in per_route.values())
    return {"clients": clients, "seconds": round(wall, 2), "ok": ok,
            "requests": sum(r["requests"] for r in per_route.values()), "qps": round(ok / wall, 2),
            "routes": per_route}


def _ratio(load: dict, base: dict) -> dict:
    """Load over baseline, per route: throughput gained and latency paid."""
    out = {}
    for route, r in load["routes"].items():
        b = base["routes"][route]
        if not (r["latency"] and b["latency"] and b["qps"]):
            out[route] = None
            continue
        out[route] = {"qps": round(r["qps"] / b["qps"], 2),
                      **{f"{p}_ms": round(r["latency"][f"{p}_ms"] / b["latency"][f"{p}_ms"], 2)
                         for p in ("p50", "p90", "p99")}}
    return out


def run_load(url: str, routes: tuple[str, ...], clients: int, duration_s: float, questions: list[str],
             api_key: str | None = None, baseline_s: float = 15.0, timeout_s: float = 120.0,
             model: str = "", log: Callable[[str], None] = lambda m: None, stream: bool = False) -> dict:
    """Everything `trtrag bench --serve` reports, as plain data (see module docstring)."""
    httpx = deps.require("httpx", "the load benchmark")
    if not questions:
        raise TrtragError("no questions to send", "pass --queries FILE (one question a line, or jsonl)")
    base_url = url.rstrip("/")
    if base_url.endswith("/v1"):  # accept the OpenAI-style base URL too
        base_url = base_url[:-3]
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    # One request first: a wrong URL or key is one clear line, not thousands of counted errors.
    try:
        with httpx.Client(base_url=base_url, headers=headers, timeout=timeout_s) as http:
            probe = http.post(ROUTES[routes[0]], json=request_body(routes[0], questions[0], model))
    except httpx.HTTPError as exc:
        raise TrtragError(f"cannot reach {base_url}{ROUTES[routes[0]]}: {_error_kind(exc)}",
                          "start the service (trtrag serve) or fix --serve URL") from None
    if probe.status_code in (401, 403):
        raise TrtragError(f"{base_url} refused the key (HTTP {probe.status_code})", "pass the service's --api-key")
    if probe.status_code == 404:
        raise TrtragError(f"{base_url} has no {ROUTES[routes[0]]} (HTTP 404)", "check --serve URL and --route")
    report: dict = {"schema": SCHEMA, "url": base_url, "routes": list(routes), "questions": len(questions),
                    "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "timeout_s": timeout_s}
    if baseline_s > 0:
        log(f"baseline: 1 client for {baseline_s:g} s")
        report["baseline"] = _phase(base_url, routes, 1, baseline_s, questions, headers, timeout_s, model, stream)
        log(_line(report["baseline"]))
    log(f"load: {clients} clients for {duration_s:g} s")
    report["load"] = _phase(base_url, routes, clients, duration_s, questions, headers, timeout_s, model, stream)
    log(_line(report["load"]))
    if "baseline" in report:
        report["ratio"] = _ratio(report["load"], report["baseline"])
    return report


def _line(phase: dict) -> str:
    parts = []
    for route, r in phase["routes"].items():
        lat = r["latency"]
        errors = sum(r["errors"].values())
        first = r.get("first_content")
        parts.append(f"{route} {r['qps']:.1f} q/s" + (f", P50 {lat['p50_ms']:.1f} ms P99 {lat['p99_ms']:.1f} ms"
                                                      if lat else "")
                     + (f", first content P50 {first['p50_ms']:.1f} ms P99 {first['p99_ms']:.1f} ms" if first else "")
                     + (f", {errors} errors" if errors else ""))
    return f"{phase['clients']} client(s): " + "; ".join(parts)
