"""The expert zoo: one LoRA expert per held-in task, trained with PEFT on the default base.

``python -m moerge.lab.zoo build`` trains the experts that the library does not hold yet (so an interrupted build
resumes where it stopped) and stores each with its description and example prompts. Training is reproducible
from ``--seed``. The committed zoo lives in ``zoo/library`` at the repository root.
"""

from __future__ import annotations

import argparse
import copy
import random
import time
from pathlib import Path
from typing import Any

import torch

from moerge.lab.tasks import HELD_IN, Example, get_task, routing_examples
from moerge.library import ExpertLibrary
from moerge.routing.training import chat_prompt, collate, encode_pair, fit, seeded

__all__ = ["ZooConfig", "build_zoo", "build_gates", "build_lda", "build_xlora", "chat_prompt", "encode_example", "DEFAULT_ZOO"]

DEFAULT_ZOO = Path(__file__).resolve().parents[2] / "zoo" / "library"
EXAMPLES_PER_EXPERT = 12  # example prompts stored with each expert, in the training phrasings and styles (the
# global router retrieves by them; local gates compute their routing data from them)


class ZooConfig:
    """Training settings of the zoo (all recorded in each expert's metadata)."""

    def __init__(self, rank: int = 4, alpha: float = 16.0, steps: int = 60, batch_size: int = 16, lr: float = 5e-3,
                 target_modules: str | list[str] = "all-linear", seed: int = 0, dtype: str = "bfloat16",
                 warmup: int = 5, bf16: bool = True) -> None:
        if rank <= 0 or steps <= 0 or batch_size <= 0 or not lr > 0:
            raise ValueError(f"rank, steps, batch_size and lr must be positive: got rank={rank!r}, steps={steps!r}, "
                             f"batch_size={batch_size!r}, lr={lr!r}")
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
        self.rank, self.alpha, self.steps, self.batch_size, self.lr = rank, alpha, steps, batch_size, lr
        self.target_modules, self.seed, self.dtype, self.warmup = target_modules, seed, dtype, warmup
        self.bf16 = bf16  # the forward under bfloat16 autocast (the LoRA factors train in float32)

    def to_json(self) -> dict[str, Any]:
        return dict(vars(self))


def encode_example(tokenizer: Any, ex: Example) -> tuple[list[int], list[int]]:
    """Token ids of prompt + answer + end of turn, and labels that score the answer and its end-of-turn token
    (:func:`~moerge.routing.training.encode_pair`)."""
    return encode_pair(tokenizer, ex.prompt, ex.target)


def train_expert(base: torch.nn.Module, tokenizer: Any, task: str, cfg: ZooConfig, progress: bool = True):
    """Train one LoRA expert for ``task`` on a copy of ``base`` (PEFT's LoRA, the one training loop
    :func:`~moerge.routing.training.fit`: Adam with warm-up and cosine decay, gradients clipped
    at norm 1); returns ``(peft_model, losses)``."""
    from peft import LoraConfig, get_peft_model

    copied = copy.deepcopy(base)
    copied.config._attn_implementation = "eager"  # the same attention; its backward is the faster one on CPU
    with seeded(cfg.seed):  # the LoRA factors' initial values are drawn from the seed
        model = get_peft_model(copied, LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.0,
                                                               target_modules=cfg.target_modules))
    params = [p for p in model.parameters() if p.requires_grad]
    examples = get_task(task).examples(cfg.steps * cfg.batch_size, "train", cfg.seed)
    size = cfg.batch_size
    batches = (collate(tokenizer, [(e.prompt, e.target) for e in examples[s * size : (s + 1) * size]])
               for s in range(cfg.steps))
    losses = fit(model, params, batches, steps=cfg.steps, lr=cfg.lr, warmup=cfg.warmup, clip_norm=1.0, seed=cfg.seed,
                 progress=progress, desc=f"train {task}", bf16=cfg.bf16)
    return model, losses


