"""Evaluation harness: run ways of using the experts over the task suite and tabulate exact match.

``python -m moerge.lab.eval [--limit N] [--methods base,oracle,uniform] [--out results/]`` prints a table (per task,
held-in and held-out averages) and saves it as JSON and Markdown.

A *method* decides the experts of every prompt:

* ``base`` — no expert: the base model alone;
* ``oracle`` — each held-in task's own expert at weight 1 (an upper bound; held-out tasks have none);
* ``uniform`` — the uniform average of all experts (the ``fixed`` router without weights);
* ``router:<name>`` — any registered router, with its default config, deciding from the prompt alone;
* methods added with :func:`register_method` (merges, compressed experts, …).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moerge.lab.tasks import HELD_IN, HELD_OUT, Example, exact_match, get_task

__all__ = ["Method", "register_method", "list_methods", "evaluate", "EvalResult", "generate_answers",
           "to_markdown", "retrieval_accuracy", "split_methods"]


@dataclass
class Method:
    """How a method routes: ``experts_for(examples, model)`` gives per-row mixes (or ``None`` to let the model's
    router decide); ``router`` (a registered name, a ``() -> Router`` factory, or ``None``) is set on the model
    first."""

    name: str
    experts_for: Callable[[list[Example], Any], list[dict[str, float]] | None]
    router: str | Callable[[], Any] | None = None
    applies_to: Callable[[str], bool] = lambda task: True
    description: str = ""
    make_model: Callable[[Any], Any] | None = None  # another model to run this method on (e.g. a derived library)


_METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    _METHODS[method.name] = method
    return method


register_method(Method("base", lambda exs, m: [{} for _ in exs], description="the base model, no expert"))
register_method(Method("oracle", lambda exs, m: [{e.task: 1.0} for e in exs],
                       applies_to=lambda task: not get_task(task).held_out,
                       description="each task's own expert (upper bound)"))
register_method(Method("uniform", lambda exs, m: [{n: 1.0 / len(m.experts) for n in m.experts} for _ in exs],
                       description="uniform average of all experts"))


def _router_factory(name: str, **config: Any) -> Callable[[], Any]:
    def make() -> Any:
        from moerge.routers import build_router

        return build_router(name, **config)

    return make


def _twin_model(model: Any, rank: int = 8) -> Any:
    """A model over the Twin-Merging split of ``model``'s library (built once, cached next to the library)."""
    from moerge.lab.defaults import cache_root
    from moerge.library import ExpertLibrary
    from moerge.library.derive import make_twin_library
    from moerge.runtime.model import MoErgeModel

    lib = model.library
    root = cache_root() / "twin" / f"{Path(lib.root).name}-{_library_digest(lib)}-r{rank}"
    twin = ExpertLibrary.open(root) if (root / "library.json").is_file() else make_twin_library(lib, root, rank)
    return MoErgeModel.from_library(model.copy_base(), twin, router="twin", tokenizer=model.tokenizer)


def _library_digest(lib: Any) -> str:
    return __import__("hashlib").sha256(json.dumps(
        [[n, lib.info(n).get("files")] for n in lib.names()], sort_keys=True).encode()).hexdigest()[:12]


def _merge_method(name: str) -> Method:
    """``merge:METHOD?opt=value&...``: all the library's experts merged into the base by a static merge method.

    Options besides the method's own: ``weight`` (per expert, default 1), ``rank`` (merge to a low-rank expert
    through the SVD first), ``layer_scaling`` (LiNeS ``[α, β]``). DARE draws its masks with seed 0."""
    method, config = _parse_method(name)
    weight = float(config.pop("weight", 1.0))
    rank = config.pop("rank", None)
    lines = config.pop("layer_scaling", None)
    layer_scaling = tuple(lines) if lines is not None else None

    def make(model: Any) -> Any:
        opts = dict(config)
        if method.startswith("dare"):
            opts["generator"] = torch.Generator().manual_seed(0)
        if rank is not None:
            opts["rank"] = int(rank)
        return model.merge({n: weight for n in model.experts}, method, layer_scaling=layer_scaling, **opts)

    return Method(name, lambda exs, m: None, make_model=make, description=f"static {method} merge of every expert")


