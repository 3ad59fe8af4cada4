"""One retriever shared by many threads: the path `ask`, `serve` and `bench` run.

Callers hand questions to a Batcher; its one worker thread ranks whatever is queued together
(Retriever.rank_many: one encoder call, one faiss search, BM25 and fusion per question). The encoder
session, the faiss index and bm25s are only ever used from that thread, so none of them needs to be
thread-safe, and a GPU encoder sees batches instead of a crowd of single questions.

refresh() follows the workspace's published index generation: a new Retriever sharing the encoder is
swapped in between requests, and a request that already began keeps the retriever it began with.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field

from trtrag_cli.recipe.schema import Recipe
from trtrag_cli.retrieve.batcher import Batcher
from trtrag_cli.retrieve.retriever import MODES, Ranking, Retriever
from trtrag_cli.util.errors import TrtragError
from trtrag_cli.util.observe import emit
from trtrag_cli.util.workspace import Workspace

REFRESH_S = 1.0  # refresh() looks at the workspace's CURRENT pointer at most this often


@dataclass
class _Query:
    retriever: Retriever
    text: str
    mode: str
    submitted: float = field(default_factory=time.perf_counter)


def _on_cpu(recipe: Recipe) -> bool:
    """Whether the recipe's encoder runs on ONNX Runtime's CPU session (the one encoder `threads` applies to)."""
    from trtrag_cli.encode.artifacts import resolve_recipe_backend

    return resolve_recipe_backend(recipe).backend == "onnxruntime"


def _cpu_workers(on_cpu: bool) -> int:
    """serve.retrieve_workers left null: a batch per physical core for a CPU encoder, else one."""
    if not on_cpu:
        return 1
    from trtrag_cli.encode.onnxruntime import physical_cores

    return physical_cores()


class SharedRetriever:
    """A Retriever behind a Batcher; rank() may be called from any thread. A context manager."""

    def __init__(self, recipe: Recipe, max_batch: int | None = None, max_wait_ms: float | None = None,
                 retriever: Retriever | None = None, workers: int | None = None):
        """max_batch / max_wait_ms: None takes serve.retrieve_max_batch / serve.retrieve_max_wait_ms (a
        one-question command passes max_wait_ms 0: no company can come). retriever: one already open
        (its encoder then belongs to it), else the workspace's is opened."""
        self.recipe = recipe
        on_cpu = None  # asking the machine (GPU, TensorRT) costs: at most once, and only when needed
        if not (workers or recipe.serve.retrieve_workers):
            on_cpu = _on_cpu(recipe)
        workers = workers or recipe.serve.retrieve_workers or _cpu_workers(on_cpu)
        if retriever is None and workers > 1 and recipe.encoder.threads is None \
                and (_on_cpu(recipe) if on_cpu is None else on_cpu):
            recipe = recipe.model_copy(deep=True)  # each batch's encoder run on one core of its own
            recipe.encoder.threads = 1
        self.retriever = retriever or Retriever(recipe)
        serve = recipe.serve
        try:
            self.batcher = Batcher(self._rank_batch, max_batch=serve.retrieve_max_batch if max_batch is None
                                   else max_batch, max_wait_ms=serve.retrieve_max_wait_ms if max_wait_ms is None
                                   else max_wait_ms, name="retrieve", stage="retrieve", workers=workers)
        except BaseException:
            if retriever is None:
                self.retriever.close()
            raise
        self._swap = threading.Lock()
        self._checked = time.monotonic()
        self._refused: set[str] = set()

    def __enter__(self) -> SharedRetriever:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Finish the queued questions, then release the encoder."""
        self.batcher.close()
        self.retriever.close()

    @property
    def generation(self) -> str:
        """The folder name of the index generation that new requests search."""
        return self.retriever.generation.name

    def rank(self, text: str, mode: str | None = None,
             retriever: Retriever | None = None) -> tuple[Ranking, dict[str, float]]:
        """Rank one question with the others queued; its timings in ms, `queue` (waiting for the worker)
        first, then the encode/search/rerank times of the batch it was ranked in.

        retriever: the one this request began with (default: the live one).
        """
        mode = mode or self.recipe.retrieve.mode
        if mode not in MODES:  # refused here, so one caller's typo does not fail its batch-mates
            raise TrtragError(f"unknown retrieval mode '{mode}'", "use one of: " + ", ".join(MODES))
        ranking, queued = self.batcher(_Query(retriever or self.retriever, text, mode))
        return ranking, {"queue": queued, **ranking.timings}

    def _rank_batch(self, queries: list[_Query]) -> list[tuple[Ranking, float]]:
        """The worker: each retriever's questions ranked together; (ranking, queue ms) per question."""
        started = time.perf_counter()
        out: list = [None] * len(queries)
        groups: dict[int, list[int]] = {}
        for i, q in enumerate(queries):  # just after a refresh, a batch may hold both generations' requests
            groups.setdefault(id(q.retriever), []).append(i)
        for at in groups.values():
            retriever = queries[at[0]].retriever
            rankings = retriever.rank_many([queries[i].text for i in at], [queries[i].mode for i in at])
            for i, ranking in zip(at, rankings):
                out[i] = (ranking, (started - queries[i].submitted) * 1e3)
        return out

    def refresh(self) -> bool:
        """Load the workspace's published index generation if it changed; True when one was swapped in.

        Looks at the workspace at most once a second, and never blocks a request: while one thread loads,
        the others go on with what is live. A generation that cannot be loaded (another encoder, a
        damaged folder) is reported once on stderr and skipped; the loaded one goes on serving.
        """
        now = time.monotonic()
        if now - self._checked < REFRESH_S or not self._swap.acquire(blocking=False):
            return False
        try:
            self._checked = now
            gen = Workspace(self.recipe.workspace_dir()).current_index()
            if gen is None or gen.name == self.generation or gen.name in self._refused:
                return False
            old = self.retriever
            try:
                new = Retriever(self.recipe, encoder=old.encoder)
            except (TrtragError, OSError) as exc:
                self._refused.add(gen.name)
                why = exc.message if isinstance(exc, TrtragError) else str(exc)
                sys.stderr.write(f"warning: not loading index generation {gen.name}: {why}; still serving "
                                 f"{old.generation.name}\n")
                emit("index", generation=gen.name, loaded=False, error=why)
                return False
            # The encoder goes with the live retriever: closing the last one releases it.
            new._owns_encoder, old._owns_encoder = old._owns_encoder, False
            self.retriever = new
            emit("index", generation=new.generation.name, loaded=True, previous=old.generation.name)
            return True
        finally:
            self._swap.release()
