"""Load a PEFT LoRA adapter directory as an :class:`~moerge.adapters.expert.Expert`.

Reads ``adapter_config.json`` and ``adapter_model.safetensors`` only: pickle files (``.bin``, ``.pt``) are never
opened. Honours ``r``, ``lora_alpha``, ``rank_pattern``, ``alpha_pattern`` (matched the way PEFT matches them),
``use_rslora`` (scale ``alpha/√r``) and ``fan_in_fan_out`` (GPT-2 ``Conv1D`` bases; the factors keep PEFT's
``A (r×in)``, ``B (out×r)`` layout, so only merges need to know). PEFT's LoRA variants are handled by
:mod:`~moerge.adapters.peft_variants` (DoRA as its exact dense update against the base). The modules the target
settings select are checked against the base when the expert is admitted (:func:`check_targets`). Features that
change the forward in ways neither a LoRA update ``scale·B·A`` nor a dense update can express (trained biases,
``modules_to_save``, embedding LoRA, …) are refused with an error that names the file and the setting.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from moerge.adapters.expert import (
    DeltaWeights,
    Expert,
    ExpertMetadata,
    LoRAWeights,
    ModuleWeights,
    StackedLoRAWeights,
    validate_name,
)
from moerge.adapters.peft_moe import parameter_keys, stacked_to_peft, take_target_parameters
from moerge.adapters.peft_variants import (
    base_weight,
    dora_delta,
    expand_block_diagonal,
    requested_variants,
    training_only,
)
from moerge.core.fingerprint import oriented, unwrap_linear
from moerge.core.safe_io import load_safetensors
from moerge.errors import ExpertFormatError

__all__ = ["load_peft_lora", "adapter_folder", "save_peft_lora", "peft_pattern_key", "check_targets",
           "targeted_modules", "PICKLE_SUFFIXES"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_KEY_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<which>A|B)(?:\.[A-Za-z0-9_\-]+)?\.weight$")
_PREFIX = "base_model.model."
# initialisations that rewrite the base's weights (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA); converted saves say True
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def peft_pattern_key(pattern_keys: Iterable[str], module: str) -> str | None:
    """The ``rank_pattern``/``alpha_pattern`` key that applies to ``module``, as PEFT resolves it (first match of
    ``(.*\\.)?(key)$``), or ``None``."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def _refuse_unsupported(config: dict[str, Any], name: str, file: Path) -> None:
    checks = [
        ("bias", lambda v: v not in (None, "none"), "adapters that train biases (bias={v!r}) are not supported"),
        ("lora_bias", lambda v: bool(v), "adapters with a bias on lora_B (lora_bias=true) are not supported"),
        ("modules_to_save", lambda v: bool(v), "modules_to_save={v!r} holds full module copies, which a LoRA "
         "expert cannot express; add them as a delta expert instead"),
        ("layer_replication", lambda v: bool(v), "layer_replication={v!r} changes the base's layers"),
        ("trainable_token_indices", lambda v: bool(v), "trainable_token_indices={v!r} is not supported"),
    ]
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        checks.append(("init_lora_weights", lambda v: True, "init_lora_weights={v!r} changes the base weights when "
                       "the adapter is created, so this adapter only works on that modified base; convert it to a "
                       "plain LoRA first (PEFT: save_pretrained(..., path_initial_model_for_weight_conversion=...))"))
    for key, bad, msg in checks:
        v = config.get(key)
        if bad(v):
            raise ExpertFormatError(msg.format(v=v), expert=name, file=str(file))


def _known_config_fields() -> set[str]:
    """Every field of the installed PEFT's ``LoraConfig`` (and its base ``PeftConfig``)."""
    import dataclasses

    from peft import LoraConfig

    return {f.name for f in dataclasses.fields(LoraConfig)}


