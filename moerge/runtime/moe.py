"""Experts on MoE blocks: the patched router and the patched fused experts (see :mod:`moerge.core.targets`).

* :class:`ExpertRouter` wraps a router module (``mlp.gate``): inside a routed call its one ``F.linear(h, weight)``
  is caught (a ``TorchFunctionMode``) and the experts' part is added to the logits exactly as
  :class:`~moerge.runtime.layer.ExpertLinear` adds it to a linear's output, before the router's own softmax and
  top-k.
* :class:`ExpertMoE` wraps an experts module (``mlp.experts``) whose ``gate_up_proj`` and ``down_proj`` are targets
  (each a :class:`StackedTarget` with its own bank and patch index). Outside a routed call, or when a call has no
  factors for them, the base's configured experts implementation runs untouched. Otherwise it runs the experts'
  loop itself, as transformers' eager implementation does, adding to each MoE expert's ``gate_up`` (before the
  activation) and ``down`` (before the top-k weighting and sum) the candidates' updates, weighted per row:

      gate_up_e(x) = W_gu[e] x + Σ_k w_k s_k B_k[e] A_k[e] x,   likewise down_e,

  which with one expert at weight 1 is PEFT's forward for ``target_parameters`` and with sequence weights equals the
  dense merge ``W + Σ_k w_k ΔW_k``. A flattened block input ``(N, H)`` is viewed as ``(rows, N/rows, H)``: each
  row's tokens are contiguous.
"""

from __future__ import annotations

import torch
from torch import nn

from moerge.core.targets import CatchLinear, experts_forward
from moerge.routing import LayerInfo, RoutingContext
from moerge.runtime.joined import JoinedState
from moerge.runtime.layer import ExpertLinear
from moerge.runtime.stacked import GatheredStacked, StackedBank

__all__ = ["ExpertRouter", "ExpertMoE", "StackedTarget"]


class ExpertRouter(ExpertLinear):
    """A top-k router module plus routed experts on its ``weight (E, H)``; outside a routed call exactly the
    router."""

    wraps_linear = False  # not a linear module: fingerprints find it through wraps_module
    wraps_module = True

    @staticmethod
    def shape_of(base_layer: nn.Module) -> tuple[int, int]:
        return int(base_layer.weight.shape[0]), int(base_layer.weight.shape[1])

    def forward(self, hidden: torch.Tensor, *args, **kwargs):
        state = self._context.current
        if state is None or not self.touched_by(state):
            return self.base_layer(hidden, *args, **kwargs)
        catch = CatchLinear(self.base_layer.weight, lambda x, y: self.add_experts(state, x, y))
        with catch:
            out = self.base_layer(hidden, *args, **kwargs)
        if catch.calls != 1:
            raise RuntimeError(f"router {self.module_name!r} ({type(self.base_layer).__name__}) applied its weight "
                               f"{catch.calls} times with F.linear; moerge adds experts to exactly one such call")
        return out


class StackedTarget:
    """One fused parameter of an :class:`ExpertMoE` as the expert set sees a patched module: its name, patch index,
    bank and shapes."""

    def __init__(self, moe: ExpertMoE, param: str, name: str, index: int, bank: StackedBank, gate_dim: int) -> None:
        self.moe, self.param, self.module_name, self.patch_index, self.bank = moe, param, name, index, bank
        self.out_features, self.in_features = bank.out_features, bank.in_features
        # local gates read the MoE block's input (gate_dim wide), not this parameter's own (per MoE expert) input
        self.info = LayerInfo(index, name, gate_dim, self.out_features)

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self.moe.base_layer, self.param)

    @property
    def compute_device(self) -> torch.device:
        return self.weight.device

    @property
    def compute_dtype(self) -> torch.dtype:
        w = self.weight
        return torch.promote_types(w.dtype, self.bank.A_all.dtype) if w.is_floating_point() else self.bank.A_all.dtype


class ExpertMoE(nn.Module):
    """An experts module (fused ``gate_up_proj``/``down_proj``) plus routed experts on those parameters; outside a
    routed call exactly the experts module."""

    wraps_module = True

    def __init__(self, base_layer: nn.Module, name: str, context: RoutingContext,
                 bank_device: torch.device | None = None) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.module_name = name
        self.bank_device = bank_device
        self._context = context
        self.targets: dict[str, StackedTarget] = {}

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        if self.bank_device is None:
            for t in self.targets.values():
                t.bank = t.bank.apply(fn)
        return self

    def _parts(self, state, hidden: torch.Tensor) -> list[tuple[int, int, dict[str, tuple[GatheredStacked,
                                                                               torch.Tensor]]]]:
        """Per routing part (one for a call, several for a joined batch): its tokens ``[start, end)`` and, per
        parameter with factors, the gathered factors and each token's column weights ``(end - start, U)`` — from
        the sequence weights, or from the local gate on the block input (its weights recorded for the trace)."""
        if state is None:
            return []
        if isinstance(state, JoinedState):
            pieces, rows = [(p.state, p.start, p.rows) for p in state.parts], state.rows
        else:
            pieces, rows = [(state, 0, state.candidates.batch_size)], state.candidates.batch_size
        tokens = hidden.shape[0]
        if tokens % rows:
            raise RuntimeError(f"{self.module_name}: {tokens} tokens cannot be split over {rows} routed rows")
        per_row = tokens // rows
        out = []
        for s, start, n in pieces:
            got = {}
            for p, t in self.targets.items():
                g = s.gathered.get(t.patch_index)
                if g is None:
                    continue
                g = g.for_batch(n)
                if g.colw is not None:
                    colw = g.colw.repeat_interleave(per_row, dim=0)
                else:
                    x3 = hidden[start * per_row : (start + n) * per_row].view(n, per_row, -1)
                    w = s.router.gate(x3, s.candidates.repeat_rows(n // s.candidates.batch_size), t.info)
                    if s.record_usage:
                        s.record(t.module_name, w, t.patch_index)
                    colw = torch.bmm(w.to(g.dtype), g.slots).reshape(n * per_row, -1)  # (tokens, U)
                got[p] = (g, colw)
            if got:
                out.append((start * per_row, (start + n) * per_row, got))
        return out

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        parts = self._parts(self._context.current, hidden)
        if not parts:
            return self.base_layer(hidden, top_k_index, top_k_weights)
        return experts_forward(self.base_layer, hidden, top_k_index, top_k_weights,
                               lambda p, y, x, tok, e: self._project(p, y, x, tok, e, parts))

    @staticmethod
    def _project(param: str, y: torch.Tensor, x: torch.Tensor, tok: torch.Tensor, expert: int, parts) -> torch.Tensor:
        """``y``, MoE expert ``expert``'s base projection of its tokens ``x`` (block positions ``tok``), with each
        routing part's update of ``param`` added (computed in the factors' dtype, rounded once)."""
        delta = None
        for start, end, got in parts:
            if param not in got:
                continue
            g, colw = got[param]
            sel = (tok >= start) & (tok < end)
            if not bool(sel.any()):
                continue
            d = g.delta(x[sel], expert, colw[tok[sel] - start])
            if delta is None:
                delta = torch.zeros(y.shape, dtype=d.dtype, device=y.device)
            delta[sel] += d
        return y if delta is None else (y.to(delta.dtype) + delta).to(y.dtype)

    def extra_repr(self) -> str:
        return f"module={self.module_name!r}, targets={list(self.targets)}"
