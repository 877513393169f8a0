"""moerge on Ray Serve: ``moerge serve --ray`` (:func:`build_app`).

Two deployments:

* **model replicas** (:class:`ModelReplica`, ``replicas`` of them or autoscaled): each builds the routed model
  (the same ``build`` callable everywhere, e.g. the CLI's model options) and serves the very OpenAI-compatible app of
  ``moerge serve`` (:func:`~moerge.serving.app.create_app`) in-process, so a replica answers exactly as the
  single-process server does. Each follows the library folder (``MoErgeModel.from_library(follow=True)``), so an
  expert added through any replica, the CLI or another process reaches every replica.
* **the ingress** (:class:`Ingress`, Serve's HTTP entry): it runs the global stage — the library's experts
  retrieved by the prompt's text with the same retriever GLIDER uses (:class:`~moerge.routing.retrieval.
  ExpertRetriever`), or the experts a request forces — and sends the request through Serve's model multiplexing
  keyed by those experts (``multiplexed_model_id``), so requests for the same experts go to a replica that already
  holds them (its :meth:`ModelReplica.warm` reads them into its expert cache once, Serve keeps the ids LRU per
  replica). With the request it passes the ranking it retrieved (experts and scores, for that prompt text, under
  its retriever's :meth:`~moerge.routing.retrieval.ExpertRetriever.fingerprint`), which the replica hands to its
  router's retriever (:data:`~moerge.routing.retrieval.GIVEN`): the global stage runs once per request, and the
  replica's router still routes exactly as the single-process server's would (it takes the ranking only for the
  very text it would embed, over the same experts and embedder; else it retrieves again). The ranking travels as an
  argument of the replica's handle, never in the HTTP request: a client cannot set it. A replica that dies before
  it answered is retried on another; none taking the request within ``replica_wait_s`` (all dead, or failing to
  start) is a 503; once bytes were streamed, the stream ends with an error event. Responses carry the replica in
  ``x-moerge-replica`` (and, for JSON completions, in the ``moerge`` field), the routing key they were placed by in
  ``x-moerge-route``, and, for JSON completions, where the global stage ran in ``x-moerge-global-stage``.
"""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from moerge.serving.engine import ServerConfig

__all__ = ["RayConfig", "build_app", "routing_key", "ModelReplica", "Ingress", "NoReplica"]

_FORWARDED = ("content-type", "authorization", "accept")
_RETRIES = 3


@dataclass
class RayConfig:
    """How moerge runs on Ray Serve.

    Attributes:
        replicas: model replicas (ignored with ``autoscaling``).
        autoscaling: Serve's ``autoscaling_config`` for the model replicas (``min_replicas``, ``max_replicas``,
            ``target_ongoing_requests``, ...), or ``None`` for a fixed count.
        max_models_per_replica: routing keys (sets of experts) a replica keeps warm, least recently used out.
        replica_cpus, replica_gpus: what each model replica reserves.
        key_experts: experts of the retrieved ranking that make the routing key (1: the top candidate).
        candidates: experts of the retrieved ranking passed on to the replica with the request, for its router's
            global stage (a router that asks for more retrieves again).
        replica_wait_s: the longest the ingress waits for a model replica to take a request (none alive: all dead,
            starting, or failing to start) before it answers 503.
        retrieval: options of the ingress's retriever (:class:`~moerge.routing.retrieval.RetrievalConfig`).
    """

    replicas: int = 2
    autoscaling: dict[str, Any] | None = None
    max_models_per_replica: int = 8
    replica_cpus: float = 1.0
    replica_gpus: float = 0.0
    key_experts: int = 1
    candidates: int = 8
    replica_wait_s: float = 120.0
    retrieval: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.replicas, int) or self.replicas < 1:
            raise ValueError(f"replicas must be a positive integer, got {self.replicas!r}")
        if not isinstance(self.max_models_per_replica, int) or self.max_models_per_replica < 1:
            raise ValueError(f"max_models_per_replica must be a positive integer, got {self.max_models_per_replica!r}")
        if not isinstance(self.replica_cpus, (int, float)) or self.replica_cpus <= 0:
            raise ValueError(f"replica_cpus must be positive, got {self.replica_cpus!r}")
        if not isinstance(self.key_experts, int) or self.key_experts < 1:
            raise ValueError(f"key_experts must be a positive integer, got {self.key_experts!r}")
        if not isinstance(self.candidates, int) or self.candidates < 1:
            raise ValueError(f"candidates must be a positive integer, got {self.candidates!r}")
        if not isinstance(self.replica_wait_s, (int, float)) or self.replica_wait_s <= 0:
            raise ValueError(f"replica_wait_s must be positive, got {self.replica_wait_s!r}")