def _refuse_unknown_fields(config: dict[str, Any], name: str, file: Path) -> None:
    """A field the installed PEFT does not know may change what the adapter means (a newer PEFT feature), so one
    that is set (not null, false, 0 or empty) is refused; an unset one is ignored."""
    known = _known_config_fields()
    unknown = sorted(k for k, v in config.items() if k not in known and v not in (None, False, 0, "", [], {}))
    if unknown:
        import peft

        raise ExpertFormatError(
            f"{CONFIG_NAME} sets fields this PEFT ({peft.__version__}) does not know: {unknown[:5]}; they may change "
            "what the adapter computes, so it is refused (upgrade PEFT, or remove them if they are inert)",
            expert=name, file=str(file))


def _pattern(config: dict[str, Any], key: str, ok: Any, what: str, name: str, file: Path) -> dict[str, Any]:
    """``rank_pattern`` / ``alpha_pattern``: a mapping of module-name patterns to values, checked."""
    value = config.get(key) or {}
    if not isinstance(value, dict):
        raise ExpertFormatError(f"{key} must be a mapping of module patterns to values, got {value!r}", expert=name,
                                file=str(file))
    for k, v in value.items():
        if not ok(v):
            raise ExpertFormatError(f"{key}[{k!r}] = {v!r} must be {what}", expert=name, file=str(file))
        try:
            re.compile(k)
        except re.error as e:
            raise ExpertFormatError(f"{key} key {k!r} is not a valid pattern ({e})", expert=name,
                                    file=str(file)) from None
    return dict(value)


_TARGET_FIELDS = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern")


