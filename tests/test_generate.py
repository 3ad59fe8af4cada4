"""Language-model generation on the CPU: a tiny randomly initialised Llama and a tokenizer built here.

No hub: the tokenizer is trained on the example corpus with the `tokenizers` library and the model is a
2-layer Llama with random weights, so answers are gibberish, but everything around them is real:
prompts fitted in the model's tokens, greedy determinism, seeded sampling, stop sequences, streaming,
citations, the OpenAI-compatible node served on loopback and reached with the official `openai` client,
failover, a node that never answers, nodes that answer 429 or 500 or die mid-answer, and the extractive
fallback (answers and streams).
"""

from __future__ import annotations

import http.server
import json
import shutil
import socket
import threading
import time

import pytest

from trtrag_cli.generate.base import GenerationError, LanguageModelGenerator, SamplingParams, StopFilter
from trtrag_cli.generate.prompt import Prompt, build_prompt, citations
from trtrag_cli.util.errors import TrtragError


@pytest.fixture(scope="session")
def backend(tiny_lm):
    from trtrag_cli.generate.hf import TransformersBackend

    return TransformersBackend(str(tiny_lm), device="cpu")


PASSAGES = [{"n": i, "id": f"d{i}#0", "source": f"doc{i}.md", "file": f"doc{i}.md", "title": "",
             "text": f"Passage {i}: the TH-50 sensor is replaced within {i + 2} working days under warranty. " * 6}
            for i in range(1, 6)]


def _gen(backend, context=512, **params):
    return LanguageModelGenerator(backend, SamplingParams(**{"max_new_tokens": 24, **params}), context)


def test_greedy_is_deterministic_and_streaming_gives_the_same_text(backend):
    gen = _gen(backend)
    report = {}
    first = gen.answer("How fast is the TH-50 replaced?", PASSAGES[:2], report)
    last, prompt = report["generation"], report["prompt"]
    assert last.prompt_tokens == len(prompt.ids) and last.output_tokens > 0
    assert last.ttft_ms is not None and last.ttft_ms <= last.total_ms
    assert gen.answer("How fast is the TH-50 replaced?", PASSAGES[:2]) == first
    batch = backend.generate([prompt, prompt], gen.params)  # a batch of two, left-padded
    assert batch[0].text.strip() == batch[1].text.strip() == first


def test_seeded_sampling_repeats_and_another_seed_differs(backend):
    sampled = [_gen(backend, temperature=1.0, top_k=50, top_p=0.95, seed=seed, max_new_tokens=32)
               .answer("warranty?", PASSAGES[:1]) for seed in (7, 7, 8)]
    assert sampled[0] == sampled[1]
    assert sampled[0] != sampled[2]


def test_stop_sequences_end_the_answer_before_them_in_both_modes(backend):
    free = _gen(backend, max_new_tokens=40).answer("When?", PASSAGES[:1])
    assert len(free) > 12
    stop = free[8:11]
    assert stop.strip()
    expected = free[:free.index(stop)].strip()
    gen = _gen(backend, max_new_tokens=40, stop=(stop,))
    assert gen.answer("When?", PASSAGES[:1]) == expected
    assert "".join(gen.stream("When?", PASSAGES[:1])).strip() == expected
    # The stream never shows a partial stop sequence, even split across pieces.
    f = StopFilter(("STOP",))
    assert f.feed("abc ST") == "abc " and f.feed("O") == "" and f.feed("P more") == "" and f.stopped


def test_prompt_fits_the_context_in_model_tokens(backend):
    tok = backend.tokenizer
    prompt = build_prompt(tok, "How fast is the sensor replaced?", PASSAGES, context=300, max_new_tokens=64)
    assert len(prompt.ids) <= 300 - 64
    assert 0 < len(prompt.passages) < len(PASSAGES) and prompt.dropped == len(PASSAGES) - len(prompt.passages)
    assert "<|assistant|>" in prompt.text  # rendered through the tokenizer's chat template
    roomy = build_prompt(tok, "q?", PASSAGES, context=512, max_new_tokens=16)
    assert len(roomy.ids) > len(prompt.ids) and len(roomy.ids) <= 496
    if prompt.cut:  # a cut passage ends on a token boundary of the model's tokenizer, not mid-character
        assert prompt.passages[-1]["text"] in PASSAGES[len(prompt.passages) - 1]["text"]
    with pytest.raises(TrtragError, match="leaves"):
        build_prompt(tok, "why " * 400, PASSAGES, context=300, max_new_tokens=64)