def _prompt_text(path: str, body: dict[str, Any]) -> str | None:
    """The text the global stage reads: the last user message of a chat (stripped, as the model's prompt reader
    gives it to the router), or a completion's prompt."""
    if path.endswith("/chat/completions"):
        for message in reversed(body.get("messages") or []):
            if isinstance(message, dict) and message.get("role") == "user":
                content = message.get("content")
                if isinstance(content, list):  # content parts: the text ones
                    content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
                return content.strip() if isinstance(content, str) else None
        return None
    prompt = body.get("prompt")
    return prompt if isinstance(prompt, str) else (prompt[0] if isinstance(prompt, list) and prompt
                                                   and isinstance(prompt[0], str) else None)


def routing_key(path: str, body: dict[str, Any], retrieve: Callable[[str], list[str]] | None, known: set[str],
                experts: int = 1) -> str:
    """The multiplexing key of a request: the experts it forces (``moerge.experts``, or a ``moerge/<name>`` model),
    else the top ``experts`` the global stage retrieves for its prompt, sorted and joined by ``+``; ``""`` when
    there are none (any replica)."""
    opts = body.get("moerge") if isinstance(body.get("moerge"), dict) else {}
    forced = opts.get("experts")
    if isinstance(forced, dict) and forced:
        return "+".join(sorted(n for n in forced if isinstance(n, str) and n in known))
    model = body.get("model")
    if isinstance(model, str) and model.startswith("moerge/") and model[len("moerge/"):] in known:
        return model[len("moerge/"):]
    text = _prompt_text(path, body)
    if not text or retrieve is None or not known:
        return ""
    excluded = set(opts.get("exclude") or []) if isinstance(opts.get("exclude"), list) else set()
    return "+".join(sorted([n for n in retrieve(text) if n not in excluded][:experts]))


async def _asgi(app: Any, req: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    """Run one HTTP request through the ASGI ``app`` in this process: the ``http.response.start`` message, then
    each ``http.response.body`` message as the app sends it (a stream's events one by one)."""
    messages: asyncio.Queue = asyncio.Queue()
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": req["body"], "more_body": False}
        await asyncio.Event().wait()  # never: the app reads one body; a disconnect is not simulated
        return {"type": "http.disconnect"}

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": req["method"],
             "scheme": "http", "path": req["path"], "raw_path": req["path"].encode(),
             "query_string": req.get("query", "").encode(), "root_path": "",
             "headers": [(k.encode(), v.encode()) for k, v in req["headers"].items()],
             "client": ("127.0.0.1", 0), "server": ("moerge-replica", 80)}
    task = asyncio.ensure_future(app(scope, receive, messages.put))
    try:
        while True:
            get = asyncio.ensure_future(messages.get())
            done, _ = await asyncio.wait({get, task}, return_when=asyncio.FIRST_COMPLETED)
            if get in done:
                message = get.result()
                yield message
                if message["type"] == "http.response.body" and not message.get("more_body", False):
                    return
            else:
                get.cancel()
                task.result()  # raises what the app raised
                while not messages.empty():
                    yield messages.get_nowait()
                return
    finally:
        if not task.done():
            task.cancel()


class NoReplica(Exception):
    """No model replica took a request within ``RayConfig.replica_wait_s``."""


