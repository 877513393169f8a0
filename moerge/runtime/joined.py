"""Several calls' routing run as one batch: continuous batching's view of the patched layers.

A server that lets requests join and leave a running batch between decode steps (iteration-level scheduling)
prefills each request with its own :class:`~moerge.routing.RoutingState` and then steps all of them together. A
:class:`JoinedState` stacks the parts' gathered factors once per change of the batch (:func:`join_gathered`), so a
step costs what one request's step costs, and each row gets what its own call computes: its candidates, its
weights, its local gate. Modules whose parts cannot share a step (dense experts, gates computed outside the layer,
different routers) are mixed part by part on their rows (:attr:`JoinedState.split`). The gate weights recorded
for the joined batch are handed back to each part's state (:meth:`JoinedState.settle`), so each request's routing
trace is its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from moerge.routing import RoutingState
from moerge.runtime.gathered import GatheredModule, join_gathered

__all__ = ["JoinedState", "Part"]


@dataclass(frozen=True)
class Part:
    """One call's rows in a joined batch: rows ``start`` to ``start + rows`` (a call with ``n`` samples has ``n``)."""

    state: RoutingState
    start: int
    rows: int


def _selection(state: RoutingState) -> tuple | None:
    """What a local gate's weights depend on besides its factors (``None`` without a local gate)."""
    if not state.local:
        return None
    c = state.router.config
    return (getattr(c, "top_k", None), getattr(c, "top_p", None), getattr(c, "null_logit", None))


class JoinedState:
    """The routing of a batch whose rows belong to several calls (see the module's docstring). It has what a patched
    layer reads of a :class:`RoutingState` (``gathered``, ``local``, ``router``, ``record_usage``, ``record``), plus
    ``split``: the modules to mix part by part (:attr:`parts`)."""

    def __init__(self, parts: Sequence[tuple[RoutingState, int]], lengths: Sequence[int] | None = None) -> None:
        """``parts``: each call's state and its rows, in batch order. ``lengths`` (a left-padded prefill): each part's
        tokens, the last ones of the batch's columns; the gate weights of the padding before them are not its."""
        self.lengths = list(lengths) if lengths is not None else None
        self.parts: list[Part] = []
        start = 0
        for state, rows in parts:
            self.parts.append(Part(state, start, rows))
            start += rows
        self.rows = start
        kinds = {_selection(p.state) for p in self.parts}
        shared = len(kinds) == 1 and len({p.state.local for p in self.parts}) == 1
        lead = self.parts[0].state
        self.local = lead.local if shared else False
        self.router = lead.router
        self.candidates = None
        self.record_usage = any(p.state.record_usage for p in self.parts)
        self.gathered: dict[int, GatheredModule] = {}
        self.split: set[int] = set()
        self._kept: dict[str, list[torch.Tensor]] = {}
        self._touched: dict[str, int] = {}  # module name -> its patch index
        keys = sorted({k for p in self.parts for k in p.state.gathered})
        for key in keys:
            joined = join_gathered([p.state.gathered.get(key) for p in self.parts], [p.rows for p in self.parts]) \
                if shared else False
            if joined is False:
                self.split.add(key)
            elif joined is not None:
                self.gathered[key] = joined

    def sums_usage(self, module: str) -> bool:
        """Never: a joined batch hands each call's weights to its part's state (:meth:`settle`)."""
        return False

    def record(self, module: str, weights: torch.Tensor, index: int | None = None) -> None:
        """Keep the joined batch's ``(B, T, K)`` gate weights for ``module``; handed to the parts by :meth:`settle`."""
        kept = self._kept.setdefault(module, [])
        kept.append(weights)
        if index is not None:
            self._touched[module] = index
        if len(kept) >= 64:
            self._settle(module)

    def settle(self) -> None:
        """Hand every weight kept so far to the parts' own states (each part its rows and its candidate slots)."""
        for module in list(self._kept):
            self._settle(module)

    def _settle(self, module: str) -> None:
        kept = self._kept.pop(module, [])
        if not kept:
            return
        w = torch.cat(kept, dim=1) if len(kept) > 1 else kept[0]
        index = self._touched.get(module)
        for i, p in enumerate(self.parts):
            s = p.state
            if not s.record_usage or (index is not None and index not in s.gathered):
                continue
            mine = w[p.start:p.start + p.rows, :, :s.candidates.k]
            if self.lengths is not None:
                mine = mine[:, mine.shape[1] - self.lengths[i]:]
            s.record(module, mine)
