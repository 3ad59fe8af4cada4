"""Continuous batching on the CPU (decode/scheduler.py) with the tiny random Llama: concurrent requests share
decode steps and each gets the tokens it would get alone; requests join a running batch, leave it when they
end or are cancelled, and keep their own sampling, stop strings and end ids.

The scheduler thread is paused where a test needs a batch to be running (a request whose stop check waits
on an event), so no assertion depends on timing.
"""

from __future__ import annotations

import threading
import time

import pytest

from trtrag_cli.generate.base import LanguageModelGenerator, SamplingParams
from trtrag_cli.generate.decode.scheduler import Request
from trtrag_cli.generate.prompt import build_prompt
from trtrag_cli.util import observe

QUESTIONS = ["How fast is the TH-50 replaced?", "warranty?", "Who pays for shipping a faulty sensor back?",
             "Can I get an advance replacement?"]
PASSAGES = [{"n": i, "id": f"d{i}#0", "source": f"doc{i}.md", "file": f"doc{i}.md", "title": "",
             "text": f"Passage {i}: the TH-50 sensor is replaced within {i + 2} working days under warranty. " * 3}
            for i in range(1, 5)]


@pytest.fixture(scope="module")
def fast(tiny_lm):
    from trtrag_cli.generate.hf import TransformersBackend

    backend = TransformersBackend(str(tiny_lm), device="cpu", decode="graph", max_batch=16)
    yield backend
    backend.close()


@pytest.fixture
def events():
    seen: list[tuple[str, dict]] = []
    unsubscribe = observe.subscribe(lambda event, **fields: seen.append((event, fields)))
    yield seen
    unsubscribe()


