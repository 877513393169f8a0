"""Sibling modules: patched modules that read the same input (q/k/v, gate/up) share one gate-and-shrink step.

In a transformer block ``q_proj``, ``k_proj`` and ``v_proj`` read one tensor, as do ``gate_proj`` and ``up_proj``.
Each module's routed step begins with ``z = x @ [gate vectors | Aᵀ]``, the gate's finish and a top-k softmax, and
the per-column weights (:meth:`GatheredModule.fast_step`). For siblings these are the same operations on the same
``x``, so one step does them for all: one matmul over the siblings' columns side by side, the gates' logits as
``(B, T, G, K)`` (one finish, one selection for the ``G`` siblings), one matmul for the column weights of all; then
each sibling adds its own expand to its own output. On CPU, where a step costs about 2 µs per torch call, this saves
about 20 of the ~33 calls of a q/k/v group and 10 of ~22 of gate/up.

Which modules are siblings is seen, not assumed: while a call's prompt runs (``T > 1``), :class:`Siblings` notes
which consecutive patched modules received the very same input tensor, and groups them. A decode step then runs
the first member of a group that is called as the whole group's step and keeps the result for the others, which
use it only if they are called with that same tensor, unmodified; otherwise (an architecture where the guess was
wrong, a hook that changed the input) they run their own step, so the grouping can cost time but never change a
result beyond the rounding of a wider matmul.

Only the CPU fast path is grouped (LoRA experts, the local gate fused in the layer with a plain top-k, or sequence
weights); CUDA runs the Triton kernel per module, and everything else the general path.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch

from moerge.routing import SelectionConfig
from moerge.runtime.gathered import GatheredModule

__all__ = ["Siblings", "SharedStep", "group_step", "shared_step", "version", "MAX_ROWS"]

MAX_ROWS = 2
"""Batches of at most this many rows share sibling steps. The saving is per torch call, which matters when a step's
tensors are small (batch 1: 4.5% of the routed step on a 2-core CPU, none measurable at batch 8), while a group's
side-by-side factors are a second copy of its members' gathered A factors for the call (at batch 8 about 100 MB for
SmolLM2 with K=4 rank-8 candidates)."""

GroupStep = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


def version(x: torch.Tensor) -> int:
    """``x``'s version counter (changed by in-place writes); -1 for an inference-mode tensor, which keeps none."""
    return -1 if x.is_inference() else x._version


