"""Routing views: the per-layer × expert usage of a routed call, as a matrix and as a heatmap PNG.

    model.generate(...)
    save_usage_heatmap(model.last_routing, "routing.png")          # every row of the batch, one panel each
    layers, experts, M = usage_matrix(model.last_routing[0])       # M[layer, expert]: mean gate weight
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moerge.routing import RowRouting

__all__ = ["usage_matrix", "save_usage_heatmap", "token_usage"]

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


def _layer_of(module: str) -> str:
    m = _LAYER.search(module)
    return f"layer {int(m.group(1))}" if m else module


def _check_by(by: str) -> None:
    if by not in ("layer", "module"):
        raise ValueError(f"by must be 'layer' or 'module', got {by!r}")


def _by_layer(per_module: dict[str, np.ndarray], by: str) -> tuple[list[str], np.ndarray]:
    """``(names, M)``: each module's array as is (``by="module"``), or averaged over the modules of each transformer
    layer, layers in numeric order (``by="layer"``)."""
    _check_by(by)
    groups: dict[str, list[np.ndarray]] = {}
    for module, a in per_module.items():
        groups.setdefault(module if by == "module" else _layer_of(module), []).append(a)
    names = list(groups)
    if by == "layer":
        names.sort(key=lambda n: (0, int(n.split()[1])) if n.startswith("layer ") else (1, n))
    return names, np.stack([np.mean(groups[n], axis=0) for n in names]) if names else np.zeros((0,))


def usage_matrix(row: RowRouting, *, by: str = "layer") -> tuple[list[str], list[str], np.ndarray]:
    """``(rows, experts, M)``: ``M[i, j]`` the mean weight the local gate gave expert ``j`` over the row's tokens in
    module ``i`` (``by="module"``) or averaged over the patched modules of transformer layer ``i`` (``by="layer"``).
    Experts are the row's candidates in slot order. For sequence-level routing (no local gate) every module
    uses the row's mixing weights, so ``M`` has one row of them."""
    experts = list(row.candidates) or list(row.experts)
    if not row.layer_usage:
        _check_by(by)
        return ["all modules"], experts, np.array([[row.experts.get(e, 0.0) for e in experts]], dtype=np.float64)
    names, M = _by_layer({m: np.array([u.get(e, 0.0) for e in experts], dtype=np.float64)
                          for m, u in row.layer_usage.items()}, by)
    return names, experts, M


def token_usage(model: Any, input_ids: Any, attention_mask: Any = None, *, row: int = 0,
                by: str = "layer") -> tuple[list[str], list[str], list[str], np.ndarray]:
    """Route and run one forward of ``input_ids`` and return, for batch row ``row``, ``(rows, tokens, experts, W)``
    with ``W[i, t, k]`` the local gate's weight of candidate ``k`` at token ``t`` in module ``i`` (``by="module"``)
    or averaged over the modules of layer ``i`` (``by="layer"``). Empty when the router has no local gate."""
    import torch

    _check_by(by)  # before running anything
    state = model.route(input_ids, attention_mask)
    state.keep_tokens = True
    with torch.no_grad(), model.context.activate(state):
        model.base(input_ids=input_ids, attention_mask=attention_mask)
    model.last_routing = state.trace()
    c = state.candidates
    experts = [c.names[i] for i in c.ids[row].tolist() if i >= 0]
    slots = [j for j, i in enumerate(c.ids[row].tolist()) if i >= 0]
    per_module = {m: w[row][:, slots].cpu().numpy() for m in state.usage  # (T, K)
                  if (w := state.token_weights(m)) is not None}
    names, W = _by_layer(per_module, by)
    tok = getattr(model, "tokenizer", None)
    ids = input_ids[row].tolist()
    tokens = tok.convert_ids_to_tokens(ids) if tok is not None else [str(i) for i in ids]
    return names, tokens, experts, W if names else np.zeros((0, len(ids), len(experts)))


def save_usage_heatmap(routing: RowRouting | Sequence[RowRouting], path: str | Path, *, by: str = "layer",
                       titles: Sequence[str] | None = None, dpi: int = 120) -> Path:
    """Write a heatmap PNG of :func:`usage_matrix` for one row or each row of a batch (one panel per row), layers
    down, experts across, the mean gate weight in each cell. Returns the path."""
    try:
        import matplotlib
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError('routing plots need matplotlib: pip install "moerge[viz]"', name="matplotlib") from e

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows = [routing] if isinstance(routing, RowRouting) else list(routing)
    if not rows:
        raise ValueError("no routing to draw (route a call first: model.last_routing)")
    mats = [usage_matrix(r, by=by) for r in rows]
    height = max(len(m[0]) for m in mats)
    fig, axes = plt.subplots(1, len(rows), figsize=(1.2 + 2.3 * len(rows), 1.4 + 0.22 * height), squeeze=False,
                             constrained_layout=True)
    image = None
    for i, (ax, (names, experts, M)) in enumerate(zip(axes[0], mats)):
        image = ax.imshow(M, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_xticks(range(len(experts)), experts, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(names)), names if i == 0 else [""] * len(names), fontsize=6)
        ax.set_title(titles[i] if titles is not None and i < len(titles) else f"row {i}", fontsize=8)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="mean gate weight")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