class ModelReplica:
    """A model replica: the routed model and ``moerge serve``'s app, in this process (see the module's docstring).
    The Serve deployment wraps it (:func:`build_app`), adding the multiplexed :meth:`warm`."""

    def __init__(self, build: Callable[[], Any], config: ServerConfig | None = None) -> None:
        from moerge.serving.app import create_app

        # a copy: Serve scans the arguments again after __init__, and what build() sets up in its objects (a router's
        # loaded embedder, say) need not pickle
        self.model = copy.deepcopy(build)()
        self.app = create_app(self.model, self.model.tokenizer, config or ServerConfig())
        try:
            from ray import serve

            self.replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - outside Serve (tests of the class itself)
            self.replica = "local"

    def _warm(self, key: str) -> str:
        names = [n for n in key.split("+") if n in self.model.expert_set] if key else []
        if names:
            with self.model.expert_set.lock:
                self.model.expert_set.ensure_resident(names)
        return key

    async def warm(self, key: str) -> str:
        """Read the experts of routing key ``key`` into the expert cache (under Serve: multiplexed, see
        :func:`build_app`)."""
        return await asyncio.to_thread(self._warm, key)

    async def call(self, req: dict[str, Any], key: str = "", given: dict[str, Any] | None = None
                   ) -> AsyncIterator[Any]:
        """One HTTP request (``method``, ``path``, ``query``, ``headers``, ``body``): yields ``{"taken":
        replica}`` at once, then ``{"status", "headers", "replica"}``, the body's chunks, and, when the request came
        with the ingress's ranking ``given`` (``fingerprint``, ``prompt``, ``names``, ``scores``: see
        :meth:`Ingress.place`), ``{"global_stage": "ingress"}`` if the router took it, else ``"replica"``."""
        yield {"taken": self.replica}
        entry = None
        if given:
            from moerge.routing.retrieval import GIVEN

            try:
                entry = GIVEN.give(given["fingerprint"], given["prompt"], list(given["names"]),
                                   list(given["scores"]))
            except (KeyError, TypeError, ValueError):  # not a ranking: the router retrieves on its own
                entry = None
        if key:
            await self.warm(key)
        async for message in _asgi(self.app, req):
            if message["type"] == "http.response.start":
                headers = {k.decode(): v.decode() for k, v in message.get("headers", [])}
                yield {"status": message["status"], "headers": headers, "replica": self.replica}
            elif message.get("body"):
                yield bytes(message["body"])
        if given:
            yield {"global_stage": "ingress" if entry is not None and entry["taken"] else "replica"}


class Ingress:
    """The HTTP entry (see the module's docstring): the global stage, then the model replicas through Serve's
    multiplexing."""

    def __init__(self, replicas: Any, library: str, config: RayConfig | None = None) -> None:
        from moerge.library import ExpertLibrary
        from moerge.routing.retrieval import ExpertRetriever, RetrievalConfig
        from moerge.routing.router import RouterContext

        self.replicas = replicas
        self.config = config or RayConfig()
        self.library = ExpertLibrary.open(library)
        self.retriever = ExpertRetriever(RetrievalConfig(**self.config.retrieval), owner="ray ingress")
        self.retriever.attach(RouterContext(store=self.library))
        self._stamp: Any = None
        self._known: set[str] = set()
        self._sync()

    def _sync(self) -> None:
        """Follow the library: experts added or removed by any process change what the ingress retrieves."""
        stamp = self.library.stamp()
        if stamp == self._stamp:
            return
        self.library.refresh()
        names = set(self.library.names())
        for gone in self._known - names:
            self.retriever.remove(gone)
        for name in names:
            self.retriever.add(self.library.stored(name))
        self._known, self._stamp = names, stamp

    def place(self, path: str, body: bytes) -> tuple[str, dict[str, Any] | None]:
        """The request's routing key (:func:`routing_key`) and the ranking the global stage retrieved for its
        prompt, to pass on to the replica (``None`` when it retrieved none, or its ranking cannot be reproduced
        from the prompt alone: :meth:`~moerge.routing.retrieval.ExpertRetriever.fingerprint`)."""
        try:
            data = json.loads(body) if body else {}
        except (ValueError, UnicodeDecodeError):
            return "", None  # the replica answers with the error
        if not isinstance(data, dict) or not path.endswith("completions"):
            return "", None
        ranked: dict[str, Any] = {}

        def retrieve(text: str) -> list[str]:
            k = min(max(self.config.key_experts, self.config.candidates), len(self._known))
            names, scores, fingerprint = self.retriever.ranking(text, k)
            if fingerprint is not None:
                ranked.update(fingerprint=fingerprint, prompt=text, names=names, scores=scores)
            return names

        try:
            self._sync()
            return routing_key(path, data, retrieve, self._known, self.config.key_experts), ranked or None
        except Exception:  # noqa: BLE001 - placement only: the replica routes (and reports) on its own
            return "", None

    async def _first(self, stream: Any) -> Any:
        """The replica's first item of ``stream``, once one took the request; :class:`NoReplica` when none did
        within ``replica_wait_s`` (the request is cancelled)."""
        try:
            return await asyncio.wait_for(stream.__anext__(), self.config.replica_wait_s)
        except asyncio.TimeoutError:
            stream.cancel()
            raise NoReplica(f"no model replica took the request within {self.config.replica_wait_s:g} s (all "
                               "dead, or starting, or failing to start)") from None

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import Response, StreamingResponse

        body = await request.body()
        req = {"method": request.method, "path": request.url.path, "query": request.url.query, "body": body,
               "headers": {k: v for k, v in request.headers.items() if k.lower() in _FORWARDED}}
        key, given = await asyncio.to_thread(self.place, req["path"], body)
        for attempt in range(_RETRIES):
            handle = self.replicas.options(stream=True, multiplexed_model_id=key) if key \
                else self.replicas.options(stream=True)
            stream = handle.call.remote(req, key, given)
            try:
                await self._first(stream)  # a replica took it
                head = await stream.__anext__()
            except NoReplica as e:
                return _unavailable(str(e))
            except Exception as e:  # noqa: BLE001 - a replica that died before answering: another is tried
                if attempt + 1 == _RETRIES:
                    return _unavailable(f"no model replica could answer in {_RETRIES} tries; the last failed with "
                                        f"{type(e).__name__}: {e}")
                continue
            break
        headers = {k: v for k, v in head["headers"].items() if k.lower() not in ("content-length",)}
        headers["x-moerge-replica"] = head["replica"]
        headers["x-moerge-route"] = key  # the experts the request was placed by ("" : any replica)
        if headers.get("content-type", "").startswith("text/event-stream"):
            return StreamingResponse(_relay(stream), status_code=head["status"], headers=headers)
        chunks = [c async for c in stream]
        content = b"".join(c for c in chunks if isinstance(c, bytes))
        for c in chunks:
            if isinstance(c, dict) and "global_stage" in c:  # where the router's global stage ran
                headers["x-moerge-global-stage"] = c["global_stage"]
        if headers.get("content-type", "").startswith("application/json") and req["path"].endswith("completions"):
            content = _with_replica(content, head["replica"])
        return Response(content, status_code=head["status"], headers=headers)


