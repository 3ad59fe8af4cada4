"""Events for metrics: the stages emit what happened, the service subscribes and counts.

A stage calls `emit("batch", stage="retrieve", size=12, wait_s=[...])`; nothing listens unless a
subscriber was added (the serve command adds its Prometheus metrics), so the CLI pays one empty loop.
Subscribers must be quick and must not raise; one that raises is dropped with a warning on stderr.

Events in use (name: fields):
  batch: stage ("retrieve", "generate"), size (items in the batch), wait_s (list: each item's queue wait)
  tokens: stage ("generate"), count (tokens produced since the last event)
  index: generation (folder name), loaded (bool), previous (when loaded) or error (when not): a
         published index generation that Pipeline.refresh() swapped in or refused
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable

Subscriber = Callable[..., None]  # fn(event: str, **fields)
_subscribers: list[Subscriber] = []
_lock = threading.Lock()


def subscribe(fn: Subscriber) -> Callable[[], None]:
    """Add fn; returns the function that removes it."""
    with _lock:
        _subscribers.append(fn)

    def unsubscribe() -> None:
        with _lock:
            if fn in _subscribers:
                _subscribers.remove(fn)

    return unsubscribe


def emit(event: str, **fields) -> None:
    """Hand an event to every subscriber."""
    for fn in tuple(_subscribers):
        try:
            fn(event, **fields)
        except Exception as exc:  # noqa: BLE001 - a broken metric must not fail a request
            sys.stderr.write(f"warning: dropping event subscriber {fn!r}: {exc}\n")
            with _lock:
                if fn in _subscribers:
                    _subscribers.remove(fn)
