"""Extractive answers: the passages' sentences that best cover the question's terms, each cited."""

from __future__ import annotations

import math
import re

RELATIVE_FLOOR = 0.5
_ABBREVIATION = re.compile(r"\b(?:Dr|Mr|Mrs|Ms|Prof|St|Inc|Ltd|Co|Corp|vs|etc|e\.g|i\.e|No|Fig|approx)\.$")
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])|\n+")


def split_sentences(text: str) -> list[str]:
    """Split prose into sentences on end punctuation and line breaks, not after abbreviations."""
    out: list[str] = []
    glue = False
    for piece in _SENTENCE.split(text):
        piece = (piece or "").strip()
        if not piece:
            glue = False
            continue
        if glue and out:
            out[-1] = f"{out[-1]} {piece}"
        else:
            out.append(piece)
        glue = bool(_ABBREVIATION.search(piece))
    # Markdown headings are titles, not statements: they make poor answers.
    return [s for s in out if len(s) > 1 and not s.startswith("#")]


class ExtractiveGenerator:
    """Scores sentences by the IDF-weighted question terms they contain, with a small bonus for rank."""

    name = "extractive"

    def __init__(self, lexical, max_sentences: int = 3):
        self.lexical = lexical
        self.max_sentences = max_sentences

    def answer(self, question: str, passages: list[dict]) -> str:
        """Best sentences of the top passages, in passage order, each followed by its [n] citation."""
        if not passages:
            return "No passage in the index matches the question."
        analyzer = self.lexical.analyzer
        weights = {t: self.lexical.idf(t) for t in set(analyzer.terms(question))}
        scored = []
        for p_no, passage in enumerate(passages):
            for s_no, sentence in enumerate(split_sentences(passage["text"])):
                terms = set(analyzer.terms(sentence))
                if not terms:
                    continue
                cover = sum(w for t, w in weights.items() if t in terms)
                # Favour sentences from higher-ranked passages and penalise very long ones a little.
                score = cover / (1.0 + 0.15 * p_no) / math.log(8 + len(terms))
                scored.append((score, p_no, s_no, sentence))
        best = sorted((s for s in scored if s[0] > 0), key=lambda s: -s[0])[: self.max_sentences]
        # Drop sentences that match far less of the question than the best one: they read as noise.
        best = [s for s in best if s[0] >= RELATIVE_FLOOR * best[0][0]] if best else best
        if not best:
            first = split_sentences(passages[0]["text"]) or [passages[0]["text"]]
            return f"{first[0]} [1]"
        best.sort(key=lambda s: (s[1], s[2]))
        return " ".join(f"{sentence} [{p_no + 1}]" for _, p_no, _, sentence in best)
