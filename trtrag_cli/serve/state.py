"""What the routes work on: the pipeline (following the live index), the generation backend, model names.

The index follows `trtrag index`: at most once a second a request stats the workspace's CURRENT pointer;
when a new generation was published, a new Retriever is opened on it (sharing the loaded encoder) and the
service switches to a pipeline over it. A request takes the pipeline once, when it starts, and uses that
one to its end, so a switch never happens inside a request; the old pipeline goes away with the last
request holding it (its encoder is shared, so nothing needs closing).
"""

from __future__ import annotations

import copy
import os
import sys
import threading
import time
from pathlib import Path

from trtrag_cli.generate.base import SamplingParams
from trtrag_cli.generate.extractive import ExtractiveGenerator
from trtrag_cli.generate.registry import FallbackGenerator, model_context, open_backend, served_name
from trtrag_cli.pipeline import Pipeline
from trtrag_cli.recipe.schema import Recipe
from trtrag_cli.retrieve.batcher import Batcher
from trtrag_cli.util.workspace import Workspace

FOLLOW_EVERY_S = 1.0


def _rebound(generator, lexical):
    """The pipeline's generator over another index's BM25 statistics (the extractive parts use them)."""
    if isinstance(generator, ExtractiveGenerator):
        return ExtractiveGenerator(lexical, generator.max_sentences)
    if isinstance(generator, FallbackGenerator):
        return FallbackGenerator(generator.primary, _rebound(generator.fallback, lexical))
    return generator


