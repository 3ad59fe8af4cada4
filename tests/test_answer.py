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
    lex = LexicalIndex.from_texts(LexicalConfig(), texts)
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


# ------------------------------------------------------------------ similar documents, other products

WARRANTIES = [
    {"title": "TH and PG Series Limited Warranty",
     "text": "Corvane will repair or replace the faulty device. TH and PG claims are handled return-first: the "
             "customer ships the faulty unit and the replacement is dispatched within five business days. "
             "Advance replacement is not offered for TH and PG Series devices."},
    {"title": "VX Series Limited Warranty",
     "text": "Corvane will repair or replace the faulty sensor. Advance replacement: customers on a Professional "
             "plan receive a replacement sensor within two business days, before the faulty unit is returned."},
    {"title": "TH-50 Environment Sensor",
     "text": "The TH-50 is covered by the TH and PG Series Limited Warranty, with return-first replacement."},
]

DATASHEETS = [
    {"title": "VX200 Vibration Sensor",
     "text": "The VX200 is a wireless vibration sensor. Battery life is up to 5 years at one reading per hour."},
    {"title": "VX300 Pro Vibration Sensor",
     "text": "The VX300 Pro adds full FFT spectra. Battery life is up to 4 years at one reading per hour."},
    {"title": "VX Series Limited Warranty",
     "text": "Batteries in VX Series sensors are warranted for 12 months from shipment."},
]


def _answer(question: str, passages: list[dict], max_sentences: int = 3) -> str:
    lex = LexicalIndex.from_texts(LexicalConfig(), [p["text"] for p in passages])
    return ExtractiveGenerator(lex, max_sentences=max_sentences).answer(question, passages)


def test_sentences_about_a_product_the_question_did_not_name_are_left_out():
    th = _answer("Can I get an advance replacement for a faulty TH-50 sensor?", WARRANTIES)
    assert "Advance replacement is not offered for TH and PG Series devices. [1]" in th
    assert "two business days" not in th and "[2]" not in th
    # The same passages, the other product: now the TH refusal is the sentence that does not belong.
    vx = _answer("Can I get an advance replacement for a faulty VX-300?", WARRANTIES)
    assert "two business days" in vx and "[2]" in vx and "not offered" not in vx


def test_a_sibling_models_page_does_not_answer_for_it():
    for question, want, other in (("What is the battery life of the VX300?", "4 years", "5 years"),
                                  ("what is the battery life of the vx200?", "5 years", "4 years")):
        answer = _answer(question, DATASHEETS)
        assert want in answer and other not in answer, answer
    # A question naming only the family is answered from any model's page.
    assert _answer("Which VX sensor adds full FFT spectra?", DATASHEETS).startswith(
        "The VX300 Pro adds full FFT spectra. [2]")


def test_a_passage_about_two_products_keeps_only_the_sentences_about_the_asked_one():
    passages = [{"title": "TH and PG Series Limited Warranty",
                 "text": "If a PG-12 drifts within 12 months, it is recalibrated free of charge. For the TH-50, "
                         "calibration certificates are valid for 12 months. Calibration after that is not "
                         "covered."}]
    answer = _answer("How long is a TH-50 calibration valid?", passages)
    assert "For the TH-50, calibration certificates are valid for 12 months. [1]" in answer
    assert "PG-12" not in answer


def test_a_product_no_passage_is_about_is_said_and_not_answered_from_another():
    answer = _answer("Does the XR-9 get advance replacement?", WARRANTIES)
    assert answer == "No passage found is about XR-9."
    # Without a product in the question, nothing is filtered.
    assert "[2]" in _answer("Who gets an advance replacement within two business days?", WARRANTIES)


def test_overlapping_chunks_do_not_repeat_a_sentence():
    chunk = "Advance replacement is not offered for TH and PG Series devices."
    passages = [{"title": "TH and PG Series Limited Warranty", "text": chunk},
                {"title": "TH and PG Series Limited Warranty", "text": chunk + " Claims go through support."}]
    assert _answer("Is advance replacement offered for the TH-50?", passages).count(chunk) == 1


def test_the_demo_question_on_the_example_corpus(cli, make_recipe, corpus_copy):
    recipe = make_recipe()
    cli("index", corpus_copy, "--recipe", recipe)
    rep = cli.json("ask", "Can I get an advance replacement for a faulty TH-50 sensor?", "--recipe", recipe)
    assert "Advance replacement is not offered for TH and PG Series devices" in rep["answer"]
    cited = {c["source"] for c in rep["citations"]}
    assert cited and all("vx" not in source for source in cited), rep["answer"]
    assert "two business days" not in rep["answer"]
