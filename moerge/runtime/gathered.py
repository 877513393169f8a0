"""One request's factors for one module, and the step that mixes them into the module's output.

With sequence-level weights the weights and scales are folded into ``Bt`` at gather time; with a local gate they
are applied per token between the two matmuls ("gate and shrink"). :meth:`GatheredModule.mix` is the one
dispatcher over the ways a step can run: the per-request CPU closure, the fused Triton kernel
(:mod:`moerge.runtime.kernels`), and the general torch path (dense experts, top-p, autograd).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from moerge.routing import LinearGate, SelectionConfig
from moerge.runtime import kernels, native

__all__ = ["GatheredModule", "GatheredLoRA", "GatheredDense", "Mixed", "join_gathered", "ForBatch"]


class Mixed(NamedTuple):
    """What :meth:`GatheredModule.mix` returns."""

    y: torch.Tensor  # (B, T, out): the module's output with the experts' contribution added
    weights: torch.Tensor | None  # (B, T, K): the per-token weights used, None with sequence-level weights


def slots_of(E: torch.Tensor) -> torch.Tensor:
    """``(B, R)`` int32 from ``E (B, K, R)``: each column's candidate slot, ``-1`` at padding."""
    return torch.where(E.sum(1) > 0, E.argmax(1), -1).to(torch.int32)


