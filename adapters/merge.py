"""Static merges: several experts folded into one expert, or into the base model's weights.

Two levels:

* **Update level** (the merge methods proper). A method takes, for one module, each chosen expert's dense update
  ``ΔW_e (out, in)`` (its "task vector" for that module) and its weight ``w_e``, and returns one update. Methods
  register by name with :func:`register_merge`; :func:`merge_module` runs one. :func:`merge_experts` applies a
  method to every module and returns a new :class:`~moerge.adapters.expert.Expert` — dense, or low rank through a
  truncated SVD of the merged update (``rank=``); :func:`fold_into` adds an expert's update to a model's weights, and
  :func:`merge_into` does both (what :meth:`moerge.MoErgeModel.merge` runs on a copy of its base). The methods
  follow PEFT's ``merge_utils`` formulas where PEFT has them (weights multiply the pruned task tensors after the
  sign election), so results match PEFT's ``add_weighted_adapter`` for the same seed.
* **Factor level** (LoRA experts that stay LoRA without an SVD): ``"cat"`` stacks the factors, exact
  (``rank = Σ r_e``); ``factorwise=True`` applies a method to the ``A`` and the ``B`` matrices separately with
  weights ``±√(w_e·scale_e)``, as PEFT's ``add_weighted_adapter`` does for ``linear``, ``ties``, ``dare_*`` and
  ``magnitude_prune`` (cheap, same rank, but only an approximation of merging the updates: ``Σ B_e · Σ A_e`` has
  cross terms ``B_i A_j``).

Randomised methods (DARE) draw from ``generator`` when given, else from torch's global generator, in module order
then expert order (PEFT's order), so ``torch.manual_seed(s)`` before either gives the same masks.

LiNeS layer scaling (``layer_scaling=(α, β)`` of :func:`merge_experts` and :meth:`~moerge.MoErgeModel.merge`)
multiplies the merged update of a module in layer ``ℓ`` of ``L`` by ``α + β·ℓ/(L−1)``: shallow layers keep less of
the merge, deep layers more. ``L`` is the base's number of layers (:func:`base_num_layers`), never counted from the
modules the experts happen to target, so a merge scales each layer the same whichever experts it takes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from moerge.adapters.expert import (
    DeltaWeights,
    Expert,
    ExpertMetadata,
    LoRAWeights,
    ModuleWeights,
    StackedLoRAWeights,
)
from moerge.core.fingerprint import oriented
from moerge.errors import BaseMismatchError

__all__ = [
    "register_merge", "merge_module", "list_merge_methods", "merge_experts", "merge_lora", "prune_magnitude",
    "prune_random", "majority_sign_mask", "disjoint_merge", "tall_masks", "lines_scales", "block_index",
    "base_num_layers", "add_update", "fold_into", "merge_into",
]

MergeFn = Callable[..., torch.Tensor]
_METHODS: dict[str, MergeFn] = {}


def register_merge(name: str) -> Callable[[MergeFn], MergeFn]:
    """Register a merge function ``fn(deltas, weights, **options) -> ΔW`` under ``name``."""

    def wrap(fn: MergeFn) -> MergeFn:
        _METHODS[name] = fn
        return fn

    return wrap


def list_merge_methods() -> list[str]:
    return sorted(_METHODS)


def merge_module(
    deltas: Mapping[str, torch.Tensor], weights: Mapping[str, float], method: str = "linear", **options: Any
) -> torch.Tensor:
    """Merge one module's updates ``deltas`` (expert → ``ΔW (out, in)``) with ``weights`` by ``method``.

    The result is float32. Experts are taken in the order of ``weights``.
    """
    if method not in _METHODS:
        raise ValueError(f"unknown merge method {method!r}; available: {list_merge_methods()}")
    if not weights:
        raise ValueError("no experts to merge")
    missing = [n for n in weights if n not in deltas]
    if missing:
        raise ValueError(f"no update given for experts {missing}")
    shapes = {tuple(deltas[n].shape) for n in weights}
    if len(shapes) != 1:
        raise ValueError(f"the experts' updates have different shapes {sorted(shapes)}: they cannot be merged")
    return _METHODS[method]({n: deltas[n] for n in weights}, dict(weights), **options)


# --- building blocks (PEFT's merge_utils formulas) -------------------------------------------------------------------
def _check_density(density: float) -> float:
    if not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    return float(density)


def _stack(deltas: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """``T (E, *shape)`` float32 in the order of ``weights``, and ``w (E, 1, ..., 1)``."""
    t = torch.stack([deltas[n].float() for n in weights])  # (E, *shape)
    w = torch.tensor([float(weights[n]) for n in weights], dtype=torch.float32, device=t.device)
    return t, w.view(-1, *([1] * (t.dim() - 1)))


def prune_magnitude(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``int(density · numel)`` entries of largest magnitude, zero the rest."""
    if _check_density(density) >= 1:
        return t
    flat = t.reshape(-1)
    k = int(density * flat.numel())
    mask = torch.zeros_like(flat)
    mask[torch.topk(flat.abs(), k=k, largest=True).indices] = 1
    return t * mask.view(t.shape)


