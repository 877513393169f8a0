"""The ``moerge`` command line (typer + rich).

    moerge merge    -l LIB --method ties --experts a,b,c --density 0.5 -o out/
    moerge compress -l LIB --method compeft --density 0.1 EXPERT
    moerge transfer -l LIB EXPERT --source OLD_BASE --target NEW_BASE --into NEW_LIB
    moerge bench    --experts 16,256,1000 --batch 1,8 --out results
    moerge library init|add|list|show|rm|verify ...
    moerge route "prompt" -l LIB --explain
    moerge generate "prompt" -l LIB [--experts a=0.5,b=0.5]
    moerge serve -l LIB --port 8000          (OpenAI-compatible HTTP API; needs moerge[server])

Every command takes ``--json`` (one JSON object on stdout, for scripts). Exit codes: 0 done; 1 the request was
refused (bad input, a check failed: the message names the file, the expert and the problem; nothing was changed);
2 bad usage (unknown option, missing argument). The library defaults to ``$MOERGE_LIBRARY``.

The commands live by group: :mod:`moerge.cli.run` (route, generate, serve), :mod:`moerge.cli.tools` (merge,
compress, transfer, eval, bench), :mod:`moerge.cli.library` (``moerge library ...``); :mod:`moerge.cli.common`
holds what they share. Their heavy imports happen inside the commands, so ``moerge --help`` stays fast.
"""

from __future__ import annotations

import os
import sys

import typer

from moerge.cli import library, run, tools

app = typer.Typer(name="moerge", help="Route and merge a library of expert adapters over one base model.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
app.add_typer(tools.app)
app.add_typer(run.app)
app.add_typer(library.app, name="library")


def main(argv: list[str] | None = None) -> None:
    """Run the ``moerge`` command on ``argv`` (default: the process's arguments)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    app(args=argv if argv is not None else sys.argv[1:], prog_name="moerge")


if __name__ == "__main__":
    main()
