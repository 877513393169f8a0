"""Evaluation harness: run ways of using the experts over the task suite and tabulate exact match.

``python -m moerge.eval [--limit N] [--methods base,oracle,uniform] [--out results/]`` prints a table (per task,
held-in and held-out averages) and saves it as JSON and Markdown.

A *method* decides the experts of every prompt:

* ``base`` — no expert: the base model alone;
* ``oracle`` — each held-in task's own expert at weight 1 (an upper bound; held-out tasks have none);
* ``uniform`` — the uniform average of all experts (the ``fixed`` router without weights);
* ``router:<name>`` — any registered router, with its default config, deciding from the prompt alone;
* methods added with :func:`register_method` (merges, compressed experts, …).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moerge.tasks import HELD_IN, HELD_OUT, Example, exact_match, get_task

__all__ = ["Method", "register_method", "list_methods", "evaluate", "EvalResult", "generate_answers",
           "to_markdown", "retrieval_accuracy"]


@dataclass
class Method:
    """How a method routes: ``experts_for(examples, model)`` gives per-row mixes (or ``None`` to let the model's
    router decide); ``router`` (a registered name, a ``() -> Router`` factory, or ``None``) is set on the model
    first."""

    name: str
    experts_for: Callable[[list[Example], Any], list[dict[str, float]] | None]
    router: str | Callable[[], Any] | None = None
    applies_to: Callable[[str], bool] = lambda task: True
    description: str = ""
    make_model: Callable[[Any], Any] | None = None  # another model to run this method on (e.g. a derived library)


_METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    _METHODS[method.name] = method
    return method


register_method(Method("base", lambda exs, m: [{} for _ in exs], description="the base model, no expert"))
register_method(Method("oracle", lambda exs, m: [{e.task: 1.0} for e in exs],
                       applies_to=lambda task: not get_task(task).held_out,
                       description="each task's own expert (upper bound)"))
register_method(Method("uniform", lambda exs, m: [{n: 1.0 / len(m.experts) for n in m.experts} for _ in exs],
                       description="uniform average of all experts"))


def _router_factory(name: str, **config: Any) -> Callable[[], Any]:
    def make() -> Any:
        from moerge.routing import build_router

        return build_router(name, **config)

    return make


def _twin_model(model: Any, rank: int = 8) -> Any:
    """A model over the Twin-Merging split of ``model``'s library (built once, cached next to the library)."""
    from moerge.adapters.twin import make_twin_library
    from moerge.library import ExpertLibrary
    from moerge.model import MoErgeModel
    from moerge.models import cache_root

    lib = model.library
    digest = __import__("hashlib").sha256(json.dumps(
        [[n, lib.info(n).get("files")] for n in lib.names()], sort_keys=True).encode()).hexdigest()[:12]
    root = cache_root() / "twin" / f"{Path(lib.root).name}-{digest}-r{rank}"
    twin = ExpertLibrary.open(root) if (root / "library.json").is_file() else make_twin_library(lib, root, rank)
    return MoErgeModel.from_library(model.copy_base(), twin, router="twin", tokenizer=model.tokenizer)


register_method(Method("twin", lambda exs, m: None, make_model=_twin_model,
                       description="Twin-Merging: shared average always on + rank-8 exclusive parts by retrieval"))
register_method(Method("glider_global", lambda exs, m: None, router=_router_factory("glider", local="none"),
                       description="GLIDER's global stage alone: top-K retrieval, sequence-level softmax mix"))


def list_methods() -> list[str]:
    from moerge.routing import list_routers

    return sorted(_METHODS) + [f"router:{r}" for r in list_routers() if r not in ("explicit",)]


def _method(name: str) -> Method:
    if name in _METHODS:
        return _METHODS[name]
    if name.startswith("router:"):
        router = name.split(":", 1)[1]
        return Method(name, lambda exs, m: None, router=router, description=f"router {router!r}")
    raise ValueError(f"unknown method {name!r}; available: {list_methods()}")


