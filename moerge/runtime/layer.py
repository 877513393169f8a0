"""The patched linear layer and the stores of expert factors it mixes.

``ExpertLinear`` wraps a base ``nn.Linear`` (or GPT-2 ``Conv1D``) as ``base_layer`` and adds, for each row ``b``
and token ``t``::

    y[b, t] = base_layer(x[b, t]) + Σ_k w[b, t, k] · s_k · B_k A_k x[b, t]     (LoRA candidates)
                                  + Σ_k w[b, t, k] · (ΔW_k x[b, t] + Δb_k)      (dense candidates)

Every expert's factors for this module are held once, concatenated in a :class:`LayerBank`
(``A_all (R_total, in)``, ``Bt_all (R_total, out)``). At prefill, :meth:`LayerBank.gather` copies each row's
candidates' factors side by side into a :class:`GatheredLayer` (``A (B, R, in)``, ``Bt (B, R, out)``, ``R`` the
largest summed rank of a row, rows padded with zeros); every decode step then costs two batched matmuls,
whatever the library's size. With sequence-level weights the weights and scales are folded into ``Bt`` at
gather time; with a local gate they are applied per token between the two matmuls ("gate and shrink").
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.module import _global_forward_hooks

from moerge.adapters.expert import DeltaWeights, LoRAWeights, ModuleWeights
from moerge.core.fingerprint import linear_shape
from moerge.routing import Candidates, LayerInfo, LinearGate, RoutingContext, SelectionConfig
from moerge.runtime import kernels

__all__ = ["ExpertLinear", "LayerBank", "GatheredLayer"]


_VECTOR_GATHER_MIN = 64  # candidate slots (B·K) from which the vectorised gather beats the row loop


@dataclass(frozen=True)
class _LoRASlot:
    start: int
    rank: int
    scale: float


class _Layout:
    """Where each LoRA expert's rows sit in a bank (name → start, rank, scale), interned: the banks of modules
    that hold the same experts with the same ranks share one object, so a request finds its factor columns once for
    all of them (:meth:`LayerBank.columns`) instead of once per module."""

    __slots__ = ("slots", "_hash", "__weakref__")
    _interned: weakref.WeakValueDictionary = weakref.WeakValueDictionary()

    def __init__(self, slots: tuple) -> None:
        self.slots = slots
        self._hash = hash(slots)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return self is other or (isinstance(other, _Layout) and self._hash == other._hash and self.slots == other.slots)

    @classmethod
    def of(cls, lora: dict[str, _LoRASlot]) -> _Layout:
        slots = tuple((n, s.start, s.rank, s.scale) for n, s in lora.items())
        layout = cls._interned.get(slots)
        if layout is None:
            layout = cls._interned.setdefault(slots, cls(slots))
        return layout


class _Storage:
    """The tensors a chain of banks appends into: rows ``[0, used)`` hold data, the rest is spare capacity
    (``torch.empty``: pages untouched until written). Banks are views of its first rows; only the bank that ends
    at ``used`` (the newest) may append in place, so older banks, and requests that gathered from them, never see
    a row change."""

    __slots__ = ("a", "bt", "used")

    def __init__(self, a: torch.Tensor, bt: torch.Tensor, used: int) -> None:
        self.a, self.bt, self.used = a, bt, used


_GROWTH = 1.5  # capacity factor when a bank's storage must grow


@dataclass(frozen=True)
class LayerBank:
    """An immutable store of every expert's weights for one module. Changes build a new bank, so a request that
    already gathered from the old one is unaffected. Adding experts appends their rows to spare capacity of the
    same storage when there is some (adding one expert to a large library copies nothing else); removing them
    compacts into new tensors.

    Attributes:
        A_all: ``(R_total + 1, in)`` LoRA A factors of all experts, stacked along the rank after a first row of
            zeros (row 0, the target of padding indices).
        Bt_all: ``(R_total + 1, out)`` the matching B factors, transposed; row 0 zeros.
        lora: expert name → its rows in ``A_all``/``Bt_all`` and its scale.
        dense: expert name → (ΔW ``(out, in)``, Δb ``(out,)`` or None).
    """

    A_all: torch.Tensor
    Bt_all: torch.Tensor
    lora: dict[str, _LoRASlot] = field(default_factory=dict)
    dense: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)
    storage: _Storage | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layout", _Layout.of(self.lora))

    @classmethod
    def empty(cls, in_features: int, out_features: int, device: torch.device, dtype: torch.dtype) -> LayerBank:
        return cls(torch.zeros(1, in_features, device=device, dtype=dtype),
                   torch.zeros(1, out_features, device=device, dtype=dtype))

    @property
    def names(self) -> list[str]:
        return list(self.lora) + list(self.dense)

    def __contains__(self, name: str) -> bool:
        return name in self.lora or name in self.dense

    def __len__(self) -> int:
        return len(self.lora) + len(self.dense)

    def _room_for(self, rows: int) -> _Storage:
        """A storage holding this bank's rows with room for ``rows`` more after them: this bank's own, when it is
        the newest of its storage and has the room, else a new one (capacity × :data:`_GROWTH`)."""
        n = self.A_all.shape[0]
        st = self.storage
        if st is not None and st.used == n and st.a.shape[0] >= n + rows:
            return st
        cap = max(n + rows, int(_GROWTH * (n + rows))) if self.lora else n + rows
        a = torch.empty(cap, self.A_all.shape[1], device=self.A_all.device, dtype=self.A_all.dtype)
        bt = torch.empty(cap, self.Bt_all.shape[1], device=self.A_all.device, dtype=self.A_all.dtype)
        a[:n].copy_(self.A_all)
        bt[:n].copy_(self.Bt_all)
        return _Storage(a, bt, n)

    def with_experts(self, weights: dict[str, ModuleWeights]) -> LayerBank:
        """A new bank with ``weights`` (expert name → this module's weights) added."""
        dtype, device = self.A_all.dtype, self.A_all.device
        lora, dense = dict(self.lora), dict(self.dense)
        for name, w in weights.items():
            if name in self:
                raise ValueError(f"expert {name!r} is already in this layer")
            if isinstance(w, LoRAWeights) and (tuple(w.A.shape) != (w.rank, self.A_all.shape[1])
                                               or tuple(w.B.shape) != (self.Bt_all.shape[1], w.rank)):
                raise ValueError(f"expert {name!r}: factors {tuple(w.A.shape)} and {tuple(w.B.shape)} do not fit "
                                 f"this layer ({self.A_all.shape[1]} → {self.Bt_all.shape[1]})")
        new = {n: w for n, w in weights.items() if isinstance(w, LoRAWeights)}
        start = self.A_all.shape[0]
        st = self._room_for(sum(w.rank for w in new.values())) if new else self.storage
        for name, w in new.items():
            st.a[start : start + w.rank].copy_(w.A)  # (r, in)
            st.bt[start : start + w.rank].copy_(w.B.t())  # (r, out)
            lora[name] = _LoRASlot(start, w.rank, float(w.scale))
            start += w.rank
        for name, w in weights.items():
            if name not in new:
                dense[name] = (w.delta.to(device=device, dtype=dtype),
                               None if w.bias is None else w.bias.to(device=device, dtype=dtype))
        if not new:
            return LayerBank(self.A_all, self.Bt_all, lora, dense, self.storage)
        st.used = start
        return LayerBank(st.a[:start], st.bt[:start], lora, dense, st)

    def without(self, names: set[str]) -> LayerBank:
        """A new bank without the experts in ``names`` (its rows compacted into new tensors)."""
        keep = [(n, s) for n, s in self.lora.items() if n not in names]
        rows = [torch.arange(s.start, s.start + s.rank) for _, s in keep]
        idx = torch.cat([torch.zeros(1, dtype=torch.long), *rows]).to(self.A_all.device)
        lora, start = {}, 1
        for n, s in keep:
            lora[n] = _LoRASlot(start, s.rank, s.scale)
            start += s.rank
        dense = {n: v for n, v in self.dense.items() if n not in names}
        return LayerBank(self.A_all.index_select(0, idx), self.Bt_all.index_select(0, idx), lora, dense)

    def apply(self, fn) -> LayerBank:
        """A new bank with ``fn`` applied to every tensor (how ``module.to(...)`` reaches the bank)."""
        opt = lambda t: None if t is None else fn(t)  # noqa: E731
        return LayerBank(fn(self.A_all), fn(self.Bt_all), dict(self.lora),
                         {n: (fn(d), opt(b)) for n, (d, b) in self.dense.items()})

    def delta_weight(self, name: str) -> torch.Tensor:
        """Expert ``name``'s dense update ``(out, in)`` for this module (zeros if it does not target it)."""
        if name in self.lora:
            s = self.lora[name]
            a = self.A_all[s.start : s.start + s.rank].float()  # (r, in)
            bt = self.Bt_all[s.start : s.start + s.rank].float()  # (r, out)
            return (bt.t() @ a) * s.scale  # (out, in)
        if name in self.dense:
            return self.dense[name][0].float()
        return torch.zeros(self.Bt_all.shape[1], self.A_all.shape[1], device=self.A_all.device)

    def weights_of(self, name: str) -> ModuleWeights | None:
        """Expert ``name``'s weights for this module as stored (``None`` if it does not target the module)."""
        if name in self.lora:
            s = self.lora[name]
            return LoRAWeights(self.A_all[s.start : s.start + s.rank].clone(),
                               self.Bt_all[s.start : s.start + s.rank].t().contiguous(), s.scale)
        if name in self.dense:
            d, b = self.dense[name]
            return DeltaWeights(d.clone(), None if b is None else b.clone())
        return None

    def delta_bias(self, name: str) -> torch.Tensor | None:
        return self.dense[name][1] if name in self.dense else None

    def _slots_for(self, names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(start, rank, scale)`` ``(N,)`` per name of ``names`` (rank 0 for experts without this module); the
        last computed is kept, since a model's name tuple is the same object until its experts change."""
        cached = self.__dict__.get("_slot_cache")
        if cached is not None and cached[0] is names:
            return cached[1]
        start = torch.tensor([self.lora[n].start if n in self.lora else 0 for n in names], dtype=torch.long)
        rank = torch.tensor([self.lora[n].rank if n in self.lora else 0 for n in names], dtype=torch.long)
        scale = torch.tensor([self.lora[n].scale if n in self.lora else 0.0 for n in names], dtype=torch.float32)
        dev = self.A_all.device
        out = (start.to(dev), rank.to(dev), scale.to(dev))
        object.__setattr__(self, "_slot_cache", (names, out))
        return out

    def _gather_lora_columns(self, candidates: Candidates) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Vectorised: per row, the bank rows of its candidates' factors in candidate order, ``idx (B, R)`` (the
        zero row at padding), their candidate slot ``k_idx (B, R)`` and LoRA scale ``(B, R)`` (0 at padding)."""
        start, rank, scale = self._slots_for(candidates.names)
        ids = candidates.ids.to(start.device)  # (B, K)
        safe = ids.clamp(min=0)
        r = rank[safe] * (ids >= 0)  # (B, K)
        if candidates.weights is not None:
            r = r * (candidates.weights.to(r.device) != 0)  # zero-weight candidates are skipped
        B, K = ids.shape
        width = int(r.max()) if r.numel() else 0
        if width == 0:
            z = torch.zeros(B, 0, dtype=torch.long, device=start.device)
            return z, z, torch.zeros(B, 0, device=start.device), 0
        off = torch.arange(width, device=start.device)  # (w,)
        valid = (off < r.unsqueeze(-1)).reshape(B, K * width)  # (B, K*w)
        rows = (start[safe].unsqueeze(-1) + off).reshape(B, K * width)  # (B, K*w)
        ks = torch.arange(K, device=start.device).repeat_interleave(width).expand(B, -1)  # (B, K*w)
        sc = scale[safe].unsqueeze(-1).expand(B, K, width).reshape(B, K * width)  # (B, K*w)
        R = int(valid.sum(1).max())
        order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)[:, :R]  # valid columns first, in order
        keep = valid.gather(1, order)  # (B, R)
        idx = torch.where(keep, rows.gather(1, order), torch.zeros_like(order))  # padding: the zero row 0
        k_idx = torch.where(keep, ks.gather(1, order), torch.zeros_like(order))
        col_scale = torch.where(keep, sc.gather(1, order), torch.zeros(order.shape, device=start.device))
        return idx, k_idx, col_scale, R

    def _loop_lora_columns(self, candidates: Candidates
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, dict[str, list[tuple[int, int]]]]:
        """Row by row: the same columns as :meth:`_gather_lora_columns`, plus the dense experts each row uses
        (expert → its ``(row, slot)`` pairs)."""
        ids = candidates.ids.tolist()
        names = candidates.names
        seq_w = candidates.weights
        zero = (seq_w == 0).tolist() if seq_w is not None else None  # zero-weight candidates are skipped
        cols: list[list[int]] = []
        col_k: list[list[int]] = []
        col_scale: list[list[float]] = []
        dense_uses: dict[str, list[tuple[int, int]]] = {}
        for b, row in enumerate(ids):
            c, ck, cs = [], [], []
            for k, i in enumerate(row):
                if i < 0 or (zero is not None and zero[b][k]):
                    continue
                name = names[i]
                slot = self.lora.get(name)
                if slot is not None:
                    c.extend(range(slot.start, slot.start + slot.rank))
                    ck.extend([k] * slot.rank)
                    cs.extend([slot.scale] * slot.rank)
                elif name in self.dense:
                    dense_uses.setdefault(name, []).append((b, k))
            cols.append(c)
            col_k.append(ck)
            col_scale.append(cs)
        R = max((len(c) for c in cols), default=0)
        device = self.A_all.device
        idx = torch.tensor([c + [0] * (R - len(c)) for c in cols], dtype=torch.long, device=device)  # (B, R), row 0: zeros
        k_idx = torch.tensor([k + [0] * (R - len(k)) for k in col_k], dtype=torch.long, device=device)  # (B, R)
        scale = torch.tensor([s + [0.0] * (R - len(s)) for s in col_scale], device=device, dtype=torch.float32)
        return idx, k_idx, scale, R, dense_uses

    def columns(self, candidates: Candidates, dtype: torch.dtype, *, loop: bool = False) -> tuple:
        """``(idx, k_idx, scale, R, col_w, E)`` of a bank of LoRA experts for ``candidates`` (see
        :meth:`_loop_lora_columns` and :meth:`_column_weights`), found once per request for every bank of the same
        layout (kept in ``candidates.memo``)."""
        key = ("columns", self.layout, self.A_all.device, dtype, loop)
        got = candidates.memo.get(key)
        if got is None:
            if not loop and candidates.ids.numel() >= _VECTOR_GATHER_MIN:
                idx, k_idx, scale, R = self._gather_lora_columns(candidates)
            else:
                idx, k_idx, scale, R, _ = self._loop_lora_columns(candidates)
            col_w, E = self._column_weights(candidates, k_idx, scale, dtype) if R else (None, None)
            got = candidates.memo[key] = (idx, k_idx, scale, R, col_w, E)
        return got

    @staticmethod
    def _column_weights(candidates: Candidates, k_idx: torch.Tensor, scale: torch.Tensor,
                        dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What multiplies the gathered ``Bt`` rows, ``(B, R, 1)``: each column's LoRA scale, times its candidate's
        sequence weight when there is one; and, for a local gate, ``E (B, K, R)``, 1 where column r belongs to
        candidate slot k (it maps the gate's per-slot weights to the columns), else ``None``."""
        if candidates.weights is not None:  # sequence weights and scales folded into Bt
            return (candidates.weights.to(k_idx.device).gather(1, k_idx) * scale).to(dtype).unsqueeze(-1), None
        E = F.one_hot(k_idx, candidates.k).transpose(1, 2).to(dtype) * (scale != 0).unsqueeze(1).to(dtype)
        return scale.to(dtype).unsqueeze(-1), E

    def gather(self, candidates: Candidates, dtype: torch.dtype | None = None, gate: LinearGate | None = None,
               device: torch.device | None = None, *, loop: bool = False) -> GatheredLayer | None:
        """Copy the factors of each row's candidates side by side (once per request), in ``dtype`` (default: the
        bank's); ``None`` when no row's candidates touch this module. With many candidate slots (``B·K ≥ 64``)
        a bank of LoRA experts only finds its columns vectorised (measured 1.2× faster at B=32, 1.7× at B=128,
        K=4; 2× slower at B=1, where the row loop stays); ``loop=True`` forces the row-by-row path.

        ``gate``, a local gate linear in the module input, is fused: its vectors (in ``dtype``) go in front of the A
        factors, so one matmul gives both the gate's ``x @ Vt`` and the shrink. ``device``: where the gathered
        factors go (default: the bank's); a bank kept in host memory copies only the candidates' rows there."""
        dense_uses: dict[str, list[tuple[int, int]]] = {}
        here = self.A_all.device
        device = device or here
        dtype = dtype or self.A_all.dtype
        move = (lambda t: t.to(device, non_blocking=True)) if device != here else (lambda t: t)  # noqa: E731
        if self.dense:
            idx, k_idx, scale, R, dense_uses = self._loop_lora_columns(candidates)
            col_w = E = None
        else:
            idx, k_idx, scale, R, col_w, E = self.columns(candidates, dtype, loop=loop)
        if R == 0 and not dense_uses:
            return None
        seq_w = candidates.weights
        lora = None
        if R > 0:
            if col_w is None:
                col_w, E = self._column_weights(candidates, k_idx, scale, dtype)
            B, flat = idx.shape[0], idx.reshape(-1)
            At = move(self.A_all.index_select(0, flat)).view(B, R, -1).to(dtype).transpose(1, 2)  # (B, in, R)
            Bt = move(self.Bt_all.index_select(0, flat)).view(B, R, -1).to(dtype) * move(col_w)  # (B, R, out)
            E = None if E is None else move(E)
            fused = gate if gate is not None and seq_w is None else None
            W = torch.cat([fused.Vt.to(device, dtype), At], dim=2) if fused is not None else At  # (B, in, Kg + R)
            lora = _GatheredLoRA(W, Bt, E, fused)
        dense = []
        for name, uses in dense_uses.items():
            d, bias = self.dense[name]
            d, bias = move(d).to(dtype), None if bias is None else move(bias).to(dtype)
            rows = torch.tensor([b for b, _ in uses], device=device)
            ks = torch.tensor([k for _, k in uses], device=device)
            w = None if seq_w is None else seq_w.to(device)[rows, ks].to(dtype)  # (n,)
            dense.append(_GatheredDense(d, bias, rows, ks, w))
        return GatheredLayer(candidates.batch_size, lora, dense, dtype)


@dataclass
class _GatheredLoRA:
    W: torch.Tensor  # (B, in, Kg + R): a fused gate's vectors (Kg of them, else none), then the factors A^T
    Bt: torch.Tensor  # (B, R, out): LoRA scales folded in, and the sequence weights when there is no local gate
    E: torch.Tensor | None  # (B, K, R): 1 where column r belongs to candidate slot k (local gating), else None
    gate: LinearGate | None  # the fused local gate, whose Vt is W[..., :Kg]
    _slots: torch.Tensor | None = None

    def repeat_rows(self, n: int) -> _GatheredLoRA:
        rep = lambda t: None if t is None else t.repeat_interleave(n, dim=0)  # noqa: E731
        return _GatheredLoRA(rep(self.W), rep(self.Bt), rep(self.E),
                             None if self.gate is None else self.gate.repeat_rows(n))

    @property
    def slots(self) -> torch.Tensor:
        """``(B, R)`` int32: each column's candidate slot, ``-1`` at padding (the kernel's form of ``E``)."""
        if self._slots is None:
            self._slots = torch.where(self.E.sum(1) > 0, self.E.argmax(1), -1).to(torch.int32)
        return self._slots


@dataclass
class _GatheredDense:
    delta: torch.Tensor  # (out, in)
    bias: torch.Tensor | None  # (out,)
    rows: torch.Tensor  # (n,) rows that use this expert
    ks: torch.Tensor  # (n,) its candidate slot in each of those rows
    weight: torch.Tensor | None  # (n,) sequence-level weight per row, or None (local gating)

    def repeat_rows(self, n: int) -> _GatheredDense:
        rows = (self.rows.unsqueeze(1) * n + torch.arange(n, device=self.rows.device)).reshape(-1)
        rep = lambda t: None if t is None else t.repeat_interleave(n, dim=0)  # noqa: E731
        return _GatheredDense(self.delta, self.bias, rows, rep(self.ks), rep(self.weight))


@dataclass
class GatheredLayer:
    """One module's factors for one request's rows (see :meth:`LayerBank.gather`)."""

    rows: int
    lora: _GatheredLoRA | None
    dense: list[_GatheredDense]
    dtype: torch.dtype = torch.float32  # the dtype the factors were gathered in (the forward computes in it)
    _expanded: dict[int, GatheredLayer] = field(default_factory=dict)
    _cache: dict[str, Any] = field(default_factory=dict)

    @property
    def gate_fused(self) -> bool:
        """Whether the local gate is computed here, in the same matmul as the experts' shrink."""
        return self.lora is not None and self.lora.gate is not None

    def for_batch(self, batch: int) -> GatheredLayer:
        """This layer for a batch of ``batch`` rows: generate repeats each prompt's row for beams and samples."""
        if batch == self.rows:
            return self
        if batch % self.rows:
            raise RuntimeError(f"routing was decided for {self.rows} rows but the forward has {batch}")
        n = batch // self.rows
        if n not in self._expanded:
            self._expanded[n] = GatheredLayer(
                batch, None if self.lora is None else self.lora.repeat_rows(n), [d.repeat_rows(n) for d in self.dense],
                self.dtype,
            )
        return self._expanded[n]

    def fast_step(self, selection: SelectionConfig | None) -> Callable | None:
        """For the common case (LoRA experts only; sequence weights, or the fused gate with a plain top-k) a closure
        ``step(x, y) -> (y, weights)`` with everything it needs bound, built once per request: the fewest torch
        calls and the least Python a step can cost on CPU (CUDA runs the fused kernel instead). ``None`` for the
        other cases, which take the general path of :meth:`add_delta`."""
        if "step" not in self._cache:
            self._cache["step"] = self._make_step(selection)
        return self._cache["step"]

    def _make_step(self, selection: SelectionConfig | None) -> Callable | None:
        g = self.lora
        if g is None or self.dense:
            return None
        bmm, W, Bt, E, dt = torch.bmm, g.W, g.Bt, g.E, self.dtype
        if g.gate is None and E is None:  # sequence weights folded into Bt
            def seq_step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, None]:
                return y.baddbmm_(bmm(x, W), Bt), None

            return seq_step
        if g.gate is None or selection is None or selection.top_p is not None or selection.null_logit is not None:
            return None
        kg, logits, select, cast = g.gate.k, g.gate.logits, selection.select, dt != torch.float32

        def gate_step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            z = bmm(x, W)  # (B, T, Kg + R): the gate's x @ Vt, then the shrink
            w = select(logits(x, z[:, :, :kg], inplace=True))  # (B, T, K); z's gate part is not reused
            h = z[:, :, kg:] * bmm(w.to(dt) if cast else w, E)  # each column times its candidate's weight
            return y.baddbmm_(h, Bt), w

        return gate_step

    def _kernel_top_k(self, x: torch.Tensor, y: torch.Tensor, token_weights: torch.Tensor | None,
                      selection: SelectionConfig | None) -> int | None | bool:
        """The top-k the fused kernel should use for this call, or ``False`` when the torch path must run it."""
        g = self.lora
        if not (x.is_cuda or kernels.CPU) or g is None or self.dense or y.requires_grad:
            return False
        if g.E is None:  # sequence weights folded into Bt
            top_k = None
        elif g.gate is None or token_weights is not None or selection is None:
            return False
        elif selection.top_p is not None or selection.null_logit is not None:
            return False
        else:
            top_k = selection.top_k
        return top_k if kernels.supports(x, top_k, g.Bt.shape[1], 0 if g.gate is None else g.gate.k) else False

    def add_delta(self, x: torch.Tensor, y: torch.Tensor, token_weights: torch.Tensor | None,
                  selection: SelectionConfig | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``y + `` the experts' contribution for input ``x (B, T, in)`` and base output ``y (B, T, out)`` (added in
        place when autograd allows). ``token_weights (B, T, K)`` come from a local gate computed outside; with a
        fused gate they are computed here (``selection`` turns its logits into weights); ``None`` when sequence
        weights were folded in at gather time. Returns ``(y, token_weights)``.

        On CUDA (with triton) the LoRA part runs as one fused kernel (:mod:`moerge.runtime.kernels`) when it can: no dense
        experts, and the gate fused here with a plain top-k selection, or sequence weights."""
        xg = x if x.dtype == self.dtype else x.to(self.dtype)
        if (token_weights is None and not y.requires_grad and y.dtype == self.dtype
                and not (xg.is_cuda or kernels.CPU)):
            step = self.fast_step(selection)
            if step is not None:
                return step(xg, y)
        top_k = self._kernel_top_k(xg, y, token_weights, selection)
        if top_k is not False:
            g = self.lora
            gate = g.gate
            w = kernels.routed_lora_(xg, y, g.W, g.Bt, gate_k=0 if gate is None else gate.k,
                                     bias=None if gate is None else gate.bias,
                                     slots=None if gate is None else g.slots,
                                     finish="none" if gate is None else gate.finish, top_k=top_k)
            return y, (token_weights if w is None else w)
        if self.lora is not None:
            g = self.lora
            z = torch.bmm(xg, g.W)  # (B, T, Kg + R)
            h = z
            if g.gate is not None:
                kg = g.gate.k
                token_weights = selection.select(g.gate.logits(x, z[..., :kg], inplace=True))  # (B, T, K)
                h = z[..., kg:]
            if g.E is not None:
                tw = token_weights if token_weights.dtype == h.dtype else token_weights.to(h.dtype)
                h = h * torch.bmm(tw, g.E)  # (B, T, R): each column times its slot's weight
            if y.dtype == h.dtype and not y.requires_grad:
                y = y.baddbmm_(h, g.Bt)  # (B, T, out)
            else:
                y = y + torch.bmm(h, g.Bt).to(y.dtype)
        for d in self.dense:
            xr = xg.index_select(0, d.rows)  # (n, T, in)
            yr = F.linear(xr, d.delta, d.bias)  # (n, T, out)
            if token_weights is not None:
                w = token_weights.index_select(0, d.rows)  # (n, T, K)
                w = w.gather(2, d.ks.view(-1, 1, 1).expand(-1, x.shape[1], 1))  # (n, T, 1)
            else:
                w = d.weight.view(-1, 1, 1)  # (n, 1, 1)
            y = y.index_add(0, d.rows, (yr * w.to(yr.dtype)).to(y.dtype))
        return y, token_weights


class ExpertLinear(nn.Module):
    """A base linear module plus routed experts. The original module stays as ``base_layer``, untouched.

    The layer reads the current call's routing from the model's :class:`RoutingContext`; outside a routed call
    (no state active) it is exactly ``base_layer``.
    """

    wraps_linear = True  # lower layers find the original module as base_layer (moerge.core.fingerprint)

    def __init__(self, base_layer: nn.Module, name: str, index: int, context: RoutingContext,
                 bank_device: torch.device | None = None) -> None:
        super().__init__()
        self.bank_device = bank_device  # where the bank stays (None: with the base layer, moved along with it)
        self.base_layer = base_layer
        self.module_name = name
        self.layer_index = index
        self.out_features, self.in_features = linear_shape(base_layer)
        self.info = LayerInfo(index, name, self.in_features, self.out_features)
        self._context = context
        w = base_layer.weight
        self.bank = LayerBank.empty(self.in_features, self.out_features, bank_device or w.device,
                                    w.dtype if w.is_floating_point() else torch.float32)

    def _apply(self, fn, recurse: bool = True):
        # .to(), .half(), .cuda() also move and cast the experts' factors, unless they are kept on bank_device
        super()._apply(fn, recurse)
        if self.bank_device is None:
            self.bank = self.bank.apply(fn)
        return self

    @property
    def compute_device(self) -> torch.device:
        """Where the layer computes: its base layer's device (a request's factors are gathered there)."""
        return self.base_layer.weight.device

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype a request's gathered factors take: the base layer's (its output is added to theirs)."""
        w = self.base_layer.weight
        return w.dtype if w.is_floating_point() else self.bank.A_all.dtype

    @property
    def weight(self) -> torch.Tensor:  # some model code reads .weight of its linears (e.g. dtype checks)
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        state = self._context.current
        if state is None:
            return y
        g = state.gathered.get(self.layer_index)
        if g is None:
            return y
        b = x.shape[0]
        three = x.dim() == 3
        x3 = x if three else x.reshape(b, -1, x.shape[-1])  # (B, T, in)
        g = g.for_batch(b)
        weights = selection = None
        if state.local:
            selection = state.router.config
            if not g.gate_fused:
                weights = state.router.gate(x3, state.candidates.repeat_rows(b // state.candidates.batch_size),
                                            self.info)  # (B, T, K)
        if self.base_layer._forward_hooks or _global_forward_hooks:
            y = y.clone()  # a hook may keep the base output: the experts' delta is added in place below
        y3, weights = g.add_delta(x3, y if three else y.reshape(b, -1, y.shape[-1]), weights, selection)
        if state.record_usage:
            state.record(self.module_name, weights)
        return y3 if three else y3.reshape(y.shape)

    def extra_repr(self) -> str:
        return f"module={self.module_name!r}, experts={len(self.bank)}"
