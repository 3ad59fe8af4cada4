"""The extractive answer: sentence splitting, scoring by question terms, numbered citations."""

from __future__ import annotations

from trtrag_cli.generate.extractive import ExtractiveGenerator, split_sentences
from trtrag_cli.index.bm25 import LexicalIndex
from trtrag_cli.recipe.schema import LexicalConfig


def test_split_keeps_abbreviations_and_drops_headings():
    text = "# Title\nThe lab is led by Dr. Ada Park. It opened in 2031! Does it ship e.g. sensors? Yes."
    assert split_sentences(text) == ["The lab is led by Dr. Ada Park.", "It opened in 2031!",
                                     "Does it ship e.g. sensors?", "Yes."]


def _generator(texts):
    lex = LexicalIndex(LexicalConfig())
    lex.build(texts)
    return ExtractiveGenerator(lex, max_sentences=2)


def test_answer_cites_the_passage_each_sentence_comes_from():
    passages = [{"text": "Shipping is free above $500. Orders ship from Tacoma."},
                {"text": "The warranty lasts three years for VX sensors. Batteries are covered for one year."}]
    gen = _generator([p["text"] for p in passages] + ["unrelated filler text about lunch menus"])
    answer = gen.answer("How long is the VX warranty?", passages)
    assert answer.startswith("The warranty lasts three years for VX sensors. [2]")
    assert "[1]" not in answer


def test_no_matching_sentence_falls_back_to_the_top_passage():
    passages = [{"text": "Alpha beta gamma. Delta epsilon."}]
    gen = _generator([passages[0]["text"]])
    assert gen.answer("zzz qqq", passages) == "Alpha beta gamma. [1]"
    assert "No passage" in gen.answer("anything", [])
