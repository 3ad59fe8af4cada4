"""Continuous batching over GraphDecoder: one thread owns the K/V cache, requests join and leave between steps.

A request is submitted from any thread and waits in a queue. The scheduler thread admits waiting requests
into free cache rows at the next step boundary (up to `max_batch` rows, `serve.generate_max_batch`): it
prefills the prompt into its row and samples the first token, and from the next step on the row decodes
with the others. Active requests always sit in rows [0, n); when one finishes (an end id, a stop string,
its max_new_tokens) or is cancelled (`Request.cancel()`, a closed stream, a deadline), the last active row
is copied into its place, so a one-request step still runs the one-row Triton kernels, and a step's
batch is never wider than what is active (rounded up to a power of two where CUDA graphs are replayed).

Sampling is per row: temperature, top-k, top-p and seed live in tensors indexed by row (GraphDecoder
`_sample`), so requests with different settings share every step; a step runs the argmax alone when
all rows are greedy. The noise is a hash of (seed, position, token), so a seeded request samples the
same tokens whatever shares its steps, and a greedy request gets the tokens it would get alone (up to
the floating-point effect of the batch width on the matmuls; exact on the CPU in the tests).

The host looks at the tokens every CHECK_EVERY steps (one device-to-host copy for all rows), at once
after an admission (time to first token) and whenever a row reaches its max_new_tokens or a cancel
arrives. Events (util.observe): "batch" on admission (active rows, each admitted request's queue wait),
"tokens" with the count delivered at each check.

GPU (unverified here, see the GPU issue): graphs are keyed by (padded batch, attention span, greedy);
padded rows [n, bucket) get position 0 before each replay so their writes stay inside their own free rows.
A request that moves between one row (Triton kernels, float32 residual) and several rows (torch layers)
may pick different greedy tokens near ties than it would alone in bf16.
"""

from __future__ import annotations

import collections
import queue
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from trtrag_cli.util.errors import TrtragError
from trtrag_cli.util.observe import emit

CHECK_EVERY = 8            # decode steps between host checks for end of sequence and stop strings


def _bucket(n: int, most: int) -> int:
    """n rounded up to a power of two, at most `most` (the batch a CUDA graph is captured for)."""
    return min(most, 1 << (n - 1).bit_length())


@dataclass(eq=False)
class Request:
    """One prompt to decode: its settings in, its tokens and how it ended out (result())."""

    ids: list[int]
    max_new_tokens: int
    sampling: tuple = (0.0, 0, 1.0)          # temperature, top_k, top_p
    stop_ids: frozenset = frozenset()
    should_stop: Callable[[list[int]], bool] | None = None   # stop strings: called with the tokens so far
    seed: int | None = None
    stream: bool = False                      # hand the tokens so far to updates() as they come
    deadline: float | None = None             # time.monotonic() after which it is cancelled
    out: list[int] = field(default_factory=list)
    finish: str | None = None                 # "stop", "length", "cancelled"; None while running
    error: BaseException | None = None
    submitted: float = 0.0
    row: int = -1
    count: int = 0                            # tokens decoded on the device, checked or not
    _cancel: threading.Event = field(default_factory=threading.Event)
    _done: threading.Event = field(default_factory=threading.Event)
    _updates: queue.Queue = field(default_factory=queue.Queue)
    _scheduler: Scheduler | None = None

    def cancel(self) -> None:
        """Stop decoding this request; its row is freed at the next step boundary (no-op once finished)."""
        if not self._done.is_set():
            self._cancel.set()
            if self._scheduler is not None:
                self._scheduler.wake()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set() or (self.deadline is not None and time.monotonic() > self.deadline)

    def result(self) -> list[int]:
        """The new token ids (before any end id), once finished; raises what failed it."""
        self._done.wait()
        if self.error is not None:
            raise self.error
        return self.out

    def updates(self) -> Iterator[list[int]]:
        """The tokens so far, each time more are known (stream=True), until it finishes; raises what failed it."""
        ended = False
        while not ended:
            item = self._updates.get()
            if item is None:
                break
            while True:                  # only the newest snapshot matters
                try:
                    newer = self._updates.get_nowait()
                except queue.Empty:
                    break
                if newer is None:
                    ended = True
                    break
                item = newer
            yield item
        if self.error is not None:
            raise self.error

    def _end(self, finish: str | None = None, error: BaseException | None = None) -> None:
        self.finish = finish or self.finish or "cancelled"
        self.error = error
        if self.stream:
            if error is None and self.out:
                self._updates.put(list(self.out))
            self._updates.put(None)
        self._done.set()


