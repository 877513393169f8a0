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
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from moerge.adapters.expert import Expert
from moerge.runtime.sampling import Pick, Sampling
from moerge.serving.engine import Job
from moerge.serving.requests import ChatBody, CompletionBody, field_of, most_telling, unsupported

__all__ = ["MODEL_ID", "CompletionRequest", "OpenAIError", "StreamHeader", "chat_logprobs", "completion_body",
           "done_event", "error_event", "expert_body", "field_error", "model_ids", "moerge_field", "parse_completion",
           "text_logprobs", "usage"]

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
    prompts: list[str | list[int]]  # the prompts (a chat's: its messages with the template applied), text or ids
    max_tokens: int
    max_tokens_given: bool  # False: the server's default, which never asks for more than the context holds
    sampling: Sampling
    stop: list[str]
    n: int
    echo: bool  # completions: the prompt's text (and log-probabilities) before each choice's
    logprobs: bool  # each token's log-probability (and sampling.top_logprobs alternatives)
    include_usage: bool  # streamed: a last chunk with the usage
    response_format: dict[str, Any] | None  # json_object / json_schema: constrained decoding
    experts: dict[str, float] | None  # a forced mix: the moerge field's, or the expert the model id names
    exclude: tuple[str, ...]
    trace: bool  # answer with each choice's routing
    stream: bool

    def jobs(self, tokenize: Callable[[str], list[int]], vocab_size: int, context_length: int | None,
             constraint: Callable[[], Any] | None = None) -> list[Job]:
        """The engine's jobs for this request, one per prompt (``tokenize``: text to ids, called here, off the event
        loop; ``constraint``: makes each row's structured-output constraint); refused if a prompt is empty, holds a
        token id the model does not have, or would not fit in the context (``None``: unbounded) with its
        completion."""
        bad = next((t for t in self.sampling.logit_bias if t >= vocab_size), None)
        if bad is not None:
            raise OpenAIError(400, f"logit_bias names token id {bad}; this model's ids are below {vocab_size}",
                              param="logit_bias")
        jobs = []
        for i, prompt in enumerate(self.prompts):
            ids = tokenize(prompt) if isinstance(prompt, str) else list(prompt)
            where = "prompt" if len(self.prompts) == 1 else f"prompt[{i}]"
            if not ids:
                raise OpenAIError(400, f"{where} is empty", param="prompt")
            bad = next((t for t in ids if t >= vocab_size), None)
            if bad is not None:
                raise OpenAIError(400, f"{where} holds token id {bad}; this model's ids are below {vocab_size}",
                                  param="prompt")
            max_tokens = self.max_tokens
            if not self.max_tokens_given and context_length is not None:
                max_tokens = max(1, min(max_tokens, context_length - len(ids)))
            if context_length is not None and len(ids) + max_tokens > context_length:
                raise OpenAIError(400, f"{where} has {len(ids)} tokens and {max_tokens} are asked for: longer than "
                                       f"the model's context of {context_length} tokens", param="max_tokens")
            if max_tokens == 0 and not self.echo:
                raise OpenAIError(400, "max_tokens 0 asks for nothing: it is for scoring a prompt with echo",
                                  param="max_tokens")
            jobs.append(Job(ids, max_tokens, self.sampling, self.stop, self.experts, self.exclude, self.n,
                            self.echo and self.logprobs, constraint=constraint))
        return jobs