@dataclass(eq=False)  # compared and hashed by identity: a bank's readers are kept by it (weakly)
class BankRows:
    """A request's factor columns where they lie in a module's bank, nothing copied: column ``r`` of row ``b`` is row
    ``idx[b, r]`` of ``A_all`` and of ``Bt_all`` (row 0, zeros, at padding), times ``col_w[b, r]`` (its LoRA scale,
    and its sequence weight when there is one). The native CPU step reads them there; the other paths copy them once
    (:meth:`copy`). The bank never writes these rows while this object lives (:meth:`ModuleBank.swapped`)."""

    A_all: torch.Tensor  # (N, in)
    Bt_all: torch.Tensor  # (N, out)
    idx: torch.Tensor  # (B, R) long
    col_w: torch.Tensor  # (B, R, 1), in the compute dtype

    def copy(self, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Aᵀ (B, in, R), Bt (B, R, out))`` copied out of the bank, ``col_w`` folded into ``Bt``."""
        B, R = self.idx.shape
        flat = self.idx.reshape(-1)
        move = (lambda t: t.to(device, non_blocking=True)) if device != self.A_all.device else (lambda t: t)  # noqa: E731
        At = move(self.A_all.index_select(0, flat)).view(B, R, -1).to(dtype).transpose(1, 2)
        Bt = move(self.Bt_all.index_select(0, flat)).view(B, R, -1).to(dtype) * move(self.col_w)
        return At, Bt

    def reads(self, start: int, stop: int) -> bool:
        """Whether any of its columns is a row in ``[start, stop)``."""
        return bool(((self.idx >= start) & (self.idx < stop)).any())

    def repeat_rows(self, n: int) -> BankRows:
        return BankRows(self.A_all, self.Bt_all, self.idx.repeat_interleave(n, dim=0),
                        self.col_w.repeat_interleave(n, dim=0))


class GatheredLoRA:
    """One module's LoRA factors for a request's rows: ``W (B, in, Kg + R)`` (a fused gate's vectors, Kg of them,
    then the factors Aᵀ, each column contiguous) and ``Bt (B, R, out)`` (LoRA scales folded in, and the sequence
    weights when there is no local gate); ``E (B, K, R)``: 1 where column r belongs to candidate slot k (local
    gating), else ``None``; ``gate``: the fused local gate, whose ``Vt`` is ``W[..., :Kg]``.

    Made from ``bank`` (:class:`BankRows`), ``W`` and ``Bt`` are copied out of the bank on first use only: the
    native CPU step reads the bank's rows in place (:meth:`native_segments`), so a request on CPU copies nothing.
    A joined batch's (``parts``: each part's factors and rows, ``None`` for a part without any) are stacked on first
    use (:func:`join_gathered`)."""

    def __init__(self, W: torch.Tensor | None, Bt: torch.Tensor | None, E: torch.Tensor | None,
                 gate: LinearGate | None, *, bank: BankRows | None = None, slots: torch.Tensor | None = None,
                 parts: list[tuple[GatheredLoRA | None, int]] | None = None, dtype: torch.dtype | None = None,
                 device: torch.device | None = None) -> None:
        self._W, self._Bt, self.E, self.gate, self.bank, self._slots = W, Bt, E, gate, bank, slots
        self.parts = parts
        self.dtype = dtype if dtype is not None else W.dtype
        self.device = device if device is not None else W.device

    def copy_out(self) -> None:
        """Copy ``W`` and ``Bt`` out of the banks (or stack a joined batch's parts) now; the properties do it on
        first use. The bank's rows are let go once copied: a request holds no bank tensor a later swap or growth
        of the bank would otherwise keep alive. Once made, they stay (a second call copies nothing)."""
        if self._W is not None:
            return
        if self.parts is not None:
            W, self._Bt = _stack_parts(self.parts, self.gate, self.dtype, self.device)
            self._W = W  # last: a W in place means both are
            return
        At, Bt = self.bank.copy(self.dtype, self.device)
        if self.gate is None:
            W = At
        else:  # (B, in, Kg + R), each column contiguous
            W = torch.cat([self.gate.Vt.transpose(1, 2).to(self.device, self.dtype), At.transpose(1, 2)],
                          dim=1).transpose(1, 2)
        self._Bt, self._W = Bt, W  # W last: a W in place means both are
        self.bank = None  # after the copies are in place: whoever finds no bank finds them

    @property
    def W(self) -> torch.Tensor:
        if self._W is None:
            self.copy_out()
        return self._W

    @property
    def Bt(self) -> torch.Tensor:
        if self._Bt is None:
            self.copy_out()
        return self._Bt

    @property
    def copied(self) -> bool:
        """Whether ``W`` and ``Bt`` are in this object's own tensors (copied out of the banks, or made so)."""
        return self._W is not None

    @property
    def rank(self) -> int:
        """``R``, the columns per row."""
        if self._Bt is not None:
            return self._Bt.shape[1]
        if self.parts is not None:
            return max((p.rank for p, _ in self.parts if p is not None), default=0)
        return self.bank.idx.shape[1]

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(B, in, out)``."""
        if self._W is not None:
            return self._W.shape[0], self._W.shape[1], self._Bt.shape[2]
        if self.parts is not None:
            p = next(p for p, _ in self.parts if p is not None)
            return sum(n for _, n in self.parts), p.shape[1], p.shape[2]
        return self.bank.idx.shape[0], self.bank.A_all.shape[1], self.bank.Bt_all.shape[1]

    def repeat_rows(self, n: int) -> GatheredLoRA:
        rep = lambda t: None if t is None else t.repeat_interleave(n, dim=0)  # noqa: E731
        gate = None if self.gate is None else self.gate.repeat_rows(n)
        if self._W is None and self.bank is not None:
            return GatheredLoRA(None, None, rep(self.E), gate, bank=self.bank.repeat_rows(n), slots=rep(self._slots),
                                dtype=self.dtype, device=self.device)
        return GatheredLoRA(rep(self.W), rep(self.Bt), rep(self.E), gate)

    @property
    def slots(self) -> torch.Tensor:
        """``(B, R)`` int32: each column's candidate slot, ``-1`` at padding (the kernel's form of ``E``)."""
        if self._slots is None:
            self._slots = slots_of(self.E)
        return self._slots

    def native_segments(self, gated: bool) -> list[tuple]:
        """The native step's operands for these rows (:func:`moerge.runtime.native.step_segments`): the bank's rows
        where they lie, or the copies once made; ``gated``: with the fused gate's vectors, slots and bias."""
        gate = self.gate if gated else None
        if self.parts is not None and self._W is None:
            segs = []
            for part, n in self.parts:
                if part is None:  # no factors: one gate slot of logit 0 (as join_gathered pads), no column
                    d_in = self.shape[1]
                    segs.append((torch.zeros(1, d_in), torch.zeros(n, 0, dtype=torch.long),
                                 torch.zeros(1, self.shape[2]), torch.zeros(n, 0, dtype=torch.long), None,
                                 torch.zeros(n, d_in, 1) if gated else None,
                                 torch.zeros(n, 0, dtype=torch.int32) if gated else None,
                                 torch.zeros(n, 1, 1) if gated else None))
                else:
                    segs.extend(part.native_segments(gated))
            return segs
        if self._W is not None or self.bank is None:
            return [native.gathered_segment(self.W, self.Bt, None if gate is None else self.slots,
                                            None if gate is None else gate.bias, 0 if gate is None else gate.k)]
        b = self.bank
        Vt = None
        if gate is not None:
            Vt = gate.Vt if gate.Vt.stride(1) == 1 else gate.Vt.transpose(1, 2).contiguous().transpose(1, 2)
        return [(b.A_all, b.idx, b.Bt_all, b.idx, b.col_w.squeeze(-1), Vt, None if gate is None else self.slots,
                 None if gate is None else gate.bias)]