@pytest.fixture(scope="module")
def fast(tiny_lm):
    """The same model through our own decoder (graph_decode.py); on the CPU it runs without CUDA graphs."""
    from trtrag_cli.generate.hf import TransformersBackend

    return TransformersBackend(str(tiny_lm), device="cpu", decode="graph")


def test_fast_decoder_matches_transformers_token_for_token(backend, fast):
    import torch

    tok = backend.tokenizer
    prompts = [build_prompt(tok, q, PASSAGES[:k], context=512, max_new_tokens=40)
               for q, k in (("How fast is the TH-50 replaced?", 2), ("warranty?", 1))]
    assert len(prompts[0].ids) != len(prompts[1].ids)
    # Logits of the prompt: fused weights, our RoPE/RMSNorm/attention against transformers' forward.
    dec = fast.decoder
    dec._ensure_cache(2, 512)
    with torch.inference_mode():
        ours = dec.prefill(prompts[1].ids, 1)
        theirs = backend.model(torch.tensor([prompts[1].ids])).logits[0, -1]
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4)
    greedy = SamplingParams(max_new_tokens=40)
    expected = [backend.generate([p], greedy)[0] for p in prompts]     # transformers, one prompt at a time
    got = fast.generate(prompts, greedy)                                 # both rows in one ragged batch
    assert [g.text for g in got] == [e.text for e in expected]
    assert [g.output_tokens for g in got] == [e.output_tokens for e in expected]
    sampled = SamplingParams(max_new_tokens=24, temperature=1.0, top_k=50, top_p=0.9, seed=3)
    runs = [fast.generate(prompts[:1], sampled)[0].text for _ in range(2)]
    assert runs[0] == runs[1] and runs[0] != got[0].text
    stop = got[0].text[6:9]
    cut = SamplingParams(max_new_tokens=40, stop=(stop,))
    before = got[0].text[:got[0].text.index(stop)]
    assert fast.generate(prompts[:1], cut)[0].text == before
    assert "".join(fast.stream(prompts[0], cut)) == before


def test_citations_map_back_to_sources():
    got = citations("Replaced in 3 days [2], see also [2] and [9] and [1].", PASSAGES[:3])
    assert [(c["n"], c["source"]) for c in got] == [(1, "doc1.md"), (2, "doc2.md")]


def test_bad_model_paths_are_one_line_errors(tmp_path, tiny_lm):
    from trtrag_cli.generate.hf import TransformersBackend

    with pytest.raises(TrtragError, match="does not exist"):
        TransformersBackend(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrtragError, match="no config.json"):
        TransformersBackend(str(tmp_path / "empty"))
    from trtrag_cli.encode.models import model_dir

    with pytest.raises(TrtragError, match="not a causal language model"):
        TransformersBackend(str(model_dir("all-MiniLM-L6-v2")))


# ------------------------------------------------------------------------------------ the HTTP node

@pytest.fixture(scope="module")
def node(tiny_lm):
    """`trtrag serve --generate-only` on loopback, over the tiny model (served as 'tiny')."""
    from trtrag_cli.recipe.schema import load_recipe
    from trtrag_cli.serve.app import make_app
    from trtrag_cli.serve.run import running
    from trtrag_cli.serve.state import Service

    recipe = load_recipe(None, [f"answer.generator={{backend: transformers, model: {tiny_lm}, device: cpu}}",
                                "serve.access_log='off'"])
    service = Service(recipe, generate_only=True).load()
    service.generator_id = "tiny"
    with running(make_app(service), service) as url:
        yield f"{url}/v1", service
    service.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_openai_backend_fails_over_to_a_live_node_and_matches_local_generation(node, tiny_lm, backend):
    from trtrag_cli.generate.openai_node import OpenAIBackend

    url, service = node
    dead = f"http://127.0.0.1:{_free_port()}/v1"
    remote = OpenAIBackend([dead, url], "tiny", str(tiny_lm), timeout_s=30)
    local = _gen(backend)
    report = {}
    want = local.answer("How fast is the TH-50 replaced?", PASSAGES[:2], report)
    for _ in range(2):  # round-robin starts at the dead node once: failover must hide it
        got = _gen(remote).answer("How fast is the TH-50 replaced?", PASSAGES[:2])
        assert got == want
    gen = _gen(remote)
    assert "".join(gen.stream("How fast is the TH-50 replaced?", PASSAGES[:2])).strip() == want
    replies = remote.generate([report["prompt"]] * 3, local.params)
    assert [r.extra["node"] for r in replies].count(url) == 3 and replies[0].output_tokens > 0


