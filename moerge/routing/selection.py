"""Local gates: linear gates over a request's candidates and the one way gate logits become weights."""

from __future__ import annotations

import dataclasses
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from moerge.routing.types import Candidates

__all__ = ["select_weights", "SelectionConfig", "standardize", "ExpertVectors", "LinearGate", "no_candidate_logits"]


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

    @property
    def plain(self) -> bool:
        """A top-k (or all-candidates) selection, without top-p or a null expert: what a layer's fused step and the
        Triton kernel do."""
        return self.top_p is None and self.null_logit is None


Combine = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def standardize(v: torch.Tensor) -> torch.Tensor:
    """Zero mean and unit variance over the last dimension (layer norm without affine), in float32."""
    return torch.nn.functional.layer_norm(v.float(), v.shape[-1:])


class ExpertVectors(Mapping):
    """Per module, one vector per expert (Arrow prototypes, PHATGOOSE gates, X-LoRA head rows); read-only it is a
    mapping module → {expert: vector} of the vectors in memory.

    An expert's vectors may be registered by a loader (:meth:`set_lazy`: read from the library when a request
    first has the expert among its candidates), so a large library's routing data is read for the experts in use
    only. Each expert's vector is finished once per module and form (as :meth:`gate_operands` asks: scaled,
    centred, its bias split off; the most recently used kept, up to :data:`TABLE_BYTES`), and a request's gate
    stacks its rows' candidates' vectors: one op per module whatever the set of candidates, and every step one
    batched matmul. Gates made over a request's experts together (``combine``) are stacked per set of experts
    instead (the same bound).
    """

    TABLE_BYTES = 256 << 20  # finished vectors, and combined tables, kept: least recently used dropped past it

    def __init__(self) -> None:
        self._by_module: dict[str, dict[str, torch.Tensor]] = {}  # module -> expert -> (d,)
        self._tables: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._lazy: dict[str, Callable[[Any], Mapping[str, torch.Tensor]]] = {}  # expert -> makes its vectors
        self._table_bytes = 0
        self._finished: OrderedDict[tuple, tuple[torch.Tensor, float]] = OrderedDict()  # see _finished_vector
        self._finished_of: dict[str, set[tuple]] = {}  # expert -> its keys in _finished
        self._finished_bytes = 0
        self._generation = 0  # counts changes of the vectors: a table built from older ones is not kept
        self._lock = threading.RLock()  # every change of the above; tables are built and loaders run outside it

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()

    def __getitem__(self, module: str) -> dict[str, torch.Tensor]:
        return self._by_module[module]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_module)

    def __len__(self) -> int:
        return len(self._by_module)

    def set(self, name: str, vectors: Mapping[str, torch.Tensor]) -> None:
        """Use ``vectors`` (module → (d,)) for expert ``name``, replacing what it had."""
        with self._lock:
            self._lazy.pop(name, None)
            self._put(name, vectors)

    def _put(self, name: str, vectors: Mapping[str, torch.Tensor]) -> None:
        self._generation += 1
        for d in self._by_module.values():
            d.pop(name, None)
        for m, v in vectors.items():
            self._by_module.setdefault(m, {})[name] = v
        self._drop_tables(name)  # after the vectors are in: no table is built from the old ones meanwhile

    def _drop_tables(self, name: str) -> None:
        for key in [k for k in self._tables if name in k[1]]:
            self._table_bytes -= self._nbytes(self._tables.pop(key))
        for key in self._finished_of.pop(name, ()):
            got = self._finished.pop(key, None)
            if got is not None:
                self._finished_bytes -= got[0].nbytes

    def _finished_vector(self, module: str, name: str, device: torch.device, scale: float, with_bias: bool,
                         center: bool) -> tuple[torch.Tensor, float] | None:
        """Expert ``name``'s gate vector for ``module`` as :meth:`gate_operands` gives it (``None``: it has none),
        and its bias; made once per expert and form (the most recently used kept, up to :data:`TABLE_BYTES`; the
        vector itself when there is nothing to do to it), so a request's gate only stacks its candidates'."""
        key = (module, name, str(device), scale, with_bias, center)
        with self._lock:
            got = self._finished.get(key)
            if got is not None:
                self._finished.move_to_end(key)
                return got
            v = self._by_module.get(module, {}).get(name)
            if v is None:
                return None
            w, b = (v[:-1], float(v[-1])) if with_bias else (v, 0.0)
            w = w.float()
            if center:
                w = w - w.mean()
            if scale != 1.0:
                w = w * scale
            got = (w.contiguous().to(device), b)
            self._finished[key] = got
            self._finished_of.setdefault(name, set()).add(key)
            self._finished_bytes += got[0].nbytes
            while self._finished_bytes > self.TABLE_BYTES and len(self._finished) > 1:
                old_key, old = self._finished.popitem(last=False)
                self._finished_bytes -= old[0].nbytes
                self._finished_of.get(old_key[1], set()).discard(old_key)
            return got

    @staticmethod
    def _nbytes(table: tuple[torch.Tensor, torch.Tensor]) -> int:
        return sum(t.numel() * t.element_size() for t in table)

    def set_lazy(self, name: str, load: Callable[[Any], Mapping[str, torch.Tensor]]) -> None:
        """Give expert ``name`` the vectors ``load(loaded)`` returns, made when a request first needs them
        (``loaded``: what :meth:`read` was given for the expert, e.g. its weights just read, else ``None``)."""
        with self._lock:
            self._put(name, {})
            self._lazy[name] = load

    def is_lazy(self, name: str) -> bool:
        """Whether expert ``name``'s vectors are registered but not read yet."""
        return name in self._lazy

    def unread(self, candidates: Candidates) -> list[str]:
        """The experts the rows of ``candidates`` name whose vectors are registered lazily and not read yet."""
        if not self._lazy:
            return []
        return [n for n in self._slots(candidates)[0] if n in self._lazy]

    def read(self, names: Iterable[str], loaded: Mapping[str, Any] | None = None) -> None:
        """Read the vectors of the experts of ``names`` that are registered lazily (a failure names the expert);
        ``loaded``: experts whose weights are at hand, given to their loaders."""
        if not self._lazy:  # on every gate of every request: most routers register nothing lazily
            return
        for n in names:
            load = self._lazy.get(n)
            if load is None:
                continue
            vectors = load((loaded or {}).get(n))  # outside the lock: a read may take a while
            with self._lock:
                if self._lazy.get(n) is load:  # not replaced, removed or read by another call meanwhile
                    del self._lazy[n]
                    self._put(n, vectors)

    def remove(self, name: str) -> None:
        with self._lock:
            self._lazy.pop(name, None)
            self._put(name, {})

    def _table(self, module: str, names: tuple[str, ...], device: torch.device, scale: float, with_bias: bool,
               center: bool, combine: Combine | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Vt (d, N + 1), bias (N + 1,))`` over the experts ``names`` and a last, empty column (the target of
        empty slots): the vectors as :meth:`gate_operands` describes them, and the bias (``-inf`` where an expert
        has no vector)."""
        key = (module, names, str(device), scale, with_bias, center, combine)
        with self._lock:
            got = self._tables.get(key)
            if got is not None:
                self._tables.move_to_end(key)
                return got
            by_expert = self._by_module[module]
            have = {n: by_expert[n] for n in names if n in by_expert}  # a snapshot of what it is built from
            dim, generation = next(iter(by_expert.values())).numel(), self._generation
        got = self._build_table(have, names, dim, device, scale, with_bias, center, combine)  # outside the lock
        with self._lock:
            if generation == self._generation and key not in self._tables:  # no vectors changed meanwhile
                self._tables[key] = got
                self._table_bytes += self._nbytes(got)
                while self._table_bytes > self.TABLE_BYTES and len(self._tables) > 1:
                    self._table_bytes -= self._nbytes(self._tables.popitem(last=False)[1])
        return got

    @staticmethod
    def _build_table(have: Mapping[str, torch.Tensor], names: tuple[str, ...], dim: int, device: torch.device,
                     scale: float, with_bias: bool, center: bool,
                     combine: Combine | None) -> tuple[torch.Tensor, torch.Tensor]:
        V = torch.stack([have.get(n, torch.zeros(dim)).float() for n in names] + [torch.zeros(dim)])  # (N+1, dim)
        ok = torch.tensor([n in have for n in names] + [False])
        if combine is not None:  # the experts' data made into gate vectors together
            w, b = combine(V[:-1], ok[:-1])
            w, b = torch.cat([w, torch.zeros(1, w.shape[1])]), torch.cat([b, torch.zeros(1)])
        else:
            b = V[:, -1] if with_bias else torch.zeros(len(V))
            w = V[:, :-1] if with_bias else V
        if center:
            w = w - w.mean(-1, keepdim=True)
        return (w * scale).contiguous().to(device).t(), b.masked_fill(~ok, float("-inf")).to(device)  # Vt by columns

    def _row_operands(self, module: str, candidates: Candidates, device: torch.device, scale: float, center: bool,
                      combine: Combine) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`gate_operands` with ``combine``: each row's vectors are made from its own candidates' data
        (rows with the same candidates share one table), so a row's gate never depends on the other rows."""
        groups = candidates.memo.get("row_sets")
        if groups is None:
            by_set: dict[tuple[int, ...], list[int]] = {}
            for r, row in enumerate(candidates.ids.tolist()):
                by_set.setdefault(tuple(sorted({i for i in row if i >= 0})), []).append(r)
            groups = []
            for filled, rows in by_set.items():
                column = {i: j for j, i in enumerate(filled)}
                cols = torch.tensor([[column.get(i, len(filled)) for i in candidates.ids[r].tolist()] for r in rows])
                groups.append((tuple(candidates.names[i] for i in filled), torch.tensor(rows), cols))
            candidates.memo["row_sets"] = groups
        B, K = candidates.ids.shape
        Vt = bias = None
        for names, rows, cols in groups:
            Vt_all, bias_all = self._table(module, names, device, scale, False, center, combine)  # (d, n+1), (n+1,)
            if Vt is None:
                Vt = torch.empty(B, Vt_all.shape[0], K, device=device)
                bias = torch.empty(B, 1, K, device=device)
            c = cols.to(device)
            Vt[rows.to(device)] = Vt_all[:, c].permute(1, 0, 2)
            bias[rows.to(device)] = bias_all[c].unsqueeze(1)
        return Vt, bias

    @staticmethod
    def _slots(candidates: Candidates) -> tuple[tuple[str, ...], torch.Tensor]:
        """The experts the rows of ``candidates`` name (in id order), and each slot's column among them ``(B, K)``
        (empty slots: the column after them); found once per request."""
        named = candidates.memo.get("slot_names")
        if named is None:
            filled = sorted(set(candidates.ids[candidates.ids >= 0].tolist()))
            column = torch.full((len(candidates.names) + 1,), len(filled), dtype=torch.long)
            column[filled] = torch.arange(len(filled))
            ids = candidates.ids
            named = candidates.memo["slot_names"] = (
                tuple(candidates.names[i] for i in filled), column[torch.where(ids >= 0, ids, len(candidates.names))])
        return named

    def gate_operands(self, module: str, candidates: Candidates, device: torch.device, scale: float = 1.0,
                      with_bias: bool = False, center: bool = False,
                      combine: Combine | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(Vt (B, d, K), bias (B, 1, K))`` for a gate ``x @ Vt + bias``: the candidates' vectors times ``scale``
        (``center``: less their mean, so ``x @ Vt`` is ``(x - mean(x)) @ V``), transposed for the batched matmul,
        and ``-inf`` in ``bias`` for empty slots and candidates without a vector (else ``0``, or with
        ``with_bias`` the vector's last element, which is then not part of ``Vt``). ``None`` when no candidate
        has a vector for ``module``. The vectors of candidates registered lazily are read first.

        ``combine`` (hashable, e.g. a frozen dataclass): the stored vectors are the experts' data, made into gate
        vectors for the experts the request names, together: ``combine(data (N, D), present (N,))`` gives their
        ``(vectors (N, d), bias (N,))`` (a gate whose vectors depend on the other candidates, such as a
        discriminant over a pooled covariance); ``with_bias`` is then ignored."""
        names, cols = self._slots(candidates)
        self.read(names)
        if not self._by_module.get(module):
            return None
        if combine is not None:
            return self._row_operands(module, candidates, device, scale, center, combine)
        got = [self._finished_vector(module, n, device, scale, with_bias, center) for n in names]
        dim = next((g[0].numel() for g in got if g is not None), None)
        if dim is None:
            return None
        memo = candidates.memo
        zero = memo.get(("zero", dim, device))
        if zero is None:
            zero = memo[("zero", dim, device)] = torch.zeros(dim, device=device)
        at = memo.get("slot_list")
        if at is None:
            at = memo["slot_list"] = cols.reshape(-1).tolist()
        vecs = [zero if g is None else g[0] for g in got] + [zero]  # the last: empty slots
        B, K = cols.shape
        Vt = torch.stack([vecs[c] for c in at]).view(B, K, dim).transpose(1, 2)  # (B, d, K), each vector contiguous
        bias = [float("-inf") if g is None else g[1] for g in got] + [float("-inf")]
        key = ("gate_bias", device, tuple(bias[c] for c in at))  # modules mostly share it: one tensor per request
        b = memo.get(key)
        if b is None:
            b = memo[key] = torch.tensor(key[2], device=device).view(B, 1, K)
        return Vt, b


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
            router's own bias, GLIDER's global log-prior).
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

