"""The banks of expert factors: every expert's weights for one module, held once and immutable.

A :class:`ModuleBank` stacks its LoRA experts' factors (``A_all (R_total, in)``, ``Bt_all (R_total, out)``) and keeps
dense experts' ``ΔW``. At prefill, :meth:`ModuleBank.gather` copies each row's candidates' factors side by side into
a :class:`~moerge.runtime.gathered.GatheredModule` (``A (B, R, in)``, ``Bt (B, R, out)``, ``R`` the largest summed
rank of a row, rows padded with zeros), so every decode step costs two batched matmuls whatever the library's size.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from moerge.adapters.expert import DeltaWeights, LoRAWeights, ModuleWeights
from moerge.routing import Candidates, LinearGate
from moerge.runtime.gathered import BankRows, GatheredDense, GatheredLoRA, GatheredModule, slots_of

__all__ = ["ModuleBank", "adapter_dtype"]


def adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """The dtype experts are kept and computed in by default on a base module of ``base_dtype``: float32 for a
    half-precision (or non-float, quantized) base — as PEFT computes adapters by default (``autocast_adapter_dtype``)
    — else the base's own."""
    if not base_dtype.is_floating_point or base_dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return base_dtype


_VECTOR_GATHER_MIN = 64  # candidate slots (B·K) from which the vectorised gather beats the row loop


@dataclass(frozen=True)
class _LoRASlot:
    start: int
    rank: int
    scale: float