def generate_answers(model: Any, tokenizer: Any, examples: Sequence[Example], experts: list[dict] | None,
                     max_new_tokens: int) -> list[str]:
    """Greedy answers for ``examples`` (one batch), prompts formatted with the chat template, left padded."""
    from moerge.training import chat_prompt, greedy_generate

    kw: dict[str, Any] = {"experts": experts} if experts is not None else {}
    return greedy_generate(model, tokenizer, [chat_prompt(tokenizer, e.prompt) for e in examples], max_new_tokens,
                           **kw)


@dataclass
class EvalResult:
    """Exact-match accuracy per method and task, plus what was run."""

    scores: dict[str, dict[str, float]] = field(default_factory=dict)  # method -> task -> accuracy
    retrieval: dict[str, dict[str, Any]] = field(default_factory=dict)  # label -> retrieval_accuracy(...)
    samples: dict[str, dict[str, list[dict[str, str]]]] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    def average(self, method: str, tasks: Sequence[str]) -> float | None:
        vals = [self.scores[method][t] for t in tasks if t in self.scores.get(method, {})]
        return sum(vals) / len(vals) if vals else None

    def to_json(self) -> dict[str, Any]:
        return {"config": self.config, "scores": self.scores,
                "averages": {m: {"held_in": self.average(m, HELD_IN), "held_out": self.average(m, HELD_OUT)}
                             for m in self.scores},
                "retrieval": self.retrieval, "samples": self.samples}


def evaluate(model: Any, tokenizer: Any, methods: Sequence[str] = ("base", "oracle", "uniform"),
             tasks: Sequence[str] | None = None, limit: int = 50, batch_size: int = 32, progress: bool = True,
             samples_per_task: int = 3, split: str = "test") -> EvalResult:
    """Run ``methods`` on ``limit`` test examples of each task with ``model`` (a :class:`~moerge.MoErgeModel`)."""
    from tqdm.auto import tqdm

    tasks = list(tasks or (HELD_IN + HELD_OUT))
    result = EvalResult(config={"methods": list(methods), "tasks": tasks, "limit": limit,
                                "experts": list(model.experts), "batch_size": batch_size,
                                "split": split})
    original_router = model.router
    jobs = [(m, t) for m in methods for t in tasks if _method(m).applies_to(t)]
    bar = tqdm(total=len(jobs) * limit, desc="eval", disable=not progress)
    try:
        for mname in methods:
            method = _method(mname)
            router = method.router() if callable(method.router) else method.router
            run_model = method.make_model(model) if method.make_model is not None else model
            if run_model is model:
                model.set_router(router if router else original_router)
            elif router:
                run_model.set_router(router)
            result.scores[mname], result.samples[mname] = {}, {}
            for task in tasks:
                if not method.applies_to(task):
                    continue
                examples = get_task(task).examples(limit, split)
                longest = max(len(tokenizer(e.target, add_special_tokens=False)["input_ids"]) for e in examples)
                correct, shown = 0, []
                for i in range(0, len(examples), batch_size):
                    chunk = examples[i : i + batch_size]
                    answers = generate_answers(run_model, tokenizer, chunk, method.experts_for(chunk, run_model),
                                               max_new_tokens=longest + 4)
                    for e, a in zip(chunk, answers):
                        ok = exact_match(a, e.target)
                        correct += ok
                        if len(shown) < samples_per_task:
                            shown.append({"prompt": e.prompt, "target": e.target, "answer": a, "correct": ok})
                    bar.update(len(chunk))
                result.scores[mname][task] = correct / len(examples)
                result.samples[mname][task] = shown
    finally:
        model.set_router(original_router)
        bar.close()
    return result


def retrieval_accuracy(router: Any, tasks: Sequence[str] | None = None, limit: int = 50, k: int | None = None,
                       unseen: bool = False) -> dict[str, float]:
    """Top-1 and top-K accuracy of a global router's retrieval (``router.retrieve``) against each prompt's true
    task, over ``limit`` test prompts per held-in task; ``unseen`` asks in phrasings no expert saw."""
    from moerge.tasks import unseen_examples

    tasks = list(tasks or HELD_IN)
    k = k or router.config.candidates
    top1 = topk = total = 0
    per_task: dict[str, float] = {}
    for task in tasks:
        exs = unseen_examples(task, limit, "test") if unseen else get_task(task).examples(limit, "test")
        names, _ = router.retrieve([e.prompt for e in exs], k)
        hits = [row[0] == task for row in names]
        per_task[task] = sum(hits) / len(hits)
        top1 += sum(hits)
        topk += sum(task in row for row in names)
        total += len(exs)
    return {"top1": top1 / total, f"top{k}": topk / total, "k": k, "prompts": total, "per_task_top1": per_task}


