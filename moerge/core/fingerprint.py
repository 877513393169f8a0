"""Fingerprints of base models: catch an expert or a library used with a different base.

A fingerprint records the architecture (class, ``model_type``, vocabulary, hidden size, layers), the shape of
every linear module an expert can target, and a small sample of weights. Two bases *match* when all of it
agrees; they are *compatible* (same architecture, another version of the weights, as when transferring a
fine-tune's diff vector to an updated base) when everything but the weight sample agrees.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from moerge.core.targets import moe_targets, unwrap

__all__ = ["linear_modules", "fingerprint", "compact_fingerprint", "compare_fingerprints", "is_linear_like",
           "check_expert_shapes", "unwrap_linear", "base_parameters", "oriented"]

_SAMPLE = 16  # values taken from each sampled tensor


def is_linear_like(module: nn.Module) -> bool:
    """``nn.Linear`` or transformers' GPT-2 style ``Conv1D`` (weight stored ``(in, out)``)."""
    if isinstance(module, nn.Linear):
        return True
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of a linear-like module."""
    if isinstance(module, nn.Linear):
        return int(module.out_features), int(module.in_features)
    w = module.weight  # Conv1D: (in, out)
    return int(w.shape[1]), int(w.shape[0])


def oriented(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """A tensor of a linear-like module's weight shape between its stored layout and the ``(out, in)`` convention:
    as it is for ``nn.Linear`` (and a router's ``(E, H)``), transposed for a ``Conv1D`` (which stores ``(in, out)``);
    its own inverse."""
    return weight.t() if type(module).__name__ == "Conv1D" else weight


def unwrap_linear(name: str, module: nn.Module) -> nn.Module | None:
    """The linear-like module at ``name`` as the base has it: a patched module's original (a wrapper class sets
    ``wraps_linear = True`` and keeps the original as ``base_layer``), the module itself if it is linear-like, or
    ``None`` (not linear, or the ``base_layer`` inside a wrapper, which is found through its wrapper)."""
    if getattr(type(module), "wraps_linear", False):
        return module.base_layer
    if is_linear_like(module) and not name.endswith(".base_layer"):
        return module
    return None


def linear_modules(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Every linear-like module of ``model`` (patched ones included, by their original name) → ``(out, in)``."""
    out: dict[str, tuple[int, int]] = {}
    for name, mod in model.named_modules():
        lin = unwrap_linear(name, mod)
        if lin is not None:
            out[name] = linear_shape(lin)
    return out