@dataclass
class GatheredDense:
    delta: torch.Tensor  # (out, in)
    bias: torch.Tensor | None  # (out,)
    rows: torch.Tensor  # (n,) rows that use this expert
    ks: torch.Tensor  # (n,) its candidate slot in each of those rows
    weight: torch.Tensor | None  # (n,) sequence-level weight per row, or None (local gating)

    def repeat_rows(self, n: int) -> GatheredDense:
        rows = (self.rows.unsqueeze(1) * n + torch.arange(n, device=self.rows.device)).reshape(-1)
        rep = lambda t: None if t is None else t.repeat_interleave(n, dim=0)  # noqa: E731
        return GatheredDense(self.delta, self.bias, rows, rep(self.ks), rep(self.weight))


class ForBatch:
    """A request's gathered factors for its rows, repeated for a forward of more rows (beams, samples), once per
    factor (a subclass gives ``rows``, ``_expanded`` and ``_repeated``)."""

    rows: int
    _expanded: dict[int, Any]

    def _repeated(self, n: int) -> Any:  # pragma: no cover - given by each kind
        raise NotImplementedError

    def for_batch(self, batch: int) -> Any:
        """These factors for a batch of ``batch`` rows: generate repeats each prompt's row for beams and samples."""
        if batch == self.rows:
            return self
        if batch % self.rows:
            raise RuntimeError(f"routing was decided for {self.rows} rows but the forward has {batch}")
        n = batch // self.rows
        if n not in self._expanded:
            self._expanded[n] = self._repeated(n)
        return self._expanded[n]


