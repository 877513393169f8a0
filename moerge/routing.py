"""Routing types, the router interface and the router registry.

Routing is two-stage (see ARCHITECTURE.md):

* a **global** stage, :meth:`Router.select`, runs once per request at prefill and returns
  :class:`Candidates` — per row, ``K`` expert ids with scores and (for routers without a local stage)
  sequence-level mixing weights;
* a **local** stage, :meth:`Router.gate`, runs inside every patched module for every token and returns mixing
  weights ``(B, T, K)`` over that row's candidates.

The model owns a :class:`RoutingContext`; each forward or generate call activates a :class:`RoutingState` on it
(thread-local, so concurrent calls in different threads do not see each other's routing), and the patched layers
read it from there.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from moerge.errors import RoutingError

if TYPE_CHECKING:  # pragma: no cover
    from moerge.adapters.expert import Expert
    from moerge.layer import GatheredLayer
    from moerge.model import MoErgeModel

__all__ = [
    "Candidates", "RoutingRequest", "LayerInfo", "RowRouting", "RoutingState", "RoutingContext", "Router",
    "register_router", "build_router", "list_routers", "router_class", "candidates_from_mixes", "select_weights",
    "SelectionConfig", "all_candidates", "standardize", "ExpertVectors", "no_candidate_logits", "LinearGate",
]


# ----------------------------------------------------------------------------------------------------------------
# Routing outputs
# ----------------------------------------------------------------------------------------------------------------
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


def select_weights(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None,
                   null_logit: float | None = None) -> torch.Tensor:
    """Mixing weights from gate logits ``(..., K)`` (``-inf`` marks candidates that cannot be chosen).

    * ``top_k``: at most this many experts per token (``None``: all);
    * ``top_p``: dynamic k ("harder inputs use more experts", Huang et al. 2024): per token, the fewest experts
      whose softmax probability sums to at least ``top_p`` (still at most ``top_k``);
    * ``null_logit``: a null expert (AdaMoE, Zeng et al. 2024) competes with this fixed logit; when it is chosen
      its share of the weight goes to no expert (the base model), so a token may use fewer experts or none.

    The chosen experts' weights are their softmax renormalised over the chosen set (including the null expert, if
    chosen); the others get 0. Rows with no possible candidate get all zeros. Returns ``(..., K)``.
    """
    k_all = logits.shape[-1]
    if top_p is None and null_logit is None and logits.dtype == torch.float32:
        # the common cases, in as few ops as a decode step allows: softmax over the top k or over all (−inf
        # entries get 0, a token with no finite logit gets all zeros)
        if top_k is None or top_k >= k_all:
            return torch.softmax(logits, dim=-1).nan_to_num_(0.0)
        if top_k > 0:
            top_v, top_i = logits.topk(top_k, dim=-1)  # (..., k)
            return torch.zeros_like(logits).scatter_(-1, top_i, torch.softmax(top_v, dim=-1).nan_to_num_(0.0))
    if k_all == 0:
        return logits.clone()
    z = logits.float()
    if null_logit is not None:
        z = torch.cat([z, torch.full_like(z[..., :1], float(null_logit))], dim=-1)  # (..., K+1)
    k = z.shape[-1] if top_k is None else min(int(top_k) + (null_logit is not None), z.shape[-1])
    top_v, top_i = z.topk(k, dim=-1)  # (..., k), best first
    keep = torch.isfinite(top_v)
    if top_k is not None and null_logit is not None:  # the null expert does not count against top_k
        real_rank = (top_i < k_all).long().cumsum(-1)
        keep &= (real_rank <= top_k) | (top_i == k_all)
    if top_p is not None:
        p = torch.softmax(top_v.masked_fill(~keep, float("-inf")), dim=-1)
        p = torch.nan_to_num(p, nan=0.0)
        before = p.cumsum(-1) - p  # probability mass of the better experts
        keep &= before < top_p
    w = torch.softmax(top_v.masked_fill(~keep, float("-inf")), dim=-1)
    w = torch.nan_to_num(w, nan=0.0)  # (..., k); rows with nothing kept are all -inf → 0
    out = torch.zeros_like(z).scatter(-1, top_i, w)
    return out[..., :k_all].to(logits.dtype if logits.is_floating_point() else torch.float32)


@dataclass
class SelectionConfig:
    """How a local gate turns its logits into weights (see :func:`select_weights`); mixed into routers' configs."""

    top_k: int | None = field(default=2, metadata={"help": "experts mixed per token and module (None: all)"})
    top_p: float | None = field(default=None, metadata={
        "help": "dynamic k: the fewest experts whose probability reaches top_p (None: always top_k)"})
    null_logit: float | None = field(default=None, metadata={
        "help": "logit of a null expert (AdaMoE): when chosen, its weight goes to the base (None: no null expert)"})

    def _check_selection(self) -> None:
        if self.top_k is not None and (not isinstance(self.top_k, int) or isinstance(self.top_k, bool)
                                       or self.top_k <= 0):
            raise ValueError(f"top_k must be a positive integer or None, got {self.top_k!r}")
        if self.top_p is not None and not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1] or None, got {self.top_p!r}")
        if self.null_logit is not None and not (isinstance(self.null_logit, (int, float))
                                                and math.isfinite(self.null_logit)):
            raise ValueError(f"null_logit must be a finite number or None, got {self.null_logit!r}")

    def __post_init__(self) -> None:
        self._check_selection()

    def select(self, logits: torch.Tensor) -> torch.Tensor:
        return select_weights(logits, self.top_k, self.top_p, self.null_logit)


