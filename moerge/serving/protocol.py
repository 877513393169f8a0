"""The server's OpenAI wire format: request bodies checked into :class:`CompletionRequest` (which gives the engine's
:class:`~moerge.serving.engine.Job`), and the response, stream-event and error shapes.

A ``moerge`` field in a request may force a mix (``"experts": {"sql": 0.7, "math": 0.3}``), exclude experts
(``"exclude": ["code"]``) and ask for the routing trace (``"trace": true``); asking for the model id
``moerge/<expert>`` forces that expert.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from moerge.adapters.expert import Expert
from moerge.serving.engine import Job
from moerge.serving.requests import ChatBody, CompletionBody, field_of, most_telling, unsupported

__all__ = ["MODEL_ID", "CompletionRequest", "OpenAIError", "StreamHeader", "completion_body", "done_event",
           "error_event", "expert_body", "field_error", "model_ids", "moerge_field", "parse_completion", "stream_event"]

MODEL_ID = "moerge"


class OpenAIError(Exception):
    """A refused request, answered with HTTP ``status`` and OpenAI's error object."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict[str, Any]:
        """The response body: OpenAI's ``{"error": {...}}`` (of type ``server_error`` for a 5xx status)."""
        return {"error": {"message": self.message,
                          "type": "server_error" if self.status >= 500 else "invalid_request_error",
                          "param": self.param, "code": self.code}}


def field_error(errors: Sequence[Mapping[str, Any]]) -> OpenAIError:
    """The 400 refusing a request whose fields failed FastAPI's checks (``errors`` as its validation error lists
    them), naming the first field at fault."""
    first = errors[0] if errors else {}
    param = str(first.get("loc", ("", "request"))[-1])
    problem = "is missing" if first.get("type") == "missing" else f"is invalid: {first.get('msg', 'bad value')}"
    return OpenAIError(400, f"the field {param!r} {problem}", param=param)


def model_ids(experts: Collection[str]) -> list[str]:
    """The model ids served: the routed model, then ``moerge/<name>`` for each expert."""
    return [MODEL_ID] + [f"{MODEL_ID}/{n}" for n in experts]


def expert_body(expert: Expert) -> dict[str, Any]:
    """An expert as the API shows it: its model id, name, number of modules and kind."""
    return {"object": "expert", "id": f"{MODEL_ID}/{expert.name}", "name": expert.name,
            "modules": len(expert.modules), "kind": expert.kind}


@dataclass(frozen=True)
class CompletionRequest:
    """A chat or text completion request, checked."""

    chat: bool  # /v1/chat/completions; else /v1/completions
    model: str  # the model id asked for
    text: str  # the prompt, chat template applied
    max_tokens: int
    max_tokens_given: bool  # False: the server's default, which never asks for more than the context holds
    temperature: float
    top_p: float
    stop: list[str]
    seed: int | None
    experts: dict[str, float] | None  # a forced mix: the moerge field's, or the expert the model id names
    exclude: tuple[str, ...]
    trace: bool  # answer with each choice's routing
    stream: bool

    def job(self, prompt_tokens: int, context_length: int | None) -> Job:
        """The engine's job for this request, given the prompt's token count and the model's context (``None``:
        unbounded); refused if the prompt is empty or the completion would not fit."""
        if prompt_tokens == 0:
            raise OpenAIError(400, "the prompt is empty", param="prompt")
        max_tokens = self.max_tokens
        if not self.max_tokens_given and context_length is not None:
            max_tokens = max(1, min(max_tokens, context_length - prompt_tokens))
        if context_length is not None and prompt_tokens + max_tokens > context_length:
            raise OpenAIError(400, f"the prompt has {prompt_tokens} tokens and {max_tokens} are asked for: longer "
                                   f"than the model's context of {context_length} tokens", param="max_tokens")
        return Job(self.text, max_tokens, self.temperature, self.top_p, self.stop, self.experts, self.exclude,
                   self.seed)


def parse_completion(body: Any, *, chat: bool, experts: Collection[str], tokenizer: Any,
                     default_max_tokens: int) -> CompletionRequest:
    """Check a ``/v1/chat/completions`` (``chat``) or ``/v1/completions`` request body against the served
    ``experts``; a chat's messages go through ``tokenizer``'s chat template. Raises :class:`OpenAIError`."""
    checked = _checked(body, chat)
    if isinstance(checked, ChatBody):
        if not getattr(tokenizer, "chat_template", None):
            raise OpenAIError(400, "this model's tokenizer has no chat template; use /v1/completions")
        msgs = [{"role": m.role, "content": m.text()} for m in checked.messages]
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    else:
        text = checked.prompt[0] if isinstance(checked.prompt, list) else checked.prompt
        if not text:
            raise OpenAIError(400, "prompt must be a non-empty string", param="prompt")
    model_id, mix, exclude = _routing(checked, experts)
    stop = checked.stop or []
    stop = [stop] if isinstance(stop, str) else list(stop)
    asked = checked.max_completion_tokens if checked.max_completion_tokens is not None else checked.max_tokens
    return CompletionRequest(
        chat=chat, model=model_id, text=text, max_tokens=asked if asked is not None else default_max_tokens,
        max_tokens_given=asked is not None, temperature=1.0 if checked.temperature is None else checked.temperature,
        top_p=1.0 if checked.top_p is None else checked.top_p, stop=stop, seed=checked.seed, experts=mix,
        exclude=exclude, trace=bool(checked.moerge and checked.moerge.trace), stream=bool(checked.stream))


