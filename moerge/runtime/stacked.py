"""The bank and the gathered factors of a fused MoE expert parameter (a *stacked* target).

A :class:`StackedBank` holds every expert's :class:`~moerge.adapters.expert.StackedLoRAWeights` for one parameter
``(E, out, in)`` in a :class:`~moerge.runtime.bank.ModuleBank` whose rows are one rank row over the E MoE experts
side by side (``A (r, E·in)``, ``Bt (r, E·out)``: :meth:`StackedLoRAWeights.flat`), so growth, in-place swaps,
eviction and the per-request column search are the module bank's. A request's factors are not copied per row, which
would cost ``E·R·(in+out)`` per row: :meth:`StackedBank.gather` copies the *union* of the rows' columns once,
``A (E, U, in)``, ``Bt (E, U, out)``, and keeps how each row weighs them (sequence weights, or the columns of each
candidate slot for a local gate) in a :class:`GatheredStacked`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moerge.adapters.expert import ModuleWeights, StackedLoRAWeights
from moerge.routing import Candidates, LinearGate
from moerge.runtime.bank import ModuleBank
from moerge.runtime.gathered import ForBatch

__all__ = ["StackedBank", "GatheredStacked"]


@dataclass
class GatheredStacked(ForBatch):
    """One stacked parameter's factors for one request: ``A (E, U, in)``, ``Bt (E, U, out)``, and how the rows
    weigh the columns: ``colw (rows, U)`` (sequence weights times scales), or, for a local gate, ``slots (rows, K,
    U)`` (each candidate slot's columns, times their scale), which a token's gate weights ``w (K,)`` turn into its
    column weights ``w @ slots``. MoE expert ``e``'s update for a token of column weights ``c`` is
    ``Σ_u c_u · Bt[e, u]ᵀ A[e, u]``."""

    rows: int
    A: torch.Tensor
    Bt: torch.Tensor
    colw: torch.Tensor | None
    dtype: torch.dtype
    slots: torch.Tensor | None = None
    lora = None  # what continuous batching looks for: a stacked target is mixed part by part (never joined)
    dense: tuple = ()
    _expanded: dict[int, GatheredStacked] = field(default_factory=dict, repr=False)

    @property
    def gate_fused(self) -> bool:
        return False

    def _repeated(self, n: int) -> GatheredStacked:
        rep = lambda t: None if t is None else t.repeat_interleave(n, dim=0)  # noqa: E731
        return GatheredStacked(self.rows * n, self.A, self.Bt, rep(self.colw), self.dtype, rep(self.slots))

    def delta(self, x: torch.Tensor, expert: int, colw: torch.Tensor) -> torch.Tensor:
        """The experts' part of MoE expert ``expert``'s output for its tokens ``x (n, in)``, whose column weights
        are ``colw (n, U)``: ``((x A[e]ᵀ) · colw) Bt[e]`` in the gathered dtype."""
        z = x.to(self.dtype) @ self.A[expert].t()  # (n, U)
        return (z * colw) @ self.Bt[expert]  # (n, out)


@dataclass(frozen=True)
class StackedBank:
    """An immutable store of every expert's factors for one stacked parameter (see the module's docstring); changes
    build a new bank, as :class:`ModuleBank`'s do."""

    rows: ModuleBank
    experts: int
    in_features: int
    out_features: int

    @classmethod
    def empty(cls, experts: int, in_features: int, out_features: int, device: torch.device,
              dtype: torch.dtype) -> StackedBank:
        return cls(ModuleBank.empty(experts * in_features, experts * out_features, device, dtype), experts,
                   in_features, out_features)

    def _with(self, rows: ModuleBank) -> StackedBank:
        return StackedBank(rows, self.experts, self.in_features, self.out_features)

    @property
    def A_all(self) -> torch.Tensor:
        return self.rows.A_all

    @property
    def names(self) -> list[str]:
        return self.rows.names

    def __contains__(self, name: str) -> bool:
        return name in self.rows

    def __len__(self) -> int:
        return len(self.rows)

    def _flat(self, weights: dict[str, ModuleWeights]) -> dict[str, ModuleWeights]:
        out = {}
        for name, w in weights.items():
            if not isinstance(w, StackedLoRAWeights) or w.experts != self.experts \
                    or w.shape != (self.out_features, self.in_features):
                what = f"{type(w).__name__} {getattr(w, 'experts', 1)}×{w.shape}"
                raise ValueError(f"expert {name!r}: {what} does not fit this stacked parameter "
                                 f"({self.experts}×{(self.out_features, self.in_features)})")
            out[name] = w.flat()
        return out

    def with_experts(self, weights: dict[str, ModuleWeights]) -> StackedBank:
        return self._with(self.rows.with_experts(self._flat(weights)))

    def swapped(self, evict: set[str], weights: dict[str, ModuleWeights]) -> StackedBank:
        return self._with(self.rows.swapped(evict, self._flat(weights)))

    def dropped(self, names: set[str]) -> StackedBank:
        return self._with(self.rows.dropped(names))

    def without(self, names: set[str]) -> StackedBank:
        return self._with(self.rows.without(names))

    def apply(self, fn) -> StackedBank:
        return self._with(self.rows.apply(fn))

    def weights_of(self, name: str) -> StackedLoRAWeights | None:
        w = self.rows.weights_of(name)
        return None if w is None else StackedLoRAWeights.from_flat(w, self.experts)

    def size_of(self, name: str) -> int:
        return self.rows.size_of(name)

    def delta_weight(self, name: str) -> torch.Tensor:
        """Expert ``name``'s update of every MoE expert, ``(E, out, in)`` (zeros if it does not target this)."""
        w = self.weights_of(name)
        if w is None:
            return torch.zeros(self.experts, self.out_features, self.in_features, device=self.A_all.device)
        return w.delta_weight(torch.float32)

    def gather(self, candidates: Candidates, dtype: torch.dtype | None = None, gate: LinearGate | None = None,
               device: torch.device | None = None, *, loop: bool = False) -> GatheredStacked | None:
        """The union of the rows' candidates' factors, copied once, with each row's weight per column (or, for a
        local gate, each candidate slot's columns); ``None`` when no row's candidates touch the parameter."""
        dtype = dtype or self.A_all.dtype
        device = device or self.A_all.device
        idx, _, _, R, col_w, slot_of = self.rows.columns(candidates, dtype, loop=loop)
        if R == 0:
            return None
        used, inverse = torch.unique(idx, return_inverse=True)  # (U,), (B, R); padding columns: bank row 0, weight 0
        B, U = idx.shape[0], used.numel()
        colw = slots = None
        if slot_of is None:  # sequence weights
            colw = torch.zeros(B, U, dtype=dtype, device=idx.device).scatter_add_(1, inverse, col_w[..., 0])
        else:  # (B, K, R) one-hot slot of each column, times the column's scale
            per = slot_of * col_w[..., 0].unsqueeze(1)
            slots = torch.zeros(B, per.shape[1], U, dtype=dtype, device=idx.device).scatter_add_(
                2, inverse.unsqueeze(1).expand_as(per), per)
        E, n_in, n_out = self.experts, self.in_features, self.out_features
        rows = used.to(self.A_all.device)
        a = self.A_all.index_select(0, rows).to(device, dtype)  # (U, E·in)
        bt = self.rows.Bt_all.index_select(0, rows).to(device, dtype)  # (U, E·out)
        return GatheredStacked(B, a.view(-1, E, n_in).transpose(0, 1).contiguous(),
                               bt.view(-1, E, n_out).transpose(0, 1).contiguous(),
                               None if colw is None else colw.to(device), dtype,
                               None if slots is None else slots.to(device))
