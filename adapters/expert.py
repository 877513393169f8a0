"""The `Expert` type: one adapter's weights for some modules of a base model, plus its metadata.

An expert holds, per target module (named as in ``base.named_modules()``), either

* LoRA factors ``A (r × in)``, ``B (out × r)`` and a ``scale``: the module's update is ``ΔW = scale · B @ A``; or
* a dense delta ``ΔW (out × in)`` and optionally a bias delta ``Δb (out,)``: a full fine-tune's "diff vector"; or
* stacked LoRA factors ``A (E × r × in)``, ``B (E × out × r)`` of a fused MoE expert parameter ``(E, out, in)``
  (transformers' ``experts.gate_up_proj`` / ``experts.down_proj``), named by the parameter: the update of MoE
  expert ``e`` is ``ΔW[e] = scale · B[e] @ A[e]``.

Weights always use the ``(out, in)`` convention of ``nn.Linear``, also for GPT-2 style ``Conv1D`` modules whose
own weight is stored ``(in, out)``; the patched layer and the merge code transpose where the base needs it.
Ranks and target modules may differ between experts.
"""

from __future__ import annotations

import contextvars
import math
import re
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from moerge.adapters.packed import PackedSigns
from moerge.errors import ExpertFormatError

__all__ = ["Expert", "StoredExpert", "ExpertMetadata", "LoRAWeights", "DeltaWeights", "StackedLoRAWeights", "ModuleWeights",
           "validate_name"]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


def validate_name(name: str) -> str:
    """Check that ``name`` can name an expert (and its folder): letters, digits, ``_ . -``; no path parts."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or ".." in name:  # fullmatch: no "name\n"
        raise ExpertFormatError(
            f"invalid expert name {name!r}: use 1-128 letters, digits, '_', '.', '-', starting with a letter "
            "or digit, with no path separators and no '..'",
            expert=name if isinstance(name, str) else None,
        )
    return name


_VALUES_CHECKED = contextvars.ContextVar("moerge_values_checked", default=False)  # see Expert.from_state_dict


def _check_tensor(t: torch.Tensor, what: str, expert: str | None, module: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise ExpertFormatError(f"{what} of module {module!r} is {type(t).__name__}, not a tensor", expert=expert)
    if t.numel() == 0:
        raise ExpertFormatError(f"{what} of module {module!r} is empty (shape {tuple(t.shape)})", expert=expert)
    if not t.is_floating_point():
        raise ExpertFormatError(f"{what} of module {module!r} has dtype {t.dtype}, not a float type", expert=expert)
    if not _VALUES_CHECKED.get() and not torch.isfinite(t).all():
        raise ExpertFormatError(f"{what} of module {module!r} contains NaN or Inf values", expert=expert)


class _ModuleUpdate:
    """What every kind of module update tells of its shape: ``(out, in)`` and a rank."""

    shape: tuple[int, int]  # (out_features, in_features), set by each kind

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]


@dataclass
class LoRAWeights(_ModuleUpdate):
    """LoRA factors of one module: the update is ``scale · B @ A``.

    Shapes: ``A (r, in)``, ``B (out, r)``.
    """

    A: torch.Tensor
    B: torch.Tensor
    scale: float = 1.0

    kind = "lora"

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.B.shape[0]), int(self.A.shape[1])

    def validate(self, expert: str | None, module: str) -> None:
        _check_tensor(self.A, "lora_A", expert, module)
        _check_tensor(self.B, "lora_B", expert, module)
        if self.A.dim() != 2 or self.B.dim() != 2:
            raise ExpertFormatError(
                f"module {module!r}: lora_A and lora_B must be 2-D, got {tuple(self.A.shape)} and {tuple(self.B.shape)}",
                expert=expert,
            )
        if self.A.shape[0] != self.B.shape[1]:
            raise ExpertFormatError(
                f"module {module!r}: rank mismatch, lora_A is {tuple(self.A.shape)} (r×in) but lora_B is "
                f"{tuple(self.B.shape)} (out×r)",
                expert=expert,
            )
        if not math.isfinite(self.scale):
            raise ExpertFormatError(f"module {module!r}: scale {self.scale!r} is not finite", expert=expert)

    def delta_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense update ``scale · B @ A`` as an ``(out, in)`` tensor."""
        dt = dtype or torch.promote_types(self.A.dtype, torch.float32)
        return (self.B.to(dt) @ self.A.to(dt)) * self.scale  # (out, in)

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.lora_A": self.A, f"{prefix}.lora_B": self.B}

    def spec(self) -> dict[str, Any]:
        return {"kind": "lora", "rank": self.rank, "scale": float(self.scale),
                "in_features": self.in_features, "out_features": self.out_features}


