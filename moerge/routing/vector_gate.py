"""Bases of the per-token routers whose local gate is one vector per expert and module, linear in the module's
input (Arrow's prototypes, PHATGOOSE's gates, X-LoRA's head rows).

* :class:`VectorGateRouter`: every expert is a candidate of every row; inside each module the logits are the
  candidates' vectors against the token (:class:`~moerge.routing.selection.ExpertVectors` made into a
  :class:`~moerge.routing.selection.LinearGate`), turned into weights by the config's selection.
* :class:`TrainedGateRouter`: the vectors come from routing data trained for each expert on a frozen base. The
  data is kept per expert, tagged with the digest of the weights it was made for: reused from the library when the
  digest matches, trained when missing (on a private copy of the base), zeros with a warning when it can be
  neither, and stored in the library by :meth:`~TrainedGateRouter.persist` while not yet saved there.
"""

from __future__ import annotations

import functools
import random
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from moerge.errors import LibraryError, RoutingError
from moerge.routing.router import Router
from moerge.routing.selection import ExpertVectors, LinearGate, SelectionConfig
from moerge.routing.training import GateTrainingConfig, answers_from_expert
from moerge.routing.types import Candidates, LayerInfo, RoutingRequest, all_candidates

if TYPE_CHECKING:  # pragma: no cover
    from moerge.adapters.expert import Expert

__all__ = ["VectorGateRouter", "TrainedGateRouter", "TrainedGateConfig"]


class VectorGateRouter(Router):
    """A router whose local gate is ``finish(x @ v_e) · scale`` per module, one vector ``v_e`` per expert.

    Subclasses fill :attr:`vectors` as experts are added, choose :attr:`finish` (see
    :class:`~moerge.routing.selection.LinearGate`; ``"standardized"`` logits are ``⟨layer_norm(x), v⟩``, so their
    vectors are centred) and :attr:`with_bias` (each vector's last element is a bias, not part of the dot
    product), and give the scale of a module's logits by :meth:`gate_scale`.
    """

    has_local_gate = True
    finish: ClassVar[str] = "none"
    with_bias: ClassVar[bool] = False

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self.vectors = ExpertVectors()  # module -> expert -> gate vector (in,), or (in + 1,) with its bias

    def gate_scale(self, layer: LayerInfo) -> float:
        """The factor of the logits in module ``layer`` (one over a temperature)."""
        return 1.0

    def on_remove_expert(self, name: str) -> None:
        self.vectors.remove(name)

    def unread_routing(self, candidates: Candidates) -> list[str]:
        return self.vectors.unread(candidates)

    def read_routing(self, names: Sequence[str], loaded: Mapping[str, tuple[Expert, Expert]] | None = None) -> None:
        self.vectors.read(names, loaded)

    def select(self, request: RoutingRequest) -> Candidates:
        """Every expert is a candidate of every row; the local gate decides per token."""
        return all_candidates(request)

    def make_linear_gate(self, candidates: Candidates, layer: LayerInfo, device: torch.device) -> LinearGate | None:
        """The candidates' vectors for ``layer`` as a linear gate; ``-inf`` logits for candidates without one."""
        got = self.vectors.gate_operands(layer.name, candidates, device, self.gate_scale(layer),
                                         with_bias=self.with_bias, center=self.finish == "standardized")
        return None if got is None else LinearGate(*got, finish=self.finish)  # (B, in, K), (B, 1, K)


@dataclass
class TrainedGateConfig(SelectionConfig, GateTrainingConfig):
    """Config of a :class:`TrainedGateRouter`: how its gate selects, and how it trains missing routing data."""

    def __post_init__(self) -> None:
        self._check_selection()
        self._check_training()


@dataclass(frozen=True)
class _Prepared:
    """An expert's routing data made by :meth:`TrainedGateRouter.prepare_expert` (``data`` ``None``: the router
    holds it already)."""

    digest: str
    data: Any
    saved: bool  # the library holds it (nothing for persist to store)
    losses: list[float] | None = None


_LAZY = object()  # _Prepared.data of routing data the library holds, to be read on first use


