"""How an :class:`~moerge.runtime.experts.ExpertSet` patches its base: which targets an expert may have (linear
modules, MoE routers, fused MoE expert weights), the patched module each gets, and the plain base back.

Targets are patched lazily, when an expert first needs them: a linear module becomes an
:class:`~moerge.runtime.layer.ExpertLinear`, a router an :class:`~moerge.runtime.moe.ExpertRouter`, and the fused
parameters of an experts module share one :class:`~moerge.runtime.moe.ExpertMoE` (a
:class:`~moerge.runtime.moe.StackedTarget` each).
"""

from __future__ import annotations

import copy
import json
from typing import Any

import torch
from torch import nn

from moerge.adapters.expert import Expert, StackedLoRAWeights, validate_name
from moerge.adapters.peft_loader import check_targets
from moerge.core.fingerprint import linear_shape
from moerge.core.targets import MoETarget, find_module, resolve_moe_target
from moerge.errors import BaseMismatchError, LibraryError
from moerge.routing import RoutingContext
from moerge.runtime.bank import ModuleBank, adapter_dtype
from moerge.runtime.layer import ExpertLinear
from moerge.runtime.moe import ExpertMoE, ExpertRouter, StackedTarget
from moerge.runtime.siblings import Siblings
from moerge.runtime.stacked import StackedBank

__all__ = ["Patching"]


