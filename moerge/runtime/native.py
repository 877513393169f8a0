"""The routed step as one native call on CPU (``csrc/routed_step.cpp``).

A decode step on CPU ran each patched module's routed part as about ten torch calls on tensors of a few hundred
elements, each with ~2–3 µs of fixed cost (:meth:`moerge.runtime.gathered.GatheredModule.fast_step`); on SmolLM2
(210 patched modules) that was a quarter of the step. The same formulas as one C++ call: the gate, the top-k
softmax, the shrink of the chosen candidates' columns only (the gathered ``W`` is laid out by columns) and the
expand of their rows of ``Bt``, added into the base output in place. A decode step is bound by reading those
factors, so skipping the candidates a token did not choose is the other half of the gain.

It is compiled with the machine's C++ compiler by :func:`torch.utils.cpp_extension.load` (``-march=native``), into
torch's extension cache (``$TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``) under a name made of
the source, torch's version and the CPU, so another CPU never loads it; later processes reuse it. The build takes
about half a minute, once: ``make setup`` does it, and a model built on CPU does it before it serves anything.
Without a compiler, or if the build fails, a warning says so once and the torch path runs. ``MOERGE_NO_KERNEL=1``
turns it off, as it does the Triton kernel.

It reads each column where it lies, by index: a request on CPU copies no factors (the rows of the layers' banks,
:class:`moerge.runtime.gathered.BankRows`), and a joined batch is a list of segments, each with its own request's
tensors. It takes float32 steps of any length (:func:`fits`): per token only the chosen candidates' columns are
computed, four at a time in vector registers (GCC/Clang vector extensions), and a prompt's tokens run on torch's
threads (OpenMP), which beats the torch path's matmuls over every candidate. Results equal the torch path's up to
float rounding (sums in another order), except that exactly equal gate logits are broken by the lower candidate slot,
where ``torch.topk`` leaves ties unspecified.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["available", "step", "step_segments", "gathered_segment", "fits", "MAX_TOKENS", "PARALLEL", "build"]

log = logging.getLogger(__name__)

MAX_TOKENS = 16
"""Built without OpenMP: steps of at most this many tokens (rows × tokens), and decode steps (one token per row) of
any batch, run natively even when the factors were copied for another path."""

MAX_UNCOPIED_TOKENS = 256
"""Built without OpenMP: steps of at most this many tokens run natively when the request's factors are still where
they lie in the banks (the torch path would copy them out first; see :class:`moerge.runtime.gathered.BankRows`).
Measured per module shape (K=4, rank 8, top-2, one thread): at 64 tokens of one row the native step takes 1.1–1.3×
the time of the torch path's two-thread matmuls alone, before the copy and the torch path's other calls."""

PARALLEL = False
"""Whether the loaded build runs a step's tokens on torch's threads (OpenMP); set when it is loaded. Measured per
module shape (K=4, rank 8, top-2, two threads): 0.54–0.89× the time of the torch path's matmuls alone (before the
copy and the torch path's other calls), at 64 to 1,024 tokens."""

SOURCE = Path(__file__).with_name("csrc") / "routed_step.cpp"
FINISH = {"none": 0, "abs": 1, "standardized": 2}

_lock = threading.Lock()
_module: Any = None
_failed: str | None = None


def _disabled() -> bool:
    return os.environ.get("MOERGE_NO_KERNEL", "0") not in ("", "0")


