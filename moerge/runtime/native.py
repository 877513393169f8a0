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

It runs float32 decode steps and steps of at most :data:`MAX_TOKENS` tokens (short prompts); longer prompts'
matmuls are faster in torch's BLAS. Results equal the torch path's up to float rounding (sums in another order), except
that exactly equal gate logits are broken by the lower candidate slot, where ``torch.topk`` leaves ties unspecified.
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

__all__ = ["available", "step", "fits", "MAX_TOKENS", "build"]

log = logging.getLogger(__name__)

MAX_TOKENS = 16
"""Steps of at most this many tokens (rows × tokens), and decode steps (one token per row) of any batch, run
natively; longer prompts in torch (measured per module shape: the native step is 1.2–2.4× faster at 16 tokens of one
row, 1.1–1.3× at one token of 32 or 64 rows, and slower at 64 tokens of one row, where torch's BLAS reuses each
factor over many tokens)."""

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
    built."""
    from torch.utils import cpp_extension

    flags = ["-O3", "-march=native", "-ffp-contract=fast", "-fopenmp-simd"]
    path = os.environ.get("PATH", "")
    if shutil.which("ninja") is None:  # the `ninja` package's binary, when its folder is not on PATH (a venv's
        with contextlib.suppress(ImportError):  # python run without activating it)
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + path
    try:
        return cpp_extension.load(name=_name(), sources=[str(SOURCE)], extra_cflags=flags, verbose=verbose)
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


def fits(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Whether a step on ``x (B, T, in)`` adding into ``y`` is one the native step takes: a decode step (``T`` 1) or
    at most :data:`MAX_TOKENS` tokens, and ``y`` contiguous (written in place)."""
    return (x.shape[1] == 1 or x.shape[0] * x.shape[1] <= MAX_TOKENS) and y.is_contiguous()


def available() -> bool:
    """Whether the native step can run in this process (building it on first call); ``False`` when
    ``MOERGE_NO_KERNEL=1`` or the build failed."""
    if _disabled():
        return False
    return (_module if _module is not None else _load()) is not None


def step(W: torch.Tensor, Bt: torch.Tensor, slots: torch.Tensor | None, bias: torch.Tensor | None, kg: int,
         finish: str, top_k: int | None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None]:
    """One module's routed step with a request's operands bound (checked once): ``run(x, y)`` adds the routed part
    to ``y`` in place and returns the gate's weights ``(B, T, kg)`` (``None`` when ``kg`` is 0); see the source's
    header for the formulas. ``W (B, in, kg + R)`` is read fastest laid out by columns (each column contiguous, as
    :meth:`moerge.runtime.bank.ModuleBank.gather` makes it). Call only after :func:`available` said yes."""
    return _module.Step(W, Bt, slots, bias, kg, FINISH[finish], 0 if top_k is None else int(top_k))
