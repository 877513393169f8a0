"""``moerge library init|add|list|show|rm|verify``: create, fill, inspect and check an expert library."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from moerge.cli.common import (
    BaseOpt,
    JsonOpt,
    LibraryOpt,
    Refused,
    attempt,
    console,
    emit,
    err_console,
    load_base,
    open_library,
)

app = typer.Typer(help="Inspect and check an expert library.", no_args_is_help=True)


@app.command("verify")
def library_verify(library: LibraryOpt = ".", as_json: JsonOpt = False) -> None:
    """Re-hash every file the manifest lists, load every expert and its routing data, load the routing index.
    Exit code 0: all good; 1: problems (each named with its file and expert)."""
    lib = attempt(lambda: open_library(library), as_json)
    problems = lib.verify()
    if as_json:
        print(json.dumps({"ok": not problems, "library": str(library), "experts": len(lib), "problems": problems}))
    elif problems:
        for p in problems:
            err_console.print(f"[bold red]problem:[/] {escape(p)}", highlight=False)
    else:
        console.print(f"{library}: {len(lib)} experts, every file matches its sha256 and loads", highlight=False)
    if problems:
        raise typer.Exit(1)


@app.command("list")
def library_list(library: LibraryOpt = ".", as_json: JsonOpt = False) -> None:
    """The library's experts with their kind, modules, parameters and description."""
    lib = attempt(lambda: open_library(library), as_json)
    rows = [{"name": n, **{k: v for k, v in lib.info(n).items()
                           if k not in ("files", "source", "layout", "metadata", "objects")}}
            for n in lib.names()]
    table = Table("expert", "kind", "modules", "ranks", "parameters", "description")
    for r in rows:
        table.add_row(r["name"], str(r["kind"]), str(r["modules"]), ",".join(map(str, r["ranks"])),
                      f"{r['parameters']:,}", str(r["description"])[:60])
    emit({"library": str(library), "experts": rows}, as_json, table)


@app.command("init")
def library_init(
    path: Annotated[str, typer.Argument(help="the folder to create (empty or absent), or a URL (s3://bucket/lib)")],
    base: BaseOpt = None,
    max_rank: Annotated[int | None, typer.Option(help="refuse LoRA experts of a higher rank (default 1024)")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Create an empty library for a base model (its id and fingerprint are recorded; every expert added is checked
    against them)."""
    from moerge.library import ExpertLibrary

    def work() -> dict[str, Any]:
        lib = ExpertLibrary.create(path, base_model=load_base(base, None), max_rank=max_rank)
        return {"library": str(path), "base": lib.base_model, "max_rank": lib.max_rank}

    data = attempt(work, as_json)
    emit(data, as_json, message=f"created {path} for base {data['base']!r}")


@app.command("add")
def library_add(
    source: Annotated[Path, typer.Argument(help="a PEFT LoRA adapter folder or hub repository id (org/name, through "
                                                "the hub's cache), or with --finetune a full fine-tune's "
                                                "transformers folder")],
    name: Annotated[str, typer.Option("--name", "-n", help="the expert's name")],
    library: LibraryOpt = ".",
    description: Annotated[str, typer.Option("--description", "-d", help="what the expert does (for routing)")] = "",
    example: Annotated[list[str] | None, typer.Option("--example", help="an example prompt (repeatable)")] = None,
    finetune: Annotated[bool, typer.Option("--finetune", help="SOURCE is a full fine-tune: store its difference "
                                           "from the base")] = False,
    rank: Annotated[int | None, typer.Option(help="--finetune: store the difference as a truncated SVD of this "
                                             "rank (default: dense)")] = None,
    base: BaseOpt = None,
    overwrite: Annotated[bool, typer.Option(help="replace an expert of the same name")] = False,
    allow_other_base: Annotated[bool, typer.Option(help="accept an adapter whose record names another base")] = False,
    revision: Annotated[str | None, typer.Option(help="a hub adapter's branch, tag or commit")] = None,
    subfolder: Annotated[str | None, typer.Option(help="a hub adapter's folder in its repository")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Add an expert, post hoc (nothing else in the library changes; all or nothing)."""

    def work() -> dict[str, Any]:
        lib = open_library(library)
        examples = list(example or [])
        if finetune:
            from transformers import AutoModelForCausalLM

            if not (source / "config.json").is_file():
                raise Refused(f"{source}: not a transformers model folder (no config.json)")
            tuned = AutoModelForCausalLM.from_pretrained(source)
            e = lib.add_delta(tuned, load_base(base, lib), name, description=description, examples=examples,
                              rank=rank, overwrite=overwrite)
        else:
            # the base (--base) makes a DoRA adapter exact and checks copies of base weights
            e = lib.add_peft(str(source), name, description=description, examples=examples, overwrite=overwrite,
                             allow_other_base=allow_other_base, revision=revision, subfolder=subfolder,
                             base=load_base(base, lib) if base else None)
        return {"library": str(library), "expert": e.name, **lib.info(e.name)}

    data = attempt(work, as_json)
    emit({k: v for k, v in data.items() if k != "files"}, as_json,
         message=f"added {data['expert']!r} ({data['kind']}, {data['modules']} modules, ranks {data['ranks']}) to "
                 f"{library}")


@app.command("show")
def library_show(name: Annotated[str, typer.Argument(help="the expert")], library: LibraryOpt = ".",
                 as_json: JsonOpt = False) -> None:
    """One expert: kind, modules, ranks, parameters, description, examples, source, files and routing data."""

    def work() -> dict[str, Any]:
        lib = open_library(library)
        if name not in lib:
            raise Refused(f"{library}: no expert {name!r}; experts: {lib.names()[:10]}")
        return {"expert": name, **lib.info(name), "examples": lib.stored(name).metadata.examples,
                "routing": lib.routing_kinds(name)}

    data = attempt(work, as_json)
    table = Table("field", "value", show_header=False)
    for k, v in data.items():
        table.add_row(k, json.dumps(v, default=str) if isinstance(v, (dict, list)) else str(v))
    emit(data, as_json, table)


@app.command("rm")
def library_rm(name: Annotated[str, typer.Argument(help="the expert")], library: LibraryOpt = ".",
               as_json: JsonOpt = False) -> None:
    """Remove an expert (the manifest first: an interruption leaves at worst an unlisted folder, removed on open)."""

    def work() -> dict[str, Any]:
        lib = open_library(library)
        lib.remove(name)
        return {"library": str(library), "removed": name, "experts": len(lib)}

    data = attempt(work, as_json)
    emit(data, as_json, message=f"removed {name!r}; {data['experts']} experts left")
