"""Slow work in a forked child process, so it never shares the serving process's GIL or its scheduling priority.

Routing data trained while a model serves (an added expert's gates) competes with the calls being served. In a
thread it shares the process's one GIL with them: on a small machine calls then run about twice as slow for the
whole training. :func:`run_forked` runs the training in a child forked from the serving process: the child sees
the base, the router and the expert as they are (copy-on-write: no weight is copied or pickled), trains with one
torch thread at a lower CPU priority (:data:`CHILD_NICE`), sends its result back through a pipe (pickled) and
exits. The parent's thread waits on the pipe without holding the GIL.

Forking a process with threads is safe here because the child only runs ``fn`` and leaves with ``os._exit``:
``hold`` (the model's lock) is held while forking, so no other thread holds it in the child's copy; torch's
OpenMP pool of the parent cannot be used after a fork, so the child runs torch with one thread; tqdm's lock, which
its monitor thread may hold at the moment of the fork, is replaced in the child (logging, the import lock and
malloc reset theirs themselves). Where there is no
``fork`` (Windows), or for a CUDA model (CUDA cannot be used in a forked child), callers run ``fn`` in-process.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import select
import signal
import sys
import threading
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["CHILD_NICE", "can_fork", "run_forked", "ChildProcessError_"]

T = TypeVar("T")

CHILD_NICE = 10  # added to the child's nice value: the calls being served come first


class ChildProcessError_(RuntimeError):  # noqa: N801 - distinct from the builtin ChildProcessError (an OSError)
    """The child process ended without giving a result (killed, or crashed)."""


def can_fork() -> bool:
    """Whether :func:`run_forked` can fork here (POSIX with ``os.fork``; not under Windows)."""
    return hasattr(os, "fork") and sys.platform != "win32"


def _fresh_locks() -> None:  # pragma: no cover - runs in the forked child
    """Give the child new locks where a thread the fork did not copy may have held the parent's: tqdm's (its
    monitor thread takes it every few seconds; a progress bar would wait for it forever)."""
    try:
        from tqdm.auto import tqdm as auto
        from tqdm.std import tqdm as std
    except ImportError:
        return
    for cls in {std, auto}:
        cls.set_lock(threading.RLock())
        cls.monitor_interval = 0  # no monitor thread in the child


def _child(fn: Callable[[], Any], w: int) -> None:  # pragma: no cover - runs in the forked child
    try:
        with contextlib.suppress(OSError):
            os.nice(CHILD_NICE)
        import torch

        torch.set_num_threads(1)  # the parent's OpenMP pool is unusable after a fork
        _fresh_locks()
        try:
            result: tuple[str, Any] = ("ok", fn())
        except BaseException as e:  # noqa: BLE001 - given back to the parent
            result = ("error", e)
        try:
            data = pickle.dumps(result)
        except Exception:  # noqa: BLE001 - an exception (or result) that does not pickle: its text
            err = result[1] if result[0] == "error" else TypeError("the result does not pickle")
            data = pickle.dumps(("error", RuntimeError(f"{type(err).__name__}: {err}")))
        with os.fdopen(w, "wb") as f:
            f.write(data)
    finally:
        os._exit(0)


def run_forked(fn: Callable[[], T], *, hold: Any = None, cancel: threading.Event | None = None) -> T:
    """``fn()`` run in a forked child process; its result, or its exception raised here.

    Args:
        fn: what the child runs; its result must pickle.
        hold: a lock held while forking (released in the parent right after), so that no other thread holds it
            in the child's copy; ``fn`` may take it in the child.
        cancel: when set while the child runs, the child is killed and :class:`ChildProcessError_` raised.
    """
    r, w = os.pipe()
    with hold if hold is not None else contextlib.nullcontext(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*multi-threaded.*fork", category=DeprecationWarning)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            os.close(r)
            _child(fn, w)
    os.close(w)
    chunks: list[bytes] = []
    try:
        while True:
            ready, _, _ = select.select([r], [], [], 0.1)
            if cancel is not None and cancel.is_set():
                os.kill(pid, signal.SIGKILL)
                raise ChildProcessError_("cancelled")
            if ready:
                chunk = os.read(r, 1 << 20)
                if not chunk:
                    break
                chunks.append(chunk)
    finally:
        os.close(r)
        _, status = os.waitpid(pid, 0)
    if not chunks:
        raise ChildProcessError_(f"the training process ended without a result (wait status {status})")
    kind, value = pickle.loads(b"".join(chunks))
    if kind == "error":
        raise value
    return value
