"""Routing data trained in the background, for experts a model took in without it.

A model built with ``train_routing="background"`` (what ``moerge serve`` does) does not train routing data
(PHATGOOSE gates, X-LoRA head rows) before it serves: experts whose data the library lacks are taken in at once
with :meth:`Router.defer_expert <moerge.routing.Router.defer_expert>` — usable by name, and chosen by a global
stage (GLIDER's index) but not by a local gate — and :class:`RoutingFill` trains their data one expert at a time,
in a daemon thread, on a private copy of the base, outside the model's lock. Each expert's data is then given to
the router in one swap under the lock (calls under way keep the routing they started with) and stored in the
library. Data trained for an expert that was meanwhile replaced or removed is dropped (data trained for a router
the model has meanwhile replaced by :meth:`~moerge.MoErgeModel.set_router` goes to that old router, unused); a failure is kept in :attr:`RoutingFill.errors` (the expert stays usable by name).
"""

from __future__ import annotations

import atexit
import threading
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from moerge.adapters.expert import Expert
from moerge.routing import Router
from moerge.routing.training import TrainingCancelled, cancellable
from moerge.runtime.experts import ExpertSet

__all__ = ["RoutingFill"]

_EXIT_WAIT = 30.0  # seconds the interpreter's exit waits for a training step under way to see it is cancelled
_live: weakref.WeakSet[RoutingFill] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    """At exit, cancel background training and let its thread end: torch must not be running in a daemon thread
    while the interpreter tears down (that aborts the process)."""
    fills = list(_live)
    for f in fills:
        f.close()
    for f in fills:
        thread = f._thread
        if thread is not None:
            thread.join(_EXIT_WAIT)


class RoutingFill:
    """A queue of experts whose routing data is to be trained, and the daemon thread that trains it.

    Args:
        experts: the model's expert set (its lock guards each swap).
        persist: called after each swap to store the new data in the library.

    A copy (``copy.deepcopy`` of the model) starts with nothing queued.
    """

    def __init__(self, experts: ExpertSet, persist: Callable[[], None]) -> None:
        self.experts = experts
        self._persist = persist
        self.errors: dict[str, str] = {}  # expert -> why its routing data could not be trained
        self._init_queue()

    def _init_queue(self) -> None:
        self._queue: deque[tuple[Expert, Router]] = deque()
        self._busy: str | None = None  # the expert being trained now
        self._changed = threading.Condition()
        self._stop = False
        self._cancel = threading.Event()  # set by close: a training under way stops at its next step
        self._thread: threading.Thread | None = None
        _live.add(self)

    def __getstate__(self) -> dict[str, Any]:
        return {k: self.__dict__[k] for k in ("experts", "_persist", "errors")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_queue()

    @property
    def pending(self) -> list[str]:
        """Experts whose routing data is queued or being trained, in order."""
        with self._changed:
            return ([self._busy] if self._busy else []) + [e.name for e, _ in self._queue]

    def submit(self, experts: Sequence[Expert], router: Router) -> None:
        """Train the routing data of ``experts`` (taken in by ``router.defer_expert``) in the background."""
        if not experts:
            return
        with self._changed:
            self._stop = False
            self._cancel.clear()
            names = {e.name for e in experts}
            self._queue = deque((e, r) for e, r in self._queue if e.name not in names)  # a newer version wins
            self._queue.extend((e, router) for e in experts)
            for n in names:
                self.errors.pop(n, None)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="moerge-routing-fill", daemon=True)
                self._thread.start()
            self._changed.notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until nothing is queued or being trained, or ``timeout`` seconds pass; returns whether done."""
        with self._changed:
            return self._changed.wait_for(lambda: not self._queue and self._busy is None, timeout)

    def close(self) -> None:
        """Train nothing more until the next :meth:`submit`: what is queued is dropped, a training under way stops
        at its next step and its data is not given to the router."""
        with self._changed:
            self._stop = True
            self._cancel.set()
            self._queue.clear()
            self._changed.notify_all()

    def _next(self) -> tuple[Expert, Router] | None:
        with self._changed:
            self._busy = None
            self._changed.notify_all()
            if self._stop or not self._queue:
                self._thread = None  # a later submit starts another
                return None
            expert, router = self._queue.popleft()
            self._busy = expert.name
            return expert, router

    def _run(self) -> None:
        while (item := self._next()) is not None:
            expert, router = item
            with self.experts.lock:
                if not self._current(expert):  # replaced or removed while it waited: nothing to train
                    continue
            try:
                with cancellable(self._cancel):
                    prepared = router.prepare_expert(expert)  # slow: trains on a private base, outside the lock
                with self.experts.lock:
                    if self._stop or not self._current(expert):
                        continue  # replaced or removed meanwhile: data for nothing
                    router.on_add_expert(expert, prepared)
                    self.errors.pop(expert.name, None)
            except TrainingCancelled:
                continue
            except Exception as e:  # noqa: BLE001 - the thread goes on; the expert stays usable by name
                if self._stop:  # cancelled by close (a training process is killed)
                    continue
                with self.experts.lock:
                    if not self._current(expert):  # replaced or removed meanwhile (its files may be gone)
                        continue
                self.errors[expert.name] = f"{type(e).__name__}: {e}"
                warnings.warn(f"the routing data of expert {expert.name!r} could not be trained: {e}; it is used "
                              "only when asked for by name", RuntimeWarning, stacklevel=1)
                continue
            try:
                self._persist()
            except Exception as e:  # noqa: BLE001 - storing is a cache; the router holds the data
                warnings.warn(f"the routing data of expert {expert.name!r} could not be stored: {e}",
                              RuntimeWarning, stacklevel=1)

    def _current(self, expert: Expert) -> bool:
        """Whether the model still holds this version of ``expert`` (under the lock)."""
        return self.experts.active and self.experts.metadata.get(expert.name) is expert.metadata
