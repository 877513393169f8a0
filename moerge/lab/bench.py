"""Benchmark: prefill and decode speed and memory of routed inference against the base model and PEFT.

Scenarios, each measured in the same process as the base model it is compared with:

* ``base``: the base model alone;
* ``peft-1``: PEFT with one LoRA adapter (rank ``r``, all linear layers);
* ``peft-mixed``: PEFT with ``mixed`` adapters loaded, each row of the batch naming its own (``adapter_names``);
* ``peft-xlora``: PEFT's X-LoRA over ``mixed`` adapters (it needs ``use_cache=False``: every decode step re-reads
  the whole sequence);
* ``moerge-N``: a library of ``N`` random rank-``r`` LoRA experts on all linear layers, GLIDER with ``K``
  candidates per request and Arrow top-``k`` gating per token (the global stage, the gathering of the candidates'
  factors and the per-token gate are all timed).

Prefill: tokens/s of one forward over ``prompt`` tokens per row. Decode: tokens/s of the following steps with the
KV cache (``(t(generate n) − t(generate 1)) / (n − 1)``). Ratios are to the base model timed in the same rounds
as the scenario (base, then scenario, ``repeat`` times; the median of the per-round ratios), so the drift of a
shared machine cancels. Memory: resident set size after the scenario ran, less the process's before the base was
loaded (CPU; it accumulates what earlier scenarios left), or the CUDA peak; the routed rows also give the size of
their experts' factors. Experts have random weights: speed does not depend on their values.

    python -m moerge.lab.bench [--experts 16,256,1000] [--batch 1,8] [--prompt 64] [--new 32] [--skip-peft]
    moerge bench ...
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["BenchResult", "run_bench", "random_lora_experts", "main"]


@dataclass
class BenchResult:
    scenario: str
    batch: int
    prefill_tps: float
    decode_tps: float
    memory_mb: float
    setup_s: float = 0.0
    notes: str = ""
    ratios: dict[str, float] = field(default_factory=dict)


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def random_lora_experts(base: nn.Module, n: int, rank: int = 8, seed: int = 0, dtype: torch.dtype = torch.float32,
                        name: str = "e") -> list[Any]:
    """``n`` random LoRA experts of rank ``rank`` on every linear module of ``base`` (lm_head excepted)."""
    from moerge import Expert, ExpertMetadata, LoRAWeights
    from moerge.core.fingerprint import linear_modules

    shapes = {m: s for m, s in linear_modules(base).items() if not m.endswith("lm_head")}
    g = torch.Generator().manual_seed(seed)
    out = []
    words = ["sort", "translate", "sql", "poem", "math", "json", "summarise", "classify", "extract", "code"]
    for i in range(n):
        mods = {m: LoRAWeights((torch.randn(rank, in_f, generator=g) / in_f ** 0.5).to(dtype),
                               (torch.randn(out_f, rank, generator=g) * 0.01).to(dtype), 2.0)
                for m, (out_f, in_f) in shapes.items()}
        desc = f"Expert {i}: {words[i % len(words)]} {words[(i // len(words)) % len(words)]} task number {i}."
        out.append(Expert(f"{name}{i}", mods, ExpertMetadata(description=desc, examples=[f"Please {desc}"])))
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _run(model: Any, batch: dict[str, torch.Tensor], n: int, device: torch.device, **kw: Any) -> float:
    """Seconds for one greedy ``generate`` of ``n`` new tokens."""
    _sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        model.generate(**batch, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, **kw)
    _sync(device)
    return time.perf_counter() - t0


def _measure(label: str, model: Any, batch: dict[str, torch.Tensor], new: int, repeat: int, device: torch.device,
             mem0: float, setup_s: float, notes: str = "", base: Any = None, **kw: Any) -> BenchResult:
    """Prefill tok/s (``generate`` of 1 token) and decode tok/s (``(t(new) − t(1)) / (new − 1)``), medians over
    ``repeat`` rounds after a warm-up. With ``base``, each round also times the base model just before the scenario
    (same batch, same lengths), and the ratios are the medians of the per-round ratios: drift of a shared machine
    cancels."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _run(model, batch, 2, device, **kw)  # warm-up
    if base is not None:
        _run(base, batch, 2, device)
    b, p = batch["input_ids"].shape
    rounds = []
    for _ in range(repeat):
        ref = (_run(base, batch, 1, device), _run(base, batch, new, device)) if base is not None else None
        rounds.append((_run(model, batch, 1, device, **kw), _run(model, batch, new, device, **kw), ref))
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    t1, tn = med([r[0] for r in rounds]), med([r[1] for r in rounds])
    mem = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else _rss_mb() - mem0
    out = BenchResult(label, b, prefill_tps=b * p / t1, decode_tps=b * (new - 1) / max(tn - t1, 1e-9),
                      memory_mb=mem, setup_s=setup_s, notes=notes)
    if base is not None:
        out.ratios = {"prefill": med([r[2][0] / r[0] for r in rounds]),
                      "decode": med([(r[2][1] - r[2][0]) / max(r[1] - r[0], 1e-9) for r in rounds])}
    return out