class Patching:
    """The part of :class:`~moerge.runtime.experts.ExpertSet` that checks targets and patches the base (a mixin: the
    set gives ``base``, ``context``, ``layers``, ``base_modules``, ``metadata``, ``expert_dtype``,
    ``expert_device``, ``lock``, ``_fits`` and ``require_active``)."""

    base: nn.Module
    context: RoutingContext
    layers: dict[str, ExpertLinear | StackedTarget]
    base_modules: dict[str, tuple[int, int]]
    metadata: dict[str, Any]
    expert_dtype: torch.dtype | None
    expert_device: torch.device | None
    lock: Any
    _fits: set[tuple]
    siblings: Siblings  # the groups of patched modules that read one input (moerge.runtime.siblings)

    def require_active(self) -> None:  # pragma: no cover - given by the set
        raise NotImplementedError

    def check_fits(self, expert: Expert, *, replacing: bool = False) -> None:
        """Raise (changing nothing) unless every module ``expert`` targets is a linear module of the base with the
        expert's shapes."""
        validate_name(expert.name)
        if expert.name in self.metadata and not replacing:
            raise LibraryError("the model already has an expert with this name", expert=expert.name)
        key = getattr(expert, "layout_key", None)
        targets = (expert.metadata.source or {}).get("targets")
        if key is not None and targets:  # the modules PEFT would adapt are checked too: a layout and its targets
            key = (key, json.dumps(targets, sort_keys=True))
        if key is not None and key in self._fits:  # a layout already checked against this base
            return
        spec = expert.spec()
        for m, (out_f, in_f) in expert.shapes().items():
            layer = self.layers.get(m)
            if m not in self.base_modules:  # a router or a fused MoE expert parameter, else refused by name
                shape = self._check_moe_target(m, spec[m], expert.name)
            elif spec[m]["kind"] == StackedLoRAWeights.kind:
                raise BaseMismatchError(f"module {m!r} is a linear module, but the expert holds stacked MoE factors "
                                        "for it", expert=expert.name)
            else:
                shape = (layer.out_features, layer.in_features) if layer is not None else self.base_modules[m]
            if (out_f, in_f) != shape:
                raise BaseMismatchError(
                    f"module {m!r}: the expert maps {in_f}→{out_f} but the base maps "
                    f"{shape[1]}→{shape[0]}", expert=expert.name,
                )
        check_targets(expert, self.base_modules, "the base model")
        if key is not None:
            self._fits.add(key)

    def _moe_target(self, name: str) -> MoETarget | str:
        """The router or stacked target ``name`` of the base, or why it is none (kept: the base does not change)."""
        cache = self.__dict__.setdefault("_moe_cache", {})
        if name not in cache:
            cache[name] = resolve_moe_target(self.base, name)
        return cache[name]

    def _check_moe_target(self, m: str, spec: dict[str, Any], expert: str) -> tuple[int, int]:
        """``(out, in)`` of target ``m`` (its layout ``spec``), which is not a linear module of the base: a router
        (LoRA or dense update of its weight) or a fused expert parameter (stacked factors with the base's MoE
        experts)."""
        target = self._moe_target(m)
        if isinstance(target, str):
            raise BaseMismatchError(f"targets {m!r}: {target}", expert=expert)
        stacked = spec["kind"] == StackedLoRAWeights.kind
        if stacked != (target.kind == "stacked"):
            what = "stacked MoE factors" if stacked else f"a {spec['kind']} update"
            raise BaseMismatchError(f"{m!r} is a {target.kind} target of the base, but the expert holds {what} for it",
                                    expert=expert)
        if stacked and spec["experts"] != target.experts:
            raise BaseMismatchError(f"parameter {m!r}: the expert has factors for {spec['experts']} MoE experts, the "
                                    f"base has {target.experts}", expert=expert)
        return target.shape

    def _patch(self, module_name: str) -> ExpertLinear | StackedTarget:
        layer = self.layers.get(module_name)
        if layer is not None:
            return layer
        if module_name not in self.base_modules:
            return self._patch_moe(module_name)
        parent_name, _, attr = module_name.rpartition(".")
        parent = self.base.get_submodule(parent_name) if parent_name else self.base
        empty = self._empty_bank(module_name)
        layer = ExpertLinear(getattr(parent, attr), module_name, len(self.layers), self.context,
                             bank_device=self.expert_device, siblings=self.siblings)
        layer.bank = empty  # in the experts' dtype
        setattr(parent, attr, layer)
        self.layers[module_name] = layer
        return layer

    def _patch_moe(self, name: str) -> ExpertRouter | StackedTarget:
        target = self._moe_target(name)
        assert not isinstance(target, str), target  # checked when the expert was admitted
        empty = self._empty_bank(name)
        owner_parent, _, owner_attr = target.owner.rpartition(".")
        parent = self.base.get_submodule(owner_parent) if owner_parent else self.base
        if target.kind == "router":
            layer = ExpertRouter(getattr(parent, owner_attr), name, len(self.layers), self.context,
                                 bank_device=self.expert_device)
            layer.bank = empty
            setattr(parent, owner_attr, layer)
        else:
            moe = getattr(parent, owner_attr)
            if not isinstance(moe, ExpertMoE):
                moe = ExpertMoE(moe, target.owner, self.context, bank_device=self.expert_device)
                setattr(parent, owner_attr, moe)
            layer = moe.targets[target.param] = StackedTarget(moe, target.param, name, len(self.layers), empty,
                                                              target.dim)
        self.layers[name] = layer
        return layer

    def _empty_bank(self, module_name: str) -> ModuleBank | StackedBank:
        if module_name not in self.base_modules:
            target = self._moe_target(module_name)
            assert not isinstance(target, str), target
            w = getattr(find_module(self.base, target.owner), target.param)
            dtype = self.expert_dtype or adapter_dtype(w.dtype)
            out_f, in_f = target.shape
            if target.kind == "router":
                return ModuleBank.empty(in_f, out_f, self.expert_device or w.device, dtype)
            return StackedBank.empty(target.experts, in_f, out_f, self.expert_device or w.device, dtype)
        mod = self.base.get_submodule(module_name)
        out_f, in_f = linear_shape(mod)
        w = mod.weight
        dtype = self.expert_dtype or adapter_dtype(w.dtype)
        return ModuleBank.empty(in_f, out_f, self.expert_device or w.device, dtype)

    def _wrappers(self) -> dict[str, nn.Module]:
        """Every patched module in the base by its path: an :class:`ExpertLinear` (or router) per linear target, one
        :class:`ExpertMoE` for the stacked targets of an experts module."""
        out: dict[str, nn.Module] = {}
        for name, layer in self.layers.items():
            if isinstance(layer, StackedTarget):
                out.setdefault(layer.moe.module_name, layer.moe)
            else:
                out[name] = layer
        return out

    def copy_base(self) -> nn.Module:
        """A plain deep copy of the base (each patched module copied as its original), the live model untouched."""
        self.require_active()
        with self.lock:
            memo: dict[int, Any] = {}
            for layer in self._wrappers().values():
                memo[id(layer)] = copy.deepcopy(layer.base_layer, memo)
            return copy.deepcopy(self.base, memo)

    def private_base(self) -> nn.Module:
        """A plain copy of the base whose parameters are detached aliases of the base's: no weight is copied and
        none requires grad, so hooks, modes and training of other tensors on it never touch the base that serves
        calls. Its weights are the base's memory: read them, never change them."""
        self.require_active()
        with self.lock:
            memo: dict[int, Any] = {id(p): nn.Parameter(p.detach(), requires_grad=False)
                                    for p in self.base.parameters()}
            for layer in self._wrappers().values():
                memo[id(layer)] = copy.deepcopy(layer.base_layer, memo)
            return copy.deepcopy(self.base, memo)

    def unpatch(self) -> nn.Module:
        """Put the original modules back; the set is unusable afterwards. Returns the plain base."""
        with self.lock:
            self.require_active()
            for name, layer in self._wrappers().items():
                parent_name, _, attr = name.rpartition(".")
                parent = self.base.get_submodule(parent_name) if parent_name else self.base
                setattr(parent, attr, layer.base_layer)
            self.layers.clear()
            self.active = False
        return self.base
