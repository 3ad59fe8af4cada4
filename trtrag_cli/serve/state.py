"""What the routes work on: the pipeline (following the live index), the generation backend, model names.

The index follows `trtrag index` through `Pipeline.refresh`: at most once a second a request looks at the
workspace's published generation and, when it changed, a Retriever over the new one (sharing the loaded
encoder) is swapped in. A request keeps the retriever it began with, so a switch never happens inside one.
"""

from __future__ import annotations

import threading
from pathlib import Path

from trtrag_cli.generate.base import SamplingParams
from trtrag_cli.generate.registry import model_context, open_backend, served_name
from trtrag_cli.pipeline import Pipeline
from trtrag_cli.recipe.schema import Recipe
from trtrag_cli.util.workspace import Workspace

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
        self._counter = None
        self.loaded = False
        self.draining = False
        self.load_error: BaseException | None = None
        self.index_listeners: list = []  # fn(pipeline) for each generation loaded (metrics)

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
            self._counter = chunk_tokenizer(self.recipe)
            self.backend = getattr(self._pipeline.generator, "backend", None)
        elif gen.backend == "extractive":
            open_backend(gen)  # raises the one-line error: generate-only needs a language model
        if gen.backend != "extractive":
            self.backend = self.backend or open_backend(gen, self.recipe.serve.generate_max_batch)
            self.context = model_context(self.backend, gen)
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

    def close(self) -> None:
        """Release the pipeline's encoder and generator (or the generation-only backend)."""
        if self._pipeline is not None:
            self._pipeline.__exit__(None, None, None)
        elif self.backend is not None and hasattr(self.backend, "close"):
            self.backend.close()

    # ---------------------------------------------------------------- the live index

    @property
    def generation(self) -> str | None:
        """The name of the index generation served now."""
        return self._pipeline.generation if self._pipeline is not None else None

    def pipeline(self) -> Pipeline:
        """The pipeline for one request, switched first to a newly published index (Pipeline.refresh: at
        most one look a second; a request that began keeps the retriever it began with)."""
        if self._pipeline.refresh():
            for listener in self.index_listeners:
                listener(self._pipeline)
        return self._pipeline

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