@dataclass
class GatheredModule(ForBatch):
    """One module's factors for one request's rows (see :meth:`ModuleBank.gather`)."""

    rows: int
    lora: GatheredLoRA | None
    dense: list[GatheredDense]
    dtype: torch.dtype = torch.float32  # the dtype the factors were gathered in (the forward computes in it)
    _expanded: dict[int, GatheredModule] = field(default_factory=dict)
    _cache: dict[str, Any] = field(default_factory=dict)

    @property
    def gate_fused(self) -> bool:
        """Whether the local gate is computed here, in the same matmul as the experts' shrink."""
        return self.lora is not None and self.lora.gate is not None

    def _repeated(self, n: int) -> GatheredModule:
        return GatheredModule(self.rows * n, None if self.lora is None else self.lora.repeat_rows(n),
                              [d.repeat_rows(n) for d in self.dense], self.dtype)

    def fast_step(self, selection: SelectionConfig | None) -> Callable | None:
        """For the common case (LoRA experts only; sequence weights, or the fused gate with a plain top-k) a closure
        ``step(x, y) -> (y, weights)`` with everything it needs bound, built once per request: the fewest torch
        calls and the least Python a step can cost on CPU (CUDA runs the fused kernel instead). ``None`` for the
        other cases, which take the general path of :meth:`mix`."""
        if "step" not in self._cache:
            self._cache["step"] = self._make_step(selection)
        return self._cache["step"]

    def _make_step(self, selection: SelectionConfig | None) -> Callable | None:
        self._cache["native"] = None
        g = self.lora
        if g is None or self.dense:
            return None
        bmm, dt, fits = torch.bmm, self.dtype, native.fits
        if g.gate is None and g.E is None:  # sequence weights folded into Bt
            run = self._bind_native(None)

            def seq_step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, None]:
                if run is not None and fits(x, y, not g.copied):
                    run(x, y)
                    return y, None
                return y.baddbmm_(bmm(x, g.W), g.Bt), None  # the factors copied on first use

            return seq_step
        if g.gate is None or selection is None or not selection.plain:
            return None
        kg, logits, select, cast, E = g.gate.k, g.gate.logits, selection.select, dt != torch.float32, g.E
        run = self._bind_native(selection)

        def gate_step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if run is not None and fits(x, y, not g.copied):
                return y, run(x, y)
            z = bmm(x, g.W)  # (B, T, Kg + R): the gate's x @ Vt, then the shrink
            w = select(logits(x, z[:, :, :kg], inplace=True))  # (B, T, K); z's gate part is not reused
            h = z[:, :, kg:] * bmm(w.to(dt) if cast else w, E)  # each column times its candidate's weight
            return y.baddbmm_(h, g.Bt), w

        return gate_step

    def _bind_native(self, selection: SelectionConfig | None) -> Callable | None:
        """The native CPU step (:mod:`moerge.runtime.native`) with this module's operands bound (its fused gate and
        ``selection``'s top-k; ``None``: sequence weights), kept for :meth:`native_step`; ``None`` unless the factors
        are float32 on CPU and the step is built. It reads the bank's rows in place when the factors were not
        copied (:class:`BankRows`)."""
        g = self.lora
        if self.dtype != torch.float32 or g.device.type != "cpu" or not native.available():
            return None
        gate = g.gate if selection is not None else None
        run = native.step_segments(g.native_segments(gate is not None), 0 if gate is None else gate.k,
                                   "none" if gate is None else gate.finish, None if gate is None else selection.top_k)
        self._cache["native"] = run
        return run

    def native_step(self, selection: SelectionConfig | None) -> Callable | None:
        """:meth:`fast_step`'s native step alone, ``run(x, y) -> weights | None``: for the cases the closure
        covers, with float32 CPU factors, once the step is built; else ``None``. Made with the closure, once per
        request (``selection`` is the request's)."""
        self.fast_step(selection)
        return self._cache.get("native")

    def native_call(self, state: Any, module: str) -> tuple | None:
        """``(run, rows, dtype, record)`` for a patched layer's direct call of the native step under ``state`` (a
        :class:`~moerge.routing.RoutingState` or joined state: its local gate, selection and whether it records
        usage), decided at the request's first call and kept; ``None`` when this module never runs it there (no
        LoRA factors, a gate computed outside the layer, the Triton kernel on CPU, a step that could not be bound).
        Where the state only sums the gate's weights (``state.sums_usage``), the step sums them itself and the
        state takes the sums when it traces (``record`` is then false: nothing to hand over per call)."""
        if "native_call" not in self._cache:
            entry = None
            if self.lora is not None and not (state.local and not self.gate_fused) and not kernels.CPU:
                run = self.native_step(state.router.config if state.local else None)  # None unless float32, built
                record = bool(state.record_usage)
                if run is not None and record and self.gate_fused and state.sums_usage(module):
                    # the step keeps each row's summed weights; the state takes them when it traces
                    state.add_usage_source(module, run)
                    run, record = run.call_sum, False
                entry = None if run is None else (run, self.rows, self.dtype, record)
            self._cache["native_call"] = entry
        return self._cache["native_call"]

    def native_runs(self, x: torch.Tensor, y: torch.Tensor, selection: SelectionConfig | None) -> bool:
        """Whether this module's own step on ``x (B, T, in)`` into ``y`` runs natively (then it needs no step
        shared with siblings)."""
        return native.fits(x, y, self.lora is not None and not self.lora.copied) \
            and self.native_step(selection) is not None

    def fast_path(self, x: torch.Tensor, y: torch.Tensor, gate_outside: bool) -> bool:
        """Whether a step on ``x`` (in the factors' dtype) adding into ``y`` may run the CPU closures
        (:meth:`fast_step`, and the siblings' shared step): on CPU without the kernel, no autograd, ``y`` in the
        factors' dtype, and no gate computed outside the layer (``gate_outside``)."""
        return (not gate_outside and not y.requires_grad and y.dtype == self.dtype
                and not (x.is_cuda or kernels.CPU))

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
        elif not selection.plain:
            return False
        else:
            top_k = selection.top_k
        return top_k if kernels.supports(x, top_k, g.Bt.shape[1], 0 if g.gate is None else g.gate.k) else False

    def mix(self, x: torch.Tensor, y: torch.Tensor, token_weights: torch.Tensor | None,
            selection: SelectionConfig | None = None) -> Mixed:
        """``y + `` the experts' contribution for input ``x (B, T, in)`` and base output ``y (B, T, out)`` (added in
        place when autograd allows). ``token_weights (B, T, K)`` come from a local gate computed outside; with a
        fused gate they are computed here (``selection`` turns its logits into weights); ``None`` when sequence
        weights were folded in at gather time. Returns the output and the per-token weights used (:class:`Mixed`).

        On CUDA (with triton) the LoRA part runs as one fused kernel (:mod:`moerge.runtime.kernels`) when it can: no dense
        experts, and the gate fused here with a plain top-k selection, or sequence weights.

        When the factors' dtype is wider than the base output's (float32 experts on a half-precision base, the
        default), the experts' part is computed and added to the base output in that dtype and the sum is rounded
        once to the output's, as PEFT does."""
        if y.dtype != self.dtype and torch.promote_types(y.dtype, self.dtype) == self.dtype:
            out = self._mix(x, y.to(self.dtype), token_weights, selection)
            return Mixed(out.y.to(y.dtype), out.weights)
        return self._mix(x, y, token_weights, selection)

    def _mix(self, x: torch.Tensor, y: torch.Tensor, token_weights: torch.Tensor | None,
             selection: SelectionConfig | None) -> Mixed:
        xg = x if x.dtype == self.dtype else x.to(self.dtype)
        if self.fast_path(xg, y, token_weights is not None):
            step = self.fast_step(selection)
            if step is not None:
                return Mixed(*step(xg, y))
        top_k = self._kernel_top_k(xg, y, token_weights, selection)
        if top_k is not False:
            g = self.lora
            gate = g.gate
            try:
                w = kernels.routed_lora_(xg, y, g.W, g.Bt, gate_k=0 if gate is None else gate.k,
                                         bias=None if gate is None else gate.bias,
                                         slots=None if gate is None else g.slots,
                                         finish="none" if gate is None else gate.finish, top_k=top_k)
            except kernels.KernelTooLarge:  # this GPU cannot run it for this shape: the torch path below does
                pass
            else:
                return Mixed(y, token_weights if w is None else w)
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
        return Mixed(y, token_weights)


