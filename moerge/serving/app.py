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
  ``adapter_model`` files, ``name``, optional ``description``, ``examples`` and ``overwrite``). Its fields are
  checked at once (400 naming the field; 409 for a name already there or being uploaded; 429 when the queue of
  uploads is full); it is then answered with ``202`` and the upload's status, and added in the background with every
  check of the library (:mod:`moerge.serving.uploads`) while requests go on being served. ``GET
  /v1/experts/pending/{id}`` tells how it stands (``pending``, ``running``, ``done`` with the expert, ``failed``
  with the error) and ``GET /v1/experts/pending`` lists the recent uploads. With ``?wait=true`` the upload is
  answered once it is added (200 with the expert) or refused (400). ``DELETE /v1/experts/{name}`` removes an
  expert (404 when the model does not have it). With ``ServerConfig.api_key`` (``moerge serve --api-key``) both
  need ``Authorization: Bearer <key>`` (401 without it); ``api_key_for_all`` asks it of every route.
* ``GET /v1/experts`` — each expert with how its routing data stands (``ready``; ``training`` in the background
  when the server started on a library that lacks it, ``moerge serve --train-routing background``, the default;
  ``failed`` with the error), and the experts of the library the model could not take in.
* ``GET /v1/moerge/stats`` — the rows of the decode steps run and the experts served.
* ``GET /metrics`` — the server's figures in Prometheus' format (:mod:`moerge.serving.metrics`).

Requests are checked in :mod:`moerge.serving.protocol` and run by :mod:`moerge.serving.engine`, which batches
requests that arrive together.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
import json
import threading
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import uvicorn
from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse

from moerge.errors import LibraryError, MoErgeError
from moerge.serving.engine import Engine, Job, ServerConfig
from moerge.serving.metrics import CONTENT_TYPE_LATEST, Metrics
from moerge.serving.protocol import (
    MODEL_ID,
    CompletionRequest,
    OpenAIError,
    StreamHeader,
    completion_body,
    done_event,
    error_event,
    field_error,
    model_ids,
    moerge_field,
    parse_completion,
    usage,
)
from moerge.serving.requests import ChatBody, CompletionBody
from moerge.serving.uploads import Uploads

__all__ = ["create_app", "serve", "ServerConfig"]


