"""The patched linear module.

``ExpertLinear`` wraps a base ``nn.Linear`` (or GPT-2 ``Conv1D``) as ``base_layer`` and adds, for each row ``b``
and token ``t``::

    y[b, t] = base_layer(x[b, t]) + Σ_k w[b, t, k] · s_k · B_k A_k x[b, t]     (LoRA candidates)
                                  + Σ_k w[b, t, k] · (ΔW_k x[b, t] + Δb_k)      (dense candidates)

Its experts' factors are in a :class:`~moerge.runtime.bank.ModuleBank`; a call's candidates' factors, gathered once
at prefill, in a :class:`~moerge.runtime.gathered.GatheredModule`, which it finds through the model's routing
context under its ``patch_index``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module
from torch.nn.modules.module import _global_forward_hooks

from moerge.core.fingerprint import linear_shape
from moerge.routing import LayerInfo, RoutingContext, RoutingState
from moerge.runtime import native
from moerge.runtime.bank import ModuleBank, adapter_dtype
from moerge.runtime.joined import JoinedState
from moerge.runtime.siblings import MAX_ROWS, Siblings, shared_step

__all__ = ["ExpertLinear"]


def _hooked(m: nn.Module) -> bool:
    """Whether calling ``m`` would run any hook (its own or global ones): the condition under which
    ``nn.Module.__call__`` itself skips straight to ``forward``."""
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                or _module._global_forward_hooks or _module._global_forward_pre_hooks
                or _module._global_backward_hooks or _module._global_backward_pre_hooks)


class ExpertLinear(nn.Module):
    """A base linear module plus routed experts. The original module stays as ``base_layer``, untouched.

    The layer reads the current call's routing from the model's :class:`RoutingContext`; outside a routed call
    (no state active) it is exactly ``base_layer``.
    """

    wraps_linear = True  # lower layers find the original module as base_layer (moerge.core.fingerprint)

    def __init__(self, base_layer: nn.Module, name: str, index: int, context: RoutingContext,
                 bank_device: torch.device | None = None, siblings: Siblings | None = None) -> None:
        """``index`` is the module's place among the model's patched modules, in patch order (its key in a call's
        gathered factors), not the transformer block it belongs to; ``siblings``: the model's groups of modules
        that read one input (:mod:`moerge.runtime.siblings`), shared by its layers."""
        super().__init__()
        self._siblings = siblings
        self.bank_device = bank_device  # where the bank stays (None: with the base layer, moved along with it)
        self.base_layer = base_layer
        self.module_name = name
        self.patch_index = index
        self.out_features, self.in_features = self.shape_of(base_layer)
        self.info = LayerInfo(index, name, self.in_features, self.out_features)
        self._context = context
        w = base_layer.weight
        self.bank = ModuleBank.empty(self.in_features, self.out_features, bank_device or w.device,
                                    adapter_dtype(w.dtype))

    @staticmethod
    def shape_of(base_layer: nn.Module) -> tuple[int, int]:
        """``(out, in)`` of the wrapped module."""
        return linear_shape(base_layer)

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
        """The dtype a request's gathered factors take and the experts' part is computed in: the wider of the base
        layer's and the bank's (float32 experts on a half-precision base compute in float32, as PEFT's adapters do
        by default; bfloat16 experts on a float32 base are cast up once, when gathered)."""
        w = self.base_layer.weight
        return torch.promote_types(w.dtype, self.bank.A_all.dtype) if w.is_floating_point() else self.bank.A_all.dtype

    @property
    def weight(self) -> torch.Tensor:  # some model code reads .weight of its linears (e.g. dtype checks)
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        base = self.base_layer
        if type(base) is nn.Linear and not args and not kwargs and not _hooked(base):
            p = base._parameters  # what its __call__ would do, without three Python frames per call
            y = F.linear(x, p["weight"], p["bias"])
        else:
            y = base(x, *args, **kwargs)
        state = self._context.current
        if state is None:
            return y
        if self._siblings is not None and x.dim() == 3 and x.shape[1] > 1:  # a prompt: see who reads this input
            self._siblings.observe(self.patch_index, x)
        if x.dim() == 3 and not (base._forward_hooks or _global_forward_hooks) and self._native(state, x, y):
            return y
        if not self.touched_by(state):
            return y
        return self.add_experts(state, x, y)

    def _native(self, state: RoutingState | JoinedState, x: torch.Tensor, y: torch.Tensor) -> bool:
        """Add the experts' part to ``y`` in place by the native step (:mod:`moerge.runtime.native`), the shortest
        way a decode step's call can take on CPU (the base layer has no hooks, which might keep ``y``); ``False``
        (nothing done) when it does not apply and the general path must run. What does not change from call to
        call of a request is decided at its first call and kept with its factors."""
        g = state.gathered.get(self.patch_index)
        if g is None:
            return False
        entry = g.native_call(state, self.module_name)
        if entry is None:
            return False
        run, rows, dtype, record = entry
        shape = x.shape
        if (shape[0] != rows or x.dtype != dtype or y.dtype != dtype or y.requires_grad
                or not native.fits(x, y, not g.lora.copied)):
            return False
        w = run(x, y)
        if record and w is not None:
            state.record(self.module_name, w, self.patch_index)
        return True

    def touched_by(self, state: RoutingState | JoinedState) -> bool:
        """Whether a call under ``state`` has factors for this module."""
        split = isinstance(state, JoinedState) and self.patch_index in state.split
        return split or state.gathered.get(self.patch_index) is not None

    def add_experts(self, state: RoutingState | JoinedState, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``y``, the base module's output for ``x``, with the experts' part under ``state`` added."""
        split = isinstance(state, JoinedState) and self.patch_index in state.split
        if self.base_layer._forward_hooks or _global_forward_hooks:
            y = y.clone()  # a hook may keep the base output: the experts' delta is added in place below
        mix = self._mix_parts if split else self._mix
        if x.dim() == 2:  # tokens flattened to (rows·T, in), as an MoE block's shared expert gets them: each row's
            # tokens are contiguous, so they are viewed as (rows, T, in) and routed by their row
            rows = state.rows if isinstance(state, JoinedState) else state.candidates.batch_size
            if x.shape[0] % rows == 0:
                flat = y.shape
                return mix(state, x.reshape(rows, -1, x.shape[-1]), y.reshape(rows, -1, y.shape[-1])).reshape(flat)
        if not split and x.dim() == 3 and self._siblings is not None:
            out = self._sibling_mix(state, x, y)
            if out is not None:
                return out
        return mix(state, x, y)

    def _sibling_mix(self, state: RoutingState | JoinedState, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """``y`` plus the experts' part through the step this module shares with its siblings (computed by the
        first of them called with ``x``, kept on the call's state for the others); ``None`` when it has no
        siblings or the shared step does not apply (the module's own step runs)."""
        group = self._siblings.group_of.get(self.patch_index)
        b = x.shape[0]
        if group is None or b > MAX_ROWS:
            return None
        g = state.gathered[self.patch_index].for_batch(b)
        if x.dtype != g.dtype or not g.fast_path(x, y, state.local and not g.gate_fused):
            return None
        if g.native_runs(x, y, state.router.config if state.local else None):
            return None  # one native call per module costs less than the shared torch step
        step = shared_step(state, group, b)
        if step is None:
            return None
        h, w = step.run(self.patch_index, x)
        y = y.baddbmm_(h, g.lora.Bt)
        if state.record_usage and w is not None:
            state.record(self.module_name, w, self.patch_index)
        return y

    def _mix(self, state: RoutingState | JoinedState, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``y`` (the base output for ``x``) plus the experts' contribution under ``state``'s routing."""
        b = x.shape[0]
        three = x.dim() == 3
        x3 = x if three else x.reshape(b, -1, x.shape[-1])  # (B, T, in)
        g = state.gathered[self.patch_index].for_batch(b)
        weights = selection = None
        if state.local:
            selection = state.router.config
            if not g.gate_fused:
                weights = state.router.gate(x3, state.candidates.repeat_rows(b // state.candidates.batch_size),
                                            self.info)  # (B, T, K)
        y3, weights = g.mix(x3, y if three else y.reshape(b, -1, y.shape[-1]), weights, selection)
        if state.record_usage:
            state.record(self.module_name, weights, self.patch_index)
        return y3 if three else y3.reshape(y.shape)

    def _mix_parts(self, state: JoinedState, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """A joined batch whose parts cannot share this module's step: each part's rows mixed under its own
        routing."""
        y = y.clone()
        for p in state.parts:
            if p.state.gathered.get(self.patch_index) is None:
                continue
            rows = slice(p.start, p.start + p.rows)
            y[rows] = self._mix(p.state, x[rows], y[rows].clone())
        return y

    def extra_repr(self) -> str:
        return f"module={self.module_name!r}, experts={len(self.bank)}"