def _unavailable(message: str) -> Any:
    from starlette.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": "server_error", "code": 503}}, status_code=503)


async def _relay(stream: Any) -> AsyncIterator[bytes]:
    try:
        async for chunk in stream:
            if isinstance(chunk, bytes):
                yield chunk
    except Exception as e:  # noqa: BLE001 - the replica died mid-stream: the client learns it from the stream
        event = {"error": {"message": f"the model replica serving this stream failed: {e}", "type": "server_error"}}
        yield f"data: {json.dumps(event)}\n\n".encode()


def _with_replica(content: bytes, replica: str) -> bytes:
    try:
        data = json.loads(content)
    except ValueError:
        return content
    if isinstance(data, dict) and "choices" in data:
        data.setdefault("moerge", {})["replica"] = replica
        return json.dumps(data).encode()
    return content


def build_app(build: Callable[[], Any], library: str, *, server: ServerConfig | None = None,
              config: RayConfig | None = None) -> Any:
    """The Serve application (for ``serve.run``): the ingress and ``config.replicas`` model replicas, each built by
    ``build()`` (a picklable callable returning a :class:`~moerge.MoErgeModel` with its tokenizer, e.g.
    ``functools.partial(MoErgeModel.from_library, base_path, library, tokenizer=tok)``) over ``library`` (a folder
    or URL the ingress opens too)."""
    from ray import serve

    config = config or RayConfig()

    class _Replica(ModelReplica):
        @serve.multiplexed(max_num_models_per_replica=config.max_models_per_replica)
        async def warm(self, key: str) -> str:  # the request's multiplexed_model_id is its key
            return await super().warm(key)

    scale = ({"autoscaling_config": config.autoscaling} if config.autoscaling
             else {"num_replicas": config.replicas})
    replica = serve.deployment(name="moerge-model", ray_actor_options={
        "num_cpus": config.replica_cpus, "num_gpus": config.replica_gpus}, **scale)(_Replica)
    ingress = serve.deployment(name="moerge-ingress", ray_actor_options={"num_cpus": 0})(Ingress)
    return ingress.bind(replica.bind(build, server), library, config)