def build_zoo(library: str | Path = DEFAULT_ZOO, tasks: list[str] | None = None, cfg: ZooConfig | None = None,
              *, base: Any = None, tokenizer: Any = None, progress: bool = True, log=print) -> ExpertLibrary:
    """Train (with PEFT) and store one LoRA expert per task that ``library`` does not hold yet."""
    from moerge.adapters.peft_loader import load_peft_lora
    from moerge.lab.defaults import default_base

    cfg = cfg or ZooConfig()
    tasks = list(tasks or HELD_IN)
    if base is None:
        base, tokenizer = default_base()
    base.requires_grad_(False)
    lib = ExpertLibrary.create(library, base_model=base, exist_ok=True)
    todo = [t for t in tasks if t not in lib]
    log(f"zoo {lib.root}: {len(lib)} experts present, training {len(todo)}: {todo}")
    dtype = getattr(torch, cfg.dtype)
    for task in todo:
        t0 = time.time()
        model, losses = train_expert(base, tokenizer, task, cfg, progress)
        tmp = Path(lib.root).parent / f".adapter-{task}"
        model.save_pretrained(str(tmp))
        t = get_task(task)
        examples = [e.prompt for e in routing_examples(task, EXAMPLES_PER_EXPERT, cfg.seed + 99)]
        expert = load_peft_lora(tmp, name=task, description=t.description, examples=examples, dtype=dtype)
        expert.metadata.source.update({"type": "zoo", "task": task, "train": cfg.to_json(),
                                       "loss_first": losses[0], "loss_last": sum(losses[-5:]) / len(losses[-5:])})
        expert.metadata.source.pop("path", None)
        lib.add(expert)
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        log(f"  {task:<24} loss {losses[0]:.3f} -> {expert.metadata.source['loss_last']:.3f} "
            f"in {time.time() - t0:.0f} s")
    return lib