def _compress_method(name: str) -> Method:
    """``compress:METHOD?opt=value``: each task's own expert (oracle routing) after compression, e.g.
    ``compress:compeft?density=0.1``, ``compress:bitdelta``, ``compress:svd?rank=2``. The compressed library is
    built once and cached; the size ratio (bytes stored) is recorded with the scores."""
    method, config = _parse_method(name)

    def make(model: Any) -> tuple[Any, dict[str, Any]]:
        import shutil
        import uuid

        from moerge.adapters.compress import COMPRESSION_FORMAT, compress_expert, storage_bytes
        from moerge.lab.defaults import cache_root
        from moerge.library import ExpertLibrary
        from moerge.runtime.model import MoErgeModel

        src = model.library
        tag = "-".join([method] + [f"{k}{v}" for k, v in sorted(config.items())] + [f"f{COMPRESSION_FORMAT}"])
        root = cache_root() / "compressed" / f"{Path(src.root).name}-{_library_digest(src)}-{tag}"
        if not (root / "library.json").is_file():
            tmp = root.parent / f".tmp-{root.name}-{uuid.uuid4().hex[:6]}"
            lib = ExpertLibrary.create(tmp, base_model=src.base_model, base_fingerprint=src.base_fingerprint)
            for e in src.experts():
                lib.add(compress_expert(e, method, **config))
            shutil.rmtree(root, ignore_errors=True)
            tmp.rename(root)
        lib = ExpertLibrary.open(root)
        before = sum(storage_bytes(src.get(n)) for n in src.names())
        after = sum(storage_bytes(lib.get(n)) for n in lib.names())
        run = MoErgeModel.from_library(model.copy_base(), lib, router="explicit", tokenizer=model.tokenizer)
        return run, {"bytes": after, "bytes_original": before, "size_ratio": before / max(after, 1)}

    return Method(name, lambda exs, m: [{e.task: 1.0} for e in exs], make_model=make,
                  applies_to=lambda task: not get_task(task).held_out,
                  description=f"each task's own expert, compressed by {method}")


register_method(Method("twin", lambda exs, m: None, make_model=_twin_model,
                       description="Twin-Merging: shared average always on + rank-8 exclusive parts by retrieval"))
register_method(Method("glider_global", lambda exs, m: None, router=_router_factory("glider", local="none"),
                       description="GLIDER's global stage alone: top-K retrieval, sequence-level softmax mix"))


def list_methods() -> list[str]:
    from moerge.routers import list_routers

    return sorted(_METHODS) + [f"router:{r}" for r in list_routers() if r not in ("explicit",)]


def split_methods(text: str) -> list[str]:
    """``"a,merge:ties?layer_scaling=[0.5,0.5],b"`` → the method names (commas inside ``[]``/``{}`` stay)."""
    out, depth, cur = [], 0, []
    for ch in text:
        depth += (ch in "[{") - (ch in "]}")
        if ch == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur).strip())
    return [m for m in out if m]


def _parse_method(method: str) -> tuple[str, dict[str, Any]]:
    """``"router:glider?top_k=1&global_temperature=0.05"`` → ``("glider", {"top_k": 1, "global_temperature":
    0.05})`` (:func:`~moerge.routing.router.parse_router_spec` of what follows the kind)."""
    from moerge.routing.router import parse_router_spec

    try:
        return parse_router_spec(method.split(":", 1)[1])
    except ValueError as err:
        raise ValueError(f"method {method!r}: {err}") from None


def _method(name: str) -> Method:
    if name in _METHODS:
        return _METHODS[name]
    if name.startswith("merge:"):
        return _merge_method(name)
    if name.startswith("compress:"):
        return _compress_method(name)
    if name.startswith("router:"):
        router, config = _parse_method(name)
        return Method(name, lambda exs, m: None, router=_router_factory(router, **config) if config else router,
                      description=f"router {router!r}" + (f" with {config}" if config else ""))
    raise ValueError(f"unknown method {name!r}; available: {list_methods()}")


