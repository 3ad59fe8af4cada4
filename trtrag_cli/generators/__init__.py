"""Answer generators behind one small interface: `answer(question, passages) -> (text, used citations)`."""

from __future__ import annotations

from typing import Protocol

from ..errors import TrtragError


class Generator(Protocol):
    name: str

    def answer(self, question: str, passages: list[dict]) -> str:
        """Answer text with [n] citations, n being the 1-based position in `passages`."""


def open_generator(recipe, lexical) -> Generator:
    """The generator the recipe names; backends are imported only when chosen."""
    name = recipe.answer.generator
    if name == "extractive":
        from .extractive import ExtractiveGenerator

        return ExtractiveGenerator(lexical, recipe.answer.max_sentences)
    raise TrtragError(f"unknown generator '{name}'", "use answer.generator: extractive")