def test_concurrent_requests_are_batched_on_the_node(node, tiny_lm, backend):
    import openai

    url, service = node
    from trtrag_cli.util import observe

    client = openai.OpenAI(base_url=url, api_key="x", max_retries=0)
    sizes: list[int] = []
    unsubscribe = observe.subscribe(lambda event, **f: sizes.append(f["size"])
                                    if event == "batch" and f.get("stage") == "generate" else None)
    results = []

    def ask(i):
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": f"q {i % 2}"}],
                                           max_tokens=8, temperature=0)
        results.append((i % 2, r.choices[0].message.content))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    unsubscribe()
    assert sum(sizes) == 8 and max(sizes) > 1  # some requests shared a generate call (the backend's batching)
    assert len({text for key, text in results if key == 0}) == 1  # batching does not change greedy answers


def test_nodes_down_or_silent_fail_fast_with_a_clear_error(tiny_lm, backend):
    from trtrag_cli.generate.openai_node import OpenAIBackend

    prompt = build_prompt(backend.tokenizer, "q?", PASSAGES[:1], 512, 8)
    down = OpenAIBackend([f"http://127.0.0.1:{_free_port()}/v1"], "tiny", str(tiny_lm), timeout_s=5)
    with pytest.raises(TrtragError, match="no generation node answered"):
        down.generate([prompt], SamplingParams(max_new_tokens=8))
    # A node that accepts the connection and never answers: the timeout ends it, not a hang.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)
    try:
        slow = OpenAIBackend([f"http://127.0.0.1:{silent.getsockname()[1]}/v1"], "tiny", str(tiny_lm), timeout_s=1)
        t = time.perf_counter()
        with pytest.raises(TrtragError, match="APITimeoutError"):
            slow.generate([prompt], SamplingParams(max_new_tokens=8))
        assert time.perf_counter() - t < 10
    finally:
        silent.close()
    with pytest.raises(TrtragError, match="base_urls is empty"):
        OpenAIBackend([], "tiny", str(tiny_lm))


# ------------------------------------------------------------------- failing nodes and the fallback

