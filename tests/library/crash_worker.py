"""A process that changes an expert library without end (add, overwrite, remove, routing data, index saves), to
be killed at a random moment by tests/test_reliability.py. Usage: python crash_worker.py LIBRARY SEED SHAPES_JSON"""

from __future__ import annotations

import json
import random
import sys

import numpy as np
import torch

from moerge.adapters.expert import Expert, LoRAWeights
from moerge.library import ExpertLibrary
from moerge.library.index import ExpertIndex


def expert(name: str, shapes: dict, seed: int) -> Expert:
    g = torch.Generator().manual_seed(seed)
    return Expert(name, {m: LoRAWeights(torch.randn(4, i, generator=g), torch.randn(o, 4, generator=g), 2.0)
                         for m, (o, i) in shapes.items()})


def main() -> None:
    root, seed, shapes = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    adds_only = int(sys.argv[4]) if len(sys.argv) > 4 else 0  # > 0: add this many experts, then stop
    lib = ExpertLibrary.open(root)
    rng = random.Random(seed)
    print("ready", flush=True)
    i = 0
    while adds_only:
        i += 1
        lib.add(expert(f"p{seed}-{i}", shapes, seed * 1000 + i))
        if i == adds_only:
            return
    while True:
        i += 1
        names = lib.names()
        op = rng.random()
        if op < 0.4 or len(names) < 2:
            lib.add(expert(f"w{seed}-{i}", shapes, seed * 1000 + i))
        elif op < 0.55:
            lib.add(expert(rng.choice(names), shapes, seed * 1000 + i), overwrite=True)
        elif op < 0.7:
            lib.remove(rng.choice(names))
        elif op < 0.85:
            lib.put_routing(rng.choice(names), "test", {"v": torch.randn(8)}, {"i": i})
        else:
            idx = ExpertIndex(8)
            for n in names:
                v = np.random.default_rng(i).standard_normal((1, 8)).astype(np.float32)
                idx.add(n, v / np.linalg.norm(v))
            with lib.locked():
                idx.save(lib.routing_dir / "index")


if __name__ == "__main__":
    main()
