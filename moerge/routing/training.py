"""Training on a frozen base: routing parameters (gates, heads) in front of frozen experts, and adapters.

The experts are applied to the base through forward hooks on its linear modules (patched or not: a patched
:class:`~moerge.runtime.layer.ExpertLinear` outside a routed call is the base module), so gates can be trained for an expert
before it is installed in the model, and the model's own routing is never touched.

* :func:`fit`: the one training loop (PHATGOOSE gates, X-LoRA heads, the zoo's LoRA experts): the given tensors
  are trained by Adam on the model's LM loss, every other parameter of the model frozen.
* :class:`GatedExperts`: a context manager that adds ``Σ_e g_e(x)·ΔW_e x`` to each hooked module's output, ``g``
  given by a gate function of the module's input (the gates being trained).
* :func:`make_batches` / :func:`collate` / :func:`answers_from_expert`: training data from ``(prompt, answer)``
  pairs, or from prompts alone, answered by the expert itself.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import random
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from moerge.adapters.expert import Expert, LoRAWeights
from moerge.core.targets import CatchLinear, experts_forward, find_module, gate_input, unwrap

__all__ = ["fit", "lm_loss", "seeded", "cancellable", "current_cancel", "TrainingCancelled", "GatedExperts", "GateTrainingConfig", "chat_prompt", "encode_pair", "collate",
           "make_batches", "answer_positions", "answers_from_expert", "frozen", "greedy_generate"]


@dataclass
class GateTrainingConfig:
    """How a router trains the routing data of an added expert that has none stored (mixed into its config)."""

    train_missing: bool = field(default=True, metadata={
        "help": "train the routing data of an added expert that has none stored (from its example prompts)"})
    train_steps: int = field(default=40, metadata={"help": "training steps per added expert"})
    train_lr: float = field(default=1e-2, metadata={"help": "training learning rate (Adam)"})
    train_batch_size: int = field(default=8, metadata={"help": "training batch size"})

    def _check_training(self) -> None:
        for f in ("train_steps", "train_batch_size"):
            v = getattr(self, f)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{f} must be a positive integer, got {v!r}")
        if not (isinstance(self.train_lr, (int, float)) and self.train_lr > 0):
            raise ValueError(f"train_lr must be > 0, got {self.train_lr!r}")


@contextmanager
def seeded(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """Run the block with torch's random generators seeded with ``seed``; the caller's random state (of the CPU,
    and of ``device`` when it is a CUDA device) is given back afterwards."""
    devices = [device] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class TrainingCancelled(Exception):
    """Training stopped because the event of the :func:`cancellable` block around it was set."""


_cancel = threading.local()


@contextmanager
def cancellable(event: threading.Event) -> Iterator[None]:
    """Training loops (:func:`fit`) run in this block in this thread stop with :class:`TrainingCancelled` at the
    next step once ``event`` is set (e.g. a model closed while its routing data trains in the background)."""
    previous = getattr(_cancel, "event", None)
    _cancel.event = event
    try:
        yield
    finally:
        _cancel.event = previous


def current_cancel() -> threading.Event | None:
    """The event of the innermost :func:`cancellable` block of this thread (``None`` outside one)."""
    return getattr(_cancel, "event", None)


def _warmup_cosine(warmup: int, steps: int) -> Callable[[int], float]:
    """Learning-rate factor of step ``s``: linear warm-up over ``warmup`` steps, times a cosine decay to 0 at
    ``steps``."""
    return lambda s: min(1.0, (s + 1) / max(warmup, 1)) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))


def lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's LM loss on ``batch`` (mean cross-entropy of the tokens whose ``labels`` are not -100), with the
    output layer applied to those tokens alone: a causal LM's vocabulary projection of every prompt token is most
    of a small model's training cost and none of its loss. Batches without ``labels``, or models without an
    output embedding, give ``model(**batch).loss``."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if "labels" not in batch or not isinstance(head, nn.Module):
        return model(**batch).loss
    keep = answer_positions(batch["labels"])  # (B, T): the positions whose next token is scored

    def scored(module: nn.Module, args: tuple) -> tuple:
        return (args[0][keep].unsqueeze(0), *args[1:])  # (1, N, d)

    handle = head.register_forward_pre_hook(scored)
    try:
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits  # (1, N, V)
    finally:
        handle.remove()
    return nn.functional.cross_entropy(logits[0].float(), batch["labels"][:, 1:][keep[:, :-1]])


def fit(model: nn.Module, params: Iterable[torch.Tensor], batches: Iterable[dict[str, torch.Tensor]], *,
        steps: int, lr: float, warmup: int | None = None, clip_norm: float | None = None, seed: int | None = None,
        progress: bool = True, desc: str = "train", bf16: bool = False,
        loss: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor] | None = None) -> list[float]:
    """Train ``params`` for ``steps`` steps on the LM loss of ``model`` over ``batches``; returns the losses.

    The one training loop of the package. ``model`` runs in eval mode (no dropout) with every parameter frozen
    except those among ``params`` (``params`` may also be tensors outside the model that its forward reads, such as
    gates in hooks; they must require gradients); its mode and gradient flags are restored afterwards. Each batch
    (``input_ids``, ``labels``, ``attention_mask``: :func:`make_batches`) is moved to the model's device. The
    optimizer is Adam at ``lr``: constant, or with ``warmup`` given, a linear warm-up over that many steps and a
    cosine decay to 0 at ``steps``; ``clip_norm`` clips the gradients' global norm. With ``seed``, torch's random
    generators are seeded for the loop and the caller's random state is given back; without it (routing data, whose
    training draws nothing at random) the process-wide generators are not touched at all, so seeded sampling in
    other threads is never disturbed. ``progress`` shows a bar
    (``desc``) with the last loss. The loss is :func:`lm_loss` (the output layer on the scored tokens only);
    ``bf16``: the forward runs under bfloat16 autocast (the trained tensors and the optimizer stay float32), which
    CPUs with AMX run about 3× faster. ``loss(model, batch)`` replaces :func:`lm_loss` (e.g. to score some batches
    otherwise).
    """
    params = list(params)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    opt = torch.optim.Adam(params, lr=lr)
    sched = None if warmup is None else torch.optim.lr_scheduler.LambdaLR(opt, _warmup_cosine(warmup, steps))
    losses: list[float] = []
    bar = tqdm(itertools.islice(batches, steps), total=steps, desc=desc, disable=not progress, leave=False)
    try:
        with (seeded(seed, device) if seed is not None else contextlib.nullcontext()), frozen(model, keep=params), \
                torch.enable_grad():
            for batch in bar:
                if (cancel := getattr(_cancel, "event", None)) is not None and cancel.is_set():
                    raise TrainingCancelled(f"{desc}: cancelled after {len(losses)} of {steps} steps")
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    value = (loss or lm_loss)(model, {k: v.to(device) for k, v in batch.items()})
                opt.zero_grad()
                value.backward()
                if clip_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, clip_norm)
                opt.step()
                if sched is not None:
                    sched.step()
                losses.append(float(value.detach()))
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
    finally:
        bar.close()
        model.train(was_training)
    return losses


GateFn = Callable[[str, torch.Tensor], torch.Tensor]  # (module, x (B, T, in)) -> (B, T, E) weights


class _ModuleExperts:
    """One module's experts in the training dtype. LoRA experts are concatenated along the rank, so the whole group
    costs two matmuls whatever its size: ``((x Aᵀ) ⊙ g[col]) Bᵀ``; dense experts are applied one by one."""

    def __init__(self, weights: list, device: torch.device, dtype: torch.dtype) -> None:
        a, b, cols = [], [], []
        self.dense = []
        for e, w in enumerate(weights):
            if w is None:
                continue
            if isinstance(w, LoRAWeights):
                a.append(w.A.to(device, dtype))  # (r, in)
                b.append(w.B.to(device, dtype) * float(w.scale))  # (out, r)
                cols += [e] * w.rank
            else:
                self.dense.append((e, w.delta.to(device, dtype), None if w.bias is None else w.bias.to(device, dtype)))
        self.A = torch.cat(a) if a else None  # (Σr, in)
        self.B = torch.cat(b, dim=1) if b else None  # (out, Σr)
        self.cols = torch.tensor(cols, device=device, dtype=torch.long)  # (Σr,) expert of each rank column

    def delta(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        out = 0
        if self.A is not None:
            h = (x @ self.A.t()) * g.index_select(-1, self.cols)  # (B, T, Σr)
            out = h @ self.B.t()  # (B, T, out)
        for e, D, bias in self.dense:
            out = out + g[..., e : e + 1] * torch.nn.functional.linear(x, D, bias)  # (B, T, out)
        return out


class _StackedExperts:
    """One fused MoE parameter's experts in the training dtype, concatenated along the rank per MoE expert:
    ``((x A[e]ᵀ) ⊙ g[col]) B[e]ᵀ``."""

    def __init__(self, weights: list, device: torch.device, dtype: torch.dtype) -> None:
        a, b, cols = [], [], []
        for e, w in enumerate(weights):
            if w is not None:
                a.append(w.A.to(device, dtype))  # (E, r, in)
                b.append(w.B.to(device, dtype) * float(w.scale))  # (E, out, r)
                cols += [e] * w.rank
        self.A, self.B = torch.cat(a, dim=1), torch.cat(b, dim=2)
        self.cols = torch.tensor(cols, device=device, dtype=torch.long)

    def delta(self, x: torch.Tensor, expert: int, g: torch.Tensor) -> torch.Tensor:
        return ((x @ self.A[expert].t()) * g.index_select(-1, self.cols)) @ self.B[expert].t()  # (n, out)


class GatedExperts:
    """Apply ``experts`` to ``base`` with per-token weights from ``gate(module, x)`` while the context is open.

    Args:
        base: the causal LM (a patched model's base acts as the plain base outside routed calls).
        experts: the experts to apply; expert ``e``'s weight is column ``e`` of the gate's output.
        gate: ``(module name, x (B, T, in)) -> (B, T, E)``; for an MoE router or fused expert weight, ``x`` is the
            MoE block's input (see :func:`~moerge.core.targets.gate_input`).
    """

    def __init__(self, base: nn.Module, experts: Sequence[Expert], gate: GateFn) -> None:
        self.base, self.experts, self.gate = base, [e.load() for e in experts], gate  # weights read once
        self.modules = sorted({m for e in self.experts for m in e.modules})
        self._handles: list[Any] = []
        self._inputs: dict[str, torch.Tensor] = {}  # MoE block -> its input in the current forward

    def __enter__(self) -> GatedExperts:
        p = next(self.base.parameters())
        stacked: dict[str, dict[str, tuple[str, str, Any]]] = {}  # experts module -> param -> (target, block, store)
        try:
            for m in self.modules:
                weights = [e.modules.get(m) for e in self.experts]
                site = gate_input(self.base, m)  # None for a linear module
                if site is None:
                    self._linear(m, _ModuleExperts(weights, p.device, torch.float32))
                    continue
                block = site[0]
                if block not in self._inputs:
                    self._inputs[block] = None
                    self._handles.append(self.base.get_submodule(block).register_forward_pre_hook(
                        lambda mod, args, _b=block: self._inputs.__setitem__(_b, args[0])))
                if find_module(self.base, m) is not None:  # a router: its F.linear on its weight gets the experts' part
                    self._router(m, block, _ModuleExperts(weights, p.device, torch.float32))
                else:
                    owner, _, param = m.rpartition(".")
                    stacked.setdefault(owner, {})[param] = (m, block, _StackedExperts(weights, p.device, torch.float32))
            for owner, params in stacked.items():
                self._stacked(owner, params)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _linear(self, m: str, store: _ModuleExperts) -> None:
        def hook(module, args, output):
            x = args[0]
            x3 = x.reshape(x.shape[0], -1, x.shape[-1]).float()  # (B, T, in)
            d = store.delta(x3, self.gate(m, x3))
            return output + d.reshape(*output.shape[:-1], -1).to(output.dtype)

        self._handles.append(self.base.get_submodule(m).register_forward_hook(hook))

    def _router(self, m: str, block: str, store: _ModuleExperts) -> None:
        mod = self.base.get_submodule(m)
        modes: list[CatchLinear] = []

        def add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            x3 = x.reshape(*self._inputs[block].shape[:2], -1).float()  # the block's (B, T, H)
            return y + store.delta(x3, self.gate(m, x3)).reshape(y.shape).to(y.dtype)

        def enter(module, args):
            modes.append(CatchLinear(mod.weight, add))
            modes[-1].__enter__()

        def leave(module, args, output):
            modes.pop().__exit__(None, None, None)

        self._handles.append(mod.register_forward_pre_hook(enter))
        self._handles.append(mod.register_forward_hook(leave, always_call=True))

    def _stacked(self, owner: str, params: dict[str, tuple[str, str, Any]]) -> None:
        def hook(module, args, output):
            hidden, top_k_index, top_k_weights = args
            gates = {}
            for param, (m, block, _) in params.items():
                x3 = self._inputs[block].float()
                gates[param] = self.gate(m, x3).reshape(hidden.shape[0], -1)  # (N, E)

            def project(param, y, x, tok, e):
                if param not in params:
                    return y
                return y + params[param][2].delta(x.float(), e, gates[param][tok]).to(y.dtype)

            return experts_forward(unwrap(module), hidden, top_k_index, top_k_weights, project)

        self._handles.append(self.base.get_submodule(owner).register_forward_hook(hook))

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._inputs.clear()



@contextmanager
def frozen(model: nn.Module, keep: Iterable[torch.Tensor] = ()) -> Iterator[None]:
    """Turn off gradients of every parameter of ``model`` but those in ``keep`` (which get them on); the flags are
    restored afterwards. Gradients still flow through the frozen parameters to what is trained."""
    trained = {id(p) for p in keep}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(id(p) in trained)
    try:
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


def chat_prompt(tokenizer: Any, prompt: str) -> str:
    """The user turn of the tokenizer's chat template, ready for the assistant's answer (the prompt and a newline
    for a tokenizer without a template)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return prompt + "\n"


def _end_of_turn(tokenizer: Any) -> tuple[str, str]:
    """``(written, after)``: the end of an assistant turn, split where generation stops — the token the model writes
    to end its answer (``<|im_end|>`` with a ChatML template, else the EOS token) and what the template puts after
    it (ChatML's newline), which no generation ever computes."""
    if getattr(tokenizer, "chat_template", None) and "<|im_end|>" in tokenizer.get_vocab():
        return "<|im_end|>", "\n"
    return tokenizer.eos_token or "", ""


def encode_pair(tokenizer: Any, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """Token ids of chat prompt + answer + end of turn, and labels scoring the answer and the token that ends it
    (-100 on the prompt, and on what the chat template puts after the end-of-turn token: generation stops at that
    token, so no position after it writes anything)."""
    p = tokenizer(chat_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    written, after = _end_of_turn(tokenizer)
    a = tokenizer(answer + written, add_special_tokens=False)["input_ids"]
    tail = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    return p + a + tail, [-100] * len(p) + a + [-100] * len(tail)


def collate(tokenizer: Any, pairs: Sequence[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """One right-padded training batch of ``(prompt, answer)`` pairs (:func:`encode_pair`): ``input_ids``,
    ``labels`` (-100 on the prompt and the padding) and ``attention_mask``, each ``(B, T)``."""
    rows = [encode_pair(tokenizer, p, a) for p, a in pairs]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    width = max(len(i) for i, _ in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (x, y) in enumerate(rows):
        ids[r, : len(x)], labels[r, : len(y)], mask[r, : len(x)] = torch.tensor(x), torch.tensor(y), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` bool: the positions whose next token is scored (``labels[:, t + 1] != -100``) — the last prompt
    token, which writes the answer's first token, through the answer's last token, which writes the end of turn.
    These are the hidden states that *produce* the answer (what generation computes at each step), and the ones
    :func:`lm_loss` scores."""
    out = torch.zeros_like(labels, dtype=torch.bool)
    out[:, :-1] = labels[:, 1:] != -100
    return out


def make_batches(tokenizer: Any, pairs: Sequence[tuple[str, str]], batch_size: int, steps: int,
                 seed: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """``steps`` right-padded training batches (:func:`collate`) drawn from ``pairs`` (reshuffled every epoch)."""
    if not pairs:
        raise ValueError("no training examples")
    rng = random.Random(seed)
    order: list[int] = []
    for _ in range(steps):
        chosen = []
        while len(chosen) < min(batch_size, len(pairs)):
            if not order:
                order = list(range(len(pairs)))
                rng.shuffle(order)
            chosen.append(pairs[order.pop()])
        yield collate(tokenizer, chosen)


@torch.no_grad()
def greedy_generate(model: nn.Module, tokenizer: Any, texts: Sequence[str], max_new_tokens: int,
                    **generate_kwargs: Any) -> list[str]:
    """Greedy continuations of ``texts`` (already formatted, one batch): left padded (the tokenizer's padding side
    is restored), on the model's device, decoded without special tokens. ``generate_kwargs`` go to ``generate``
    (e.g. ``experts=`` for a :class:`~moerge.MoErgeModel`)."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer(list(texts), return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    batch = batch.to(next(model.parameters()).device)
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id, **generate_kwargs)
    return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)


def answers_from_expert(base: nn.Module, tokenizer: Any, expert: Expert, prompts: Sequence[str],
                        max_new_tokens: int = 64, batch_size: int = 16) -> list[tuple[str, str]]:
    """``(prompt, answer)`` pairs where the answer is the expert's own greedy answer (the expert at weight 1)."""
    pairs = []
    with GatedExperts(base, [expert], lambda m, x: torch.ones(*x.shape[:2], 1, device=x.device)):
        for i in range(0, len(prompts), batch_size):
            chunk = list(prompts[i : i + batch_size])
            texts = greedy_generate(base, tokenizer, [chat_prompt(tokenizer, p) for p in chunk], max_new_tokens)
            pairs.extend((p, t.strip()) for p, t in zip(chunk, texts))
    return pairs
