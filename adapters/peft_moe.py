"""PEFT's ``target_parameters``: LoRA on the fused expert weights and routers of MoE models.

PEFT wraps each targeted parameter in a ``ParamWrapper``; several of one module nest in the order the module
registered them, the first innermost, so with ``gate_up_proj`` and ``down_proj`` both targeted the saved keys are
``…experts.base_layer.lora_*`` (gate_up_proj) and ``…experts.lora_*`` (down_proj). For a 3-D parameter
``(E, out, in)`` the factors are ``lora_A (r·E, in)``, expert-major, and ``lora_B (out, r·E)``, rank-major, so MoE
expert ``e``'s update is ``scale · B.reshape(out, r, E)[:, :, e] @ A.reshape(E, r, in)[e]``; a router's 2-D
``weight`` gets an ordinary LoRA pair. ``rank_pattern`` and ``alpha_pattern`` are matched on the parameter's name
(``model.layers.0.mlp.experts.gate_up_proj``). The layouts and the nesting are pinned by
``tests/adapters/test_moe_peft.py`` against PEFT's own ``get_delta_weight``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moerge.adapters.expert import LoRAWeights, ModuleWeights, StackedLoRAWeights
from moerge.core.targets import MoETarget, find_module, moe_targets, resolve_moe_target, unwrap
from moerge.errors import ExpertFormatError

__all__ = ["target_parameter_keys", "take_target_parameters", "stacked_from_peft", "stacked_to_peft", "parameter_keys"]


def stacked_from_peft(a: torch.Tensor, b: torch.Tensor, experts: int, scale: float) -> StackedLoRAWeights:
    """PEFT's ``lora_A (r·E, in)``, ``lora_B (out, r·E)`` of a 3-D parameter as :class:`StackedLoRAWeights`."""
    r = a.shape[0] // experts
    return StackedLoRAWeights(a.reshape(experts, r, a.shape[1]).contiguous(),
                              b.reshape(b.shape[0], r, experts).permute(2, 0, 1).contiguous(), scale)


def stacked_to_peft(w: StackedLoRAWeights) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of :func:`stacked_from_peft` (scale left out): ``(lora_A, lora_B)`` as PEFT saves them."""
    E, r, n_in = w.A.shape
    return w.A.reshape(E * r, n_in), w.B.permute(1, 2, 0).reshape(w.B.shape[1], r * E)


def _names(value: Any, name: str, file: Path) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise ExpertFormatError(f"target_parameters={value!r} must be a list of parameter names", expert=name,
                                file=str(file))
    return value


def target_parameter_keys(config: dict[str, Any], base: nn.Module, name: str,
                          file: Path) -> dict[str, tuple[str, str, MoETarget]]:
    """The parameters ``config["target_parameters"]`` selects in ``base``, matched as PEFT matches them (a
    parameter's full name equal to an entry or ending in ``"." + entry``): PEFT's key prefix of each →
    ``(expert target, parameter name, target)``. Refuses, naming it, a selected parameter moerge cannot adapt."""
    wanted = _names(config.get("target_parameters"), name, file)
    found: dict[str, tuple[str, str, MoETarget]] = {}

    def walk(module: nn.Module, prefix: str) -> None:
        module = unwrap(module)
        own = [p for p, _ in module.named_parameters(recurse=False)
               if any(f"{prefix}.{p}" == t or f"{prefix}.{p}".endswith("." + t) for t in wanted)]
        for i, p in enumerate(own):  # registration order: the first is innermost
            key = f"{prefix}.{p}"
            if p == "weight":
                target = resolve_moe_target(base, prefix)
                if isinstance(target, str) or target.kind != "router":
                    why = target if isinstance(target, str) else f"a {target.kind} target"
                    raise ExpertFormatError(f"target_parameters selects {key!r}, which moerge cannot adapt: {why}",
                                            expert=name, file=str(file))
                expert_target = prefix
            else:
                target = resolve_moe_target(base, key)
                if isinstance(target, str):
                    raise ExpertFormatError(f"target_parameters selects {key!r}, which moerge cannot adapt: {target}",
                                            expert=name, file=str(file))
                expert_target = key
            found[prefix + ".base_layer" * (len(own) - 1 - i)] = (expert_target, key, target)
        for cname, child in module._modules.items():
            if child is not None:
                walk(child, f"{prefix}.{cname}" if prefix else cname)

    walk(base, "")
    if not found:
        raise ExpertFormatError(f"target_parameters={wanted!r} selects no parameter of the base", expert=name,
                                file=str(file))
    return found


def take_target_parameters(config: dict[str, Any], factors: dict[str, dict[str, torch.Tensor]], base: nn.Module | None,
                           rank_of: Any, use_rslora: bool, name: str, cfg_file: Path,
                           weights_file: Path) -> dict[str, ModuleWeights]:
    """The weights of the parameters ``target_parameters`` selects, taken out of ``factors`` (PEFT key prefix →
    ``{"A", "B"}``). ``rank_of(parameter_name) -> (r, alpha)`` applies the config's patterns."""
    if base is None:
        raise ExpertFormatError("target_parameters (LoRA on an MoE model's fused expert weights or router) names "
                                "parameters that only the base can resolve: add the adapter to a model "
                                "(MoErgeModel.add_expert), or pass base= to ExpertLibrary.add_peft or load_peft_lora, "
                                "or --base to `moerge library add`", expert=name, file=str(cfg_file))
    out: dict[str, ModuleWeights] = {}
    for prefix, (target_name, key, target) in target_parameter_keys(config, base, name, cfg_file).items():
        ab = factors.pop(prefix, None)
        if ab is None or set(ab) != {"A", "B"}:
            raise ExpertFormatError(f"target_parameters selects {key!r}, but the weights hold no lora_A and lora_B for "
                                    f"it (expected under {prefix!r}: missing adapter keys)", expert=name,
                                    file=str(weights_file))
        r, alpha = rank_of(key)
        scale = alpha / math.sqrt(r) if use_rslora else alpha / r
        a, b = ab["A"], ab["B"]
        out_f, in_f = target.shape
        E = max(target.experts, 1)
        if a.dim() != 2 or b.dim() != 2 or tuple(a.shape) != (r * E, in_f) or tuple(b.shape) != (out_f, r * E):
            raise ExpertFormatError(
                f"parameter {key!r} (rank {r}, {E} experts, {in_f}→{out_f}): expected lora_A {(r * E, in_f)} and "
                f"lora_B {(out_f, r * E)}, got {tuple(a.shape)} and {tuple(b.shape)}", expert=name,
                file=str(weights_file))
        out[target_name] = stacked_from_peft(a, b, E, scale) if target.kind == "stacked" else LoRAWeights(a, b, scale)
    return out


def parameter_keys(base: nn.Module, targets: list[str]) -> dict[str, tuple[str, str]]:
    """Of ``targets`` (an expert's), the routers and fused parameters of ``base``: each → ``(PEFT key prefix,
    parameter name)`` as PEFT saves them when exactly these are targeted (nesting in registration order)."""
    moe = moe_targets(base)
    chosen = [t for t in targets if t in moe]
    out: dict[str, tuple[str, str]] = {}
    for t in chosen:
        target = moe[t]
        if target.kind == "router":
            out[t] = (t, f"{t}.weight")
            continue
        owner = find_module(base, target.owner)
        order = [p for p, _ in owner.named_parameters(recurse=False) if f"{target.owner}.{p}" in chosen]
        out[t] = (target.owner + ".base_layer" * (len(order) - 1 - order.index(target.param)), t)
    return out
