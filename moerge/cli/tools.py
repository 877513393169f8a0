"""``moerge merge|compress|transfer|eval|bench``: make new experts from a library's, and measure a library."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from moerge.cli.common import (
    BaseOpt,
    JsonOpt,
    LibraryOpt,
    Refused,
    attempt,
    emit,
    load_base,
    load_tokenizer,
    open_library,
    split_commas,
)

app = typer.Typer()


@app.command()
def merge(
    library: LibraryOpt,
    experts: Annotated[str, typer.Option("--experts", "-e", help="comma-separated expert names")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="folder to write: a PEFT adapter when the "
                                                "result is low rank, else a full model")] = None,
    method: Annotated[str, typer.Option("--method", "-m", help="linear, task_arithmetic, ties, dare_linear, "
                                        "dare_ties, magnitude_prune, breadcrumbs, breadcrumbs_ties, consensus, "
                                        "or cat (exact rank concatenation)")] = "linear",
    weights: Annotated[str | None, typer.Option("--weights", "-w", help="comma-separated, one per expert "
                                                "(default 1 each)")] = None,
    density: Annotated[float | None, typer.Option(help="fraction kept (ties, dare_*, magnitude_prune, "
                                                  "breadcrumbs*)")] = None,
    scale: Annotated[float | None, typer.Option(help="λ (task_arithmetic, ties, breadcrumbs*, consensus)")] = None,
    majority_sign: Annotated[str | None, typer.Option(help="'total' or 'frequency' (ties, dare_ties)")] = None,
    gamma: Annotated[float | None, typer.Option(help="largest fraction dropped (breadcrumbs*)")] = None,
    k: Annotated[int | None, typer.Option(help="consensus: tasks an entry must serve")] = None,
    lam: Annotated[float | None, typer.Option(help="consensus: TALL mask threshold λ")] = None,
    rank: Annotated[int | None, typer.Option(help="low-rank result: truncated SVD of the merge at this rank")] = None,
    factorwise: Annotated[bool, typer.Option(help="merge LoRA factors separately (PEFT's way; equal ranks)")] = False,
    lines: Annotated[str | None, typer.Option(help="LiNeS layer scaling 'ALPHA,BETA'")] = None,
    seed: Annotated[int, typer.Option(help="random seed (DARE)")] = 0,
    into: Annotated[str | None, typer.Option(help="add the merged expert to the library under this name instead "
                                             "of writing -o")] = None,
    base: BaseOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Merge experts into one: a PEFT adapter (low rank), a full model, or a new expert of the library."""
    import torch

    from moerge.adapters.expert import DeltaWeights
    from moerge.adapters.merge import base_num_layers, merge_experts

    def work() -> dict[str, Any]:
        if (output is None) == (into is None):
            raise Refused("give exactly one of -o/--output (write a folder) and --into (add to the library)")
        lib = open_library(library)
        names = split_commas(experts)
        if not names:
            raise Refused("--experts names no expert")
        ws = [float(x) for x in split_commas(weights)] if weights else None
        opts = {key: v for key, v in dict(density=density, scale=scale, majority_sign=majority_sign, gamma=gamma,
                                          k=k, lam=lam).items() if v is not None}
        if method.startswith("dare"):
            opts["generator"] = torch.Generator().manual_seed(seed)
        layer_scaling = tuple(float(x) for x in split_commas(lines)) if lines else None
        if layer_scaling is not None and len(layer_scaling) != 2:
            raise Refused(f"--lines takes 'ALPHA,BETA', got {lines!r}")
        loaded = [lib.get(n) for n in names]
        plain = None
        if output is not None and method != "cat" and not factorwise and rank is None:  # a dense merge: a full model
            plain = load_base(base, lib)
            lib.check_base(plain)
            # merged in the base's module order with its layer count, exactly as MoErgeModel.merge does
            opts.update(module_order=[n for n, _ in plain.named_modules()], num_layers=base_num_layers(plain))
        merged = merge_experts(loaded, ws, method, name=into or "merged", rank=rank, factorwise=factorwise,
                               layer_scaling=layer_scaling, **opts)
        low_rank = not any(isinstance(w, DeltaWeights) for w in merged.modules.values())  # LoRA or stacked LoRA
        result: dict[str, Any] = {"method": method, "experts": names, "options": {
            key: v for key, v in opts.items() if key not in ("generator", "module_order", "num_layers")},
            "low_rank": low_rank,
            "parameters": merged.num_parameters()}
        if into is not None:
            lib.add(merged)
            result.update(added=into, library=lib.url)
            return result
        assert output is not None
        if low_rank:
            from moerge.adapters.peft_loader import save_peft_lora

            if merged.stacked_targets() and plain is None:  # an MoE model's fused experts: PEFT's target_parameters
                plain = load_base(base, lib)
            save_peft_lora(merged, output, base_model_name_or_path=lib.base_model, base=plain)
            result.update(output=str(output), format="peft")
        else:
            from moerge.adapters.merge import fold_into

            if plain is None:
                plain = load_base(base, lib)
                lib.check_base(plain)
            fold_into(plain, merged).save_pretrained(str(output))
            tok = load_tokenizer(base)
            if tok is not None:  # a full model folder should load with its tokenizer
                tok.save_pretrained(str(output))
            result.update(output=str(output), format="model", tokenizer=tok is not None)
        return result

    data = attempt(work, as_json)
    where = f"added to the library as {data['added']!r}" if "added" in data else \
        f"wrote a {'PEFT LoRA adapter' if data['format'] == 'peft' else 'full model'} to {data['output']}"
    emit(data, as_json, message=f"{data['method']} merge of {', '.join(data['experts'])}: {where} "
                                 f"(the merged update has {data['parameters']:,} parameters"
                                 f"{', low rank' if data['low_rank'] else ''})")