def _pad(t: torch.Tensor, dim: int, size: int, value: float = 0.0) -> torch.Tensor:
    """``t`` padded with ``value`` at the end of ``dim`` to ``size``."""
    extra = size - t.shape[dim]
    if extra == 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t, t.new_full(shape, value)], dim=dim)


def join_gathered(parts: list[GatheredModule | None], rows: list[int]) -> GatheredModule | None | bool:
    """One module's factors for the rows of several requests run as one batch (continuous batching): ``parts[i]``
    (``None``: request ``i``'s candidates do not touch the module) for ``rows[i]`` rows, stacked along the batch.
    Candidate slots and rank columns are padded to the widest part (a padded slot's gate bias is ``-inf``, so it is
    never chosen; padded columns are zero), so each row's result is what its own request computes. ``None`` when no
    part touches the module; ``False`` when the parts cannot share one step (dense experts, a gate computed outside
    the layer, gated next to sequence-weighted parts, different gate finishes): the caller mixes them one by one.
    The factors themselves are stacked on first use only: the native CPU step reads each part's where they lie."""
    real = [g for g in parts if g is not None]
    if not real:
        return None
    if any(g.lora is None or g.dense for g in real):
        return False
    gated = {g.lora.gate is not None for g in real}
    if len(gated) > 1 or any(g.lora.gate is None and g.lora.E is not None for g in real):
        return False
    gated_all = gated.pop()
    if gated_all and len({g.lora.gate.finish for g in real}) > 1:
        return False
    if len({g.dtype for g in real}) > 1:
        return False
    first = real[0]
    _, d_in, _ = first.lora.shape
    dtype, device = first.dtype, first.lora.device
    k_max = max((g.lora.gate.k for g in real), default=0) if gated_all else 0
    r_max = max(g.lora.rank for g in real)
    loras: list[tuple[GatheredLoRA | None, int]] = []
    Es, Vts, biases = [], [], []
    for g, n in zip(parts, rows):
        lo = None if g is None else g.for_batch(n).lora
        loras.append((lo, n))
        if not gated_all:
            continue
        if lo is None:  # one slot of logit 0 (never -inf everywhere: no NaN weights)
            Es.append(torch.zeros(n, k_max, r_max, dtype=dtype, device=device))
            Vts.append(torch.zeros(n, d_in, k_max, device=device))
            bias = torch.full((n, 1, k_max), float("-inf"), device=device)
            bias[:, :, 0] = 0.0
            biases.append(bias)
        else:
            Es.append(_pad(_pad(lo.E, 1, k_max), 2, r_max))
            Vts.append(_pad(lo.gate.Vt, 2, k_max))
            biases.append(_pad(lo.gate.bias, 2, k_max, float("-inf")))
    gate = LinearGate(torch.cat(Vts), torch.cat(biases), first.lora.gate.finish) if gated_all else None
    lora = GatheredLoRA(None, None, torch.cat(Es) if gated_all else None, gate, parts=loras, dtype=dtype,
                        device=device)
    return GatheredModule(sum(rows), lora, [], dtype)


def _stack_parts(parts: list[tuple[GatheredLoRA | None, int]], gate: LinearGate | None, dtype: torch.dtype,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A joined batch's ``(W, Bt)`` (see :func:`join_gathered`): each part's, padded to the widest, stacked; ``W``
    by columns."""
    k_max = 0 if gate is None else gate.k
    real = [p for p, _ in parts if p is not None]
    _, d_in, d_out = real[0].shape
    r_max = max(p.rank for p in real)
    Ws, Bts = [], []
    for lo, n in parts:
        if lo is None:  # zero columns
            Ws.append(torch.zeros(n, k_max + r_max, d_in, dtype=dtype, device=device))
            Bts.append(torch.zeros(n, r_max, d_out, dtype=dtype, device=device))
            continue
        kg = 0 if gate is None else lo.gate.k
        cols = lo.W.transpose(1, 2)  # (n, kg + R, in)
        Ws.append(_pad(cols, 1, r_max) if gate is None
                  else torch.cat([_pad(cols[:, :kg], 1, k_max), _pad(cols[:, kg:], 1, r_max)], dim=1))
        Bts.append(_pad(lo.Bt, 1, r_max))
    return torch.cat(Ws).transpose(1, 2), torch.cat(Bts)