class _Endpoints:
    """The handlers of the API's routes over one model, its tokenizer and the engine that runs its jobs."""

    def __init__(self, model: Any, tokenizer: Any, engine: Engine, uploads: Uploads, config: ServerConfig) -> None:
        self.model, self.tok, self.engine, self.uploads, self.config = model, tokenizer, engine, uploads, config
        self.vocab_size = _vocab_size(model, tokenizer)
        self._token_texts: dict[int, str] = {}
        self._grammars: Any = None
        self._grammar_lock = threading.Lock()

    async def list_models(self) -> dict[str, Any]:
        now = int(time.time())
        return {"object": "list", "data": [{"id": m, "object": "model", "created": now, "owned_by": "moerge"}
                                           for m in model_ids(self.model.experts)]}

    async def stats(self) -> dict[str, Any]:
        return {"batches": list(self.engine.batches), "experts": list(self.model.experts)}

    async def chat_completions(self, request: Request) -> Any:
        return await self._complete(request, chat=True)

    async def completions(self, request: Request) -> Any:
        return await self._complete(request, chat=False)

    def _prepare(self, body: bytes, chat: bool) -> tuple[CompletionRequest, list[Job]]:
        """The request checked and its jobs made (the chat template applied, the prompts tokenized): run in a worker
        thread, never on the event loop."""
        req = parse_completion(body, chat=chat, experts=list(self.model.experts), tokenizer=self.tok,
                               default_max_tokens=self.config.default_max_tokens)
        constraint = self._constraint(req.response_format) if req.response_format else None
        return req, req.jobs(self.engine.tokenize, self.vocab_size, self.model.context_length, constraint)

    def _constraint(self, response_format: dict[str, Any]) -> Any:
        """The rows' constraint for a ``response_format`` (xgrammar, compiled for this tokenizer once)."""
        if response_format.get("type") == "text":
            return None
        with self._grammar_lock:
            if self._grammars is None:
                try:
                    from moerge.serving.structured import Grammars
                except ImportError as e:
                    raise OpenAIError(400, f"response_format needs xgrammar ({e}): pip install 'moerge[server]'",
                                      param="response_format") from None
                self._grammars = Grammars(self.tok, _logits_size(self.model), self.engine.ends)
        try:
            return self._grammars.constraint(response_format)
        except ValueError as e:
            raise OpenAIError(400, f"response_format: {e}", param="response_format.json_schema.schema") from None

    async def _complete(self, request: Request, chat: bool) -> Any:
        """A streamed response, or the whole completion in OpenAI's shape (chat or text)."""
        req, jobs = await asyncio.to_thread(self._prepare, await _body(request, self.config.max_body_bytes), chat)
        if req.stream:
            return StreamingResponse(self._events(req, jobs), media_type="text/event-stream")
        for job in jobs:
            self.engine.submit(job)
        try:
            results = await _results(jobs, request)
        except OpenAIError:
            raise
        except Exception as e:  # noqa: BLE001 - in OpenAI's shape (_job_error), the server goes on
            raise _job_error(e) from None
        texts = [self.engine.decode(j.ids, skip_special=False) for j in jobs] if req.echo else []
        return completion_body(req, results, self.token_text, texts)

    def token_text(self, token: int) -> str:
        """A token's text (cached: a vocabulary is finite)."""
        text = self._token_texts.get(token)
        if text is None:
            text = self._token_texts[token] = self.engine.decode([token], skip_special=False)
        return text

    async def _events(self, req: CompletionRequest, jobs: list[Job]) -> AsyncIterator[str]:
        """The server-sent events of a streamed completion, ended by ``[DONE]`` also after an error; the jobs are
        cancelled if the client leaves (the response's task is cancelled, here at an ``await``)."""
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        header = StreamHeader.start(req)
        for i, job in enumerate(jobs):
            job.on_piece = lambda index, text, picks, finish, i=i: loop.call_soon_threadsafe(
                events.put_nowait, (i * req.n + index, text, picks, finish))
            job.future.add_done_callback(lambda _, i=i: loop.call_soon_threadsafe(events.put_nowait, i))
            self.engine.submit(job)
        started, offsets, left, held = set(), {}, len(jobs), None
        try:
            while left:
                item = await events.get()
                if isinstance(item, int):
                    left -= 1
                    continue
                index, text, picks, finish = item
                if held is not None:
                    yield header.piece(*held)
                    held = None
                piece = (index, text, picks, finish, index not in started, self.token_text, offsets.get(index, 0))
                started.add(index)
                offsets[index] = offsets.get(index, 0) + sum(len(self.token_text(p.token)) for p in picks)
                if finish is None:
                    yield header.piece(*piece)
                else:
                    held = piece  # the last choice to finish carries the moerge field
            results = [j.future.result() for j in jobs]
            if held is not None:
                yield header.piece(*held, moerge=moerge_field(results, req.trace))
            if req.include_usage:
                yield header.event([], usage=usage(results))
        except Exception as e:  # noqa: BLE001 - the stream has started: report in it, then end it properly
            err = _job_error(e)
            yield error_event(err.message, err.body()["error"]["type"])
        finally:
            for job in jobs:
                if not job.future.done():
                    job.cancel()
        yield done_event()

    async def add_expert(self, name: Annotated[str, Form()], adapter_config: Annotated[UploadFile, File()],
                         adapter_model: Annotated[UploadFile, File()], description: Annotated[str, Form()] = "",
                         examples: Annotated[str, Form()] = "[]", overwrite: Annotated[bool, Form()] = False,
                         wait: bool = False) -> JSONResponse:
        """Queue an upload (202 with its status) or, with ``?wait=true``, answer once it is added (200 with the
        expert) or refused (400)."""
        try:
            example_list = json.loads(examples)
            if not (isinstance(example_list, list) and all(isinstance(e, str) for e in example_list)):
                raise ValueError
        except ValueError:
            raise OpenAIError(400, "examples must be a JSON list of strings", param="examples") from None
        upload = self.uploads.submit(name, await adapter_config.read(), await adapter_model.read(),
                                     description=description, examples=example_list, overwrite=overwrite)
        if not wait:
            return JSONResponse(status_code=202, content=upload.to_json())
        await asyncio.wrap_future(upload.finished)
        if upload.error is not None:
            raise upload.error
        return JSONResponse(content=upload.expert)

    async def list_experts(self) -> dict[str, Any]:
        """Each expert the model serves, with how its routing data stands: ``ready``, ``training`` (in the
        background: usable by name, not yet chosen by a local gate) or ``failed`` (with the error) and whether its
        factors are in memory (``resident``); the experts of the library the model could not take in; and the
        expert cache's counters (``cache``: see ``MoErgeModel.cache_stats``)."""
        pending, errors = set(self.model.pending_routing), self.model.routing_errors
        resident = set(await asyncio.to_thread(lambda: self.model.resident_experts))  # takes the model's lock
        cache = await asyncio.to_thread(self.model.cache_stats)
        data = []
        for n in self.model.experts:
            state = "training" if n in pending else "failed" if n in errors else "ready"
            data.append({"id": f"{MODEL_ID}/{n}", "object": "expert", "name": n,
                         "description": self.model.expert_metadata(n).description, "routing": state,
                         "resident": n in resident, **({"error": errors[n]} if state == "failed" else {})})
        return {"object": "list", "data": data, "not_loaded": self.model.library_errors,
                "cache": cache.as_dict()}

    async def upload_status(self, upload_id: str) -> dict[str, Any]:
        return self.uploads.get(upload_id)

    async def pending_uploads(self) -> dict[str, Any]:
        return {"object": "list", "data": self.uploads.recent()}

    async def remove_expert(self, name: str) -> dict[str, Any]:
        if not await asyncio.to_thread(self._remove, name):
            raise OpenAIError(404, f"no expert {name!r}", "expert_not_found")
        return {"object": "expert", "id": f"{MODEL_ID}/{name}", "deleted": True}

    def _remove(self, name: str) -> bool:
        """Remove expert ``name`` from the model and its library; ``False`` when the model does not have it. An
        expert another process removed from the library is dropped from the model too, and is not found."""
        try:
            self.model.remove_expert(name)
            return True
        except LibraryError as e:
            library = self.model.library
            if e.expert == name and library is not None and name in self.model.experts:
                library.refresh()
                if name not in library:  # removed by another process: the model no longer serves it either
                    with contextlib.suppress(LibraryError):
                        self.model.remove_expert(name, persist=False)
            if name in self.model.experts:
                raise
            return False


