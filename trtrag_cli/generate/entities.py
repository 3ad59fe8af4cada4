"""Which product a question and a passage are about, from product codes and series names.

Documents about similar products (a TH and a VX warranty, a VX200 and a VX300 Pro datasheet) share most
of their words, so term overlap alone lets an extractive answer stitch sentences about different
products into one contradictory reply. Product codes are what tell them apart:

- a code is uppercase letters then digits, with an optional hyphen and letter suffix: TH-50, VX200,
  PG-12H, G4 (written as TH50, VX200, PG12H, G4); its letters are its family (TH, VX, PG, G);
- a family is also named on its own ("VX Series", "TH and PG Series", or a bare "TH" once known).

A question names a code the passages know (the code or its family appears in them), or one it writes
the way codes are written (XR-9: uppercase letters, then digits); "does it support ipv6?" names none.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

NAMES, NONE, OTHER = "names", "none", "other"

_CODE = re.compile(r"\b([A-Z]{1,5})-?(\d{1,5}[A-Z]?)\b")
_QUESTION_CODE = re.compile(r"\b([A-Za-z]{1,5})-?(\d{1,5}[A-Za-z]?)\b")
_SERIES = re.compile(r"\b([A-Z]{2,5}(?:\s*(?:,|and|&|/)\s*[A-Z]{2,5})*)[\s-]+[Ss]eries\b")
_WORD = re.compile(r"\b[A-Z]{2,5}\b")
_QUESTION_WORD = re.compile(r"\b[A-Za-z]{2,5}\b")


@dataclass(frozen=True)
class Mentions:
    """The product codes and family names a piece of text mentions."""

    codes: frozenset[str] = frozenset()
    families: frozenset[str] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.codes or self.families)

    def all_families(self) -> set[str]:
        """Families named outright plus those of the codes."""
        return set(self.families) | {family(c) for c in self.codes}


def family(code: str) -> str:
    """The letters of a normalised code: TH50 -> TH."""
    return re.match(r"[A-Z]*", code).group(0)


def known_names(texts: list[str]) -> set[str]:
    """Codes and family names the texts establish: codes, their letters, and words before 'Series'."""
    found: set[str] = set()
    for text in texts:
        for m in _CODE.finditer(text):
            found.add(m.group(1) + m.group(2))
            if len(m.group(1)) >= 2:  # one letter alone (the G of G4) would match too many words
                found.add(m.group(1))
        for m in _SERIES.finditer(text):
            found.update(_WORD.findall(m.group(1)))
    return found


def mentions(text: str, known: set[str]) -> Mentions:
    """Codes in `text` and the known family names it uses on their own."""
    codes = {m.group(1) + m.group(2) for m in _CODE.finditer(text)}
    return Mentions(frozenset(codes), frozenset(w for w in _WORD.findall(text) if w in known))


def question_mentions(question: str, known: set[str]) -> Mentions:
    """What the question names: codes the passages know (in any case) or written as codes, known families."""
    codes = {(m.group(1) + m.group(2)).upper() for m in _QUESTION_CODE.finditer(question)}
    codes = {c for c in codes if c in known or family(c) in known}
    codes |= {m.group(1) + m.group(2) for m in _CODE.finditer(question)}
    words = {w.upper() for w in _QUESTION_WORD.findall(question)} & known
    return Mentions(frozenset(codes), frozenset(words | {family(c) for c in codes}))


def spelled_codes(question: str) -> list[str]:
    """The codes in a question as it spells them (th-50, VX200), once each."""
    return list(dict.fromkeys(m.group(0) for m in _QUESTION_CODE.finditer(question)))


def relation(span: Mentions, question: Mentions) -> str:
    """NAMES if the span is about what the question names, OTHER if about something else, else NONE.

    A span naming the question's code is about it. One naming only a sibling of that code (VX200 for a
    VX300 question) is not, even if it also says "VX": that is the sibling's page. A span naming the
    family (the "VX Series" warranty) covers every model in it.
    """
    if span.codes & question.codes:
        return NAMES
    asked = {family(c) for c in question.codes}
    if asked and {family(c) for c in span.codes} & asked:
        return OTHER
    if span.all_families() & question.families:
        return NAMES
    return OTHER if span else NONE
