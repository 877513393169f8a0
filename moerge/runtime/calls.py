"""How a call is routed: the global stage under the model's lock, the experts it needs read without it.

:class:`RoutedCalls` is the part of :class:`~moerge.MoErgeModel` that decides a call's routing (a mixin: the model
gives ``expert_set``, ``prompts``, ``router``, ``router_context`` and ``context``). A call whose candidates include
experts whose factors are not in memory releases the lock, reads them (side by side), and routes again under the
lock with them at hand; calls meanwhile are not held up by the read. Routing data a router keeps on disk until
used (PHATGOOSE gates stored in the library) is read the same way.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from moerge.errors import LibraryError, RoutingError
from moerge.routers.explicit import ExplicitRouter
from moerge.routing import Candidates, Router, RouterContext, RoutingContext, RoutingRequest, RoutingState
from moerge.runtime.cache import give_back_memory
from moerge.runtime.experts import ExpertSet
from moerge.runtime.prompts import PromptReader

__all__ = ["RoutedCalls"]

_READ_ROUNDS = 3  # routings of one call that may find experts to read (the set may change while they are read)


class RoutedCalls:
    """Routing a call (see the module's docstring)."""

    expert_set: ExpertSet
    prompts: PromptReader
    router: Router
    context: RoutingContext
    last_routing: Any

    def router_context(self) -> RouterContext:  # pragma: no cover - given by the model
        raise NotImplementedError

    def _resync(self) -> bool:
        """After an expert's files could not be read: take in what changed in the library (another process may
        have replaced or removed the expert since the model last looked); whether anything did."""
        return getattr(self, "_library_sync", None) is not None and bool(self.sync_library().changed)

    def route(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        experts: Sequence[Mapping[str, float]] | Mapping[str, float] | None = None,
        inputs_embeds: torch.Tensor | None = None,
        exclude: Iterable[str] | None = None,
        new_tokens: int = 0,
    ) -> RoutingState:
        """Decide the routing of a batch (the global stage) and gather every module's candidate factors.

        ``experts`` forces a mix per row (``[{"sql": 1.0}, {"math": .5, "sql": .5}]``) or one mix for all rows.
        ``exclude`` names experts no row may use: they are dropped from the router's candidates (sequence weights
        are renormalised over the rest). An empty prompt, or one that with ``new_tokens`` to generate exceeds the
        base's context, is refused.
        """
        self.expert_set.require_active()
        self.prompts.check(input_ids, attention_mask, new_tokens)
        if experts is not None and isinstance(experts, Mapping):
            experts = [experts]
        staged: dict[str, Any] = {}  # experts read outside the lock for this call
        for attempt in range(_READ_ROUNDS):
            done = self._route_once(input_ids, attention_mask, experts, inputs_embeds, exclude, staged,
                                    last=attempt == _READ_ROUNDS - 1)
            if isinstance(done, RoutingState):
                if staged:  # the buffers the experts were read into (their factors are in the banks now)
                    staged.clear()
                    give_back_memory()
                return done
            missing, unread = done
            try:  # the lock is free meanwhile
                staged.update(self.expert_set.read_experts(missing))
                self.router.read_routing(unread, staged)
            except LibraryError:
                if not self._resync():
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _route_once(self, input_ids: Any, attention_mask: Any, experts: Any, inputs_embeds: Any, exclude: Any,
                    staged: dict[str, Any], *, last: bool) -> RoutingState | tuple[list[str], list[str]]:
        """Route under the lock: the call's state, or (unless ``last``) what it needs to be read without the lock
        before routing again: the experts neither in memory nor in ``staged``, and the candidates whose routing
        data the router keeps on disk until used."""
        with self.expert_set.lock:
            names = tuple(self.expert_set.names)
            router = self.router
            if experts is not None:
                router = ExplicitRouter()
                router.attach(self.router_context())
            batch = next((int(t.shape[0]) for t in (input_ids, inputs_embeds) if t is not None), len(experts or []))
            if experts is not None and len(experts) == 1 and batch > 1:
                experts = list(experts) * batch
            request = RoutingRequest(
                input_ids=input_ids, attention_mask=attention_mask, names=names, experts=experts,
                prompts=None if experts is not None else self.prompts.texts(input_ids, attention_mask),
            )
            cands = self._checked(router, router.select(request), names, batch)
            if exclude:
                cands = cands.without(set(exclude))
            missing = self.expert_set.missing(cands, staged)
            unread = router.unread_routing(cands) if router is self.router else []
            if (missing or unread) and not last:
                return missing, unread
            fuse = cands.weights is None and router.has_local_gate and router.has_linear_gate
            gathered = self.expert_set.gather(cands, router, fuse, staged)
        return RoutingState(cands, router, gathered, record_usage=True)

    @staticmethod
    def _checked(router: Router, cands: Candidates, names: tuple[str, ...], batch: int) -> Candidates:
        if not isinstance(cands, Candidates) or cands.names != names:
            raise RoutingError(f"router {router.name!r} returned candidates over other expert names")
        if cands.weights is None and not router.has_local_gate:
            raise RoutingError(f"router {router.name!r} gave no mixing weights and has no local gate")
        if cands.batch_size != batch:
            raise RoutingError(f"router {router.name!r} routed {cands.batch_size} rows for a batch of {batch}")
        return cands

    @contextmanager
    def routing(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                **route: Any) -> Iterator[RoutingState]:
        """Route once (with :meth:`route`'s arguments) and keep that routing for every forward inside the block
        (for hand-written decode loops)."""
        state = self.route(input_ids, attention_mask, **route)
        with self.context.activate(state):
            yield state
        self.last_routing = state.trace()

