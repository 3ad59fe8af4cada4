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


def check_question(question: str) -> str:
    """Reject empty questions; strip whitespace."""
    q = (question or "").strip()
    if not q:
        raise TrtragError("the question is empty", 'ask something, e.g. trtrag ask "What is the warranty period?"')
    return q


class Pipeline:
    """A retriever plus a generator for one workspace; a context manager."""

    def __init__(self, recipe: Recipe):
        from trtrag_cli.encode.models import chunk_tokenizer
        from trtrag_cli.generate.registry import open_generator
        from trtrag_cli.retrieve.retriever import Retriever

        self.recipe = recipe
        self.retriever = Retriever(recipe)
        self.generator = open_generator(recipe, self.retriever.lexical)
        self._counter = chunk_tokenizer(recipe)

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.retriever.close()
        closer = getattr(self.generator, "close", None)
        if closer:
            closer()

    def passages(self, rows, scores, k: int) -> list[dict]:
        """The top-k chunk records as plain dicts, numbered from 1 for citations."""
        out = []
        for n, (row, score) in enumerate(zip(rows[:k].tolist(), scores[:k].tolist()), start=1):
            r = self.retriever.store.records[row]
            out.append({"n": n, "id": r.id, "source": r.source, "file": r.file, "title": r.title,
                        "score": round(float(score), 6), "text": r.text})
        return out

    def ask(self, question: str, top_k: int | None = None, mode: str | None = None,
            on_piece: Callable[[str], None] | None = None) -> dict:
        """Answer one question; the dict is what `ask --json` prints.

        With on_piece, a generator that can stream hands each piece of the answer to it as it comes.
        """
        question = check_question(question)
        warnings = []
        n_tokens = len(self._counter.encode(question).ids)  # special tokens included, as the encoder sees it
        if n_tokens > self.retriever.encoder.max_tokens:
            warnings.append(f"the question has {n_tokens} tokens; the encoder reads only the first "
                            f"{self.retriever.encoder.max_tokens} (BM25 still sees all of it)")
        ranking = self.retriever.rank(question, mode=mode)
        k = top_k or self.recipe.retrieve.top_k
        passages = self.passages(ranking.rows, ranking.scores, k)
        given = passages[: self.recipe.answer.passages]
        t0 = time.perf_counter()
        streamed = on_piece is not None and hasattr(self.generator, "stream")
        # This request's prompt, generation and fallback warning: concurrent asks share the generator.
        report: dict = {}
        language_model = hasattr(self.generator, "stream")   # the extractive generator takes no report
        if streamed:
            pieces = []
            for piece in self.generator.stream(question, given, report):
                pieces.append(piece)
                on_piece(piece)
            answer = "".join(pieces).strip()
        elif language_model:
            answer = self.generator.answer(question, given, report)
        else:
            answer = self.generator.answer(question, given)
        timings = dict(ranking.timings, answer=(time.perf_counter() - t0) * 1e3)
        timings["total"] = sum(timings.values())
        generation = _generation_report(self.generator, report)
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
            "search_backend": self.retriever.vindex.placement,
            "timings_ms": {k: round(v, 3) for k, v in timings.items()},
            "warnings": warnings,
        }
