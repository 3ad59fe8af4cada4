"""The dynamic batcher: real threads, results in order, batches bounded, errors delivered, clean close."""

from __future__ import annotations

import threading
import time

import pytest

from trtrag_cli.retrieve.batcher import Batcher
from trtrag_cli.util.errors import TrtragError


def test_concurrent_callers_get_their_own_results_in_bounded_batches():
    gate = threading.Event()

    def work(items):
        gate.wait(5)  # hold the first batch so the others pile up behind it
        return [x * x for x in items]

    with Batcher(work, max_batch=8, max_wait_ms=50) as b:
        futures = [b.submit(i) for i in range(30)]
        gate.set()
        assert [f.result(5) for f in futures] == [i * i for i in range(30)]
    assert sum(b.batches) == 30 and max(b.batches) <= 8 and len(b.batches) < 30


def test_a_lone_caller_is_not_held_back_with_zero_wait():
    with Batcher(lambda items: items, max_batch=64, max_wait_ms=0) as b:
        t = time.perf_counter()
        for i in range(20):
            assert b(i, timeout=5) == i
        assert time.perf_counter() - t < 5
    assert b.batches == [1] * 20


def test_a_failing_batch_fails_each_of_its_callers_and_the_worker_goes_on():
    def work(items):
        if "bad" in items:
            raise ValueError("bad item")
        return items

    with Batcher(work, max_batch=1) as b:
        with pytest.raises(ValueError, match="bad item"):
            b("bad", timeout=5)
        assert b("good", timeout=5) == "good"


def test_wrong_result_count_and_bad_settings_are_errors():
    with Batcher(lambda items: items[:-1], max_batch=4) as b:
        with pytest.raises(RuntimeError, match="0 results for 1"):
            b(1, timeout=5)
    with pytest.raises(TrtragError, match="max_batch"):
        Batcher(lambda items: items, max_batch=0)
    b = Batcher(lambda items: items)
    b.close()
    with pytest.raises(RuntimeError, match="closed"):
        b.submit(1)


def test_a_named_stage_emits_each_batch_with_its_queue_waits():
    from trtrag_cli.util import observe

    seen = []
    unsubscribe = observe.subscribe(lambda event, **fields: seen.append((event, fields)))
    gate = threading.Event()
    try:
        with Batcher(lambda items: gate.wait(5) and items, max_batch=4, max_wait_ms=0, stage="retrieve") as b:
            futures = [b.submit(i) for i in range(6)]
            gate.set()
            assert [f.result(5) for f in futures] == list(range(6))
        with Batcher(lambda items: items, max_batch=4) as quiet:  # no stage: nothing emitted
            quiet(1, timeout=5)
    finally:
        unsubscribe()
    assert [e for e, _ in seen] == ["batch"] * len(b.batches)
    assert [f["size"] for _, f in seen] == b.batches and sum(b.batches) == 6
    assert all(f["stage"] == "retrieve" and len(f["wait_s"]) == f["size"] and min(f["wait_s"]) >= 0 for _, f in seen)


def test_several_workers_run_batches_at_once_and_close_cleanly():
    """Two workers: a second batch starts while the first is still running (each waits for the other)."""
    both_running = threading.Barrier(2, timeout=10)

    def fn(items):
        both_running.wait()  # only passes when two batches are inside fn at the same time
        return [i * 2 for i in items]

    batcher = Batcher(fn, max_batch=1, max_wait_ms=0, workers=2)
    results = {}
    callers = [threading.Thread(target=lambda i=i: results.update({i: batcher(i, timeout=10)})) for i in (1, 2)]
    for t in callers:
        t.start()
    for t in callers:
        t.join()
    batcher.close()
    assert results == {1: 2, 2: 4} and sorted(batcher.batches) == [1, 1]
    assert not any(w.is_alive() for w in batcher._workers)
    with pytest.raises(TrtragError):
        Batcher(fn, workers=0)
