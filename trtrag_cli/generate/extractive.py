"""Extractive answers: the passages' sentences that best cover the question's terms, each cited.

Sentences about a product the question did not name are left out (entities.py): the passages for
"advance replacement for a TH-50" include the VX warranty's advance replacement, which shares every
term but the product, and quoting both would contradict itself.
"""

from __future__ import annotations

import math
import re

from trtrag_cli.generate import entities

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
        """Best sentences of the top passages, in passage order, each followed by its [n] citation.

        Where the question names a product, sentences about another one (or, naming none, from a passage
        about another one) are not candidates.
        """
        if not passages:
            return "No passage in the index matches the question."
        candidates = self._candidates(question, passages)
        if not any(candidates):
            return f"No passage found is about {self._named(question)}."
        analyzer = self.lexical.analyzer
        weights = {t: self.lexical.idf(t) for t in set(analyzer.terms(question))}
        scored = []
        for p_no, sentences in enumerate(candidates):
            for s_no, sentence in sentences:
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
            p_no, sentences = next((n, s) for n, s in enumerate(candidates) if s)
            return f"{sentences[0][1]} [{p_no + 1}]"
        best.sort(key=lambda s: (s[1], s[2]))
        return " ".join(f"{sentence} [{p_no + 1}]" for _, p_no, _, sentence in best)

    def _candidates(self, question: str, passages: list[dict]) -> list[list[tuple[int, str]]]:
        """Per passage, the (position, sentence) pairs that may answer: none about another product."""
        texts = [p.get("title") or "" for p in passages] + [p["text"] for p in passages]
        known = entities.known_names(texts)
        asked = entities.question_mentions(question, known)
        out: list[list[tuple[int, str]]] = []
        seen: set[str] = set()
        for passage in passages:
            # Overlapping chunks repeat sentences: each is a candidate once, from the best-ranked passage.
            sentences = [(n, s) for n, s in enumerate(split_sentences(passage["text"]) or [passage["text"]])
                         if not (s in seen or seen.add(s))]
            if not asked:
                out.append(sentences)
                continue
            # A title that names products says what the whole passage is about; else its text does.
            title = entities.mentions(passage.get("title") or "", known)
            about = entities.relation(title or entities.mentions(passage["text"], known), asked)
            keep = []
            for s_no, sentence in sentences:
                own = entities.relation(entities.mentions(sentence, known), asked)
                if own == entities.NAMES or (own == entities.NONE and about != entities.OTHER):
                    keep.append((s_no, sentence))
            out.append(keep)
        return out

    @staticmethod
    def _named(question: str) -> str:
        """The product codes as the question spells them, for the answer that none was found."""
        return ", ".join(entities.spelled_codes(question)) or "what the question names"
