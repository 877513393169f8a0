"""PEFT's LoRA variants and what each becomes in moerge: the same inference forward as plain LoRA (accepted as
such), a plain LoRA after an exact rewrite (block-diagonal factors expanded), a dense update computed against the
base (DoRA; a differing copy of a base weight), or refused with the setting named.

PEFT declares its variants on ``LoraConfig`` (fields whose metadata says ``is_lora_variant``, and the variants of
``init_lora_weights``); :data:`VARIANTS` says what moerge does with each, and a variant it does not list is refused
by name, so a newer PEFT cannot slip a forward moerge does not compute past the loader.

* **VeLoRA** (``velora_config``) and **MonteCLoRA** (``monteclora_config``) change training only: VeLoRA compresses
  the activations kept for the backward pass (``lora_velora_embed``), MonteCLoRA samples perturbations of ``A``
  while ``module.training`` (``lora_monteclora_sampler.*``). At inference both compute ``scale·B·A·x``; their extra
  tensors are not needed and are not kept.
* **BD-LoRA** (``use_bdlora``): ``A`` or ``B`` is block-diagonal and stored as its blocks stacked; the blocks are laid
  on the diagonal (PEFT's ``weight_as_blockdiagonal_matrix``), giving the same update as a plain LoRA.
* **MiCA** (``init_lora_weights="mica"``): an initialisation (``B`` frozen during training); plain LoRA at inference.
* **DoRA** (``use_dora``): ``W' = m ⊙ (W + s·B·A) / ‖W + s·B·A‖`` (row norms; Liu et al. 2024) needs the
  base's ``W``; one DoRA adapter is exactly the dense update ``W' − W`` (:func:`dora_delta`), the same as
  ``PeftModel.merge_and_unload()`` minus the base. In a mix, each DoRA expert contributes its own update
  ``W'_e − W`` with its weight, like any dense expert: the magnitudes are not renormalised jointly.
* **KaSA** (``kasa_config``) is refused: it truncates the base weight's smallest singular components when the
  adapter is created, and PEFT itself cannot express it as a LoRA on the unmodified base.
* **Arrow** (``arrow_config``) is PEFT's router among several task adapters loaded together; moerge's ``arrow``
  router does that, so each task adapter is added as an expert instead.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from moerge.errors import ExpertFormatError

__all__ = ["VARIANTS", "requested_variants", "training_only", "expand_block_diagonal", "dora_delta",
           "base_weight"]

# variant → what moerge does: "lora" (same inference forward), "block_diagonal", "dense" (needs the base), or a
# refusal's reason
VARIANTS: dict[str, str] = {
    "velora_config": "lora",
    "monteclora_config": "lora",
    "mica": "lora",
    "use_bdlora": "block_diagonal",
    "use_dora": "dense",
    "kasa_config": "KaSA (kasa_config) truncates the base weight's smallest singular components when the adapter is "
                   "created, so it only works on that modified base (PEFT itself cannot convert it to a plain LoRA)",
    "arrow_config": "arrow_config is PEFT's Arrow router among several task adapters loaded together; add each "
                    "task adapter as an expert and use moerge's 'arrow' router instead",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) applies the adapter only after its "
                               "invocation tokens, which a per-request expert cannot express",
}
# tensor-name parts that only training uses, by the variant that saves them
_TRAINING_ONLY = {"velora_config": (".lora_velora_embed",), "monteclora_config": (".lora_monteclora_sampler.",)}


def requested_variants(config: dict[str, Any], name: str, file: Path) -> list[str]:
    """The LoRA variants ``config`` asks for, as PEFT declares them; a refused or unknown one raises naming it."""
    from peft import LoraConfig

    fields = {f.name: f for f in dataclasses.fields(LoraConfig)}
    asked = [k for k, f in fields.items() if f.metadata.get("is_lora_variant") and config.get(k)]
    # and the variants named here, whether or not this PEFT declares them so (an older one does not tag DoRA)
    asked += [k for k in VARIANTS if k not in asked and config.get(k)]
    init = config.get("init_lora_weights")
    init_variants = fields["init_lora_weights"].metadata.get("lora_variants", []) if "init_lora_weights" in fields \
        else []
    asked += [v for v in init_variants if isinstance(init, str) and init.lower() == v]
    for v in asked:
        action = VARIANTS.get(v)
        if action is None:
            raise ExpertFormatError(f"{v}={config.get(v, init)!r} asks for a LoRA variant this version of moerge does "
                                    "not know; its forward may differ from LoRA's, so the adapter is refused",
                                    expert=name, file=str(file))
        if action not in ("lora", "block_diagonal", "dense"):
            raise ExpertFormatError(action, expert=name, file=str(file))
    if len(asked) > 1:
        raise ExpertFormatError(f"combines the LoRA variants {asked}, which moerge does not support together",
                                expert=name, file=str(file))
    return asked


def training_only(key: str, variants: list[str]) -> bool:
    """Whether tensor ``key`` is one that only the training of ``variants`` uses."""
    return any(part in key for v in variants for part in _TRAINING_ONLY.get(v, ()))


def expand_block_diagonal(module: str, a: torch.Tensor, b: torch.Tensor, spec: Any, name: str,
                          file: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """BD-LoRA's ``(A, B)`` of ``module`` with the block-diagonal one laid out whole (``spec``: the config's
    ``use_bdlora``, matched as PEFT matches it: a pattern contained in the module's name)."""
    if not isinstance(spec, dict):
        raise ExpertFormatError(f"use_bdlora={spec!r} must be an object with nblocks and target_modules_bd_a/b",
                                expert=name, file=str(file))
    nb = spec.get("nblocks")
    if not isinstance(nb, int) or isinstance(nb, bool) or nb <= 0:
        raise ExpertFormatError(f"use_bdlora.nblocks={nb!r} must be a positive integer", expert=name, file=str(file))
    on_a = any(isinstance(p, str) and p in module for p in spec.get("target_modules_bd_a") or [])
    on_b = any(isinstance(p, str) and p in module for p in spec.get("target_modules_bd_b") or [])
    if on_a and on_b:
        raise ExpertFormatError(f"use_bdlora: module {module!r} matches both the A and the B block-diagonal "
                                "patterns", expert=name, file=str(file))
    which = "A" if on_a else "B" if on_b else None
    if which is None:
        return a, b
    t = a if which == "A" else b
    if t.dim() != 2 or t.shape[0] % nb:
        raise ExpertFormatError(f"use_bdlora: module {module!r}: lora_{which} of shape {tuple(t.shape)} does not split "
                                f"into {nb} blocks", expert=name, file=str(file))
    full = torch.block_diag(*torch.chunk(t, nb, dim=0))
    return (full, b) if which == "A" else (a, full)


