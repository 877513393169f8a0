"""The router interface, the context a router is given, and the registry routers add themselves to."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from moerge.errors import RoutingError
from moerge.routing.selection import LinearGate, no_candidate_logits
from moerge.routing.types import Candidates, LayerInfo, RoutingRequest

if TYPE_CHECKING:  # pragma: no cover
    from moerge.adapters.expert import Expert

__all__ = ["Router", "RouterContext", "register_router", "router_class", "list_routers", "build_router",
           "parse_router_spec"]


@dataclass(frozen=True)
class RouterContext:
    """All a router knows of the model it routes for (a router never sees the model itself).

    Attributes:
        modules: every linear module of the base a router may gate, name → ``(out_features, in_features)``.
        hidden_size: the base's hidden size, when its config gives one.
        tokenizer: the base's tokenizer (``None`` when the model has none): routers that read prompts as text or
            train on examples need it.
        store: the library's routing-data store (``put_routing``/``get_routing``/``routing_for``/``has_routing_for``,
            ``routing_dir``,
            ``locked``, ``embedder``, ``set_embedder``; ``name in store`` for the experts it lists), or ``None``
            for a model without a library.
        language_model: the base model, to generate text with (GLIDER's task describer); inside a router's calls
            no routing is active on it, so it acts as the plain base.
        training_base: returns a plain private copy of the base to train routing data on (gates, heads), so
            training never runs through the base that serves calls.
        run_training: runs a training function (``fn() -> result``) where it least disturbs the calls being
            served — in a forked child process when the model can (see :mod:`moerge.core.forked`) — and returns
            its result; ``None``: call it here.
    """

    modules: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    hidden_size: int | None = None
    tokenizer: Any = None
    store: Any = None
    language_model: nn.Module | None = None
    training_base: Callable[[], nn.Module] | None = None
    run_training: Callable[[Callable[[], Any]], Any] | None = None

    def gate_dim(self, module: str, in_features: int) -> int:
        """The width of the tokens a local gate of ``module`` reads: its own input for a linear module; for an MoE
        router or fused expert weight (not among :attr:`modules`), the MoE block's input, the hidden size."""
        if not self.modules or module in self.modules or self.hidden_size is None:
            return in_features
        return self.hidden_size


class Router:
    """Base class of routers. Subclasses live one per file in ``routers/``, with a config dataclass.

    A router is attached to one model. It sees every expert as it is added (:meth:`on_add_expert`, where it
    computes and stores the routing data it needs) or removed, picks candidates per row at prefill
    (:meth:`select`) and, if ``has_local_gate``, mixes them per token inside each patched module (:meth:`gate`).
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type | None] = None
    has_local_gate: ClassVar[bool] = False

    def __init__(self, config: Any = None) -> None:
        if config is None and self.config_class is not None:
            config = self.config_class()
        self.config = config
        self.context = RouterContext()

    def attach(self, context: RouterContext) -> None:
        """Bind to the model described by ``context``; called by the model before any routing."""
        self.context = context

    def prepare_expert(self, expert: Expert) -> Any:
        """Compute the routing data ``expert`` needs, without changing this router, and return it for
        :meth:`on_add_expert`. This is where slow work goes (routing data trained on ``context.training_base()``, a
        private base): the model calls it outside its lock while calls go on, so it must not read state that
        another thread changes, nor change any. ``None`` (the default) when there is nothing to prepare."""
        return None

    def on_add_expert(self, expert: Expert, prepared: Any = None) -> None:
        """Take ``expert`` in, with what :meth:`prepare_expert` returned for it (``None``: prepare it now). The
        model calls it under its lock, so it should be quick. Called again for a name it already has (an expert
        being replaced), it replaces that name's data. Must not change other experts' routing data; on error it
        must leave its state as it was."""

    def needs_training(self, expert: Expert) -> bool:
        """Whether :meth:`prepare_expert` would train routing data for ``expert`` (slow: none is stored for its
        weights). A model that defers training (``train_routing="background"``) then takes the expert in with
        :meth:`defer_expert` at once and gives it its trained data later. Must not change the router; ``False``
        (the default) for routers whose data is stored or cheap to compute."""
        return False

    def defer_expert(self, expert: Expert) -> None:
        """Take ``expert`` in (replacing the routing data of a name it has) without the routing data
        :meth:`needs_training` said must be trained: until :meth:`on_add_expert` gives it that data, the router
        routes without it (a router with a global stage may still choose the expert there; a local gate alone
        never chooses it). Called under the model's lock, so it must be quick; only called when
        :meth:`needs_training` is true."""
        raise NotImplementedError(f"router {self.name!r} cannot defer its routing data")

    def on_remove_expert(self, name: str) -> None:
        """Forget ``name``'s routing data."""

    def persist(self, store: Any) -> None:
        """Store in ``store`` (the library) the routing data computed since the last call (for experts it holds),
        so the next load reuses it. Called by the model after experts are loaded, added or removed."""

    def unread_routing(self, candidates: Candidates) -> list[str]:
        """The experts among ``candidates`` whose routing data this router keeps on disk until used (see
        :meth:`read_routing`); the model reads it before routing the call, without holding its lock."""
        return []

    def read_routing(self, names: Sequence[str], loaded: Mapping[str, tuple[Expert, Expert]] | None = None) -> None:
        """Read the routing data of ``names`` (from :meth:`unread_routing`) into memory; ``loaded``: for experts
        whose weights the model has just read, ``(the stored expert it read, what it read)`` (routing data made
        from the weights uses the copy only if it was read from the stored expert the router holds)."""

    def select(self, request: RoutingRequest) -> Candidates:
        """Per-row candidates for a batch (the global stage). Runs once per request, at prefill."""
        raise NotImplementedError

    def make_linear_gate(self, candidates: Candidates, layer: LayerInfo, device: torch.device) -> LinearGate | None:
        """The local gate of ``layer`` for these candidates as a :class:`LinearGate` (``None`` when no candidate
        has gate data for the module: it then gets no expert). Routers whose gate is linear in the module input
        implement this and get :meth:`gate` for free; the patched layer then fuses the gate's matmul with the
        experts' first one. A router with another kind of gate overrides :meth:`gate` instead."""
        raise NotImplementedError

    @property
    def has_linear_gate(self) -> bool:
        return type(self).make_linear_gate is not Router.make_linear_gate

    def linear_gate(self, candidates: Candidates, layer: LayerInfo, device: torch.device) -> LinearGate | None:
        """:meth:`make_linear_gate`, made once per request and module (kept in ``candidates.memo``)."""
        key = (id(self), "linear_gate", layer.name, device)
        if key not in candidates.memo:
            candidates.memo[key] = self.make_linear_gate(candidates, layer, device)
        return candidates.memo[key]

    def logits(self, x: torch.Tensor, candidates: Candidates, layer: LayerInfo) -> torch.Tensor:
        """``(B, T, K)`` gate logits of a linear gate; ``-inf`` everywhere for a module no candidate targets."""
        lg = self.linear_gate(candidates, layer, x.device)
        if lg is None:
            return no_candidate_logits(x, candidates)
        return lg.logits(x, torch.bmm(x.float(), lg.Vt))

    def gate(self, x: torch.Tensor, candidates: Candidates, layer: LayerInfo) -> torch.Tensor:
        """Per-token weights ``(B, T, K)`` over the row's candidates for the module ``layer``; ``x`` is that
        module's input ``(B, T, in)``. Only called when ``has_local_gate`` is true."""
        return self.config.select(self.logits(x, candidates, layer))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


_REGISTRY: dict[str, type[Router]] = {}


def register_router(name: str):
    """Class decorator: register a :class:`Router` subclass under ``name``."""

    def wrap(cls: type[Router]) -> type[Router]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"a router named {name!r} is already registered ({_REGISTRY[name].__qualname__})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def router_class(name: str) -> type[Router]:
    """The router class registered as ``name`` (importing :mod:`moerge.routers` registers them all)."""
    if name not in _REGISTRY:
        raise RoutingError(f"unknown router {name!r}; registered routers: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def list_routers() -> list[str]:
    """Names of every registered router."""
    return sorted(_REGISTRY)


def parse_router_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """A router and its options written as one string, as the CLI's ``--router`` and the evaluation's methods take
    them: ``"glider?top_k=1&local=lda"`` → ``("glider", {"top_k": 1, "local": "lda"})`` (values read as JSON, else
    as text)."""
    name, _, query = spec.partition("?")
    config: dict[str, Any] = {}
    for part in filter(None, query.split("&")):
        key, eq, value = part.partition("=")
        if not eq or not key:
            raise RoutingError(f"router {spec!r}: expected NAME?key=value&key=value, got {part!r}")
        try:
            config[key] = json.loads(value)
        except json.JSONDecodeError:
            config[key] = value
    return name, config


def build_router(name: str, **config: Any) -> Router:
    """Build the router registered as ``name``, passing ``config`` to its config dataclass."""
    cls = router_class(name)
    if cls.config_class is None:
        if config:
            raise RoutingError(f"router {name!r} takes no configuration, got {sorted(config)}")
        return cls()
    try:
        cfg = cls.config_class(**config)
    except TypeError as e:
        fields = [f.name for f in dataclasses.fields(cls.config_class)]
        raise RoutingError(f"router {name!r}: {e}; its options are {fields}") from None
    return cls(cfg)
