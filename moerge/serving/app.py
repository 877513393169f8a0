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
* ``GET /v1/moerge/stats`` — the sizes of the batches run and the experts served.

Requests are checked in :mod:`moerge.serving.protocol` and run by :mod:`moerge.serving.engine`, which batches
requests that arrive together.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Annotated, Any

import uvicorn
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, StreamingResponse

from moerge.errors import MoErgeError
from moerge.serving.engine import Engine, Job, ServerConfig
from moerge.serving.protocol import (
    MODEL_ID,
    CompletionRequest,
    OpenAIError,
    StreamHeader,
    completion_body,
    done_event,
    error_event,
    model_ids,
    moerge_field,
    parse_completion,
    stream_event,
)

__all__ = ["create_app", "serve", "ServerConfig"]


class _Endpoints:
    """The handlers of the API's routes over one model, its tokenizer and the engine that runs its jobs."""

    def __init__(self, model: Any, tokenizer: Any, engine: Engine, config: ServerConfig) -> None:
        self.model, self.tok, self.engine, self.config = model, tokenizer, engine, config

    async def list_models(self) -> dict[str, Any]:
        now = int(time.time())
        return {"object": "list", "data": [{"id": m, "object": "model", "created": now, "owned_by": "moerge"}
                                           for m in model_ids(self.model.experts)]}

    async def stats(self) -> dict[str, Any]:
        return {"batches": list(self.engine.batches), "experts": list(self.model.experts)}

    async def chat_completions(self, request: Request) -> Any:
        return await self._complete(await request.json(), chat=True)

    async def completions(self, request: Request) -> Any:
        return await self._complete(await request.json(), chat=False)

    async def _complete(self, body: Any, chat: bool) -> Any:
        """A streamed response, or the whole completion in OpenAI's shape (chat or text)."""
        req = parse_completion(body, chat=chat, experts=list(self.model.experts), tokenizer=self.tok,
                               default_max_tokens=self.config.default_max_tokens)
        job = req.job(self.engine.count_tokens(req.text), self.model.context_length)
        if req.stream:
            return StreamingResponse(self._events(req, job), media_type="text/event-stream")
        try:
            result = await asyncio.wrap_future(self.engine.submit(job))
        except MoErgeError as e:
            raise OpenAIError(400, str(e)) from None
        return completion_body(req, result)

    def _events(self, req: CompletionRequest, job: Job) -> Iterator[str]:
        """The server-sent events of a streamed completion, ended by ``[DONE]`` also after an error."""
        header, first, info = StreamHeader.start(req), True, {}
        try:
            for piece in self.engine.stream(job, info):
                yield stream_event(header, piece, None, first)
                first = False
            yield stream_event(header, None, info["finish_reason"], first, moerge_field(info, req.trace))
        except Exception as e:  # noqa: BLE001 - the stream has started: report in it, then end it properly
            yield error_event(str(e), "invalid_request_error" if isinstance(e, MoErgeError) else "server_error")
        yield done_event()

    async def add_expert(self, name: Annotated[str, Form()], adapter_config: Annotated[UploadFile, File()],
                         adapter_model: Annotated[UploadFile, File()], description: Annotated[str, Form()] = "",
                         examples: Annotated[str, Form()] = "[]") -> dict[str, Any]:
        try:
            example_list = json.loads(examples)
            if not (isinstance(example_list, list) and all(isinstance(e, str) for e in example_list)):
                raise ValueError
        except ValueError:
            raise OpenAIError(400, "examples must be a JSON list of strings", param="examples") from None
        with tempfile.TemporaryDirectory(prefix="moerge-upload-") as d:
            folder = Path(d)
            (folder / "adapter_config.json").write_bytes(await adapter_config.read())
            (folder / "adapter_model.safetensors").write_bytes(await adapter_model.read())
            try:
                expert = await asyncio.to_thread(self.model.add_expert, folder, name=name, description=description,
                                                 examples=example_list)
            except (MoErgeError, ValueError) as e:
                raise OpenAIError(400, str(e).replace(str(folder), "upload")) from None
        return {"object": "expert", "id": f"{MODEL_ID}/{expert.name}", "name": expert.name,
                "modules": len(expert.modules), "kind": expert.kind}

    async def remove_expert(self, name: str) -> dict[str, Any]:
        if name not in self.model.experts:
            raise OpenAIError(404, f"no expert {name!r}", "expert_not_found")
        await asyncio.to_thread(self.model.remove_expert, name)
        return {"object": "expert", "id": f"{MODEL_ID}/{name}", "deleted": True}


async def _openai_error(_: Request, e: OpenAIError) -> JSONResponse:
    return JSONResponse(status_code=e.status, content=e.body())


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    app.state.engine.close()


def create_app(model: Any, tokenizer: Any, config: ServerConfig | None = None) -> Any:
    """The FastAPI app serving ``model`` (a :class:`~moerge.MoErgeModel` with its library, if any)."""
    config = config or ServerConfig()
    engine = Engine(model, tokenizer, config)
    app = FastAPI(title="moerge", description="OpenAI-compatible API over a routed mixture of experts",
                  lifespan=_lifespan)
    app.state.engine = engine
    app.add_exception_handler(OpenAIError, _openai_error)
    api = _Endpoints(model, tokenizer, engine, config)
    app.add_api_route("/v1/models", api.list_models, methods=["GET"])
    app.add_api_route("/v1/moerge/stats", api.stats, methods=["GET"])
    app.add_api_route("/v1/chat/completions", api.chat_completions, methods=["POST"])
    app.add_api_route("/v1/completions", api.completions, methods=["POST"])
    app.add_api_route("/v1/experts", api.add_expert, methods=["POST"])
    app.add_api_route("/v1/experts/{name}", api.remove_expert, methods=["DELETE"])
    return app


def serve(model: Any, tokenizer: Any, host: str = "127.0.0.1", port: int = 8000,
          config: ServerConfig | None = None) -> None:
    """Serve ``model`` with uvicorn until interrupted."""
    uvicorn.run(create_app(model, tokenizer, config), host=host, port=port, log_level="info")
