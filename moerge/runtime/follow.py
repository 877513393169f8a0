"""A running model that follows its library folder.

Experts added, replaced or removed in the folder by any process (``moerge library add``/``rm``, a server, another
:class:`~moerge.library.ExpertLibrary` object) reach a running model through :class:`LibrarySync`: it compares
the manifest on disk with what the model took in (per expert, the sha256 of its files as the manifest listed them)
and applies the difference through :class:`~moerge.runtime.experts.ExpertSet`, one expert at a time, each change
all-or-nothing (routing data prepared outside the lock, then one swap). An expert whose files do not load or whose
routing data cannot be made is never made visible; the reason is kept in :attr:`LibrarySync.errors`.

:class:`LibraryFollower` does it on its own: a daemon thread that reads the stat of ``library.json`` a few times a
second (the manifest is replaced by a rename on every change, so its inode, size and mtime change) and syncs the
model when it changed. It holds the model through a weak reference, so it never keeps it alive.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from moerge.adapters.expert import Expert
from moerge.core.forked import run_forked
from moerge.errors import LibraryError
from moerge.library import ExpertLibrary
from moerge.routing import Router
from moerge.routing.training import current_cancel
from moerge.runtime.cache import CacheStats
from moerge.runtime.experts import ExpertSet
from moerge.runtime.fill import RoutingFill

__all__ = ["LibrarySync", "LibraryFollower", "SyncReport", "LivingLibrary"]


@dataclass
class SyncReport:
    """What one :meth:`LibrarySync.sync` did."""

    added: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # expert -> why it was not made visible
    deferred: list[str] = field(default_factory=list)  # experts the model was changing itself: left to the next sync

    @property
    def changed(self) -> bool:
        """Whether the model's experts changed."""
        return bool(self.added or self.replaced or self.removed)