def base_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s parameters named as in the plain base, in ``named_parameters()`` order: a patched module's
    original (its ``base_layer``, see :func:`~moerge.core.targets.unwrap`) stands at the patched module's name, and
    the wrapper's own parameters, if any, are left out. A parameter shared by several modules appears once, under its first name.
    """
    out: dict[str, torch.Tensor] = {}
    seen_params: set[int] = set()
    seen_modules: set[int] = set()

    def walk(module: nn.Module, prefix: str) -> None:
        module = unwrap(module)  # a patched module's original, under the wrapper's name
        if id(module) in seen_modules:
            return
        seen_modules.add(id(module))
        for pname, p in module.named_parameters(recurse=False):
            if id(p) not in seen_params:
                seen_params.add(id(p))
                out[prefix + pname] = p
        for cname, child in module.named_children():
            walk(child, f"{prefix}{cname}.")

    walk(model, "")
    return out


def _config_value(config: Any, *names: str) -> Any:
    for n in names:
        v = getattr(config, n, None)
        if v is not None:
            return v
    return None


def fingerprint(model: nn.Module) -> dict[str, Any]:
    """A JSON-able fingerprint of ``model`` (see module docstring)."""
    config = getattr(model, "config", None)
    shapes = linear_modules(model)
    shapes_digest = hashlib.sha256(json.dumps(sorted(shapes.items())).encode()).hexdigest()[:16]
    named = sorted(((n, p) for n, p in base_parameters(model).items() if p.numel() >= _SAMPLE), key=lambda t: t[0])
    picks = [named[0], named[len(named) // 2], named[-1]] if named else []
    sample: dict[str, list[float]] = {}
    for n, p in picks:
        flat = p.detach().reshape(-1)
        mid = flat.numel() // 2
        vals = torch.cat([flat[:_SAMPLE], flat[mid : mid + _SAMPLE]]).float().cpu()
        sample[n] = [round(float(v), 6) for v in vals]
    weights_digest = hashlib.sha256(json.dumps(sample, sort_keys=True).encode()).hexdigest()[:16]
    moe = {n: [*t.shape, t.experts] for n, t in moe_targets(model).items()}
    return {
        "moe_targets": moe,  # routers and fused expert weights: (out, in, MoE experts); {} for a dense model
        "architecture": type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "vocab_size": _config_value(config, "vocab_size"),
        "hidden_size": _config_value(config, "hidden_size", "n_embd", "d_model"),
        "num_layers": _config_value(config, "num_hidden_layers", "n_layer"),
        "modules": {k: list(v) for k, v in sorted(shapes.items())},
        "shapes_digest": shapes_digest,
        "weights_digest": weights_digest,
        "weights_sample": sample,
    }


def compact_fingerprint(fp: dict[str, Any]) -> dict[str, Any]:
    """``fp`` without the per-module shape table (kept once, in the library's manifest); the shapes digest stays."""
    return {k: v for k, v in fp.items() if k != "modules"}


def compare_fingerprints(expected: dict[str, Any], actual: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Differences between two fingerprints: ``(architecture_problems, weight_problems)``.

    Architecture problems (class, vocabulary, shapes) make a base unusable; weight problems mean another
    version of the same architecture. Weights are compared with a tolerance, so the same base loaded in another
    float precision still matches.
    """
    arch: list[str] = []
    for key in ("architecture", "model_type", "vocab_size", "hidden_size", "num_layers"):
        if expected.get(key) is not None and actual.get(key) is not None and expected[key] != actual[key]:
            arch.append(f"{key} is {actual[key]!r}, expected {expected[key]!r}")
    exp_mods, act_mods = expected.get("modules") or {}, actual.get("modules") or {}
    if not (exp_mods and act_mods) and expected.get("shapes_digest") and actual.get("shapes_digest"):
        if expected["shapes_digest"] != actual["shapes_digest"]:
            arch.append("the linear modules' names or shapes differ")
    exp_moe, act_moe = expected.get("moe_targets"), actual.get("moe_targets")
    if exp_moe is not None and act_moe is not None and exp_moe != act_moe:
        arch.append("the MoE routers or fused expert weights differ")
    if exp_mods and act_mods and exp_mods != act_mods:
        missing = sorted(set(exp_mods) - set(act_mods))
        differ = sorted(m for m in set(exp_mods) & set(act_mods) if list(exp_mods[m]) != list(act_mods[m]))
        if missing:
            arch.append(f"modules missing: {missing[:3]}{' …' if len(missing) > 3 else ''}")
        for m in differ[:3]:
            arch.append(f"module {m!r} has shape {act_mods[m]}, expected {exp_mods[m]}")
    weights: list[str] = []
    es, as_ = expected.get("weights_sample") or {}, actual.get("weights_sample") or {}
    if es and as_:
        if set(es) != set(as_):
            weights.append("sampled parameters differ")
        else:
            worst = 0.0
            for k in es:
                a, b = torch.tensor(es[k]), torch.tensor(as_[k])
                if a.shape != b.shape:
                    worst = float("inf")
                    break
                worst = max(worst, float(((a - b).abs() / (1e-3 + 1e-2 * b.abs())).max()))
            if worst > 1.0:
                weights.append(
                    f"weights differ (digest {actual.get('weights_digest')} vs {expected.get('weights_digest')})"
                )
    return arch, weights


def check_expert_shapes(expert: Any, shapes: Mapping[str, Sequence[int]], base: str = "the base", *,
                        moe_known: bool = True) -> None:
    """Raise :class:`~moerge.errors.BaseMismatchError` unless every module ``expert`` changes is in ``shapes``
    (module → ``(out, in)``, as :func:`linear_modules` gives; routers and fused expert weights → ``(out, in, E)``,
    a fingerprint's ``moe_targets``) with the expert's sizes; ``base`` names the base in the message. With
    ``moe_known=False`` (a fingerprint recorded without ``moe_targets``) targets that are not linear modules are left
    to the model's own check."""
    from moerge.errors import BaseMismatchError

    for m, w in expert.modules.items():
        if m not in shapes and not moe_known:
            continue
        if m not in shapes:
            raise BaseMismatchError(f"targets module {m!r}, which {base} does not have (or which is not a linear "
                                    "module)", expert=expert.name)
        out_f, in_f, *experts = shapes[m]
        if getattr(w, "experts", 0) != (experts[0] if experts else 0):
            raise BaseMismatchError(f"{m!r}: the expert has factors for {getattr(w, 'experts', 0)} MoE experts, "
                                    f"{base} has {experts[0] if experts else 0} there", expert=expert.name)
        if (w.out_features, w.in_features) != (out_f, in_f):
            raise BaseMismatchError(f"module {m!r}: the expert maps {w.in_features}→{w.out_features} but the base's "
                                    f"module maps {in_f}→{out_f}", expert=expert.name)
