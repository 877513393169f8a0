"""Which experts' factors a model holds in memory: read when a call first needs them, evicted least recently used
past a byte budget.

A model built from a library takes its experts in as :class:`~moerge.adapters.expert.StoredExpert` (name, metadata
and layout; the weights stay on disk). :class:`ExpertCache` is the book of which of them are *resident* (their
factors in the layers' banks), in least-recently-used order, with their sizes, the budget, the pinned names and the
counters :meth:`ExpertCache.stats` reports. The :class:`~moerge.runtime.experts.ExpertSet` does the loading and the
bank changes under its lock; this module only decides and counts.

Experts given to a model in memory and never stored in a library (``add_expert(..., persist=False)``, or a model
without a library) cannot be read back, so they are never evicted.

Two tiers when the banks are on an accelerator and ``device_budget`` (``device_cache_bytes``) is given: the banks
are the device tier, within it, and :class:`HostTier` keeps the experts read from the library in host memory,
within ``budget`` (``cache_bytes``), so that an expert dropped from the device comes back by a copy from host memory
rather than a read of its files. Otherwise (banks in host memory, or no device budget) the banks are the only tier
and ``budget`` is theirs, wherever they are.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import torch

from moerge.adapters.expert import Expert, StoredExpert
from moerge.errors import LibraryError
from moerge.runtime.bank import ModuleBank
from moerge.runtime.layer import ExpertLinear

__all__ = ["ExpertCache", "CacheStats", "HostTier", "Residency", "LOW_WATER"]

LOW_WATER = 0.8  # past the budget, experts are evicted until this share of it is used (fewer, larger evictions)
_READERS: ThreadPoolExecutor | None = None
_READERS_LOCK = threading.Lock()


def _readers() -> ThreadPoolExecutor:
    """The threads that read a call's missing experts side by side (made on first use, shared by all models)."""
    global _READERS
    with _READERS_LOCK:
        if _READERS is None:
            _READERS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="moerge-read")
        return _READERS


def _forget_readers() -> None:  # pragma: no cover - runs in a forked child, whose copy of the pool has no threads
    global _READERS, _READERS_LOCK
    _READERS, _READERS_LOCK = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_readers)


def _libc_trim() -> Any:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_TRIM = _libc_trim() if sys.platform.startswith("linux") else None


def give_back_memory() -> None:
    """Return freed heap memory to the system (glibc's ``malloc_trim``): evicted experts' banks and the buffers
    experts were read into are freed in pieces of a few MiB, which glibc keeps in its heap (their size is under
    its adaptive mmap threshold); without this the process's RSS would keep what the budget let go."""
    if _TRIM is not None:
        _TRIM(0)


@dataclass(frozen=True)
class CacheStats:
    """What :meth:`MoErgeModel.cache_stats` reports.

    Attributes:
        hits: experts a call needed that were resident.
        misses: experts a call needed that were not in the banks (each counted once per call): read from the
            library, or with two tiers possibly taken from host memory (``host_hits`` of them).
        evictions: experts whose factors were dropped to stay within the budget.
        load_seconds: time spent reading and taking in missed experts.
        resident: experts whose factors are in memory now; ``resident_bytes`` their size.
        experts: experts the model routes over (resident or not).
        budget_bytes: the budget of the banks (``None``: none, nothing is evicted): ``device_cache_bytes`` with two
            tiers (banks on an accelerator under a device budget), else ``cache_bytes``.
        pinned: experts never evicted (pinned, or held only in memory).
        host_resident, host_bytes, host_hits, host_budget_bytes: the host tier, with two tiers
            (experts kept in host memory, their bytes, misses of the banks it served instead of the library's
            files, its budget ``cache_bytes``); zeros and ``None`` without one.
    """

    hits: int
    misses: int
    evictions: int
    load_seconds: float
    resident: int
    resident_bytes: int
    experts: int
    budget_bytes: int | None
    pinned: int
    host_resident: int = 0
    host_bytes: int = 0
    host_hits: int = 0
    host_budget_bytes: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_budget(value: Any, what: str) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        raise ValueError(f"{what} must be a non-negative int of bytes or None, got {value!r}")


