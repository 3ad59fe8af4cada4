"""Question -> retrieve -> answer, with per-stage timings in milliseconds."""

from __future__ import annotations

import re
import time

from .errors import TrtragError
from .recipe import Recipe

_CITATION = re.compile(r"\[(\d+)\]")


def check_question(question: str) -> str:
    """Reject empty questions; strip whitespace."""
    q = (question or "").strip()
    if not q:
        raise TrtragError("the question is empty", 'ask something, e.g. trtrag ask "What is the warranty period?"')
    return q


class Pipeline:
    """A retriever plus a generator for one workspace; a context manager."""

    def __init__(self, recipe: Recipe):
        from .generators import open_generator
        from .indexing import chunk_tokenizer
        from .retrieve import Retriever

        self.recipe = recipe
        self.retriever = Retriever(recipe)
        self.generator = open_generator(recipe, self.retriever.lexical)
        self._counter = chunk_tokenizer(recipe)

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.retriever.close()

    def passages(self, rows, scores, k: int) -> list[dict]:
        """The top-k chunk records as plain dicts, numbered from 1 for citations."""
        out = []
        for n, (row, score) in enumerate(zip(rows[:k].tolist(), scores[:k].tolist()), start=1):
            r = self.retriever.store.records[row]
            out.append({"n": n, "id": r.id, "source": r.source, "file": r.file, "title": r.title,
                        "score": round(float(score), 6), "text": r.text})
        return out

    def ask(self, question: str, top_k: int | None = None, mode: str | None = None) -> dict:
        """Answer one question; the dict is what `ask --json` prints."""
        question = check_question(question)
        warnings = []
        n_tokens = len(self._counter.encode(question).ids)  # special tokens included, as the encoder sees it
        if n_tokens > self.retriever.encoder.max_tokens:
            warnings.append(f"the question has {n_tokens} tokens; the encoder reads only the first "
                            f"{self.retriever.encoder.max_tokens} (BM25 still sees all of it)")
        ranking = self.retriever.rank(question, mode=mode)
        k = top_k or self.recipe.retrieve.top_k
        passages = self.passages(ranking.rows, ranking.scores, k)
        t0 = time.perf_counter()
        answer = self.generator.answer(question, passages[: self.recipe.answer.passages])
        timings = dict(ranking.timings, answer=(time.perf_counter() - t0) * 1e3)
        timings["total"] = sum(timings.values())
        cited = sorted({int(m) for m in _CITATION.findall(answer)})
        return {
            "question": question,
            "answer": answer,
            "citations": [{"n": n, "source": passages[n - 1]["source"], "file": passages[n - 1]["file"],
                           "chunk": passages[n - 1]["id"]} for n in cited if 0 < n <= len(passages)],
            "passages": passages,
            "mode": mode or self.recipe.retrieve.mode,
            "timings_ms": {k: round(v, 3) for k, v in timings.items()},
            "warnings": warnings,
        }
