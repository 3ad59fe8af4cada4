"""Question -> retrieve -> answer, with per-stage timings in milliseconds."""

from __future__ import annotations

import time
from collections.abc import Callable

from trtrag_cli.generate.prompt import citations
from trtrag_cli.recipe.schema import Recipe
from trtrag_cli.util.errors import TrtragError


def _generation_report(generator, report: dict) -> dict | None:
    """Token counts and speed of this request's language-model answer, from the `report` dict its generate call
    filled (None for the extractive generator or the extractive fallback)."""
    last, prompt = report.get("generation"), report.get("prompt")
    if last is None:
        return None
    return {"generator": generator.name, "prompt_tokens": last.prompt_tokens, "output_tokens": last.output_tokens,
            "ttft_ms": None if last.ttft_ms is None else round(last.ttft_ms, 2),
            "total_ms": None if last.total_ms is None else round(last.total_ms, 2),
            "tokens_per_s": None if last.tokens_per_s is None else round(last.tokens_per_s, 1),
            "finish": last.finish, "passages_in_prompt": len(prompt.passages) if prompt else None,
            "passages_dropped": prompt.dropped if prompt else 0, "passage_cut": prompt.cut if prompt else False}


def _rebound(generator, lexical):
    """The generator over another index's BM25 statistics (the extractive answer and fallback use them)."""
    from trtrag_cli.generate.extractive import ExtractiveGenerator
    from trtrag_cli.generate.registry import FallbackGenerator

    if isinstance(generator, ExtractiveGenerator):
        return ExtractiveGenerator(lexical, generator.max_sentences)
    if isinstance(generator, FallbackGenerator):
        return FallbackGenerator(generator.primary, _rebound(generator.fallback, lexical))
    return generator


def check_question(question: str) -> str:
    """Reject empty questions; strip whitespace."""
    q = (question or "").strip()
    if not q:
        raise TrtragError("the question is empty", 'ask something, e.g. trtrag ask "What is the warranty period?"')
    return q


class Pipeline:
    """A retriever plus a generator for one workspace; a context manager, safe to call from many threads.

    Retrieval goes through retrieve.shared.SharedRetriever: concurrent ask()/retrieve() calls are encoded
    and searched together on its one worker thread (up to serve.retrieve_max_batch). refresh() swaps in a
    newly published index generation between requests.
    """

    def __init__(self, recipe: Recipe, max_wait_ms: float | None = None, workers: int | None = None):
        """max_wait_ms: how long a batch waits for more questions (None: serve.retrieve_max_wait_ms; a
        one-question command passes 0, so it never waits for company that cannot come). workers: retrieval
        batches at once (None: serve.retrieve_workers; a one-question command passes 1)."""
        from trtrag_cli.encode.models import chunk_tokenizer
        from trtrag_cli.generate.registry import open_generator
        from trtrag_cli.retrieve.shared import SharedRetriever

        self.recipe = recipe
        self.shared = SharedRetriever(recipe, max_wait_ms=max_wait_ms, workers=workers)
        try:
            self.generator = open_generator(recipe, self.shared.retriever.lexical)
            self._counter = chunk_tokenizer(recipe)
        except BaseException:
            self.shared.close()
            raise

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Finish queued retrievals, then release the encoder and the generator."""
        self.shared.close()
        closer = getattr(self.generator, "close", None)
        if closer:
            closer()

    @property
    def retriever(self):
        """The live Retriever (a request keeps the one it began with; see refresh)."""
        return self.shared.retriever

    @property
    def generation(self) -> str:
        """The folder name of the index generation that new requests search."""
        return self.shared.generation

    def refresh(self) -> bool:
        """Swap in the workspace's newly published index generation, if any (cheap: see SharedRetriever).

        The extractive generator weighs words by the index's BM25 statistics, so it is rebuilt over the new
        index too (one assignment: a request holds the generator it began with).
        """
        swapped = self.shared.refresh()
        if swapped:
            self.generator = _rebound(self.generator, self.shared.retriever.lexical)
        return swapped

    def passages(self, rows, scores, k: int, retriever=None) -> list[dict]:
        """The top-k chunk records as plain dicts, numbered from 1 for citations."""
        records = (retriever or self.retriever).store.records_of(rows[:k])
        out = []
        for n, (r, score) in enumerate(zip(records, scores[:k].tolist()), start=1):
            out.append({"n": n, "id": r.id, "source": r.source, "file": r.file, "title": r.title,
                        "score": round(float(score), 6), "text": r.text})
        return out

    def retrieve(self, query: str, top_k: int | None = None, mode: str | None = None) -> dict:
        """The top passages for a query, without an answer: what /v1/retrieve returns."""
        query = check_question(query)
        retriever = self.retriever
        mode = mode or self.recipe.retrieve.mode
        ranking, timings = self.shared.rank(query, mode, retriever)
        timings["total"] = sum(timings.values())
        return {"query": query, "mode": mode,
                "passages": self.passages(ranking.rows, ranking.scores, top_k or self.recipe.retrieve.top_k,
                                          retriever),
                "index_generation": retriever.generation.name, "search_backend": retriever.vindex.placement,
                "batch": ranking.batch, "timings_ms": {k: round(v, 3) for k, v in timings.items()}}

    def ask(self, question: str, top_k: int | None = None, mode: str | None = None,
            on_piece: Callable[[str], None] | None = None) -> dict:
        """Answer one question; the dict is what `ask --json` prints.

        With on_piece, a generator that can stream hands each piece of the answer to it as it comes.
        """
        question = check_question(question)
        retriever, generator = self.retriever, self.generator  # kept, whatever refresh() swaps in meanwhile
        warnings = []
        n_tokens = len(self._counter.encode(question).ids)  # special tokens included, as the encoder sees it
        max_tokens = retriever.encoder.max_tokens
        if n_tokens > max_tokens:
            warnings.append(f"the question has {n_tokens} tokens; the encoder reads only the first "
                            f"{max_tokens} (BM25 still sees all of it)")
        ranking, timings = self.shared.rank(question, mode, retriever)
        k = top_k or self.recipe.retrieve.top_k
        passages = self.passages(ranking.rows, ranking.scores, k, retriever)
        given = passages[: self.recipe.answer.passages]
        t0 = time.perf_counter()
        streamed = on_piece is not None and hasattr(generator, "stream")
        # This request's prompt, generation and fallback warning: concurrent asks share the generator.
        report: dict = {}
        language_model = hasattr(generator, "stream")   # the extractive generator takes no report
        if streamed:
            pieces = []
            for piece in generator.stream(question, given, report):
                pieces.append(piece)
                on_piece(piece)
            answer = "".join(pieces).strip()
        elif language_model:
            answer = generator.answer(question, given, report)
        else:
            answer = generator.answer(question, given)
        timings["answer"] = (time.perf_counter() - t0) * 1e3
        timings["total"] = sum(timings.values())
        generation = _generation_report(generator, report)
        if report.get("warning"):
            warnings.append(report["warning"])
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