def _prompts(backend, n: int) -> list:
    """n prompts of different lengths (question i % 4 with 1 to 4 passages)."""
    return [build_prompt(backend.tokenizer, QUESTIONS[i % 4], PASSAGES[:1 + (i // 4) % 4], 512, 64) for i in range(n)]


def _wait_until(condition, what: str, limit_s: float = 120.0) -> None:
    """Poll until condition() holds; a hang is a failure, not a stuck test run."""
    end = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > end:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.002)


class Pause:
    """A request whose first stop check holds the scheduler thread until release(): the batch it is in keeps
    running only after the test has queued what it needs."""

    def __init__(self, scheduler, ids: list[int], max_new_tokens: int = 40):
        self.reached, self.go = threading.Event(), threading.Event()
        self.request = scheduler.submit(Request(ids, max_new_tokens, should_stop=self._check))

    def _check(self, out: list[int]) -> bool:
        if not self.reached.is_set():
            self.reached.set()
            self.go.wait(120)
        return False

    def release(self) -> None:
        self.go.set()


def _params(i: int) -> SamplingParams:
    """Mixed settings: greedy, sampled with seeds, different max_new_tokens."""
    if i % 3 == 2:
        return SamplingParams(max_new_tokens=12 + i, temperature=0.9, top_k=40, top_p=0.9, seed=i)
    return SamplingParams(max_new_tokens=10 + 2 * i)


def _streamed_together(fast, scheduler, gate, prompts, settings) -> list[str]:
    """Each prompt streamed on its own thread; all are queued behind the paused gate, then released together."""
    got: list = [None] * len(prompts)

    def run(i: int) -> None:
        got[i] = "".join(fast.stream(prompts[i], settings[i]))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    _wait_until(lambda: len(scheduler._queue) == len(prompts), f"{len(prompts)} queued streams")
    gate.release()
    for t in threads:
        t.join()
    return got


def test_sixteen_concurrent_streams_each_match_their_text_alone(fast, events):
    prompts = _prompts(fast, 16)
    assert len({len(p.ids) for p in prompts}) > 4
    alone = ["".join(fast.stream(p, _params(i))) for i, p in enumerate(prompts)]
    scheduler = fast.decoder.start_scheduler()
    gate = Pause(scheduler, prompts[0].ids)
    gate.reached.wait(120)
    got = _streamed_together(fast, scheduler, gate, prompts, [_params(i) for i in range(16)])
    gate.request.result()
    assert got == alone
    sizes = [fields["size"] for event, fields in events if event == "batch"]
    assert max(sizes) == 16       # the gate and 15 streams; the 16th joined when a row came free
    assert all(len(fields["wait_s"]) >= 1 for event, fields in events if event == "batch")
    assert sum(fields["count"] for event, fields in events if event == "tokens") > 0
    _wait_until(lambda: scheduler.active == 0, "an idle scheduler")


def test_requests_of_other_lengths_join_a_running_batch_and_keep_end_ids(fast, events):
    prompts = _prompts(fast, 6)
    scheduler = fast.decoder.start_scheduler()
    plain = [scheduler.submit(Request(p.ids, 20)).result() for p in prompts[1:4]]
    end_id = plain[1][6]          # an "end of sequence" that the second prompt reaches at its 7th token
    wants = [(20, frozenset(), plain[0]), (9, frozenset(), plain[1][:9]),
             (20, frozenset({end_id}), plain[1][:plain[1].index(end_id)]), (3, frozenset(), plain[2][:3])]
    gate = Pause(scheduler, prompts[0].ids, 60)
    gate.reached.wait(120)        # the gate is decoding: what comes now joins mid-way
    ids = [prompts[1], prompts[2], prompts[2], prompts[3]]
    joined = [scheduler.submit(Request(p.ids, n, stop_ids=stop)) for p, (n, stop, _) in zip(ids, wants)]
    gate.release()
    assert [r.result() for r in joined] == [want for _, _, want in wants]
    assert joined[2].finish == "stop" and joined[1].finish == "length"
    assert any(event == "batch" and fields["size"] == 5 for event, fields in events)
    gate.request.result()


def test_closing_a_stream_cancels_it_and_frees_its_row(fast):
    prompts = _prompts(fast, 2)
    gen = LanguageModelGenerator(fast, SamplingParams(max_new_tokens=250), 512)
    scheduler = fast.decoder.start_scheduler()
    stream = gen.stream(QUESTIONS[0], PASSAGES[:1])
    assert next(stream)
    assert scheduler.active == 1
    stream.close()                # GeneratorExit: the client went away
    after = fast.generate([prompts[1]], SamplingParams(max_new_tokens=8))[0]
    assert after.output_tokens == 8
    assert scheduler.active == 0
    # The same through the request itself, and a request cancelled while it waits in the queue.
    gate = Pause(scheduler, prompts[0].ids, 60)
    gate.reached.wait(120)
    running = scheduler.submit(Request(prompts[1].ids, 200, stream=True))
    gate.release()
    first = next(running.updates())
    running.cancel()
    assert running.finish is None or running.finish == "cancelled"
    out = running.result()
    assert running.finish == "cancelled" and len(first) <= len(out) < 200
    late = Request(prompts[1].ids, 200)
    late.cancel()
    assert scheduler.submit(late).result() == [] and late.finish == "cancelled"
    gate.request.result()
    _wait_until(lambda: scheduler.active == 0, "an idle scheduler")


def test_sampling_settings_and_stop_strings_stay_per_row(fast):
    prompts = _prompts(fast, 4)
    greedy = SamplingParams(max_new_tokens=24)
    free = fast.generate([prompts[0]], greedy)[0].text
    stop = free[6:9]
    assert stop.strip()
    settings = [SamplingParams(max_new_tokens=24, stop=(stop,)),
                SamplingParams(max_new_tokens=24, temperature=1.0, top_k=50, top_p=0.9, seed=3),
                SamplingParams(max_new_tokens=24, temperature=0.7, seed=4),
                greedy]
    alone = [fast.generate([p], s)[0].text for p, s in zip(prompts, settings)]
    assert alone[0] == free[:free.index(stop)]
    assert alone[1] != fast.generate([prompts[1]], greedy)[0].text      # it did sample
    scheduler = fast.decoder.start_scheduler()
    gate = Pause(scheduler, prompts[3].ids)
    gate.reached.wait(120)
    got = _streamed_together(fast, scheduler, gate, prompts[:4], settings)
    assert got == alone


def test_transformers_generate_batches_requests_that_arrive_together(tiny_lm, events):
    """Other architectures (here: decode=transformers) batch per request: one generate call at a time."""
    from trtrag_cli.generate.hf import TransformersBackend

    backend = TransformersBackend(str(tiny_lm), device="cpu", decode="transformers", max_batch=4)
    try:
        prompts = _prompts(backend, 4)
        params = SamplingParams(max_new_tokens=12)
        alone = [backend.generate([p], params)[0].text for p in prompts]
        got: list = [None] * 4

        def run(i: int) -> None:
            got[i] = "".join(backend.stream(prompts[i], params)).strip()

        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert got == [a.strip() for a in alone]
        stream = backend.stream(prompts[0], SamplingParams(max_new_tokens=200))
        next(stream)
        stream.close()            # cancelled: the stopping criterion ends its row
        assert backend.generate([prompts[1]], params)[0].text == alone[1]
    finally:
        backend.close()