def _bank_mb(model: Any) -> float:
    """Memory of the routed model's expert factors: the rows of every layer's bank in use (spare capacity that
    was never written costs no memory)."""
    from moerge.runtime.layer import ExpertLinear

    total = 0
    for m in model.base.modules():
        if isinstance(m, ExpertLinear):
            bank = m.bank
            total += bank.A_all.nbytes + bank.Bt_all.nbytes
            total += sum(d.nbytes + (0 if b is None else b.nbytes) for d, b in bank.dense.values())
    return total / 2**20


def _peft_adapters(base: nn.Module, n: int, rank: int, folder: Path) -> list[Path]:
    from peft import LoraConfig, get_peft_model

    paths = []
    for i in range(n):
        torch.manual_seed(100 + i)
        pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear",
                                                            init_lora_weights=False, lora_dropout=0.0))
        pm.save_pretrained(str(folder / f"a{i}"))
        paths.append(folder / f"a{i}")
        del pm
    return paths


def run_bench(base: nn.Module, tokenizer: Any, *, experts: list[int], batches: list[int], prompt: int = 64,
              new: int = 32, rank: int = 8, candidates: int = 4, top_k: int = 2, mixed: int = 8,
              peft: bool = True, xlora: bool = True, repeat: int = 3, workdir: Path | None = None,
              expert_dtype: torch.dtype | None = None, expert_device: str | None = None,
              log: Any = print) -> list[BenchResult]:
    """Run every scenario for every batch size; returns the results with ratios to the base filled in."""
    import tempfile

    from moerge.routers import build_router
    from moerge.runtime.model import MoErgeModel

    device = next(base.parameters()).device
    vocab = base.config.vocab_size
    g = torch.Generator().manual_seed(0)
    batches_in = {b: {"input_ids": torch.randint(3, vocab, (b, prompt), generator=g).to(device),
                      "attention_mask": torch.ones(b, prompt, dtype=torch.long, device=device)} for b in batches}
    results: list[BenchResult] = []
    mem0 = _rss_mb()
    work = Path(workdir or tempfile.mkdtemp(prefix="moerge-bench-"))

    def record(r: BenchResult) -> None:
        results.append(r)
        log(f"  {r.scenario:<14} batch {r.batch}: prefill {r.prefill_tps:9.1f} tok/s, decode {r.decode_tps:8.1f} "
            f"tok/s, memory {r.memory_mb:8.0f} MB{('  (' + r.notes + ')') if r.notes else ''}")

    for batch in batches_in.values():
        record(_measure("base", base, batch, new, repeat, device, mem0, 0.0))
    ref = dict(base=base)
    if peft:
        from peft import PeftModel

        paths = _peft_adapters(base, mixed, rank, work / "peft")
        t0 = time.perf_counter()
        pm = PeftModel.from_pretrained(copy.deepcopy(base), str(paths[0]), adapter_name="a0").eval()
        setup = time.perf_counter() - t0
        for batch in batches_in.values():
            record(_measure("peft-1", pm, batch, new, repeat, device, mem0, setup, **ref))
        for i, p in enumerate(paths[1:], start=1):
            pm.load_adapter(str(p), adapter_name=f"a{i}")
        for b, batch in batches_in.items():
            names = [f"a{i % mixed}" for i in range(b)]
            record(_measure("peft-mixed", pm, batch, new, repeat, device, mem0, setup,
                            notes=f"{len(set(names))} adapters in the batch", adapter_names=names, **ref))
        del pm
        gc.collect()
        if xlora:
            from peft import XLoraConfig, get_peft_model

            cfg = XLoraConfig(task_type="CAUSAL_LM", hidden_size=base.config.hidden_size, xlora_depth=2,
                              adapters={str(i): str(p) for i, p in enumerate(paths)})
            t0 = time.perf_counter()
            xbase = copy.deepcopy(base)
            xbase.config.use_cache = False  # X-LoRA refuses a model that caches
            xm = get_peft_model(xbase, cfg).eval()
            setup = time.perf_counter() - t0
            for batch in batches_in.values():
                record(_measure("peft-xlora", xm, batch, new, max(1, repeat // 3), device, mem0, setup,
                                notes="use_cache=False", use_cache=False, **ref))
            del xm
            gc.collect()
    for n in experts:
        t0 = time.perf_counter()
        router = build_router("glider", candidates=candidates, local="arrow", top_k=top_k)
        model = MoErgeModel(copy.deepcopy(base), router, tokenizer=tokenizer, expert_dtype=expert_dtype,
                            expert_device=expert_device)
        dt = expert_dtype or next(base.parameters()).dtype
        for i in range(0, n, 64):  # made and installed a chunk at a time, so the pool is never held twice
            chunk = random_lora_experts(base, min(64, n - i), rank, seed=n * 1000 + i, name=f"e{i}-", dtype=dt)
            model.expert_set.install(chunk, model.router)
            gc.collect()
        setup = time.perf_counter() - t0
        mb = _bank_mb(model)
        notes = (f"K={candidates}, top-{top_k}, experts {mb:.{0 if mb >= 10 else 1}f} MB"
                 + (f" in {str(dt).removeprefix('torch.')}" if expert_dtype is not None else "")
                 + (f" on {expert_device}" if expert_device else ""))
        for batch in batches_in.values():
            record(_measure(f"moerge-{n}", model, batch, new, repeat, device, mem0, setup, notes=notes, **ref))
        del model
        gc.collect()
    for r in results:
        if not r.ratios:  # the base rows
            r.ratios = {"prefill": 1.0, "decode": 1.0}
    return results


def to_markdown(results: list[BenchResult], header: list[str]) -> str:
    lines = [*header, "", "| scenario | batch | prefill tok/s | ÷ base | decode tok/s | ÷ base | memory MB | notes |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in results:
        lines.append(f"| {r.scenario} | {r.batch} | {r.prefill_tps:.1f} | {r.ratios['prefill']:.2f} | "
                     f"{r.decode_tps:.1f} | {r.ratios['decode']:.2f} | {r.memory_mb:.0f} | {r.notes} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[BenchResult]:
    ap = argparse.ArgumentParser(prog="python -m moerge.lab.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", default="16,256,1000", help="library sizes for the routed model")
    ap.add_argument("--batch", default="1,8", help="batch sizes")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens per row")
    ap.add_argument("--new", type=int, default=32, help="new tokens per row")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--candidates", type=int, default=4, help="K: candidates per request")
    ap.add_argument("--top-k", type=int, default=2, help="experts mixed per token")
    ap.add_argument("--mixed", type=int, default=8, help="adapters for PEFT's mixed batch and X-LoRA")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--expert-dtype", default=None, choices=("float32", "bfloat16", "float16"),
                    help="how the routed model stores its experts (default: the base's dtype)")
    ap.add_argument("--expert-device", default=None, help="where the routed model keeps its experts (e.g. cpu under "
                    "a cuda base; default: with the base)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="the base's dtype")
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--skip-xlora", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="a tiny random model instead of the default base (tests)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--out", default=None, help="folder for bench.json and bench.md")
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    if args.tiny:
        from transformers import LlamaConfig, LlamaForCausalLM

        base = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)).eval()
        from moerge.lab.defaults import default_tokenizer

        tok = default_tokenizer()
        label = "tiny random Llama (hidden 64, 2 layers)"
    else:
        from moerge.lab.defaults import default_base, default_base_label

        base, tok = default_base(dtype=getattr(torch, args.dtype), device=device)
        label = default_base_label()
    base = base.to(device=device, dtype=getattr(torch, args.dtype)).eval()
    threads = torch.get_num_threads()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    header = [f"command: python -m moerge.lab.bench {' '.join(argv if argv is not None else sys.argv[1:])}",
              f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} ({threads} threads)"
              + (f", GPU {gpu}" if gpu else "") + f"; base: {label}, {args.dtype} on {device.type}"
              + (f" ({base.config._attn_implementation} attention)" if hasattr(base.config, "_attn_implementation")
                 else ""),
              f"prompt {args.prompt} tokens, {args.new} new tokens per row, rank {args.rank} on all linear layers"]
    for line in header:
        print(line)
    results = run_bench(base, tok, experts=[int(x) for x in args.experts.split(",") if x],
                        batches=[int(x) for x in args.batch.split(",") if x], prompt=args.prompt, new=args.new,
                        rank=args.rank, candidates=args.candidates, top_k=args.top_k, mixed=args.mixed,
                        peft=not args.skip_peft, xlora=not args.skip_xlora, repeat=args.repeat,
                        expert_dtype=getattr(torch, args.expert_dtype) if args.expert_dtype else None,
                        expert_device=args.expert_device)
    md = to_markdown(results, header)
    print()
    print(md)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(json.dumps({"header": header, "results": [asdict(r) for r in results]},
                                                   indent=2))
        (out / "bench.md").write_text(md + "\n")
        print(f"saved {out / 'bench.json'} and {out / 'bench.md'}")
    return results


if __name__ == "__main__":
    main()
