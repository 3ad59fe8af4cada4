"""Request bodies of `trtrag serve` as pydantic models, and the OpenAI error shape every failure uses.

Numbers are strict (`"top_k": "5"` is refused, not coerced): a client that sends a string has a bug worth
hearing about. Unknown fields are ignored, as OpenAI clients send fields a node may not know.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, field_validator

MAX_QUESTION_CHARS = 8192  # a 20 MB question once took 37 s and 1.5 GB in the encoder's tokenizer
MAX_EMBED_INPUTS = 2048
MODES = Literal["hybrid", "rrf", "bm25", "dense"]


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """The OpenAI error document: {"error": {message, type, param, code}}."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class RequestError(Exception):
    """A request the server refuses, with its HTTP status; rendered as error_body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


def _question(value: str) -> str:
    if not value.strip():
        raise ValueError("must be a non-empty string")
    return value


class AskRequest(_Body):
    question: StrictStr = Field(max_length=MAX_QUESTION_CHARS)
    top_k: Optional[StrictInt] = Field(None, ge=1, le=1000)
    mode: Optional[MODES] = None

    _check = field_validator("question")(_question)


class RetrieveRequest(_Body):
    query: StrictStr = Field(max_length=MAX_QUESTION_CHARS)
    top_k: Optional[StrictInt] = Field(None, ge=1, le=1000)
    mode: Optional[MODES] = None

    _check = field_validator("query")(_question)


class EmbeddingsRequest(_Body):
    input: Union[StrictStr, list[StrictStr]]
    model: Optional[StrictStr] = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[StrictInt] = None
    user: Optional[StrictStr] = None

    @field_validator("input")
    @classmethod
    def _texts(cls, value):
        texts = [value] if isinstance(value, str) else value
        if not texts or len(texts) > MAX_EMBED_INPUTS:
            raise ValueError(f"must hold 1 to {MAX_EMBED_INPUTS} strings")
        if any(not t for t in texts):
            raise ValueError("must not hold an empty string")
        if any(len(t) > MAX_QUESTION_CHARS for t in texts):
            raise ValueError(f"strings must be at most {MAX_QUESTION_CHARS} characters")
        return value


class TextPart(_Body):
    type: Literal["text"]
    text: StrictStr


class Message(_Body):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Union[StrictStr, list[TextPart], None] = None

    def text(self) -> str:
        """The content as one string (text parts joined)."""
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class StreamOptions(_Body):
    include_usage: StrictBool = False


class ChatRequest(_Body):
    model: StrictStr = ""
    messages: list[Message] = Field(min_length=1)
    stream: StrictBool = False
    stream_options: Optional[StreamOptions] = None
    max_tokens: Optional[StrictInt] = Field(None, ge=1)
    max_completion_tokens: Optional[StrictInt] = Field(None, ge=1)
    temperature: Optional[Union[StrictFloat, StrictInt]] = Field(None, ge=0, le=2)
    top_p: Optional[Union[StrictFloat, StrictInt]] = Field(None, gt=0, le=1)
    top_k: Optional[StrictInt] = Field(None, ge=0)
    n: StrictInt = 1
    stop: Union[StrictStr, list[StrictStr], None] = Field(None)
    seed: Optional[StrictInt] = Field(None, ge=0)
    # trtrag's own, for the RAG model: how many passages and which rerank mode
    retrieve_top_k: Optional[StrictInt] = Field(None, ge=1, le=1000)
    mode: Optional[MODES] = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences")
        return value

    @field_validator("n")
    @classmethod
    def _one(cls, value):
        if value != 1:
            raise ValueError("only n=1 is served")
        return value

    def stops(self) -> tuple[str, ...]:
        """stop as a tuple of non-empty strings."""
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return tuple(s for s in stop if s)

    def last_user(self) -> str:
        """The last user turn: what the RAG model answers."""
        for message in reversed(self.messages):
            if message.role == "user":
                return message.text()
        raise RequestError(400, "messages hold no user turn to answer", "messages")