def generate_answers(model: Any, tokenizer: Any, examples: Sequence[Example], experts: list[dict] | None,
                     max_new_tokens: int) -> list[str]:
    """Greedy answers for ``examples`` (one batch), prompts formatted with the chat template, left padded."""
    from moerge.routing.training import chat_prompt, greedy_generate

    kw: dict[str, Any] = {"experts": experts} if experts is not None else {}
    return greedy_generate(model, tokenizer, [chat_prompt(tokenizer, e.prompt) for e in examples], max_new_tokens,
                           **kw)


@dataclass
class EvalResult:
    """Exact-match accuracy per method and task, plus what was run."""

    scores: dict[str, dict[str, float]] = field(default_factory=dict)  # method -> task -> accuracy
    retrieval: dict[str, dict[str, Any]] = field(default_factory=dict)  # label -> retrieval_accuracy(...)
    samples: dict[str, dict[str, list[dict[str, str]]]] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    info: dict[str, dict[str, Any]] = field(default_factory=dict)  # method -> facts (e.g. compression size ratio)
    correct: dict[str, dict[str, list[int]]] = field(default_factory=dict)  # method -> task -> 1/0 per prompt
    identification: dict[str, dict[str, Any]] = field(default_factory=dict)  # method -> Identification.to_json()

    def interval(self, method: str, tasks: Sequence[str], rounds: int = 1000,
                 seed: int = 0) -> tuple[float, float] | None:
        """Bootstrap 95% interval of ``method``'s average over ``tasks``: each task's prompts resampled with
        replacement (a percentile interval over ``rounds`` resamples, seeded)."""
        per = [self.correct.get(method, {}).get(t) for t in tasks]
        per = [torch.tensor(p, dtype=torch.float64) for p in per if p]
        if not per:
            return None
        g = torch.Generator().manual_seed(seed)
        means = torch.stack([p[torch.randint(len(p), (rounds, len(p)), generator=g)].mean(1) for p in per]).mean(0)
        lo, hi = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
        return lo, hi

    def average(self, method: str, tasks: Sequence[str]) -> float | None:
        vals = [self.scores[method][t] for t in tasks if t in self.scores.get(method, {})]
        return sum(vals) / len(vals) if vals else None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EvalResult:
        return cls(scores=data.get("scores", {}), retrieval=data.get("retrieval", {}),
                   samples=data.get("samples", {}), config=data.get("config", {}), info=data.get("info", {}),
                   correct=data.get("correct", {}), identification=data.get("identification", {}))

    def updated(self, new: EvalResult) -> EvalResult:
        """This table with ``new``'s methods added or replaced (both must use the same limit and split)."""
        defaults = {"phrasing": "seen"}  # tables made before phrasings were chosen asked in the seen ones
        for key in ("limit", "split", "phrasing"):
            if self.config.get(key, defaults.get(key)) != new.config.get(key, defaults.get(key)):
                raise ValueError(f"cannot update a table made with {key}={self.config.get(key)!r} by one made with "
                                 f"{key}={new.config.get(key)!r}")
        out = EvalResult({**self.scores, **new.scores}, {**self.retrieval, **new.retrieval},
                         {**self.samples, **new.samples}, dict(self.config), {**self.info, **new.info},
                         {**self.correct, **new.correct}, {**self.identification, **new.identification})
        out.config["methods"] = list(out.scores)
        out.config.setdefault("updates", []).append({k: new.config.get(k) for k in ("command", "seconds")})
        return out

    def to_json(self) -> dict[str, Any]:
        return {"config": self.config, "scores": self.scores,
                "averages": {m: {"held_in": self.average(m, HELD_IN), "held_out": self.average(m, HELD_OUT)}
                             for m in self.scores},
                "intervals": {m: {"held_in": self.interval(m, HELD_IN), "held_out": self.interval(m, HELD_OUT)}
                              for m in self.scores},
                "retrieval": self.retrieval, "identification": self.identification, "info": self.info,
                "samples": self.samples, "correct": self.correct}