@dataclass
class DeltaWeights(_ModuleUpdate):
    """A dense update ``ΔW (out, in)`` of one module, with an optional bias update ``Δb (out,)``."""

    delta: torch.Tensor
    bias: torch.Tensor | None = None

    kind = "delta"

    @property
    def rank(self) -> int:
        return int(min(self.delta.shape))

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.delta.shape[0]), int(self.delta.shape[1])

    def validate(self, expert: str | None, module: str) -> None:
        _check_tensor(self.delta, "delta", expert, module)
        if self.delta.dim() != 2:
            raise ExpertFormatError(f"module {module!r}: delta must be 2-D, got {tuple(self.delta.shape)}", expert=expert)
        if self.bias is not None:
            _check_tensor(self.bias, "delta_bias", expert, module)
            if tuple(self.bias.shape) != (self.delta.shape[0],):
                raise ExpertFormatError(
                    f"module {module!r}: delta_bias has shape {tuple(self.bias.shape)}, expected ({self.delta.shape[0]},)",
                    expert=expert,
                )

    def delta_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.delta.to(dtype) if dtype is not None else self.delta

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {f"{prefix}.delta": self.delta}
        if self.bias is not None:
            out[f"{prefix}.delta_bias"] = self.bias
        return out

    def spec(self) -> dict[str, Any]:
        return {"kind": "delta", "bias": self.bias is not None,
                "in_features": self.in_features, "out_features": self.out_features}


@dataclass
class StackedLoRAWeights(_ModuleUpdate):
    """LoRA factors of a fused MoE expert parameter ``(E, out, in)``, one pair per MoE expert: the update of MoE
    expert ``e`` is ``scale · B[e] @ A[e]``. Shapes: ``A (E, r, in)``, ``B (E, out, r)``; :attr:`shape` is one MoE
    expert's ``(out, in)``. PEFT's ``target_parameters`` layout (``lora_A (r·E, in)`` expert-major, ``lora_B
    (out, r·E)`` rank-major) is converted by :func:`~moerge.adapters.peft_moe.stacked_from_peft`."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float = 1.0

    kind = "stacked_lora"

    @property
    def rank(self) -> int:
        return int(self.A.shape[1])

    @property
    def experts(self) -> int:
        return int(self.A.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.B.shape[1]), int(self.A.shape[2])

    def validate(self, expert: str | None, module: str) -> None:
        _check_tensor(self.A, "lora_A", expert, module)
        _check_tensor(self.B, "lora_B", expert, module)
        if self.A.dim() != 3 or self.B.dim() != 3:
            raise ExpertFormatError(f"parameter {module!r}: stacked lora_A and lora_B must be 3-D (experts first), got "
                                    f"{tuple(self.A.shape)} and {tuple(self.B.shape)}", expert=expert)
        if self.A.shape[0] != self.B.shape[0] or self.A.shape[1] != self.B.shape[2]:
            raise ExpertFormatError(f"parameter {module!r}: lora_A is {tuple(self.A.shape)} (E×r×in) but lora_B is "
                                    f"{tuple(self.B.shape)} (E×out×r)", expert=expert)
        if not math.isfinite(self.scale):
            raise ExpertFormatError(f"parameter {module!r}: scale {self.scale!r} is not finite", expert=expert)

    def delta_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense update of every MoE expert, ``(E, out, in)``."""
        dt = dtype or torch.promote_types(self.A.dtype, torch.float32)
        return torch.bmm(self.B.to(dt), self.A.to(dt)) * self.scale

    def flat(self) -> LoRAWeights:
        """The factors as one LoRA pair over the MoE experts side by side, how a bank stores them: ``A (r, E·in)``
        (row ``j`` holds every expert's ``A[e, j]``), ``B (E·out, r)``."""
        E, r, n_in = self.A.shape
        return LoRAWeights(self.A.permute(1, 0, 2).reshape(r, E * n_in), self.B.reshape(-1, r), self.scale)

    @classmethod
    def from_flat(cls, w: LoRAWeights, experts: int) -> StackedLoRAWeights:
        """The inverse of :meth:`flat`."""
        r = w.rank
        return cls(w.A.reshape(r, experts, -1).permute(1, 0, 2).contiguous(), w.B.reshape(experts, -1, r).contiguous(),
                   w.scale)

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.lora_A": self.A, f"{prefix}.lora_B": self.B}

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "rank": self.rank, "scale": float(self.scale), "experts": self.experts,
                "in_features": self.in_features, "out_features": self.out_features}


