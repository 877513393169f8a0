"""An OpenAI-compatible HTTP API over a routed model (FastAPI + uvicorn): ``moerge serve``.

Endpoints:

* ``GET /v1/models`` — the routed model (``moerge``) and each expert as ``moerge/<name>``; asking for an expert's id
  forces that expert.
* ``POST /v1/chat/completions`` and ``POST /v1/completions`` — OpenAI's request and response shapes, streamed as
  server-sent events with ``"stream": true``. A ``moerge`` field in the request (with the openai client:
  ``extra_body={"moerge": {...}}``) may force a mix (``"experts": {"sql": 0.7, "math": 0.3}``), exclude experts
  (``"exclude": ["code"]``) and ask for the routing trace (``"trace": true``); the response then carries a
  ``moerge`` field with each choice's routing and the size of the batch it ran in.
* ``POST /v1/experts`` — add an expert post hoc: a multipart upload of a PEFT adapter (``adapter_config`` and
  ``adapter_model`` files, ``name``, optional ``description`` and ``examples``), with every check of the library;
  ``DELETE /v1/experts/{name}`` removes one.

Requests that arrive together are batched: a worker takes what is queued within ``batch_window`` seconds (up to
``max_batch``), groups requests that can share one ``generate`` call (same sampling settings, routed or forced,
same exclusions) and runs each group as one batch, every row routed on its own. Streamed requests run one per call,
in their own thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import torch
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, StreamingResponse

from moerge.errors import MoErgeError

__all__ = ["create_app", "serve", "ServerConfig"]

MODEL_ID = "moerge"


@dataclass
class ServerConfig:
    max_batch: int = 8
    batch_window: float = 0.02  # seconds the worker waits for more requests after the first
    default_max_tokens: int = 128


@dataclass
class _Job:
    text: str  # the prompt, chat template applied
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    experts: dict[str, float] | None
    exclude: tuple[str, ...]
    seed: int | None
    future: Future = field(default_factory=Future)

    def key(self) -> tuple:
        """Requests with the same key can run in one generate call."""
        return (self.temperature, self.top_p, self.experts is not None, self.exclude, self.seed)


def _fail(job: _Job, e: BaseException) -> None:
    if not job.future.done():
        job.future.set_exception(e)


class _OpenAIError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


class _Engine:
    """Runs jobs on the model: batched (a worker thread) or streamed (one thread per request)."""

    def __init__(self, model: Any, tokenizer: Any, config: ServerConfig) -> None:
        self.model, self.tok, self.config = model, tokenizer, config
        tokenizer.padding_side = "left"
        vocab = tokenizer.get_vocab()
        self.ends = {tokenizer.eos_token_id, self.pad_id} | ({vocab["<|im_end|>"]} if "<|im_end|>" in vocab else set())
        self.tok_lock = threading.Lock()
        self.queue: queue.Queue[_Job] = queue.Queue()
        self.batches: list[int] = []  # sizes of the batches run (for tests and /v1/moerge/stats)
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._loop, name="moerge-batcher", daemon=True)
        self._worker.start()

    def close(self) -> None:
        self._stop.set()
        self._worker.join(timeout=5)

    @property
    def pad_id(self) -> int:
        tok = self.tok
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def _kwargs(self, job: _Job, max_new: int) -> dict[str, Any]:
        kw: dict[str, Any] = dict(max_new_tokens=max_new, pad_token_id=self.pad_id)
        if job.temperature > 0:
            kw.update(do_sample=True, temperature=job.temperature, top_p=job.top_p)
        else:
            kw.update(do_sample=False)
        return kw

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                first = self.queue.get(timeout=0.1)
            except queue.Empty:
                continue
            jobs = [first]
            deadline = time.monotonic() + self.config.batch_window
            while len(jobs) < self.config.max_batch:
                try:
                    jobs.append(self.queue.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            jobs = [j for j in jobs if j.future.set_running_or_notify_cancel()]  # drop requests given up on
            groups: dict[tuple, list[_Job]] = {}
            for j in jobs:
                groups.setdefault(j.key(), []).append(j)
            for group in groups.values():
                try:
                    self._run(group)
                except BaseException as e:  # noqa: BLE001 - one batch's failure is its requests', not the worker's
                    if len(group) == 1:
                        _fail(group[0], e)
                        continue
                    for job in group:  # run alone, so one bad request does not fail the others
                        try:
                            self._run([job])
                        except BaseException as e1:  # noqa: BLE001
                            _fail(job, e1)

    def encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Left-padded token ids of ``texts`` on the model's device (the fast tokenizer's padding settings are
        shared state: one call at a time)."""
        with self.tok_lock:
            batch = self.tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        return {k: v.to(self.model.device) for k, v in batch.items()}

    def _run(self, jobs: list[_Job]) -> None:
        batch = self.encode([j.text for j in jobs])
        first = jobs[0]
        if first.seed is not None:
            torch.manual_seed(first.seed)
        with torch.no_grad():
            out = self.model.generate(**batch, experts=[j.experts for j in jobs] if first.experts is not None
                                      else None, exclude=first.exclude or None,
                                      **self._kwargs(first, max(j.max_tokens for j in jobs)))
        routing = self.model.last_routing
        self.batches.append(len(jobs))
        width = batch["input_ids"].shape[1]
        for b, job in enumerate(jobs):
            ids = out[b, width:].tolist()
            text, finish, n = self._finish(ids, job)
            if not job.future.done():
                job.future.set_result({"text": text, "finish_reason": finish, "completion_tokens": n,
                                       "prompt_tokens": int(batch["attention_mask"][b].sum()),
                                       "routing": routing[b], "batch_size": len(jobs)})

    def _finish(self, ids: list[int], job: _Job) -> tuple[str, str, int]:
        """The completion's text, why it ended and its token count: cut at the end of turn / EOS, at the request's
        own max_tokens (a batch generates up to its longest), and at the first stop sequence."""
        finish = "length"
        kept: list[int] = []
        for t in ids[: job.max_tokens]:
            if t in self.ends:  # end of sequence, padding, or the chat template's end of turn
                finish = "stop"
                break
            kept.append(t)
        text = self.tok.decode(kept, skip_special_tokens=True)
        for s in job.stop:
            if s and s in text:
                text, finish = text[: text.index(s)], "stop"
        return text, finish, len(kept)

    def stream(self, job: _Job, info: dict[str, Any]) -> Iterator[str]:
        """The completion's text in pieces, as generated (one request per generate call); when done, ``info``
        holds the finish reason, the routing and the token count."""
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        streamer = TextIteratorStreamer(self.tok, skip_prompt=True, skip_special_tokens=True)
        batch = self.encode([job.text])
        result: dict[str, Any] = {}
        cancel = threading.Event()  # a stop sequence was met, or the client went away: stop generating

        class Cancelled(StoppingCriteria):
            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kw: Any) -> torch.Tensor:
                return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool, device=input_ids.device)

        def run() -> None:
            try:
                with torch.no_grad():
                    out = self.model.generate(**batch, streamer=streamer, experts=job.experts,
                                              exclude=job.exclude or None,
                                              stopping_criteria=StoppingCriteriaList([Cancelled()]),
                                              **self._kwargs(job, job.max_tokens))
                result["routing"] = self.model.last_routing[0]
                result["ids"] = out[0, batch["input_ids"].shape[1]:].tolist()
            except BaseException as e:  # noqa: BLE001 - raised in the caller's thread below
                result["error"] = e
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        sent, stopped = "", False
        try:
            for piece in streamer:
                if stopped:
                    continue  # what the generation made before it saw the cancel
                text = sent + piece
                cut = min((text.index(s) for s in job.stop if s and s in text), default=None)
                if cut is not None:
                    text, stopped = text[:cut], True
                    cancel.set()
                if len(text) > len(sent):
                    yield text[len(sent):]
                sent = text
        finally:  # also when the client disconnects (the generator is closed)
            cancel.set()
            thread.join()
        if "error" in result:
            raise result["error"]
        _, finish, n = self._finish(result["ids"], job)
        info.update(finish_reason="stop" if stopped else finish, routing=result["routing"], completion_tokens=n,
                    prompt_tokens=int(batch["attention_mask"].sum()))


