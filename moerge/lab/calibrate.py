"""Calibration of GLIDER's two stages on the dev split, by maximum likelihood (temperature scaling, Guo et al. 2017).

* Global: ``global_temperature`` τ_g minimises the negative log-likelihood of each dev prompt's true expert under
  ``softmax(cosine / τ_g)`` over every expert.
* Local, alone: the local gate's ``temperature`` τ_l minimises the negative log-likelihood of the true expert under
  ``softmax(logits / τ_l)`` over the answer tokens of the dev prompts, in every module (the gate routing alone,
  every expert a candidate): the default of the gate used on its own.
* Local, within GLIDER: with τ_g fixed, the local temperature that minimises the same negative log-likelihood
  under GLIDER's own posterior ``softmax(logits / τ + log softmax(score / τ_g))`` over its candidates — the two
  terms calibrated against each other, on the rows GLIDER really mixes. It is GLIDER's default local temperature.

Both are then log-probabilities on one scale, so GLIDER adds them (log-prior plus log-likelihood). The dev split
shares neither phrasings nor inputs with the test split the tables report.

* Per sequence, LDA over the prompt (``lda_prompt``): its ``temperature`` minimises the negative log-likelihood of
  each dev prompt's true expert under ``softmax(score / τ)`` over every expert (``--prompt``: this one alone, saved
  as ``calibration_prompt.json`` with the share of prompts whose best score is their own expert's).

``python -m moerge.lab.calibrate [--limit 8] [--local lda]`` prints GLIDER's and saves ``calibration.json``;
``python -m moerge.lab.calibrate --prompt --limit 16`` calibrates ``lda_prompt``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from moerge.lab.tasks import Example

__all__ = ["calibrate_global", "calibrate_local", "calibrate_prompt", "GRID"]

GRID = tuple(round(10 ** (k / 8), 6) for k in range(-24, 25))  # 0.001 … 1000, eight steps a decade


def _sequence_curve(scores: torch.Tensor, true: torch.Tensor, grid: Sequence[float]
                    ) -> tuple[float, dict[float, float]]:
    """``(best τ, {τ: mean NLL})`` of the true experts ``true (N,)`` under ``softmax(scores (N, E) / τ)``."""
    s = scores.double()
    curve = {t: float(-torch.log_softmax(s / t, dim=-1).gather(1, true.unsqueeze(1)).mean()) for t in grid}
    return min(curve, key=curve.get), curve


def calibrate_global(glider: Any, examples: Sequence[Example], grid: Sequence[float] | None = None,
                     ) -> tuple[float, dict[float, float]]:
    """``(τ_g, {τ: mean NLL})`` of the retrieval's cosine scores over every expert of ``glider`` (attached to a
    model) for ``examples``."""
    grid = tuple(grid or [t for t in GRID if t <= 10])
    names, sims = glider.retrieve([e.prompt for e in examples], len(glider.retriever.names))
    true = torch.tensor([row.index(e.task) for row, e in zip(names, examples)])
    return _sequence_curve(torch.as_tensor(sims), true, grid)


def calibrate_local(model: Any, tokenizer: Any, examples: Sequence[Example], router: Any,
                    grid: Sequence[float] | None = None) -> tuple[float, dict[float, float], Any]:
    """``(τ_l, {τ: mean NLL per answer token}, identification)`` of ``router``'s local gate (its logits at
    temperature 1, every expert a candidate) over ``examples``."""
    from moerge.lab.identify import token_identification

    grid = tuple(grid or GRID)
    model.set_router(router)
    ident = token_identification(model, tokenizer, examples, temperatures=grid)
    curve = {t: v / max(ident.nll_tokens, 1) for t, v in ident.nll.items()}
    return ident.best_temperature(), curve, ident


def calibrate_prompt(model: Any, tokenizer: Any, examples: Sequence[Example], router: Any,
                     grid: Sequence[float] | None = None, batch_size: int = 16,
                     ) -> tuple[float, dict[float, float], float]:
    """``(τ, {τ: mean NLL per prompt}, share identified)`` of ``router``'s per-sequence scores
    (:meth:`~moerge.routers.lda_prompt.PromptLDARouter.prompt_scores`, every expert) over ``examples``' chat
    prompts."""
    from moerge.routing import RoutingRequest
    from moerge.routing.training import chat_prompt

    grid = tuple(grid or [t for t in GRID if t <= 10])
    model.set_router(router)
    names = tuple(model.experts)
    scores = []
    for i in range(0, len(examples), batch_size):
        chunk = [chat_prompt(tokenizer, e.prompt) for e in examples[i : i + batch_size]]
        b = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
        scores.append(router.prompt_scores(RoutingRequest(b["input_ids"], b["attention_mask"], names)))
    s = torch.cat(scores)  # (N, E)
    true = torch.tensor([names.index(e.task) for e in examples])
    best, curve = _sequence_curve(s, true, grid)
    return best, curve, float((s.argmax(-1) == true).double().mean())


def _dev_model(args: argparse.Namespace) -> tuple[Any, Any, list[Example]]:
    """``(model over the library, tokenizer, the dev examples)`` a calibration runs on."""
    from moerge.lab.defaults import default_base
    from moerge.lab.identify import identification_examples
    from moerge.lab.zoo import DEFAULT_ZOO
    from moerge.runtime.model import MoErgeModel

    base, tok = default_base()
    model = MoErgeModel.from_library(base, args.library or DEFAULT_ZOO, tokenizer=tok, router="explicit")
    return model, tok, identification_examples("dev", args.limit)


def _save(args: argparse.Namespace, argv: list[str] | None, name: str, record: dict[str, Any], t0: float) -> None:
    """Write ``record`` (with the time taken and the command) as ``<out>/<name>``."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {**record, "seconds": round(time.time() - t0),
              "command": "python -m moerge.lab.calibrate " + " ".join(argv if argv is not None else
                                                                      __import__("sys").argv[1:])}
    (out / name).write_text(json.dumps(record, indent=2))
    print(f"saved {out / name}")


