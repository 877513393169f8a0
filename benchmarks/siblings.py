"""What sibling modules sharing one gate-and-shrink step (moerge/runtime/siblings.py) saves on a CPU decode step.

Two decode loops over the same prompt run side by side, one step each in turn — the routed model with its sibling
groups, the same model with them cleared (every module stepping alone), and the base model — so a shared
machine's drift falls on all three alike; printed: the medians of the per-step times and of the per-step ratios.

    python benchmarks/siblings.py [--experts 16] [--batch 1] [--steps 60] [--router glider]
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
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    base, tok = default_base()
    model = MoErgeModel(copy.deepcopy(base), build_router("glider", candidates=4, local="arrow", top_k=2),
                        tokenizer=tok)
    model.expert_set.install(random_lora_experts(base, args.experts), model.router)
    ids = torch.randint(3, base.config.vocab_size, (args.batch, args.prompt))
    groups = model.expert_set.siblings.group_of
    times: dict[str, list[float]] = {"base": [], "shared": [], "alone": []}
    with torch.inference_mode():
        loops = {}
        for name, m in (("base", base), ("shared", model), ("alone", model)):
            state = model.route(input_ids=ids) if m is model else None
            loops[name] = [m.base if m is model else m, state, None, None]
        for loop in loops.values():  # the prompts (the first one shows the groups)
            with model.context.activate(loop[1]) if loop[1] is not None else contextlib.nullcontext():
                out = loop[0](input_ids=ids, use_cache=True)
            loop[2], loop[3] = out.past_key_values, out.logits[:, -1:].argmax(-1)
        saved = dict(groups)
        for _ in range(args.steps):
            for name, loop in loops.items():
                groups.clear()
                if name == "shared":
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
          f"({torch.get_num_threads()} threads); {default_base_label()}; GLIDER K=4 + Arrow top-2 over "
          f"{args.experts} random rank-8 all-linear experts; batch {args.batch}; {len(set(saved.values()))} groups")
    print(f"decode step: base {med['base'] * 1e3:.1f} ms, routed with shared sibling steps {med['shared'] * 1e3:.1f} "
          f"ms, each module alone {med['alone'] * 1e3:.1f} ms")
    print(f"÷ base (median of per-step ratios): shared {ratio('base', 'shared'):.3f}, alone "
          f"{ratio('base', 'alone'):.3f}; shared ÷ alone time {ratio('shared', 'alone'):.3f}")


if __name__ == "__main__":
    main()