def base_weight(base: torch.nn.Module, module: str) -> torch.Tensor | None:
    """The base's weight of linear module ``module`` as ``(out, in)`` (a GPT-2 ``Conv1D``'s transposed; a module
    patched by moerge read through its original), or ``None`` when the base has no such linear module."""
    from moerge.core.fingerprint import oriented, unwrap_linear

    try:
        mod = base.get_submodule(module)
    except AttributeError:
        return None
    lin = unwrap_linear(module, mod)
    return None if lin is None else oriented(lin, lin.weight.detach())


def dora_delta(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float,
               magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA's dense update ``W' − W`` of one module, in float32: ``W' = m ⊙ (W + s·B·A) / ‖W + s·B·A‖`` with the
    norm of each output row (``weight``: ``W (out, in)``; ``magnitude``: ``m (out,)``), as PEFT's DoRA forward computes
    ``(m/‖·‖ − 1) ⊙ W·x + (m/‖·‖) ⊙ s·B·A·x``."""
    w = weight.float()
    lora = scale * (b.float() @ a.float())
    norm = torch.linalg.norm(w + lora, dim=1)  # PEFT detaches it; at inference that changes nothing
    factor = (magnitude.float() / norm).unsqueeze(1)
    return (factor - 1) * w + factor * lora
