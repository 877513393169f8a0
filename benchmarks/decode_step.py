"""A routed CPU decode step against the base's, by the way the routed part runs.

Decode loops over the same prompt run side by side, one step each in turn, so a shared machine's drift falls on
all alike: the base model; the routed model with the native step (moerge/runtime/native.py, the default); the
torch path with sibling modules sharing one gate-and-shrink step (moerge/runtime/siblings.py); and the torch path
with every module stepping alone. Printed: the medians of the per-step times and of the per-step ratios.

    python benchmarks/decode_step.py [--experts 16] [--batch 1] [--steps 60] [--candidates 4] [--top-k 2]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import platform
import statistics
import sys
import time

import torch

from moerge import MoErgeModel, build_router
from moerge.lab.bench import random_lora_experts
from moerge.lab.defaults import default_base, default_base_label


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--candidates", type=int, default=4, help="K: GLIDER's candidates per request")
    ap.add_argument("--top-k", type=int, default=2, help="Arrow's experts per token")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    base, tok = default_base()
    model = MoErgeModel(copy.deepcopy(base), build_router("glider", candidates=args.candidates, local="arrow",
                                                                 top_k=args.top_k),
                        tokenizer=tok)
    model.expert_set.install(random_lora_experts(base, args.experts), model.router)
    ids = torch.randint(3, base.config.vocab_size, (args.batch, args.prompt))
    groups = model.expert_set.siblings.group_of
    names = ("base", "native", "shared", "alone")
    times: dict[str, list[float]] = {n: [] for n in names}
    with torch.inference_mode():
        loops = {}
        for name in names:
            if name in ("shared", "alone"):  # routed on the torch path: the native step is off for these states
                os.environ["MOERGE_NO_KERNEL"] = "1"
            state = None if name == "base" else model.route(input_ids=ids)
            m = base if name == "base" else model.base
            with model.context.activate(state) if state is not None else contextlib.nullcontext():
                out = m(input_ids=ids, use_cache=True)  # the prompt (the first one shows the groups); steps decided
            os.environ.pop("MOERGE_NO_KERNEL", None)
            loops[name] = [m, state, out.past_key_values, out.logits[:, -1:].argmax(-1)]
        saved = dict(groups)
        for _ in range(args.steps):
            for name, loop in loops.items():
                groups.clear()
                if name != "alone":
                    groups.update(saved)
                with model.context.activate(loop[1]) if loop[1] is not None else contextlib.nullcontext():
                    t = time.perf_counter()
                    out = loop[0](input_ids=loop[3], past_key_values=loop[2], use_cache=True)
                    times[name].append(time.perf_counter() - t)
                loop[2], loop[3] = out.past_key_values, out.logits[:, -1:].argmax(-1)
        groups.update(saved)
    skip = min(5, args.steps // 4)
    med = {k: statistics.median(v[skip:]) for k, v in times.items()}
    ratio = lambda a, b: statistics.median(x / y for x, y in zip(times[a][skip:], times[b][skip:]))  # noqa: E731
    print(f"command: python {' '.join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); {default_base_label()}; GLIDER K={args.candidates} + Arrow "
          f"top-{args.top_k} over {args.experts} random rank-8 all-linear experts; batch {args.batch}; "
          f"{len(set(saved.values()))} sibling groups")
    print("decode step: " + ", ".join(f"{n} {med[n] * 1e3:.1f} ms" for n in names))
    print("÷ base (median of per-step ratios): " + ", ".join(f"{n} {ratio('base', n):.3f}" for n in names[1:]))


if __name__ == "__main__":
    main()