def to_markdown(result: EvalResult) -> str:
    """The table: one column per method, one row per task, then held-in and held-out averages (EM, %)."""
    methods = list(result.scores)
    fmt = lambda v: "—" if v is None else f"{100 * v:.1f}"  # noqa: E731
    lines = ["| task | " + " | ".join(methods) + " |", "| --- | " + " | ".join("---:" for _ in methods) + " |"]
    for group, names in (("held-in", HELD_IN), ("held-out", HELD_OUT)):
        for t in names:
            if any(t in result.scores[m] for m in methods):
                lines.append(f"| {t} ({group}) | " + " | ".join(fmt(result.scores[m].get(t)) for m in methods) + " |")
    for label, names in (("**average held-in**", HELD_IN), ("**average held-out**", HELD_OUT)):
        lines.append(f"| {label} | " + " | ".join(fmt(result.average(m, names)) for m in methods) + " |")
    if "oracle" in result.scores and result.average("oracle", HELD_IN):
        oracle = result.average("oracle", HELD_IN)
        lines.append("| *held-in, % of oracle* | " + " | ".join(
            "—" if result.average(m, HELD_IN) is None else f"{100 * result.average(m, HELD_IN) / oracle:.1f}"
            for m in methods) + " |")
    if result.retrieval:
        lines += ["", "| global retrieval (held-in test prompts) | top-1 | top-K | K | prompts |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for label, r in result.retrieval.items():
            k = r["k"]
            lines.append(f"| {label} | {100 * r['top1']:.1f} | {100 * r[f'top{k}']:.1f} | {k} | {r['prompts']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m moerge.eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--library", default=None, help="expert library (default: the committed zoo)")
    ap.add_argument("--methods", default="base,oracle,uniform", help=f"comma-separated; known: {list_methods()}")
    ap.add_argument("--tasks", default=None, help="comma-separated task names (default: all)")
    ap.add_argument("--limit", type=int, default=50, help="test examples per task")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--out", default="results", help="folder for eval.json and eval.md")
    ap.add_argument("--retrieval", action="store_true",
                    help="also measure the global router's top-1/top-K retrieval accuracy")
    args = ap.parse_args(argv)
    from moerge.model import MoErgeModel
    from moerge.models import default_base
    from moerge.zoo import DEFAULT_ZOO

    torch.manual_seed(0)
    t0 = time.time()
    base, tok = default_base()
    model = MoErgeModel.from_library(base, args.library or DEFAULT_ZOO, tokenizer=tok)
    methods = [m for m in args.methods.split(",") if m]
    tasks = [t for t in args.tasks.split(",") if t] if args.tasks else None
    result = evaluate(model, tok, methods, tasks, limit=args.limit, batch_size=args.batch_size)
    if args.retrieval:
        from moerge.routing import build_router

        glider = build_router("glider", local="none")
        model.set_router(glider)
        result.retrieval["seen phrasings"] = retrieval_accuracy(glider, limit=args.limit)
        result.retrieval["unseen phrasings"] = retrieval_accuracy(glider, limit=args.limit, unseen=True)
    result.config["seconds"] = round(time.time() - t0, 1)
    result.config["command"] = "python -m moerge.eval " + " ".join(argv if argv is not None else __import__(
        "sys").argv[1:])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(result.to_json(), indent=2))
    md = to_markdown(result)
    (out / "eval.md").write_text(md + "\n")
    print(md)
    print(f"saved {out / 'eval.json'} and {out / 'eval.md'} ({result.config['seconds']} s)")


if __name__ == "__main__":
    main()