def _cpu_tag() -> str:
    """The CPU this process runs on (its model and feature flags): a build made with ``-march=native`` on another
    CPU is not loaded here."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return os.uname().machine
    keep = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features"))][:2]
    return "\n".join(keep)


def _name() -> str:
    digest = hashlib.sha256(SOURCE.read_bytes() + Path(__file__).read_bytes() + _cpu_tag().encode()
                            + torch.__version__.encode()).hexdigest()
    return f"moerge_routed_step_{digest[:12]}"


def build(verbose: bool = False) -> Any:
    """The compiled module (building it if no build for this source and CPU is cached); raises if it cannot be
    built. With OpenMP (a prompt's tokens on torch's threads: ``libgomp.so.1``, which torch has loaded, so the same
    runtime and not a second one) when the compiler has it, else without (one thread)."""
    from torch.utils import cpp_extension

    flags = ["-O3", "-march=native", "-ffp-contract=fast"]
    path = os.environ.get("PATH", "")
    if shutil.which("ninja") is None:  # the `ninja` package's binary, when its folder is not on PATH (a venv's
        with contextlib.suppress(ImportError):  # python run without activating it)
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + path
    try:
        global PARALLEL
        try:
            module = cpp_extension.load(name=_name(), sources=[str(SOURCE)], extra_cflags=[*flags, "-fopenmp"],
                                        extra_ldflags=["-fopenmp"], verbose=verbose)
            PARALLEL = True
            return module
        except Exception as e:  # no OpenMP with this compiler: the same code on one thread
            log.info("moerge: the native CPU step builds without OpenMP (%s)", str(e).splitlines()[0][:200])
            PARALLEL = False
            return cpp_extension.load(name=_name() + "_serial", sources=[str(SOURCE)],
                                      extra_cflags=[*flags, "-fopenmp-simd"], verbose=verbose)
    finally:
        os.environ["PATH"] = path


def _load() -> Any:
    global _module, _failed
    with _lock:
        if _module is None and _failed is None:
            try:
                log.info("moerge: building the native CPU step (once per machine, about half a minute)")
                _module = build()
            except Exception as e:  # no compiler, no ninja, a failed build: the torch path runs instead
                _failed = f"{type(e).__name__}: {e}"
                warnings.warn(f"moerge: the native CPU step could not be built, so the slower torch path runs "
                              f"({_failed.splitlines()[0][:300]})", RuntimeWarning, stacklevel=3)
    return _module


def fits(x: torch.Tensor, y: torch.Tensor, uncopied: bool = False) -> bool:
    """Whether a step on ``x (B, T, in)`` adding into ``y`` is one the native step takes, ``y`` contiguous (written
    in place): any step when it runs on torch's threads (:data:`PARALLEL`: it then beats the torch path's matmuls
    at every length, having only the chosen candidates' columns to compute); built without OpenMP, a decode step
    (``T`` 1), at most :data:`MAX_TOKENS` tokens, or :data:`MAX_UNCOPIED_TOKENS` when the factors are still in
    the banks (``uncopied``: the torch path would copy them first)."""
    if not y.is_contiguous():
        return False
    n = x.shape[0] * x.shape[1]
    return PARALLEL or x.shape[1] == 1 or n <= MAX_TOKENS or (uncopied and n <= MAX_UNCOPIED_TOKENS)


def available() -> bool:
    """Whether the native step can run in this process (building it on first call); ``False`` when
    ``MOERGE_NO_KERNEL=1`` or the build failed."""
    if _disabled():
        return False
    return (_module if _module is not None else _load()) is not None


def gathered_segment(W: torch.Tensor, Bt: torch.Tensor, slots: torch.Tensor | None, bias: torch.Tensor | None,
                     kg: int) -> tuple:
    """The step's operands for factors gathered into one request's tensors: ``W (B, in, kg + R)`` (a fused gate's
    vectors, then the factors Aᵀ; read fastest laid out by columns, as :meth:`ModuleBank.gather` makes it) and
    ``Bt (B, R, out)`` with the scales folded in."""
    B, d_in, C = W.shape
    R = Bt.shape[1]
    if Bt.dim() != 3 or Bt.shape[0] != B or C != kg + R:
        raise RuntimeError("moerge native step: W and Bt do not match")
    cols = W.transpose(1, 2)  # (B, C, in)
    cols = cols if cols.is_contiguous() else cols.contiguous()
    rows = torch.arange(B).unsqueeze(1)
    return (cols.reshape(B * C, d_in), rows * C + kg + torch.arange(R), Bt.contiguous().reshape(B * R, -1),
            rows * R + torch.arange(R), None, cols[:, :kg].transpose(1, 2) if kg else None, slots, bias)


def step_segments(segments: list[tuple], kg: int, finish: str,
                  top_k: int | None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None]:
    """One module's routed step with a request's operands bound (checked once): ``run(x, y)`` adds the routed part
    to ``y`` in place and returns the gate's weights ``(B, T, kg)`` (``None`` when ``kg`` is 0); see the source's
    header for the formulas. ``segments``: the rows of the batch in order, each ``(A, a_idx, Bt, b_idx, scale, Vt,
    slots, bias)``: column ``r`` of row ``b`` is row ``a_idx[b, r]`` of ``A (n, in)`` and row ``b_idx[b, r]`` of
    ``Bt (m, out)``, times ``scale[b, r]`` (``None``: 1); ``Vt (b, in, k ≤ kg)`` the gate's vectors (each
    contiguous), ``slots (b, R)`` each column's candidate slot (``-1``: padding), ``bias (b, 1, k)``. Call only after
    :func:`available` said yes."""
    return _module.Step(segments, kg, FINISH[finish], 0 if top_k is None else int(top_k))


def step(W: torch.Tensor, Bt: torch.Tensor, slots: torch.Tensor | None, bias: torch.Tensor | None, kg: int,
         finish: str, top_k: int | None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None]:
    """:func:`step_segments` for one request's gathered factors (:func:`gathered_segment`)."""
    return step_segments([gathered_segment(W, Bt, slots, bias, kg)], kg, finish, top_k)
