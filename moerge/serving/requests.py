"""The request bodies the server accepts, as pydantic models with OpenAI's types and limits.

Types are strict (``"10"``, ``3.9`` or ``true`` are not a token count; ``"no"`` is not a boolean), numbers finite
(``Infinity``, ``NaN`` and ``1e400`` are refused), strings valid Unicode (a lone surrogate is refused before it
reaches the tokenizer), and a field the server does not know, or knows but does not support with that value, is
refused naming it — never silently ignored. :func:`moerge.serving.protocol.parse_completion` turns a request's
bytes into the checked model (:func:`moerge.serving.protocol.parse_completion` does, answering a refusal with a 400 naming the field).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

__all__ = ["ChatBody", "CompletionBody", "UNSUPPORTED", "field_of", "most_telling", "unsupported"]


def _unicode(s: str) -> str:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("is not valid Unicode (it holds a lone surrogate)") from None
    return s


Text = Annotated[str, AfterValidator(_unicode)]
Float = Annotated[float, Field(allow_inf_nan=False)]

# fields OpenAI defines that the server does not support yet: accepted only with a value that asks for nothing
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "best_of": (None, 1), "suffix": (None, ""), "tools": (None, []), "tool_choice": (None, "none"),
    "functions": (None, []), "function_call": (None, "none"), "parallel_tool_calls": (None, False, True),
}
MAX_LOGPROBS = 20  # alternatives per token (OpenAI's limit for chat; vLLM's for both)
MAX_N = 64  # choices per request


class _Moerge(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    experts: dict[Text, Float] | None = None
    exclude: list[Text] | None = None
    trace: bool = False


class _JsonSchema(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    name: Annotated[Text, Field(min_length=1, max_length=64)]
    description: Text | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class _ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["text", "json_object", "json_schema"]
    json_schema: _JsonSchema | None = None


class _StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool | None = None


class _Common(BaseModel):
    """What chat and text completions share."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: Text | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[Float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Float, Field(gt=0, le=1)] | None = None
    stop: Text | Annotated[list[Text], Field(max_length=4)] | None = None
    seed: Annotated[int, Field(ge=-(2**63), lt=2**64)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] | None = None
    stream: bool | None = None
    stream_options: _StreamOptions | None = None
    response_format: _ResponseFormat | None = None
    presence_penalty: Annotated[Float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[Float, Field(ge=-2, le=2)] | None = None
    logit_bias: dict[Annotated[str, Field(pattern=r"^[0-9]{1,9}$")], Annotated[Float, Field(ge=-100, le=100)]] \
        | None = None
    user: Text | None = None
    moerge: _Moerge | None = None


class _TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["text"]
    text: Text


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[_TextPart] | None = None
    name: Text | None = None

    @model_validator(mode="after")
    def _content_is_required(self) -> _Message:
        # OpenAI: only an assistant message (one that called tools) may come without content
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a '{self.role}' message needs its content (a string or text parts)")
        return self

    def text(self) -> str:
        """The content, its text parts joined."""
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatBody(_Common):
    """A ``/v1/chat/completions`` request."""

    messages: Annotated[list[_Message], Field(min_length=1)]
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None


TokenIds = Annotated[list[Annotated[int, Field(ge=0, lt=2**31)]], Field(min_length=1)]


class CompletionBody(_Common):
    """A ``/v1/completions`` request: one prompt or several, as text or token ids."""

    prompt: Text | TokenIds | Annotated[list[Text], Field(min_length=1, max_length=MAX_N)] \
        | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_N)]
    max_tokens: Annotated[int, Field(ge=0)] | None = None  # 0 with echo: score the prompt
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: bool | None = None


def unsupported(body: dict[str, Any], model: type[BaseModel]) -> tuple[str, str] | None:
    """``(field, problem)`` for the first field of ``body`` that ``model`` does not know, or that OpenAI defines
    but the server does not support with the value given (:data:`UNSUPPORTED`); ``None`` when there is none."""
    for name, value in body.items():
        if name in model.model_fields:
            continue
        if name not in UNSUPPORTED:
            return name, f"unknown field {name!r}"
        if not any(value is ok or (value == ok and type(value) is type(ok)) for ok in UNSUPPORTED[name]):
            return name, f"{name!r} is not supported by this server yet (it would be ignored)"
    return None


_BRANCHES = {"str", "int", "float", "bool", "none", "dict", "list"}


def field_of(error: Any) -> str:
    """The dotted path of the field a pydantic error is about (the union branches in its location left out)."""
    return ".".join(str(p) for p in error.get("loc", ()) if not (isinstance(p, str) and (
        p in _BRANCHES or "[" in p or p.startswith(("function-", "constrained-", "_")))))


def most_telling(errors: list[Any]) -> Any:
    """Of a validation's errors, the one to report: the deepest field, and among a union's branches one about the
    value rather than its type (a list of 5 stop strings: "at most 4 items", not "should be a string")."""
    return min(errors, key=lambda e: (-len(field_of(e).split(".")), str(e.get("type", "")).endswith("_type")))