class _FailingNode(http.server.BaseHTTPRequestHandler):
    """Answers every chat completion with the server's `status`; 'dying' streams a piece, then hangs up."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.server.status == "dying" and body.get("stream"):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Content-Length", "100000")  # promised, never sent: the node died
            self.end_headers()
            chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "tiny",
                     "choices": [{"index": 0, "delta": {"content": "The first words"}, "finish_reason": None}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()
            self.close_connection = True
            return
        status = 500 if self.server.status == "dying" else self.server.status
        reply = json.dumps({"error": {"message": f"the node says {status}", "type": "error", "code": status}})
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply.encode())

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def failing():
    """Loopback nodes answering 429, 500 or 404, and one that dies mid-stream: status -> base URL."""
    servers = {}
    for status in (429, 500, 404, "dying"):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FailingNode)
        server.status = status
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers[status] = server
    yield {status: f"http://127.0.0.1:{server.server_address[1]}/v1" for status, server in servers.items()}
    for server in servers.values():
        server.shutdown()
        server.server_close()


def test_rate_limited_or_failing_nodes_raise_one_generation_error(failing, node, tiny_lm, backend):
    from trtrag_cli.generate.openai_node import OpenAIBackend

    prompt = build_prompt(backend.tokenizer, "q?", PASSAGES[:1], 512, 8)
    params = SamplingParams(max_new_tokens=8)
    busy = OpenAIBackend([failing[429], failing[500]], "tiny", str(tiny_lm))
    with pytest.raises(GenerationError, match="no generation node answered") as err:
        busy.generate([prompt], params)
    assert "HTTP 429 RateLimitError" in err.value.message and "HTTP 500 InternalServerError" in err.value.message
    assert "answer.fallback: extractive" in err.value.hint
    with pytest.raises(GenerationError, match="HTTP 429 RateLimitError"):
        list(busy.stream(prompt, params))
    # A rate-limited node is skipped for a live one.
    url, _ = node
    live = OpenAIBackend([failing[429], url], "tiny", str(tiny_lm))
    assert [live.generate([prompt], params)[0].extra["node"] for _ in range(2)] == [url, url]
    # A refusal every node would repeat fails at once, with its fix.
    with pytest.raises(GenerationError, match=r"refused the request: HTTP 404 NotFoundError: the node says 404") as err:
        OpenAIBackend([failing[404], url], "tiny", str(tiny_lm)).generate([prompt], params)
    assert "answer.generator.served_model" in err.value.hint


class _CountingNode(http.server.BaseHTTPRequestHandler):
    """A chat-completions node that counts requests and those in flight at once, answering with the
    server's `status` (200: a short completion, once `gather` requests are in, or after 10 s)."""

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        srv = self.server
        with srv.lock:
            srv.hits += 1
            srv.in_flight += 1
            srv.max_in_flight = max(srv.max_in_flight, srv.in_flight)
            if srv.in_flight >= srv.gather:
                srv.gathered.set()
        try:
            if srv.status == 200:
                srv.gathered.wait(10)
                reply = {"id": "c", "object": "chat.completion", "created": 0, "model": "tiny",
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": "It is [1]."},
                                      "finish_reason": "stop"}],
                         "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}
            else:
                reply = {"error": {"message": f"the node says {srv.status}", "type": "error", "code": srv.status}}
            data = json.dumps(reply).encode()
            self.send_response(srv.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        finally:
            with srv.lock:
                srv.in_flight -= 1

    def log_message(self, *args):
        pass


@pytest.fixture
def counting():
    """Start loopback counting nodes: counting(status, gather=1) -> server (its URL in server.url)."""
    servers = []

    def start(status: int, gather: int = 1):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _CountingNode)
        server.status, server.gather, server.hits, server.in_flight, server.max_in_flight = status, gather, 0, 0, 0
        server.lock, server.gathered = threading.Lock(), threading.Event()
        server.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_concurrent_callers_reach_the_node_concurrently(counting, tiny_lm, backend):
    from trtrag_cli.generate.openai_node import OpenAIBackend

    prompt = build_prompt(backend.tokenizer, "q?", PASSAGES[:1], 512, 8)
    params = SamplingParams(max_new_tokens=8)
    node = counting(200, gather=4)  # answers once 4 requests are in at once
    remote = OpenAIBackend([node.url], "tiny", str(tiny_lm), timeout_s=30)
    replies = remote.generate([prompt] * 4, params)  # one call, four prompts: all in flight together
    assert [r.text for r in replies] == ["It is [1]."] * 4 and node.max_in_flight == 4
    node.gathered.clear()
    node.max_in_flight, node.gather = 0, 6
    got = []
    threads = [threading.Thread(target=lambda: got.append(remote.generate([prompt], params)[0].text))
               for _ in range(6)]  # six threads sharing one backend (what serve does)
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert got == ["It is [1]."] * 6 and node.max_in_flight == 6
    remote.close()


def test_a_failed_node_cools_down_and_is_retried_after(counting, tiny_lm, backend):
    from trtrag_cli.generate.openai_node import OpenAIBackend

    prompt = build_prompt(backend.tokenizer, "q?", PASSAGES[:1], 512, 8)
    params = SamplingParams(max_new_tokens=8)
    broken, good = counting(500), counting(200)
    dead = f"http://127.0.0.1:{_free_port()}/v1"
    remote = OpenAIBackend([dead, broken.url, good.url], "tiny", str(tiny_lm), cooldown_s=60)
    assert remote.generate([prompt], params)[0].extra["node"] == good.url  # after the dead and the broken one
    assert broken.hits == 1 and [h["ok"] for h in remote.health()] == [False, False, True]
    assert remote.health()[0]["last_error"] == "APIConnectionError" and remote.health()[1]["cooldown_s"] > 30
    for _ in range(3):  # cooling nodes are not asked again
        assert remote.generate([prompt], params)[0].extra["node"] == good.url
    assert broken.hits == 1
    # All nodes cooling down: the one whose cool-down ends first is asked, not none.
    both = OpenAIBackend([broken.url, dead], "tiny", str(tiny_lm), cooldown_s=60)
    with pytest.raises(GenerationError) as err:
        both.generate([prompt], params)
    assert broken.hits == 2
    with pytest.raises(GenerationError, match="HTTP 500") as err:
        both.generate([prompt], params)
    assert broken.hits == 3 and "cooling down" in err.value.message  # the dead one was left out
    # A short cool-down passes; the node, fixed meanwhile, is asked again and its record cleared.
    quick = OpenAIBackend([broken.url, good.url], "tiny", str(tiny_lm), cooldown_s=0.2)
    quick.generate([prompt], params)
    assert broken.hits == 4 and quick.health()[0]["failures"] == 1
    broken.status = 200
    time.sleep(0.5)  # past the cool-down (not a timing assertion: only what happens after it is checked)
    nodes = {quick.generate([prompt], params)[0].extra["node"] for _ in range(2)}
    assert broken.hits == 5 and broken.url in nodes and quick.health()[0] == {
        "url": broken.url, "ok": True, "failures": 0, "cooldown_s": 0.0, "last_error": None}


