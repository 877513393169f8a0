"""``moerge route|generate|serve``: run the routed model over a library, once or as an HTTP server."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from moerge.cli.common import (
    BaseOpt,
    CacheOpt,
    JsonOpt,
    LibraryOpt,
    PinOpt,
    Refused,
    RouterOpt,
    attempt,
    console,
    emit,
    err_console,
    fail,
    load_base,
    load_tokenizer,
    open_library,
    split_commas,
    with_option_groups,
)

app = typer.Typer()

SERVER_MODULES = ("fastapi", "uvicorn", "prometheus_client")  # what the `server` extra installs


@dataclass(frozen=True)
class ModelOptions:
    """The options of every command that runs the routed model: which library, which router, which base."""

    library: LibraryOpt = "."
    router: RouterOpt = "glider"
    base: BaseOpt = None
    cache_mib: CacheOpt = None
    pin: PinOpt = ""

    def make_router(self, **router_config: Any) -> Any:
        """The router ``router`` names (``name`` or ``name?key=value&…``), built with those options and
        ``router_config``; a bad name or option raises, naming it."""
        from moerge.routers import build_router, parse_router_spec

        name, options = parse_router_spec(self.router)
        return build_router(name, **{**options, **router_config})

    def load(self, train_routing: str = "now", **router_config: Any) -> Any:
        """The :class:`~moerge.runtime.model.MoErgeModel` over the library, routed by :meth:`make_router`, with the
        base's tokenizer; ``train_routing`` as in ``from_library``."""
        from moerge.runtime.model import MoErgeModel

        router = self.make_router(**router_config)
        lib = open_library(self.library)
        tok = load_tokenizer(self.base)
        if tok is None:
            raise Refused(f"{self.base}: the base folder has no tokenizer; routing reads the prompt")
        return MoErgeModel.from_library(load_base(self.base, lib), lib, router=router, tokenizer=tok,
                                        train_routing=train_routing, pin=split_commas(self.pin),
                                        cache_bytes=None if self.cache_mib is None else self.cache_mib << 20)


def _encode(model: Any, prompt: str) -> dict[str, Any]:
    """The prompt as the user turn of the tokenizer's chat template (the way the experts were trained)."""
    from moerge.routing.training import chat_prompt

    return model.tokenizer(chat_prompt(model.tokenizer, prompt), return_tensors="pt", add_special_tokens=False)


def _forced_mix(experts: str) -> dict[str, float]:
    """``name=weight,name=weight`` as a mix (a name alone weighs 1)."""
    mix = {}
    for part in split_commas(experts):
        n, _, w = part.partition("=")
        try:
            mix[n.strip()] = float(w) if w else 1.0
        except ValueError:
            raise Refused(f"--experts: {part!r} is not name=weight") from None
    return mix