class LibrarySync:
    """What a model took in from its library, and the application of the library's later changes to it.

    Args:
        library: the model's library.
        experts: the model's expert set.
        fill: when given, experts taken in by a sync whose routing data must be trained are taken in at once
            without it, and ``fill`` trains it in the background (see :mod:`moerge.runtime.fill`); else a sync
            trains it before the expert becomes visible.

    The model's own changes of the library (:meth:`add`, :meth:`remove`) go through here too, so that a sync never
    applies them a second time: while the model changes an expert, a sync leaves that name alone (and reports it
    as deferred), and once the change is done the name is recorded as taken in.
    """

    def __init__(self, library: ExpertLibrary, experts: ExpertSet, fill: RoutingFill | None = None) -> None:
        self.library = library
        self.experts = experts
        self.fill = fill
        self.seen: dict[str, dict[str, str]] = {}  # expert -> its files ({file: sha256}) when the model last looked
        self.errors: dict[str, str] = {}  # expert of the library the model does not hold -> why
        self._init_locks()

    def _init_locks(self) -> None:
        self._syncing = threading.Lock()  # one sync at a time
        self.persisting = threading.Lock()  # held while the model's router stores its routing data
        self._claims: set[str] = set()  # names being changed now, by a sync or by the model itself
        self._released = threading.Condition()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for k in ("_syncing", "persisting", "_claims", "_released"):
            state.pop(k)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_locks()

    def start(self, listing: dict[str, dict[str, str]]) -> None:
        """Record ``listing`` (see :meth:`ExpertLibrary.listing`) as what the model looked at when it was loaded:
        experts it left out then stay out until the library replaces them; experts added later are taken in."""
        self.seen = {n: dict(files) for n, files in listing.items()}

    # --- claims: one change of a name at a time -----------------------------------------------------------------
    def _claim(self, name: str, *, wait: bool) -> bool:
        with self._released:
            if name in self._claims:
                if not wait:
                    return False
                self._released.wait_for(lambda: name not in self._claims)
            self._claims.add(name)
            return True

    def _release(self, name: str) -> None:
        with self._released:
            self._claims.discard(name)
            self._released.notify_all()

    # --- the model's own changes ----------------------------------------------------------------------------------
    def add(self, expert: Expert, router: Router, *, overwrite: bool) -> Expert:
        """The model adds (or replaces) ``expert`` in the library and its set (:meth:`ExpertSet.add`); returns
        it as stored."""
        self._claim(expert.name, wait=True)
        try:
            stored, _ = self.experts.add(expert, router, library=self.library, overwrite=overwrite)
            self.seen[stored.name] = dict(self.library.info(stored.name)["files"])
            self.errors.pop(stored.name, None)
            return stored
        finally:
            self._release(expert.name)

    def remove(self, name: str, router: Router) -> None:
        """The model removes expert ``name`` from the library (when it lists it) and its set. An expert the model
        took from the library that the library no longer lists (another process removed it) is a
        :class:`LibraryError`, and nothing changes: the next sync drops it."""
        self._claim(name, wait=True)
        try:
            listed = name in self.library.listing()
            if not listed and name in self.seen and name in self.experts:
                raise LibraryError("the library no longer holds this expert: another process removed it (the model "
                                   "drops it when it next syncs with the library)", expert=name,
                                   file=self.library.location())
            if listed and name in self.errors and name not in self.experts:  # listed, but never taken in
                self.library.remove(name)
            else:
                self.experts.remove(name, router, library=self.library if listed else None)
            self.seen.pop(name, None)
            self.errors.pop(name, None)
        finally:
            self._release(name)

    # --- following the library -----------------------------------------------------------------------------------
    def sync(self, router: Router) -> SyncReport:
        """Apply what changed in the library since the model last looked: experts it no longer lists leave the
        model; experts new to it, or replaced there, are loaded and added or replaced (their routing data prepared
        by ``router`` outside the lock, then one swap each). An expert that fails is not made visible: the reason
        is kept in :attr:`errors` (and warned about) and it is tried again when the library replaces it. Experts
        the model left out at load, or removed from itself only, stay out until the library replaces them."""
        report = SyncReport()
        with self._syncing:
            listing = self.library.listing()
            known = [*self.seen, *self.errors]  # copied at once: the model's own changes may insert meanwhile
            for name in dict.fromkeys(n for n in known if n not in listing):
                self._apply(name, None, router, report)
            for name, files in listing.items():
                if self.seen.get(name) != files:
                    self._apply(name, files, router, report)
        return report

    def _apply(self, name: str, files: dict[str, str] | None, router: Router, report: SyncReport) -> None:
        """Bring expert ``name`` in step with the library, which lists it with ``files`` (``None``: not at all)."""
        if not self._claim(name, wait=False):
            report.deferred.append(name)
            return
        try:
            held, known = name in self.experts, name in self.seen
            if files is None:
                if held and known:  # the library's, not one the model holds as its own
                    self.experts.remove(name, router)
                    report.removed.append(name)
                self.seen.pop(name, None)
                self.errors.pop(name, None)
                return
            if held and not known:  # looked at again by every sync, until the model's own is removed
                self._failed(name, "the model holds its own expert of this name (added with persist=False); remove "
                                   "it from the model and sync to take the library's in", report)
                return
            if not held and known and name not in self.errors:
                self.seen[name] = files  # left out of this model: stays out
                return
            problem = self._take_in(name, held, router, report)
            if problem is None:
                self.errors.pop(name, None)
            else:
                self._failed(name, problem, report)
            self.seen[name] = files  # a failed version is tried again when the library replaces it
        finally:
            self._release(name)

    def _failed(self, name: str, problem: str, report: SyncReport) -> None:
        if self.errors.get(name) != problem:  # warned once per problem, not at every sync
            warnings.warn(f"expert {name!r} of the library {self.library.url} was not taken in: {problem}",
                          RuntimeWarning, stacklevel=5)
        self.errors[name] = report.failed[name] = problem

    def _take_in(self, name: str, held: bool, router: Router, report: SyncReport) -> str | None:
        """Load expert ``name`` from the library and add it (``held``: replace the model's); ``None`` when done,
        else why it could not be."""
        try:
            stored, deferred = self.experts.add(self.library.stored(name), router, overwrite=held,
                                                defer=self.fill is not None)
        except Exception as e:  # noqa: BLE001 - any failure leaves the set as it was; the reason is reported
            return f"{type(e).__name__}: {e}"
        if deferred:
            self.fill.submit([stored], router)
        (report.replaced if held else report.added).append(name)
        return None