class _Layout:
    """Where each LoRA expert's rows sit in a bank (name → start, rank, scale), interned: the banks of modules
    that hold the same experts with the same ranks share one object, so a request finds its factor columns once for
    all of them (:meth:`ModuleBank.columns`) instead of once per module."""

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
    a row change. The one other write in place, an expert cache's swap into the rows of evicted experts
    (:meth:`ModuleBank.swapped`), waits for the requests that read those rows where they lie (``readers``, each with
    the ``epoch`` it began in) and began before the rows were freed."""

    __slots__ = ("a", "bt", "used", "readers", "epoch")

    def __init__(self, a: torch.Tensor, bt: torch.Tensor, used: int) -> None:
        self.a, self.bt, self.used = a, bt, used
        self.readers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # reader → epoch at its start
        self.epoch = 0  # counts swaps: rows freed by the swap of epoch e are named by readers of epochs < e

    def read_by(self, reader: Any) -> None:
        """``reader`` (a request's :class:`~moerge.runtime.gathered.BankRows`) reads rows here while it lives."""
        self.readers[reader] = self.epoch

    def writable(self, start: int, rank: int, freed: int) -> bool:
        """Whether the rows ``[start, start + rank)``, freed in epoch ``freed``, may be written: no live reader that
        began before then reads any of them."""
        return not any(e < freed and reader.reads(start, start + rank) for reader, e in list(self.readers.items()))


_GROWTH = 1.5  # capacity factor when a bank's storage must grow


@dataclass(frozen=True)
class ModuleBank:
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
    free: tuple[tuple[int, int, int], ...] = field(default=(), repr=False, compare=False)  # (start, rank, epoch
    # freed) of rows no expert of this bank uses any more (left by :meth:`swapped`), for experts of the same rank
    # to take once no request still reads them (:meth:`_Storage.writable`)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layout", _Layout.of(self.lora))

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)  # a pickled bank no longer shares its storage's memory: it never writes there
        state.update(storage=None, free=())
        return state

    @classmethod
    def empty(cls, in_features: int, out_features: int, device: torch.device, dtype: torch.dtype) -> ModuleBank:
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
        grown = _Storage(a, bt, n)
        grown.epoch = 0 if st is None else st.epoch  # its free rows' epochs go on counting (no reader reads it yet)
        return grown

    def with_experts(self, weights: dict[str, ModuleWeights]) -> ModuleBank:
        """A new bank with ``weights`` (expert name → this module's weights) added."""
        dtype, device = self.A_all.dtype, self.A_all.device
        lora, dense = dict(self.lora), dict(self.dense)
        for name, w in weights.items():
            self._check_new(name, w)
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
            return ModuleBank(self.A_all, self.Bt_all, lora, dense, self.storage, self.free)
        st.used = start
        return ModuleBank(st.a[:start], st.bt[:start], lora, dense, st, self.free)

    def _check_new(self, name: str, w: ModuleWeights) -> None:
        if name in self:
            raise ValueError(f"expert {name!r} is already in this layer")
        if isinstance(w, LoRAWeights) and (tuple(w.A.shape) != (w.rank, self.A_all.shape[1])
                                           or tuple(w.B.shape) != (self.Bt_all.shape[1], w.rank)):
            raise ValueError(f"expert {name!r}: factors {tuple(w.A.shape)} and {tuple(w.B.shape)} do not fit "
                             f"this layer ({self.A_all.shape[1]} → {self.Bt_all.shape[1]})")

    def swapped(self, evict: set[str], weights: dict[str, ModuleWeights]) -> ModuleBank:
        """This bank without the experts ``evict`` and with ``weights`` (expert name → this module's weights)
        added: an expert cache's swap. The rows of evicted LoRA experts are left in place as free rows, and new
        experts of the same rank are written into them, so a swap copies only what it reads in — where
        :meth:`without` would compact every row kept. Only for the model's current bank, under its lock, the
        result made current at once: rows an older bank still names may be written. It compacts instead when the
        free rows would outnumber the used ones, or when the bank is not the newest of its storage."""
        gone = {n for n in evict if n in self}
        st, n = self.storage, self.A_all.shape[0]
        ours = st is not None and st.used == n and st.a.data_ptr() == self.A_all.data_ptr()
        epoch = st.epoch + 1 if ours else 0
        free = list(self.free) + [(self.lora[g].start, self.lora[g].rank, epoch) for g in gone if g in self.lora]
        used = sum(slot.rank for name, slot in self.lora.items() if name not in gone)
        if not ours or sum(r for _, r, _ in free) > used + 1:
            bank = self.without(gone) if gone else self
            return bank.with_experts(weights) if weights else bank
        st.epoch = epoch
        lora = {k: v for k, v in self.lora.items() if k not in gone}
        dense = {k: v for k, v in self.dense.items() if k not in gone}
        holes: dict[str, tuple[int, int, int]] = {}
        rest: dict[str, ModuleWeights] = {}
        for name, w in weights.items():
            if name not in gone:
                self._check_new(name, w)
            hole = None
            if isinstance(w, LoRAWeights) and name not in lora and name not in dense:
                hole = next((i for i, (at, r, e) in enumerate(free) if r == w.rank and st.writable(at, r, e)), None)
            if hole is None:
                rest[name] = w
            else:
                holes[name] = free.pop(hole)
        # whatever must be allocated is allocated before any row is written: a failure leaves every row as it was
        grow = sum(w.rank for w in rest.values() if isinstance(w, LoRAWeights))
        st = self._room_for(grow) if grow else st
        for name, (start, rank, _) in holes.items():
            w = weights[name]
            st.a[start : start + rank].copy_(w.A)  # (r, in)
            st.bt[start : start + rank].copy_(w.B.t())  # (r, out)
            lora[name] = _LoRASlot(start, rank, float(w.scale))
        bank = ModuleBank(st.a[:n], st.bt[:n], lora, dense, st, tuple(free))
        return bank.with_experts(rest) if rest else bank

    def dropped(self, names: set[str]) -> ModuleBank:
        """This bank without the experts ``names``, allocating nothing (their rows stay, unused): how a failed
        swap is undone when memory may be short. It shares no storage to write into: the next change compacts."""
        return ModuleBank(self.A_all, self.Bt_all, {k: v for k, v in self.lora.items() if k not in names},
                          {k: v for k, v in self.dense.items() if k not in names})

    def without(self, names: set[str]) -> ModuleBank:
        """A new bank without the experts in ``names`` (its rows compacted into new tensors, with spare capacity
        for experts to come: an expert cache evicts and reads in one change)."""
        keep = [(n, s) for n, s in self.lora.items() if n not in names]
        rows = [torch.arange(s.start, s.start + s.rank) for _, s in keep]
        idx = torch.cat([torch.zeros(1, dtype=torch.long), *rows]).to(self.A_all.device)
        lora, start = {}, 1
        for n, s in keep:
            lora[n] = _LoRASlot(start, s.rank, s.scale)
            start += s.rank
        dense = {n: v for n, v in self.dense.items() if n not in names}
        cap = max(start, int(_GROWTH * start)) if keep and self.A_all.device.type == "cpu" else start  # CPU: free
        # until written (untouched pages); an accelerator would reserve it
        a = torch.empty(cap, self.A_all.shape[1], device=self.A_all.device, dtype=self.A_all.dtype)
        bt = torch.empty(cap, self.Bt_all.shape[1], device=self.A_all.device, dtype=self.A_all.dtype)
        torch.index_select(self.A_all, 0, idx, out=a[:start])
        torch.index_select(self.Bt_all, 0, idx, out=bt[:start])
        return ModuleBank(a[:start], bt[:start], lora, dense, _Storage(a, bt, start))

    def apply(self, fn) -> ModuleBank:
        """A new bank with ``fn`` applied to every tensor (how ``module.to(...)`` reaches the bank)."""
        opt = lambda t: None if t is None else fn(t)  # noqa: E731
        return ModuleBank(fn(self.A_all), fn(self.Bt_all), dict(self.lora),
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

    def size_of(self, name: str) -> int:
        """Bytes expert ``name``'s weights take in this bank (0 when it is not here)."""
        if name in self.lora:
            return self.lora[name].rank * (self.A_all.shape[1] + self.Bt_all.shape[1]) * self.A_all.element_size()
        if name in self.dense:
            d, b = self.dense[name]
            return d.nbytes + (0 if b is None else b.nbytes)
        return 0

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
               device: torch.device | None = None, *, loop: bool = False) -> GatheredModule | None:
        """Copy the factors of each row's candidates side by side (once per request), in ``dtype`` (default: the
        bank's); ``None`` when no row's candidates touch this module. With many candidate slots (``B·K ≥ 64``)
        a bank of LoRA experts only finds its columns in one vectorised gather (few slots: a row loop, which is
        faster there); ``loop=True`` forces the row-by-row path.

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
            E = None if E is None else move(E)
            fused = gate if gate is not None and seq_w is None else None
            rows = BankRows(self.A_all, self.Bt_all, idx, col_w)
            if not dense_uses and device == here and device.type == "cpu" and dtype == self.A_all.dtype:
                # read where they lie (the native CPU step), copied on first use by any other path
                slots = None if E is None else candidates.memo.get(("slots", id(E)))
                if E is not None and slots is None:
                    slots = candidates.memo[("slots", id(E))] = slots_of(E)
                lora = GatheredLoRA(None, None, E, fused, bank=rows, slots=slots, dtype=dtype, device=device)
                if self.storage is not None:
                    self.storage.read_by(rows)
            else:  # copied now: every other path reads the copies
                lora = GatheredLoRA(None, None, E, fused, bank=rows, dtype=dtype, device=device)
                lora.copy_out()
        dense = []
        for name, uses in dense_uses.items():
            d, bias = self.dense[name]
            d, bias = move(d).to(dtype), None if bias is None else move(bias).to(dtype)
            rows = torch.tensor([b for b, _ in uses], device=device)
            ks = torch.tensor([k for _, k in uses], device=device)
            w = None if seq_w is None else seq_w.to(device)[rows, ks].to(dtype)  # (n,)
            dense.append(GatheredDense(d, bias, rows, ks, w))
        return GatheredModule(candidates.batch_size, lora, dense, dtype)