@app.command()
@with_option_groups
def route(
    prompt: Annotated[str, typer.Argument(help="the request, as a user would write it")],
    model_options: ModelOptions,
    explain: Annotated[bool, typer.Option("--explain", help="also the per-layer gate usage")] = False,
    query: Annotated[str | None, typer.Option(help="glider: retrieve by the 'prompt', the task 'description' an LLM "
                                              "(the base) writes for it, or 'both'")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Which experts a prompt is routed to: the global stage's candidates with their scores, the mixing weights, and
    (with --explain) each patched module's gate usage over the prompt's tokens; with --query description, the task
    description the LLM wrote."""
    import torch

    def work() -> dict[str, Any]:
        from moerge.routers import parse_router_spec

        if query is not None and parse_router_spec(model_options.router)[0] != "glider":
            raise Refused("--query applies to the glider router")
        model = model_options.load(**({"query": query} if query else {}))
        batch = _encode(model, prompt)
        with torch.no_grad():
            model(**batch)
        data = {"prompt": prompt, "router": model.router.name, **model.last_routing[0].to_json()}
        if query in ("description", "both"):  # what the LLM wrote (cached: the routing above made it)
            data["description"] = model.router.describer([model.prompts.texts(batch["input_ids"], None)[0]])[0]
        if not explain:
            data.pop("layer_usage")
        data["explain"] = model.explain()
        return data

    data = attempt(work, as_json)
    if as_json:
        data.pop("explain")
        emit(data, True)
        return
    table = Table("candidate", "score", "weight")
    for n, sc in data["candidates"].items():
        table.add_row(n, f"{sc:.3f}", f"{data['experts'].get(n, 0.0):.3f}")
    if "description" in data:
        console.print(f"task description: {escape(data['description'])}", highlight=False)
    emit(data, False, table, message=data["explain"] if explain else None)


@app.command()
@with_option_groups
def generate(
    prompt: Annotated[str, typer.Argument(help="the request")],
    model_options: ModelOptions,
    experts: Annotated[str | None, typer.Option("--experts", "-e", help="force a mix instead of routing: "
                                                "name=weight,name=weight")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n")] = 64,
    as_json: JsonOpt = False,
) -> None:
    """Answer a prompt with the routed model (greedy), and say which experts answered."""
    import torch

    def work() -> dict[str, Any]:
        mix = _forced_mix(experts) if experts else None
        model = model_options.load()
        batch = _encode(model, prompt)
        tok = model.tokenizer
        with torch.no_grad():
            out = model.generate(**batch, experts=mix, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        text = tok.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        return {"prompt": prompt, "answer": text, **model.last_routing[0].to_json()}

    data = attempt(work, as_json)
    mix = ", ".join(f"{n} {w:.2f}" for n, w in sorted(data["experts"].items(), key=lambda t: -t[1]))
    emit({k: v for k, v in data.items() if k != "layer_usage"}, as_json,
         message=f"{escape(data['answer'])}\n[dim]experts: {escape(mix) or 'none (base model)'}[/]")


@app.command()
@with_option_groups
def serve(
    model_options: ModelOptions,
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port")] = 8000,
    max_batch: Annotated[int, typer.Option(help="rows decoded together (requests join and leave the running batch "
                                                "at every step)")] = 8,
    max_batch_tokens: Annotated[int, typer.Option(help="prompt + max_tokens over the rows of the batch")] = 65536,
    batch_window: Annotated[float, typer.Option(help="seconds an idle server waits for more requests to prefill "
                                                     "with the first")] = 0.02,
    max_body_mib: Annotated[float, typer.Option(help="the largest request body, in MiB (larger: 413)")] = 4.0,
    train_routing: Annotated[str, typer.Option(
        help="routing data the library lacks (PHATGOOSE gates, X-LoRA heads): 'background' serves at once and "
             "trains it meanwhile (GET /v1/experts tells how it stands); 'now' trains it before serving")]
    = "background",
    api_key: Annotated[str | None, typer.Option(
        envvar="MOERGE_API_KEY", help="the key (Authorization: Bearer …) that uploading and deleting experts "
        "need; without one, a server listening beyond this machine refuses them")] = None,
    api_key_for_all: Annotated[bool, typer.Option(help="ask the API key of every request")] = False,
    ray: Annotated[bool, typer.Option(help="serve on Ray Serve: an ingress that retrieves each prompt's experts and "
                                           "model replicas chosen by them (Serve's model multiplexing)")] = False,
    replicas: Annotated[int, typer.Option(help="with --ray: model replicas")] = 2,
    autoscale: Annotated[str | None, typer.Option(help="with --ray: 'MIN,MAX' replicas, scaled by Serve on the "
                                                       "requests under way (instead of --replicas)")] = None,
    models_per_replica: Annotated[int, typer.Option(help="with --ray: sets of experts a replica keeps warm")] = 8,
    replica_cpus: Annotated[float, typer.Option(help="with --ray: CPUs each replica reserves (Ray gives its torch "
                                                     "that many threads)")] = 1.0,
    ray_address: Annotated[str | None, typer.Option(envvar="RAY_ADDRESS", help="with --ray: the Ray cluster to "
                                                    "join ('auto', or ray://host:port); default: start one here")]
    = None,
) -> None:
    """An OpenAI-compatible HTTP API over the routed model: /v1/chat/completions, /v1/completions (streaming with
    SSE), /v1/models (the routed model and each expert), /v1/experts (upload a PEFT adapter). With --ray, the same
    API from an ingress and model replicas on a Ray cluster."""
    missing = [m for m in SERVER_MODULES + (("ray",) if ray else ()) if importlib.util.find_spec(m) is None]
    if missing:  # checked before the model loads: that takes a while, and the server could not start anyway
        extras = "server,ray" if ray else "server"
        fail(f"moerge serve needs {' and '.join(missing)}, which the {extras} extras install: "
             f'pip install "moerge[{extras}]"', False)
    from moerge.serving import ServerConfig
    from moerge.serving import serve as run_server

    if train_routing not in ("now", "background"):
        fail(f"--train-routing must be 'now' or 'background', got {train_routing!r}", False)
    if api_key_for_all and not api_key:
        fail("--api-key-for-all needs --api-key (or MOERGE_API_KEY)", False)
    local = host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")
    if not api_key and not local:
        err_console.print(f"[yellow]listening on {escape(host)} without --api-key: uploading and deleting experts "
                          "are refused (403)[/]", highlight=False)
    config = ServerConfig(max_batch=max_batch, max_batch_tokens=max_batch_tokens, batch_window=batch_window,
                          max_body_bytes=int(max_body_mib * (1 << 20)), api_key=api_key or None,
                          api_key_for_all=api_key_for_all, admin=bool(api_key) or local)
    if ray:
        return _serve_on_ray(model_options, train_routing, host, port, config, replicas, autoscale,
                             models_per_replica, replica_cpus, ray_address)
    model = attempt(lambda: model_options.load(train_routing), False)
    run_server(model, model.tokenizer, host=host, port=port, config=config)


def _serve_on_ray(model_options: ModelOptions, train_routing: str, host: str, port: int, server: Any, replicas: int,
                  autoscale: str | None, models_per_replica: int, cpus: float, address: str | None) -> None:
    """``moerge serve --ray``: the Serve application of :mod:`moerge.serving.ray_app`, until interrupted."""
    import functools

    from moerge.serving.ray_app import RayConfig, build_app

    scaling = None
    if autoscale is not None:
        bounds = split_commas(autoscale)
        if len(bounds) != 2 or not all(b.isdigit() for b in bounds) or not 0 < int(bounds[0]) <= int(bounds[1]):
            fail(f"--autoscale takes 'MIN,MAX' with 0 < MIN <= MAX, got {autoscale!r}", False)
        scaling = {"min_replicas": int(bounds[0]), "max_replicas": int(bounds[1]), "target_ongoing_requests": 2}
    config = attempt(lambda: RayConfig(replicas=replicas, autoscaling=scaling, replica_cpus=cpus,
                                       max_models_per_replica=models_per_replica), False)
    attempt(lambda: open_library(model_options.library), False)  # said before Ray starts, not by a failed replica
    attempt(model_options.make_router, False)  # as is the router's spec
    import ray as ray_core
    from ray import serve as ray_serve

    ray_core.init(address=address, include_dashboard=False)
    ray_serve.start(http_options={"host": host, "port": port})
    build = functools.partial(ModelOptions.load, model_options, train_routing)
    ray_serve.run(build_app(build, model_options.library, server=server, config=config), route_prefix="/",
                  name="moerge", blocking=True)