def _prompt_main(args: argparse.Namespace, argv: list[str] | None) -> None:
    from moerge.routers import build_router

    t0 = time.time()
    model, tok, examples = _dev_model(args)
    router = build_router("lda_prompt")
    tp, curve, share = calibrate_prompt(model, tok, examples, router)
    print(f"lda_prompt temperature {tp} (NLL {curve[tp]:.4f} per prompt; at 1: {curve[1.0]:.4f}); prompts "
          f"identified {100 * share:.1f}% ({router.routing_kind}, window {router.config.window})")
    _save(args, argv, "calibration_prompt.json", {
        "split": "dev", "limit": args.limit, "router": "lda_prompt", "kind": router.routing_kind,
        "window": router.config.window, "temperature": tp, "identified": share,
        "nll": {str(k): v for k, v in curve.items()}}, t0)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m moerge.lab.calibrate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--library", default=None, help="expert library (default: the committed zoo)")
    ap.add_argument("--limit", type=int, default=8, help="dev examples per held-in task")
    ap.add_argument("--local", default="lda", help="the local gate to calibrate (its temperature)")
    ap.add_argument("--out", default="results", help="folder for calibration.json")
    ap.add_argument("--prompt", action="store_true", help="calibrate lda_prompt's temperature alone")
    args = ap.parse_args(argv)
    if args.prompt:
        _prompt_main(args, argv)
        return
    from moerge.routers import build_router

    t0 = time.time()
    model, tok, examples = _dev_model(args)
    glider = build_router("glider", local="none")
    model.set_router(glider)
    tg, gcurve = calibrate_global(glider, examples)
    print(f"global_temperature {tg} (NLL {gcurve[tg]:.4f} per prompt; at 1: {gcurve[1.0]:.4f})")
    local = build_router(args.local, temperature=1.0)
    tl, lcurve, ident = calibrate_local(model, tok, examples, local)
    print(f"{args.local} temperature {tl} (NLL {lcurve[tl]:.4f} per answer token and module; at 1: "
          f"{lcurve.get(1.0, math.nan):.4f}); answer tokens identified {100 * ident.accuracy('answer'):.1f}%")
    # GLIDER's own local gate (its statistics: LOCAL_DEFAULTS) at temperature 1
    joint = build_router("glider", global_temperature=tg, local=args.local, local_config={"temperature": 1.0})
    tj, jcurve, jident = calibrate_local(model, tok, examples, joint)
    kind = getattr(joint.local, "routing_kind", args.local)
    print(f"{args.local} ({kind}) temperature within GLIDER {tj} (NLL {jcurve[tj]:.4f} per answer token and "
          f"module); answer tokens identified {100 * jident.accuracy('answer'):.1f}%")
    _save(args, argv, "calibration.json", {
        "split": "dev", "limit": args.limit, "global_temperature": tg, "local": args.local,
        "local_temperature": tl, "global_nll": {str(k): v for k, v in gcurve.items()},
        "local_nll": {str(k): v for k, v in lcurve.items()}, "identification": ident.to_json(),
        "glider_local_temperature": tj, "glider_local_kind": kind,
        "glider_local_nll": {str(k): v for k, v in jcurve.items()},
        "glider_identification": jident.to_json()}, t0)


if __name__ == "__main__":
    main()
