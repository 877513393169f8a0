"""How soon a running model sees an expert another process adds to (or removes from) its library folder.

A model loaded with ``follow=True`` serves greedy calls in a loop while a second process adds experts to the
library and removes them, one at a time. Printed per change: the delay from the manifest switch (the new
``library.json``'s mtime, read by the writing process right after its change) to the moment the expert is usable
(or gone) in the running model, then the median and the slowest, against the 1 s target. The delay is the
follower's polling interval plus loading the expert and preparing its routing data. A router that must train
routing data for an expert that has none stored (PHATGOOSE, X-LoRA) takes the expert in at once with
``--train-routing background`` (usable by name, its data trained meanwhile: the time until it is routed is printed
too) and adds its training time with ``--train-routing now``.

    python benchmarks/follow.py                       # a small random Llama, the arrow router
    python benchmarks/follow.py --router glider --changes 10
    python benchmarks/follow.py --router phatgoose --train-routing background
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from moerge import Expert, ExpertLibrary, ExpertMetadata, LoRAWeights, MoErgeModel
from moerge.core.fingerprint import linear_modules
from moerge.routers import build_router

WRITER = """
import os, sys
from moerge import ExpertLibrary
lib, staged = ExpertLibrary.open(sys.argv[1]), ExpertLibrary.open(sys.argv[2])
for line in sys.stdin:
    op, name = line.split()
    lib.add(staged.get(name)) if op == "add" else lib.remove(name)
    print(os.stat(lib.root / "library.json").st_mtime_ns, flush=True)
"""


def _expert(base: torch.nn.Module, name: str, seed: int, rank: int = 8) -> Expert:
    g = torch.Generator().manual_seed(seed)
    mods = {m: LoRAWeights(torch.randn(rank, i, generator=g) / i ** 0.5, torch.randn(o, rank, generator=g) / rank, 2.0)
            for m, (o, i) in linear_modules(base).items() if m.endswith(("q_proj", "v_proj"))}
    return Expert(name, mods, ExpertMetadata(description=f"expert {name} for topic {seed}",
                                             examples=[f"topic {seed}: a b c", f"topic {seed}: d e"]))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--router", default="arrow", help="the running model's router")
    ap.add_argument("--changes", type=int, default=6, help="experts added (and then removed) by the other process")
    ap.add_argument("--experts", type=int, default=8, help="experts in the library at the start")
    ap.add_argument("--interval", type=float, default=0.2, help="the follower's polling interval, seconds")
    ap.add_argument("--train-routing", default="background", choices=["now", "background"],
                    help="routing data the library lacks: trained before an expert is visible, or meanwhile")
    ap.add_argument("--train-steps", type=int, default=40, help="training steps of routing data (PHATGOOSE, X-LoRA)")
    args = ap.parse_args(argv)
    print("$ python benchmarks/follow.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads")

    from transformers import LlamaConfig, LlamaForCausalLM

    from moerge.lab.defaults import default_tokenizer  # the default base's tokenizer (a chat template)

    tok = default_tokenizer()
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()
    with tempfile.TemporaryDirectory() as d:
        lib = ExpertLibrary.create(Path(d) / "lib", base_model=base)
        staged = ExpertLibrary.create(Path(d) / "staged", base_model=base)
        for i in range(args.experts):
            lib.add(_expert(base, f"e{i}", i))
        names = [f"new{i}" for i in range(args.changes)]
        for i, n in enumerate(names):
            staged.add(_expert(base, n, 1000 + i))
        options = {"glider": {"local": "arrow"}, "phatgoose": {"train_steps": args.train_steps},
                   "xlora": {"train_steps": args.train_steps}}.get(args.router, {})
        model = MoErgeModel.from_library(base, lib, router=build_router(args.router, **options), tokenizer=tok,
                                         follow=False, train_routing=args.train_routing)
        model.wait_routing()  # the library's own experts trained first, when they must be
        follower = model.follow_library(interval=args.interval)
        stop = threading.Event()
        ids = torch.randint(3, len(tok), (1, 16))

        def serve() -> None:
            while not stop.is_set():
                model.generate(input_ids=ids, max_new_tokens=8, do_sample=False, experts={"e0": 1.0})

        server = threading.Thread(target=serve, daemon=True)
        server.start()
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(lib.root), str(staged.root)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        delays: dict[str, list[float]] = {"add": [], "remove": [], "routed": []}
        phase = random.Random(0)
        for op, n in [("add", n) for n in names] + [("remove", n) for n in names]:
            time.sleep(phase.uniform(0, args.interval))  # changes fall anywhere in the follower's polling cycle
            writer.stdin.write(f"{op} {n}\n")
            writer.stdin.flush()
            switched = int(writer.stdout.readline())
            want = op == "add"
            if not follower.wait(lambda n=n, want=want: (n in model.experts) == want, timeout=600):
                raise SystemExit(f"{op} {n}: not seen after 600 s (errors: {model.library_errors})")
            delays[op].append((time.time_ns() - switched) / 1e9)
            if want:
                while n in model.pending_routing:  # the routing data trained in the background
                    time.sleep(0.01)
                if n in model.routing_errors:
                    raise SystemExit(f"{n}: its routing data could not be trained: {model.routing_errors[n]}")
                delays["routed"].append((time.time_ns() - switched) / 1e9)
        writer.stdin.close()
        writer.wait()
        stop.set()
        server.join()
        model.close()
    print(f"router {args.router}, train_routing={args.train_routing}, {args.experts} experts at the start, polling "
          f"every {args.interval:.2f} s, one thread generating meanwhile")
    what = {"add": "usable by name", "remove": "gone", "routed": "routed (its routing data in)"}
    for op, ds in delays.items():
        print(f"{op:>7}: manifest switch → {what[op]}: median {statistics.median(ds):.3f} s, slowest "
              f"{max(ds):.3f} s ({max(ds) / 1.0:.2f}× the 1 s target) over {len(ds)} changes")


if __name__ == "__main__":
    main()
