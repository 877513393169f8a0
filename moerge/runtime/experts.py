"""The set of experts a model routes over, held in its patched modules, changed all-or-nothing.

:class:`ExpertSet` owns the patched modules (:class:`~moerge.runtime.layer.ExpertLinear`, created lazily for the
modules experts target), the experts' metadata, and the lock that makes a change of experts and the routing of a
call see one version of the set. A change prepares the new experts' routing data and writes the library outside
the lock, then swaps new immutable banks and the router's data in at once; a failure at any step leaves all of it
as it was.

Experts of a library arrive as :class:`~moerge.adapters.expert.StoredExpert`: their factors enter the banks when a
call first has them among its candidates (:meth:`ExpertSet.gather` reads them), and leave them, least recently used
first, when the :class:`~moerge.runtime.cache.ExpertCache`'s byte budget is passed.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moerge.adapters.expert import Expert, ExpertMetadata, StoredExpert
from moerge.core.fingerprint import linear_modules
from moerge.errors import LibraryError, MoErgeError
from moerge.routing import Candidates, Router, RoutingContext
from moerge.runtime.bank import ModuleBank
from moerge.runtime.cache import ExpertCache, Residency
from moerge.runtime.layer import ExpertLinear
from moerge.runtime.moe import ExpertMoE, StackedTarget
from moerge.runtime.patching import Patching
from moerge.runtime.siblings import Siblings

__all__ = ["ExpertSet"]


class ExpertSet(Patching, Residency):
    """The experts of one model and the patched modules that hold their factors.

    Args:
        base: the model whose linear modules are patched (in place).
        context: the routing context the patched modules read each call's routing from.
        expert_dtype: the dtype the banks store factors in (``None``: each base module's dtype).
        expert_device: where the banks stay (``None``: with each base module).
        cache_bytes: the byte budget of the experts' factors in the banks (``None``: no limit), or of the host tier
            behind them when they are on an accelerator under ``device_cache_bytes`` (:mod:`moerge.runtime.cache`).
        device_cache_bytes: the byte budget of the banks when they are on an accelerator (``None``: one tier).
        pin: experts read as soon as they are known and never evicted.
    """

    def __init__(self, base: nn.Module, context: RoutingContext, *, expert_dtype: torch.dtype | None = None,
                 expert_device: torch.device | None = None, cache_bytes: int | None = None,
                 pin: Sequence[str] = (), device_cache_bytes: int | None = None) -> None:
        if any(isinstance(m, (ExpertLinear, ExpertMoE)) for m in base.modules()):
            raise ValueError("this base is already patched by another MoErgeModel; pass that model's copy_base() "
                             "(a plain copy) or unpatch() it first")
        self.base = base
        self.context = context
        self.expert_dtype = expert_dtype
        self.expert_device = expert_device
        self.lock = threading.RLock()
        self.metadata: dict[str, ExpertMetadata] = {}  # expert -> metadata, in id order
        self.modules_of: dict[str, list[str]] = {}  # expert -> the modules it targets
        self.layers: dict[str, ExpertLinear | StackedTarget] = {}  # target -> patched module, in patch order
        self.cache = ExpertCache(cache_bytes, pin, device_cache_bytes)
        self.siblings = Siblings()  # modules seen reading one input share a step (moerge.runtime.siblings)
        self._fits: set[tuple] = set()  # layout keys of stored experts that fit the base (see check_fits)
        self._sizes: dict[tuple, int] = {}  # layout key -> bytes of such an expert in the banks (see _size)
        # the base's linear modules → (out, in), read once before any is patched (routers' context reads them too)
        self.base_modules: dict[str, tuple[int, int]] = linear_modules(base)
        self.active = True

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("lock")
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.lock = threading.RLock()

    def __deepcopy__(self, memo: dict) -> ExpertSet:
        new = ExpertSet.__new__(ExpertSet)
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        return new

    @property
    def names(self) -> list[str]:
        return list(self.metadata)

    def __contains__(self, name: object) -> bool:
        return name in self.metadata

    def require_active(self) -> None:
        if not self.active:
            raise RuntimeError("this MoErgeModel was unpatched; build a new one with MoErgeModel.from_library")

    # --- banks ------------------------------------------------------------------------------------------------------
    def _new_banks(self, add: Sequence[Expert], drop: set[str]) -> dict[str, ModuleBank]:
        """The banks of every affected module after dropping ``drop`` and adding ``add`` (nothing is changed)."""
        banks: dict[str, ModuleBank] = {}

        def current(m: str) -> ModuleBank:
            if m not in banks:
                banks[m] = self.layers[m].bank if m in self.layers else self._empty_bank(m)
            return banks[m]

        for name in drop:
            for m in self.modules_of.get(name, []):
                banks[m] = current(m).without({name})
        by_module: dict[str, dict[str, Any]] = {}
        for e in add:
            for m, w in e.modules.items():
                by_module.setdefault(m, {})[e.name] = w
        for m, group in by_module.items():
            banks[m] = current(m).with_experts(group)
        return banks

    def _commit(self, banks: dict[str, ModuleBank], add: Sequence[Expert], drop: set[str],
                sources: dict[str, StoredExpert | None] | None = None) -> None:
        """Swap ``banks`` in and record the experts of ``add`` (those whose factors ``banks`` hold are resident;
        ``sources``: how to read each again, default the expert itself when it is a :class:`StoredExpert`)."""
        for m, bank in banks.items():
            if len(bank) or m in self.layers:
                self._patch(m).bank = bank
        replaced = {e.name for e in add}
        for name in drop - replaced:
            self.metadata.pop(name, None)
            self.modules_of.pop(name, None)
            self.cache.forget(name)
        sources = sources or {}
        for e in add:  # a replaced expert keeps its place in the id order, as in the library's manifest
            self.metadata[e.name] = e.metadata
            self.modules_of[e.name] = e.target_modules
            for m in self.modules_of[e.name]:
                self._patch(m)
            source = sources.get(e.name, e if isinstance(e, StoredExpert) else None)
            resident = not isinstance(e, StoredExpert) or self.cache.must_load(e.name)
            self.cache.know(e.name, source, self._size(e), resident=resident)

    # --- changes ----------------------------------------------------------------------------------------------------
    def get(self, name: str) -> Expert:
        """Expert ``name`` as the set holds it (rebuilt from the banks, so also for experts never persisted)."""
        with self.lock:
            if name not in self.metadata:
                raise LibraryError(f"the model has no expert {name!r}", expert=name)
            if not self.cache.is_resident(name):
                return self._read(name)
            mods = {m: self.layers[m].bank.weights_of(name) for m in self.modules_of[name]}
            return Expert(name, mods, self.metadata[name])

    def prior(self, name: str) -> Expert:
        """The set's expert ``name`` as it is now, without reading what is not in memory (for undoing a change)."""
        source = self.cache.sources.get(name)
        return source if source is not None and not self.cache.is_resident(name) else self.get(name)

    def router_add(self, router: Router, experts: Sequence[Expert], prepared: dict[str, Any] | None = None,
                   previous: dict[str, Expert] | None = None) -> Callable[[], None]:
        """Give ``experts`` to ``router`` (replacing the routing data of names it has), with what its
        ``prepare_expert`` made for them when given; returns an undo (``previous``: the replaced experts as they
        were, when the caller has them)."""
        previous = {**{e.name: self.prior(e.name) for e in experts if e.name in self.metadata}, **(previous or {})}
        prepared = prepared or {}
        done: list[str] = []

        def undo() -> None:
            for n in reversed(done):
                if n in previous:
                    router.on_add_expert(previous[n])
                else:
                    router.on_remove_expert(n)

        try:
            for e in experts:
                if e.name in prepared:
                    router.on_add_expert(e, prepared[e.name])
                else:  # also routers written for 0.1, whose on_add_expert takes the expert alone
                    router.on_add_expert(e)
                done.append(e.name)
        except BaseException:
            undo()
            raise
        return undo

    def router_defer(self, router: Router, expert: Expert) -> Callable[[], None]:
        """``router.defer_expert(expert)`` (its routing data to be trained later); returns an undo."""
        previous = self.prior(expert.name) if expert.name in self.metadata else None
        router.defer_expert(expert)

        def undo() -> None:
            if previous is not None:
                router.on_add_expert(previous)
            else:
                router.on_remove_expert(expert.name)

        return undo

    def install(self, experts: Sequence[Expert], router: Router, *, defer: bool = False) -> list[Expert]:
        """Add ``experts`` (none of which the set has) to ``router`` and to every module they target; all or
        nothing, nothing persisted. With ``defer``, experts whose routing data must be trained are taken in
        without it (:meth:`Router.defer_expert`) and returned, for training in the background."""
        with self.lock:
            names = [e.name for e in experts]
            if len(set(names)) != len(names):
                raise LibraryError("the same expert name appears twice", expert=names[0])
            for e in experts:
                self.check_fits(e)
            banks = self._new_banks(self._arriving(experts), set())
            deferred = [e for e in experts if defer and router.needs_training(e)]
            undo = [self.router_defer(router, e) for e in deferred]
            try:
                self.router_add(router, [e for e in experts if e not in deferred])
            except BaseException:
                for u in reversed(undo):
                    u()
                raise
            self._commit(banks, experts, set())
            self.evict_over_budget(keep=names)
            return deferred

    def add(self, expert: Expert, router: Router, *, library: Any = None, overwrite: bool = False,
            defer: bool = False) -> tuple[Expert, bool]:
        """Add (or, with ``overwrite``, replace) ``expert``; returns it as stored, once calls can use it, and
        whether its routing data was deferred.

        In three steps, so that calls under way or starting meanwhile are neither changed nor held up: (1) the
        router prepares the expert's routing data (it may train it on a private base) without the lock; (2) the
        library, when given, stores the expert (atomic on disk, also without the lock: a name already taken there
        is refused before anything is visible); (3) under the lock, the new banks and the router's data are swapped
        in at once. Until (3) calls see the set as it was. A failure at any step leaves the set, the router and
        the library as they were. With ``defer``, routing data that must be trained is not: (1) is skipped and the
        router takes the expert in without it (:meth:`Router.defer_expert`); the caller trains it later."""
        with self.lock:
            self.require_active()
            self._check_addable(expert, overwrite)
            if library is not None and overwrite:
                self._hold(expert.name)  # calls meanwhile need the old version while its files are replaced
        try:
            return self._add(expert, router, library, overwrite, defer)
        finally:
            with self.lock:
                self.cache.held.discard(expert.name)

    def _hold(self, name: str) -> None:
        """Keep expert ``name``'s factors in memory (read now if they are not) until ``cache.held`` lets it go: its
        files are about to be replaced or removed, and calls until the swap still use it."""
        if name in self.metadata and self.cache.sources.get(name) is not None:
            self.cache.held.add(name)
            try:
                self.ensure_resident([name])
            except MoErgeError:  # its files are damaged already: nothing to keep, the change goes on
                self.cache.held.discard(name)

    def _add(self, expert: Expert, router: Router, library: Any, overwrite: bool,
             defer: bool) -> tuple[Expert, bool]:
        deferred = defer and router.needs_training(expert)
        prepared = None if deferred else router.prepare_expert(expert)
        previous = None
        if library is not None:
            if overwrite and expert.name in library:  # to put back, with its routing data, if the swap fails
                previous = (library.get(expert.name),
                            {k: library.get_routing(expert.name, k) for k in library.routing_kinds(expert.name)})
            stored = library.add(expert, overwrite=overwrite)  # atomic: all or nothing on disk
        else:
            stored = expert
        source = expert if library is None and isinstance(expert, StoredExpert) else None
        try:
            if library is not None:
                source = library.stored(expert.name)  # to read it again once evicted
            with self.lock:
                self.require_active()
                self._check_addable(expert, overwrite)  # again: the set may have changed meanwhile
                drop = {expert.name} if expert.name in self.metadata else set()
                banks = self._new_banks(self._arriving([stored]), self._drop_banks(drop))
                if deferred:
                    undo = self.router_defer(router, stored)
                else:
                    undo = self.router_add(router, [stored], None if prepared is None else {stored.name: prepared},
                                           None if previous is None else {stored.name: previous[0]})
                try:
                    self._commit(banks, [stored], drop, {stored.name: source})
                except BaseException:
                    undo()
                    raise
                self.evict_over_budget(keep=[stored.name])  # warns, never raises: the change is done
        except BaseException:
            if library is not None:  # the library back as it was
                if previous is not None:
                    old, routing = previous
                    library.add(old, overwrite=True)
                    for kind, got in routing.items():
                        if got is not None:
                            library.put_routing(old.name, kind, *got)
                elif expert.name in library:
                    library.remove(expert.name)
            raise
        return stored, deferred

    def _check_addable(self, expert: Expert, overwrite: bool) -> None:
        """:meth:`check_fits`, naming the file the weights came from when it is known."""
        try:
            self.check_fits(expert, replacing=overwrite and expert.name in self.metadata)
        except MoErgeError as e:
            src = expert.metadata.source or {}
            raise e.at(str(Path(src["path"]) / "adapter_model.safetensors") if src.get("type") == "peft"
                       and src.get("path") else None) from None

    def remove(self, name: str, router: Router, *, library: Any = None) -> None:
        """Remove expert ``name``: from ``library`` first when given (it must list the expert; atomic on disk,
        outside the lock), then, under the lock, from the banks and ``router`` at once."""
        with self.lock:
            self.require_active()
            if name not in self.metadata:
                raise LibraryError(f"the model has no expert {name!r}", expert=name)
            if library is not None:
                self._hold(name)
        try:
            self._remove(name, router, library)
        finally:
            with self.lock:
                self.cache.held.discard(name)

    def _remove(self, name: str, router: Router, library: Any) -> None:
        if library is not None:
            library.remove(name)
        with self.lock:
            self.require_active()
            if name not in self.metadata:  # another thread removed it meanwhile
                return
            self._commit(self._new_banks([], self._drop_banks({name})), [], {name})
            router.on_remove_expert(name)

    # --- a request's factors ----------------------------------------------------------------------------------------
    def gather(self, candidates: Candidates, router: Router, fuse_gate: bool,
               staged: dict[str, Any] | None = None) -> dict[int, Any]:
        """Each patched module's factors for ``candidates`` (and, with ``fuse_gate``, the router's linear gate),
        keyed by the module's patch index; call under :attr:`lock` with the names the candidates were made over.
        The candidates' experts not in the banks are taken in first, from ``staged`` (read by
        :meth:`read_experts` without the lock) or read now (see :meth:`ensure_resident`)."""
        self.ensure_resident(candidates.used_names(), staged)
        return {layer.patch_index: layer.bank.gather(
            candidates, layer.compute_dtype,
            router.linear_gate(candidates, layer.info, layer.compute_device)
            if fuse_gate and not isinstance(layer, StackedTarget) else None,
            layer.compute_device) for layer in self.layers.values()}
