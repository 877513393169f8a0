"""What every command group of the ``moerge`` command shares: the option types, the consoles, the exit-code
protocol (refusals exit 1 with their message, as text or as ``{"ok": false, "error": ...}``), the JSON/table output,
loading a library, a base model and its tokenizer, and option groups declared once as a dataclass."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

console = Console(stderr=False)
err_console = Console(stderr=True)

LibraryOpt = Annotated[str, typer.Option("--library", "-l", envvar="MOERGE_LIBRARY",
                                         help="the expert library: a folder, or a URL such as s3://bucket/lib "
                                              "(default: $MOERGE_LIBRARY)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON object instead of tables")]
BaseOpt = Annotated[str | None, typer.Option(
    "--base", help="the base model: a transformers folder (default: the library's base when it is the packaged "
                   "SmolLM2-135M-Instruct)")]
RouterOpt = Annotated[str, typer.Option(
    "--router", "-r", help="a registered router: glider, lda, lda_prompt, arrow, phatgoose, xlora, twin, fixed; with "
                           "options, NAME?key=value&key=value (e.g. 'phatgoose?negatives=8')")]
CacheOpt = Annotated[int | None, typer.Option(
    "--cache-mib", min=0, help="memory (MiB) the experts' factors may take; each expert is read from the library "
                               "when a request first needs it, the least recently used dropped past this (default: "
                               "no limit)")]
PinOpt = Annotated[str, typer.Option("--pin", help="experts (comma-separated) read at once and never dropped")]

T = TypeVar("T")


class Refused(Exception):
    """A request the command refuses (exit code 1)."""


def fail(message: str, as_json: bool) -> typing.NoReturn:
    """Report ``message`` (as ``{"ok": false, "error": ...}`` with ``as_json``) and exit with code 1."""
    if as_json:
        print(json.dumps({"ok": False, "error": message}))
    else:
        err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    raise typer.Exit(1)


def attempt(fn: Callable[[], T], as_json: bool) -> T:
    """Run ``fn``; user-facing failures become exit code 1 with their message."""
    from moerge.errors import MoErgeError

    try:
        return fn()
    except (MoErgeError, ValueError, KeyError, FileNotFoundError, Refused) as e:
        fail(str(e) if not isinstance(e, KeyError) else str(e.args[0]), as_json)


def emit(data: dict[str, Any], as_json: bool, table: Table | None = None, message: str | None = None) -> None:
    """Print a command's result: ``{"ok": true, **data}`` with ``as_json``, else ``table`` then ``message`` (rich
    markup)."""
    if as_json:
        print(json.dumps({"ok": True, **data}, default=str))
        return
    if table is not None:
        console.print(table)
    if message:
        console.print(message, highlight=False)


def open_library(spec: str | Path) -> Any:
    """The :class:`~moerge.library.ExpertLibrary` at ``spec`` (a folder or a store's URL); refused when the folder
    holds none."""
    from moerge.library import ExpertLibrary
    from moerge.library.remote import is_url

    if not is_url(spec) and not (Path(spec) / "library.json").is_file():
        raise Refused(f"{spec}: not an expert library (no library.json); create one with ExpertLibrary.create")
    return ExpertLibrary.open(spec)


def load_base(spec: str | None, lib: Any) -> Any:
    """The base model: ``spec`` (a folder), or the default base when the library (if any) was made on it."""
    from moerge.lab.defaults import DEFAULT_BASE_ID, default_base

    if spec:
        from transformers import AutoModelForCausalLM

        if not Path(spec).is_dir():
            raise Refused(f"{spec}: no such model folder (give --base a transformers model folder)")
        return AutoModelForCausalLM.from_pretrained(spec).eval()
    if lib is not None and lib.base_model not in (None, DEFAULT_BASE_ID):
        raise Refused(f"{lib.url}: the library's base is {lib.base_model!r}; give its folder with --base")
    return default_base()[0]


def load_tokenizer(spec: str | None) -> Any:
    """The tokenizer of the ``--base`` folder, or the default base's; ``None`` when there is none."""
    try:
        if spec:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(spec)
        from moerge.lab.defaults import default_tokenizer

        return default_tokenizer()
    except (OSError, ValueError):
        return None


def split_commas(text: str | None) -> list[str]:
    """The non-empty, stripped items of a comma-separated option."""
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def with_option_groups(command: Callable[..., T]) -> Callable[..., T]:
    """Let a command take groups of options declared once, as a dataclass.

    Each parameter of ``command`` annotated with a dataclass becomes the dataclass's fields, as options of their own
    (each field's annotation is its typer option, its default the option's default); the command is called with the
    dataclass built from them. Several commands that take the same dataclass then take the same options."""
    signature = inspect.signature(command, eval_str=True)
    groups: dict[str, tuple[type, list[str]]] = {}  # parameter -> (its dataclass, the field names)
    params: list[inspect.Parameter] = []
    for p in signature.parameters.values():
        if not (isinstance(p.annotation, type) and dataclasses.is_dataclass(p.annotation)):
            params.append(p.replace(kind=inspect.Parameter.KEYWORD_ONLY))
            continue
        hints = typing.get_type_hints(p.annotation, include_extras=True)
        fields = dataclasses.fields(p.annotation)
        groups[p.name] = (p.annotation, [f.name for f in fields])
        params += [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=hints[f.name],
                                     default=inspect.Parameter.empty if f.default is dataclasses.MISSING
                                     else f.default) for f in fields]

    @functools.wraps(command)
    def grouped(**options: Any) -> T:
        for name, (cls, fields) in groups.items():
            options[name] = cls(**{f: options.pop(f) for f in fields})
        return command(**options)

    grouped.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    return grouped
