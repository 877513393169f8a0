"""Fused Triton kernels for routed LoRA mixing on CUDA (the ``gpu`` extra).

Two launches per patched module and step do what the torch path does in about ten operations
(:meth:`moerge.runtime.gathered.GatheredModule.mix`): for each row ``b`` and token ``t``

1. **shrink and gate** in one pass over the input: ``z = x[b, t] @ W[b]``, where ``W[b]`` holds the row's
   candidates' gate vectors (``Kg`` columns) in front of their A factors (``R`` columns);
2. **select**: the gate's logits (``|z|`` for Arrow, ``z / σ(x)`` for PHATGOOSE and X-LoRA, plus the per-request
   bias) → softmax over each token's top-k candidates (others 0; a token with no finite logit gets none);
3. **expand**: each A column's output times its candidate's weight, ``@ Bt[b]``, added to the base output ``y``
   in place.

Like Punica's SGMV every row has its own adapters, but here each token mixes several of its row's candidates
with weights it computes itself. As in Punica and S-LoRA the work is split into a shrink and an expand launch
(grids from :func:`_grids`):

* ``_shrink_kernel``, grid ``(B, ⌈T / BLOCK_T⌉)``: steps 1 and 2 for ``BLOCK_T`` tokens of one row; it writes the
  weighted low-rank activations ``h (B, T, R)`` (float32, each column already times its candidate's weight) and
  the gate's weights ``(B, T, Kg)``;
* ``_expand_kernel``, grid ``(B, ⌈T / BLOCK_T⌉, ⌈OUT / BLOCK_OUT⌉)``: step 3 for one block of tokens and one block
  of output columns, ``h`` cast to ``Bt``'s dtype, so a decode step (``B = 1, T = 1``) still spreads a module's
  outputs over ``⌈OUT / 64⌉`` programs (9 for 576 outputs, 24 for 1536) instead of one.

The shrink is computed once per token; ``h`` is the only intermediate (``4 R`` bytes per token). Sequence-level
weights (no local gate) are folded into ``Bt`` by the gather and run the same kernels without step 1's gate and
step 2.

Only what the kernels support is sent to them (:func:`supports`); the torch path does the rest. The kernels also
run under Triton's interpreter (``TRITON_INTERPRET=1`` before triton is imported, CPU tensors, :data:`CPU` set),
which is how the tests check them without a GPU.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch

try:  # pragma: no cover - import guard
    import triton
    import triton.language as tl
    from triton.runtime.errors import OutOfResources

    HAVE_TRITON = True
except ImportError:  # pragma: no cover
    triton = tl = None
    OutOfResources = RuntimeError
    HAVE_TRITON = False

__all__ = ["HAVE_TRITON", "ENABLED", "INTERPRET", "CPU", "supports", "routed_lora_", "FINISH_CODES"]

FINISH_CODES = {"none": 0, "abs": 1, "standardized": 2}
_MAX_K = 64  # candidates per row the kernel's selection handles (unrolled loops)
_MAX_R = 512  # gathered LoRA columns per row it keeps in registers


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")


INTERPRET = _flag("TRITON_INTERPRET")  # Triton reads it when it decorates the kernel, i.e. at import
ENABLED = HAVE_TRITON and not _flag("MOERGE_NO_KERNEL")  # MOERGE_NO_KERNEL=1: always the torch path
CPU = False  # True: also run the kernel on CPU tensors, which only Triton's interpreter can (the tests do)


def supports(x: torch.Tensor, top_k: Any, R: int, K: int) -> bool:
    """Whether :func:`routed_lora_` can run this call: Triton present and not disabled (``MOERGE_NO_KERNEL=1``),
    a CUDA input (or a CPU one under the interpreter with :data:`CPU` set, for tests), at most :data:`_MAX_R` columns and :data:`_MAX_K` candidates,
    and a plain top-k (or all-candidates) selection (``top_k`` is ``False`` for a selection the kernel does not
    do: top-p, a null expert)."""
    return (ENABLED and top_k is not False and R <= _MAX_R and K <= _MAX_K
            and (x.is_cuda or (CPU and INTERPRET)) and (_pow2(R), x.dtype, x.device) not in TOO_LARGE)


TOO_LARGE: set[tuple] = set()  # (padded columns, dtype, device) a launch found over the GPU's resources


class KernelTooLarge(RuntimeError):
    """The kernel needs more of the GPU (shared memory, registers) than it has for this shape; nothing was
    written, and :func:`supports` refuses the shape from now on (the torch path runs it)."""


if HAVE_TRITON:

    @triton.jit
    def _shrink_kernel(
        X, W, BIAS, SLOT, H, WOUT,
        T, IN, R, KG,
        sxb, sxt, swb, swi, swc,
        GATE: tl.constexpr, FINISH: tl.constexpr, TOP_K: tl.constexpr, K_PAD: tl.constexpr, R_PAD: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_IN: tl.constexpr, IEEE: tl.constexpr,
    ):
        """``H[b, t] = (x[b, t] @ A[b]) * colw`` (float32; ``colw`` the gate's weight of each column's candidate, 1
        without a gate) and ``WOUT[b, t]`` the gate's weights, for ``BLOCK_T`` tokens of row ``b``."""
        b = tl.program_id(0)
        t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
        tm = t < T
        r = tl.arange(0, R_PAD)
        rm = r < R
        kk = tl.arange(0, K_PAD)
        km = kk < KG
        acc = tl.zeros((BLOCK_T, R_PAD), dtype=tl.float32)
        accg = tl.zeros((BLOCK_T, K_PAD), dtype=tl.float32)
        s1 = tl.zeros((BLOCK_T,), dtype=tl.float32)
        s2 = tl.zeros((BLOCK_T,), dtype=tl.float32)
        for i0 in range(0, IN, BLOCK_IN):
            i = i0 + tl.arange(0, BLOCK_IN)
            im = i < IN
            x = tl.load(X + b * sxb + t[:, None] * sxt + i[None, :], mask=tm[:, None] & im[None, :], other=0.0)
            wa = tl.load(W + b * swb + i[:, None] * swi + (KG + r)[None, :] * swc, mask=im[:, None] & rm[None, :],
                         other=0.0)
            if IEEE:
                acc += tl.dot(x, wa, input_precision="ieee")
            else:
                acc += tl.dot(x, wa)
            if GATE:
                wg = tl.load(W + b * swb + i[:, None] * swi + kk[None, :] * swc, mask=im[:, None] & km[None, :],
                             other=0.0)
                if IEEE:
                    accg += tl.dot(x, wg, input_precision="ieee")
                else:
                    accg += tl.dot(x, wg)
                if FINISH == 2:
                    xf = x.to(tl.float32)
                    s1 += tl.sum(xf, 1)
                    s2 += tl.sum(xf * xf, 1)
        h = acc
        if GATE:
            logits = accg
            if FINISH == 1:
                logits = tl.abs(logits)
            if FINISH == 2:
                mean = s1 / IN
                logits = logits * tl.rsqrt(s2 / IN - mean * mean + 1e-5)[:, None]
            bias = tl.load(BIAS + b * KG + kk, mask=km, other=float("-inf"))
            logits = logits + bias[None, :]
            # top-k: mark the best TOP_K candidates of each token, one argmax at a time
            work = logits
            chosen = kk[None, :] < 0  # all False, (1, K_PAD)
            for _ in tl.static_range(TOP_K):
                best = tl.argmax(work, 1)
                hit = kk[None, :] == best[:, None]
                chosen = chosen | hit
                work = tl.where(hit, float("-inf"), work)
            top = tl.where(chosen, logits, float("-inf"))
            mx = tl.max(top, 1)
            ok = chosen & (top > float("-inf"))
            e = tl.where(ok, tl.exp(top - tl.where(mx > float("-inf"), mx, 0.0)[:, None]), 0.0)
            tot = tl.sum(e, 1)
            w = e / tl.where(tot > 0, tot, 1.0)[:, None]  # (BLOCK_T, K_PAD)
            tl.store(WOUT + (b * T + t[:, None]) * KG + kk[None, :], w, mask=tm[:, None] & km[None, :])
            slot = tl.load(SLOT + b * R + r, mask=rm, other=-1)  # (R_PAD,) candidate slot of each column
            colw = tl.zeros((BLOCK_T, R_PAD), dtype=tl.float32)
            for k in tl.static_range(K_PAD):
                wk = tl.sum(tl.where(kk[None, :] == k, w, 0.0), 1)  # (BLOCK_T,)
                colw += tl.where(slot[None, :] == k, wk[:, None], 0.0)
            h = acc * colw
        tl.store(H + (b * T + t[:, None]) * R + r[None, :], h, mask=tm[:, None] & rm[None, :])

    @triton.jit
    def _expand_kernel(
        H, BT, Y,
        T, OUT, R,
        sbb, sbr, syb, syt,
        BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_OUT: tl.constexpr, IEEE: tl.constexpr,
    ):
        """``Y[b, t, o] += H[b, t] @ Bt[b, :, o]`` (``H`` cast to ``Bt``'s dtype, float32 accumulation) for
        ``BLOCK_T`` tokens and ``BLOCK_OUT`` output columns of row ``b``, ``BLOCK_R`` of the ``R`` columns at a
        time."""
        b = tl.program_id(0)
        t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
        tm = t < T
        o = tl.program_id(2) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
        om = o < OUT
        acc = tl.zeros((BLOCK_T, BLOCK_OUT), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            rm = r < R
            h = tl.load(H + (b * T + t[:, None]) * R + r[None, :], mask=tm[:, None] & rm[None, :], other=0.0)
            h = h.to(BT.dtype.element_ty)
            bt = tl.load(BT + b * sbb + r[:, None] * sbr + o[None, :], mask=rm[:, None] & om[None, :], other=0.0)
            if IEEE:
                acc += tl.dot(h, bt, input_precision="ieee")
            else:
                acc += tl.dot(h, bt)
        yp = Y + b * syb + t[:, None] * syt + o[None, :]
        ym = tm[:, None] & om[None, :]
        y = tl.load(yp, mask=ym, other=0.0)
        tl.store(yp, (y.to(tl.float32) + acc).to(y.dtype), mask=ym)


def _pow2(n: int, at_least: int = 16) -> int:
    return max(at_least, 1 << (max(n, 1) - 1).bit_length())


_BLOCK_OUT = 64  # output columns per expand program: a decode step of a 576..1536-wide module runs 9..24 of them


def _block_in(r_pad: int, itemsize: int) -> int:
    """Input columns per step of the shrink's loop: 64, or 32 where a step's ``(BLOCK_IN, R_PAD)`` tile of A would
    pass 64 KiB (float32 with 512 columns: its pipelined copies would need ~300 KB of shared memory, more than an
    H100/H200 block's 227 KiB)."""
    return 64 if r_pad * itemsize <= 1024 else 32


def _block_t(T: int) -> int:
    """Tokens per program (both launches): 16, the smallest ``tl.dot`` tile, for decode steps and short prompts."""
    return 16 if T <= 16 else 32


def _grids(B: int, T: int, OUT: int) -> tuple[tuple[int, int], tuple[int, int, int]]:
    """The shrink's grid ``(B, ⌈T / BLOCK_T⌉)`` and the expand's ``(B, ⌈T / BLOCK_T⌉, ⌈OUT / BLOCK_OUT⌉)``."""
    nt = -(-T // _block_t(T))
    return (B, nt), (B, nt, -(-OUT // _BLOCK_OUT))


def routed_lora_(x: torch.Tensor, y: torch.Tensor, W: torch.Tensor, Bt: torch.Tensor, *, gate_k: int = 0,
                 bias: torch.Tensor | None = None, slots: torch.Tensor | None = None, finish: str = "none",
                 top_k: int | None = None) -> torch.Tensor | None:
    """Add the routed experts' output to ``y (B, T, out)`` in place; returns the gate's weights ``(B, T, Kg)``
    (float32), or ``None`` without a gate.

    ``x (B, T, in)``; ``W (B, in, Kg + R)``: ``gate_k`` gate vectors then the A factors (any strides with unit stride
    along ``in`` or the columns); ``Bt (B, R, out)`` with scales (and sequence weights) folded in; ``bias (B, Kg)``
    the gate's bias; ``slots (B, R)`` int32, each column's candidate slot (``-1``: padding); ``top_k`` experts per
    token (``None``: all)."""
    if not HAVE_TRITON:  # pragma: no cover
        raise RuntimeError("the routed-LoRA kernel needs triton (pip install 'moerge[gpu]')")
    B, T, IN = x.shape
    R = W.shape[2] - gate_k
    OUT = Bt.shape[2]
    x = x if x.stride(-1) == 1 else x.contiguous()
    if y.stride(-1) != 1 or Bt.stride(-1) != 1:
        raise ValueError("routed_lora_: y and Bt need unit stride along their last dimension")
    gate = gate_k > 0
    if gate:
        bias = bias.reshape(B, gate_k).float().contiguous()
        slots = slots.to(torch.int32).contiguous()
        wout = torch.empty(B, T, gate_k, device=x.device, dtype=torch.float32)
    else:
        bias = slots = wout = torch.empty(0, device=x.device)
    if B * T > 0:
        h = torch.empty(B, T, R, device=x.device, dtype=torch.float32)  # the weighted low-rank activations
        with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext(), _too_large(R, x):
            _launch(x, W, bias, slots, h, Bt, y, wout, B, T, IN, OUT, R, gate_k, finish, top_k, gate)
    return wout if gate else None


@contextlib.contextmanager
def _too_large(R: int, x: torch.Tensor):
    """Turn Triton's out-of-resources error at launch into :class:`KernelTooLarge`, remembering the shape. The
    shrink writes only its scratch and the gate's weights, so a failure of either launch leaves ``y`` as it was
    unless the expand ran (which it does only after the shrink launched)."""
    try:
        yield
    except OutOfResources as e:
        TOO_LARGE.add((_pow2(R), x.dtype, x.device))
        raise KernelTooLarge(str(e)) from e


def _launch(x, W, bias, slots, h, Bt, y, wout, B, T, IN, OUT, R, gate_k, finish, top_k, gate) -> None:
    shrink, expand = _grids(B, T, OUT)
    ieee = x.dtype == torch.float32
    R_PAD = _pow2(R)
    _shrink_kernel[shrink](
        x, W, bias, slots, h, wout,
        T, IN, R, gate_k,
        x.stride(0), x.stride(1), W.stride(0), W.stride(1), W.stride(2),
        GATE=gate, FINISH=FINISH_CODES[finish], TOP_K=min(top_k or gate_k, gate_k) if gate else 1,
        K_PAD=_pow2(gate_k), R_PAD=R_PAD, BLOCK_T=_block_t(T), BLOCK_IN=_block_in(R_PAD, W.element_size()), IEEE=ieee,
    )
    if OUT > 0 and R > 0:
        _expand_kernel[expand](  # after the shrink on the same stream: h is complete when it runs
            h, Bt, y,
            T, OUT, R,
            Bt.stride(0), Bt.stride(1), y.stride(0), y.stride(1),
            BLOCK_T=_block_t(T), BLOCK_R=min(R_PAD, 64), BLOCK_OUT=_BLOCK_OUT, IEEE=ieee,
        )