def create_app(model: Any, tokenizer: Any, config: ServerConfig | None = None) -> Any:
    """The FastAPI app serving ``model`` (a :class:`~moerge.MoErgeModel` with its library, if any)."""
    config = config or ServerConfig()
    engine = _Engine(model, tokenizer, config)

    @contextlib.asynccontextmanager
    async def lifespan(_: Any):
        yield
        engine.close()

    app = FastAPI(title="moerge", description="OpenAI-compatible API over a routed mixture of experts",
                  lifespan=lifespan)
    app.state.engine = engine

    @app.exception_handler(_OpenAIError)
    async def _openai_error(_: Request, e: _OpenAIError) -> JSONResponse:
        return JSONResponse(status_code=e.status, content={"error": {
            "message": e.message, "type": "invalid_request_error", "param": e.param, "code": e.code}})

    def models() -> list[str]:
        return [MODEL_ID] + [f"{MODEL_ID}/{n}" for n in model.experts]

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        now = int(time.time())
        return {"object": "list", "data": [{"id": m, "object": "model", "created": now, "owned_by": "moerge"}
                                           for m in models()]}

    @app.get("/v1/moerge/stats")
    async def stats() -> dict[str, Any]:
        return {"batches": list(engine.batches), "experts": list(model.experts)}

    def job_from(body: dict[str, Any], text: str) -> _Job:
        model_id = body.get("model") or MODEL_ID
        if model_id not in models():
            raise _OpenAIError(404, f"the model {model_id!r} does not exist; see GET /v1/models", "model_not_found",
                               "model")
        ext = body.get("moerge") or {}
        if not isinstance(ext, dict):
            raise _OpenAIError(400, "moerge must be an object", param="moerge")
        experts = ext.get("experts")
        if model_id != MODEL_ID:
            experts = {model_id.split("/", 1)[1]: 1.0}
        if experts is not None and not (isinstance(experts, dict) and experts):
            raise _OpenAIError(400, "moerge.experts must map expert names to weights", param="moerge.experts")
        exclude = ext.get("exclude") or []
        if not (isinstance(exclude, list) and all(isinstance(n, str) for n in exclude)):
            raise _OpenAIError(400, "moerge.exclude must be a list of expert names", param="moerge.exclude")
        known = set(model.experts)
        if experts is not None and isinstance(experts, dict):
            bad = [n for n, w in experts.items() if n not in known or isinstance(w, bool)
                   or not isinstance(w, (int, float))]
            if bad:
                raise _OpenAIError(400, f"moerge.experts: unknown expert or weight not a number: {bad[:5]}",
                                   param="moerge.experts")
        if any(n not in known for n in exclude):
            raise _OpenAIError(400, f"moerge.exclude: unknown experts {[n for n in exclude if n not in known][:5]}",
                               param="moerge.exclude")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not (isinstance(stop, list) and len(stop) <= 4 and all(isinstance(x, str) for x in stop)):
            raise _OpenAIError(400, "stop must be a string or a list of at most 4 strings", param="stop")
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise _OpenAIError(400, "seed must be an integer", param="seed")
        asked = body.get("max_completion_tokens", body.get("max_tokens"))
        try:
            max_tokens = int(asked if asked is not None else config.default_max_tokens)
            temperature = float(body.get("temperature", 1.0) if body.get("temperature") is not None else 1.0)
            top_p = float(body.get("top_p") if body.get("top_p") is not None else 1.0)
        except (TypeError, ValueError):
            raise _OpenAIError(400, "max_tokens, temperature and top_p must be numbers") from None
        if max_tokens <= 0 or temperature < 0 or not 0 < top_p <= 1:
            raise _OpenAIError(400, "max_tokens must be positive, temperature ≥ 0 and top_p in (0, 1]")
        if body.get("n") not in (None, 1):
            raise _OpenAIError(400, "n > 1 is not supported; send several requests (they are batched)", param="n")
        with engine.tok_lock:
            n_prompt = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        ctx = model.context_length
        if n_prompt == 0:
            raise _OpenAIError(400, "the prompt is empty", param="prompt")
        if asked is None and ctx is not None:  # the default never asks for more than the context holds
            max_tokens = max(1, min(max_tokens, ctx - n_prompt))
        if ctx is not None and n_prompt + max_tokens > ctx:
            raise _OpenAIError(400, f"the prompt has {n_prompt} tokens and {max_tokens} are asked for: longer than "
                                    f"the model's context of {ctx} tokens", param="max_tokens")
        return _Job(text, max_tokens, temperature, top_p, stop, experts, tuple(sorted(exclude)), seed)

    async def run(job: _Job) -> dict[str, Any]:
        engine.queue.put(job)
        try:
            return await asyncio.wrap_future(job.future)
        except MoErgeError as e:
            raise _OpenAIError(400, str(e)) from None

    def ext(result: dict[str, Any], trace: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"batch_size": result.get("batch_size", 1)}
        if trace:
            out["routing"] = [result["routing"].to_json()]
        return out

    def usage(result: dict[str, Any]) -> dict[str, int]:
        p = result.get("prompt_tokens", 0)
        return {"prompt_tokens": p, "completion_tokens": result["completion_tokens"],
                "total_tokens": p + result["completion_tokens"]}

    def sse(job: _Job, body: dict[str, Any], chat: bool) -> StreamingResponse:
        rid, created, model_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", int(time.time()), \
            body.get("model") or MODEL_ID
        obj = "chat.completion.chunk" if chat else "text_completion"
        trace = bool((body.get("moerge") or {}).get("trace"))

        def chunk(text: str | None, finish: str | None, first: bool = False, extra: dict | None = None) -> str:
            if chat:
                delta: dict[str, Any] = {"role": "assistant"} if first else {}
                if text:
                    delta["content"] = text
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            data = {"id": rid, "object": obj, "created": created, "model": model_id, "choices": [choice]}
            if extra:
                data["moerge"] = extra
            return f"data: {json.dumps(data)}\n\n"

        def events() -> Iterator[str]:
            first, info = True, {}
            try:
                for piece in engine.stream(job, info):
                    yield chunk(piece, None, first)
                    first = False
                extra = {"batch_size": 1, **({"routing": [info["routing"].to_json()]} if trace else {})}
                yield chunk(None, info["finish_reason"], first, extra)
            except Exception as e:  # noqa: BLE001 - the stream has started: report in it, then end it properly
                kind = "invalid_request_error" if isinstance(e, MoErgeError) else "server_error"
                yield f"data: {json.dumps({'error': {'message': str(e), 'type': kind}})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def respond(job: _Job, body: dict[str, Any], chat: bool) -> Any:
        """A streamed response, or the whole completion in OpenAI's shape (chat or text)."""
        if body.get("stream"):
            return sse(job, body, chat=chat)
        result = await run(job)
        choice: dict[str, Any] = {"index": 0, "finish_reason": result["finish_reason"], "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": result["text"]}
        else:
            choice["text"] = result["text"]
        return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
                "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": body.get("model") or MODEL_ID, "choices": [choice], "usage": usage(result),
                "moerge": ext(result, bool((body.get("moerge") or {}).get("trace")))}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        body = await request.json()
        messages = body.get("messages")
        if not (isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages)):
            raise _OpenAIError(400, "messages must be a non-empty list of {role, content}", param="messages")
        msgs = []
        for m in messages:
            content = m.get("content")
            if isinstance(content, list):  # content parts: the text ones
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            msgs.append({"role": str(m.get("role", "user")), "content": str(content or "")})
        if not getattr(tokenizer, "chat_template", None):
            raise _OpenAIError(400, "this model's tokenizer has no chat template; use /v1/completions")
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return await respond(job_from(body, text), body, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await request.json()
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise _OpenAIError(400, "prompt must be a non-empty string", param="prompt")
        return await respond(job_from(body, prompt), body, chat=False)

    @app.post("/v1/experts")
    async def add_expert(name: Annotated[str, Form()], adapter_config: Annotated[UploadFile, File()],
                         adapter_model: Annotated[UploadFile, File()], description: Annotated[str, Form()] = "",
                         examples: Annotated[str, Form()] = "[]") -> dict[str, Any]:
        try:
            example_list = json.loads(examples)
            if not (isinstance(example_list, list) and all(isinstance(e, str) for e in example_list)):
                raise ValueError
        except ValueError:
            raise _OpenAIError(400, "examples must be a JSON list of strings", param="examples") from None
        with tempfile.TemporaryDirectory(prefix="moerge-upload-") as d:
            folder = Path(d)
            (folder / "adapter_config.json").write_bytes(await adapter_config.read())
            (folder / "adapter_model.safetensors").write_bytes(await adapter_model.read())

            def add() -> Any:
                return model.add_expert(folder, name=name, description=description, examples=example_list)

            try:
                expert = await asyncio.to_thread(add)
            except (MoErgeError, ValueError) as e:
                raise _OpenAIError(400, str(e).replace(str(folder), "upload")) from None
        return {"object": "expert", "id": f"{MODEL_ID}/{expert.name}", "name": expert.name,
                "modules": len(expert.modules), "kind": expert.kind}

    @app.delete("/v1/experts/{name}")
    async def remove_expert(name: str) -> dict[str, Any]:
        if name not in model.experts:
            raise _OpenAIError(404, f"no expert {name!r}", "expert_not_found")
        await asyncio.to_thread(model.remove_expert, name)
        return {"object": "expert", "id": f"{MODEL_ID}/{name}", "deleted": True}

    return app


def serve(model: Any, tokenizer: Any, host: str = "127.0.0.1", port: int = 8000,
          config: ServerConfig | None = None) -> None:
    """Serve ``model`` with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(create_app(model, tokenizer, config), host=host, port=port, log_level="info")
