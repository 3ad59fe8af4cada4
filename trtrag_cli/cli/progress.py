"""Progress of long phases on stderr: a Rich bar on a terminal, throttled plain lines in a pipe or CI log.

A CI log needs to show that a 100 s calibration moves, but one line per batch would drown it: plain lines
come when a phase starts, at each tenth of it, at its end, and otherwise at most every `every_s` seconds.
"""

from __future__ import annotations

import time
from typing import Callable


class Progress:
    """Report `update(phase, done, total)` calls; a context manager around the work."""

    def __init__(self, console, every_s: float = 5.0, steps: int = 10, unit: dict[str, str] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.console = console
        self.every_s = every_s
        self.steps = steps
        self.unit = unit or {}
        self.clock = clock
        self._bar = None
        self._tasks: dict[str, int] = {}
        self._plain: dict[str, dict] = {}  # phase -> {"started", "last", "step"} for plain lines

    def __enter__(self) -> "Progress":
        if self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as Bar

            self._bar = Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), console=self.console,
                            transient=True)
            self._bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
            self._bar = None

    def log(self, text: str) -> None:
        """A line of its own (above the bar on a terminal)."""
        self.console.print(text, markup=False, style="dim")

    def start(self, phase: str, text: str) -> None:
        """A phase whose length is not known: a line, and a bar with the elapsed time on a terminal."""
        self.log(text)
        if self._bar is not None:
            self._update_bar(phase, 0, None, self.clock())

    def update(self, phase: str, done: int, total: int | None = None, plain: bool = True) -> None:
        """Phase `phase` has done `done` of `total` units (total None: not known).

        plain=False: the bar only, for callers that log a line of their own at each step.
        """
        now = self.clock()
        if self._bar is not None:
            self._update_bar(phase, done, total, now)
            return
        if not plain:
            return
        state = self._plain.get(phase)
        if state is None:
            state = self._plain[phase] = {"started": now, "last": None, "step": -1}
        step = int(self.steps * done / total) if total else -1
        finished = total is not None and done >= total
        due = state["last"] is None or step > state["step"] or finished or now - state["last"] >= self.every_s
        if not due or (finished and state.get("finished")):
            return
        state.update(last=now, step=step, finished=finished)
        self.console.print(self._line(phase, done, total, now - state["started"]), markup=False)

    def _line(self, phase: str, done: int, total: int | None, elapsed: float) -> str:
        unit = self.unit.get(phase, "")
        count = f"{done}/{total}" if total else str(done)
        pct = f" ({100 * done / total:.0f}%)" if total else ""
        rate = f", {done / elapsed:.0f} {unit}/s" if unit and elapsed > 0 and done else ""
        return f"{phase}: {count}{' ' + unit if unit else ''}{pct}{rate}, {elapsed:.1f} s"

    def _update_bar(self, phase: str, done: int, total: int | None, now: float) -> None:
        if phase not in self._tasks:
            self._tasks[phase] = self._bar.add_task(phase, total=total, rate="")
            self._plain[phase] = {"started": now}
        elapsed = now - self._plain[phase]["started"]
        unit = self.unit.get(phase, "")
        rate = f"{done / elapsed:.0f} {unit}/s" if unit and elapsed > 0 and done else ""
        self._bar.update(self._tasks[phase], completed=done, total=total, rate=rate)