@app.command()
def compress(
    library: LibraryOpt,
    expert: Annotated[str, typer.Argument(help="the expert to compress")],
    method: Annotated[str, typer.Option("--method", "-m", help="compeft, bitdelta or svd")] = "compeft",
    density: Annotated[float, typer.Option(help="compeft: fraction of entries kept")] = 0.1,
    alpha: Annotated[float | None, typer.Option(help="compeft: scale = alpha·std (default: mean kept "
                                                "magnitude)")] = None,
    rank: Annotated[int | None, typer.Option(help="svd: the rank kept")] = None,
    as_name: Annotated[str | None, typer.Option("--as", help="store under this name (default: replace the "
                                                "expert)")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Compress an expert of the library (ComPEFT, BitDelta or low-rank SVD) and store it packed."""
    from moerge.adapters.compress import compress_expert, storage_bytes

    def work() -> dict[str, Any]:
        lib = open_library(library)
        original = lib.get(expert)
        small = compress_expert(original, method, density=density, alpha=alpha, rank=rank, name=as_name)
        lib.add(small, overwrite=as_name is None or as_name == expert)
        before, after = storage_bytes(original), storage_bytes(small)
        err = num = 0.0
        for m, w in original.modules.items():
            d = w.delta_weight()
            err += float(((small.modules[m].delta_weight() - d) ** 2).sum())
            num += float((d * d).sum())
        return {"expert": expert, "stored_as": small.name, "method": method,
                "settings": small.metadata.source["compression"], "bytes_before": before, "bytes_after": after,
                "size_ratio": before / max(after, 1), "relative_error": (err / num) ** 0.5 if num else 0.0}

    data = attempt(work, as_json)
    table = Table(title=f"{data['method']} compression of {data['expert']!r}")
    for col in ("stored as", "bytes before", "bytes after", "size ratio", "relative error of ΔW"):
        table.add_column(col, justify="right")
    table.add_row(data["stored_as"], f"{data['bytes_before']:,}", f"{data['bytes_after']:,}",
                  f"{data['size_ratio']:.1f}×", f"{data['relative_error']:.3f}")
    emit(data, as_json, table)


@app.command()
def transfer(
    library: LibraryOpt,
    expert: Annotated[str, typer.Argument(help="an expert of --library, or a PEFT adapter folder")],
    source: Annotated[str, typer.Option(help="the base the expert was made on (transformers folder)")],
    target: Annotated[str, typer.Option(help="the new version of the base (transformers folder)")],
    into: Annotated[str, typer.Option(help="library for the target base, a folder or a URL (created when "
                                          "missing)")],
    name: Annotated[str | None, typer.Option(help="name in the target library (default: the same)")] = None,
    strict_source: Annotated[bool, typer.Option(help="refuse an expert that records another source base")] = True,
    as_json: JsonOpt = False,
) -> None:
    """Apply an expert made on one version of a base to another version (PortLLM-style patch transfer)."""
    from moerge.adapters.peft_loader import load_peft_lora
    from moerge.adapters.transfer import transfer_expert
    from moerge.library import ExpertLibrary

    def work() -> dict[str, Any]:
        src, tgt = load_base(source, None), load_base(target, None)
        if Path(expert).is_dir():
            e = load_peft_lora(expert, name=name or Path(expert).name, base=src)  # DoRA made exact on its base
        else:
            e = open_library(library).get(expert)
        moved, dist = transfer_expert(e, src, tgt, name=name, strict_source=strict_source)
        dst = ExpertLibrary.create(into, base_model=tgt, exist_ok=True)
        dst.check_base(tgt)
        dst.add(moved)
        return {"expert": moved.name, "library": dst.url, "distance": dist.to_json(),
                "summary": dist.summary()}

    data = attempt(work, as_json)
    emit(data, as_json, message=f"transferred {data['expert']!r} into {data['library']}: bases are "
                                 f"{data['summary']}")


@app.command(name="eval", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def eval_(ctx: typer.Context) -> None:
    """Exact-match accuracy of ways to use a library on the task suite (options: see ``python -m moerge.lab.eval
    --help``: --methods base,oracle,router:glider --tasks ... --limit 30 --out DIR)."""
    from moerge.lab.eval import main as eval_main

    eval_main(list(ctx.args))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench(ctx: typer.Context) -> None:
    """Prefill/decode speed and memory of routed inference vs the base model and PEFT (options: see
    ``python -m moerge.lab.bench --help``: --experts 16,256,1000 --batch 1,8 --prompt 64 --new 32 --skip-peft --out DIR)."""
    from moerge.lab.bench import main as bench_main

    bench_main(list(ctx.args))