def _checked(body: Any, chat: bool) -> ChatBody | CompletionBody:
    """The request ``body`` (its bytes, or its JSON parsed) checked (:mod:`moerge.serving.requests`);
    :class:`OpenAIError` 400 naming what is wrong: bytes that are not UTF-8 or not JSON, a body that is not
    an object, a field missing, of the wrong type, out of range, unknown or unsupported."""
    if isinstance(body, (bytes, bytearray)):
        try:
            text = bytes(body).decode("utf-8")
        except UnicodeDecodeError as e:
            raise OpenAIError(400, f"the request body is not UTF-8: {e}") from None
        if not text.strip():
            raise OpenAIError(400, "the request body is empty: send a JSON object")
        try:
            body = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as e:
            raise OpenAIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise OpenAIError(400, "the request body must be a JSON object")
    model = ChatBody if chat else CompletionBody
    refused = unsupported(body, model)
    if refused is not None:
        raise OpenAIError(400, refused[1], "unsupported_parameter", refused[0])
    try:
        return model.model_validate({k: v for k, v in body.items() if k in model.model_fields})
    except ValidationError as e:
        first = most_telling(e.errors())
        param = field_of(first) or None
        what = "is missing" if first.get("type") == "missing" else f"is invalid: {first.get('msg', 'bad value')}"
        raise OpenAIError(400, f"the field {param!r} {what}" if param else f"the request {what}",
                          "invalid_request", param) from None


def _routing(checked: ChatBody | CompletionBody,
             experts: Collection[str]) -> tuple[str, dict[str, float] | None, tuple[str, ...]]:
    """The model id asked for, the forced mix (``None``: routed) and the excluded experts, sorted (the types were
    checked with the request: what is left is whether they name experts the server has)."""
    model_id = checked.model or MODEL_ID
    if model_id not in model_ids(experts):
        raise OpenAIError(404, f"the model {model_id!r} does not exist; see GET /v1/models", "model_not_found",
                          "model")
    ext = checked.moerge
    mix = None if ext is None else ext.experts
    if model_id != MODEL_ID:
        mix = {model_id.split("/", 1)[1]: 1.0}
    if mix is not None and not mix:
        raise OpenAIError(400, "moerge.experts must map expert names to weights", param="moerge.experts")
    exclude = (ext.exclude if ext is not None else None) or []
    known = set(experts)
    if mix is not None and any(n not in known for n in mix):
        raise OpenAIError(400, f"moerge.experts: unknown experts {[n for n in mix if n not in known][:5]}",
                          param="moerge.experts")
    if any(n not in known for n in exclude):
        raise OpenAIError(400, f"moerge.exclude: unknown experts {[n for n in exclude if n not in known][:5]}",
                          param="moerge.exclude")
    return model_id, mix, tuple(sorted(exclude))


def moerge_field(result: dict[str, Any], trace: bool) -> dict[str, Any]:
    """A response's ``moerge`` field: the size of the batch the completion ran in and, with ``trace``, its routing."""
    out: dict[str, Any] = {"batch_size": result.get("batch_size", 1)}
    if trace:
        out["routing"] = [result["routing"].to_json()]
    return out


def _completion_id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"


def completion_body(request: CompletionRequest, result: dict[str, Any]) -> dict[str, Any]:
    """The whole response to ``request`` in OpenAI's shape (chat or text), from the engine's ``result``."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": result["finish_reason"], "logprobs": None}
    if request.chat:
        choice["message"] = {"role": "assistant", "content": result["text"]}
    else:
        choice["text"] = result["text"]
    prompt_tokens = result.get("prompt_tokens", 0)
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": result["completion_tokens"],
             "total_tokens": prompt_tokens + result["completion_tokens"]}
    return {"id": _completion_id(request.chat), "object": "chat.completion" if request.chat else "text_completion",
            "created": int(time.time()), "model": request.model, "choices": [choice], "usage": usage,
            "moerge": moerge_field(result, request.trace)}


@dataclass(frozen=True)
class StreamHeader:
    """What every event of one streamed response shares."""

    request: CompletionRequest
    id: str
    created: int

    @classmethod
    def start(cls, request: CompletionRequest) -> StreamHeader:
        """The header of a new streamed response to ``request``."""
        return cls(request, _completion_id(request.chat), int(time.time()))


def stream_event(header: StreamHeader, text: str | None, finish: str | None, first: bool = False,
                 extra: dict[str, Any] | None = None) -> str:
    """One server-sent event of a streamed response: a piece of ``text`` (the first one carries the chat's role),
    or the end with its ``finish`` reason and the ``moerge`` field ``extra``."""
    if header.request.chat:
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if text:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
    data = {"id": header.id, "object": "chat.completion.chunk" if header.request.chat else "text_completion",
            "created": header.created, "model": header.request.model, "choices": [choice]}
    if extra:
        data["moerge"] = extra
    return f"data: {json.dumps(data)}\n\n"


def error_event(message: str, kind: str) -> str:
    """A server-sent event reporting an error met once the stream has started."""
    return f"data: {json.dumps({'error': {'message': message, 'type': kind}})}\n\n"


def done_event() -> str:
    """The server-sent event that ends every stream."""
    return "data: [DONE]\n\n"