def standardize(v: torch.Tensor) -> torch.Tensor:
    """Zero mean and unit variance over the last dimension (layer norm without affine), in float32."""
    return torch.nn.functional.layer_norm(v.float(), v.shape[-1:])


class ExpertVectors(Mapping):
    """Per module, one vector per expert (Arrow prototypes, PHATGOOSE gates, X-LoRA head rows); read-only it is a
    mapping module → {expert: vector}.

    The vectors of one module are stacked in the model's expert order once per ``(module, names, device)`` and form
    (finished as :meth:`gate_operands` asks) and then gathered for each row's candidates, so a request's gate costs
    two index operations per module and every step one batched matmul.
    """

    def __init__(self) -> None:
        self._by_module: dict[str, dict[str, torch.Tensor]] = {}  # module -> expert -> (d,)
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def __getitem__(self, module: str) -> dict[str, torch.Tensor]:
        return self._by_module[module]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_module)

    def __len__(self) -> int:
        return len(self._by_module)

    def set(self, name: str, vectors: Mapping[str, torch.Tensor]) -> None:
        """Use ``vectors`` (module → (d,)) for expert ``name``, replacing what it had."""
        self.remove(name)
        for m, v in vectors.items():
            self._by_module.setdefault(m, {})[name] = v
        self._tables.clear()

    def remove(self, name: str) -> None:
        for d in self._by_module.values():
            d.pop(name, None)
        self._tables.clear()

    def _table(self, module: str, names: tuple[str, ...], device: torch.device, scale: float, with_bias: bool,
               center: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Vt (d, N + 1), bias (N + 1,))`` over the model's experts ``names`` and a last, empty column (the
        target of empty slots): the vectors as :meth:`gate_operands` describes them, and the bias (``-inf`` where
        an expert has no vector)."""
        key = (module, names, str(device), scale, with_bias, center)
        got = self._tables.get(key)
        if got is None:
            have = self._by_module[module]
            dim = next(iter(have.values())).numel()
            V = torch.stack([have.get(n, torch.zeros(dim)).float() for n in names] + [torch.zeros(dim)])  # (N+1, dim)
            ok = torch.tensor([n in have for n in names] + [False])
            b = V[:, -1] if with_bias else torch.zeros(len(V))
            w = V[:, :-1] if with_bias else V
            if center:
                w = w - w.mean(-1, keepdim=True)
            got = ((w * scale).t().contiguous().to(device), b.masked_fill(~ok, float("-inf")).to(device))
            self._tables[key] = got
        return got

    def gate_operands(self, module: str, candidates: Candidates, device: torch.device, scale: float = 1.0,
                      with_bias: bool = False, center: bool = False) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(Vt (B, d, K), bias (B, 1, K))`` for a gate ``x @ Vt + bias``: the candidates' vectors times ``scale``
        (``center``: less their mean, so ``x @ Vt`` is ``(x - mean(x)) @ V``), transposed for the batched matmul,
        and ``-inf`` in ``bias`` for empty slots and candidates without a vector (else ``0``, or with
        ``with_bias`` the vector's last element, which is then not part of ``Vt``). ``None`` when no expert has a
        vector for ``module``."""
        if not self._by_module.get(module):
            return None
        Vt_all, bias_all = self._table(module, candidates.names, device, scale, with_bias, center)
        ids = candidates.ids.to(device)  # (B, K)
        safe = torch.where(ids >= 0, ids, len(candidates.names)).reshape(-1)  # empty slots → the empty column
        B, K = ids.shape
        Vt = Vt_all.index_select(1, safe).view(-1, B, K).transpose(0, 1)  # (B, d, K), strided
        return Vt, bias_all.index_select(0, safe).view(B, 1, K)


