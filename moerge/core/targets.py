"""What an expert can target in a base besides its linear modules: the routers and fused expert weights of MoE blocks.

transformers 5 keeps a sparse MoE block's experts as fused 3-D parameters (``mlp.experts.gate_up_proj (E, 2I, H)``,
``mlp.experts.down_proj (E, H, I)``, applied as ``F.linear(x, W[e])``) and its router as a module with a 2-D
``weight (E, H)`` (``mlp.gate``, ``F.linear(h, weight)`` then softmax and top-k). PEFT adapts them through
``target_parameters``. Here they are resolved by name:

* a **router** target is named by its module (``model.layers.0.mlp.gate``) and updated like a linear ``(E, H)``;
* a **stacked** target is named by its parameter (``model.layers.0.mlp.experts.gate_up_proj``), one ``(out, in)``
  update per MoE expert.

Only layouts whose forward moerge reproduces are accepted (:data:`ROUTERS`; experts classes made by transformers'
``use_experts_implementation`` with concatenated gate/up, ``(E, out, in)`` weights, no biases, no post-expert
norm); anything else is refused by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["ROUTERS", "STACKED", "MoETarget", "moe_targets", "resolve_moe_target", "unwrap", "find_module",
           "experts_forward", "gate_input", "CatchLinear"]

ROUTERS = ("MixtralTopKRouter", "Qwen2MoeTopKRouter", "Qwen3MoeTopKRouter")
"""Router classes whose logits are ``F.linear(h, self.weight)`` followed by their own softmax and top-k."""
STACKED = ("gate_up_proj", "down_proj")
"""The fused parameters of an experts module, in the order its forward applies them."""


@dataclass(frozen=True)
class MoETarget:
    """A router or stacked target: ``kind`` (``"router"`` or ``"stacked"``), the module that holds it (its path and
    its parameter's name, ``"weight"`` for a router), one update's ``(out, in)``, the MoE experts (0 for a router),
    and ``dim``, the width of the MoE block's input (the hidden size), on which local gates read its tokens."""

    kind: str
    owner: str
    param: str
    shape: tuple[int, int]
    experts: int
    dim: int

    @property
    def site(self) -> str:
        """The MoE block whose input ``(B, T, dim)`` local gates read for this target (the router's and the
        experts' parent: both see that input flattened, and ``down_proj``'s own input exists per MoE expert only)."""
        return self.owner.rpartition(".")[0]


class CatchLinear(TorchFunctionMode):
    """While active, the output ``y`` of every ``F.linear(x, weight)`` on ``weight`` (that very tensor) becomes
    ``change(x, y)``; :attr:`calls` counts them. How an MoE router, which computes its logits with ``F.linear`` on
    its own weight and then its softmax and top-k, gets the experts' part added to its logits."""

    def __init__(self, weight: torch.Tensor, change: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.weight, self.change, self.calls = weight, change, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is F.linear and len(args) > 1 and args[1] is self.weight:
            self.calls += 1
            return self.change(args[0], out)
        return out


def experts_forward(experts: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor, project: Callable) -> torch.Tensor:
    """transformers' eager experts loop (``F.linear(x, W[e])`` per MoE expert, gate/up split and activation by the
    module's ``_apply_gate``, the top-k weights, the sum), with ``project(param, y, x, tok, e)`` returning MoE
    expert ``e``'s projection ``y`` of its tokens ``x`` (block positions ``tok``) with whatever is to be added."""
    out = torch.zeros_like(hidden)
    num = experts.gate_up_proj.shape[0]
    with torch.no_grad():
        mask = F.one_hot(top_k_index, num_classes=num + 1).permute(2, 1, 0)  # (E+1, top_k, N)
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
    for e in hit[:, 0].tolist():
        if e == num:
            continue
        pos, tok = torch.where(mask[e])
        x = hidden[tok]
        h = experts._apply_gate(project(STACKED[0], F.linear(x, experts.gate_up_proj[e]), x, tok, e))
        y = project(STACKED[1], F.linear(h, experts.down_proj[e]), h, tok, e)
        out.index_add_(0, tok, (y * top_k_weights[tok, pos, None]).to(out.dtype))
    return out


def unwrap(module: nn.Module) -> nn.Module:
    """The module a moerge wrapper stands for (its ``base_layer``, however deep), or ``module`` itself."""
    while getattr(type(module), "wraps_module", False) or getattr(type(module), "wraps_linear", False):
        module = module.base_layer
    return module


def find_module(model: nn.Module, path: str) -> nn.Module | None:
    """The module at ``path`` as the plain base has it (wrappers on the way unwrapped), or ``None``."""
    module = unwrap(model)
    for part in path.split(".") if path else ():
        module = getattr(module, "_modules", {}).get(part)
        if module is None:
            return None
        module = unwrap(module)
    return module


def stacked_problem(module: nn.Module) -> str | None:
    """Why the fused experts of ``module`` cannot be targets (``None``: they can)."""
    need = {"has_gate": True, "is_concatenated": True, "is_transposed": False, "has_bias": False,
            "has_post_expert_norm": False, "_is_expert_parallel": False}
    if not all(hasattr(module, k) for k in need):
        return (f"{type(module).__name__} is not an experts module made by transformers' use_experts_implementation")
    bad = [f"{k}={getattr(module, k)!r}" for k, v in need.items() if getattr(module, k) != v]
    if bad:
        return f"{type(module).__name__} has {', '.join(bad)}, a layout moerge does not reproduce"
    for p in STACKED:
        w = getattr(module, p, None)
        if not isinstance(w, nn.Parameter) or w.dim() != 3:
            return f"{type(module).__name__} has no 3-D parameter {p!r}"
    return None


def _router_shape(module: nn.Module) -> tuple[int, int] | None:
    w = getattr(module, "weight", None)
    if type(module).__name__ in ROUTERS and isinstance(w, nn.Parameter) and w.dim() == 2:
        return int(w.shape[0]), int(w.shape[1])
    return None


def resolve_moe_target(model: nn.Module, name: str) -> MoETarget | str:
    """The router or stacked target ``name`` of ``model``, or why it is none (a sentence naming the class)."""
    module = find_module(model, name)
    if module is not None:
        shape = _router_shape(module)
        if shape is not None:
            return MoETarget("router", name, "weight", shape, 0, shape[1])
        return (f"{name!r} is a {type(module).__name__}, not a linear module nor a router moerge supports "
                f"({', '.join(ROUTERS)})")
    owner_name, _, param = name.rpartition(".")
    owner = find_module(model, owner_name)
    if owner is None or not isinstance(getattr(owner, param, None), nn.Parameter):
        return "a module or parameter the base model does not have"
    w = getattr(owner, param)
    if param not in STACKED or w.dim() != 3:
        return (f"parameter {name!r} ({tuple(w.shape)}) of {type(owner).__name__} is not a fused MoE expert weight "
                f"({', '.join(STACKED)})")
    why = stacked_problem(owner)
    if why is not None:
        return f"parameter {name!r}: {why}"
    return MoETarget("stacked", owner_name, param, (int(w.shape[1]), int(w.shape[2])), int(w.shape[0]),
                     int(owner.gate_up_proj.shape[2]))


def moe_targets(model: nn.Module) -> dict[str, MoETarget]:
    """Every router and stacked target of ``model`` by name, in module order (empty for a dense model)."""
    out: dict[str, MoETarget] = {}

    def walk(module: nn.Module, prefix: str) -> None:
        module = unwrap(module)
        shape = _router_shape(module)
        if shape is not None:
            out[prefix] = MoETarget("router", prefix, "weight", shape, 0, shape[1])
        elif stacked_problem(module) is None:
            for p in STACKED:
                w = getattr(module, p)
                out[f"{prefix}.{p}"] = MoETarget("stacked", prefix, p, (int(w.shape[1]), int(w.shape[2])),
                                                 int(w.shape[0]), int(module.gate_up_proj.shape[2]))
        for cname, child in module._modules.items():
            if child is not None:
                walk(child, f"{prefix}.{cname}" if prefix else cname)

    walk(model, "")
    return out


def gate_input(model: nn.Module, name: str) -> tuple[str, int] | None:
    """Where a local gate of target ``name`` reads its tokens, when that is not the target's own input: ``(the MoE
    block's path, its input width)`` for a router or fused expert weight, ``None`` for anything else."""
    target = resolve_moe_target(model, name)
    return None if isinstance(target, str) else (target.site, target.dim)
