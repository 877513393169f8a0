"""Routing types: a request as the global stage sees it, its candidates per row, and the recorded routing.

Routing is two-stage (see ARCHITECTURE.md): a **global** stage (:meth:`Router.select`) runs once per request at
prefill and returns :class:`Candidates` — per row, ``K`` expert ids with scores and, for routers without a local
stage, sequence-level mixing weights; a **local** stage mixes them per token inside every patched module.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from moerge.errors import RoutingError

__all__ = ["Candidates", "candidates_from_mixes", "all_candidates", "RoutingRequest", "LayerInfo", "RowRouting",
           "explain_routing"]


@dataclass(frozen=True)
class Candidates:
    """Per-row candidate experts chosen by a global router (or given explicitly).

    Attributes:
        ids: ``(B, K)`` long, indices into ``names``; ``-1`` marks an empty slot (rows may use fewer than ``K``).
        scores: ``(B, K)`` float, the global stage's scores (similarities, or the explicit weights); ``0`` at empty
            slots.
        names: the expert names ``ids`` index into (the model's experts when routing was decided).
        weights: ``(B, K)`` float sequence-level mixing weights, used when the router has no local stage; ``0`` at
            empty slots. ``None`` when a local gate decides the weights per token.
    """

    ids: torch.Tensor
    scores: torch.Tensor
    names: tuple[str, ...]
    weights: torch.Tensor | None = None
    memo: dict[Any, Any] = field(default_factory=dict, init=False, repr=False, compare=False)
    """What is derived from these candidates once per request and reused at every step (gathered gate vectors,
    the rows repeated for beams); routers may store their own entries, keyed by something of theirs."""

    def __post_init__(self) -> None:
        if self.ids.dim() != 2 or self.scores.shape != self.ids.shape:
            raise RoutingError(f"Candidates: ids {tuple(self.ids.shape)} and scores {tuple(self.scores.shape)} must "
                               "both be (B, K)")
        if self.weights is not None and self.weights.shape != self.ids.shape:
            raise RoutingError(f"Candidates: weights {tuple(self.weights.shape)} must match ids {tuple(self.ids.shape)}")
        if self.ids.numel() and (int(self.ids.max()) >= len(self.names) or int(self.ids.min()) < -1):
            raise RoutingError("Candidates: ids out of range of names")
        for row in self.ids.tolist():
            used = [i for i in row if i >= 0]
            if len(used) != len(set(used)):
                raise RoutingError(f"Candidates: an expert appears twice in one row: {[self.names[i] for i in used]}")

    @property
    def batch_size(self) -> int:
        return int(self.ids.shape[0])

    @property
    def k(self) -> int:
        return int(self.ids.shape[1])

    def row_names(self, b: int) -> list[str]:
        return [self.names[i] for i in self.ids[b].tolist() if i >= 0]

    def used_names(self) -> list[str]:
        """The experts some row uses, in id order: every filled slot, except those with a sequence weight of 0
        (found once per request: kept in :attr:`memo`)."""
        if "used_names" in self.memo:
            return list(self.memo["used_names"])
        used = self.ids >= 0
        if self.weights is not None:
            used = used & (self.weights != 0)
        self.memo["used_names"] = tuple(self.names[i] for i in sorted(set(self.ids[used].tolist())))
        return list(self.memo["used_names"])

    def without(self, names: set[str]) -> Candidates:
        """These candidates with ``names`` dropped from every row (``-1`` slots); sequence weights renormalised."""
        unknown = sorted(names - set(self.names))
        if unknown:
            raise RoutingError(f"cannot exclude unknown experts {unknown[:5]}", expert=unknown[0])
        drop = torch.tensor([[i >= 0 and self.names[i] in names for i in row] for row in self.ids.tolist()],
                            dtype=torch.bool).reshape(self.ids.shape)
        weights = None
        if self.weights is not None:
            weights = self.weights.masked_fill(drop, 0.0)
            total = weights.sum(-1, keepdim=True)
            weights = torch.where(total > 0, weights / total.clamp_min(1e-12), weights)
        return Candidates(ids=self.ids.masked_fill(drop, -1), scores=self.scores.masked_fill(drop, 0.0),
                          names=self.names, weights=weights)

    def repeat_rows(self, n: int) -> Candidates:
        """Each row repeated ``n`` times in place (``repeat_interleave``), as generate does for beams/samples."""
        if n == 1:
            return self
        key = ("repeat_rows", n)
        if key not in self.memo:
            rep = lambda t: None if t is None else t.repeat_interleave(n, dim=0)  # noqa: E731
            self.memo[key] = dataclasses.replace(self, ids=rep(self.ids), scores=rep(self.scores),
                                                 weights=rep(self.weights))
        return self.memo[key]


def candidates_from_mixes(
    mixes: Sequence[Mapping[str, float]], names: Sequence[str], batch_size: int | None = None
) -> Candidates:
    """Explicit per-row mixes (``[{"sql": 1.0}, {"math": .5, "sql": .5}]``) as :class:`Candidates`.

    A single mix is used for every row when ``batch_size`` is given. Weights are used as given (not normalised);
    an empty mix means "no expert" for that row (the base model's output).
    """
    if isinstance(mixes, Mapping):
        mixes = [mixes]
    mixes = list(mixes)
    if batch_size is not None and len(mixes) == 1 and batch_size != 1:
        mixes = mixes * batch_size
    if batch_size is not None and len(mixes) != batch_size:
        raise RoutingError(f"experts= gives {len(mixes)} mixes for a batch of {batch_size} rows; give one mix per row "
                           "or a single mix for all rows")
    index = {n: i for i, n in enumerate(names)}
    k = max((len(m) for m in mixes), default=0)
    ids = torch.full((len(mixes), max(k, 1)), -1, dtype=torch.long)
    w = torch.zeros((len(mixes), max(k, 1)), dtype=torch.float32)
    for b, mix in enumerate(mixes):
        if not isinstance(mix, Mapping):
            raise RoutingError(f"row {b}: a mix must be a dict of expert name → weight, got {type(mix).__name__}")
        for j, (name, weight) in enumerate(mix.items()):
            if name not in index:
                raise RoutingError(f"row {b}: unknown expert {name!r}; known: {sorted(index)[:10]}", expert=str(name))
            try:
                wf = float(weight)
            except (TypeError, ValueError):
                raise RoutingError(f"row {b}: weight {weight!r} of expert {name!r} is not a number",
                                   expert=str(name)) from None
            if not torch.isfinite(torch.tensor(wf)):
                raise RoutingError(f"row {b}: weight {weight!r} of expert {name!r} is not finite", expert=str(name))
            ids[b, j] = index[name]
            w[b, j] = wf
    return Candidates(ids=ids, scores=w.clone(), names=tuple(names), weights=w)


def all_candidates(request: RoutingRequest) -> Candidates:
    """Every expert of the model as a candidate of every row, for local gates without a global stage."""
    n, b = len(request.names), request.batch_size
    ids = torch.arange(n).expand(b, n).clone() if n else torch.full((b, 1), -1)  # (B, N)
    return Candidates(ids=ids, scores=torch.zeros(ids.shape), names=request.names, weights=None)


@dataclass(frozen=True)
class RoutingRequest:
    """What a global router sees of one batch at prefill.

    Attributes:
        input_ids: ``(B, T)`` prompt token ids (left or right padded).
        attention_mask: ``(B, T)`` or ``None``.
        names: the model's expert names, in id order.
        experts: explicit per-row mixes passed to the call (``experts=``), if any.
        prompts: the prompts as text, when the model has a tokenizer to decode them.
    """

    input_ids: torch.Tensor | None
    attention_mask: torch.Tensor | None
    names: tuple[str, ...]
    experts: Sequence[Mapping[str, float]] | None = None
    prompts: list[str] | None = None

    @property
    def batch_size(self) -> int:
        if self.input_ids is not None:
            return int(self.input_ids.shape[0])
        if self.experts is not None:
            return len(self.experts)
        raise RoutingError("cannot tell the batch size: no input_ids and no experts=")


@dataclass(frozen=True)
class LayerInfo:
    """Which patched module a local gate is called for."""

    index: int
    name: str
    in_features: int
    out_features: int


@dataclass
class RowRouting:
    """The routing of one row, as recorded in :attr:`MoErgeModel.last_routing`.

    Attributes:
        experts: expert → weight. Sequence-level weights, or, for a local gate, the mean gate weight over
            tokens and patched modules.
        candidates: the row's candidate experts, in slot order.
        scores: the global stage's score of each candidate.
        layer_usage: for local gates, module name → expert → mean weight over the row's tokens.
    """

    experts: dict[str, float]
    candidates: list[str]
    scores: list[float]
    layer_usage: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The row's routing as plain JSON: experts → weight, candidates → score, and the per-layer usage."""
        return {"experts": self.experts, "candidates": dict(zip(self.candidates, self.scores)),
                "layer_usage": self.layer_usage}

    def top(self) -> str | None:
        return max(self.experts, key=lambda e: self.experts[e]) if self.experts else None



def explain_routing(routing: Sequence[RowRouting] | None) -> str:
    """A readable account of a call's routing: per row, the experts and their weights, the candidates' scores when
    they differ from the weights, and the three most used experts of each module."""
    if not routing:
        return "no routed call yet"
    lines = []
    for b, row in enumerate(routing):
        mix = ", ".join(f"{n} {w:.3f}" for n, w in sorted(row.experts.items(), key=lambda t: -t[1]))
        lines.append(f"row {b}: {mix or '(no expert: base model)'}")
        if row.scores and any(s != row.experts.get(n) for n, s in zip(row.candidates, row.scores)):
            cand = ", ".join(f"{n} {s:.3f}" for n, s in zip(row.candidates, row.scores))
            lines.append(f"  candidates (score): {cand}")
        for mod, usage in row.layer_usage.items():
            top = ", ".join(f"{n} {w:.2f}" for n, w in sorted(usage.items(), key=lambda t: -t[1])[:3])
            lines.append(f"  {mod}: {top}")
    return "\n".join(lines)
