"""The ``moerge`` command line (typer + rich).

    moerge merge    -l LIB --method ties --experts a,b,c --density 0.5 -o out/
    moerge compress -l LIB --method compeft --density 0.1 EXPERT
    moerge transfer -l LIB EXPERT --source OLD_BASE --target NEW_BASE --into NEW_LIB
    moerge bench    --experts 16,256,1000 --batch 1,8 --out results
    moerge library init|add|list|show|rm|verify ...
    moerge route "prompt" -l LIB --explain
    moerge generate "prompt" -l LIB [--experts a=0.5,b=0.5]
    moerge serve -l LIB --port 8000          (OpenAI-compatible HTTP API)

Every command takes ``--json`` (one JSON object on stdout, for scripts). Exit codes: 0 done; 1 the request was
refused (bad input, a check failed: the message names the file, the expert and the problem; nothing was changed);
2 bad usage (unknown option, missing argument). The library defaults to ``$MOERGE_LIBRARY``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(name="moerge", help="Route and merge a library of expert adapters over one base model.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
console = Console(stderr=False)
err_console = Console(stderr=True)

LibraryOpt = Annotated[Path, typer.Option("--library", "-l", envvar="MOERGE_LIBRARY",
                                          help="the expert library folder (default: $MOERGE_LIBRARY)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON object instead of tables")]
BaseOpt = Annotated[str | None, typer.Option(
    "--base", help="the base model: a transformers folder (default: the library's base when it is the packaged "
                   "SmolLM2-135M-Instruct)")]


class Refused(Exception):
    """A request the command refuses (exit code 1)."""


def _fail(message: str, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"ok": False, "error": message}))
    else:
        err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(1)


def _run(fn, as_json: bool) -> Any:
    """Run ``fn``; user-facing failures become exit code 1 with their message."""
    from moerge.errors import MoErgeError

    try:
        return fn()
    except (MoErgeError, ValueError, KeyError, FileNotFoundError, Refused) as e:
        _fail(str(e) if not isinstance(e, KeyError) else str(e.args[0]), as_json)


def _emit(data: dict[str, Any], as_json: bool, table: Table | None = None, message: str | None = None) -> None:
    if as_json:
        print(json.dumps({"ok": True, **data}, default=str))
        return
    if table is not None:
        console.print(table)
    if message:
        console.print(message, highlight=False)


def _open_library(path: Path):
    from moerge.library import ExpertLibrary

    if not (path / "library.json").is_file():
        raise Refused(f"{path}: not an expert library (no library.json); create one with ExpertLibrary.create")
    return ExpertLibrary.open(path)


def _load_base(spec: str | None, lib) -> Any:
    """The base model: ``spec`` (a folder), or the default base when the library was made on it."""
    from moerge.lab.defaults import DEFAULT_BASE_ID, default_base

    if spec:
        from transformers import AutoModelForCausalLM

        if not Path(spec).is_dir():
            raise Refused(f"{spec}: no such model folder (give --base a transformers model folder)")
        return AutoModelForCausalLM.from_pretrained(spec).eval()
    if lib is not None and lib.base_model not in (None, DEFAULT_BASE_ID):
        raise Refused(f"{lib.root}: the library's base is {lib.base_model!r}; give its folder with --base")
    return default_base()[0]


def _load_tokenizer(spec: str | None) -> Any:
    """The tokenizer of the ``--base`` folder, or the default base's; ``None`` when there is none."""
    try:
        if spec:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(spec)
        from moerge.lab.defaults import default_tokenizer

        return default_tokenizer()
    except (OSError, ValueError):
        return None


