"""Benchmark: the global router's retrieval for one prompt over a library of 10,000 experts.

Measures, per prompt (batch of 1, the serving case): embedding the prompt with all-MiniLM-L6-v2 (float32 and
int8 weights), and the FAISS top-K search over the experts' vectors with the exact index (IndexFlatIP) and the
approximate one (HNSW). Each expert is one vector by default (GLIDER's ``expert_vectors="centroid"``); pass
``--per-expert 6`` for ``"each"`` with a description and 5 example prompts. The LLM description step is excluded
(the default router embeds the prompt itself). Expert vectors are random unit vectors: the search cost depends on
their number and dimension, not their values. Prints the command, the machine and each time as a ratio to the
5 ms target. The last row of each index times :meth:`ExpertRetriever.retrieve` (embedding with the default
int8 embedder, then the search), the path the global router takes.

    python benchmarks/retrieval.py [--experts 10000] [--per-expert 1] [--k 3] [--repeat 200]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np


def _time(fn, repeat: int) -> float:
    fn()  # warm up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=10_000)
    ap.add_argument("--per-expert", type=int, default=1)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=200)
    ap.add_argument("--target-ms", type=float, default=5.0)
    args = ap.parse_args(argv)

    import torch

    from moerge.library.index import ExpertIndex
    from moerge.routing.embed import default_sentence_embedder
    from moerge.routing.retrieval import ExpertRetriever, RetrievalConfig

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    print(f"command: python {' '.join(sys.argv)}")
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs, torch threads "
          f"{torch.get_num_threads()}, python {platform.python_version()}")
    emb = default_sentence_embedder()
    emb8 = default_sentence_embedder(quantize=True)
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((args.experts * args.per_expert, emb.dim)).astype(np.float32)
    prompt = "Arrange these numbers from the smallest to the largest: 42, 7, 19, 3."
    embeds = [("float32", _time(lambda: emb.encode([prompt]), args.repeat)),
              ("int8", _time(lambda: emb8.encode([prompt]), args.repeat))]
    q = emb.encode([prompt])
    rows = []
    for label, threshold in (("exact (IndexFlatIP)", 10**12), ("approximate (HNSW)", 0)):
        idx = ExpertIndex(emb.dim, emb.id, approx_threshold=threshold)
        t0 = time.perf_counter()
        for e in range(args.experts):
            idx.add(f"e{e}", vecs[e * args.per_expert : (e + 1) * args.per_expert])
        idx.search(q, args.k)  # builds the FAISS index
        build = time.perf_counter() - t0
        t_search = _time(lambda idx=idx: idx.search(q, args.k), args.repeat)
        retriever = ExpertRetriever(RetrievalConfig(embedder=emb8))  # the global router's path, default embedder
        retriever.index = idx
        t_retrieve = _time(lambda r=retriever: r.retrieve([prompt], args.k), args.repeat)
        rows.append((label, build, t_search, t_retrieve))
    print(f"experts: {args.experts} × {args.per_expert} vectors of dimension {emb.dim}, top-{args.k}, median of "
          f"{args.repeat}")
    print(f"{'step':<34} {'ms':>8} {'÷ target':>9}")
    for label, t_embed in embeds:
        print(f"{f'embed the prompt (MiniLM, {label})':<34} {1e3 * t_embed:>8.2f} "
              f"{1e3 * t_embed / args.target_ms:>9.2f}")
    for label, build, t, t_retrieve in rows:
        print(f"{'search, ' + label:<34} {1e3 * t:>8.2f} {1e3 * t / args.target_ms:>9.2f}   (index built in "
              f"{build:.1f} s)")
        for elabel, t_embed in embeds:
            total = t_embed + t
            print(f"{f'  embed ({elabel}) + search':<34} {1e3 * total:>8.2f} {1e3 * total / args.target_ms:>9.2f}")
        print(f"{'  ExpertRetriever.retrieve (int8)':<34} {1e3 * t_retrieve:>8.2f} "
              f"{1e3 * t_retrieve / args.target_ms:>9.2f}")


if __name__ == "__main__":
    main()
