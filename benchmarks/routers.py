"""Benchmark: what each router adds to a request's latency on the zoo, as a ratio to GLIDER's in the same rounds.

One prompt per held-in task (test split), batch of 1, greedy, ``--new`` tokens (2 by default: the time to the
first tokens, where the routers' global stages weigh most). Each round times every router on the same prompt in
turn (each router on its own model: the default base, the committed zoo), so a shared machine's drift cancels in the ratios; the table
gives each router's median time and the median of its per-round ratio to ``glider``. ``lda_prompt`` runs one more
base forward over the prompt (its routing read); ``glider?local=none`` is GLIDER's global stage alone.

    python benchmarks/routers.py [--routers glider,glider?local=none,lda_prompt] [--rounds 3] [--new 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--routers", default="glider,glider?local=none,lda_prompt")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new", type=int, default=2)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from moerge.lab.defaults import default_base
    from moerge.lab.identify import parse_spec
    from moerge.lab.tasks import HELD_IN, get_task
    from moerge.lab.zoo import DEFAULT_ZOO
    from moerge.routers import build_router
    from moerge.routing.training import chat_prompt
    from moerge.runtime.model import MoErgeModel

    print("command:", "python benchmarks/routers.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    specs = [s for s in args.routers.split(",") if s]
    models = {}
    for s in specs:  # a model per router (one base each): switching routers would drop their built tables
        base, tok = default_base()
        name, config = parse_spec(s)
        models[s] = MoErgeModel.from_library(base, DEFAULT_ZOO, tokenizer=tok, router=build_router(name, **config))
    prompts = [chat_prompt(tok, get_task(t).examples(1, "test")[0].prompt) for t in HELD_IN]
    times: dict[str, list[float]] = {s: [] for s in specs}
    ratios: dict[str, list[float]] = {s: [] for s in specs}
    for s in specs:  # warm up: each router's routing data read, its tables built
        for p in prompts:
            b = tok([p], return_tensors="pt", add_special_tokens=False)
            models[s].generate(**b, max_new_tokens=args.new, do_sample=False)
    for _ in range(args.rounds):
        for p in prompts:
            b = tok([p], return_tensors="pt", add_special_tokens=False)
            got = {}
            for s in specs:
                t0 = time.perf_counter()
                models[s].generate(**b, max_new_tokens=args.new, do_sample=False)
                got[s] = time.perf_counter() - t0
            for s in specs:
                times[s].append(got[s])
                ratios[s].append(got[s] / got[specs[0]])
    print(f"\n{len(prompts)} prompts × {args.rounds} rounds, {args.new} new tokens, batch 1\n")
    print(f"| router | median latency | ratio to {specs[0]} (median of per-request ratios) |")
    print("| --- | ---: | ---: |")
    for s in specs:
        print(f"| {s} | {1000 * statistics.median(times[s]):.0f} ms | {statistics.median(ratios[s]):.2f}× |")


if __name__ == "__main__":
    main()
