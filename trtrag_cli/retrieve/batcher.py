"""Dynamic batching of concurrent requests: callers submit one item each, a worker runs them in batches.

A GPU encoder or search costs nearly the same for 1 query as for 32, so under concurrency the worker
takes whatever is waiting, up to `max_batch`, and waits at most `max_wait_ms` after the first arrives
for more to join. max_wait_ms 0 runs whatever is queued at once: no added latency for a lone caller,
batches only from requests that pile up while the previous batch runs. The design's "several queries
in parallel" is this: many callers, one device, one worker feeding it.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

from trtrag_cli.util.errors import TrtragError
from trtrag_cli.util.observe import emit


class Batcher:
    """Runs fn(list of items) -> list of results (same order) on worker threads, in batches.

    workers > 1 runs that many batches at once (fn must then be safe to call from several threads): on a
    CPU, two one-thread encoder runs side by side do more per second than one run on two threads.

    With `stage` set, each batch emits `batch` (util.observe): stage, size, and wait_s, each item's time
    in the queue before its batch started.
    """

    def __init__(self, fn: Callable[[list], Sequence], max_batch: int = 32, max_wait_ms: float = 1.0,
                 name: str = "batcher", stage: str | None = None, workers: int = 1):
        if max_batch < 1 or max_wait_ms < 0 or workers < 1:
            raise TrtragError(f"batching needs max_batch >= 1 and max_wait_ms >= 0, got {max_batch} and "
                              f"{max_wait_ms}", "fix the serve.* settings in the recipe")
        self.fn = fn
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1e3
        self.stage = stage
        self.batches: list[int] = []  # size of every batch run, for reports and tests
        self._queue: queue.Queue = queue.Queue()
        self._closed = False
        self._workers = [threading.Thread(target=self._loop, name=f"{name}-{i}", daemon=True)
                         for i in range(workers)]
        for worker in self._workers:
            worker.start()

    def submit(self, item: Any) -> Future:
        """Queue one item; the future resolves to its result (or the batch's exception)."""
        if self._closed:
            raise RuntimeError("the batcher is closed")
        future: Future = Future()
        self._queue.put((item, future, time.perf_counter()))
        return future

    def __call__(self, item: Any, timeout: float | None = None) -> Any:
        """Submit and wait."""
        return self.submit(item).result(timeout)

    def _take(self) -> list:
        first = self._queue.get()
        if first is None:
            return []
        batch = [first]
        deadline = time.perf_counter() + self.max_wait
        while len(batch) < self.max_batch:
            try:
                # Whatever is already queued joins without waiting; then wait out the rest of max_wait.
                item = self._queue.get_nowait() if self._queue.qsize() else \
                    self._queue.get(timeout=max(0.0, deadline - time.perf_counter()))
            except queue.Empty:
                break
            if item is None:
                self._queue.put(None)  # let the loop see the close after this batch
                break
            batch.append(item)
        return batch

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if not batch:
                return
            self.batches.append(len(batch))
            if self.stage is not None:
                started = time.perf_counter()
                emit("batch", stage=self.stage, size=len(batch), wait_s=[started - t for _, _, t in batch])
            items = [item for item, _, _ in batch]
            try:
                results = self.fn(items)
                if len(results) != len(items):
                    raise RuntimeError(f"batch function returned {len(results)} results for {len(items)} items")
            except BaseException as exc:  # noqa: BLE001 - handed to every waiting caller
                for _, future, _ in batch:
                    future.set_exception(exc)
                continue
            for (_, future, _), result in zip(batch, results):
                future.set_result(result)

    def close(self) -> None:
        """Finish what is queued, then stop the workers."""
        if not self._closed:
            self._closed = True
            for _ in self._workers:
                self._queue.put(None)
            for worker in self._workers:
                worker.join()

    def __enter__(self) -> Batcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