@dataclass(frozen=True)
class LinearGate:
    """A local gate whose logits are linear in the module input ``x (B, T, d)`` up to a per-token finish::

        logits = finish(x @ Vt) + bias

    with ``finish`` one of ``"none"``, ``"abs"`` (Arrow's ``|⟨p, x⟩|``) and ``"standardized"`` (``x @ Vt / σ(x)``
    with ``σ(x)² = var(x) + 1e-5``; with centred vectors that is ``layer_norm(x) @ V``, PHATGOOSE's and X-LoRA's
    logits). Made once per request and module (:meth:`Router.linear_gate`); because ``x @ Vt`` is a matmul of the
    same ``x`` the experts' A factors multiply, a patched layer computes both in one matmul.

    Attributes:
        Vt: ``(B, d, K)`` float32, the candidates' vectors (times any temperature), transposed.
        bias: ``(B, 1, K)`` float32: ``-inf`` for candidates without a vector, plus any per-request term (a
            router's own bias, GLIDER's global score).
        finish: how ``x @ Vt`` becomes a logit.
    """

    Vt: torch.Tensor
    bias: torch.Tensor
    finish: str = "none"

    def __post_init__(self) -> None:
        if self.finish not in ("none", "abs", "standardized"):
            raise ValueError(f"LinearGate: unknown finish {self.finish!r}")

    @property
    def k(self) -> int:
        return int(self.Vt.shape[-1])

    def logits(self, x: torch.Tensor, xv: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
        """``(B, T, K)`` float32 logits from ``x`` and ``xv = x @ Vt`` (computed alone or as part of a larger
        matmul); ``inplace``: ``xv`` may be written over (a step's own matmul output)."""
        if xv.dtype != torch.float32:
            xv, inplace = xv.float(), True
        if self.finish == "abs":
            xv, inplace = (xv.abs_() if inplace else xv.abs()), True
        elif self.finish == "standardized":
            xf = x if x.dtype == torch.float32 else x.float()
            s = torch.rsqrt(xf.var(-1, correction=0, keepdim=True).add_(1e-5))  # 1 / σ(x), (B, T, 1)
            xv, inplace = (xv.mul_(s) if inplace else xv * s), True
        return xv.add_(self.bias) if inplace else xv + self.bias

    def with_bias(self, extra: torch.Tensor) -> LinearGate:
        """This gate with ``extra`` ``(B, 1, K)`` added to its bias."""
        return dataclasses.replace(self, bias=self.bias + extra)

    def repeat_rows(self, n: int) -> LinearGate:
        return self if n == 1 else dataclasses.replace(
            self, Vt=self.Vt.repeat_interleave(n, dim=0), bias=self.bias.repeat_interleave(n, dim=0))


def no_candidate_logits(x: torch.Tensor, candidates: Candidates) -> torch.Tensor:
    """``(B, T, K)`` of ``-inf``: the logits of a module that none of the candidates targets."""
    return torch.full((*x.shape[:2], candidates.k), float("-inf"), device=x.device)


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


# ----------------------------------------------------------------------------------------------------------------
# Per-call routing state and the model's context
# ----------------------------------------------------------------------------------------------------------------
class RoutingState:
    """Routing of one forward/generate call: the candidates, the router, and each module's gathered factors.

    Factors are gathered from every patched module once, when the state is built (at prefill), and reused by
    every decode step; later changes to the model's experts do not affect a call already under way.
    """

    def __init__(self, candidates: Candidates, router: Router | None, gathered: dict[int, GatheredLayer | None],
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

    def record(self, module: str, weights: torch.Tensor) -> None:
        """Keep a local gate's ``(B, T, K)`` weights for :attr:`RowRouting.layer_usage`. Kept as they are (no op
        per step); summed when there are many, and by :meth:`trace`."""
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
        for w in map(self._per_row, kept):
            s = w.sum(1)  # (B, K)
            total = s if total is None else total + s
            self.usage_tokens[module] = self.usage_tokens.get(module, 0) + int(w.shape[1])
        self.usage[module] = total

    def trace(self) -> list[RowRouting]:
        c = self.candidates
        kept = dict(self._weights) if self.keep_tokens else None
        for module in list(self._weights):
            self._fold(module)
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


# ----------------------------------------------------------------------------------------------------------------
# Router interface and registry
# ----------------------------------------------------------------------------------------------------------------
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
        self.model: MoErgeModel | None = None

    def attach(self, model: MoErgeModel) -> None:
        """Bind to ``model``; called by :class:`MoErgeModel` before any routing."""
        self.model = model

    def on_add_expert(self, expert: Expert) -> None:
        """Compute and store the routing data ``expert`` needs. Called again for a name it already has (an expert
        being replaced), it replaces that name's data. Must not change other experts' routing data; on error it
        must leave its state as it was."""

    def on_remove_expert(self, name: str) -> None:
        """Forget ``name``'s routing data."""

    def persist(self, library: Any) -> None:
        """Store in ``library`` the routing data computed since the last call (for experts it holds), so the next
        load reuses it. Called by :class:`MoErgeModel` after experts are loaded, added or removed."""

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


def _discover() -> None:
    import moerge.routers  # noqa: F401  (imports every router module, which registers itself)


def router_class(name: str) -> type[Router]:
    _discover()
    if name not in _REGISTRY:
        raise RoutingError(f"unknown router {name!r}; registered routers: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def list_routers() -> list[str]:
    """Names of every registered router."""
    _discover()
    return sorted(_REGISTRY)


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