class Service:
    """The loaded pipeline and backend of one `trtrag serve`, plus its readiness and draining state."""

    def __init__(self, recipe: Recipe, generate_only: bool = False):
        self.recipe = recipe
        self.generate_only = generate_only
        self.defaults = SamplingParams.from_recipe(recipe.answer.sampling)
        self.rag_id = f"trtrag-{recipe.name}"
        self.encoder_id = recipe.encoder.model
        self.generator_id = Path(served_name(recipe.answer.generator)).name \
            if recipe.answer.generator.backend != "extractive" else None
        self._pipeline: Pipeline | None = None
        self.backend = None
        self.context: int | None = None
        self.batcher: Batcher | None = None
        self._counter = None
        self.loaded = False
        self.draining = False
        self.load_error: BaseException | None = None
        self.index_listeners: list = []  # fn(pipeline) for each generation loaded (metrics)
        self._checked = 0.0
        self._pointer: tuple[int, int] | None = None
        self._skip: str | None = None  # a generation that failed to open: not retried every second
        self._follow = threading.Lock()

    # ---------------------------------------------------------------- loading

    def preflight(self) -> Service:
        """The cheap checks, before the port is taken: an index to serve, a language model for --generate-only."""
        if self.generate_only and self.recipe.answer.generator.backend == "extractive":
            open_backend(self.recipe.answer.generator)  # its one-line error says what to set
        if not self.generate_only:
            Workspace(self.recipe.workspace_dir()).require_index()
        return self

    def load(self) -> Service:
        """Open the index, the encoder and the generator the recipe names (slow: run it off the event loop)."""
        from trtrag_cli.encode.models import chunk_tokenizer

        gen = self.recipe.answer.generator
        if not self.generate_only:
            self._pipeline = Pipeline(self.recipe)
            self._pointer = self._stat()
            self._counter = chunk_tokenizer(self.recipe)
            self.backend = getattr(self._pipeline.generator, "backend", None)
        elif gen.backend == "extractive":
            open_backend(gen)  # raises the one-line error: generate-only needs a language model
        if gen.backend != "extractive":
            self.backend = self.backend or open_backend(gen)
            self.context = model_context(self.backend, gen)
            self.batcher = Batcher(self._generate_batch, max_batch=self.recipe.serve.generate_max_batch,
                                   max_wait_ms=2.0, name="generate")
        for listener in self.index_listeners if self._pipeline is not None else ():
            listener(self._pipeline)
        self.loaded = True
        return self

    def load_in_background(self, then=None) -> threading.Thread:
        """load() on a thread; a failure is kept in load_error; then() runs either way."""

        def work() -> None:
            try:
                self.load()
            except BaseException as exc:  # noqa: BLE001 - reported by the command after the server stops
                self.load_error = exc
            if then:
                then()

        thread = threading.Thread(target=work, name="trtrag-load", daemon=True)
        thread.start()
        return thread

    def _generate_batch(self, items: list) -> list:
        """One backend.generate call per distinct sampling setting among the waiting requests."""
        out: list = [None] * len(items)
        groups: dict[SamplingParams, list[int]] = {}
        for i, (_, params) in enumerate(items):
            groups.setdefault(params, []).append(i)
        for params, rows in groups.items():
            for row, result in zip(rows, self.backend.generate([items[r][0] for r in rows], params)):
                out[row] = result
        return out

    def close(self) -> None:
        """Stop the batcher and release the pipeline's encoder and generator."""
        if self.batcher is not None:
            self.batcher.close()
        if self._pipeline is not None:
            self._pipeline.__exit__(None, None, None)
        elif self.backend is not None and hasattr(self.backend, "close"):
            self.backend.close()

    # ---------------------------------------------------------------- the live index

    @property
    def generation(self) -> str | None:
        """The name of the index generation served now."""
        return self._pipeline.retriever.generation.name if self._pipeline is not None else None

    def pipeline(self) -> Pipeline:
        """The pipeline for one request, switched first to a newly published index (blocking: a worker thread)."""
        now = time.monotonic()
        if now - self._checked >= FOLLOW_EVERY_S:
            self._checked = now
            self._follow_index()
        return self._pipeline

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = os.stat(Workspace(self.recipe.workspace_dir()).index_root / "CURRENT")
        except OSError:
            return None
        return st.st_mtime_ns, st.st_ino

    def _follow_index(self) -> None:
        pointer = self._stat()
        if pointer is None or pointer == self._pointer or not self._follow.acquire(blocking=False):
            return
        try:
            current = Workspace(self.recipe.workspace_dir()).current_index()
            if current is None or current.name in (self.generation, self._skip):
                self._pointer = pointer
                return
            self._switch(current.name)
            self._pointer = pointer
        finally:
            self._follow.release()

    def _switch(self, name: str) -> None:
        from trtrag_cli.retrieve.retriever import Retriever
        from trtrag_cli.util.errors import TrtragError

        old = self._pipeline
        try:
            retriever = Retriever(self.recipe, encoder=old.retriever.encoder)
        except TrtragError as exc:
            self._skip = name
            sys.stderr.write(f"warning: not switching to index generation {name}: {exc}; still serving "
                             f"{self.generation}\n")
            return
        new = copy.copy(old)
        new.retriever = retriever
        new.generator = _rebound(old.generator, retriever.lexical)
        self._pipeline = new  # one assignment: a request sees the old pipeline or the new one, whole
        for listener in self.index_listeners:
            listener(new)

    # ---------------------------------------------------------------- small helpers

    def count_tokens(self, text: str) -> int:
        """Tokens of text in the encoder's tokenizer (embeddings usage, extractive answers)."""
        if self._counter is None:
            return len(text.split())
        return len(self._counter.encode(text, add_special_tokens=False).ids)

    def models(self) -> list[dict]:
        """The served models, OpenAI style: the RAG pipeline, the encoder, the generator."""
        owned = {"object": "model", "created": 0, "owned_by": "trtrag"}
        out = []
        if not self.generate_only:
            out.append({"id": self.rag_id, **owned, "kind": "rag"})
            out.append({"id": self.encoder_id, **owned, "kind": "embeddings"})
        if self.generator_id:
            out.append({"id": self.generator_id, **owned, "kind": "generation"})
        return out

    def wants_plain(self, model: str) -> bool:
        """Whether a chat request asks the generator directly (no retrieval)."""
        if self.generate_only or self._pipeline is None:
            return True
        names = {self.generator_id, served_name(self.recipe.answer.generator)} - {None}
        return self.backend is not None and model in names