def _targets(config: dict[str, Any], name: str, file: Path) -> dict[str, Any]:
    """The settings that choose the adapted modules, checked for type (kept in the expert's source so its targets
    are checked against the base when the expert is admitted: :func:`check_targets`)."""
    out = {k: config.get(k) for k in _TARGET_FIELDS if config.get(k) not in (None, [], "")}

    def names(v: Any) -> bool:
        return isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v))

    for key in ("target_modules", "exclude_modules", "layers_pattern"):
        if key in out and not names(out[key]):
            raise ExpertFormatError(f"{key}={out[key]!r} must be a module name pattern or a list of names",
                                    expert=name, file=str(file))

    def index(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    layers = out.get("layers_to_transform")
    if layers is not None and not (index(layers) or (isinstance(layers, list) and all(map(index, layers)))):
        raise ExpertFormatError(f"layers_to_transform={layers!r} must be a layer index or a list of them",
                                expert=name, file=str(file))
    for key in ("target_modules", "exclude_modules"):
        if isinstance(out.get(key), str) and out[key] != "all-linear":
            try:
                re.compile(out[key])
            except re.error as e:
                raise ExpertFormatError(f"{key} {out[key]!r} is not a valid pattern ({e})", expert=name,
                                        file=str(file)) from None
    return out


def targeted_modules(targets: dict[str, Any], base_modules: Iterable[str]) -> list[str] | None:
    """The modules among ``base_modules`` (a base's linear modules) that an adapter with these settings
    (``target_modules``, ``exclude_modules``, ``layers_to_transform``, ``layers_pattern``) adapts, decided by PEFT's
    own matcher (``check_target_module_exists``): a listed name that matches no module of this architecture selects
    nothing, an excluded module is not adapted. ``None`` for ``target_modules="all-linear"``, which PEFT expands
    against the model (every linear module but the output layer) and saves as the list it expanded to."""
    from types import SimpleNamespace

    from peft.tuners.tuners_utils import check_target_module_exists

    target = targets.get("target_modules")
    if target is None or target == "all-linear":
        return None
    config = SimpleNamespace(target_modules=target, exclude_modules=targets.get("exclude_modules"),
                             layers_to_transform=targets.get("layers_to_transform"),
                             layers_pattern=targets.get("layers_pattern"), modules_to_save=None,
                             target_parameters=None)
    # PEFT returns an _ExcludedModule marker, which is falsy, for excluded modules
    return [m for m in base_modules if bool(check_target_module_exists(config, m))]


def check_targets(expert: Expert, base_modules: Iterable[str], base: str = "the base") -> None:
    """Refuse a PEFT expert whose settings select a linear module of the base (``base_modules``) that its weights do
    not hold: loaded, it would silently leave that part of the base unchanged (missing adapter keys). Names that
    match no module of this architecture, and excluded modules, are not required (PEFT adapts what matches)."""
    source = expert.metadata.source or {}
    targets = source.get("targets")
    if source.get("type") != "peft" or not targets:
        return
    expected = targeted_modules(targets, base_modules)
    missing = sorted(set(expected or ()) - set(expert.shapes()))
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        file = str(Path(source["path"]) / WEIGHTS_NAME) if source.get("path") else None
        raise ExpertFormatError(f"target_modules selects {missing[:3]}{more} in {base}, but the weights hold no "
                                "LoRA factors for them (missing adapter keys)", expert=expert.name, file=file)


_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def adapter_folder(path: str | Path, name: str, *, revision: str | None = None,
                   subfolder: str | None = None) -> tuple[Path, dict[str, Any] | None]:
    """The local folder of adapter ``path`` and, for a hub repository, ``{"repo_id", "revision", "commit"}``.

    A path that is a folder here is used as it is (``revision`` must then be unset). Otherwise an ``org/name`` id is
    fetched with ``huggingface_hub.snapshot_download`` — only ``adapter_config.json`` and
    ``adapter_model.safetensors``, never pickles — into the hub's cache, which it reuses, and honours its settings
    (``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``, tokens); ``revision`` pins a branch, tag or commit, and the commit it
    resolved to is recorded."""
    local = Path(path).expanduser()
    if local.is_dir():
        if revision is not None:
            raise ExpertFormatError(f"revision={revision!r} is for hub repositories, but {path} is a local folder",
                                    expert=name, file=str(local))
        return (local / subfolder if subfolder else local), None
    spec = str(path)
    if not _REPO_ID.match(spec) or spec.startswith((".", "/", "~")):
        raise ExpertFormatError("not a PEFT adapter folder (no such directory) nor a hub repository id (org/name)",
                                expert=name, file=str(local))
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RevisionNotFoundError

    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    where = f"{spec}@{revision or 'main'}" + (f" ({subfolder})" if subfolder else "")
    try:
        snap = Path(snapshot_download(spec, revision=revision,
                                      allow_patterns=[prefix + CONFIG_NAME, prefix + WEIGHTS_NAME]))
    except RevisionNotFoundError:
        raise ExpertFormatError(f"hub repository {spec!r} has no revision {revision!r}", expert=name,
                                file=where) from None
    except LocalEntryNotFoundError:
        mode = "offline (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else "the hub cannot be reached"
        raise ExpertFormatError(f"no folder {spec} here, and hub repository {where} is not in the hub cache "
                                f"({constants.HF_HUB_CACHE}) while {mode}", expert=name, file=where) from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise ExpertFormatError(f"cannot fetch hub repository {where}: {e}", expert=name, file=where) from None
    return snap / prefix if prefix else snap, {"repo_id": spec, "revision": revision, "commit": snap.name,
                                               "subfolder": subfolder}


def load_peft_lora(
    path: str | Path,
    name: str,
    *,
    description: str = "",
    examples: Iterable[str] = (),
    dtype: torch.dtype | None = None,
    max_rank: int | None = None,
    base: torch.nn.Module | None = None,
    base_copies: str = "delta",
    revision: str | None = None,
    subfolder: str | None = None,
) -> Expert:
    """Read the PEFT LoRA adapter in folder ``path`` (or Hugging Face Hub repository ``path``, see
    :func:`adapter_folder`) as an expert called ``name``.

    Args:
        path: a folder with ``adapter_config.json`` and ``adapter_model.safetensors``.
        name: the expert's name.
        description, examples: stored in the expert's metadata (used by global routers).
        dtype: cast the factors to this dtype (default: keep the stored dtype).
        max_rank: refuse modules whose rank exceeds this.
        base: the base model the adapter is for (it may be patched by moerge). Needed for DoRA adapters (made
            exact as dense updates against its weights) and to check copies of base weights the adapter holds
            (``*.base_layer.weight``, as PEFT saves them with ``save_embedding_layers``).
        base_copies: a copy of a base weight that differs from ``base``'s: ``"delta"`` applies the difference as a
            dense update of that module, with a warning; ``"refuse"`` raises. Equal copies are ignored.
        revision, subfolder: for a hub repository, the branch, tag or commit, and the folder in it.

    Raises:
        ExpertFormatError: naming the file and the problem (missing or pickle-only weights, unsupported PEFT
            features, ranks that disagree with the config, NaN/Inf, …).
    """
    validate_name(name)
    folder, hub = adapter_folder(path, name, revision=revision, subfolder=subfolder)
    cfg_file = folder / CONFIG_NAME
    if not cfg_file.is_file():
        raise ExpertFormatError(f"missing {CONFIG_NAME}", expert=name, file=str(cfg_file))
    try:
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExpertFormatError(f"cannot parse {CONFIG_NAME}: {e}", expert=name, file=str(cfg_file)) from None
    if not isinstance(config, dict):
        raise ExpertFormatError(f"{CONFIG_NAME} is not a JSON object", expert=name, file=str(cfg_file))
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise ExpertFormatError(f"peft_type is {peft_type!r}; only LORA adapters are supported", expert=name,
                                file=str(cfg_file))
    _refuse_unsupported(config, name, cfg_file)
    variants = requested_variants(config, name, cfg_file)
    if base_copies not in ("delta", "refuse"):
        raise ValueError(f"base_copies must be 'delta' or 'refuse', got {base_copies!r}")
    for key in ("r", "lora_alpha"):
        if key not in config:
            raise ExpertFormatError(f"{CONFIG_NAME} has no {key!r} field", expert=name, file=str(cfg_file))
    r_default, alpha_default = config["r"], config["lora_alpha"]
    if not isinstance(r_default, int) or isinstance(r_default, bool) or r_default <= 0:
        raise ExpertFormatError(f"r={r_default!r} must be a positive integer", expert=name, file=str(cfg_file))
    if (not isinstance(alpha_default, (int, float)) or isinstance(alpha_default, bool)
            or not math.isfinite(alpha_default)):
        raise ExpertFormatError(f"lora_alpha={alpha_default!r} must be a finite number", expert=name,
                                file=str(cfg_file))
    _refuse_unknown_fields(config, name, cfg_file)
    rank_pattern = _pattern(config, "rank_pattern", lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
                            "a positive integer", name, cfg_file)
    alpha_pattern = _pattern(config, "alpha_pattern", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
                             and math.isfinite(v), "a finite number", name, cfg_file)
    use_rslora = bool(config.get("use_rslora", False))
    targets = _targets(config, name, cfg_file)

    weights_file = folder / WEIGHTS_NAME
    if not weights_file.is_file():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ExpertFormatError(
                f"only pickle weights found ({', '.join(pickles)}); moerge never loads pickle files because they can "
                f"run code. Convert the adapter to {WEIGHTS_NAME} (e.g. with PEFT's save_pretrained("
                "safe_serialization=True)) from a trusted environment",
                expert=name, file=str(folder / pickles[0]),
            )
        raise ExpertFormatError(f"missing {WEIGHTS_NAME}", expert=name, file=str(weights_file))
    tensors = load_safetensors(weights_file, expert=name)

    factors: dict[str, dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    copies: dict[str, torch.Tensor] = {}  # module -> PEFT's copy of the base's weight (save_embedding_layers)
    magnitudes: dict[str, torch.Tensor] = {}  # module -> DoRA's magnitude vector
    for key, t in tensors.items():
        k = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        if k.endswith(".base_layer.weight"):
            copies[k[: -len(".base_layer.weight")]] = t
            continue
        if training_only(k, variants):
            continue
        dora = re.match(r"^(?P<module>.+)\.lora_magnitude_vector(?:\.[A-Za-z0-9_\-]+)?(?:\.weight)?$", k)
        if dora is not None and "use_dora" in variants:
            magnitudes[dora["module"]] = t
            continue
        m = _KEY_RE.match(k)
        if m is None:
            unknown.append(key)
            continue
        slot = factors.setdefault(m["module"], {})
        if m["which"] in slot:
            raise ExpertFormatError(f"two tensors hold lora_{m['which']} of module {m['module']!r} (the second is "
                                    f"{key!r})", expert=name, file=str(weights_file))
        slot[m["which"]] = t
    if unknown:
        hint = " (embedding LoRA is not supported)" if any("lora_embedding" in k for k in unknown) else ""
        raise ExpertFormatError(f"tensors that are not LoRA A/B factors{hint}: {sorted(unknown)[:5]}", expert=name,
                                file=str(weights_file))
    if not factors:
        raise ExpertFormatError("the adapter holds no LoRA weights", expert=name, file=str(weights_file))

    def rank_of(key: str) -> tuple[int, float]:
        rk, ak = peft_pattern_key(rank_pattern, key), peft_pattern_key(alpha_pattern, key)
        return (int(rank_pattern[rk]) if rk is not None else int(r_default),
                float(alpha_pattern[ak]) if ak is not None else float(alpha_default))

    def checked(module: str, w: LoRAWeights | StackedLoRAWeights) -> LoRAWeights | StackedLoRAWeights:
        """``w`` within ``max_rank``, valid as stored (an integer tensor is refused, not cast) and, cast to
        ``dtype``, valid as cast (a narrower dtype may overflow)."""
        if max_rank is not None and w.rank > max_rank:
            raise ExpertFormatError(f"module {module!r}: rank {w.rank} exceeds the cap of {max_rank}", expert=name,
                                    file=str(weights_file))
        try:
            w.validate(name, module)
            if dtype is not None:
                w = type(w)(w.A.to(dtype), w.B.to(dtype), w.scale)
                w.validate(name, module)
        except ExpertFormatError as e:
            raise e.at(str(weights_file)) from None
        return w

    modules: dict[str, ModuleWeights] = {}
    moe: dict[str, ModuleWeights] = {}
    if config.get("target_parameters"):
        if variants:
            raise ExpertFormatError(f"target_parameters with {sorted(variants)[0]} is not a PEFT adapter (PEFT refuses "
                                    "LoRA variants on parameters)", expert=name, file=str(cfg_file))
        moe = take_target_parameters(config, factors, base, rank_of, use_rslora, name, cfg_file, weights_file)
    for module, ab in sorted(factors.items()):
        if set(ab) != {"A", "B"}:
            missing = "lora_B" if "A" in ab else "lora_A"
            raise ExpertFormatError(f"module {module!r} has no {missing} weight", expert=name, file=str(weights_file))
        a, b = ab["A"], ab["B"]
        if "use_bdlora" in variants:
            a, b = expand_block_diagonal(module, a, b, config.get("use_bdlora"), name, cfg_file)
        r, alpha = rank_of(module)
        if r <= 0:
            raise ExpertFormatError(f"module {module!r}: rank {r} must be positive", expert=name, file=str(cfg_file))
        if a.dim() != 2 or a.shape[0] != r:
            raise ExpertFormatError(
                f"module {module!r}: config gives rank {r} but lora_A has shape {tuple(a.shape)}", expert=name,
                file=str(weights_file),
            )
        modules[module] = checked(module, LoRAWeights(a, b, alpha / math.sqrt(r) if use_rslora else alpha / r))
    for module, w in moe.items():  # target_parameters
        modules[module] = checked(module, w)
    if magnitudes or "use_dora" in variants:
        modules = _dora_updates(modules, magnitudes, base, name, weights_file)
    checked = _base_copies(modules, copies, base, base_copies, name, weights_file)

    source = {
        "type": "peft",
        "path": str(folder.resolve()),
        "base_model_name_or_path": config.get("base_model_name_or_path"),
        "r": r_default,
        "lora_alpha": alpha_default,
        "use_rslora": use_rslora,
        "fan_in_fan_out": bool(config.get("fan_in_fan_out", False)),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "peft_version": config.get("peft_version"),
        "ignored_base_weight_copies": sorted(m for m, v in checked.items() if v == "ignored"),
        "base_weight_copies": checked,
        "variants": variants,
        **({"target_parameters": config["target_parameters"]} if moe else {}),
        **({"hub": hub} if hub else {}),
        "targets": targets,
    }
    meta = ExpertMetadata(
        description=description,
        examples=[str(e) for e in examples],
        base_model=config.get("base_model_name_or_path"),
        source=source,
    )
    return Expert(name=name, modules=modules, metadata=meta)


def _dora_updates(modules: dict[str, ModuleWeights], magnitudes: dict[str, torch.Tensor],
                  base: torch.nn.Module | None, name: str, file: Path) -> dict[str, ModuleWeights]:
    """DoRA's modules as their exact dense updates against ``base`` (:func:`dora_delta`)."""
    if base is None:
        raise ExpertFormatError("a DoRA adapter (use_dora=true) is exact only against the base's weights: add it to a "
                                "model (MoErgeModel.add_expert), pass base= to ExpertLibrary.add_peft or "
                                "load_peft_lora, or --base to `moerge library add`", expert=name, file=str(file))
    without = sorted(set(modules) - set(magnitudes))
    if without:
        raise ExpertFormatError(f"use_dora=true but module {without[0]!r} has no lora_magnitude_vector", expert=name,
                                file=str(file))
    out = dict(modules)
    for m, mag in magnitudes.items():
        w = modules.get(m)
        if not isinstance(w, LoRAWeights):
            raise ExpertFormatError(f"module {m!r} has a DoRA magnitude but no LoRA factors", expert=name,
                                    file=str(file))
        weight = base_weight(base, m)
        if weight is None or tuple(weight.shape) != w.shape or tuple(mag.shape) != (w.shape[0],):
            raise ExpertFormatError(f"DoRA module {m!r} (magnitude {tuple(mag.shape)}, update {w.shape}) does not fit "
                                    "the base's linear module of that name", expert=name, file=str(file))
        delta = DeltaWeights(dora_delta(weight, w.A, w.B, w.scale, mag).to(w.A.dtype))
        try:
            delta.validate(name, m)
        except ExpertFormatError as e:
            raise e.at(str(file)) from None
        out[m] = delta
    return out


def _base_copies(modules: dict[str, ModuleWeights], copies: dict[str, torch.Tensor], base: torch.nn.Module | None,
                 policy: str, name: str, file: Path) -> dict[str, str]:
    """Check the adapter's copies of base weights against ``base``: ``module → "ignored"`` (equal),
    ``"applied"`` (differs; folded into ``modules`` as a dense update, with a warning) or ``"unchecked"`` (no base
    given; a warning). A differing copy is refused with ``policy="refuse"``, or when it cannot be a linear update."""
    out: dict[str, str] = {}
    for m, copy in sorted(copies.items()):
        if base is None:
            warnings.warn(f"expert {name!r}: {file} holds a copy of the base's weight of {m!r}, not checked against "
                          "the base (none given); the base's own weight is used", stacklevel=3)
            out[m] = "unchecked"
            continue
        try:
            mod = base.get_submodule(m)
        except AttributeError:
            raise ExpertFormatError(f"holds a copy of the weight of {m!r}, which the base does not have", expert=name,
                                    file=str(file)) from None
        lin = unwrap_linear(m, mod)  # a patched module's original; None when not linear-like
        own = getattr(mod if lin is None else lin, "weight", None)
        if not copy.is_floating_point() or own is None or not own.is_floating_point():
            raise ExpertFormatError(f"holds a copy of the weight of {m!r} as {copy.dtype}, which cannot be compared "
                                    "with the base's", expert=name, file=str(file))
        if tuple(own.shape) != tuple(copy.shape):
            raise ExpertFormatError(f"holds a copy of the weight of {m!r} with shape {tuple(copy.shape)}, the base's "
                                    f"is {tuple(own.shape)} (a resized vocabulary?)", expert=name, file=str(file))
        narrow = copy.dtype if torch.finfo(copy.dtype).bits <= torch.finfo(own.dtype).bits else own.dtype
        if torch.equal(copy.to(narrow), own.detach().to(narrow)):
            out[m] = "ignored"
            continue
        change = copy.float() - own.detach().float()
        diff = float(change.abs().max())
        if policy == "refuse" or lin is None:
            why = "" if lin is not None else " (not a linear module, so it cannot be applied as an update)"
            raise ExpertFormatError(f"holds a copy of the base's weight of {m!r} that differs from the base's by up to "
                                    f"{diff:.3g}{why}", expert=name, file=str(file))
        update = oriented(lin, change)  # (out, in)
        w = modules.get(m)
        if w is not None:
            update = update + w.delta_weight(torch.float32)
        modules[m] = DeltaWeights(update.to(copy.dtype))
        warnings.warn(f"expert {name!r}: the copy of the base's weight of {m!r} in {file} differs from the base's "
                      f"(by up to {diff:.3g}); the difference is applied as a dense update of that module",
                      stacklevel=3)
        out[m] = "applied"
    return out


def save_peft_lora(expert: Expert, folder: str | Path, *, base_model_name_or_path: str | None = None,
                   fan_in_fan_out: bool = False, base: torch.nn.Module | None = None) -> Path:
    """Write a LoRA ``expert`` as a PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``)
    that ``PeftModel.from_pretrained`` loads.

    Each module's scale is folded into its ``B`` factor and every module gets ``lora_alpha = r`` (PEFT scaling 1),
    with ``rank_pattern``/``alpha_pattern`` entries for modules whose rank is not the most common one. Dense modules
    cannot be a LoRA adapter: merge them into the base instead (:meth:`moerge.MoErgeModel.merge`). Set
    ``fan_in_fan_out`` for GPT-2 ``Conv1D`` bases. An expert of an MoE model's routers or fused expert weights is
    written with PEFT's ``target_parameters`` (its layouts and nesting, see :mod:`~moerge.adapters.peft_moe`), which
    needs ``base`` to tell routers from linear modules. Written atomically (temp files + rename).
    """
    from collections import Counter

    from moerge.core.safe_io import atomic_write_json, save_safetensors

    dense = sorted(m for m, w in expert.modules.items() if isinstance(w, DeltaWeights))
    if dense:
        raise ExpertFormatError(f"modules {dense[:3]} hold dense updates, which a PEFT LoRA adapter cannot: merge the "
                                "expert into the base, or compress it to low rank first (method 'svd')",
                                expert=expert.name)
    if expert.stacked_targets() and base is None:
        raise ExpertFormatError("writing fused MoE expert parameters as a PEFT adapter needs the base (base=), to "
                                "tell its routers from its linear modules", expert=expert.name)
    mods: dict[str, LoRAWeights | StackedLoRAWeights] = dict(sorted(expert.modules.items()))  # type: ignore[arg-type]
    params = parameter_keys(base, list(mods)) if base is not None else {}  # target -> (PEFT key prefix, parameter)
    r = Counter(w.rank for w in mods.values()).most_common(1)[0][0]
    tensors: dict[str, torch.Tensor] = {}
    for m, w in mods.items():
        a, b = stacked_to_peft(w) if isinstance(w, StackedLoRAWeights) else (w.A, w.B)
        prefix = params[m][0] if m in params else m
        tensors[f"{_PREFIX}{prefix}.lora_A.weight"] = a.detach().contiguous().cpu()
        tensors[f"{_PREFIX}{prefix}.lora_B.weight"] = (b.float() * w.scale).to(b.dtype).contiguous().cpu()
    other = {params[m][1] if m in params else m: w.rank for m, w in mods.items() if w.rank != r}
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path
        or expert.metadata.base_model, "r": r, "lora_alpha": r, "target_modules": [m for m in mods if m not in params],
        "rank_pattern": other, "alpha_pattern": dict(other), "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": fan_in_fan_out, "use_rslora": False, "use_dora": False, "modules_to_save": None,
        "init_lora_weights": True, "inference_mode": True,
        **({"target_parameters": [params[m][1] for m in mods if m in params]} if params else {}),
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors(folder / WEIGHTS_NAME, tensors, metadata={"format": "pt"})
    atomic_write_json(folder / CONFIG_NAME, config)
    return folder