def evaluate(model: Any, tokenizer: Any, methods: Sequence[str] = ("base", "oracle", "uniform"),
             tasks: Sequence[str] | None = None, limit: int = 50, batch_size: int = 32, progress: bool = True,
             samples_per_task: int = 3, split: str = "test", phrasing: str = "seen") -> EvalResult:
    """Run ``methods`` on ``limit`` examples of ``split`` for each task with ``model`` (a
    :class:`~moerge.MoErgeModel`); ``phrasing="unseen"`` asks the held-in tasks in the phrasings held out of the
    experts' training and the routers' data (held-out tasks have none and are left out)."""
    from moerge.lab.tasks import unseen_examples

    if phrasing not in ("seen", "unseen"):
        raise ValueError(f"phrasing must be 'seen' or 'unseen', got {phrasing!r}")
    from tqdm.auto import tqdm

    tasks = list(tasks or (HELD_IN + HELD_OUT))
    if phrasing == "unseen":
        tasks = [t for t in tasks if t in HELD_IN]
    result = EvalResult(config={"methods": list(methods), "tasks": tasks, "limit": limit,
                                "experts": list(model.experts), "batch_size": batch_size,
                                "split": split, "phrasing": phrasing})
    original_router = model.router
    jobs = [(m, t) for m in methods for t in tasks if _method(m).applies_to(t)]
    bar = tqdm(total=len(jobs) * limit, desc="eval", disable=not progress)
    try:
        for mname in methods:
            method = _method(mname)
            router = method.router() if callable(method.router) else method.router
            run_model = method.make_model(model) if method.make_model is not None else model
            if isinstance(run_model, tuple):  # (model, facts about it to report)
                run_model, result.info[mname] = run_model
            if run_model is model:
                model.set_router(router if router else original_router)
            elif router:
                run_model.set_router(router)
            result.scores[mname], result.samples[mname], result.correct[mname] = {}, {}, {}
            for task in tasks:
                if not method.applies_to(task):
                    continue
                examples = (unseen_examples(task, limit, split) if phrasing == "unseen"
                            else get_task(task).examples(limit, split))
                longest = max(len(tokenizer(e.target, add_special_tokens=False)["input_ids"]) for e in examples)
                correct, shown, marks = 0, [], []
                for i in range(0, len(examples), batch_size):
                    chunk = examples[i : i + batch_size]
                    answers = generate_answers(run_model, tokenizer, chunk, method.experts_for(chunk, run_model),
                                               max_new_tokens=longest + 4)
                    for e, a in zip(chunk, answers):
                        ok = exact_match(a, e.target)
                        correct += ok
                        marks.append(int(ok))
                        if len(shown) < samples_per_task:
                            shown.append({"prompt": e.prompt, "target": e.target, "answer": a, "correct": ok})
                    bar.update(len(chunk))
                result.scores[mname][task] = correct / len(examples)
                result.correct[mname][task] = marks
                result.samples[mname][task] = shown
    finally:
        model.set_router(original_router)
        bar.close()
    return result


def retrieval_accuracy(router: Any, tasks: Sequence[str] | None = None, limit: int = 50, k: int | None = None,
                       unseen: bool = False, split: str = "test") -> dict[str, float]:
    """Top-1 and top-K accuracy of a global router's retrieval (``router.retrieve``) against each prompt's true
    task, over ``limit`` prompts of ``split`` per held-in task; ``unseen`` asks in phrasings no expert saw."""
    from moerge.lab.tasks import unseen_examples

    tasks = list(tasks or HELD_IN)
    k = k or router.config.candidates
    top1 = topk = total = 0
    per_task: dict[str, float] = {}
    for task in tasks:
        exs = unseen_examples(task, limit, split) if unseen else get_task(task).examples(limit, split)
        names, _ = router.retrieve([e.prompt for e in exs], k)
        hits = [row[0] == task for row in names]
        per_task[task] = sum(hits) / len(hits)
        top1 += sum(hits)
        topk += sum(task in row for row in names)
        total += len(exs)
    return {"top1": top1 / total, f"top{k}": topk / total, "k": k, "prompts": total, "per_task_top1": per_task}