def _nbytes(expert: Expert) -> int:
    return sum(t.nbytes for m, w in expert.modules.items() for t in w.tensors(m).values())


class HostTier:
    """Experts read from the library, kept in host memory for banks on an accelerator: least recently used first,
    dropped past ``budget`` bytes (``None``: no limit). An entry serves only while its expert's source is the one it
    was read from (an expert replaced in the library is read again)."""

    def __init__(self, budget: int | None) -> None:
        self.budget = budget
        self.held: OrderedDict[str, tuple[StoredExpert, Expert, int]] = OrderedDict()
        self.hits = 0

    @property
    def used(self) -> int:
        return sum(entry[2] for entry in self.held.values())

    def get(self, name: str, source: StoredExpert | None, *, count: bool = True) -> Expert | None:
        """The expert kept for ``name`` if it was read from ``source`` (``count``: a hit of the banks' miss)."""
        entry = self.held.get(name)
        if entry is None or entry[0] is not source:
            return None
        self.held.move_to_end(name)
        self.hits += count
        return entry[1]

    def holds(self, name: str, expert: Expert) -> bool:
        """Whether ``expert`` is the very copy kept for ``name``."""
        entry = self.held.get(name)
        return entry is not None and entry[1] is expert

    def put(self, source: StoredExpert, expert: Expert) -> None:
        size = _nbytes(expert)
        self.held.pop(source.name, None)
        if self.budget is not None and size > self.budget:
            return
        self.held[source.name] = (source, expert, size)
        used = self.used
        while self.budget is not None and used > self.budget:
            used -= self.held.popitem(last=False)[1][2]

    def forget(self, name: str) -> None:
        self.held.pop(name, None)


