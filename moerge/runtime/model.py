"""``MoErgeModel``: a causal LM whose linear modules mix a library's experts per request and per token.

The model is a thin facade: :class:`~moerge.runtime.experts.ExpertSet` holds the experts in the patched modules and
changes them all-or-nothing, :class:`~moerge.runtime.prompts.PromptReader` reads prompts for the routers, the
router (given a :class:`~moerge.routing.RouterContext`, never the model) decides each call's candidates, and
:class:`~moerge.runtime.gathered.GatheredModule` mixes them inside every patched module.
"""

from __future__ import annotations

import dataclasses
import threading
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moerge.adapters.expert import Expert, ExpertMetadata
from moerge.adapters.merge import merge_into
from moerge.adapters.peft_loader import load_peft_lora
from moerge.core.forked import can_fork
from moerge.errors import LibraryError, RoutingError
from moerge.library import ExpertLibrary
from moerge.routers import build_router
from moerge.routing import (
    Router,
    RouterContext,
    RoutingContext,
    RowRouting,
    explain_routing,
)
from moerge.runtime import native
from moerge.runtime.calls import RoutedCalls
from moerge.runtime.experts import ExpertSet
from moerge.runtime.fill import RoutingFill
from moerge.runtime.follow import LibraryFollower, LibrarySync, LivingLibrary
from moerge.runtime.prompts import PromptReader

__all__ = ["MoErgeModel"]

_INSTALL_CHUNK = 64  # experts stacked into the layers per step when loading a library
_TRAIN_ROUTING = ("now", "background")
_TRAIN_IN = ("auto", "process", "thread")


def _as_expert(expert: Expert | str | Path, name: str | None, description: str | None,
               examples: Iterable[str] | None, base: nn.Module, revision: str | None = None) -> Expert:
    """:meth:`MoErgeModel.add_expert`'s expert: loaded from a PEFT folder (against ``base``: DoRA made exact, copies
    of base weights checked), renamed, its metadata set."""
    if not isinstance(expert, Expert):
        if name is None:
            raise ValueError("name= is required when adding a PEFT folder")
        expert = load_peft_lora(str(expert), name=name, base=base, revision=revision)
    elif name is not None and name != expert.name:
        expert = expert.renamed(name)
    if description is not None or examples is not None:
        expert = dataclasses.replace(expert, metadata=dataclasses.replace(
            expert.metadata,
            description=expert.metadata.description if description is None else description,
            examples=expert.metadata.examples if examples is None else [str(e) for e in examples]))
    return expert