def prune_random(t: torch.Tensor, density: float, rescale: bool = True,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Keep each entry with probability ``density`` (Bernoulli mask), rescaled by ``1/density`` (DARE)."""
    if _check_density(density) >= 1:
        return t
    mask = torch.bernoulli(torch.full_like(t, density), generator=generator)
    out = t * mask
    return out / density if rescale else out


def majority_sign_mask(t: torch.Tensor, method: str = "total") -> torch.Tensor:
    """``(E, ...)`` bool: entries whose sign is the elected sign of their position (TIES' sign election).

    ``"total"``: the sign of the sum over experts; ``"frequency"``: the more frequent sign. Zeros never agree.
    """
    sign = t.sign()
    if method == "total":
        elected = t.sum(dim=0)
    elif method == "frequency":
        elected = sign.sum(dim=0)
    else:
        raise ValueError(f"majority_sign must be 'total' or 'frequency', got {method!r}")
    return sign == torch.where(elected >= 0, 1.0, -1.0)


def disjoint_merge(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the experts of the entries that ``mask`` keeps (TIES' disjoint merge)."""
    return (t * mask).sum(dim=0) / mask.sum(dim=0).clamp(min=1.0)


def _drop_tails(t: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Keep the entries ranked ``[γ·n, (γ+density)·n)`` by decreasing magnitude: drop the largest outliers and the
    small tail (Model Breadcrumbs' mask)."""
    flat = t.reshape(-1)
    n = flat.numel()
    order = torch.argsort(flat.abs(), descending=True)
    lo, hi = int(gamma * n), min(n, int((gamma + density) * n))
    mask = torch.zeros_like(flat)
    mask[order[lo:hi]] = 1
    return t * mask.view(t.shape)


# --- methods --------------------------------------------------------------------------------------------------------
@register_merge("linear")
def linear_merge(deltas: Mapping[str, torch.Tensor], weights: Mapping[str, float],
                 normalize: bool = False) -> torch.Tensor:
    """Weighted sum ``Σ_e w_e ΔW_e``; ``normalize=True`` divides by ``Σ_e w_e`` (a weighted average).

    Paper: Wortsman et al., "Model soups", ICML 2022.
    """
    t, w = _stack(deltas, weights)
    out = (t * w).sum(dim=0)
    if normalize:
        total = sum(float(v) for v in weights.values())
        if total == 0:
            raise ValueError("normalize=True needs weights that do not sum to 0")
        out = out / total
    return out


@register_merge("task_arithmetic")
def task_arithmetic(deltas: Mapping[str, torch.Tensor], weights: Mapping[str, float],
                    scale: float = 1.0) -> torch.Tensor:
    """``λ · Σ_e w_e τ_e``: the task vectors added with one scaling coefficient ``scale`` (λ, typically 0.3–1).

    Paper: Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023.
    """
    return scale * linear_merge(deltas, weights)


@register_merge("magnitude_prune")
def magnitude_prune(deltas: Mapping[str, torch.Tensor], weights: Mapping[str, float],
                    density: float = 0.2) -> torch.Tensor:
    """Each task vector keeps its top ``density`` fraction by magnitude, then a weighted sum (PEFT's
    ``magnitude_prune``).

    Paper: Yadav et al., "TIES-Merging", NeurIPS 2023 (the trim step alone).
    """
    t, w = _stack({n: prune_magnitude(deltas[n].float(), density) for n in weights}, weights)
    return (t * w).sum(dim=0)


@register_merge("ties")
def ties(deltas: Mapping[str, torch.Tensor], weights: Mapping[str, float], density: float = 0.2,
         majority_sign: str = "total", scale: float = 1.0) -> torch.Tensor:
    """TIES: trim each task vector to its top ``density`` by magnitude, elect a sign per entry, average the weighted
    entries that agree with it, times ``scale`` (λ).

    Paper: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023.
    """
    t, w = _stack({n: prune_magnitude(deltas[n].float(), density) for n in weights}, weights)
    return scale * disjoint_merge(t * w, majority_sign_mask(t, majority_sign))


@register_merge("dare_linear")
def dare_linear(deltas: Mapping[str, torch.Tensor], weights: Mapping[str, float], density: float = 0.1,
                rescale: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
    """DARE: drop each entry of each task vector with probability ``1 − density``, rescale by ``1/density``, then a
    weighted sum.

    Paper: Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free
    Lunch" (DARE), ICML 2024.
    """
    t, w = _stack({n: prune_random(deltas[n].float(), density, rescale, generator) for n in weights}, weights)
    return (t * w).sum(dim=0)


@register_merge("dare_ties")
def dare_ties(deltas: Mapping[str, torch.Tensor], weights: Mapping[str, float], density: float = 0.1,
              majority_sign: str = "total", rescale: bool = True,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """DARE's random drop and rescale, then TIES' sign election and disjoint mean.

    Paper: Yu et al., "Language Models are Super Mario" (DARE), ICML 2024; Yadav et al., "TIES-Merging", 2023.
    """
    t, w = _stack({n: prune_random(deltas[n].float(), density, rescale, generator) for n in weights}, weights)
    return disjoint_merge(t * w, majority_sign_mask(t, majority_sign))


@register_merge("breadcrumbs")
def breadcrumbs(deltas: Mapping[str, torch.Tensor], weights: Mapping[str, float], density: float = 0.2,
                gamma: float = 0.01, scale: float = 1.0) -> torch.Tensor:
    """Model Breadcrumbs: per task vector and module, drop the ``gamma`` fraction of largest-magnitude entries
    (outliers) and keep the next ``density`` fraction (the small tail goes too); then ``λ · Σ w_e τ_e``.

    Paper: Davari & Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks", 2023.
    """
    _check_density(density)
    if not 0 <= gamma < 1:
        raise ValueError(f"gamma must be in [0, 1), got {gamma!r}")
    t, w = _stack({n: _drop_tails(deltas[n].float(), density, gamma) for n in weights}, weights)
    return scale * (t * w).sum(dim=0)


@register_merge("breadcrumbs_ties")
def breadcrumbs_ties(deltas: Mapping[str, torch.Tensor], weights: Mapping[str, float], density: float = 0.2,
                     gamma: float = 0.01, majority_sign: str = "total", scale: float = 1.0) -> torch.Tensor:
    """Model Breadcrumbs' two-tailed mask, then TIES' sign election and disjoint mean.

    Paper: Davari & Belilovsky, "Model Breadcrumbs", 2023; Yadav et al., "TIES-Merging", 2023.
    """
    _check_density(density)
    t, w = _stack({n: _drop_tails(deltas[n].float(), density, gamma) for n in weights}, weights)
    return scale * disjoint_merge(t * w, majority_sign_mask(t, majority_sign))


def tall_masks(deltas: Mapping[str, torch.Tensor], weights: Mapping[str, float], lam: float = 0.4) -> torch.Tensor:
    """TALL masks ``(E, ...)`` bool: expert ``e`` keeps the entries where ``|τ_e| ≥ λ·|τ_MTL − τ_e|``, with
    ``τ_MTL = Σ_e w_e τ_e`` — the entries where its own task vector matters next to the others'.

    Paper: Wang et al., "Localizing Task Information for Improved Model Merging and Compression", ICML 2024.
    """
    if not lam > 0:
        raise ValueError(f"lam must be > 0, got {lam!r}")
    t, w = _stack(deltas, weights)
    mtl = (t * w).sum(dim=0)
    return t.abs() >= lam * (mtl - t).abs()


@register_merge("consensus")
def consensus(deltas: Mapping[str, torch.Tensor], weights: Mapping[str, float], k: int = 2, lam: float = 0.4,
              scale: float = 1.0) -> torch.Tensor:
    """Consensus merging: task arithmetic ``λ_s · Σ w_e τ_e`` restricted to the entries that at least ``k`` experts'
    TALL masks keep (entries used by one task only, or by none, are "selfish" or "catastrophic" and dropped).

    Paper: Wang et al., "Localizing Task Information for Improved Model Merging and Compression", ICML 2024.
    """
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    t, w = _stack(deltas, weights)
    keep = tall_masks(deltas, weights, lam).sum(dim=0) >= k
    return scale * (t * w).sum(dim=0) * keep


# --- LiNeS ----------------------------------------------------------------------------------------------------------
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks|block)\.(\d+)(?:\.|$)")


def block_index(module: str) -> int | None:
    """The transformer block a module belongs to (``model.layers.3.mlp.up_proj`` → 3), or ``None``."""
    m = _LAYER_RE.search(module)
    return int(m.group(1)) if m else None


def _count_blocks(modules: Iterable[str]) -> int:
    """One more than the deepest block index among ``modules`` (1 when none is in a block)."""
    known = [i for i in map(block_index, modules) if i is not None]
    return max(known) + 1 if known else 1


def base_num_layers(base: nn.Module) -> int:
    """The number of transformer blocks of ``base``: its config's ``num_hidden_layers`` (``n_layer`` for GPT-2
    style configs), else counted from the names of its modules."""
    config = getattr(base, "config", None)
    for key in ("num_hidden_layers", "n_layer"):
        n = getattr(config, key, None)
        if isinstance(n, int) and n > 0:
            return n
    return _count_blocks(name for name, _ in base.named_modules())


def lines_scales(modules: Sequence[str], alpha: float, beta: float, num_layers: int | None = None) -> dict[str, float]:
    """LiNeS: the scale ``α + β·ℓ/(L−1)`` of each module's merged update (``ℓ``: its block, ``L = num_layers``: the
    base's number of blocks, see :func:`base_num_layers`; without it ``L`` is counted from ``modules``, which is
    right only when they are all the base's modules). Modules outside the blocks (e.g. ``lm_head``) count as the
    deepest layer.

    Paper: Wang et al., "LiNeS: Post-training Layer Scaling Prevents Forgetting and Enhances Model Merging", 2024.
    """
    if num_layers is not None and (not isinstance(num_layers, int) or num_layers < 1):
        raise ValueError(f"num_layers must be a positive integer, got {num_layers!r}")
    n = num_layers or _count_blocks(modules)
    last = max(n - 1, 1)
    idx = {m: block_index(m) for m in modules}
    return {m: alpha + beta * ((n - 1 if i is None else i) / last) for m, i in idx.items()}


def _recorded_num_layers(experts: Sequence[Expert]) -> int | None:
    """The number of blocks of the base the experts' metadata records (its fingerprint's ``num_layers``), or
    ``None``; refused when two experts record different numbers."""
    found = {e.name: fp.get("num_layers") for e in experts if (fp := e.metadata.base_fingerprint)}
    counts = {n for n in found.values() if n is not None}
    if len(counts) > 1:
        raise BaseMismatchError(f"the experts record bases with different numbers of layers: {found}")
    return counts.pop() if counts else None


# --- factor level ---------------------------------------------------------------------------------------------------
def merge_lora(factors: Mapping[str, LoRAWeights], weights: Mapping[str, float], method: str = "cat",
               **options: Any) -> LoRAWeights:
    """Merge one module's LoRA factors without forming ``ΔW``.

    ``method="cat"``: ``A = [w_e·s_e·A_e]``, ``B = [B_e]`` — exactly ``Σ w_e s_e B_e A_e``, rank ``Σ r_e``.
    Any other registered method runs on the ``A`` matrices and on the ``B`` matrices separately with weights
    ``sign(w_e)·√|w_e s_e|`` and ``√|w_e s_e|`` (PEFT's ``add_weighted_adapter`` for ``linear``, ``ties``,
    ``dare_linear``, ``dare_ties``, ``magnitude_prune``); the ranks must be equal. The result has scale 1.
    """
    if not weights:
        raise ValueError("no experts to merge")
    used = [n for n in weights if n in factors]
    if method == "cat":
        A = torch.cat([factors[n].A.float() * (float(weights[n]) * factors[n].scale) for n in used])  # (Σr, in)
        B = torch.cat([factors[n].B.float() for n in used], dim=1)  # (out, Σr)
        return LoRAWeights(A, B, 1.0)
    ranks = {factors[n].rank for n in used}
    if len(ranks) != 1:
        raise ValueError(f"factor-wise {method!r} needs equal ranks, got {sorted(ranks)}; use method='cat' or a "
                         "rank= merge through the SVD")
    wa, wb = {}, {}
    for n in used:
        ws = float(weights[n]) * factors[n].scale
        wa[n] = abs(ws) ** 0.5 * (1.0 if ws >= 0 else -1.0)
        wb[n] = abs(ws) ** 0.5
    A = merge_module({n: factors[n].A for n in used}, wa, method, **options)  # (r, in)
    B = merge_module({n: factors[n].B for n in used}, wb, method, **options)  # (out, r)
    return LoRAWeights(A, B, 1.0)


def _svd_factors(delta: torch.Tensor, rank: int) -> LoRAWeights:
    """Rank-``rank`` truncated SVD of ``delta (out, in)`` as ``B = U_r S_r``, ``A = V_rᵀ`` (PEFT's ``*_svd``)."""
    U, S, Vh = torch.linalg.svd(delta.float(), full_matrices=False)  # (out, q), (q,), (q, in)
    r = min(rank, S.numel())
    return LoRAWeights(Vh[:r].contiguous(), (U[:, :r] @ torch.diag(S[:r])).contiguous(), 1.0)


def _merge_stacked(m: str, have: Mapping[str, ModuleWeights], weights: Mapping[str, float], method: str,
                   rank: int | None, scale: float, dtype: torch.dtype, options: dict[str, Any]) -> StackedLoRAWeights:
    """One fused MoE expert parameter's merge, as stacked factors: ``cat`` (and ``linear`` without ``normalize``,
    which is the same sum) concatenates each MoE expert's factors, exact; ``rank=`` takes each MoE expert's merged
    update's truncated SVD; any other method runs elementwise on the ``(E, out, in)`` updates (density and masks
    over the whole parameter) and keeps the result exactly, as a full-rank SVD per MoE expert."""
    if not all(isinstance(x, StackedLoRAWeights) for x in have.values()):
        raise ValueError(f"parameter {m!r}: stacked MoE factors cannot be merged with other kinds of update")
    stacked: dict[str, StackedLoRAWeights] = dict(have)  # type: ignore[arg-type]
    if rank is None and (method == "cat" or (method == "linear" and not options.get("normalize"))):
        A = torch.cat([x.A.float() * (float(weights[n]) * x.scale * scale) for n, x in stacked.items()], dim=1)
        B = torch.cat([x.B.float() for x in stacked.values()], dim=2)
        return StackedLoRAWeights(A.to(dtype), B.to(dtype), 1.0)
    if method == "cat":
        raise ValueError("method 'cat' takes no rank=")
    dw = merge_module({n: x.delta_weight(torch.float32) for n, x in stacked.items()}, weights, method, **options)
    U, S, Vh = torch.linalg.svd(dw * scale, full_matrices=False)  # (E, out, q), (E, q), (E, q, in)
    r = min(rank or S.shape[1], S.shape[1])
    return StackedLoRAWeights(Vh[:, :r].contiguous().to(dtype), (U[:, :, :r] * S[:, None, :r]).contiguous().to(dtype))


def merge_experts(
    experts: Sequence[Expert],
    weights: Mapping[str, float] | Sequence[float] | None = None,
    method: str = "linear",
    *,
    name: str = "merged",
    rank: int | None = None,
    factorwise: bool = False,
    layer_scaling: tuple[float, float] | None = None,
    num_layers: int | None = None,
    dtype: torch.dtype | None = None,
    description: str | None = None,
    module_order: Sequence[str] | None = None,
    **options: Any,
) -> Expert:
    """Merge ``experts`` into one expert.

    Args:
        experts: the experts (same base; target modules may differ: a module is merged over the experts that
            have it).
        weights: per expert (mapping by name, or a sequence in order); default 1 each.
        method: a registered merge method (:func:`list_merge_methods`), or ``"cat"`` (LoRA experts: exact rank
            concatenation).
        rank: low-rank result: the merged update's truncated SVD at this rank (PEFT's ``svd`` / ``<method>_svd``).
        factorwise: LoRA experts of equal rank: run ``method`` on the factors (see :func:`merge_lora`).
        layer_scaling: LiNeS ``(α, β)`` applied to each module's merged update (see :func:`lines_scales`).
        num_layers: the base's number of blocks, for ``layer_scaling`` (:func:`base_num_layers` of the base);
            default: the ``num_layers`` the experts' metadata records for their base (``base_fingerprint``, set
            when an expert is added to a library that knows its base). A LiNeS merge with neither is refused:
            counting the blocks the experts target would scale a layer differently depending on the experts.
        dtype: dtype of the result's tensors (default: the first expert's first module's: a dense delta's own
            dtype, or at least float32 for LoRA factors).
        description: the merged expert's description (default: names the method and the experts).
        module_order: the order modules are merged in, e.g. ``[n for n, _ in base.named_modules()]`` (it matters
            only for the random draws of DARE; default: sorted by name).
        **options: the method's parameters (``density``, ``majority_sign``, ``scale``, ``generator``, ...).

    Returns: a LoRA expert (``"cat"``, ``factorwise`` or ``rank``) or a dense one. Its metadata records the
    method, the options and the experts.
    """
    if not experts:
        raise ValueError("no experts to merge")
    names = [e.name for e in experts]
    if len(set(names)) != len(names):
        raise ValueError(f"an expert is given twice: {names}")
    if weights is None:
        w = {n: 1.0 for n in names}
    elif isinstance(weights, Mapping):
        unknown = sorted(set(weights) - set(names))
        if unknown:
            raise ValueError(f"weights name experts that are not merged: {unknown}")
        w = {n: float(weights.get(n, 0.0)) for n in names}
    else:
        if len(weights) != len(experts):
            raise ValueError(f"{len(weights)} weights for {len(experts)} experts")
        w = {n: float(x) for n, x in zip(names, weights)}
    if method != "cat" and method not in _METHODS:
        raise ValueError(f"unknown merge method {method!r}; available: {['cat', *list_merge_methods()]}")
    if rank is not None and (not isinstance(rank, int) or rank <= 0):
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    lora_only = method == "cat" or factorwise
    if lora_only:
        not_lora = [e.name for e in experts for m, mw in e.modules.items() if isinstance(mw, DeltaWeights)]
        if not_lora:
            raise ValueError(f"{'method cat' if method == 'cat' else 'factorwise merging'} needs LoRA experts; "
                             f"{sorted(set(not_lora))} have dense modules")
    modules = sorted({m for e in experts for m in e.modules})
    if module_order is not None:
        rank_of = {m: i for i, m in enumerate(module_order)}
        modules.sort(key=lambda m: (rank_of.get(m, len(rank_of)), m))
    scales: dict[str, float] = {}
    if layer_scaling is not None:
        if num_layers is None:
            num_layers = _recorded_num_layers(experts)
        if num_layers is None:
            raise ValueError("LiNeS (layer_scaling=) needs the base's number of layers: pass num_layers= "
                             "(base_num_layers(base)); the experts' metadata does not record their base")
        scales = lines_scales(modules, *layer_scaling, num_layers=num_layers)
    first = next(iter(experts[0].modules.values()))
    out_dtype = dtype or (first.delta.dtype if isinstance(first, DeltaWeights)
                          else torch.promote_types(first.A.dtype, torch.float32))
    merged: dict[str, ModuleWeights] = {}
    for m in modules:
        have = {e.name: e.modules[m] for e in experts if m in e.modules}
        wm = {n: w[n] for n in names if n in have}
        s = scales.get(m, 1.0)
        if any(isinstance(x, StackedLoRAWeights) for x in have.values()):
            if factorwise:
                raise ValueError(f"parameter {m!r}: factorwise merging of stacked MoE factors is not supported; merge "
                                 "their updates (the default) or with method='cat'")
            merged[m] = _merge_stacked(m, have, wm, method, rank, s, out_dtype, options)
            continue
        if lora_only:
            lw = merge_lora(have, wm, method, **options)  # type: ignore[arg-type]
            mw: ModuleWeights = LoRAWeights(lw.A.to(out_dtype), lw.B.to(out_dtype), s)
        else:
            dw = merge_module({n: x.delta_weight(torch.float32) for n, x in have.items()}, wm, method, **options) * s
            if rank is not None:
                with_bias = [n for n, x in have.items() if isinstance(x, DeltaWeights) and x.bias is not None]
                if with_bias:
                    raise ValueError(f"module {m!r}: experts {with_bias} change its bias, which a low-rank (rank=) "
                                     "result cannot hold; merge without rank= to keep it")
                lw = _svd_factors(dw, rank)
                mw = LoRAWeights(lw.A.to(out_dtype), lw.B.to(out_dtype), 1.0)
            else:
                biases = {n: x.bias for n, x in have.items() if isinstance(x, DeltaWeights) and x.bias is not None}
                bias = sum(wm[n] * b.float() for n, b in biases.items()) * s if biases else None
                mw = DeltaWeights(dw.to(out_dtype), None if bias is None else bias.to(out_dtype))
        merged[m] = mw
    first = experts[0].metadata
    record = {k: v for k, v in options.items() if isinstance(v, (int, float, str, bool))}
    meta = ExpertMetadata(
        description=description if description is not None else f"{method} merge of {', '.join(names)}",
        examples=[x for e in experts for x in e.metadata.examples[:2]],
        base_model=first.base_model, base_fingerprint=first.base_fingerprint,
        source={"type": "merge", "method": method, "experts": names, "weights": w, "options": record,
                "rank": rank, "factorwise": factorwise, "layer_scaling": list(layer_scaling or []) or None,
                "num_layers": num_layers if layer_scaling is not None else None},
    )
    return Expert(name, merged, meta)


# --- into a base ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def add_update(model: nn.Module, module: str, delta: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """Add ``delta (out, in)`` (and ``bias (out,)``) to the weights of ``model``'s linear module ``module``, in place.

    GPT-2 ``Conv1D`` weights (stored ``(in, out)``) get the transpose; an ``lm_head`` tied to the input embeddings is
    untied first, so the embeddings keep their weights. ``module`` may also name a router (its ``weight``) or a fused
    MoE expert parameter, which takes ``delta (E, out, in)``.
    """
    try:
        target = model.get_submodule(module)
    except AttributeError:
        target = None
    if target is None:
        param = model.get_parameter(module)  # a fused MoE expert weight (E, out, in)
        if tuple(delta.shape) != tuple(param.shape) or bias is not None:
            raise ValueError(f"parameter {module!r}: update of shape {tuple(delta.shape)} does not fit "
                             f"{tuple(param.shape)}")
        param.copy_((param.float() + delta.float().to(param.device)).to(param.dtype))
        return
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and target.weight is getattr(emb, "weight", None):
        target.weight = nn.Parameter(target.weight.detach().clone())  # untie from the embeddings
        if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
            model.config.tie_word_embeddings = False
    w = target.weight
    d = oriented(target, delta)  # Conv1D stores (in, out)
    if tuple(d.shape) != tuple(w.shape):
        raise ValueError(f"module {module!r}: update of shape {tuple(delta.shape)} does not fit weight "
                         f"{tuple(w.shape)}")
    w.copy_((w.float() + d.float().to(w.device)).to(w.dtype))
    if bias is not None:
        if target.bias is None:
            raise ValueError(f"module {module!r} has no bias to update")
        target.bias.copy_((target.bias.float() + bias.float().to(target.bias.device)).to(target.bias.dtype))


def fold_into(model: nn.Module, expert: Expert, weight: float = 1.0) -> nn.Module:
    """Add ``weight ×`` ``expert``'s update to ``model``'s weights, in place (e.g. a merged expert into a copy of
    the base, to save as a full model). Returns ``model``."""
    names = dict(model.named_modules()) | dict(model.named_parameters())
    missing = [m for m in expert.modules if m not in names]
    if missing:
        raise BaseMismatchError(f"targets modules the model does not have: {missing[:3]}", expert=expert.name)
    for m, w in expert.modules.items():
        bias = w.bias if isinstance(w, DeltaWeights) else None
        add_update(model, m, w.delta_weight(torch.float32) * weight, None if bias is None else bias * weight)
    return model


def merge_into(
    model: nn.Module,
    experts: Sequence[Expert],
    weights: Mapping[str, float] | Sequence[float] | None = None,
    method: str = "linear",
    *,
    layer_scaling: tuple[float, float] | None = None,
    **options: Any,
) -> nn.Module:
    """Merge ``experts`` with ``weights`` by ``method`` (:func:`merge_experts`) and fold the result into ``model``'s
    weights (:func:`fold_into`), in place. Returns ``model``; with no experts it is returned unchanged.

    ``model`` is the base to merge into (e.g. a copy of it; :meth:`moerge.MoErgeModel.merge` runs this on
    :meth:`~moerge.MoErgeModel.copy_base`): LiNeS counts its blocks (:func:`base_num_layers`), modules are merged in
    its module order (the order of DARE's draws), and the merged update stays float32 until it is added to the
    weights. ``options``: the other options of :func:`merge_experts` (``rank=``, ``factorwise=``) and the method's
    parameters (``density=``, ``scale=``, ``generator=``, ...).
    """
    if not experts:
        return model
    merged = merge_experts(experts, weights, method, layer_scaling=layer_scaling,
                           num_layers=base_num_layers(model) if layer_scaling is not None else None,
                           module_order=[n for n, _ in model.named_modules()], dtype=torch.float32, **options)
    return fold_into(model, merged)