class ExpertCache:
    """The residency book of one model's experts (the caller holds the model's lock).

    Args:
        budget: bytes the experts' factors may take (``cache_bytes``; ``None``: no limit; experts are still read
            only when first needed): the banks', or the host tier's with two tiers.
        pin: names that, once known, are read at once and never evicted.
        device_budget: bytes the banks may take when they are on an accelerator (``device_cache_bytes``; ``None``:
            one tier).
    """

    def __init__(self, budget: int | None = None, pin: Iterable[str] = (), device_budget: int | None = None) -> None:
        _check_budget(budget, "cache_bytes")
        _check_budget(device_budget, "device_cache_bytes")
        self.budget, self.device_budget = budget, device_budget
        self.on_device = False  # the banks are on an accelerator (set by the expert set before each decision)
        self.host = HostTier(budget)
        self.pin = set(pin)
        self.resident: OrderedDict[str, int] = OrderedDict()  # name -> bytes, least recently used first
        self.sources: dict[str, StoredExpert | None] = {}  # every known expert: how to read it (None: memory only)
        self.sizes: dict[str, int] = {}  # every known expert: its factors' bytes as the banks hold them
        self.held: set[str] = set()  # not evicted while the model replaces or removes them (see ExpertSet)
        self.hits = self.misses = self.evictions = 0
        self.load_seconds = 0.0

    # --- the book -------------------------------------------------------------------------------------------------
    def know(self, name: str, source: StoredExpert | None, size: int, *, resident: bool) -> None:
        """Record expert ``name`` (replacing what was known of that name)."""
        if self.sources.get(name) is not source:
            self.host.forget(name)
        self.sources[name], self.sizes[name] = source, size
        if resident:
            self.resident[name] = size
            self.resident.move_to_end(name)
        else:
            self.resident.pop(name, None)

    def forget(self, name: str) -> None:
        self.sources.pop(name, None)
        self.sizes.pop(name, None)
        self.resident.pop(name, None)
        self.host.forget(name)

    @property
    def two_tiers(self) -> bool:
        """Whether the banks are on an accelerator under a device budget, with the host tier behind them."""
        return self.on_device and self.device_budget is not None

    def set_on_device(self, on_device: bool) -> None:
        """Where the banks are now; the host tier is emptied when there are no longer two tiers."""
        self.on_device = on_device
        if not self.two_tiers:
            self.host.held.clear()

    @property
    def bank_budget(self) -> int | None:
        """The banks' budget: ``device_budget`` with two tiers, else ``budget``."""
        return self.device_budget if self.two_tiers else self.budget

    def is_resident(self, name: str) -> bool:
        return name in self.resident

    def must_load(self, name: str) -> bool:
        """Whether ``name`` is to be read when it becomes known (pinned)."""
        return name in self.pin

    def evictable(self, name: str) -> bool:
        return name not in self.pin and name not in self.held and self.sources.get(name) is not None

    @property
    def used(self) -> int:
        return sum(self.resident.values())

    def touch(self, names: Iterable[str]) -> None:
        for n in names:
            if n in self.resident:
                self.resident.move_to_end(n)

    def victims(self, incoming: int, keep: Iterable[str] = ()) -> list[str]:
        """Resident experts to evict before ``incoming`` more bytes come in, least recently used first: none while
        everything fits the budget; past it, enough to bring the total down to :data:`LOW_WATER` of the budget
        (or as far as the experts that may be evicted allow), never one in ``keep``."""
        budget = self.bank_budget
        if budget is None or self.used + incoming <= budget:
            return []
        keep = set(keep)
        target = min(budget, int(LOW_WATER * budget)) - incoming
        out, used = [], self.used
        for name, size in self.resident.items():
            if used <= target:
                break
            if name not in keep and self.evictable(name):
                out.append(name)
                used -= size
        return out

    def stats(self) -> CacheStats:
        host = self.two_tiers
        return CacheStats(self.hits, self.misses, self.evictions, round(self.load_seconds, 6), len(self.resident),
                          self.used, len(self.sources), self.bank_budget,
                          sum(1 for n in self.sources if not self.evictable(n)),
                          len(self.host.held) if host else 0, self.host.used if host else 0,
                          self.host.hits if host else 0, self.budget if host else None)


def _read_all(sources: list[StoredExpert]) -> list[Expert]:
    """Each source's expert, read side by side when there are several (reading and hashing release the GIL)."""
    if len(sources) > 1:
        return list(_readers().map(StoredExpert.load, sources))
    return [s.load() for s in sources]