class Scheduler:
    """Admits requests into a GraphDecoder's rows between decode steps, on one thread that runs while there is
    work (started by submit, gone when idle)."""

    def __init__(self, decoder, max_batch: int = 16):
        self.decoder = decoder
        self.max_batch = max(1, int(max_batch))
        self._queue: collections.deque[Request] = collections.deque()
        self._rows: list[Request] = []            # row i holds _rows[i]
        self._pending: list[tuple[int, object]] = []   # (first row, device tokens [rows]) not yet checked
        self._since = 0
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._poke = False
        self._closed = False

    @property
    def active(self) -> int:
        """Rows decoding now."""
        return len(self._rows)

    def wake(self) -> None:
        """Have the loop check its rows at the next step boundary (a cancel arrived)."""
        self._poke = True

    def submit(self, request: Request) -> Request:
        """Queue a request for the next step boundary; returns it (result(), updates(), cancel())."""
        dec = self.decoder
        if not request.ids:
            raise RuntimeError("cannot decode an empty prompt")
        if len(request.ids) + request.max_new_tokens > dec.context:
            raise TrtragError(f"prompt ({len(request.ids)} tokens) plus {request.max_new_tokens} new tokens exceed "
                              f"the model's {dec.context}",
                              "lower answer.sampling.max_new_tokens or answer.generator.context")
        if request.seed is None:
            request.seed = random.randrange(1 << 31)
        request.submitted = time.monotonic()
        request._scheduler = self
        with self._cond:
            if self._closed:
                raise TrtragError("the generator is closed", "open it again")
            self._queue.append(request)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="decode-scheduler", daemon=True)
                self._thread.start()
            self._cond.notify()
        return request

    def close(self) -> None:
        """Cancel everything queued or running and wait for the loop to end."""
        with self._cond:
            self._closed = True
            for request in list(self._queue) + list(self._rows):
                request._cancel.set()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    # ------------------------------------------------------------------------------------ the loop

    def _run(self) -> None:
        import contextlib

        torch = self.decoder.torch
        device = self.decoder.device
        # On the model's own GPU: CUDA graphs and Triton launch on the current device, which may be another.
        on_device = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
        with on_device, torch.inference_mode():
            while True:
                with self._cond:
                    for request in [r for r in self._queue if r.cancelled]:
                        self._queue.remove(request)
                        request._end("cancelled")
                    if not self._rows and not self._queue:
                        self._thread = None
                        return
                    fresh = []
                    while self._queue and len(self._rows) + len(fresh) < self.max_batch:
                        fresh.append(self._queue.popleft())
                try:
                    if fresh:
                        self._admit(fresh)
                    if self._rows:
                        self._step()
                except Exception as exc:  # noqa: BLE001 - handed to every request in flight
                    self._fail_all(exc)
                except BaseException as exc:
                    self._fail_all(exc)
                    with self._cond:
                        for request in self._queue:
                            request._end(error=exc)
                        self._queue.clear()
                        self._thread = None
                    raise

    def _admit(self, fresh: list[Request]) -> None:
        """Prefill each new request into the next free row; check the first tokens at once."""
        dec = self.decoder
        rows = len(self._rows) + len(fresh)
        longest = max(len(r.ids) + r.max_new_tokens for r in self._rows + fresh)
        try:
            dec._ensure_cache(_bucket(rows, self.max_batch) if dec.graphs else rows, longest)
        except RuntimeError as exc:   # no room for the larger cache: the newcomers fail, the running go on
            for request in fresh:
                request._end(error=exc)
            return
        now = time.monotonic()
        admitted = []
        for request in fresh:
            row = len(self._rows)
            try:
                dec.start_row(row, request.ids, request.sampling, request.seed)
            except RuntimeError as exc:   # this prompt's failure (out of memory, a bad id), not the others'
                request._end(error=exc)
                continue
            request.row, request.count = row, 1
            self._rows.append(request)
            self._pending.append((row, dec.tokens[row:row + 1].clone()))
            admitted.append(now - request.submitted)
        if admitted:
            emit("batch", stage="generate", size=len(self._rows), wait_s=admitted)
        self._check()

    def _step(self) -> None:
        """One decode step for every active row; a host check when one is due."""
        dec = self.decoder
        n = len(self._rows)
        batch = _bucket(n, min(self.max_batch, dec.capacity()[0])) if dec.graphs else n
        if batch > n:     # padded rows: kept at position 0 so that their writes stay in their own rows
            dec.positions[n:batch].zero_()
        # The token fed now sits at len(ids) + count - 1; attention reads the positions up to it.
        reach = max(len(r.ids) + r.count for r in self._rows)
        dec.step(batch, dec.span(reach), all(r.sampling[0] <= 0 for r in self._rows))
        self._pending.append((0, dec.tokens[:n].clone()))
        self._since += 1
        due = self._since >= CHECK_EVERY or self._poke
        for request in self._rows:
            request.count += 1
            due = due or request.count >= request.max_new_tokens or request.cancelled
        if due:
            self._check()

    def _check(self) -> None:
        """Bring the pending tokens to the host, end the rows that are done, and close the gaps they leave."""
        self._poke = False
        self._since = 0
        if not self._pending:
            return
        torch = self.decoder.torch
        flat = torch.cat([tokens for _, tokens in self._pending]).tolist()
        fresh: list[list[int]] = [[] for _ in self._rows]
        at = 0
        for first, tokens in self._pending:
            for offset in range(tokens.shape[0]):
                fresh[first + offset].append(flat[at + offset])
            at += tokens.shape[0]
        self._pending = []
        delivered = 0
        ended = []
        for request, tokens in zip(self._rows, fresh):
            before = len(request.out)
            for token in tokens:
                if token in request.stop_ids:
                    request.finish = "stop"
                    break
                request.out.append(token)
                if len(request.out) >= request.max_new_tokens:
                    request.finish = "length"
                    break
            delivered += len(request.out) - before
            if request.finish is None and request.should_stop is not None and len(request.out) > before \
                    and request.should_stop(request.out):
                request.finish = "stop"
            if request.finish is None and request.cancelled:
                request.finish = "cancelled"
            if request.finish is not None:
                ended.append(request)
            elif request.stream and len(request.out) > before:
                request._updates.put(list(request.out))
        if delivered:
            emit("tokens", stage="generate", count=delivered)
        if ended:
            self._release(ended)

    def _release(self, ended: list[Request]) -> None:
        """Finish `ended` and move the rows after them down, so that active rows stay [0, n)."""
        kept = [r for r in self._rows if r.finish is None]
        for row, request in enumerate(kept):
            if request.row != row:
                self.decoder.move_row(request.row, row, len(request.ids) + request.count)
                request.row = row
        self._rows = kept
        for request in ended:
            request._end()

    def _fail_all(self, exc: BaseException) -> None:
        """A step failed: every request in flight gets the error; queued ones still run."""
        self._pending = []
        rows, self._rows = self._rows, []
        for request in rows:
            request._end(error=exc)