class LibraryFollower:
    """A daemon thread that keeps ``model`` in step with its library folder (see :meth:`MoErgeModel.sync_library`).

    Every ``interval`` seconds it reads the stat of the library's ``library.json`` (the ETag of a library on a
    store: :meth:`ExpertLibrary.stamp`); when it changed (or when the
    last sync left names to a later one) it has the model sync. It ends when :meth:`stop` is called (by
    ``model.close()`` or ``model.unpatch()``) or when the model is garbage collected. A sync that fails as a whole
    (e.g. an unreadable manifest) is warned about once and kept in :attr:`error`.
    """

    def __init__(self, model: Any, interval: float | None = None) -> None:
        if model.library is None:
            raise LibraryError("this model has no library to follow")
        if interval is None:  # a store is asked over the network: once a second, the Hub once a minute
            interval = 0.2 if model.library.remote is None else model.library.remote.poll_interval
        if not isinstance(interval, (int, float)) or not interval > 0:
            raise ValueError(f"interval must be a positive number of seconds, got {interval!r}")
        self.interval = float(interval)
        self.library = model.library
        self.syncs = 0  # syncs done
        self.error: str | None = None
        self._model = weakref.ref(model)
        self._stop = threading.Event()
        self._synced = threading.Condition()
        weakref.finalize(model, self._stop.set)
        self._thread = threading.Thread(target=self._run, name=f"moerge-follow:{self.library.url}", daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        """Stop following; waits for a sync under way (unless called from the follower's own thread)."""
        self._stop.set()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def wait(self, predicate: Callable[[], bool], timeout: float | None = None) -> bool:
        """Block until ``predicate()`` holds, checked now and after each sync, or ``timeout`` seconds pass;
        returns whether it holds."""
        with self._synced:
            return self._synced.wait_for(predicate, timeout)

    def _report(self, e: Exception) -> None:
        """Keep ``e`` in :attr:`error`, warned about once (until another problem or a sync that succeeds)."""
        problem = f"{type(e).__name__}: {e}"
        if problem != self.error:
            warnings.warn(f"following the library {self.library.url}: {problem}", RuntimeWarning, stacklevel=1)
        self.error = problem

    def _run(self) -> None:
        seen, again = None, True  # the first look syncs: the library may have changed since the model was loaded
        while not self._stop.wait(self.interval):
            try:
                stamp = self.library.stamp()
            except LibraryError as e:  # a store that cannot be reached now: said once, looked at again later
                self._report(e)
                continue
            if stamp is None or (stamp == seen and not again):
                continue
            model = self._model()
            if model is None:
                return
            try:
                again = bool(model.sync_library().deferred)
                self.error = None
            except Exception as e:  # noqa: BLE001 - the thread must go on; the error is reported, once
                self._report(e)
                again = False
            finally:
                del model
            seen = stamp
            with self._synced:
                self.syncs += 1
                self._synced.notify_all()


class LivingLibrary:
    """The part of :class:`~moerge.MoErgeModel` that keeps a running model in step with its library: syncing with
    the folder, following it, and the routing data trained in the background (a mixin: the model gives
    ``expert_set``, ``router``, ``library``, ``follower``, ``_library_sync`` and ``_fill``)."""

    expert_set: ExpertSet
    router: Router
    follower: LibraryFollower | None
    _library_sync: LibrarySync | None
    _fill: RoutingFill
    library: ExpertLibrary | None
    _loading: bool

    def _persist_routing(self) -> None:
        """Let the router store the routing data it computed (a cache: a failure is a warning, not an error)."""
        if self.library is None:
            return
        try:
            with self._library_sync.persisting:
                self.router.persist(self.library)
        except OSError as e:
            warnings.warn(f"router {self.router.name!r} could not store its routing data in {self.library.url}: {e}",
                          stacklevel=3)

    def _run_forked(self, fn: Any) -> Any:
        """``fn`` (a router's training) in a forked child (lock held while forking); at load, here (all threads)."""
        return fn() if self._loading else run_forked(fn, hold=self.expert_set.lock, cancel=current_cancel())

    @property
    def resident_experts(self) -> list[str]:
        """The experts whose factors are in memory now, least recently used first."""
        with self.expert_set.lock:
            return list(self.expert_set.cache.resident)

    def cache_stats(self) -> CacheStats:
        """Which experts' factors are in memory, against the budget (``cache_bytes``; with two tiers,
        ``device_cache_bytes`` for the banks and the host tier's figures), and the hits, misses and evictions so
        far."""
        return self.expert_set.cache_stats()

    def sync_library(self) -> SyncReport:
        """Take in what any process changed in the library folder since the model last looked, one expert at a time,
        all or nothing (see :meth:`LibrarySync.sync <moerge.runtime.follow.LibrarySync.sync>`); an expert that
        cannot be taken in stays invisible, why is in :attr:`library_errors`. Returns what changed."""
        self.expert_set.require_active()
        if self._library_sync is None:
            raise LibraryError("this model has no library to sync with")
        report = self._library_sync.sync(self.router)
        if report.changed:
            self._persist_routing()
        return report

    @property
    def library_errors(self) -> dict[str, str]:
        """Experts of the library the model could not take in, and why (files, routing data, a name clash)."""
        return {} if self._library_sync is None else dict(self._library_sync.errors)

    def follow_library(self, interval: float | None = None) -> LibraryFollower:
        """Follow the library from now on: a daemon thread calls :meth:`sync_library` when the manifest changes
        (see :class:`~moerge.runtime.follow.LibraryFollower`; it looks every ``interval`` seconds, by default 0.2
        for a folder, 1 for a library on a store and 60 on the Hub); :meth:`close` stops it."""
        self.expert_set.require_active()
        if self.follower is not None:
            self.follower.stop()
        self.follower = LibraryFollower(self, interval)
        return self.follower

    # --- routing data trained in the background (train_routing="background") -------------------------------------
    @property
    def pending_routing(self) -> list[str]:
        """Experts the model holds whose routing data is being trained in the background: usable by name (and by a
        global stage), not yet chosen by a local gate."""
        return self._fill.pending

    @property
    def routing_errors(self) -> dict[str, str]:
        """Experts whose routing data could not be trained in the background, and why (they stay usable by name)."""
        return dict(self._fill.errors)

    def wait_routing(self, timeout: float | None = None) -> bool:
        """Block until the routing data trained in the background is in, or ``timeout`` seconds pass; returns
        whether it is."""
        return self._fill.wait(timeout)

    def close(self) -> None:
        """Stop following the library (waits for a sync under way) and training routing data in the background;
        the model keeps serving what it holds."""
        if self.follower is not None:
            self.follower.stop()
            self.follower = None
        self._fill.close()
