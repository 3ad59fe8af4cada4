"""Question -> retrieve -> answer, with per-stage timings in milliseconds."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from trtrag_cli.generate.prompt import citations
from trtrag_cli.recipe.schema import Recipe
from trtrag_cli.retrieve.retriever import MODES, Ranking
from trtrag_cli.util.errors import TrtragError
from trtrag_cli.util.observe import emit

REFRESH_S = 1.0  # refresh() looks at the workspace's CURRENT pointer at most this often


def _generation_report(generator) -> dict | None:
    """Token counts and speed of the last language-model answer (None for the extractive generator)."""
    last, prompt = getattr(generator, "last", None), getattr(generator, "last_prompt", None)
    if last is None:
        return None
    return {"generator": generator.name, "prompt_tokens": last.prompt_tokens, "output_tokens": last.output_tokens,
            "ttft_ms": None if last.ttft_ms is None else round(last.ttft_ms, 2),
            "total_ms": None if last.total_ms is None else round(last.total_ms, 2),
            "tokens_per_s": None if last.tokens_per_s is None else round(last.tokens_per_s, 1),
            "finish": last.finish, "passages_in_prompt": len(prompt.passages) if prompt else None,
            "passages_dropped": prompt.dropped if prompt else 0, "passage_cut": prompt.cut if prompt else False}


def check_question(question: str) -> str:
    """Reject empty questions; strip whitespace."""
    q = (question or "").strip()
    if not q:
        raise TrtragError("the question is empty", 'ask something, e.g. trtrag ask "What is the warranty period?"')
    return q


@dataclass
class _Query:
    """One retrieval request handed to the batch worker: its retriever is the one live when it began."""

    retriever: object
    text: str
    mode: str
    submitted: float = field(default_factory=time.perf_counter)


class Pipeline:
    """A retriever plus a generator for one workspace; a context manager, safe to call from many threads.

    Retrieval runs on one worker thread (retrieve.batcher): concurrent ask()/retrieve() calls are encoded
    and searched together, up to serve.retrieve_max_batch, and the encoder session, the faiss index and
    bm25s are only ever used from that thread. refresh() swaps in a newly published index generation.
    """

    def __init__(self, recipe: Recipe, max_wait_ms: float | None = None):
        """max_wait_ms: how long a batch waits for more questions (None: serve.retrieve_max_wait_ms; a
        one-question command passes 0, so it never waits for company that cannot come)."""
        from trtrag_cli.encode.models import chunk_tokenizer
        from trtrag_cli.generate.registry import open_generator
        from trtrag_cli.retrieve.batcher import Batcher
        from trtrag_cli.retrieve.retriever import Retriever

        self.recipe = recipe
        self.retriever = Retriever(recipe)
        try:
            self.generator = open_generator(recipe, self.retriever.lexical)
            self._counter = chunk_tokenizer(recipe)
        except BaseException:
            self.retriever.close()
            raise
        wait = recipe.serve.retrieve_max_wait_ms if max_wait_ms is None else max_wait_ms
        self._batcher = Batcher(self._rank_batch, max_batch=recipe.serve.retrieve_max_batch, max_wait_ms=wait,
                                name="retrieve", stage="retrieve")
        self._swap = threading.Lock()
        self._checked = time.monotonic()
        self._refused: set[str] = set()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Finish queued retrievals, then release the encoder and the generator."""
        self._batcher.close()
        self.retriever.close()
        closer = getattr(self.generator, "close", None)
        if closer:
            closer()

    @property
    def generation(self) -> str:
        """The folder name of the index generation that new requests search."""
        return self.retriever.generation.name

    # ------------------------------------------------------------------------------ live index

    def refresh(self) -> bool:
        """Load the workspace's published index generation if it changed; True when one was swapped in.

        Looks at the workspace at most once a second. Requests already under way finish on the retriever
        they began with; the encoder is shared. A generation that cannot be loaded (another encoder, a
        damaged folder) is reported once on stderr and skipped; the loaded one goes on serving.
        """
        from trtrag_cli.retrieve.retriever import Retriever
        from trtrag_cli.util.workspace import Workspace

        now = time.monotonic()
        if now - self._checked < REFRESH_S or not self._swap.acquire(blocking=False):
            return False  # another thread is checking or loading; this request uses what is live
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
            # The encoder goes with the live retriever: close() of the last one releases it.
            new._owns_encoder, old._owns_encoder = old._owns_encoder, False
            self.retriever = new
            emit("index", generation=new.generation.name, loaded=True, previous=old.generation.name)
            return True
        finally:
            self._swap.release()

    # ------------------------------------------------------------------------------ retrieval

    def _rank_batch(self, queries: list[_Query]) -> list[tuple[Ranking, float]]:
        """The batch worker: rank each retriever's questions together; (ranking, queue ms) per query."""
        started = time.perf_counter()
        out: list = [None] * len(queries)
        groups: dict[int, list[int]] = {}
        for i, q in enumerate(queries):  # after a refresh, a batch may hold both generations' requests
            groups.setdefault(id(q.retriever), []).append(i)
        for at in groups.values():
            retriever = queries[at[0]].retriever
            rankings = retriever.rank_many([queries[i].text for i in at], [queries[i].mode for i in at])
            for i, ranking in zip(at, rankings):
                out[i] = (ranking, (started - queries[i].submitted) * 1e3)
        return out

    def _rank(self, retriever, text: str, mode: str | None) -> tuple[Ranking, dict[str, float]]:
        """Rank one question through the batch worker; its timings with `queue` first."""
        mode = mode or self.recipe.retrieve.mode
        if mode not in MODES:  # refused here, so one caller's typo does not fail its batch-mates
            raise TrtragError(f"unknown retrieval mode '{mode}'", "use one of: " + ", ".join(MODES))
        ranking, queued = self._batcher(_Query(retriever, text, mode))
        return ranking, {"queue": queued, **ranking.timings}

    def passages(self, rows, scores, k: int, retriever=None) -> list[dict]:
        """The top-k chunk records as plain dicts, numbered from 1 for citations."""
        records = (retriever or self.retriever).store.records
        out = []
        for n, (row, score) in enumerate(zip(rows[:k].tolist(), scores[:k].tolist()), start=1):
            r = records[row]
            out.append({"n": n, "id": r.id, "source": r.source, "file": r.file, "title": r.title,
                        "score": round(float(score), 6), "text": r.text})
        return out

    def retrieve(self, query: str, top_k: int | None = None, mode: str | None = None) -> dict:
        """The top passages for a query, without an answer: what /v1/retrieve returns."""
        query = check_question(query)
        retriever = self.retriever
        mode = mode or self.recipe.retrieve.mode
        ranking, timings = self._rank(retriever, query, mode)
        timings["total"] = sum(timings.values())
        return {"query": query, "mode": mode,
                "passages": self.passages(ranking.rows, ranking.scores, top_k or self.recipe.retrieve.top_k,
                                          retriever),
                "generation": retriever.generation.name, "search_backend": retriever.vindex.placement,
                "batch": ranking.batch, "timings_ms": {k: round(v, 3) for k, v in timings.items()}}

    def ask(self, question: str, top_k: int | None = None, mode: str | None = None,
            on_piece: Callable[[str], None] | None = None) -> dict:
        """Answer one question; the dict is what `ask --json` prints.

        With on_piece, a generator that can stream hands each piece of the answer to it as it comes.
        """
        question = check_question(question)
        retriever = self.retriever  # this request keeps it, whatever refresh() swaps in meanwhile
        warnings = []
        n_tokens = len(self._counter.encode(question).ids)  # special tokens included, as the encoder sees it
        max_tokens = retriever.encoder.max_tokens
        if n_tokens > max_tokens:
            warnings.append(f"the question has {n_tokens} tokens; the encoder reads only the first "
                            f"{max_tokens} (BM25 still sees all of it)")
        ranking, timings = self._rank(retriever, question, mode)
        k = top_k or self.recipe.retrieve.top_k
        passages = self.passages(ranking.rows, ranking.scores, k, retriever)
        given = passages[: self.recipe.answer.passages]
        t0 = time.perf_counter()
        streamed = on_piece is not None and hasattr(self.generator, "stream")
        if streamed:
            pieces = []
            for piece in self.generator.stream(question, given):
                pieces.append(piece)
                on_piece(piece)
            answer = "".join(pieces).strip()
        else:
            answer = self.generator.answer(question, given)
        timings["answer"] = (time.perf_counter() - t0) * 1e3
        timings["total"] = sum(timings.values())
        generation = _generation_report(self.generator)
        if getattr(self.generator, "warning", None):
            warnings.append(self.generator.warning)
        if generation and generation.get("passages_dropped"):
            warnings.append(f"{generation['passages_dropped']} passage(s) did not fit the generator's context")
        return {
            "question": question,
            "answer": answer,
            # The answer already went to on_piece (the extractive fallback's too): a caller prints it once.
            "streamed": streamed,
            "citations": citations(answer, passages),
            "generation": generation,
            "passages": passages,
            "mode": mode or self.recipe.retrieve.mode,
            "search_backend": retriever.vindex.placement,
            "index_generation": retriever.generation.name,
            "timings_ms": {k: round(v, 3) for k, v in timings.items()},
            "warnings": warnings,
        }
