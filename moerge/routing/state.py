"""Per-call routing state, and the context a model's patched layers read it from.

The model owns a :class:`RoutingContext`; each forward or generate call activates a :class:`RoutingState` on it
(thread-local, so concurrent calls in different threads do not see each other's routing).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from moerge.routing.types import Candidates, RowRouting

if TYPE_CHECKING:  # pragma: no cover
    from moerge.routing.router import Router

__all__ = ["RoutingState", "RoutingContext"]


class RoutingState:
    """Routing of one forward/generate call: the candidates, the router, and each module's gathered factors.

    Factors are gathered from every patched module once, when the state is built (at prefill), and reused by
    every decode step; later changes to the model's experts do not affect a call already under way.
    """

    def __init__(self, candidates: Candidates, router: Router | None, gathered: dict[int, Any],
                 record_usage: bool = False) -> None:
        self.candidates = candidates
        self.router = router
        self.gathered = gathered
        self.local = router is not None and router.has_local_gate and candidates.weights is None
        self.record_usage = record_usage and self.local
        self.usage: dict[str, torch.Tensor] = {}  # module name -> (B, K) summed gate weights
        self.usage_tokens: dict[str, int] = {}
        self._weights: dict[str, list[torch.Tensor]] = {}  # module name -> weights not yet summed
        self.keep_tokens = False  # keep every step's weights (token_weights) instead of summing them as they come
        self._sources: dict[str, list[Any]] = {}  # module name -> steps that sum its weights themselves

    def sums_usage(self, module: str) -> bool:
        """Whether ``module``'s gate weights may be summed where they are computed, per row over tokens, rather
        than handed over at every call (no per-token weights are kept): such a step registers with
        :meth:`add_usage_source`."""
        return self.record_usage and not self.keep_tokens

    def add_usage_source(self, module: str, source: Any) -> None:
        """A step that sums ``module``'s ``(B, K)`` gate weights itself: ``source.take_usage()`` returns the sums
        since it was last asked (or ``None``) and their number of tokens, and starts again from zero."""
        self._sources.setdefault(module, []).append(source)

    def _take_sources(self) -> None:
        for module, sources in self._sources.items():
            for source in sources:
                summed, tokens = source.take_usage()
                if summed is None or not tokens:
                    continue
                total = self.usage.get(module)
                self.usage[module] = summed if total is None else total + summed
                self.usage_tokens[module] = self.usage_tokens.get(module, 0) + tokens

    def record(self, module: str, weights: torch.Tensor, index: int | None = None) -> None:
        """Keep a local gate's ``(B, T, K)`` weights for :attr:`RowRouting.layer_usage` (``index``: the module's
        patch index, unused here). Kept as they are (no op per step); summed when there are many, and by
        :meth:`trace`."""
        kept = self._weights.setdefault(module, [])
        kept.append(weights)
        if len(kept) >= 64 and not self.keep_tokens:
            self._fold(module)

    def token_weights(self, module: str) -> torch.Tensor | None:
        """``(B, T, K)``: the gate's weights for every token this state's calls ran through ``module``, in order
        (kept only with ``keep_tokens``; else what is not yet summed); ``None`` if none were recorded."""
        kept = self._weights.get(module)
        return torch.cat([self._per_row(w) for w in kept], dim=1) if kept else None

    def _per_row(self, weights: torch.Tensor) -> torch.Tensor:
        """``(B, T, K)`` float weights per routed row: rows repeated by generate (beams, samples) folded back."""
        w = weights.detach().float()
        b = self.candidates.batch_size
        return w if w.shape[0] == b else w.reshape(b, -1, *w.shape[1:]).mean(1)

    def _fold(self, module: str) -> None:
        """Sum the weights kept for ``module`` into its usage totals."""
        kept = self._weights.pop(module, [])
        if not kept:
            return
        total = self.usage.get(module)
        tokens = sum(int(w.shape[1]) for w in kept)
        if len({(w.shape[0], w.shape[2]) for w in kept}) == 1:  # one batch (every step of a call): one sum
            kept = [torch.cat(kept, dim=1)] if len(kept) > 1 else kept
        for w in map(self._per_row, kept):
            s = w.sum(1)  # (B, K)
            total = s if total is None else total + s
        self.usage_tokens[module] = self.usage_tokens.get(module, 0) + tokens
        self.usage[module] = total

    def trace(self) -> list[RowRouting]:
        c = self.candidates
        kept = dict(self._weights) if self.keep_tokens else None
        for module in list(self._weights):
            self._fold(module)
        self._take_sources()
        if kept is not None:
            self._weights = kept
        rows: list[RowRouting] = []
        totals = {mod: tot.float().cpu() for mod, tot in self.usage.items()}  # one copy from the device
        for b in range(c.batch_size):
            slots = [(j, i) for j, i in enumerate(c.ids[b].tolist()) if i >= 0]
            cand = [c.names[i] for _, i in slots]
            scores = [float(c.scores[b, j]) for j, _ in slots]
            usage: dict[str, dict[str, float]] = {}
            if c.weights is not None:
                experts = {c.names[i]: float(c.weights[b, j]) for j, i in slots}
            else:
                for mod, tot in totals.items():
                    n = max(self.usage_tokens[mod], 1)
                    usage[mod] = {c.names[i]: float(tot[b, j]) / n for j, i in slots}
                experts = {
                    name: (sum(u[name] for u in usage.values()) / len(usage) if usage else 0.0) for name in cand
                }
            rows.append(RowRouting(experts=experts, candidates=cand, scores=scores, layer_usage=usage))
        return rows


class RoutingContext:
    """Holds the routing state of the call under way, per thread. Owned by one :class:`MoErgeModel`."""

    def __init__(self) -> None:
        self._local = threading.local()

    def __deepcopy__(self, memo: dict) -> RoutingContext:
        # A copy of a patched model is owned by no MoErgeModel: its layers get a fresh context, act as the base.
        return RoutingContext()

    def __reduce__(self):
        return (RoutingContext, ())

    @property
    def current(self) -> RoutingState | None:
        return getattr(self._local, "state", None)

    @contextmanager
    def activate(self, state: RoutingState) -> Iterator[RoutingState]:
        prev = self.current
        self._local.state = state
        try:
            yield state
        finally:
            self._local.state = prev