class Siblings:
    """The groups of patched modules (by patch index) seen receiving one input tensor, shared by a model's
    layers."""

    def __init__(self) -> None:
        self.group_of: dict[int, tuple[int, ...]] = {}  # member -> its group, in call order
        self._seen = threading.local()  # per thread: the last input seen and the run of modules that received it

    def __getstate__(self) -> dict[str, Any]:
        return {"group_of": dict(self.group_of)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.group_of = state["group_of"]
        self._seen = threading.local()

    def __deepcopy__(self, memo: dict) -> Siblings:
        new = Siblings()
        new.group_of = dict(self.group_of)
        return new

    def observe(self, index: int, x: torch.Tensor) -> None:
        """Note that module ``index`` was called with ``x`` (during a prompt's forward)."""
        seen = self._seen
        ref = getattr(seen, "x", None)  # a weak reference: no input is kept alive here
        if ref is not None and ref() is x and seen.version == version(x) and index not in seen.run:
            seen.run.append(index)
            if len(seen.run) > 1:
                group = tuple(seen.run)
                for i in group:
                    old = self.group_of.get(i)
                    if old is None or len(old) < len(group):
                        self.group_of[i] = group
            return
        seen.x, seen.version, seen.run = weakref.ref(x), version(x), [index]


def group_step(parts: list[tuple[int, GatheredModule]], selection: SelectionConfig | None) -> GroupStep | None:
    """For siblings ``parts`` (patch index, gathered factors for this batch), a step ``x -> (h, w)`` computing
    every member's per-column-weighted low-rank activations ``h (B, T, ΣR)`` (members side by side, in ``parts``'
    order) and the gates' weights ``w (B, T, G, K)`` (``None`` with sequence weights); ``None`` when the members
    cannot share a step (what :meth:`GatheredModule.fast_step` runs alone is required of each, alike)."""
    gs = [g for _, g in parts]
    if len(gs) < 2 or any(g.lora is None or g.dense for g in gs) or len({g.dtype for g in gs}) > 1:
        return None
    gated = {g.lora.gate is not None for g in gs}
    if len(gated) > 1:
        return None
    bmm, dt = torch.bmm, gs[0].dtype
    if not gated.pop():
        if any(g.lora.E is not None for g in gs):
            return None
        W = torch.cat([g.lora.W for g in gs], dim=2)  # (B, in, ΣR)

        def seq_step(x: torch.Tensor) -> tuple[torch.Tensor, None]:
            return bmm(x, W), None

        return seq_step
    gates = [g.lora.gate for g in gs]
    if (selection is None or not selection.plain
            or len({gt.finish for gt in gates}) > 1 or len({gt.k for gt in gates}) > 1):
        return None
    G, k, finish = len(gs), gates[0].k, gates[0].finish
    B = gs[0].lora.W.shape[0]
    ranks = [g.lora.W.shape[2] - k for g in gs]
    W = torch.cat([g.lora.W[:, :, :k] for g in gs] + [g.lora.W[:, :, k:] for g in gs], dim=2)  # (B, in, GK + ΣR)
    bias = torch.stack([gt.bias for gt in gates], dim=2)  # (B, 1, G, K)
    E = torch.zeros(B, G * k, sum(ranks), dtype=gs[0].lora.E.dtype, device=W.device)  # block-diagonal
    off = 0
    for j, (g, r) in enumerate(zip(gs, ranks)):
        E[:, j * k:(j + 1) * k, off:off + r] = g.lora.E
        off += r
    select, cast, gk = selection.select, dt != torch.float32, G * k

    def gate_step(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = bmm(x, W)  # (B, T, GK + ΣR)
        xv = z[:, :, :gk]
        xv = xv.float() if cast else xv
        if finish == "abs":
            xv = xv.abs_()
        elif finish == "standardized":
            xf = x.float() if cast else x
            xv = xv.mul_(torch.rsqrt(xf.var(-1, correction=0, keepdim=True).add_(1e-5)))
        logits = xv.view(*xv.shape[:2], G, k).add_(bias)  # (B, T, G, K)
        w = select(logits)
        colw = bmm(w.view(*w.shape[:2], gk).to(dt) if cast else w.view(*w.shape[:2], gk), E)  # (B, T, ΣR)
        return z[:, :, gk:].mul_(colw), w

    return gate_step


class SharedStep:
    """One group's shared step for one call and batch size: each member's place among the side-by-side columns,
    and the result for the last input the step ran on (a member uses it only for that same, unmodified tensor)."""

    def __init__(self, parts: list[tuple[int, GatheredModule]], selection: SelectionConfig | None) -> None:
        self.step = group_step(parts, selection)
        self.places: dict[int, tuple[int, int, int]] = {}  # member -> (first column, end, its place in the group)
        off = 0
        for j, (i, part) in enumerate(parts if self.step is not None else []):
            r = part.lora.Bt.shape[1]
            self.places[i] = (off, off + r, j)
            off += r
        self._kept: tuple | None = None  # (x, its version, h, w)

    def run(self, index: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Member ``index``'s ``h (B, T, R)`` and gate weights ``(B, T, K)`` (``None``: sequence weights) for
        ``x``, computing the group's step unless it already ran on ``x``."""
        kept = self._kept
        if kept is None or kept[0] is not x or kept[1] != version(x):
            kept = self._kept = (x, version(x), *self.step(x))
        start, end, j = self.places[index]
        return kept[2][:, :, start:end], None if kept[3] is None else kept[3][:, :, j, :]


def shared_step(state: Any, group: tuple[int, ...], rows: int) -> SharedStep | None:
    """The shared step of ``group`` for a call's ``state`` (a :class:`~moerge.routing.RoutingState` or a joined
    one) and ``rows`` rows, made once and kept on the state; ``None`` when its members cannot share one."""
    steps = state.__dict__.setdefault("_sibling_steps", {})
    step = steps.get((group, rows))
    if step is None:
        parts = [(i, state.gathered[i].for_batch(rows)) for i in group if state.gathered.get(i) is not None]
        step = steps[(group, rows)] = SharedStep(parts, state.router.config if state.local else None)
    return step if step.step is not None else None