def build_gates(library: str | Path = DEFAULT_ZOO, *, steps: int = 100, batch_size: int = 4, lr: float = 1e-2,
                seed: int = 0, base: Any = None, tokenizer: Any = None, progress: bool = True, force: bool = False,
                negatives: bool = True, log=print) -> ExpertLibrary:
    """Train and store the PHATGOOSE gate vectors of every zoo expert that has none for its current weights (each
    on its own task's training examples, with ``negatives`` the other tasks' too, to close on: the contrastive
    recipe, stored as the gates of ``PhatgooseConfig(negatives=8)``; else as the paper's: post hoc, one expert at a
    time, no other expert's gates retrained)."""
    from moerge.lab.defaults import default_base
    from moerge.routers.phatgoose import routing_kind, train_phatgoose_gates

    if base is None:
        base, tokenizer = default_base()
    lib = ExpertLibrary.open(library)
    kind = routing_kind(8 if negatives else 0)
    for name in lib.names():
        expert = lib.get(name)
        digest = expert.digest()
        if not force and lib.routing_for(name, kind, digest) is not None:
            continue
        task = expert.metadata.source.get("task", name)
        t0 = time.time()
        pairs = [(e.prompt, e.target) for e in get_task(task).examples(steps * batch_size, "train", seed + 500)]
        others = [x for x in HELD_IN if x != task] if negatives else []  # examples for the gates to close on
        per = -(-len(pairs) // max(len(others), 1))
        closing = [(e.prompt, e.target) for x in others for e in get_task(x).examples(per, "train", seed + 600)]
        gates, losses = train_phatgoose_gates(base, tokenizer, expert, pairs, steps=steps, lr=lr,
                                              batch_size=batch_size, seed=seed, progress=progress,
                                              negatives=closing)
        small = {m: g.to(torch.bfloat16) for m, g in gates.items()}  # bf16: routing data stays small on disk
        lm = losses[::2] if closing else losses  # with negatives every other step is the closing loss
        lib.put_routing(name, kind, small, {"digest": digest, "steps": steps, "batch_size": batch_size, "lr": lr,
                                            "negatives": len(closing), "loss_first": lm[0], "loss_last": lm[-1],
                                            "closing_last": losses[1::2][-1] if closing else None})
        log(f"  gates {name:<20} ({kind}) loss {lm[0]:.4f} -> {lm[-1]:.4f} in {time.time() - t0:.0f} s")
    return lib


def build_lda(library: str | Path = DEFAULT_ZOO, *, base: Any = None, tokenizer: Any = None, force: bool = False,
              positions: str = "answer", with_expert: bool = True, log=print) -> ExpertLibrary:
    """Compute and store the LDA router's statistics of every zoo expert that has none for its current weights
    (from its stored example prompts, as the router does for any expert added); ``force``: of every expert (after a
    change to how they are computed); ``with_expert=False``: of the base alone (``lda_prompt``'s)."""
    from moerge.lab.defaults import default_base
    from moerge.routers.lda import LDAConfig, LDARouter
    from moerge.runtime.model import MoErgeModel

    if base is None:
        base, tokenizer = default_base()
    t0 = time.time()
    router = LDARouter(LDAConfig(positions=positions, with_expert=with_expert))
    if force:  # dropped, so the router computes them again as for any expert it takes in
        lib = ExpertLibrary.open(library)
        for name in lib.names():
            lib.drop_routing(name, router.routing_kind)
    model = MoErgeModel.from_library(base, library, router=router, tokenizer=tokenizer, follow=False)
    model.wait_routing()
    model.close()
    log(f"  lda statistics of {len(model.experts)} experts in {time.time() - t0:.0f} s")
    return ExpertLibrary.open(library)


def build_xlora(library: str | Path = DEFAULT_ZOO, *, steps: int = 60, batch_size: int = 8, lr: float = 1e-2,
                seed: int = 0, base: Any = None, tokenizer: Any = None, progress: bool = True,
                log=print) -> ExpertLibrary:
    """Train the X-LoRA-style head jointly for every zoo expert, on a mix of their tasks' training examples, and
    store each expert's rows in the library."""
    from moerge.lab.defaults import default_base
    from moerge.routers.xlora import ROUTING_KIND, rows_to_tensors, train_xlora_head

    if base is None:
        base, tokenizer = default_base()
    lib = ExpertLibrary.open(library)
    experts = [lib.get(n) for n in lib.names()]
    per_task = max(1, steps * batch_size // max(len(experts), 1))
    pairs = [(e.prompt, e.target) for x in experts
             for e in get_task(x.metadata.source.get("task", x.name)).examples(per_task, "train", seed + 700)]
    t0 = time.time()
    rows, losses = train_xlora_head(base, tokenizer, experts, pairs, steps=steps, lr=lr, batch_size=batch_size,
                                    seed=seed, progress=progress)
    for x in experts:
        small = {k: v.to(torch.bfloat16) for k, v in rows_to_tensors(rows[x.name]).items()}
        lib.put_routing(x.name, ROUTING_KIND, small,
                        {"digest": x.digest(), "steps": steps, "batch_size": batch_size, "lr": lr,
                         "peers": [e.name for e in experts]})
    log(f"  x-lora head over {len(experts)} experts: loss {losses[0]:.4f} -> {sum(losses[-5:]) / 5:.4f} "
        f"in {time.time() - t0:.0f} s")
    return lib


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m moerge.lab.zoo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="train the experts the zoo library does not hold yet")
    b.add_argument("--library", default=str(DEFAULT_ZOO))
    b.add_argument("--tasks", default=",".join(HELD_IN), help="comma-separated task names")
    b.add_argument("--rank", type=int, default=4)
    b.add_argument("--alpha", type=float, default=16.0)
    b.add_argument("--steps", type=int, default=60)
    b.add_argument("--batch-size", type=int, default=16)
    b.add_argument("--lr", type=float, default=5e-3)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--dtype", default="bfloat16")
    g = sub.add_parser("gates", help="train the PHATGOOSE gates of the zoo's experts that have none")
    g.add_argument("--library", default=str(DEFAULT_ZOO))
    g.add_argument("--steps", type=int, default=100,
                   help="Adam steps per expert (dev split, contrastive recipe: 30 steps identified 30.0%% of the "
                        "deep layers' answer tokens and made 18.8 exact match, 100 steps 37.3%% and 28.1)")
    g.add_argument("--batch-size", type=int, default=4)
    g.add_argument("--force", action="store_true", help="retrain gates that are already stored")
    g.add_argument("--negatives", type=int, default=1, choices=(0, 1),
                   help="1: the contrastive recipe, the other tasks' examples as negatives (router option negatives=8); "
                        "0: the paper's recipe")
    g.add_argument("--lr", type=float, default=1e-2)
    g.add_argument("--seed", type=int, default=0)
    ld = sub.add_parser("lda", help="compute the LDA router's statistics of the zoo's experts that have none")
    ld.add_argument("--library", default=str(DEFAULT_ZOO))
    ld.add_argument("--force", action="store_true", help="recompute the statistics already stored")
    ld.add_argument("--positions", default="answer", choices=("answer", "all"),
                    help="'answer': LDA alone's statistics; 'all': those of GLIDER's local gate")
    ld.add_argument("--base-only", action="store_true",
                    help="of the base alone, without the expert (with --positions all: those of lda_prompt)")
    x = sub.add_parser("xlora", help="train the X-LoRA-style head jointly over the zoo's experts")
    x.add_argument("--library", default=str(DEFAULT_ZOO))
    x.add_argument("--steps", type=int, default=60)
    x.add_argument("--batch-size", type=int, default=8)
    x.add_argument("--lr", type=float, default=1e-2)
    x.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.cmd == "lda":
        build_lda(args.library, force=args.force, positions=args.positions, with_expert=not args.base_only)
        return
    if args.cmd == "xlora":
        build_xlora(args.library, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
        return
    if args.cmd == "gates":
        build_gates(args.library, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                    force=args.force, negatives=bool(args.negatives))
        return
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    cfg = ZooConfig(rank=args.rank, alpha=args.alpha, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                    seed=args.seed, dtype=args.dtype)
    build_zoo(args.library, [t for t in args.tasks.split(",") if t], cfg)


if __name__ == "__main__":
    main()
