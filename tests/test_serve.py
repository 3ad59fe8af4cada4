"""`trtrag serve`: the real uvicorn server on loopback over a small index of examples/corpus.

Driven with the official `openai` client and raw httpx: models, ask (same as the CLI), retrieval,
embeddings, RAG chat (extractive and the tiny random Llama, streamed or not), plain generation, the
limits (auth, body size, queue, timeout, validation), a client leaving mid-stream, metrics, the live
index, and the command itself in a subprocess (SIGTERM drains and exits 0; a port in use is one line).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
from conftest import EXAMPLES, ROOT, Cli, write_recipe
from prometheus_client.parser import text_string_to_metric_families

KEY = "sk-test-key"
QUESTION = "Can I get an advance replacement for a faulty TH-50 sensor?"


def _recipe(folder, name: str = "ex", **sections) -> "os.PathLike":
    path = folder / f"{name}-{len(list(folder.glob('*.yaml')))}.yaml"
    return write_recipe(path, name, folder / "ws", **sections)


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    """A writable copy of the example corpus, indexed once; (folder, extractive recipe, corpus)."""
    folder = tmp_path_factory.mktemp("serve")
    corpus = folder / "corpus"
    shutil.copytree(EXAMPLES, corpus)
    recipe = _recipe(folder, serve={"access_log": "off", "max_body_mb": 0.05})
    Cli().json("index", corpus, "--recipe", recipe)
    return folder, recipe, corpus


def _serve(recipe, api_key=None, generate_only=False, **limits):
    from trtrag_cli.recipe.schema import load_recipe
    from trtrag_cli.serve.app import make_app
    from trtrag_cli.serve.run import running
    from trtrag_cli.serve.state import Service

    service = Service(load_recipe(recipe), generate_only).load()
    cfg = service.recipe.serve.model_copy(update=limits)
    return service, lambda **more: running(make_app(service, api_key, cfg.model_copy(update=more)), service)


@pytest.fixture(scope="module")
def rag(indexed):
    """The extractive RAG server with an API key; yields (url, service, app factory for other limits)."""
    _, recipe, _ = indexed
    service, start = _serve(recipe, KEY)
    with start() as url:
        yield url, service, start
    service.close()


@pytest.fixture(scope="module")
def lm(indexed, tiny_lm):
    """The same index answered by the tiny Llama (no key); yields (url, service, app factory)."""
    folder, _, _ = indexed
    recipe = _recipe(folder, answer={"generator": {"backend": "transformers", "model": str(tiny_lm),
                                                   "device": "cpu"}},
                     serve={"access_log": "off"})
    service, start = _serve(recipe)
    with start() as url:
        yield url, service, start
    service.close()


def _client(url, key=KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def _auth(key=KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


def _metrics(url) -> dict:
    """{(name, labels as a sorted tuple): value} of every sample in /metrics."""
    text = httpx.get(f"{url}/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _sample(metrics: dict, name: str, **labels) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in metrics.items() if n == name and want <= set(ls))


# ------------------------------------------------------------------------------- the RAG routes

def test_health_ready_models_and_public_routes(rag, indexed):
    url, service, _ = rag
    folder, _, _ = indexed
    current = (folder / "ws" / "ex" / "index" / "CURRENT").read_text().strip()
    health = httpx.get(f"{url}/health").json()
    assert health["status"] == "ok" and health["generation"] == current
    assert httpx.get(f"{url}/ready").status_code == 200
    assert httpx.get(f"{url}/metrics").status_code == 200
    ids = [m.id for m in _client(url).models.list().data]
    assert ids == ["trtrag-ex", "all-MiniLM-L6-v2"]  # extractive: no generator model


def test_ask_over_http_is_what_the_cli_prints(rag, indexed, cli):
    url, _, _ = rag
    _, recipe, _ = indexed
    local = cli.json("ask", QUESTION, "--recipe", recipe)
    for route in ("/v1/ask", "/ask"):
        reply = httpx.post(f"{url}{route}", json={"question": QUESTION}, headers=_auth())
        assert reply.status_code == 200 and reply.headers["x-request-id"]
        got = reply.json()
        assert set(got) == set(local)
        for key in ("question", "answer", "citations", "passages", "mode", "generation", "warnings"):
            assert got[key] == local[key], key
    remote = cli.json("ask", QUESTION, "--server", url, "--api-key", KEY, "--recipe", recipe)
    assert remote["answer"] == local["answer"] and remote["citations"] == local["citations"]
    text = cli("ask", QUESTION, "--server", url, "--api-key", KEY, "--recipe", recipe).stdout
    assert "policies/warranty-th-pg-series.md" in text and "[1]" in text


def test_ask_server_errors_are_one_line(rag, indexed, cli):
    url, _, _ = rag
    _, recipe, _ = indexed
    res = cli("ask", QUESTION, "--server", url, "--recipe", recipe, ok=False)
    assert res.exit_code == 1 and "HTTP 401" in res.output and "--api-key" in res.output
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    res = cli("ask", QUESTION, "--server", dead, "--recipe", recipe, ok=False)
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 1 and lines[0].startswith("error: cannot reach the server") and "Traceback" not in res.output


def test_retrieve_gives_passages_scores_and_timings(rag):
    url, _, _ = rag
    reply = httpx.post(f"{url}/v1/retrieve", headers=_auth(),
                       json={"query": "restocking fee for returning an opened sensor", "top_k": 3, "mode": "bm25"})
    got = reply.json()
    assert reply.status_code == 200 and got["mode"] == "bm25" and len(got["passages"]) == 3
    assert got["passages"][0]["source"] == "policies/returns-and-rma-policy.md"
    scores = [p["score"] for p in got["passages"]]
    assert scores == sorted(scores, reverse=True)
    assert set(got["timings_ms"]) == {"queue", "encode", "search", "rerank", "total"}


def test_embeddings_through_the_openai_client(rag):
    import numpy as np

    url, service, _ = rag
    client = _client(url)
    out = client.embeddings.create(model="all-MiniLM-L6-v2", input=["warranty period", "restocking fee"])
    vecs = np.array([d.embedding for d in out.data])
    assert vecs.shape == (2, 384) and np.allclose(np.linalg.norm(vecs, axis=1), 1, atol=1e-3)
    assert out.usage.prompt_tokens > 0
    one = client.embeddings.create(model="all-MiniLM-L6-v2", input="warranty period", encoding_format="float")
    assert np.allclose(one.data[0].embedding, vecs[0], atol=1e-5)
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="text-embedding-3-small", input="x")


def test_rag_chat_with_the_extractive_generator_streamed_or_not(rag):
    url, _, _ = rag
    client = _client(url)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
                {"role": "assistant", "content": "hi"}, {"role": "user", "content": QUESTION}]
    reply = client.chat.completions.create(model="trtrag-ex", messages=messages)
    extra = reply.model_extra
    assert reply.choices[0].finish_reason == "stop" and "[1]" in reply.choices[0].message.content
    assert extra["citations"] and extra["passages"][0]["source"] == "policies/warranty-th-pg-series.md"
    chunks = list(client.chat.completions.create(model="trtrag-ex", messages=messages, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reply.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finals] == ["stop"]
    assert finals[0].model_extra["citations"] == extra["citations"]
    assert chunks[0].model_extra["passages"] and chunks[-1].usage.completion_tokens > 0
    with pytest.raises(openai.NotFoundError):  # no generator to chat with directly
        client.chat.completions.create(model="no-such-model", messages=messages)


# ------------------------------------------------------------------------- limits and bad input

BAD = [
    ("/v1/ask", {"question": "q", "top_k": "5"}, 400),
    ("/v1/ask", {"question": "q", "top_k": -3}, 400),
    ("/v1/ask", {"question": None}, 400),
    ("/v1/ask", {"question": "   "}, 400),
    ("/v1/ask", {"question": 42}, 400),
    ("/v1/ask", {"question": "q", "mode": "fuzzy"}, 400),
    ("/v1/ask", ["question"], 400),
    ("/v1/ask", {"question": "x" * 9000}, 400),
    ("/v1/retrieve", {"query": "q", "top_k": 0}, 400),
    ("/v1/embeddings", {"input": [], "model": "all-MiniLM-L6-v2"}, 400),
    ("/v1/embeddings", {"input": [1, 2]}, 400),
    ("/v1/chat/completions", {"model": "trtrag-ex", "messages": "hi"}, 400),
    ("/v1/chat/completions", {"model": "trtrag-ex", "messages": [{"role": "user", "content": "q"}], "max_tokens": -5}, 400),
    ("/v1/chat/completions", {"model": "trtrag-ex", "messages": [{"role": "user", "content": "q"}], "seed": "abc"}, 400),
    ("/v1/chat/completions", {"model": "trtrag-ex", "messages": [{"role": "user", "content": "q"}], "n": 2}, 400),
    ("/v1/chat/completions", {"model": "trtrag-ex", "messages": [{"role": "user", "content": "q"}],
                              "stop": ["a", "b", "c", "d", "e"]}, 400),
    ("/v1/chat/completions", {"model": "trtrag-ex", "messages": [{"role": "user", "content": "q"}], "temperature": -1}, 400),
    ("/v1/chat/completions", {"model": "trtrag-ex", "messages": [{"role": "user", "content": "q"}], "top_p": 0}, 400),
    ("/v1/chat/completions", {"model": "trtrag-ex", "messages": [{"role": "user", "content": "q"}], "top_k": 1.5}, 400),
    ("/v1/no-such-route", {}, 404),
    ("/v1/ask", {"question": "x" * 60_000}, 413),  # serve.max_body_mb is 0.05 here
]


@pytest.mark.parametrize("path,body,status", BAD, ids=[f"{p}-{i}" for i, (p, _, _) in enumerate(BAD)])
def test_bad_requests_get_an_openai_error_document(rag, path, body, status):
    url, _, _ = rag
    reply = httpx.post(f"{url}{path}", json=body, headers=_auth())
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]


def test_invalid_json_chunked_oversize_and_unknown_get(rag):
    url, _, _ = rag
    reply = httpx.post(f"{url}/v1/ask", content=b"{not json", headers=_auth() | {"content-type": "application/json"})
    assert reply.status_code == 400 and reply.json()["error"]["message"] == "the body is not valid JSON"

    def chunks():  # no Content-Length: the limit counts the bytes as they come
        for _ in range(20):
            yield b" " * 4096

    reply = httpx.post(f"{url}/v1/ask", content=chunks(), headers=_auth() | {"content-type": "application/json"})
    assert reply.status_code == 413 and reply.json()["error"]["code"] == "body_too_large"
    assert httpx.get(f"{url}/nowhere").json()["error"]["code"] == "not_found"


def test_auth_on_v1_and_ask_but_not_on_health_ready_metrics(rag):
    url, _, _ = rag
    for path in ("/v1/models", "/v1/ask", "/ask"):
        for headers in ({}, _auth("wrong"), {"Authorization": KEY}):
            reply = httpx.request("GET" if path == "/v1/models" else "POST", f"{url}{path}",
                                  json={"question": QUESTION}, headers=headers)
            assert reply.status_code == 401 and reply.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        _client(url, "wrong").models.list()
    for path in ("/health", "/ready", "/metrics"):
        assert httpx.get(f"{url}{path}").status_code == 200


def test_request_id_is_echoed_or_made(rag):
    url, _, _ = rag
    assert httpx.get(f"{url}/health", headers={"X-Request-Id": "abc-123"}).headers["x-request-id"] == "abc-123"
    assert len(httpx.get(f"{url}/health").headers["x-request-id"]) == 32


def test_timeout_is_504_and_draining_is_not_ready(rag):
    url, service, start = rag
    with start(timeout_s=0.0001) as slow:
        reply = httpx.post(f"{slow}/v1/ask", json={"question": QUESTION}, headers=_auth())
        assert reply.status_code == 504 and reply.json()["error"]["code"] == "timeout"
    service.draining = True
    try:
        assert httpx.get(f"{url}/ready").status_code == 503
        assert httpx.get(f"{url}/health").json()["status"] == "draining"
    finally:
        service.draining = False


def test_metrics_count_requests_stages_and_the_index(rag, indexed):
    url, service, _ = rag
    before = _metrics(url)
    for _ in range(2):
        httpx.post(f"{url}/v1/ask", json={"question": QUESTION}, headers=_auth())
    httpx.post(f"{url}/v1/ask", json={"question": ""}, headers=_auth())
    after = _metrics(url)

    def moved(name, **labels):
        return _sample(after, name, **labels) - _sample(before, name, **labels)

    assert moved("trtrag_requests_total", route="/v1/ask", status="200") == 2
    assert moved("trtrag_requests_total", route="/v1/ask", status="400") == 1
    for stage in ("encode", "search", "rerank", "generate"):
        assert moved("trtrag_stage_duration_seconds_count", stage=stage) == 2
    assert moved("trtrag_queue_wait_seconds_count") == 3
    assert _sample(after, "trtrag_requests_in_flight") == 0
    chunks = len(service.pipeline().retriever.store)
    assert _sample(after, "trtrag_index_chunks") == chunks > 50
    # The stages' batch and token events land in the histograms
    from trtrag_cli.util.observe import emit

    emit("batch", stage="retrieve", size=4, wait_s=[0.001] * 4)
    emit("tokens", stage="generate", count=7)
    last = _metrics(url)
    assert _sample(last, "trtrag_batch_size_count", stage="retrieve") - _sample(after, "trtrag_batch_size_count",
                                                                               stage="retrieve") == 1
    assert _sample(last, "trtrag_tokens_generated_total") - _sample(after, "trtrag_tokens_generated_total") == 7


def test_requests_run_concurrently(rag):
    url, _, _ = rag
    results = []

    def ask(i):
        results.append(httpx.post(f"{url}/v1/ask", json={"question": f"{QUESTION} {i}"}, headers=_auth(),
                                  timeout=120).status_code)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 8


# ------------------------------------------------------------------------------- the language model

def _long_stream(url, client: httpx.Client, model: str, max_tokens: int = 480):
    """A plain generation of up to max_tokens, streamed; the response is returned open."""
    body = {"model": model, "messages": [{"role": "user", "content": "warranty"}], "stream": True,
            "max_tokens": max_tokens}
    return client.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120)


def test_models_and_rag_chat_with_the_tiny_llama(lm):
    url, service, _ = lm
    client = _client(url, "unused")
    ids = [m.id for m in client.models.list().data]
    assert ids[0].startswith("trtrag-ex") and ids[-1] == service.generator_id
    reply = client.chat.completions.create(model=ids[0], messages=[{"role": "user", "content": QUESTION}],
                                           max_tokens=8)
    assert reply.choices[0].finish_reason in ("length", "stop") and reply.usage.completion_tokens <= 8
    assert reply.usage.prompt_tokens > 50 and reply.model_extra["passages"]  # passages went into the prompt
    stream = client.chat.completions.create(model=ids[0], messages=[{"role": "user", "content": QUESTION}],
                                            max_tokens=8, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == reply.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason
    assert "citations" in chunks[-1].model_extra


def test_plain_generation_by_the_generator_model_id(lm):
    url, service, _ = lm
    client = _client(url, "unused")
    messages = [{"role": "user", "content": "How fast is the TH-50 replaced?"}]
    reply = client.chat.completions.create(model=service.generator_id, messages=messages, max_tokens=6)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 6
    assert "passages" not in reply.model_extra
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=service.generator_id, messages=messages, max_tokens=6, stream=True))
    assert streamed == reply.choices[0].message.content
    seeded = [client.chat.completions.create(model=service.generator_id, messages=messages, max_tokens=12,
                                             temperature=1.0, top_p=0.9, seed=s).choices[0].message.content
              for s in (5, 5)]
    assert seeded[0] == seeded[1]


def test_generation_bounds_follow_the_model_context(lm):
    url, service, _ = lm
    assert service.context == 512
    cases = [{"max_tokens": 600}, {"messages": [{"role": "user", "content": "warranty " * 600}]},
             {"model": service.generator_id, "max_tokens": 510}]
    for case in cases:
        body = {"model": "", "messages": [{"role": "user", "content": "warranty"}], **case}
        reply = httpx.post(f"{url}/v1/chat/completions", json=body)
        assert reply.status_code == 400 and reply.json()["error"]["code"] == "context_length_exceeded", reply.text


def test_a_stream_does_not_block_others_and_a_full_server_says_429(lm):
    url, service, start = lm
    with start(max_concurrent=1, max_queued=0) as tight, httpx.Client() as client:
        with _long_stream(tight, client, service.generator_id) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("data: ")  # the stream holds the only slot
            busy = httpx.post(f"{tight}/v1/ask", json={"question": QUESTION})
            assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
            assert busy.json()["error"]["type"] == "rate_limit_error"
            # ...while the server with room answers other requests meanwhile
            assert httpx.post(f"{url}/v1/ask", json={"question": QUESTION}, timeout=60).status_code == 200
            assert next(lines) is not None  # and the stream goes on


def test_a_client_leaving_mid_stream_cancels_its_generation(lm):
    url, service, _ = lm
    before = _sample(_metrics(url), "trtrag_streams_cancelled_total")
    with httpx.Client() as client, _long_stream(url, client, service.generator_id) as stream:
        assert next(stream.iter_lines()).startswith("data: ")
    for _ in range(300):  # the server notices at its next piece
        if _sample(_metrics(url), "trtrag_streams_cancelled_total") > before:
            break
        time.sleep(0.1)
    assert _sample(_metrics(url), "trtrag_streams_cancelled_total") == before + 1
    assert httpx.get(f"{url}/ready").status_code == 200


# --------------------------------------------------------------------------- the command itself

def _start(recipe, log, *args) -> tuple[subprocess.Popen, str]:
    """`trtrag serve` in a subprocess, stderr to the file log; returns it and its URL once /ready is 200."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "trtrag_cli", "serve", "--port", "0", "--recipe", str(recipe),
                             *args], stderr=log.open("w"), env=env, cwd=ROOT)
    url = None
    for _ in range(1200):
        first = log.read_text().split("\n", 1)[0]
        if first.startswith("serving on "):
            url = first.split()[-1]
            if httpx.get(f"{url}/ready").status_code == 200:
                return proc, url
        assert proc.poll() is None, log.read_text()
        time.sleep(0.1)
    raise AssertionError(f"the server did not get ready: {log.read_text()}")


