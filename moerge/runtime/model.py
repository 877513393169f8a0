"""``MoErgeModel``: a causal LM whose linear modules mix a library's experts per request and per token."""

from __future__ import annotations

import copy
import dataclasses
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moerge.adapters.expert import Expert, ExpertMetadata, validate_name
from moerge.adapters.merge import add_update, lines_scales, merge_module
from moerge.adapters.peft_loader import load_peft_lora
from moerge.core.fingerprint import is_linear_like, linear_modules, linear_shape
from moerge.errors import BaseMismatchError, LibraryError, MoErgeError, RoutingError
from moerge.library import ExpertLibrary
from moerge.routers import build_router
from moerge.routing import (
    Candidates,
    Router,
    RouterContext,
    RoutingContext,
    RoutingRequest,
    RoutingState,
    RowRouting,
)
from moerge.runtime.layer import ExpertLinear, LayerBank

__all__ = ["MoErgeModel"]

_INSTALL_CHUNK = 64  # experts stacked into the layers per step when loading a library


class MoErgeModel(nn.Module):
    """A Hugging Face causal LM plus a library of experts, routed at inference time.

    Build one with :meth:`from_library`. Target ``nn.Linear`` (and GPT-2 ``Conv1D``) modules are replaced by
    :class:`~moerge.runtime.layer.ExpertLinear`, which keeps the original as ``base_layer``. Each call routes once at
    prefill (the router's global stage, or ``experts=`` given explicitly) and holds that routing for the row's
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
    ) -> None:
        super().__init__()
        if expert_dtype is not None and not (isinstance(expert_dtype, torch.dtype) and expert_dtype.is_floating_point):
            raise ValueError(f"expert_dtype must be a floating torch dtype, got {expert_dtype!r}")
        self.expert_device = None if expert_device is None else torch.device(expert_device)
        if any(isinstance(m, ExpertLinear) for m in base.modules()):
            raise ValueError("this base is already patched by another MoErgeModel; pass that model's copy_base() "
                             "(a plain copy) or unpatch() it first")
        self.base = base
        self.library = library
        self.tokenizer = tokenizer
        self.expert_dtype = expert_dtype  # how the layers store experts (None: the base's dtype)
        self.context = RoutingContext()
        self._lock = threading.RLock()
        self._experts: dict[str, ExpertMetadata] = {}
        self._modules_of: dict[str, list[str]] = {}
        self._layers: dict[str, ExpertLinear] = {}
        self._active = True
        self._last = threading.local()  # last_routing, per thread
        self.router = router
        router.attach(self.router_context())

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
            expert_dtype: the dtype the layers store the experts' factors in (default: the base's). With
                ``torch.bfloat16`` under a float32 base, a library takes half the memory; each request's
                candidates are cast to the base's dtype once, when they are gathered.
            expert_device: where the layers keep the experts' factors (default: with the base). ``"cpu"`` under a
                CUDA base keeps a library larger than the GPU's memory in host memory: each request copies only its
                candidates' factors to the GPU, once, when they are gathered; ``model.to(...)`` leaves them there.
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
        if isinstance(router, str):
            router = build_router(router)
        model = cls(base, router, library, tokenizer=tokenizer, expert_dtype=expert_dtype,
                    expert_device=expert_device)
        names = list(experts) if experts is not None else library.names()
        for i in range(0, len(names), _INSTALL_CHUNK):
            model._install([library.get(n) for n in names[i : i + _INSTALL_CHUNK]])
        model._persist_routing()
        return model

    def _persist_routing(self) -> None:
        """Let the router store the routing data it computed (a cache: a failure is a warning, not an error)."""
        if self.library is None:
            return
        try:
            self.router.persist(self.library)
        except OSError as e:
            warnings.warn(f"router {self.router.name!r} could not store its routing data in {self.library.root}: {e}",
                          stacklevel=3)

    def router_context(self) -> RouterContext:
        """What this model's router may know of it: module shapes, hidden size, tokenizer, the library's routing
        data, the base to generate with, and private copies of the base to train routing data on."""
        hidden = getattr(getattr(self.base, "config", None), "hidden_size", None)
        return RouterContext(modules=linear_modules(self.base), hidden_size=hidden if isinstance(hidden, int) else None,
                             tokenizer=self.tokenizer, store=self.library, language_model=self.base,
                             training_base=self.copy_base)

    # --- attribute delegation ---------------------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base":
                raise
            return getattr(self.base, name)

    @property
    def experts(self) -> list[str]:
        """Names of the experts the model routes over, in id order."""
        return list(self._experts)

    def expert_metadata(self, name: str) -> ExpertMetadata:
        return self._experts[name]

    @property
    def patched_modules(self) -> list[str]:
        return list(self._layers)

    # --- installing experts into the layers ------------------------------------------------------------------------
    def _check_fits(self, expert: Expert, *, replacing: bool = False) -> None:
        """Raise (changing nothing) unless every module ``expert`` targets is a linear module of the base with the
        expert's shapes."""
        validate_name(expert.name)
        if expert.name in self._experts and not replacing:
            raise LibraryError("the model already has an expert with this name", expert=expert.name)
        for m, w in expert.modules.items():
            layer = self._layers.get(m)
            if layer is not None:
                shape = (layer.out_features, layer.in_features)
            else:
                try:
                    mod = self.base.get_submodule(m)
                except AttributeError:
                    raise BaseMismatchError(f"targets module {m!r}, which the base model does not have",
                                            expert=expert.name) from None
                if not is_linear_like(mod):
                    raise BaseMismatchError(f"targets module {m!r}, a {type(mod).__name__}, not a linear module",
                                            expert=expert.name)
                shape = linear_shape(mod)
            if (w.out_features, w.in_features) != shape:
                raise BaseMismatchError(
                    f"module {m!r}: the expert maps {w.in_features}→{w.out_features} but the base maps "
                    f"{shape[1]}→{shape[0]}", expert=expert.name,
                )

    def _patch(self, module_name: str) -> ExpertLinear:
        layer = self._layers.get(module_name)
        if layer is not None:
            return layer
        parent_name, _, attr = module_name.rpartition(".")
        parent = self.base.get_submodule(parent_name) if parent_name else self.base
        layer = ExpertLinear(getattr(parent, attr), module_name, len(self._layers), self.context,
                             bank_device=self.expert_device)
        setattr(parent, attr, layer)
        self._layers[module_name] = layer
        return layer

    def _empty_bank(self, module_name: str) -> LayerBank:
        mod = self.base.get_submodule(module_name)
        out_f, in_f = linear_shape(mod)
        w = mod.weight
        dtype = self.expert_dtype or (w.dtype if w.is_floating_point() else torch.float32)
        return LayerBank.empty(in_f, out_f, self.expert_device or w.device, dtype)

    def _new_banks(self, add: Sequence[Expert], drop: set[str]) -> dict[str, LayerBank]:
        """The banks of every affected module after dropping ``drop`` and adding ``add`` (nothing is changed)."""
        banks: dict[str, LayerBank] = {}

        def current(m: str) -> LayerBank:
            if m not in banks:
                banks[m] = self._layers[m].bank if m in self._layers else self._empty_bank(m)
            return banks[m]

        for name in drop:
            for m in self._modules_of.get(name, []):
                banks[m] = current(m).without({name})
        by_module: dict[str, dict[str, Any]] = {}
        for e in add:
            for m, w in e.modules.items():
                by_module.setdefault(m, {})[e.name] = w
        for m, group in by_module.items():
            banks[m] = current(m).with_experts(group)
        return banks

    def _router_add(self, experts: Sequence[Expert]) -> Callable[[], None]:
        """Give ``experts`` to the router (replacing the routing data of names it has); returns an undo."""
        previous = {e.name: self.get_expert(e.name) for e in experts if e.name in self._experts}
        done: list[str] = []

        def undo() -> None:
            for n in reversed(done):
                if n in previous:
                    self.router.on_add_expert(previous[n])
                else:
                    self.router.on_remove_expert(n)

        try:
            for e in experts:
                self.router.on_add_expert(e)
                done.append(e.name)
        except BaseException:
            undo()
            raise
        return undo

    def _commit(self, banks: dict[str, LayerBank], add: Sequence[Expert], drop: set[str]) -> None:
        for m, bank in banks.items():
            if len(bank) or m in self._layers:
                self._patch(m).bank = bank
        for name in drop:
            self._experts.pop(name, None)
            self._modules_of.pop(name, None)
        for e in add:
            self._experts[e.name] = e.metadata
            self._modules_of[e.name] = sorted(e.modules)

    def _install(self, experts: Sequence[Expert]) -> None:
        """Add ``experts`` to the router and every layer they target; all or nothing."""
        with self._lock:
            names = [e.name for e in experts]
            if len(set(names)) != len(names):
                raise LibraryError("the same expert name appears twice", expert=names[0])
            for e in experts:
                self._check_fits(e)
            banks = self._new_banks(experts, set())
            self._router_add(experts)
            self._commit(banks, experts, set())

    def get_expert(self, name: str) -> Expert:
        """Expert ``name`` as the model holds it (rebuilt from the layers' stores, so also for experts that were
        added without persisting them)."""
        with self._lock:
            if name not in self._experts:
                raise LibraryError(f"the model has no expert {name!r}", expert=name)
            mods = {m: self._layers[m].bank.weights_of(name) for m in self._modules_of[name]}
            return Expert(name, mods, self._experts[name])

    def add_expert(
        self,
        expert: Expert | str | Path,
        name: str | None = None,
        *,
        description: str | None = None,
        examples: Iterable[str] | None = None,
        persist: bool = True,
        overwrite: bool = False,
    ) -> Expert:
        """Add an expert to the live model, post hoc, without reloading the base or retraining anything.

        ``expert`` is an :class:`Expert` or a PEFT LoRA folder (then ``name`` is required). ``description`` and
        ``examples`` set its metadata. With ``persist`` (the default) it is also added to the library. On any
        error the model and the library are as they were; calls already under way keep the experts they started
        with.
        """
        if not isinstance(expert, Expert):
            if name is None:
                raise ValueError("name= is required when adding a PEFT folder")
            expert = load_peft_lora(str(expert), name=name)
        elif name is not None and name != expert.name:
            expert = expert.renamed(name)
        if description is not None or examples is not None:
            expert = dataclasses.replace(expert, metadata=dataclasses.replace(
                expert.metadata,
                description=expert.metadata.description if description is None else description,
                examples=expert.metadata.examples if examples is None else [str(e) for e in examples]))
        with self._lock:
            self._require_active()
            replacing = overwrite and expert.name in self._experts
            try:
                self._check_fits(expert, replacing=replacing)
            except MoErgeError as e:  # name the file the weights came from, when known
                src = expert.metadata.source or {}
                raise e.at(str(Path(src["path"]) / "adapter_model.safetensors") if src.get("type") == "peft"
                           and src.get("path") else None) from None
            drop = {expert.name} if replacing else set()
            banks = self._new_banks([expert], drop)
            undo_router = self._router_add([expert])
            if persist and self.library is not None:
                try:
                    expert = self.library.add(expert, overwrite=overwrite)  # atomic: all or nothing on disk
                except BaseException:
                    undo_router()
                    raise
            self._commit(banks, [expert], drop)
            if persist:
                self._persist_routing()
        return expert

    def remove_expert(self, name: str, *, persist: bool = True) -> None:
        """Remove an expert from the live model (and, with ``persist``, from the library)."""
        with self._lock:
            if name not in self._experts:
                raise LibraryError(f"the model has no expert {name!r}", expert=name)
            banks = self._new_banks([], {name})
            if persist and self.library is not None and name in self.library:
                self.library.remove(name)
            self._commit(banks, [], {name})
            self.router.on_remove_expert(name)
            if persist:
                self._persist_routing()

    def set_router(self, router: str | Router) -> None:
        """Route with another router from now on; it is given every current expert."""
        if isinstance(router, str):
            router = build_router(router)
        with self._lock:
            router.attach(self.router_context())
            for n in self._experts:
                router.on_add_expert(self.get_expert(n))
            self.router = router
            self._persist_routing()

    # --- routing ------------------------------------------------------------------------------------------------
    def _chat_markers(self) -> tuple[str, str] | None:
        """The text that opens and closes a user turn in the tokenizer's chat template (``None`` without one)."""
        if "_chat_markers_cache" not in self.__dict__:
            markers = None
            tok = self.tokenizer
            if getattr(tok, "chat_template", None):
                try:
                    s = tok.apply_chat_template([{"role": "user", "content": "\x00"}], tokenize=False,
                                                add_generation_prompt=True)
                    pre, post = s.split("\x00", 1)
                    i = pre.rfind("user")
                    opener = pre[pre.rfind("\n", 0, i) + 1 :] if i >= 0 else ""
                    closer = post.split("\n", 1)[0] if "\n" in post else post
                    if opener and closer:
                        markers = (opener, closer)
                except Exception:  # noqa: BLE001 - a template that cannot render: use the whole text
                    markers = None
            self.__dict__["_chat_markers_cache"] = markers
        return self.__dict__["_chat_markers_cache"]

    def _decode_prompts(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None) -> list[str] | None:
        """Each row's prompt as text: the last user message when the tokenizer has a chat template and the prompt
        follows it, else the whole decoded prompt."""
        if self.tokenizer is None or input_ids is None:
            return None
        markers = self._chat_markers()
        rows = []
        for b in range(input_ids.shape[0]):
            ids = input_ids[b] if attention_mask is None else input_ids[b][attention_mask[b].bool()]
            text = None
            if markers is not None:
                raw = self.tokenizer.decode(ids.tolist(), skip_special_tokens=False)
                start = raw.rfind(markers[0])
                if start >= 0:
                    body = raw[start + len(markers[0]) :]
                    end = body.find(markers[1])
                    text = (body[:end] if end >= 0 else body).strip()
            if text is None:
                text = self.tokenizer.decode(ids.tolist(), skip_special_tokens=True)
            rows.append(text)
        return rows

    def route(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        experts: Sequence[Mapping[str, float]] | Mapping[str, float] | None = None,
        inputs_embeds: torch.Tensor | None = None,
        exclude: Iterable[str] | None = None,
        new_tokens: int = 0,
    ) -> RoutingState:
        """Decide the routing of a batch (the global stage) and gather every module's candidate factors.

        ``experts`` forces a mix per row (``[{"sql": 1.0}, {"math": .5, "sql": .5}]``) or one mix for all rows.
        ``exclude`` names experts no row may use: they are dropped from the router's candidates (sequence weights
        are renormalised over the rest). An empty prompt, or one that with ``new_tokens`` to generate exceeds the
        base's context, is refused.
        """
        self._require_active()
        self._check_prompt(input_ids, attention_mask, new_tokens)
        if experts is not None and isinstance(experts, Mapping):
            experts = [experts]
        with self._lock:
            names = tuple(self._experts)
            router = self.router
            if experts is not None:
                from moerge.routers.explicit import ExplicitRouter

                router = ExplicitRouter()
                router.attach(self.router_context())
            if input_ids is not None:
                batch = int(input_ids.shape[0])
            elif inputs_embeds is not None:
                batch = int(inputs_embeds.shape[0])
            else:
                batch = len(experts or [])
            if experts is not None and len(experts) == 1 and batch > 1:
                experts = list(experts) * batch
            request = RoutingRequest(
                input_ids=input_ids, attention_mask=attention_mask, names=names, experts=experts,
                prompts=None if experts is not None else self._decode_prompts(input_ids, attention_mask),
            )
            cands = router.select(request)
            if not isinstance(cands, Candidates) or cands.names != names:
                raise RoutingError(f"router {router.name!r} returned candidates over other expert names")
            if cands.weights is None and not router.has_local_gate:
                raise RoutingError(f"router {router.name!r} gave no mixing weights and has no local gate")
            if cands.batch_size != batch:
                raise RoutingError(f"router {router.name!r} routed {cands.batch_size} rows for a batch of {batch}")
            if exclude:
                cands = self._without(cands, set(exclude))
            fuse = cands.weights is None and router.has_local_gate and router.has_linear_gate
            gathered = {layer.layer_index: layer.bank.gather(
                cands, layer.compute_dtype,
                router.linear_gate(cands, layer.info, layer.compute_device) if fuse else None, layer.compute_device)
                for layer in self._layers.values()}
        return RoutingState(cands, router, gathered, record_usage=True)

    def _without(self, cands: Candidates, names: set[str]) -> Candidates:
        unknown = sorted(names - set(cands.names))
        if unknown:
            raise RoutingError(f"cannot exclude unknown experts {unknown[:5]}", expert=unknown[0])
        drop = torch.tensor([[i >= 0 and cands.names[i] in names for i in row] for row in cands.ids.tolist()],
                            dtype=torch.bool).reshape(cands.ids.shape)
        weights = None
        if cands.weights is not None:
            weights = cands.weights.masked_fill(drop, 0.0)
            total = weights.sum(-1, keepdim=True)
            weights = torch.where(total > 0, weights / total.clamp_min(1e-12), weights)
        return Candidates(ids=cands.ids.masked_fill(drop, -1), scores=cands.scores.masked_fill(drop, 0.0),
                          names=cands.names, weights=weights)

    @property
    def context_length(self) -> int | None:
        """The base's context length (``max_position_embeddings``), when its config gives one."""
        n = getattr(self.base.config, "max_position_embeddings", None) or getattr(self.base.config, "n_positions", None)
        return int(n) if isinstance(n, int) and n > 0 else None

    def _check_prompt(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
                      new_tokens: int = 0) -> None:
        """Refuse an empty prompt (no tokens, or a row of padding only) and one that does not fit the context."""
        if input_ids is None:
            return
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise RoutingError(f"the prompt is empty (input_ids of shape {tuple(input_ids.shape)})")
        if attention_mask is not None:
            lengths = attention_mask.reshape(input_ids.shape[0], -1).sum(-1).tolist()
            empty = [b for b, n in enumerate(lengths) if n == 0]
            if empty:
                raise RoutingError(f"row {empty[0]}: the prompt is empty (only padding)")
        ctx = self.context_length
        if ctx is not None and input_ids.shape[1] + new_tokens > ctx:
            what = f"the prompt has {input_ids.shape[1]} tokens" + (f" and {new_tokens} are to be generated"
                                                                  if new_tokens else "")
            raise RoutingError(f"{what}: longer than the model's context of {ctx} tokens")

    @contextmanager
    def routing(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        experts: Sequence[Mapping[str, float]] | Mapping[str, float] | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> Iterator[RoutingState]:
        """Route once and keep that routing for every forward inside the block (for hand-written decode loops)."""
        state = self.route(input_ids, attention_mask, experts=experts, inputs_embeds=inputs_embeds)
        with self.context.activate(state):
            yield state
        self.last_routing = state.trace()

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
        routing = self.last_routing if routing is None else routing
        if not routing:
            return "no routed call yet"
        lines = []
        for b, row in enumerate(routing):
            mix = ", ".join(f"{n} {w:.3f}" for n, w in sorted(row.experts.items(), key=lambda t: -t[1]))
            lines.append(f"row {b}: {mix or '(no expert: base model)'}")
            if row.scores and any(s != row.experts.get(n) for n, s in zip(row.candidates, row.scores)):
                cand = ", ".join(f"{n} {s:.3f}" for n, s in zip(row.candidates, row.scores))
                lines.append(f"  candidates (score): {cand}")
            for mod, usage in row.layer_usage.items():
                top = ", ".join(f"{n} {w:.2f}" for n, w in sorted(usage.items(), key=lambda t: -t[1])[:3])
                lines.append(f"  {mod}: {top}")
        return "\n".join(lines)

    # --- merging and unpatching -------------------------------------------------------------------------------------
    def _require_active(self) -> None:
        if not self._active:
            raise RuntimeError("this MoErgeModel was unpatched; build a new one with MoErgeModel.from_library")

    def copy_base(self) -> nn.Module:
        """A plain deep copy of the base model, without experts (e.g. to train a new adapter on).

        The live model is not touched: calls under way in other threads keep routing."""
        self._require_active()
        with self._lock:
            memo: dict[int, Any] = {}
            for layer in self._layers.values():  # each patched module is copied as its original module
                memo[id(layer)] = copy.deepcopy(layer.base_layer, memo)
            return copy.deepcopy(self.base, memo)

    def save_pretrained(self, *args: Any, **kwargs: Any) -> None:
        """Refused: a MoErgeModel is a base plus a library, and the library is already on disk."""
        raise TypeError(
            "a MoErgeModel is not saved as one checkpoint: its experts live in the library"
            f"{f' at {self.library.root}' if self.library is not None else ''}. Save the base with "
            "model.copy_base().save_pretrained(...), or a fixed mix with model.merge({...}).save_pretrained(...)"
        )

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_lock", None)
        state.pop("_last", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._lock = threading.RLock()
        self._last = threading.local()

    def merge(self, weights: Mapping[str, float], method: str = "linear", *,
              layer_scaling: tuple[float, float] | None = None, **method_kwargs: Any) -> nn.Module:
        """A plain transformers model with the mix ``weights`` (expert → weight) folded into the base weights.

        The result has no routing overhead and no moerge modules; this model is left unchanged.
        ``method`` names a merge method of :mod:`moerge.adapters.merge` (``linear``, ``task_arithmetic``, ``ties``,
        ``dare_linear``, ``dare_ties``, ``magnitude_prune``, ``breadcrumbs``, ``breadcrumbs_ties``, ``consensus``)
        and ``method_kwargs`` its options (``density=``, ``scale=``, ...); ``layer_scaling=(α, β)`` applies LiNeS.
        """
        self._require_active()
        with self._lock:
            for n in weights:
                if n not in self._experts:
                    raise RoutingError(f"unknown expert {n!r}", expert=n)
            plain = self.copy_base()
            n_layers = getattr(getattr(plain, "config", None), "num_hidden_layers", None)
            scales = lines_scales(list(self._layers), *layer_scaling, num_layers=n_layers) if layer_scaling else {}
            with torch.no_grad():
                for name, layer in self._layers.items():
                    used = {n: w for n, w in weights.items() if n in layer.bank}
                    if not used:
                        continue
                    s = scales.get(name, 1.0)
                    dw = merge_module({n: layer.bank.delta_weight(n) for n in used}, used, method, **method_kwargs)
                    biases = [(wt, layer.bank.delta_bias(n)) for n, wt in used.items()]
                    biases = [(wt, b) for wt, b in biases if b is not None]
                    db = sum(wt * b.float() for wt, b in biases) * s if biases else None
                    add_update(plain, name, dw * s, db)
        return plain

    def unpatch(self) -> nn.Module:
        """Put the original modules back and return the plain base model; this MoErgeModel is then unusable."""
        with self._lock:
            self._require_active()
            for name, layer in self._layers.items():
                parent_name, _, attr = name.rpartition(".")
                parent = self.base.get_submodule(parent_name) if parent_name else self.base
                setattr(parent, attr, layer.base_layer)
            self._layers.clear()
            self._active = False
        return self.base