def _split(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


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

    from moerge.adapters.expert import LoRAWeights
    from moerge.adapters.merge import merge_experts

    def work() -> dict[str, Any]:
        if (output is None) == (into is None):
            raise Refused("give exactly one of -o/--output (write a folder) and --into (add to the library)")
        lib = _open_library(library)
        names = _split(experts)
        if not names:
            raise Refused("--experts names no expert")
        ws = [float(x) for x in _split(weights)] if weights else None
        opts = {key: v for key, v in dict(density=density, scale=scale, majority_sign=majority_sign, gamma=gamma,
                                          k=k, lam=lam).items() if v is not None}
        if method.startswith("dare"):
            opts["generator"] = torch.Generator().manual_seed(seed)
        layer_scaling = tuple(float(x) for x in _split(lines)) if lines else None
        if layer_scaling is not None and len(layer_scaling) != 2:
            raise Refused(f"--lines takes 'ALPHA,BETA', got {lines!r}")
        loaded = [lib.get(n) for n in names]
        merged = merge_experts(loaded, ws, method, name=into or "merged", rank=rank, factorwise=factorwise,
                               layer_scaling=layer_scaling, **opts)
        low_rank = all(isinstance(w, LoRAWeights) for w in merged.modules.values())
        result: dict[str, Any] = {"method": method, "experts": names, "options": {
            key: v for key, v in opts.items() if key != "generator"}, "low_rank": low_rank,
            "parameters": merged.num_parameters()}
        if into is not None:
            lib.add(merged)
            result.update(added=into, library=str(lib.root))
            return result
        assert output is not None
        if low_rank:
            from moerge.adapters.peft_loader import save_peft_lora

            save_peft_lora(merged, output, base_model_name_or_path=lib.base_model)
            result.update(output=str(output), format="peft")
        else:
            from moerge.adapters.merge import fold_into

            plain = _load_base(base, lib)
            lib.check_base(plain)
            fold_into(plain, merged).save_pretrained(str(output))
            tok = _load_tokenizer(base)
            if tok is not None:  # a full model folder should load with its tokenizer
                tok.save_pretrained(str(output))
            result.update(output=str(output), format="model", tokenizer=tok is not None)
        return result

    data = _run(work, as_json)
    where = f"added to the library as {data['added']!r}" if "added" in data else \
        f"wrote a {'PEFT LoRA adapter' if data['format'] == 'peft' else 'full model'} to {data['output']}"
    _emit(data, as_json, message=f"{data['method']} merge of {', '.join(data['experts'])}: {where} "
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
        lib = _open_library(library)
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

    data = _run(work, as_json)
    table = Table(title=f"{data['method']} compression of {data['expert']!r}")
    for col in ("stored as", "bytes before", "bytes after", "size ratio", "relative error of ΔW"):
        table.add_column(col, justify="right")
    table.add_row(data["stored_as"], f"{data['bytes_before']:,}", f"{data['bytes_after']:,}",
                  f"{data['size_ratio']:.1f}×", f"{data['relative_error']:.3f}")
    _emit(data, as_json, table)


@app.command()
def transfer(
    library: LibraryOpt,
    expert: Annotated[str, typer.Argument(help="an expert of --library, or a PEFT adapter folder")],
    source: Annotated[str, typer.Option(help="the base the expert was made on (transformers folder)")],
    target: Annotated[str, typer.Option(help="the new version of the base (transformers folder)")],
    into: Annotated[Path, typer.Option(help="library for the target base (created when missing)")],
    name: Annotated[str | None, typer.Option(help="name in the target library (default: the same)")] = None,
    strict_source: Annotated[bool, typer.Option(help="refuse an expert that records another source base")] = True,
    as_json: JsonOpt = False,
) -> None:
    """Apply an expert made on one version of a base to another version (PortLLM-style patch transfer)."""
    from moerge.adapters.peft_loader import load_peft_lora
    from moerge.adapters.transfer import transfer_expert
    from moerge.library import ExpertLibrary

    def work() -> dict[str, Any]:
        src, tgt = _load_base(source, None), _load_base(target, None)
        if Path(expert).is_dir():
            e = load_peft_lora(expert, name=name or Path(expert).name)
        else:
            e = _open_library(library).get(expert)
        moved, dist = transfer_expert(e, src, tgt, name=name, strict_source=strict_source)
        dst = ExpertLibrary.open(into) if (into / "library.json").is_file() else \
            ExpertLibrary.create(into, base_model=tgt)
        dst.check_base(tgt)
        dst.add(moved)
        return {"expert": moved.name, "library": str(dst.root), "distance": dist.to_json(),
                "summary": dist.summary()}

    data = _run(work, as_json)
    _emit(data, as_json, message=f"transferred {data['expert']!r} into {data['library']}: bases are "
                                 f"{data['summary']}")


library_app = typer.Typer(help="Inspect and check an expert library.", no_args_is_help=True)
app.add_typer(library_app, name="library")


@library_app.command("verify")
def library_verify(library: LibraryOpt = Path("."), as_json: JsonOpt = False) -> None:
    """Re-hash every file the manifest lists, load every expert and its routing data, load the routing index.
    Exit code 0: all good; 1: problems (each named with its file and expert)."""
    lib = _run(lambda: _open_library(library), as_json)
    problems = lib.verify()
    if as_json:
        print(json.dumps({"ok": not problems, "library": str(library), "experts": len(lib), "problems": problems}))
    elif problems:
        for p in problems:
            err_console.print(f"[bold red]problem:[/] {p}", highlight=False)
    else:
        console.print(f"{library}: {len(lib)} experts, every file matches its sha256 and loads", highlight=False)
    if problems:
        raise typer.Exit(1)


@library_app.command("list")
def library_list(library: LibraryOpt = Path("."), as_json: JsonOpt = False) -> None:
    """The library's experts with their kind, modules, parameters and description."""
    lib = _run(lambda: _open_library(library), as_json)
    rows = [{"name": n, **{k: v for k, v in lib.info(n).items() if k not in ("files", "source")}}
            for n in lib.names()]
    table = Table("expert", "kind", "modules", "ranks", "parameters", "description")
    for r in rows:
        table.add_row(r["name"], str(r["kind"]), str(r["modules"]), ",".join(map(str, r["ranks"])),
                      f"{r['parameters']:,}", str(r["description"])[:60])
    _emit({"library": str(library), "experts": rows}, as_json, table)


@library_app.command("init")
def library_init(
    path: Annotated[Path, typer.Argument(help="the folder to create (empty or absent)")],
    base: BaseOpt = None,
    max_rank: Annotated[int | None, typer.Option(help="refuse LoRA experts of a higher rank (default 1024)")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Create an empty library for a base model (its id and fingerprint are recorded; every expert added is checked
    against them)."""
    from moerge.library import ExpertLibrary

    def work() -> dict[str, Any]:
        lib = ExpertLibrary.create(path, base_model=_load_base(base, None), max_rank=max_rank)
        return {"library": str(path), "base": lib.base_model, "max_rank": lib.max_rank}

    data = _run(work, as_json)
    _emit(data, as_json, message=f"created {path} for base {data['base']!r}")


@library_app.command("add")
def library_add(
    source: Annotated[Path, typer.Argument(help="a PEFT LoRA adapter folder, or with --finetune a full fine-tune's "
                                                "transformers folder")],
    name: Annotated[str, typer.Option("--name", "-n", help="the expert's name")],
    library: LibraryOpt = Path("."),
    description: Annotated[str, typer.Option("--description", "-d", help="what the expert does (for routing)")] = "",
    example: Annotated[list[str] | None, typer.Option("--example", help="an example prompt (repeatable)")] = None,
    finetune: Annotated[bool, typer.Option("--finetune", help="SOURCE is a full fine-tune: store its difference "
                                           "from the base")] = False,
    rank: Annotated[int | None, typer.Option(help="--finetune: store the difference as a truncated SVD of this "
                                             "rank (default: dense)")] = None,
    base: BaseOpt = None,
    overwrite: Annotated[bool, typer.Option(help="replace an expert of the same name")] = False,
    allow_other_base: Annotated[bool, typer.Option(help="accept an adapter whose record names another base")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Add an expert, post hoc (nothing else in the library changes; all or nothing)."""

    def work() -> dict[str, Any]:
        lib = _open_library(library)
        examples = list(example or [])
        if finetune:
            from transformers import AutoModelForCausalLM

            if not (source / "config.json").is_file():
                raise Refused(f"{source}: not a transformers model folder (no config.json)")
            tuned = AutoModelForCausalLM.from_pretrained(source)
            e = lib.add_delta(tuned, _load_base(base, lib), name, description=description, examples=examples,
                              rank=rank, overwrite=overwrite)
        else:
            e = lib.add_peft(source, name, description=description, examples=examples, overwrite=overwrite,
                             allow_other_base=allow_other_base)
        return {"library": str(library), "expert": e.name, **lib.info(e.name)}

    data = _run(work, as_json)
    _emit({k: v for k, v in data.items() if k != "files"}, as_json,
          message=f"added {data['expert']!r} ({data['kind']}, {data['modules']} modules, ranks {data['ranks']}) to "
                  f"{library}")


@library_app.command("show")
def library_show(name: Annotated[str, typer.Argument(help="the expert")], library: LibraryOpt = Path("."),
                 as_json: JsonOpt = False) -> None:
    """One expert: kind, modules, ranks, parameters, description, examples, source, files and routing data."""

    def work() -> dict[str, Any]:
        lib = _open_library(library)
        if name not in lib:
            raise Refused(f"{library}: no expert {name!r}; experts: {lib.names()[:10]}")
        meta = json.loads((lib.root / "experts" / name / "expert.json").read_text())["metadata"]
        return {"expert": name, **lib.info(name), "examples": meta.get("examples", []),
                "routing": lib.routing_kinds(name)}

    data = _run(work, as_json)
    table = Table("field", "value", show_header=False)
    for k, v in data.items():
        table.add_row(k, json.dumps(v, default=str) if isinstance(v, (dict, list)) else str(v))
    _emit(data, as_json, table)


@library_app.command("rm")
def library_rm(name: Annotated[str, typer.Argument(help="the expert")], library: LibraryOpt = Path("."),
               as_json: JsonOpt = False) -> None:
    """Remove an expert (the manifest first: an interruption leaves at worst an unlisted folder, removed on open)."""

    def work() -> dict[str, Any]:
        lib = _open_library(library)
        lib.remove(name)
        return {"library": str(library), "removed": name, "experts": len(lib)}

    data = _run(work, as_json)
    _emit(data, as_json, message=f"removed {name!r}; {data['experts']} experts left")


RouterOpt = Annotated[str, typer.Option("--router", "-r", help="glider, arrow, phatgoose, xlora, twin, fixed")]


def _routed_model(library: Path, router: str, base: str | None, **router_config: Any) -> Any:
    from moerge.routers import build_router
    from moerge.runtime.model import MoErgeModel

    lib = _open_library(library)
    tok = _load_tokenizer(base)
    if tok is None:
        raise Refused(f"{base}: the base folder has no tokenizer; routing reads the prompt")
    return MoErgeModel.from_library(_load_base(base, lib), lib, router=build_router(router, **router_config),
                                    tokenizer=tok)


def _encode(model: Any, prompt: str) -> dict[str, Any]:
    """The prompt as the user turn of the tokenizer's chat template (the way the experts were trained)."""
    from moerge.routing.training import chat_prompt

    return model.tokenizer(chat_prompt(model.tokenizer, prompt), return_tensors="pt", add_special_tokens=False)


@app.command()
def route(
    prompt: Annotated[str, typer.Argument(help="the request, as a user would write it")],
    library: LibraryOpt = Path("."),
    router: RouterOpt = "glider",
    base: BaseOpt = None,
    explain: Annotated[bool, typer.Option("--explain", help="also the per-layer gate usage")] = False,
    query: Annotated[str | None, typer.Option(help="glider: retrieve by the 'prompt', the task 'description' an LLM "
                                              "(the base) writes for it, or 'both'")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Which experts a prompt is routed to: the global stage's candidates with their scores, the mixing weights, and
    (with --explain) each patched module's gate usage over the prompt's tokens; with --query description, the task
    description the LLM wrote."""
    import torch

    def work() -> dict[str, Any]:
        if query is not None and router != "glider":
            raise Refused("--query applies to the glider router")
        model = _routed_model(library, router, base, **({"query": query} if query else {}))
        batch = _encode(model, prompt)
        with torch.no_grad():
            model(**batch)
        data = {"prompt": prompt, "router": model.router.name, **model.last_routing[0].to_json()}
        if query in ("description", "both"):  # what the LLM wrote (cached: the routing above made it)
            data["description"] = model.router.describer([model._decode_prompts(batch["input_ids"], None)[0]])[0]
        if not explain:
            data.pop("layer_usage")
        data["explain"] = model.explain()
        return data

    data = _run(work, as_json)
    if as_json:
        data.pop("explain")
        _emit(data, True)
        return
    table = Table("candidate", "score", "weight")
    for n, sc in data["candidates"].items():
        table.add_row(n, f"{sc:.3f}", f"{data['experts'].get(n, 0.0):.3f}")
    if "description" in data:
        console.print(f"task description: {data['description']}", highlight=False)
    _emit(data, False, table, message=data["explain"] if explain else None)


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="the request")],
    library: LibraryOpt = Path("."),
    router: RouterOpt = "glider",
    base: BaseOpt = None,
    experts: Annotated[str | None, typer.Option("--experts", "-e", help="force a mix instead of routing: "
                                                "name=weight,name=weight")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n")] = 64,
    as_json: JsonOpt = False,
) -> None:
    """Answer a prompt with the routed model (greedy), and say which experts answered."""
    import torch

    def work() -> dict[str, Any]:
        mix = None
        if experts:
            mix = {}
            for part in _split(experts):
                n, _, w = part.partition("=")
                try:
                    mix[n.strip()] = float(w) if w else 1.0
                except ValueError:
                    raise Refused(f"--experts: {part!r} is not name=weight") from None
        model = _routed_model(library, router, base)
        batch = _encode(model, prompt)
        tok = model.tokenizer
        with torch.no_grad():
            out = model.generate(**batch, experts=mix, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        text = tok.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        return {"prompt": prompt, "answer": text, **model.last_routing[0].to_json()}

    data = _run(work, as_json)
    mix = ", ".join(f"{n} {w:.2f}" for n, w in sorted(data["experts"].items(), key=lambda t: -t[1]))
    _emit({k: v for k, v in data.items() if k != "layer_usage"}, as_json,
          message=f"{data['answer']}\n[dim]experts: {mix or 'none (base model)'}[/]")


@app.command()
def serve(
    library: LibraryOpt = Path("."),
    router: RouterOpt = "glider",
    base: BaseOpt = None,
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port")] = 8000,
    max_batch: Annotated[int, typer.Option(help="requests run together in one generate call")] = 8,
    batch_window: Annotated[float, typer.Option(help="seconds to wait for more requests to batch")] = 0.02,
) -> None:
    """An OpenAI-compatible HTTP API over the routed model: /v1/chat/completions, /v1/completions (streaming with
    SSE), /v1/models (the routed model and each expert), /v1/experts (upload a PEFT adapter)."""
    from moerge.serving import ServerConfig
    from moerge.serving import serve as run_server

    model = _run(lambda: _routed_model(library, router, base), False)
    run_server(model, model.tokenizer, host=host, port=port,
               config=ServerConfig(max_batch=max_batch, batch_window=batch_window))


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


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    app(args=argv if argv is not None else sys.argv[1:], prog_name="moerge")


if __name__ == "__main__":
    main()