ModuleWeights = LoRAWeights | DeltaWeights | StackedLoRAWeights


@dataclass
class ExpertMetadata:
    """What an expert is for and where it came from.

    ``base_fingerprint`` is the dict of :func:`moerge.core.fingerprint.fingerprint` for the base the expert was made on
    (``None`` when unknown, e.g. a PEFT adapter added before any base was seen).
    """

    description: str = ""
    examples: list[str] = field(default_factory=list)
    base_model: str | None = None
    base_fingerprint: dict[str, Any] | None = None
    source: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "description": self.description,
            "examples": list(self.examples),
            "base_model": self.base_model,
            "base_fingerprint": self.base_fingerprint,
            "source": dict(self.source),
            "extra": dict(self.extra),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ExpertMetadata:
        return cls(
            description=str(data.get("description") or ""),
            examples=[str(e) for e in (data.get("examples") or [])],
            base_model=data.get("base_model"),
            base_fingerprint=data.get("base_fingerprint"),
            source=dict(data.get("source") or {}),
            extra=dict(data.get("extra") or {}),
        )


@dataclass
class Expert:
    """One expert: a name, its metadata and its weights per target module.

    Build one directly, or with :func:`~moerge.adapters.peft_loader.load_peft_lora` (a PEFT LoRA directory) or
    :func:`~moerge.adapters.delta.expert_from_diff` (a full fine-tune minus its base). ``modules`` maps a module name of the base (``"model.layers.0.self_attn.q_proj"``) to
    :class:`LoRAWeights` or :class:`DeltaWeights`.
    """

    name: str
    modules: dict[str, ModuleWeights]
    metadata: ExpertMetadata = field(default_factory=ExpertMetadata)
    compressed: dict[str, Any] = field(default_factory=dict, repr=False)
    """State-dict key (``"<module>.lora_A"``, ``"<module>.delta"``) → its packed form
    (:class:`~moerge.adapters.compress.PackedSigns`), which the library stores instead of the dense tensor; the
    module weights hold the reconstruction. Empty for an uncompressed expert."""

    def __post_init__(self) -> None:
        validate_name(self.name)
        if not self.modules:
            raise ExpertFormatError("the expert has no module weights", expert=self.name)
        keys = {k for m, w in self.modules.items() for k in w.tensors(m)}
        stray = sorted(set(self.compressed) - keys)
        if stray:
            raise ExpertFormatError(f"compressed tensors {stray[:3]} belong to no module weight", expert=self.name)
        for module, w in self.modules.items():
            if not isinstance(w, (LoRAWeights, DeltaWeights, StackedLoRAWeights)):
                raise ExpertFormatError(f"module {module!r} holds {type(w).__name__}; expected LoRAWeights, "
                                        "DeltaWeights or StackedLoRAWeights", expert=self.name)
            w.validate(self.name, module)

    # --- convenience --------------------------------------------------------------------------------------------
    @property
    def description(self) -> str:
        return self.metadata.description

    @property
    def target_modules(self) -> list[str]:
        return sorted(self.modules)

    def load(self) -> Expert:
        """The expert with its weights in memory: itself (a :class:`StoredExpert` reads them). Code that reads an
        expert's weights several times calls this once."""
        return self

    def shapes(self) -> dict[str, tuple[int, int]]:
        """``(out_features, in_features)`` per module."""
        return {m: (w.out_features, w.in_features) for m, w in self.modules.items()}

    @property
    def ranks(self) -> dict[str, int]:
        """Rank per LoRA module and stacked parameter (dense modules are left out)."""
        return {m: w.rank for m, w in sorted(self.modules.items()) if not isinstance(w, DeltaWeights)}

    def stacked_targets(self) -> list[str]:
        """The fused MoE expert parameters the expert targets (:class:`StackedLoRAWeights`)."""
        return sorted(m for m, s in self.spec().items() if s["kind"] == StackedLoRAWeights.kind)

    def refuse_stacked(self, what: str) -> None:
        """Raise, naming them, when the expert has fused MoE expert parameters, which ``what`` cannot handle."""
        stacked = self.stacked_targets()
        if stacked:
            raise ExpertFormatError(f"{what} does not support fused MoE expert parameters, which it targets: "
                                    f"{stacked[:2]}{' …' if len(stacked) > 2 else ''}", expert=self.name)

    @property
    def kind(self) -> str:
        """``"lora"``, ``"delta"`` or ``"mixed"``."""
        kinds = {w.kind for w in self.modules.values()}
        return kinds.pop() if len(kinds) == 1 else "mixed"

    def num_parameters(self) -> int:
        return sum(t.numel() for m, w in self.modules.items() for t in w.tensors(m).values())

    def delta_weights(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Dense ``(out, in)`` update per module."""
        return {m: w.delta_weight(dtype) for m, w in self.modules.items()}

    def renamed(self, name: str) -> Expert:
        return Expert(name=name, modules=self.modules, metadata=self.metadata, compressed=self.compressed)

    def to(self, dtype: torch.dtype) -> Expert:
        """A copy with every tensor cast to ``dtype`` (scales stay float)."""
        mods: dict[str, ModuleWeights] = {}
        for m, w in self.modules.items():
            if isinstance(w, (LoRAWeights, StackedLoRAWeights)):
                mods[m] = type(w)(w.A.to(dtype), w.B.to(dtype), w.scale)
            else:
                mods[m] = DeltaWeights(w.delta.to(dtype), None if w.bias is None else w.bias.to(dtype))
        return Expert(self.name, mods, self.metadata, compressed=self.compressed)

    # --- serialisation (used by ExpertLibrary) -------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat tensor dict for safetensors: ``<module>.lora_A``, ``<module>.lora_B``, ``<module>.delta[_bias]``;
        a compressed tensor ``<key>`` is stored packed as ``<key>.signs`` and ``<key>.mask`` (uint8)."""
        out: dict[str, torch.Tensor] = {}
        for m, w in sorted(self.modules.items()):
            for k, v in w.tensors(m).items():
                if k in self.compressed:
                    out.update(self.compressed[k].tensors(k))
                else:
                    out[k] = v.detach().contiguous().cpu()
        return out

    def digest(self) -> str:
        """sha256 of the expert's weights (module names, layout and values in float32): routing data made for these
        weights records it, so data made for other weights is never reused. Values are hashed in float32, so an
        expert stored in bf16 and the same expert held by a float32 model have one digest."""
        import hashlib

        h = hashlib.sha256()
        for key, t in sorted(self.state_dict().items()):
            h.update(key.encode())
            h.update(str(tuple(t.shape)).encode())
            t32 = t.detach().cpu().float().contiguous().reshape(-1)
            h.update(t32.numpy().tobytes() if t.numel() else b"")
        h.update(repr(sorted(self.spec().items())).encode())
        return h.hexdigest()

    def spec(self) -> dict[str, Any]:
        """The JSON description of the weights' layout (kind, rank, scale per module; how a tensor is compressed)."""
        out = {}
        for m, w in sorted(self.modules.items()):
            spec = w.spec()
            packed = {k[len(m) + 1:]: self.compressed[k].spec() for k in w.tensors(m) if k in self.compressed}
            if packed:
                spec["compressed"] = packed
            out[m] = spec
        return out

    @classmethod
    def from_state_dict(
        cls, name: str, spec: Mapping[str, Mapping[str, Any]], tensors: Mapping[str, torch.Tensor],
        metadata: ExpertMetadata | None = None, *, file: str | None = None, values_checked: bool = False,
    ) -> Expert:
        """Rebuild an expert from :meth:`spec` and :meth:`state_dict` output, checking that they agree.
        ``values_checked``: the tensors' values were checked when they were stored (a library's file whose sha256
        matches its manifest), so the scan for NaN and Inf is skipped; shapes and kinds are still checked."""
        mods: dict[str, ModuleWeights] = {}
        used: set[str] = set()
        compressed: dict[str, Any] = {}
        if any(isinstance(s, Mapping) and s.get("compressed") for s in spec.values()):
            tensors = dict(tensors)
            for m, s in spec.items():
                entries = s.get("compressed") or {}
                if not isinstance(entries, Mapping):
                    raise ExpertFormatError(f"module {m!r}: 'compressed' must map tensor names to settings",
                                            expert=name, file=file)
                for role, cs in entries.items():
                    if role not in ("lora_A", "lora_B", "delta") or not isinstance(cs, Mapping):
                        raise ExpertFormatError(f"module {m!r}: cannot decompress {role!r}", expert=name, file=file)
                    key = f"{m}.{role}"
                    if key in tensors:
                        raise ExpertFormatError(f"{key} is stored both dense and compressed", expert=name, file=file)
                    packed = PackedSigns.from_tensors(key, dict(cs), tensors, expert=name, file=file)
                    compressed[key] = packed
                    used |= set(packed.tensors(key))
                    tensors[key] = packed.dense()
        for m, s in spec.items():
            kind = s.get("kind")
            try:
                if kind in ("lora", StackedLoRAWeights.kind):
                    a, b = tensors[f"{m}.lora_A"], tensors[f"{m}.lora_B"]
                    used |= {f"{m}.lora_A", f"{m}.lora_B"}
                    w: ModuleWeights = (LoRAWeights if kind == "lora" else StackedLoRAWeights)(a, b, float(s["scale"]))
                    if kind != "lora" and s.get("experts") != (a.shape[0] if a.dim() == 3 else None):
                        raise ExpertFormatError(f"parameter {m!r}: expert.json says {s.get('experts')} experts but "
                                                f"lora_A has shape {tuple(a.shape)}", expert=name, file=file)
                    if int(s.get("rank", w.rank)) != w.rank:
                        raise ExpertFormatError(
                            f"module {m!r}: expert.json says rank {s.get('rank')} but lora_A has shape {tuple(a.shape)}",
                            expert=name, file=file,
                        )
                elif kind == "delta":
                    d = tensors[f"{m}.delta"]
                    used.add(f"{m}.delta")
                    bias = tensors.get(f"{m}.delta_bias") if s.get("bias") else None
                    if s.get("bias"):
                        if bias is None:
                            raise KeyError(f"{m}.delta_bias")
                        used.add(f"{m}.delta_bias")
                    w = DeltaWeights(d, bias)
                else:
                    raise ExpertFormatError(f"module {m!r} has unknown kind {kind!r}", expert=name, file=file)
            except KeyError as e:
                raise ExpertFormatError(f"missing tensor {e.args[0]!r}", expert=name, file=file) from None
            mods[m] = w
        extra = sorted(set(tensors) - used - set(compressed))
        if extra:
            raise ExpertFormatError(f"tensors not described in expert.json: {extra[:5]}", expert=name, file=file)
        token = _VALUES_CHECKED.set(values_checked)
        try:
            return cls(name=name, modules=mods, metadata=metadata or ExpertMetadata(), compressed=compressed)
        except ExpertFormatError as e:
            raise e.at(file) from None
        finally:
            _VALUES_CHECKED.reset(token)


class _Layout(dict):
    """A layout shared by the stored experts that have it (weakly interned; never changed)."""

    key: tuple


_LAYOUTS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def intern_layout(layout: Mapping[str, Mapping[str, Any]], name: str | None = None) -> _Layout:
    """The shared copy of ``layout`` (a :meth:`Expert.spec`), checked: experts of one layout share one copy of it
    (a library's experts mostly do). A :class:`StoredExpert` given the returned object skips this work."""
    if not layout:
        raise ExpertFormatError("the expert has no module weights", expert=name)
    shape, rest = [], []
    for m, spec in layout.items():
        kind, rank, fin, fout = spec.get("kind"), spec.get("rank", 0), spec.get("in_features"), spec.get("out_features")
        if kind not in _KINDS or type(fin) is not int or type(fout) is not int or fin <= 0 or fout <= 0:
            raise ExpertFormatError(f"module {m!r}: a layout without kind and shapes: {dict(spec)!r}", expert=name)
        if kind == StackedLoRAWeights.kind and (type(spec.get("experts")) is not int or spec["experts"] <= 0):
            raise ExpertFormatError(f"parameter {m!r}: a stacked layout without its number of experts", expert=name)
        shape.append((m, kind, rank, fin, fout, bool(spec.get("bias")), spec.get("experts", 0)))
        rest.append(spec.get("scale") if spec.keys() <= _PLAIN_SPEC else repr(sorted(spec.items())))
    key = tuple(shape)
    full = (key, tuple(rest))
    shared = _LAYOUTS.get(full)
    if shared is None:
        shared = _LAYOUTS.setdefault(full, _Layout({m: dict(s) for m, s in layout.items()}))
        shared.key = key
    return shared
_PLAIN_SPEC = {"kind", "rank", "scale", "in_features", "out_features", "bias", "experts"}  # told apart by its scale
_KINDS = ("lora", "delta", StackedLoRAWeights.kind)


class StoredExpert(Expert):
    """An expert whose weights stay where they are stored until they are read.

    It holds the name, the metadata and the layout of the weights (:meth:`spec`: kind, rank, scale and shapes per
    module), which is what routing an expert and checking it against a base need. :attr:`modules` reads the weights
    through ``load`` (a library checks them against their sha256 there) every time it is used, and keeps nothing,
    so holding one costs no weight memory: a model loads an expert's factors when a call first needs them
    (:meth:`load` gives the whole :class:`Expert`, to read once and use several times).

    Args:
        name: the expert's name.
        metadata: its metadata.
        layout: its :meth:`spec` (module → ``{"kind", "rank", "scale", "in_features", "out_features", ...}``).
        load: reads the expert; raises when it cannot (a file gone, a sha256 that disagrees).
        digest: :meth:`Expert.digest` of its weights when known (a library records it); else computed on first use.
    """

    def __init__(self, name: str, metadata: ExpertMetadata, layout: Mapping[str, Mapping[str, Any]],
                 load: Callable[[], Expert], digest: str | None = None) -> None:
        validate_name(name)
        shared = layout if isinstance(layout, _Layout) else intern_layout(layout, name)
        self.name, self.metadata, self.layout = name, metadata, shared
        self.layout_key = shared.key
        """What the expert's shapes are, hashable: experts of one key fit a base alike and take as many bytes."""
        self._load, self._digest = load, digest

    def load(self) -> Expert:
        """The whole expert, read now."""
        expert = self._load()
        if expert.name != self.name or expert.spec() != self.spec():
            raise ExpertFormatError("the stored weights no longer match the layout read before", expert=self.name)
        return expert

    @property  # type: ignore[override]
    def modules(self) -> dict[str, ModuleWeights]:
        return self.load().modules

    @property  # type: ignore[override]
    def compressed(self) -> dict[str, Any]:
        return self.load().compressed

    @property
    def target_modules(self) -> list[str]:
        return sorted(self.layout)

    @property
    def ranks(self) -> dict[str, int]:
        return {m: int(s["rank"]) for m, s in sorted(self.layout.items()) if s["kind"] != "delta"}

    @property
    def kind(self) -> str:
        kinds = {s["kind"] for s in self.layout.values()}
        return kinds.pop() if len(kinds) == 1 else "mixed"

    def spec(self) -> dict[str, Any]:
        return {m: dict(self.layout[m]) for m in sorted(self.layout)}

    def digest(self) -> str:
        if self._digest is None:
            self._digest = self.load().digest()
        return self._digest

    def shapes(self) -> dict[str, tuple[int, int]]:
        return {m: (int(s["out_features"]), int(s["in_features"])) for m, s in self.layout.items()}

    def __eq__(self, other: object) -> bool:
        return self is other

    __hash__ = object.__hash__

    def __repr__(self) -> str:
        return f"StoredExpert({self.name!r}, modules={len(self.layout)}, kind={self.kind!r})"