def parse_completion(body: Any, *, chat: bool, experts: Collection[str], tokenizer: Any,
                     default_max_tokens: int) -> CompletionRequest:
    """Check a ``/v1/chat/completions`` (``chat``) or ``/v1/completions`` request body against the served
    ``experts``; a chat's messages go through ``tokenizer``'s chat template. Raises :class:`OpenAIError`."""
    checked = _checked(body, chat)
    if isinstance(checked, ChatBody):
        if not getattr(tokenizer, "chat_template", None):
            raise OpenAIError(400, "this model's tokenizer has no chat template; use /v1/completions")
        msgs = [{"role": m.role, "content": m.text()} for m in checked.messages]
        prompts: list[str | list[int]] = [tokenizer.apply_chat_template(msgs, tokenize=False,
                                                                         add_generation_prompt=True)]
        logprobs, top = bool(checked.logprobs), checked.top_logprobs
        if top is not None and not logprobs:
            raise OpenAIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        echo = False
    else:
        p = checked.prompt
        prompts = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
        if any(isinstance(x, str) and not x for x in prompts):
            raise OpenAIError(400, "prompt must be a non-empty string", param="prompt")
        logprobs, top, echo = checked.logprobs is not None, checked.logprobs, bool(checked.echo)
    model_id, mix, exclude = _routing(checked, experts)
    stop = checked.stop or []
    stop = [stop] if isinstance(stop, str) else list(stop)
    asked = checked.max_completion_tokens if checked.max_completion_tokens is not None else checked.max_tokens
    sampling = Sampling(
        temperature=1.0 if checked.temperature is None else checked.temperature,
        top_p=1.0 if checked.top_p is None else checked.top_p, seed=checked.seed,
        presence_penalty=checked.presence_penalty or 0.0, frequency_penalty=checked.frequency_penalty or 0.0,
        logit_bias={int(k): v for k, v in (checked.logit_bias or {}).items()},
        top_logprobs=(top or 0) if logprobs else None)
    fmt = checked.response_format
    if fmt is not None and (fmt.type == "json_schema") != (fmt.json_schema is not None):
        raise OpenAIError(400, "response_format: json_schema is required with type 'json_schema', and only then",
                          param="response_format.json_schema")
    if echo and checked.stream:
        raise OpenAIError(400, "echo is not supported with stream: true; ask for the whole completion", param="echo")
    options = checked.stream_options
    if options is not None and not checked.stream:
        raise OpenAIError(400, "stream_options is only for streamed requests (stream: true)", param="stream_options")
    return CompletionRequest(
        chat=chat, model=model_id, prompts=prompts,
        max_tokens=asked if asked is not None else default_max_tokens, max_tokens_given=asked is not None,
        sampling=sampling, stop=stop, n=checked.n or 1, echo=echo, logprobs=logprobs,
        include_usage=bool(options and options.include_usage),
        response_format=None if fmt is None else fmt.model_dump(by_alias=True, exclude_none=True), experts=mix,
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


def moerge_field(results: Sequence[dict[str, Any]], trace: bool) -> dict[str, Any]:
    """A response's ``moerge`` field: the most rows its completions ran with and, with ``trace``, each prompt's
    routing."""
    out: dict[str, Any] = {"batch_size": max((r.get("batch_size", 1) for r in results), default=1)}
    if trace:
        out["routing"] = [r["routing"].to_json() for r in results]
    return out


def _completion_id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"


TokenText = Callable[[int], str]


def _entry(token: int, logprob: float, text: TokenText) -> dict[str, Any]:
    t = text(token)
    return {"token": t, "logprob": logprob, "bytes": list(t.encode("utf-8"))}


def chat_logprobs(picks: Sequence[Pick], text: TokenText) -> dict[str, Any]:
    """A chat choice's ``logprobs``: each token with its log-probability and the most likely alternatives."""
    return {"content": [{**_entry(p.token, p.logprob, text),
                         "top_logprobs": [_entry(t, lp, text) for t, lp in p.top or []]} for p in picks]}


def text_logprobs(picks: Sequence[Pick | None], text: TokenText, prompt_ids: Sequence[int] = (),
                  offset: int = 0) -> dict[str, Any]:
    """A text choice's ``logprobs`` (the legacy shape: tokens, their log-probabilities, the alternatives as
    ``{token: logprob}``, each token's character offset from ``offset``). ``picks`` may start with the prompt's
    (echo), whose first is ``None``: its token is ``prompt_ids[0]`` and it has no log-probability."""
    tokens, lps, tops, offsets = [], [], [], []
    for i, p in enumerate(picks):
        token = p.token if p is not None else prompt_ids[i]
        t = text(token)
        tokens.append(t)
        lps.append(None if p is None else p.logprob)
        tops.append(None if p is None else {text(a): lp for a, lp in (p.top or [])})
        offsets.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def usage(results: Sequence[dict[str, Any]]) -> dict[str, int]:
    """The ``usage`` of a response: each prompt's tokens once, every choice's completion tokens."""
    prompt = sum(r["prompt_tokens"] for r in results)
    done = sum(r["completion_tokens"] for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}


def completion_body(request: CompletionRequest, results: Sequence[dict[str, Any]], text: TokenText,
                    prompt_texts: Sequence[str]) -> dict[str, Any]:
    """The whole response to ``request`` in OpenAI's shape (chat or text), from the engine's results (one per
    prompt; choice ``i · n + j`` is prompt ``i``'s ``j``-th); ``text`` gives a token's text, ``prompt_texts`` each
    prompt's (for echo)."""
    choices = []
    for i, result in enumerate(results):
        for c in result["choices"]:
            choice: dict[str, Any] = {"index": i * request.n + c["index"], "finish_reason": c["finish_reason"],
                                      "logprobs": None}
            if request.chat:
                choice["message"] = {"role": "assistant", "content": c["text"]}
                if request.logprobs:
                    choice["logprobs"] = chat_logprobs(c["picks"], text)
            else:
                head = prompt_texts[i] if request.echo else ""
                choice["text"] = head + c["text"]
                if request.logprobs:
                    before = list(result["prompt_logprobs"] or []) if request.echo else []
                    choice["logprobs"] = text_logprobs(before + c["picks"], text, result.get("prompt_ids", ()))
            choices.append(choice)
    return {"id": _completion_id(request.chat), "object": "chat.completion" if request.chat else "text_completion",
            "created": int(time.time()), "model": request.model, "choices": choices, "usage": usage(results),
            "moerge": moerge_field(results, request.trace)}


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

    def event(self, choices: list[dict[str, Any]], **extra: Any) -> str:
        """One server-sent event with these ``choices`` (and top-level ``extra`` fields)."""
        chat = self.request.chat
        data = {"id": self.id, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": self.created, "model": self.request.model, "choices": choices, **extra}
        if self.request.include_usage and "usage" not in data:
            data["usage"] = None
        return f"data: {json.dumps(data)}\n\n"

    def piece(self, index: int, text: str, picks: Sequence[Pick], finish: str | None, first: bool,
              token_text: TokenText, offset: int = 0, **extra: Any) -> str:
        """An event with choice ``index``'s next ``text`` (the first of a chat choice carries its role), the
        log-probabilities of the tokens it ends when asked, and its ``finish`` reason when it is the last."""
        logprobs = None
        if self.request.chat:
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            if text:
                delta["content"] = text
            if self.request.logprobs and picks:
                logprobs = chat_logprobs(picks, token_text)
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        else:
            if self.request.logprobs and picks:
                logprobs = text_logprobs(picks, token_text, offset=offset)
            choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
        return self.event([choice], **extra)


def error_event(message: str, kind: str) -> str:
    """A server-sent event reporting an error met once the stream has started."""
    return f"data: {json.dumps({'error': {'message': message, 'type': kind}})}\n\n"


def done_event() -> str:
    """The server-sent event that ends every stream."""
    return "data: [DONE]\n\n"