def _logits_size(model: Any) -> int:
    """How many logits the model gives per token (often more than its tokenizer has ids: a padded embedding)."""
    out = model.base.get_output_embeddings() if hasattr(model.base, "get_output_embeddings") else None
    return int(out.weight.shape[0] if out is not None else model.base.config.vocab_size)


def _vocab_size(model: Any, tokenizer: Any) -> int:
    """The token ids a prompt may hold: those the model has logits for and the tokenizer can show."""
    return min(_logits_size(model), len(tokenizer))


async def _body(request: Request, limit: int) -> bytes:
    """The request's body, refused (413) past ``limit`` bytes, by its ``Content-Length`` or as it arrives."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise OpenAIError(413, f"the request body is {declared} bytes; this server takes at most {limit}",
                          "request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise OpenAIError(413, f"the request body is over {limit} bytes, the most this server takes",
                              "request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _job_error(e: Exception) -> OpenAIError:
    """What a completion job's failure is for the client: the request's fault (a ``MoErgeError``: 400), the
    server's library unreadable while answering (``LibraryError``: 503 ``library_unavailable``), else the server's
    failure (500)."""
    if isinstance(e, LibraryError):  # moved, unreadable, half-written: not the request's doing
        return OpenAIError(503, f"the expert library could not be read: {e}", "library_unavailable")
    if isinstance(e, MoErgeError):
        return OpenAIError(400, str(e))
    return OpenAIError(500, f"the server failed: {type(e).__name__}: {e}")


async def _results(jobs: list[Job], request: Request) -> list[dict[str, Any]]:
    """The jobs' results, once all are done; if the client leaves first (looked at twice a second), the jobs are
    cancelled and the wait ends."""
    waiting = asyncio.ensure_future(asyncio.gather(*(asyncio.wrap_future(j.future) for j in jobs)))
    try:
        while True:
            done, _ = await asyncio.wait({waiting}, timeout=0.5)
            if done:
                return waiting.result()
            if await request.is_disconnected():
                raise OpenAIError(499, "the client closed the connection", "client_closed")
    finally:  # the client left, or one prompt failed: the others' work is dropped too
        for job in jobs:
            if not job.future.done():
                job.cancel()
        if not waiting.done():
            waiting.cancel()
            with contextlib.suppress(BaseException):
                await waiting


def _key_check(key: str) -> Any:
    """A FastAPI dependency refusing (401, OpenAI's ``invalid_api_key``) a request without ``Authorization: Bearer
    <key>`` (compared in constant time)."""

    async def check(request: Request) -> None:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
            raise OpenAIError(401, "a valid API key is needed: send 'Authorization: Bearer <key>'",
                              "invalid_api_key")

    return check


async def _no_admin() -> None:
    raise OpenAIError(403, "this server does not change its experts over the API (start it with --api-key to "
                           "allow it)", "admin_disabled")


async def _openai_error(_: Request, e: OpenAIError) -> JSONResponse:
    return JSONResponse(status_code=e.status, content=e.body())


async def _server_error(request: Request, e: Exception) -> JSONResponse:
    """Whatever else went wrong: a 500 in OpenAI's shape (never a bare traceback)."""
    return await _openai_error(request, OpenAIError(500, f"the server failed: {type(e).__name__}: {e}"))


async def _field_error(request: Request, e: RequestValidationError) -> JSONResponse:
    return await _openai_error(request, field_error(e.errors()))


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    app.state.engine.close()
    app.state.uploads.close()


class _Measured:
    """ASGI middleware counting each request by route template and status, and timing it to the end of its body
    (a stream's too)."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def sending(message: Any) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                route = getattr(scope.get("route"), "path", "other")
                self.metrics.requests.labels(route, str(status[0])).inc()
                self.metrics.latency.labels(route).observe(time.perf_counter() - start)

        await self.app(scope, receive, sending)


def create_app(model: Any, tokenizer: Any, config: ServerConfig | None = None) -> Any:
    """The FastAPI app serving ``model`` (a :class:`~moerge.MoErgeModel` with its library, if any)."""
    config = config or ServerConfig()
    metrics = Metrics(getattr(model, "cache_stats", None))
    engine = Engine(model, tokenizer, config, metrics)
    uploads = Uploads(model, config.max_pending_uploads, config.upload_history)
    app = FastAPI(title="moerge", description="OpenAI-compatible API over a routed mixture of experts",
                  lifespan=_lifespan)
    app.state.engine, app.state.uploads, app.state.metrics = engine, uploads, metrics
    app.add_middleware(_Measured, metrics=metrics)
    app.add_exception_handler(OpenAIError, _openai_error)
    app.add_exception_handler(RequestValidationError, _field_error)
    app.add_exception_handler(Exception, _server_error)
    api = _Endpoints(model, tokenizer, engine, uploads, config)
    keyed = [Depends(_key_check(config.api_key))] if config.api_key else []
    admin, rest = (keyed if config.admin else [Depends(_no_admin)]), (keyed if config.api_key_for_all else [])
    app.add_api_route("/v1/models", api.list_models, methods=["GET"], dependencies=rest)
    app.add_api_route("/v1/moerge/stats", api.stats, methods=["GET"], dependencies=rest)
    app.add_api_route("/metrics", lambda: Response(metrics.text(), media_type=CONTENT_TYPE_LATEST),
                      methods=["GET"], dependencies=rest, include_in_schema=False)
    app.add_api_route("/v1/chat/completions", api.chat_completions, methods=["POST"], dependencies=rest)
    app.add_api_route("/v1/completions", api.completions, methods=["POST"], dependencies=rest)
    app.add_api_route("/v1/experts", api.add_expert, methods=["POST"], dependencies=admin)
    app.add_api_route("/v1/experts", api.list_experts, methods=["GET"], dependencies=rest)
    app.add_api_route("/v1/experts/pending", api.pending_uploads, methods=["GET"], dependencies=rest)
    app.add_api_route("/v1/experts/pending/{upload_id}", api.upload_status, methods=["GET"], dependencies=rest)
    app.add_api_route("/v1/experts/{name}", api.remove_expert, methods=["DELETE"], dependencies=admin)
    app.openapi = lambda: _openapi(app)
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI schema, with the completion routes' request bodies (read by hand, to refuse what FastAPI would
    coerce) described by the pydantic models that check them."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        defs = schema.setdefault("components", {}).setdefault("schemas", {})
        for path, body in (("/v1/chat/completions", ChatBody), ("/v1/completions", CompletionBody)):
            js = body.model_json_schema(ref_template="#/components/schemas/{model}")
            defs.update(js.pop("$defs", {}))
            defs[body.__name__] = js
            schema["paths"][path]["post"]["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{body.__name__}"}}}}
        app.openapi_schema = schema
    return app.openapi_schema


def serve(model: Any, tokenizer: Any, host: str = "127.0.0.1", port: int = 8000,
          config: ServerConfig | None = None) -> None:
    """Serve ``model`` with uvicorn until interrupted.

    What is loaded by then (the model, its experts, the libraries: ~440K objects for the default model) is frozen
    out of the cyclic garbage collector (``gc.freeze``, as serving engines such as vLLM do after start-up): a full
    collection then scans only what requests made, instead of pausing every call in flight for ~0.2 s on a 2-core
    CPU every few requests."""
    app = create_app(model, tokenizer, config)
    gc.collect()
    gc.freeze()
    try:
        uvicorn.run(app, host=host, port=port, log_level="info")
    finally:  # collectable again at exit (frozen objects are never freed, which extension modules report as leaks)
        gc.unfreeze()