class TrainedGateRouter(VectorGateRouter):
    """A :class:`VectorGateRouter` whose vectors come from routing data trained per expert, kept in the library
    under :attr:`routing_kind` and tagged with the digest of the expert's weights.

    Subclasses give :attr:`routing_kind`, :attr:`data_label` (what the data is called in messages),
    :meth:`_prepare` (the data as kept, and its gate vectors), :meth:`_zeros` (the data of an expert that gets
    none), :meth:`_train` and, when the data is not already ``module → tensor``, :meth:`_to_tensors` and
    :meth:`_from_tensors` (its form in the library). Their config is a :class:`TrainedGateConfig`.
    """

    routing_kind: ClassVar[str] = ""
    data_label: ClassVar[str] = "routing data"
    lazy_data: ClassVar[bool] = False  # stored data read when a request first has the expert among its candidates
    keeps_peers: ClassVar[bool] = False  # keep the experts taken in: training mixes in other experts' examples

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self._data: dict[str, Any] = {}  # expert -> its routing data
        self._digest: dict[str, str] = {}  # expert -> digest of the weights its data was made for
        self._unsaved: set[str] = set()  # experts whose data the library does not hold yet
        self.losses: dict[str, list[float]] = {}  # expert -> training losses of the data trained here
        self.deferred: set[str] = set()  # experts taken in by defer_expert whose data is not trained yet
        self._experts: dict[str, Expert] = {}  # the experts taken in (peers whose examples training may mix in)
        self._answers: dict[str, list[tuple[str, str]]] = {}  # expert -> its examples with its own answers

    # --- what a subclass gives -------------------------------------------------------------------------------------
    def _prepare(self, data: Any) -> tuple[Any, dict[str, torch.Tensor]]:
        """``(data as kept (detached, float32, on the CPU), module → gate vector)``."""
        raise NotImplementedError

    def _zeros(self, expert: Expert) -> Any:
        """The data of an expert that has none stored and none can be trained for: logit 0 everywhere."""
        raise NotImplementedError

    def _train(self, expert: Expert) -> tuple[Any, list[float]]:
        """Train ``expert``'s data (from its example prompts, on ``self.context.training_base()``);
        returns ``(data, losses)``."""
        raise NotImplementedError

    def _to_tensors(self, data: Any) -> dict[str, torch.Tensor]:
        return data

    # --- training data -----------------------------------------------------------------------------------------------
    def _examples(self, expert: Expert, base: torch.nn.Module) -> list[tuple[str, str]]:
        """``expert``'s example prompts with the answers it gives on ``base`` (kept: they do not change)."""
        if expert.name not in self._answers:
            self._answers[expert.name] = answers_from_expert(base, self.context.tokenizer, expert,
                                                             list(expert.metadata.examples))
        return self._answers[expert.name]

    def _peers(self, expert: Expert, n: int) -> list[Expert]:
        """Up to ``n`` other experts taken in that have examples, drawn with the expert's name as seed."""
        known = dict(self._experts)  # a snapshot: other threads may add experts meanwhile
        peers = [e for name, e in known.items() if name != expert.name and e.metadata.examples]
        return random.Random(expert.name).sample(peers, min(n, len(peers)))

    def _from_tensors(self, tensors: dict[str, torch.Tensor]) -> Any:
        return tensors

    # --- the data of each expert -----------------------------------------------------------------------------------
    def _set_data(self, name: str, data: Any, digest: str | None = None, saved: bool = False) -> None:
        """Use ``data`` as expert ``name``'s routing data, made for the weights of ``digest``; ``saved``: the
        library holds it already (else :meth:`persist` stores it)."""
        self._data[name], vectors = self._prepare(data)
        self.vectors.set(name, vectors)
        if digest is not None:
            self._digest[name] = digest
        (self._unsaved.discard if saved else self._unsaved.add)(name)

    def _set_lazy(self, name: str, digest: str) -> None:
        """Take expert ``name``'s data, stored in the library for the weights of ``digest``, as read on first use
        (:meth:`ExpertVectors.set_lazy`): the manifest says it is there; its file is read then, checked, and a
        request that needs it fails naming the expert when it does not read."""
        self._data.pop(name, None)
        self.vectors.set_lazy(name, functools.partial(self._read_lazy, name, digest))  # a copy reads into itself
        self._digest[name] = digest
        self._unsaved.discard(name)

    def _stored_data(self, name: str, digest: str) -> Any:
        """Expert ``name``'s data as the library holds it for the weights of ``digest``."""
        tensors = self.context.store.routing_for(name, self.routing_kind, digest)
        if tensors is None:
            raise LibraryError(f"the library no longer holds the {self.data_label} of this expert's weights",
                               expert=name)
        return self._from_tensors(tensors)

    def _read_lazy(self, name: str, digest: str, loaded: Any = None) -> dict[str, torch.Tensor]:
        """The vectors of the data stored for ``name``; the data itself is not kept (:meth:`_data_of` reads it
        again when asked), so a read that a replacement overtook changes nothing."""
        return self._prepare(self._stored_data(name, digest))[1]

    def _data_of(self, name: str) -> Any:
        if name not in self._data and name in self._digest and self.context.store is not None:  # read on use
            tensors = self.context.store.routing_for(name, self.routing_kind, self._digest[name])
            if tensors is not None:
                return dict(self._prepare(self._from_tensors(tensors))[0])
        if name not in self._data:
            raise RoutingError(f"no {self.data_label} for this expert", expert=name)
        return dict(self._data[name])

    def _can_train(self, expert: Expert) -> bool:
        ctx = self.context
        return bool(self.config.train_missing and expert.metadata.examples and ctx.tokenizer is not None
                    and ctx.training_base is not None)

    def _holds(self, expert: Expert, digest: str) -> bool:
        """Whether the router holds data made for these weights of ``expert`` (e.g. set before it was added)."""
        return self._digest.get(expert.name) == digest and (expert.name in self._data
                                                              or self.vectors.is_lazy(expert.name))

    def prepare_expert(self, expert: Expert) -> _Prepared:
        """The library's data for the expert's weights, else data trained now, else zeros (with a warning)."""
        digest = expert.digest()
        if self._holds(expert, digest):
            return _Prepared(digest, None, saved=True)
        store = self.context.store
        if self.lazy_data and store is not None and store.has_routing_for(expert.name, self.routing_kind, digest):
            return _Prepared(digest, _LAZY, saved=True)  # read when a request first needs it
        stored = None if store is None else store.routing_for(expert.name, self.routing_kind, digest)
        if stored is not None:
            return _Prepared(digest, self._from_tensors(stored), saved=True)
        if self._can_train(expert):
            run = self.context.run_training
            data, losses = run(lambda: self._train(expert)) if run is not None else self._train(expert)
            return _Prepared(digest, data, saved=False, losses=losses)
        warnings.warn(f"expert {expert.name!r} has no {self.data_label} (none stored, and no example prompts or "
                      "tokenizer to train them): its local logit is 0 everywhere", stacklevel=4)
        return _Prepared(digest, self._zeros(expert), saved=True)

    def needs_training(self, expert: Expert) -> bool:
        """True when no data is held or stored for the expert's weights (the library's manifest is read, no data
        file: :meth:`prepare_expert` loads it) and it can be trained."""
        digest = expert.digest()
        store = self.context.store
        stored = store is not None and store.has_routing_for(expert.name, self.routing_kind, digest)
        return not (self._holds(expert, digest) or stored) and self._can_train(expert)

    def defer_expert(self, expert: Expert, *, placeholder: bool = False) -> None:
        """Take ``expert`` in without data until it is trained: no gate vectors, so the local gate never chooses
        it (``placeholder``: zero vectors, a logit of 0 everywhere, never stored — what a global stage that chose
        the expert mixes it with meanwhile). Listed in :attr:`deferred` until :meth:`on_add_expert` gives its
        data."""
        self.on_remove_expert(expert.name)
        if placeholder:
            self._data[expert.name], vectors = self._prepare(self._zeros(expert))
            self.vectors.set(expert.name, vectors)
        self.deferred.add(expert.name)

    def on_add_expert(self, expert: Expert, prepared: _Prepared | None = None) -> None:
        p = self.prepare_expert(expert) if prepared is None else prepared
        self.deferred.discard(expert.name)
        if self.keeps_peers:
            self._experts[expert.name] = expert
        if p.data is None:
            return
        if p.data is _LAZY:
            self._set_lazy(expert.name, p.digest)
            return
        self._set_data(expert.name, p.data, p.digest, saved=p.saved)
        if p.losses is not None:
            self.losses[expert.name] = p.losses

    def on_remove_expert(self, name: str) -> None:
        super().on_remove_expert(name)
        self._data.pop(name, None)
        self._digest.pop(name, None)
        self._unsaved.discard(name)
        self.deferred.discard(name)
        self._experts.pop(name, None)
        self._answers.pop(name, None)

    def persist(self, library: Any) -> None:
        """Store the data of the experts ``library`` holds that it does not hold yet, tagged with their digest."""
        for name in sorted(self._unsaved):
            if name in library and name in self._digest:
                library.put_routing(name, self.routing_kind, self._to_tensors(self._data[name]),
                                    {"digest": self._digest[name]})
                self._unsaved.discard(name)