def test_a_torch_runtime_error_is_a_generation_error(backend):
    empty = Prompt("", [], [])  # transformers cannot reshape an empty prompt: a RuntimeError from torch
    with pytest.raises(GenerationError, match="the transformers generator failed: RuntimeError") as err:
        backend.generate([empty], SamplingParams(max_new_tokens=4))
    assert isinstance(err.value.__cause__, RuntimeError)
    with pytest.raises(GenerationError, match="RuntimeError"):
        list(backend.stream(empty, SamplingParams(max_new_tokens=4)))


def _extractive():
    from trtrag_cli.generate.extractive import ExtractiveGenerator
    from trtrag_cli.index.bm25 import LexicalIndex
    from trtrag_cli.recipe.schema import LexicalConfig

    lexical = LexicalIndex.from_texts(LexicalConfig(), [p["text"] for p in PASSAGES])
    return ExtractiveGenerator(lexical)


def test_the_fallback_answers_and_streams_before_the_first_piece_only(failing, tiny_lm, backend):
    from trtrag_cli.generate.openai_node import OpenAIBackend
    from trtrag_cli.generate.registry import FallbackGenerator

    question, passages = "How fast is the TH-50 replaced?", PASSAGES[:2]
    extractive = _extractive()
    expected = extractive.answer(question, passages)
    down = FallbackGenerator(_gen(OpenAIBackend([failing[500]], "tiny", str(tiny_lm))), extractive)
    report = {}
    assert down.answer(question, passages, report) == expected
    assert "HTTP 500" in report["warning"] and report["generation"] is None
    # Before the first piece, the stream is the extractive answer, in one piece.
    report = {}
    assert list(down.stream(question, passages, report)) == [expected]
    assert "answered extractively" in report["warning"] and report["generation"] is None
    # After a piece was sent, no second answer is mixed in: the stream ends with an error that says so.
    dying = FallbackGenerator(_gen(OpenAIBackend([failing["dying"]], "tiny", str(tiny_lm))), extractive)
    got, report = [], {}
    with pytest.raises(GenerationError, match="failed mid-answer") as err:
        for piece in dying.stream(question, passages, report):
            got.append(piece)
    assert got == ["The first words"] and "incomplete" in err.value.message and "warning" not in report
    # A prompt that cannot fit the model's context is this request's failure too.
    cramped = FallbackGenerator(_gen(backend, context=40), extractive)
    report = {}
    assert cramped.answer(question, passages, report) == expected and "context" in report["warning"]


def test_ask_falls_back_when_nodes_answer_429_and_500(cli, make_recipe, corpus_copy, tiny_lm, failing):
    recipe = make_recipe(name="busy", answer={"generator": {"backend": "openai", "model": str(tiny_lm),
                                                            "base_urls": [failing[429], failing[500]]}})
    cli("index", corpus_copy, "--recipe", recipe)
    question = "Can I get an advance replacement for a faulty TH-50 sensor?"
    out = cli("ask", question, "--recipe", recipe, ok=False)
    lines = out.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no generation node answered") and "HTTP 429" in lines[0]
    saved = cli.json("ask", question, "--recipe", recipe, "--set", "answer.fallback=extractive")
    assert saved["generation"] is None and saved["citations"]
    assert any("answered extractively" in w and "HTTP 500" in w for w in saved["warnings"])
    streamed = cli("ask", question, "--stream", "--recipe", recipe, "--set", "answer.fallback=extractive")
    assert streamed.stdout.count(saved["answer"]) == 1 and "answered extractively" in streamed.output