def test_sigterm_finishes_the_request_in_flight_and_exits_0(indexed, tiny_lm):
    folder, _, _ = indexed
    recipe = _recipe(folder, answer={"generator": {"backend": "transformers", "model": str(tiny_lm),
                                                   "device": "cpu"}}, serve={"access_log": "json"})
    log = folder / "sigterm.log"
    proc, url = _start(recipe, log, "--generate-only")
    try:
        assert url.startswith("http://127.0.0.1:")
        with httpx.Client() as client, _long_stream(url, client, "any", 160) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("data: ")
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] in ("length", "stop")
        assert proc.wait(60) == 0
    finally:
        proc.kill()
        proc.wait()
    logged = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    chat = [e for e in logged if e["path"] == "/v1/chat/completions"]
    assert len(chat) == 1 and chat[0]["status"] == 200 and len(chat[0]["request_id"]) == 32


def test_port_in_use_or_a_bad_host_is_one_line_exit_1(indexed, cli):
    _, recipe, _ = indexed
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        res = cli("serve", "--port", taken.getsockname()[1], "--recipe", recipe, ok=False)
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 1 and len(lines) == 1 and "already in use" in lines[0] and "--port 0" in lines[0]
    res = cli("serve", "--host", "192.0.2.1", "--port", "0", "--recipe", recipe, ok=False)
    assert res.exit_code == 1 and res.output.startswith("error: cannot listen on 192.0.2.1")


# ---------------------------------------------------------------- the live index (last: it re-indexes)

def test_a_new_index_generation_is_served_between_requests(rag, indexed, cli):
    url, _, _ = rag
    _, recipe, corpus = indexed
    old = httpx.get(f"{url}/health").json()["generation"]
    (corpus / "zebra.md").write_text("# Zebra mode\n\nThe quokka zebra mode doubles the sampling rate.\n")
    cli.json("index", corpus, "--recipe", recipe)
    for _ in range(300):
        new = httpx.get(f"{url}/health").json()["generation"]
        httpx.post(f"{url}/v1/retrieve", json={"query": "quokka zebra"}, headers=_auth())  # requests switch
        if new != old:
            break
        time.sleep(0.1)
    assert new != old
    found = httpx.post(f"{url}/v1/retrieve", json={"query": "quokka zebra mode", "mode": "bm25"},
                       headers=_auth()).json()
    assert found["generation"] == new and found["passages"][0]["source"] == "zebra.md"
    assert _sample(_metrics(url), "trtrag_index_swaps_total") == 1