class MoErgeModel(RoutedCalls, LivingLibrary, nn.Module):
    """A Hugging Face causal LM plus a library of experts, routed at inference time.

    Build one with :meth:`from_library`. Target ``nn.Linear`` (and GPT-2 ``Conv1D``) modules are replaced by
    :class:`~moerge.runtime.layer.ExpertLinear`, which keeps the original as ``base_layer``. Each call routes once
    at prefill (the router's global stage, or ``experts=`` given explicitly) and holds that routing for the row's
    decode steps; a router with a local gate then mixes the row's candidates per token inside every module.

    Attributes not defined here are looked up on the base model (``model.config``, ``model.device``, …).
    """

    def __init__(
        self,
        base: nn.Module,
        router: Router,
        library: ExpertLibrary | None = None,
        *,
        tokenizer: Any = None,
        expert_dtype: torch.dtype | None = None,
        expert_device: str | torch.device | None = None,
        train_routing: str = "now",
        train_in: str = "auto",
        cache_bytes: int | None = None,
        pin: Iterable[str] = (),
        device_cache_bytes: int | None = None,
    ) -> None:
        super().__init__()
        if train_routing not in _TRAIN_ROUTING:
            raise ValueError(f"train_routing must be one of {_TRAIN_ROUTING}, got {train_routing!r}")
        if train_in not in _TRAIN_IN:
            raise ValueError(f"train_in must be one of {_TRAIN_IN}, got {train_in!r}")
        if expert_dtype is not None and not (isinstance(expert_dtype, torch.dtype) and expert_dtype.is_floating_point):
            raise ValueError(f"expert_dtype must be a floating torch dtype, got {expert_dtype!r}")
        self.context = RoutingContext()
        self.expert_set = ExpertSet(base, self.context, expert_dtype=expert_dtype,
                                    expert_device=None if expert_device is None else torch.device(expert_device),
                                    cache_bytes=cache_bytes, pin=list(pin),
                                    device_cache_bytes=device_cache_bytes)
        self.base = base
        self.library = library
        self.train_routing = train_routing
        on_cuda = any(p.is_cuda for p in base.parameters())
        if not on_cuda:
            native.available()  # the native CPU step is built now (once per machine), not in a first request
        self.train_in = ("process" if can_fork() and not on_cuda else "thread") if train_in == "auto" else train_in
        self._fill = RoutingFill(self.expert_set, self._persist_routing)
        self._loading = False  # from_library taking the library in: nothing is served yet
        self._library_sync = None if library is None else LibrarySync(
            library, self.expert_set, self._fill if train_routing == "background" else None)
        self.follower: LibraryFollower | None = None
        n = getattr(base.config, "max_position_embeddings", None) or getattr(base.config, "n_positions", None)
        self.prompts = PromptReader(tokenizer, int(n) if isinstance(n, int) and n > 0 else None)
        self._last = threading.local()  # last_routing, per thread
        self.router = router
        router.attach(self.router_context())

    @property
    def tokenizer(self) -> Any:
        return self.prompts.tokenizer

    @property
    def context_length(self) -> int | None:
        """The base's context length (``max_position_embeddings``), when its config gives one."""
        return self.prompts.context_length

    @property
    def last_routing(self) -> list[RowRouting] | None:
        """The routing of this thread's last call (per row); concurrent calls in other threads do not change it."""
        return getattr(self._last, "routing", None)

    @last_routing.setter
    def last_routing(self, value: list[RowRouting] | None) -> None:
        self._last.routing = value

    # --- construction -----------------------------------------------------------------------------------------------
    @classmethod
    def from_library(
        cls,
        base: nn.Module | str | Path,
        library: ExpertLibrary | str | Path,
        router: str | Router = "glider",
        *,
        tokenizer: Any = None,
        strict_base: bool = True,
        experts: Iterable[str] | None = None,
        expert_dtype: torch.dtype | None = None,
        expert_device: str | torch.device | None = None,
        follow: bool = True,
        train_routing: str = "now",
        train_in: str = "auto",
        cache_bytes: int | None = None,
        pin: Iterable[str] = (),
        device_cache_bytes: int | None = None,
        **load_kwargs: Any,
    ) -> MoErgeModel:
        """Patch ``base`` with the experts of ``library``.

        Args:
            base: a loaded ``PreTrainedModel``, or a model id/path for ``AutoModelForCausalLM.from_pretrained``
                (with ``load_kwargs``; its tokenizer is loaded too when there is one).
            library: an :class:`ExpertLibrary` or the path of one.
            router: a registered router name (see :func:`moerge.routers.list_routers`) or a router object.
            tokenizer: used by routers that read the prompt as text.
            strict_base: refuse a base whose weights differ from the library's recorded base; with ``False`` a base of
                the same architecture is accepted with a warning (applying experts to another version of the base).
            experts: load only these experts (default: all).
            expert_dtype: the dtype the layers store the experts' factors in (default: the base's, and float32 on a
                half-precision base, as PEFT computes adapters by default). With ``torch.bfloat16`` under a float32
                base, a library takes half the memory; each request's candidates are cast once, when they are
                gathered, to the wider of the two dtypes, which the experts' part is computed in.
            expert_device: where the layers keep the experts' factors (default: with the base). ``"cpu"`` under a
                CUDA base keeps a library larger than the GPU's memory in host memory: each request copies only its
                candidates' factors to the GPU, once, when they are gathered; ``model.to(...)`` leaves them there.
            follow: follow the library folder: experts added, replaced or removed there by any process are taken
                in by the running model (see :meth:`sync_library` and :meth:`follow_library`).
            train_routing: ``"now"``: routing data the library lacks (PHATGOOSE gates, X-LoRA head rows) is trained
                before the model is returned, and before an expert another process adds becomes visible.
                ``"background"``: such experts are taken in at once, usable by name and by a global stage
                (GLIDER's index) but not chosen by a local gate until their data, trained in a background thread,
                is swapped in (:attr:`pending_routing`, :meth:`wait_routing`, :attr:`routing_errors`).
            train_in: where routing data is trained while the model serves: ``"process"`` (a forked child, with
                its own GIL and a lower CPU priority), ``"thread"`` or ``"auto"`` (a process where ``fork`` exists
                and the base is not on CUDA).
            cache_bytes: the memory the experts' factors may take where the layers keep them (see
                ``expert_device``). The model reads only the library's manifest and each expert's ``expert.json``
                when it is built; an expert's factors are read (checked against their sha256) when a call first
                has it among its candidates, before the call's prefill, and the least recently used are dropped
                past this budget (``None``: no budget, nothing dropped). With ``device_cache_bytes`` and the layers
                keeping the experts on an accelerator, this is instead the budget of a host tier that keeps the
                experts read from the library, so that one dropped from the device returns by a copy from host
                memory, not a read of its files. See :meth:`cache_stats`.
            pin: experts read at once and never dropped.
            device_cache_bytes: two tiers: the accelerator memory the experts' factors may take when the layers
                keep them there (least recently used dropped past it, kept in host memory within ``cache_bytes``).
                ``None``: one tier, ``cache_bytes``, wherever the layers keep the experts.
        """
        if isinstance(base, (str, Path)):
            from transformers import AutoModelForCausalLM, AutoTokenizer

            base_path = str(base)
            base = AutoModelForCausalLM.from_pretrained(base_path, **load_kwargs)
            if tokenizer is None:
                try:
                    tokenizer = AutoTokenizer.from_pretrained(base_path)
                except (OSError, ValueError):
                    tokenizer = None
        if not isinstance(library, ExpertLibrary):
            library = ExpertLibrary.open(library)
        differences = library.check_base(base, strict_weights=strict_base)
        if differences:
            warnings.warn(f"the base differs from the library's base ({'; '.join(differences)}); applying the "
                          "experts to it anyway (strict_base=False)", stacklevel=2)
        pin = list(pin)
        if isinstance(router, str):
            router = build_router(router)
        model = cls(base, router, library, tokenizer=tokenizer, expert_dtype=expert_dtype, pin=pin,
                    expert_device=expert_device, train_routing=train_routing, train_in=train_in,
                    cache_bytes=cache_bytes, device_cache_bytes=device_cache_bytes)
        listing = library.listing()
        names = list(experts) if experts is not None else list(listing)
        if set(pin) - set(names):
            raise LibraryError(f"pin names experts the model does not load: {sorted(set(pin) - set(names))}",
                               expert=sorted(set(pin) - set(names))[0])
        deferred, model._loading = [], True  # data trained at load uses every thread, in this process
        for i in range(0, len(names), _INSTALL_CHUNK):
            deferred += model.expert_set.install([library.stored(n) for n in names[i : i + _INSTALL_CHUNK]], router,
                                                 defer=train_routing == "background")
        model._loading = False
        model._library_sync.start(listing)
        model._persist_routing()
        model._fill.submit(deferred, router)
        if follow:
            model.follow_library()
        return model

    def router_context(self) -> RouterContext:
        """What this model's router may know of it: module shapes, hidden size, tokenizer, the library's routing
        data, the base to generate with, and private copies of the base (sharing its weights) to train routing data
        on. Made once (a walk over the base's modules), not per call that forces a mix."""
        if "_router_context" not in self.__dict__:
            hidden = getattr(getattr(self.base, "config", None), "hidden_size", None)
            self.__dict__["_router_context"] = RouterContext(
                modules=dict(self.expert_set.base_modules), hidden_size=hidden if isinstance(hidden, int) else None,
                tokenizer=self.tokenizer, store=self.library, language_model=self.base,
                training_base=self.expert_set.private_base,
                run_training=self._run_forked if self.train_in == "process" else None)
        return self.__dict__["_router_context"]

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base":
                raise
            return getattr(self.base, name)

    # --- the experts ------------------------------------------------------------------------------------------------
    @property
    def experts(self) -> list[str]:
        """Names of the experts the model routes over, in id order."""
        return self.expert_set.names

    def expert_metadata(self, name: str) -> ExpertMetadata:
        return self.expert_set.metadata[name]

    @property
    def patched_modules(self) -> list[str]:
        return list(self.expert_set.layers)

    def get_expert(self, name: str) -> Expert:
        """Expert ``name`` as the model holds it (rebuilt from the layers' stores, so also for experts that were
        added without persisting them)."""
        return self.expert_set.get(name)

    def add_expert(
        self,
        expert: Expert | str | Path,
        name: str | None = None,
        *,
        description: str | None = None,
        examples: Iterable[str] | None = None,
        persist: bool = True,
        overwrite: bool = False,
        revision: str | None = None,
    ) -> Expert:
        """Add an expert to the live model, post hoc, without reloading the base or retraining anything.

        ``expert`` is an :class:`Expert`, a PEFT LoRA folder or a Hugging Face Hub repository id (``org/name``, at
        ``revision``; through the hub's cache, see :func:`~moerge.adapters.peft_loader.adapter_folder`); for the
        last two ``name`` is required. ``description`` and
        ``examples`` set its metadata. With ``persist`` (the default) it is also added to the library. On any
        error the model and the library are as they were; calls already under way keep the experts they started
        with.
        """
        expert = _as_expert(expert, name, description, examples, self.base, revision)
        if not persist or self._library_sync is None:
            return self.expert_set.add(expert, self.router, overwrite=overwrite)[0]
        stored = self._library_sync.add(expert, self.router, overwrite=overwrite)
        self._persist_routing()
        return stored

    def remove_expert(self, name: str, *, persist: bool = True) -> None:
        """Remove an expert from the live model (and, with ``persist``, from the library; one another process
        removed from the library is a :class:`~moerge.errors.LibraryError`, and the next sync drops it)."""
        if not persist or self._library_sync is None:
            return self.expert_set.remove(name, self.router)
        self._library_sync.remove(name, self.router)
        self._persist_routing()

    def set_router(self, router: str | Router) -> None:
        """Route with another router from now on; it is given every current expert."""
        if isinstance(router, str):
            router = build_router(router)
        with self.expert_set.lock:
            router.attach(self.router_context())
            for n in self.expert_set.names:
                router.on_add_expert(self.expert_set.prior(n))  # a stored expert is not read for this
            self.router = router
            self._persist_routing()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        experts: Sequence[Mapping[str, float]] | Mapping[str, float] | None = None,
        **kwargs: Any,
    ) -> Any:
        """The base model's forward with routing. Inside a :meth:`routing` block the block's routing is used;
        otherwise the call is routed from its own ``input_ids`` (or ``experts=``)."""
        if self.context.current is not None and experts is None:
            return self.base(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        with self.routing(input_ids, attention_mask, experts=experts, inputs_embeds=kwargs.get("inputs_embeds")):
            return self.base(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    @torch.no_grad()
    def generate(
        self,
        inputs: torch.Tensor | None = None,
        *,
        experts: Sequence[Mapping[str, float]] | Mapping[str, float] | None = None,
        exclude: Iterable[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        """A drop-in for transformers' ``generate`` (same arguments: sampling, beams, streamers, KV cache…).

        Each row is routed once from its prompt (or by ``experts=``), and the routing holds for its decode steps.
        The routing is kept in :attr:`last_routing`.
        """
        input_ids = kwargs.pop("input_ids", None) if inputs is None else inputs
        new = kwargs.get("max_new_tokens")
        if new is None and kwargs.get("generation_config") is not None:
            new = kwargs["generation_config"].max_new_tokens
        state = self.route(input_ids, kwargs.get("attention_mask"), experts=experts,
                           inputs_embeds=kwargs.get("inputs_embeds"), exclude=exclude, new_tokens=int(new or 0))
        with self.context.activate(state):
            out = self.base.generate(input_ids, **kwargs) if input_ids is not None else self.base.generate(**kwargs)
        self.last_routing = state.trace()
        return out

    def explain(self, routing: list[RowRouting] | None = None) -> str:
        """A readable account of the last call's routing: per row, the experts and their weights."""
        return explain_routing(self.last_routing if routing is None else routing)

    # --- plain models -----------------------------------------------------------------------------------------------
    def copy_base(self) -> nn.Module:
        """A plain deep copy of the base model, without experts (e.g. to train a new adapter on).

        The live model is not touched: calls under way in other threads keep routing."""
        return self.expert_set.copy_base()

    def save_pretrained(self, *args: Any, **kwargs: Any) -> None:
        """Refused: a MoErgeModel is a base plus a library, and the library is already on disk."""
        raise TypeError(
            "a MoErgeModel is not saved as one checkpoint: its experts live in the library"
            f"{f' at {self.library.url}' if self.library is not None else ''}. Save the base with "
            "model.copy_base().save_pretrained(...), or a fixed mix with model.merge({...}).save_pretrained(...)"
        )

    def _apply(self, fn: Any, recurse: bool = True) -> MoErgeModel:
        super()._apply(fn, recurse)  # .to(dtype) also casts the banks: the experts' sizes change
        with self.expert_set.lock:
            self.expert_set.moved()
        return self

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_last", None)
        state["follower"] = None  # a copy does not follow the library (follow_library starts it)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._last = threading.local()

    def merge(self, weights: Mapping[str, float], method: str = "linear", *,
              layer_scaling: tuple[float, float] | None = None, **method_kwargs: Any) -> nn.Module:
        """A plain transformers model with the mix ``weights`` (expert → weight) folded into the base weights.

        The result has no routing overhead and no moerge modules; this model is left unchanged.
        ``method`` names a merge method of :mod:`moerge.adapters.merge` (``linear``, ``task_arithmetic``, ``ties``,
        ``dare_linear``, ``dare_ties``, ``magnitude_prune``, ``breadcrumbs``, ``breadcrumbs_ties``, ``consensus``)
        and ``method_kwargs`` its options (``density=``, ``scale=``, ``rank=``...); ``layer_scaling=(α, β)``
        applies LiNeS with the base's number of layers. It is :func:`~moerge.adapters.merge.merge_into` on
        :meth:`copy_base`.
        """
        self.expert_set.require_active()
        with self.expert_set.lock:
            for n in weights:
                if n not in self.expert_set:
                    raise RoutingError(f"unknown expert {n!r}", expert=n)
            experts = [self.get_expert(n) for n in weights]
            plain = self.copy_base()
        return merge_into(plain, experts, weights, method, layer_scaling=layer_scaling, **method_kwargs)

    def unpatch(self) -> nn.Module:
        """Put the original modules back and return the plain base model; this MoErgeModel is then unusable."""
        self.close()
        return self.expert_set.unpatch()
