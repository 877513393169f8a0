"""A library larger than memory: experts read on demand under a byte budget, against every expert in memory.

Makes (once, in ``--library``; not committed) a library of ``--experts`` random rank-``--rank`` experts on every
linear module of the default base (SmolLM2-135M-Instruct), then measures, in one run on this machine:

* open + ``from_library`` time, lazy (what is read: the manifest and each expert's ``expert.json``) and, with
  ``--resident``, with every expert read at once (``pin=`` all: how a library was held before);
* RSS after the first requests, against the base alone and the budget (``--cache-mib``);
* the first token of a request whose K=``--k`` candidates are cold (their files dropped from the page cache with
  ``posix_fadvise``, so read from disk) and warm (in the cache), and with every expert resident;
* steady decode (``--new-tokens`` greedy tokens, candidates resident) against the all-resident model.

Requests name their candidates (``experts=``, K random experts with equal weights), so what is measured is the
runtime's reading and mixing of experts, not a router's choice.

    python benchmarks/cache.py --experts 1000 --resident       # ~9.3 GB of experts, ~10 GB of RAM with --resident
    python benchmarks/cache.py --experts 10000 --rank 8 --modules q_proj,v_proj --library /tmp/cb10k
                                  # open time at 10,000 experts (made 200 at a time with add_many)
    python benchmarks/cache.py --experts 200 --device cuda --device-cache-mib 64
                                  # two tiers: the banks on the GPU within 64 MiB, host memory within --cache-mib

With ``--device cuda`` the base and the banks are on the GPU (``device_cache_bytes``) and ``--cache-mib`` is the host
tier's budget; it also times the first token of requests whose candidates were dropped from the GPU but kept in host
memory (copied back, not read from disk).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from moerge import Expert, ExpertLibrary, ExpertMetadata, LoRAWeights, MoErgeModel
from moerge.core.fingerprint import linear_modules
from moerge.lab.defaults import default_base, default_base_label


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def make_library(path: Path, n: int, rank: int, modules: list[str] | None) -> ExpertLibrary:
    base, _ = default_base()
    if (path / "library.json").exists():
        lib = ExpertLibrary.open(path)
        if len(lib) >= n:
            return lib
    else:
        lib = ExpertLibrary.create(path, base_model=base, max_rank=max(rank, 8))
    shapes = {m: s for m, s in linear_modules(base).items()
              if m != "lm_head" and (modules is None or m.rsplit(".", 1)[-1] in modules)}
    t = time.perf_counter()

    def expert(i: int) -> Expert:
        g = torch.Generator().manual_seed(i)
        mods = {m: LoRAWeights(torch.randn(rank, fin, generator=g) / fin ** 0.5,
                               torch.randn(fout, rank, generator=g) * 0.01, 2.0) for m, (fout, fin) in shapes.items()}
        return Expert(f"x{i:05d}", mods, ExpertMetadata(description=f"random expert {i}"))

    for start in range(len(lib), n, 200):  # one commit per 200 experts: add() rewrites the manifest per expert
        lib.add_many(expert(i) for i in range(start, min(start + 200, n)))
        print(f"  made {min(start + 200, n)}/{n} experts ({time.perf_counter() - t:.0f} s)", file=sys.stderr)
    return lib


def drop_from_page_cache(lib: ExpertLibrary, names: list[str]) -> None:
    for n in names:
        fd = os.open(lib.root / "experts" / n / "weights.safetensors", os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def first_token_s(model, enc, mix) -> float:
    t = time.perf_counter()
    model.generate(**enc, max_new_tokens=1, do_sample=False, experts=mix)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--library", type=Path, default=Path("/tmp/moerge-cache-bench"))
    ap.add_argument("--experts", type=int, default=1000)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--modules", default="", help="module name ends to target (default: every linear module)")
    ap.add_argument("--cache-mib", type=int, default=256)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--requests", type=int, default=20, help="requests with cold candidates (and as many warm)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--resident", action="store_true", help="also measure a model holding every expert")
    ap.add_argument("--device", default="cpu", help="where the base and the banks are (cuda: two tiers)")
    ap.add_argument("--device-cache-mib", type=int, default=64, help="the banks' budget on an accelerator")
    args = ap.parse_args(argv)
    gpu = args.device != "cpu"
    torch.manual_seed(0)
    lib = make_library(args.library, args.experts, args.rank, args.modules.split(",") if args.modules else None)
    names = lib.names()[: args.experts]
    base, tok = default_base(device=args.device)
    enc = tok([tok.apply_chat_template([{"role": "user", "content": "Write the numbers from one to ten in words."}],
                                       tokenize=False, add_generation_prompt=True)], return_tensors="pt").to(args.device)
    for _ in range(2):  # the base's own generation buffers belong to the baseline
        base.generate(**enc, max_new_tokens=args.new_tokens, do_sample=False)
    gc.collect()
    rss_base = rss_mib()
    budget = args.cache_mib << 20
    t = time.perf_counter()
    lib = ExpertLibrary.open(args.library)
    model = MoErgeModel.from_library(base, lib, router="fixed", tokenizer=tok, follow=False, cache_bytes=budget,
                                     experts=names,
                                     device_cache_bytes=(args.device_cache_mib << 20) if gpu else None)
    open_s = time.perf_counter() - t
    sizes = model.expert_set.cache.sizes
    rng = random.Random(0)
    mixes = [{n: 1.0 / args.k for n in rng.sample(names, args.k)} for _ in range(args.requests)]
    first_token_s(model, enc, {names[0]: 1.0})  # warm-up: the call path, not the experts
    cold = []
    for mix in mixes:
        drop_from_page_cache(lib, list(mix))
        cold.append(first_token_s(model, enc, mix))
    warm_mix = mixes[-1]
    warm = [first_token_s(model, enc, warm_mix) for _ in range(args.requests)]
    book = model.expert_set.cache
    from_host = [first_token_s(model, enc, mix) for mix in mixes[::-1]  # dropped from the GPU, kept in host memory
                 if gpu and not any(book.is_resident(n) for n in mix) and all(n in book.host.held for n in mix)]
    gc.collect()
    rss_after = rss_mib()
    stats = model.cache_stats()

    def decode_s(m) -> float:
        m.generate(**enc, max_new_tokens=2, do_sample=False, experts=warm_mix)
        t = time.perf_counter()
        m.generate(**enc, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                   experts=warm_mix)
        return time.perf_counter() - t

    lazy_decode = statistics.median(decode_s(model) for _ in range(3))
    print(f"command: python {' '.join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{default_base_label()} fp32 on {args.device}")
    lib_bytes = sum(sizes[n] for n in names)
    print(f"library: {len(names)} rank-{args.rank} experts, {lib_bytes / 2**30:.2f} GiB of factors "
          f"({lib_bytes / len(names) / 2**20:.1f} MiB each); budget {args.cache_mib} MiB")
    print(f"open + from_library (lazy): {open_s:.2f} s")
    print(f"RSS: base alone (after generating) {rss_base:.0f} MiB; after {2 * args.requests + 6} requests {rss_after:.0f} MiB "
          f"(+{rss_after - rss_base:.0f} MiB; budget {args.cache_mib} MiB, target ≤ +{args.cache_mib * 1.1:.0f})")
    print(f"cache: {stats.resident} experts resident, {stats.resident_bytes / 2**20:.0f} MiB, {stats.misses} misses, "
          f"{stats.hits} hits, {stats.evictions} evictions, {stats.load_seconds:.2f} s reading")
    c, w = statistics.median(cold), statistics.median(warm)
    print(f"first token, K={args.k}: cold candidates (from disk) median "
          f"{c * 1e3:.0f} ms, slowest {max(cold) * 1e3:.0f} ms; warm {w * 1e3:.0f} ms; cold adds {(c - w) * 1e3:.0f} ms "
          "(target ≤ 50)")
    if gpu:
        print(f"two tiers: banks within {args.device_cache_mib} MiB on {args.device}, host tier {stats.host_resident} "
              f"experts, {stats.host_bytes / 2**20:.0f} MiB, {stats.host_hits} misses of the banks served from it")
        if from_host:
            h = statistics.median(from_host)
            print(f"first token, K={args.k}: candidates dropped from {args.device} and kept in host memory median "
                  f"{h * 1e3:.0f} ms over {len(from_host)} requests; adds {(h - w) * 1e3:.0f} ms to warm")
    print(f"decode, {args.new_tokens} tokens, K={args.k} resident: lazy model {lazy_decode:.2f} s")
    if args.resident:
        del model
        gc.collect()
        t = time.perf_counter()
        full = MoErgeModel.from_library(default_base(device=args.device)[0], ExpertLibrary.open(args.library), router="fixed",
                                        tokenizer=tok, follow=False, pin=names, experts=names)
        full_open = time.perf_counter() - t
        gc.collect()
        full_rss = rss_mib()
        first_token_s(full, enc, warm_mix)
        full_first = statistics.median(first_token_s(full, enc, warm_mix) for _ in range(args.requests))
        full_decode = statistics.median(decode_s(full) for _ in range(3))
        print(f"every expert resident: open + from_library {full_open:.1f} s ({full_open / open_s:.0f}x the lazy "
              f"one), RSS {full_rss:.0f} MiB (two bases loaded), first token {full_first * 1e3:.0f} ms, decode "
              f"{full_decode:.2f} s; lazy decode / resident decode {lazy_decode / full_decode:.3f} (target ≤ 1.03)")


if __name__ == "__main__":
    main()