# ------------------------------------------------------------------------------------ through ask

def test_ask_with_a_language_model_streams_reports_tokens_and_falls_back(cli, make_recipe, corpus_copy, tiny_lm):
    answer = {"generator": {"backend": "transformers", "model": str(tiny_lm), "device": "cpu"},
              "sampling": {"max_new_tokens": 16}}
    recipe = make_recipe(answer=answer)
    cli("index", corpus_copy, "--recipe", recipe)
    rep = cli.json("ask", "Can I get an advance replacement for a faulty TH-50 sensor?", "--recipe", recipe)
    gen = rep["generation"]
    assert gen["generator"] == "transformers" and gen["output_tokens"] > 0 and gen["prompt_tokens"] > 50
    assert gen["ttft_ms"] > 0 and 1 <= gen["passages_in_prompt"] <= 3
    # The tiny tokenizer spends many tokens per word: what did not fit in 512 is said, not silently lost.
    dropped = gen["passages_dropped"]
    assert dropped == 3 - gen["passages_in_prompt"]
    assert not dropped or any("did not fit" in w for w in rep["warnings"])
    streamed = cli("ask", "Can I get an advance replacement for a faulty TH-50 sensor?", "--stream",
                   "--recipe", recipe)
    assert rep["answer"] in streamed.stdout  # greedy: the streamed text is the same answer
    dead = make_recipe(name="dead", answer={"generator": {"backend": "openai", "model": str(tiny_lm), "timeout_s": 2,
                                                          "base_urls": [f"http://127.0.0.1:{_free_port()}/v1"]}})
    cli("index", corpus_copy, "--recipe", dead)
    out = cli("ask", "TH-50 replacement?", "--recipe", dead, ok=False)
    assert "no generation node answered" in out.output and "answer.fallback: extractive" in out.output
    saved = cli.json("ask", "TH-50 replacement?", "--recipe", dead, "--set", "answer.fallback=extractive")
    assert saved["citations"] and any("answered extractively" in w for w in saved["warnings"])
    assert saved["generation"] is None


def test_build_engine_prepares_the_generator(cli, make_recipe, tiny_lm, node):
    rep = cli.json("build-engine", "--generator", "--recipe", make_recipe(
        answer={"generator": {"backend": "transformers", "model": str(tiny_lm), "device": "cpu"}}))
    assert rep["context"] == 512 and [w["prompt_tokens"] for w in rep["warm_up"]] == [128, 496]
    assert all(w["output_tokens"] > 0 for w in rep["warm_up"])
    url, _ = node
    dead = f"http://127.0.0.1:{_free_port()}/v1"
    rep = cli.json("build-engine", "--generator", "--recipe", make_recipe(
        name="nodes", answer={"generator": {"backend": "openai", "model": str(tiny_lm), "base_urls": [dead, url]}}))
    assert [n["ok"] for n in rep["nodes"]] == [False, True] and rep["nodes"][1]["models"] == ["tiny"]
    out = cli("build-engine", "--generator", "--recipe", make_recipe(name="none"), ok=False)
    assert "nothing" in out.output or "no generator to build" in out.output


def test_bench_times_the_generator(cli, make_recipe, tiny_lm):
    recipe = make_recipe(answer={"generator": {"backend": "transformers", "model": str(tiny_lm), "device": "cpu"}})
    rep = cli.json("bench", "--no-search", "--generate", "--prompt-lengths", "32,128,4096", "--gen-batch", "1,2",
                   "--new-tokens", "8", "--reps", "2", "--recipe", recipe)
    gen = rep["generation"]
    assert gen["generator"] == "transformers" and gen["new_tokens"] == 8
    assert set(gen["ttft_ms"]) == {"32", "128"}  # 4096 does not fit the 512-token model: skipped, not faked
    assert all(v > 0 for v in gen["ttft_ms"].values()) and all(v > 0 for v in gen["decode_tok_s"].values())
    assert set(gen["gpu_during"]) == {"ttft", "decode_1", "decode_2"}   # the card's clock and power, where seen
    if not shutil.which("nvidia-smi"):
        assert all(seen == {} for seen in gen["gpu_during"].values())
    assert "search" not in rep
    out = cli("bench", "--no-search", "--generate", "--recipe", make_recipe(name="x"), ok=False)
    assert "answer.generator.backend is extractive" in out.output