def to_markdown(result: EvalResult) -> str:
    """The table: one column per method, one row per task, then held-in and held-out averages (EM, %)."""
    summary = [m for m in result.scores if m.startswith(("merge:", "compress:"))]
    methods = [m for m in result.scores if m not in summary]
    fmt = lambda v: "—" if v is None else f"{100 * v:.1f}"  # noqa: E731
    lines = ["| task | " + " | ".join(methods) + " |", "| --- | " + " | ".join("---:" for _ in methods) + " |"]
    for group, names in (("held-in", HELD_IN), ("held-out", HELD_OUT)):
        for t in names:
            if any(t in result.scores[m] for m in methods):
                lines.append(f"| {t} ({group}) | " + " | ".join(fmt(result.scores[m].get(t)) for m in methods) + " |")
    for label, names in (("**average held-in**", HELD_IN), ("**average held-out**", HELD_OUT)):
        if any(result.average(m, names) is not None for m in methods):
            lines.append(f"| {label} | " + " | ".join(fmt(result.average(m, names)) for m in methods) + " |")
            ci = [result.interval(m, names) for m in methods]
            if any(ci):
                lines.append("| *95% interval (bootstrap)* | " + " | ".join(
                    "—" if c is None else f"{100 * c[0]:.1f}–{100 * c[1]:.1f}" for c in ci) + " |")
    if "oracle" in result.scores and result.average("oracle", HELD_IN):
        oracle = result.average("oracle", HELD_IN)
        lines.append("| *held-in, % of oracle* | " + " | ".join(
            "—" if result.average(m, HELD_IN) is None else f"{100 * result.average(m, HELD_IN) / oracle:.1f}"
            for m in methods) + " |")
    oracle = result.average("oracle", HELD_IN) if "oracle" in result.scores else None
    of_oracle = lambda v: "—" if v is None or not oracle else f"{100 * v / oracle:.1f}"  # noqa: E731
    merges = [m for m in summary if m.startswith("merge:")]
    if merges:
        lines += ["", "| static merge of all experts | held-in | held-out | held-in, % of oracle |",
                  "| --- | ---: | ---: | ---: |"]
        for m in merges:
            hi = result.average(m, HELD_IN)
            lines.append(f"| {m.removeprefix('merge:')} | {fmt(hi)} | {fmt(result.average(m, HELD_OUT))} | "
                         f"{of_oracle(hi)} |")
    packs = [m for m in summary if m.startswith("compress:")]
    if packs:
        lines += ["", "| compression (each task's own expert) | size ratio | bytes | held-in | Δ vs oracle | "
                      "% of oracle |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for m in packs:
            hi, info = result.average(m, HELD_IN), result.info.get(m, {})
            delta = "—" if hi is None or oracle is None else f"{100 * (hi - oracle):+.1f}"
            ratio = f"{info['size_ratio']:.1f}×" if "size_ratio" in info else "—"
            lines.append(f"| {m.removeprefix('compress:')} | {ratio} | {info.get('bytes', 0):,} | {fmt(hi)} | "
                         f"{delta} | {of_oracle(hi)} |")
    if result.identification:
        lines += ["", "| local gate: tokens whose best-scored expert is the prompt's own | answer tokens | "
                      "answer, deep third of the layers | prompt tokens |", "| --- | ---: | ---: | ---: |"]
        for m, r in result.identification.items():
            if "error" in r:
                lines.append(f"| {m} | failed: {r['error']} | | |")
            else:
                lines.append(f"| {m} | {fmt(r['answer'])} | {fmt(r['answer_deep'])} | {fmt(r['prompt'])} |")
    if result.retrieval:
        lines += ["", "| global retrieval (held-in test prompts) | top-1 | top-K | K | prompts |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for label, r in result.retrieval.items():
            k = r["k"]
            lines.append(f"| {label} | {100 * r['top1']:.1f} | {100 * r[f'top{k}']:.1f} | {k} | {r['prompts']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m moerge.lab.eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--library", default=None, help="expert library (default: the committed zoo)")
    ap.add_argument("--methods", default="base,oracle,uniform", help=f"comma-separated; known: {list_methods()}")
    ap.add_argument("--tasks", default=None, help="comma-separated task names (default: all)")
    ap.add_argument("--limit", type=int, default=50, help="test examples per task")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--split", default="test", choices=("dev", "test"),
                    help="which prompts: 'dev' to tune settings, 'test' for the reported table")
    ap.add_argument("--phrasing", default="seen", choices=("seen", "unseen"),
                    help="'unseen': held-in tasks asked in the phrasings held out of training and routing data")
    ap.add_argument("--out", default="results", help="folder for eval.json and eval.md")
    ap.add_argument("--retrieval", action="store_true",
                    help="also measure the global router's top-1/top-K retrieval accuracy")
    ap.add_argument("--identify", type=int, default=0, metavar="N",
                    help="also measure, for N prompts per held-in task, how often each router's local gate picks "
                         "the prompt's expert per token (python -m moerge.lab.identify)")
    ap.add_argument("--update", action="store_true",
                    help="add these methods to the table already in --out (same limit and split), keeping the rest")
    args = ap.parse_args(argv)
    from moerge.lab.defaults import default_base
    from moerge.lab.zoo import DEFAULT_ZOO
    from moerge.runtime.model import MoErgeModel

    torch.manual_seed(0)
    t0 = time.time()
    base, tok = default_base()
    model = MoErgeModel.from_library(base, args.library or DEFAULT_ZOO, tokenizer=tok)
    methods = split_methods(args.methods)
    tasks = [t for t in args.tasks.split(",") if t] if args.tasks else None
    result = evaluate(model, tok, methods, tasks, limit=args.limit, batch_size=args.batch_size, split=args.split,
                      phrasing=args.phrasing)
    if args.retrieval:
        from moerge.routers import build_router

        glider = build_router("glider", local="none")
        model.set_router(glider)
        result.retrieval["seen phrasings"] = retrieval_accuracy(glider, limit=args.limit, split=args.split)
        result.retrieval["unseen phrasings"] = retrieval_accuracy(glider, limit=args.limit, unseen=True,
                                                                  split=args.split)
    if args.identify:
        from moerge.lab.identify import identification_examples, token_identification

        examples = identification_examples(args.split, args.identify, args.phrasing)
        for mname in methods:
            method = _method(mname)
            if method.router is None or method.make_model is not None:
                continue
            model.set_router(method.router() if callable(method.router) else method.router)
            if model.router.has_local_gate and model.router.has_linear_gate:
                try:
                    result.identification[mname] = token_identification(model, tok, examples, label=mname).to_json()
                except Exception as e:  # noqa: BLE001 - the table is saved anyway; the failure is in it
                    result.identification[mname] = {"error": f"{type(e).__name__}: {e}"}
    result.config["seconds"] = round(time.time() - t0, 1)
    result.config["command"] = "python -m moerge.lab.eval " + " ".join(argv if argv is not None else __import__(
        "sys").argv[1:])
    out = Path(args.out)
    if args.update and (out / "eval.json").is_file():
        result = EvalResult.from_json(json.loads((out / "eval.json").read_text())).updated(result)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(result.to_json(), indent=2))
    md = to_markdown(result)
    (out / "eval.md").write_text(md + "\n")
    print(md)
    print(f"saved {out / 'eval.json'} and {out / 'eval.md'} ({result.config['seconds']} s)")


if __name__ == "__main__":
    main()
