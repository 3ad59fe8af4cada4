"""The generation prompt: a system prompt, the retrieved passages numbered for citation, the question.

It is fitted to the model's context in the model's own tokens, never by characters: the question and
the system prompt must fit with room for the answer, then passages are added best first while they fit,
and the last one that does not fit whole is cut at a token boundary if enough of it remains to be
useful. Where the tokenizer has a chat template, the prompt is rendered through it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from trtrag_cli.util.errors import TrtragError

SYSTEM = ("Answer the question using only the numbered passages. Cite every claim with the passage number "
          "in square brackets, like [1]. If the passages do not contain the answer, say so.")
MIN_PASSAGE_TOKENS = 32  # a cut passage shorter than this is dropped instead
_CITATION = re.compile(r"\[(\d+)\]")


@dataclass
class Prompt:
    """What goes to the model: rendered text and its token ids, and which passages made it in."""

    text: str
    ids: list[int]
    passages: list[dict]
    dropped: int = 0
    cut: bool = False
    messages: list[dict] = field(default_factory=list)


def _passage_block(n: int, passage: dict, text: str | None = None) -> str:
    title = f" {passage['title']}" if passage.get("title") else ""
    return f"[{n}]{title} ({passage.get('source', '')})\n{passage['text'] if text is None else text}\n"


def _user_message(question: str, blocks: list[str]) -> str:
    return "Passages:\n\n" + "\n".join(blocks) + f"\nQuestion: {question}"


def render_messages(tokenizer, messages: list[dict]) -> tuple[str, list[int]]:
    """Prompt text and ids for chat messages: the tokenizer's chat template when it has one (its text
    carries the special tokens), else system lines, a blank line, the other lines and "Answer:"."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text, list(tokenizer(text, add_special_tokens=False)["input_ids"])
    system = "\n".join(m.get("content", "") for m in messages if m.get("role") == "system")
    user = "\n".join(m.get("content", "") for m in messages if m.get("role") != "system")
    text = f"{system}\n\n{user}\nAnswer:"
    return text, list(tokenizer(text)["input_ids"])


def render(tokenizer, system: str, user: str) -> tuple[str, list[int], list[dict]]:
    """Prompt text, ids and messages for one system and one user message."""
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    return (*render_messages(tokenizer, messages), messages)


def build_prompt(tokenizer, question: str, passages: list[dict], context: int, max_new_tokens: int,
                 system: str = SYSTEM) -> Prompt:
    """The longest prompt of whole passages (best first) that leaves max_new_tokens of the context free."""
    budget = context - max_new_tokens
    text, ids, messages = render(tokenizer, system, _user_message(question, []))
    if len(ids) > budget:
        raise TrtragError(f"the question and instructions take {len(ids)} tokens, but the model's context of "
                          f"{context} leaves {budget} after {max_new_tokens} answer tokens",
                          "shorten the question, lower answer.sampling.max_new_tokens, or use a model with a longer context")
    blocks: list[str] = []
    kept: list[dict] = []
    cut = False
    for n, passage in enumerate(passages, start=1):
        trial_text, trial_ids, trial_messages = render(tokenizer, system,
                                                       _user_message(question, blocks + [_passage_block(n, passage)]))
        if len(trial_ids) <= budget:
            blocks.append(_passage_block(n, passage))
            kept.append(passage)
            text, ids, messages = trial_text, trial_ids, trial_messages
            continue
        # Cut this passage to what is left, in the tokenizer's own tokens, if enough remains.
        empty = render(tokenizer, system, _user_message(question, blocks + [_passage_block(n, passage, "")]))[1]
        room = budget - len(empty)
        piece = _first_tokens(tokenizer, passage["text"], room)
        while room >= MIN_PASSAGE_TOKENS:  # re-tokenizing the cut text can move its boundary a little
            block = _passage_block(n, passage, piece)
            t, i, m = render(tokenizer, system, _user_message(question, blocks + [block]))
            if len(i) <= budget:
                blocks.append(block)
                kept.append(dict(passage, text=piece))
                text, ids, messages, cut = t, i, m, True
                break
            room -= len(i) - budget
            piece = _first_tokens(tokenizer, piece, room)
        break
    return Prompt(text, ids, kept, dropped=len(passages) - len(kept), cut=cut, messages=messages)


def _first_tokens(tokenizer, text: str, n: int) -> str:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max(0, n)]
    return tokenizer.decode(ids, skip_special_tokens=True)


def citations(answer: str, passages: list[dict]) -> list[dict]:
    """[n] markers in the answer mapped back to their passages' sources (unknown numbers are ignored)."""
    cited = sorted({int(m) for m in _CITATION.findall(answer)})
    return [{"n": n, "source": passages[n - 1].get("source"), "file": passages[n - 1].get("file"),
             "chunk": passages[n - 1].get("id")} for n in cited if 0 < n <= len(passages)]
