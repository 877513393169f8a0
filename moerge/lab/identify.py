"""Per-token identification: how often a local gate picks the prompt's own expert, layer by layer.

A routed model is run teacher-forced over each example's prompt and answer (the chat template, the target, the end
of turn). Inside every patched module the router's gate logits for that module's input are taken (the inputs the
routed model itself computes, so a gate that errs early sees the consequences later), and the token counts as
identified when the candidate with the highest logit is the expert of the example's task. Answer tokens are the
positions that write the answer (:func:`~moerge.routing.training.answer_positions`: the prompt's last token through
the answer's last, each predicting the next; what generation computes), prompt tokens the rest of the templated
prompt; they are counted apart; the answer tokens' picks are also kept as a confusion table
between tasks and experts. Only routers whose gate is linear in the module input (every local gate here) are
measured.

``python -m moerge.lab.identify --routers lda,phatgoose,arrow,xlora --split dev`` prints the table and saves
``identify.json`` and ``identify.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moerge.adapters.merge import block_index
from moerge.lab.tasks import HELD_IN, Example, get_task, unseen_examples
from moerge.routing.training import answer_positions, collate

__all__ = ["Identification", "token_identification", "identification_markdown"]

def layer_of(module: str) -> int:
    """The transformer block a module belongs to (``-1`` outside the blocks)."""
    block = block_index(module)
    return -1 if block is None else block


@dataclass
class Identification:
    """Counts of one router's per-token picks: ``hits[kind][layer]`` and ``tokens[kind][layer]`` for kind
    ``"prompt"`` and ``"answer"`` (a token counts once per module of the layer), and ``confusion[task][expert]``
    over the answer tokens of every module."""

    router: str
    hits: dict[str, Counter] = field(default_factory=lambda: {"prompt": Counter(), "answer": Counter()})
    tokens: dict[str, Counter] = field(default_factory=lambda: {"prompt": Counter(), "answer": Counter()})
    confusion: dict[str, Counter] = field(default_factory=dict)
    nll: dict[float, float] = field(default_factory=dict)  # temperature -> summed NLL of the true expert (answers)
    nll_tokens: int = 0

    def best_temperature(self) -> float | None:
        """The temperature of the grid whose softmax gives the answer tokens' true experts the highest likelihood
        (temperature scaling, Guo et al. 2017)."""
        return min(self.nll, key=self.nll.get) if self.nll else None

    def accuracy(self, kind: str, layers: Sequence[int] | None = None) -> float | None:
        """Share of ``kind`` tokens identified, over ``layers`` (all by default)."""
        keys = list(self.tokens[kind]) if layers is None else [x for x in layers if x in self.tokens[kind]]
        n = sum(self.tokens[kind][x] for x in keys)
        return None if n == 0 else sum(self.hits[kind][x] for x in keys) / n

    @property
    def layers(self) -> list[int]:
        return sorted(set(self.tokens["answer"]) | set(self.tokens["prompt"]))

    def deep(self) -> list[int]:
        """The last third of the layers."""
        blocks = [x for x in self.layers if x >= 0]
        return blocks[len(blocks) * 2 // 3:] if blocks else []

    def to_json(self) -> dict[str, Any]:
        return {"router": self.router,
                "answer": self.accuracy("answer"), "prompt": self.accuracy("prompt"),
                "answer_deep": self.accuracy("answer", self.deep()),
                "per_layer": {str(x): {k: self.accuracy(k, [x]) for k in ("prompt", "answer")} for x in self.layers},
                "tokens": {k: sum(v.values()) for k, v in self.tokens.items()},
                "best_temperature": self.best_temperature(),
                "nll_per_token": {str(t): v / max(self.nll_tokens, 1) for t, v in sorted(self.nll.items())},
                "confusion": {t: dict(c) for t, c in self.confusion.items()}}


@torch.no_grad()
def token_identification(model: Any, tokenizer: Any, examples: Sequence[Example], *, batch_size: int = 16,
                         label: str | None = None, temperatures: Sequence[float] = ()) -> Identification:
    """Run ``model`` (a :class:`~moerge.MoErgeModel` whose router has a linear local gate) teacher-forced over
    ``examples`` and count, per layer, the prompt and answer tokens whose best-scored candidate is the expert named
    like the example's task. ``temperatures``: also sum, for each, the negative log-likelihood of the true expert
    under ``softmax(logits / temperature)`` over the answer tokens whose row has it among its candidates (for a
    router with a global log-prior, GLIDER, the local logits alone are divided: ``softmax(local / temperature +
    log_prior)``)."""
    router = model.router
    if not (router.has_local_gate and router.has_linear_gate):
        raise ValueError(f"router {router.name!r} has no linear local gate to measure")
    out = Identification(label or router.name)
    layers = [m for m in model.modules() if getattr(m, "wraps_linear", False) and hasattr(m, "info")]
    picks: dict[str, torch.Tensor] = {}
    truth_now: list[torch.Tensor] = [torch.empty(0)]  # (B, 1): each row's true expert (an index into the names)
    answer_now: list[torch.Tensor] = [torch.empty(0)]  # (B, T): the answer tokens

    def hook(module: Any, args: tuple) -> None:
        state = model.context.current
        if state is None or not state.local or state.gathered.get(module.patch_index) is None:
            return
        x = args[0]
        x3 = x.reshape(x.shape[0], -1, x.shape[-1])
        logits = state.router.logits(x3, state.candidates, module.info)  # (B, T, K)
        best = logits.argmax(-1)
        ids = state.candidates.ids.to(best.device).gather(1, best)  # (B, T): index into names
        picks[module.module_name] = ids.masked_fill(~torch.isfinite(logits.max(-1).values), -1).cpu()
        if temperatures:
            dev = logits.device
            prior = getattr(state.router, "log_prior", None)  # GLIDER: the global term, kept as it is
            prior = None if prior is None else prior(state.candidates).to(dev).unsqueeze(1)  # (B, 1, K)
            is_true = state.candidates.ids.to(dev) == truth_now[0].to(dev)  # (B, K)
            slot = is_true.float().argmax(-1)  # (B,): the true expert's slot
            ok = answer_now[0].to(dev) & is_true.any(-1, keepdim=True) \
                & torch.isfinite(logits.gather(-1, slot.view(-1, 1, 1).expand(-1, logits.shape[1], 1)).squeeze(-1))
            for t in temperatures:
                lp = torch.log_softmax(logits.float() / t if prior is None else (logits - prior) / t + prior, dim=-1)
                true = lp.gather(-1, slot.view(-1, 1, 1).expand(-1, lp.shape[1], 1)).squeeze(-1)  # (B, T)
                out.nll[t] = out.nll.get(t, 0.0) - float(true[ok].sum())
            out.nll_tokens += int(ok.sum())

    handles = [m.register_forward_pre_hook(hook) for m in layers]
    try:
        for i in range(0, len(examples), batch_size):
            chunk = list(examples[i : i + batch_size])
            b = collate(tokenizer, [(e.prompt, e.target) for e in chunk])
            picks.clear()
            names = list(model.experts)
            answer = answer_positions(b["labels"])
            prompt = (b["attention_mask"] == 1) & ~answer
            truth = torch.tensor([names.index(e.task) if e.task in names else -2 for e in chunk]).unsqueeze(1)
            truth_now[0], answer_now[0] = truth, answer
            with model.routing(b["input_ids"], b["attention_mask"]):
                model.base(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            for module, ids in picks.items():
                layer = layer_of(module)
                hit = ids == truth
                for kind, mask in (("prompt", prompt), ("answer", answer)):
                    out.hits[kind][layer] += int(hit[mask].sum())
                    out.tokens[kind][layer] += int(mask.sum())
                for r, e in enumerate(chunk):
                    got = ids[r][answer[r]].tolist()
                    out.confusion.setdefault(e.task, Counter()).update(names[j] if j >= 0 else "(none)" for j in got)
    finally:
        for h in handles:
            h.remove()
    return out


def identification_markdown(results: Sequence[Identification], every: int = 5) -> str:
    """One table: per router, answer and prompt tokens identified (all layers, the deep third, and every
    ``every``-th layer)."""
    fmt = lambda v: "—" if v is None else f"{100 * v:.1f}"  # noqa: E731
    layers = sorted({x for r in results for x in r.layers if x >= 0})
    shown = [x for x in layers if x % every == 0 or x == layers[-1]]
    head = ["router", "answer", "answer (deep third)", "prompt"] + [f"L{x} ans / prompt" for x in shown]
    lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    for r in results:
        cells = [r.router, fmt(r.accuracy("answer")), fmt(r.accuracy("answer", r.deep())), fmt(r.accuracy("prompt"))]
        cells += [f"{fmt(r.accuracy('answer', [x]))} / {fmt(r.accuracy('prompt', [x]))}" for x in shown]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def confusion_markdown(result: Identification) -> str:
    """The answer tokens' confusion table of one router: rows the true task, columns the expert picked (% of the
    row)."""
    experts = sorted({e for c in result.confusion.values() for e in c})
    lines = ["| task \\ picked | " + " | ".join(experts) + " |", "| --- |" + " ---: |" * len(experts)]
    for task, c in result.confusion.items():
        n = sum(c.values()) or 1
        lines.append(f"| {task} | " + " | ".join(f"{100 * c.get(e, 0) / n:.0f}" for e in experts) + " |")
    return "\n".join(lines)


def identification_examples(split: str, limit: int, phrasing: str = "seen") -> list[Example]:
    """``limit`` examples of each held-in task from ``split``, in the split's own phrasings (``"seen"``: the
    dev phrasings for ``"dev"``, the training ones for ``"test"``) or the unseen ones."""
    if phrasing == "unseen":
        return [e for t in HELD_IN for e in unseen_examples(t, limit, split)]
    return [e for t in HELD_IN for e in get_task(t).examples(limit, split)]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m moerge.lab.identify", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--library", default=None, help="expert library (default: the committed zoo)")
    ap.add_argument("--routers", default="lda,phatgoose,arrow,xlora",
                    help="comma-separated routers (name or name?key=value&...) with a linear local gate")
    ap.add_argument("--split", default="dev", choices=("dev", "test"))
    ap.add_argument("--phrasing", default="seen", choices=("seen", "unseen"))
    ap.add_argument("--limit", type=int, default=8, help="examples per held-in task")
    ap.add_argument("--out", default="results", help="folder for identify.json and identify.md")
    args = ap.parse_args(argv)
    from moerge.lab.defaults import default_base
    from moerge.lab.zoo import DEFAULT_ZOO
    from moerge.routers import build_router, parse_router_spec
    from moerge.runtime.model import MoErgeModel

    t0 = time.time()
    base, tok = default_base()
    model = MoErgeModel.from_library(base, args.library or DEFAULT_ZOO, tokenizer=tok, router="explicit")
    examples = identification_examples(args.split, args.limit, args.phrasing)
    results = []
    for spec in [s for s in args.routers.split(",") if s]:
        name, config = parse_router_spec(spec)
        model.set_router(build_router(name, **config))
        results.append(token_identification(model, tok, examples, label=spec))
        print(identification_markdown(results[-1:]), flush=True)
    md = identification_markdown(results)
    md += "".join(f"\n\nanswer tokens, {r.router}: rows the task, columns the expert picked (% of the row)\n\n"
                  + confusion_markdown(r) for r in results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = {"split": args.split, "phrasing": args.phrasing, "limit": args.limit, "seconds": round(time.time() - t0),
              "command": "python -m moerge.lab.identify " + " ".join(argv if argv is not None else
                                                                     __import__("sys").argv[1:])}
    (out / "identify.json").write_text(json.dumps({"config": config, "routers": [r.to_json() for r in results]},
                                                  indent=2))
    (out / "identify.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