class Residency:
    """The part of :class:`~moerge.runtime.experts.ExpertSet` that moves experts' factors in and out of the banks as
    its :class:`ExpertCache` decides (a mixin: the set gives ``cache``, ``layers``, ``modules_of``, ``_patch`` and
    ``_empty_bank``)."""

    cache: ExpertCache
    layers: dict[str, ExpertLinear]
    modules_of: dict[str, list[str]]
    lock: Any
    base: Any
    expert_device: torch.device | None
    _sizes: dict[tuple, int]  # layout key -> bytes, for stored experts (see _size)

    def _patch(self, module_name: str) -> ExpertLinear:  # pragma: no cover - given by the set
        raise NotImplementedError

    def _empty_bank(self, module_name: str) -> ModuleBank:  # pragma: no cover - given by the set
        raise NotImplementedError

    def _size(self, expert: Expert) -> int:
        """Bytes of ``expert``'s factors as the banks hold them (from its layout: nothing is read)."""
        key = getattr(expert, "layout_key", None)
        if key is not None and key in self._sizes:
            return self._sizes[key]
        total = 0
        for m, spec in expert.spec().items():
            bank = self.layers[m].bank if m in self.layers else self._empty_bank(m)
            n = (spec["rank"] * (spec["in_features"] + spec["out_features"]) * spec.get("experts", 1)
                 if spec["kind"] != "delta"
                 else spec["in_features"] * spec["out_features"] + (spec["out_features"] if spec.get("bias") else 0))
            total += n * bank.A_all.element_size()
        if key is not None:
            self._sizes[key] = total
        return total

    def _arriving(self, experts: Sequence[Expert]) -> list[Expert]:
        """Of ``experts``, the ones whose factors go into the banks now, read: every expert held in memory, and
        stored ones that are pinned."""
        return [e.load() if isinstance(e, StoredExpert) else e for e in experts
                if not isinstance(e, StoredExpert) or self.cache.must_load(e.name)]

    def _banks_device(self) -> torch.device:
        """Where the banks are: the first patched module's (all are kept together), else where they will be."""
        for layer in self.layers.values():
            return layer.bank.A_all.device
        if self.expert_device is not None:
            return self.expert_device
        return next((p.device for p in self.base.parameters()), torch.device("cpu"))

    def _tiers(self) -> None:
        """Tell the book whether the banks are on an accelerator or in host memory; under the lock, before it
        decides (``model.to`` may have moved the banks)."""
        self.cache.set_on_device(self._banks_device().type not in ("cpu", "meta"))

    def _drop_banks(self, names: set[str]) -> set[str]:
        return {n for n in names if self.cache.is_resident(n)}

    def missing(self, candidates: Any, staged: dict[str, Any] | None = None) -> list[str]:
        """The experts ``candidates`` use whose factors are neither in the banks nor in ``staged`` (read for this
        call by :meth:`read_experts`, from the expert's current source); under the lock."""
        return [n for n in candidates.used_names() if not self.cache.is_resident(n)
                and self._staged(n, staged) is None]

    def _staged(self, name: str, staged: dict[str, Any] | None) -> Expert | None:
        """Expert ``name`` as ``staged`` holds it, if it was read from the expert's current source."""
        got = (staged or {}).get(name)
        return got[1] if got is not None and got[0] is self.cache.sources.get(name) else None

    def read_experts(self, names: Sequence[str]) -> dict[str, tuple[StoredExpert, Expert]]:
        """Read experts ``names`` (side by side) without holding the lock: ``name → (source, expert)``, for
        :meth:`ensure_resident` to take in if the source is still the expert's then."""
        with self.lock:  # an expert removed meanwhile, or held in memory, has none: the next routing sees it
            self._tiers()
            sources = [s for n in names if (s := self.cache.sources.get(n)) is not None]
            kept = {s.name: (s, e) for s in sources if self.cache.two_tiers  # counted if they are taken in
                    and (e := self.cache.host.get(s.name, s, count=False)) is not None}
        sources = [s for s in sources if s.name not in kept]
        t = time.perf_counter()
        got = _read_all(sources)
        with self.lock:
            self.cache.load_seconds += time.perf_counter() - t
        return {**kept, **{s.name: (s, e) for s, e in zip(sources, got)}}

    def ensure_resident(self, names: Sequence[str], staged: dict[str, Any] | None = None) -> None:
        """Take the factors of the experts of ``names`` that are not in the banks in (from ``staged`` when it holds
        them read from their current source, else read now), evicting others (least recently used first) past the
        budget; call under :attr:`lock`. Raises (the banks unchanged) when an expert cannot be read."""
        need = [n for n in dict.fromkeys(names) if not self.cache.is_resident(n)]
        self.cache.hits += len(names) - len(need)
        if need:
            t = time.perf_counter()
            self._tiers()
            ready = {n: e for n in need if (e := self._staged(n, staged)) is not None}
            if self.cache.two_tiers:  # staged from the host tier (read_experts), then the host tier for the rest
                self.cache.host.hits += sum(self.cache.host.holds(n, e) for n, e in ready.items())
                ready.update({n: e for n in need if n not in ready
                              and (e := self.cache.host.get(n, self.cache.sources.get(n))) is not None})
            rest = [n for n in need if n not in ready]
            ready.update(zip(rest, _read_all([self._source(n) for n in rest])))
            loaded = [ready[n] for n in need]
            self.cache.misses += len(need)
            victims = self.cache.victims(sum(self.cache.sizes[n] for n in need), keep=names)
            self._swap_resident(loaded, set(victims))
            if self.cache.two_tiers:  # kept in host memory for their next return to the device
                for e in loaded:
                    self.cache.host.put(self.cache.sources[e.name], e)
            del loaded  # the buffers the experts were read into (unless the host tier keeps them)
            give_back_memory()
            self.cache.load_seconds += time.perf_counter() - t
        self.cache.touch(names)

    def _source(self, name: str) -> StoredExpert:
        source = self.cache.sources.get(name)
        if source is None:  # never evicted, so never missing: a broken book
            raise LibraryError("the expert's factors are neither in memory nor stored", expert=name)
        return source

    def _read(self, name: str) -> Expert:
        return self._source(name).load()

    def _swap_resident(self, loaded: Sequence[Expert], evict: set[str]) -> None:
        """Take ``loaded`` into the banks and drop ``evict`` from them, module by module (under the lock no call
        reads a bank meanwhile, and each module's old bank is freed before the next is built)."""
        by_module: dict[str, dict[str, Any]] = {}
        for e in loaded:
            for m, w in e.modules.items():
                by_module.setdefault(m, {})[e.name] = w
        try:
            for m in sorted({m for n in evict for m in self.modules_of.get(n, [])} | set(by_module)):
                layer = self._patch(m)
                layer.bank = layer.bank.swapped(evict, by_module.get(m, {}))  # evicted rows reused in place
        except BaseException:  # out of memory midway: every expert touched leaves every bank, the book agrees
            touched = set(evict) | {e.name for e in loaded}
            for layer in self.layers.values():
                gone = {n for n in touched if n in layer.bank}
                if gone:
                    layer.bank = layer.bank.dropped(gone)  # allocates nothing: memory may be what failed
            for n in touched:
                self.cache.know(n, self.cache.sources[n], self.cache.sizes[n], resident=False)
            raise
        for n in evict:
            self.cache.know(n, self.cache.sources[n], self.cache.sizes[n], resident=False)
            self.cache.evictions += 1

        for e in loaded:
            self.cache.know(e.name, self.cache.sources[e.name], self.cache.sizes[e.name], resident=True)

    def cache_stats(self) -> CacheStats:
        with self.lock:
            self._tiers()
            return self.cache.stats()

    def moved(self) -> None:
        """After ``model.to(...)``: recount the experts' bytes (the banks' dtype may have changed) and keep the
        budget of where the banks are now (a move to the accelerator may put them over the device budget)."""
        self.resize()
        self.evict_over_budget()

    def resize(self) -> None:
        """Recount every expert's bytes (after ``model.to(dtype)`` changed the banks' dtype); under the lock."""
        self._sizes.clear()
        for n, source in self.cache.sources.items():
            if source is not None:
                size = self._size(source)
            else:  # held in memory only, hence resident: its rows in the banks
                size = sum(layer.bank.size_of(n) for layer in self.layers.values())
            self.cache.know(n, source, size, resident=self.cache.is_resident(n))

    def evict_over_budget(self, keep: Sequence[str] = ()) -> None:
        """Evict past the budget (after experts held in memory, or pinned ones, came in); under :attr:`lock`."""
        self._tiers()
        victims = self.cache.victims(0, keep=keep)
        if not victims:
            return
        try:
            self._swap_resident([], set(victims))
        except Exception as e:  # noqa: BLE001 - the change itself is done; memory stays over the budget meanwhile
            warnings.warn(f"experts could not be evicted to stay within cache_bytes: {e}", RuntimeWarning, stacklevel=3)
        give_back_memory()

