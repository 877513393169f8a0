"""Crash safety (processes killed mid-write), concurrency (threads changing the experts while others generate; two
processes writing one library) and determinism (the same routing and output across runs and reloads)."""

from __future__ import annotations

import copy
import json
import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from moerge import ExpertLibrary, MoErgeModel
from moerge.core.fingerprint import linear_modules
from moerge.core.safe_io import TMP_PREFIX
from moerge.routers import build_router

from helpers import VOCAB, rand_expert, tiny_chat_llama, tiny_llama, tiny_tokenizer

WORKER = Path(__file__).with_name("crash_worker.py")
# Runs the crash worker with os.replace wrapped: at the PAUSE-th replace (every write's commit point: a temp file or
# folder renamed into place, an old folder moved aside) it prints "paused" and blocks on stdin, so the test kills
# it at a known point inside a write. PAUSE 0 never pauses.
PAUSING = """
import os, runpy, sys

pause, worker = int(sys.argv[1]), sys.argv[2]
sys.argv = sys.argv[2:]
seen = 0
_replace = os.replace


def replace(src, dst, **kwargs):
    global seen
    seen += 1
    if seen == pause:
        print("paused", flush=True)
        sys.stdin.readline()  # the test kills the process here; an end of input means the test went away
        os._exit(1)
    return _replace(src, dst, **kwargs)


os.replace = replace
runpy.run_path(worker, run_name="__main__")
"""


def _shapes(base) -> dict:
    return {m: list(s) for m, s in linear_modules(base).items() if m.endswith(("q_proj", "v_proj"))}


def _worker(root: Path, seed: int, shapes: dict, *extra: str, pause: int = 0) -> subprocess.Popen:
    """Start tests/crash_worker.py on library ``root``; with ``pause``, it stops at its ``pause``-th os.replace."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.Popen([sys.executable, "-c", PAUSING, str(pause), str(WORKER), str(root), str(seed),
                          json.dumps(shapes), *extra],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert p.stdout.readline().strip() == "ready", p.stderr.read()
    return p


def _check_library(root: Path) -> ExpertLibrary:
    lib = ExpertLibrary.open(root)  # repairs what a killed write left
    assert lib.verify() == []
    leftovers = [p for p in root.rglob(TMP_PREFIX + "*")]
    assert leftovers == [], leftovers
    for name in lib.names():  # every listed expert loads, with its routing data
        lib.get(name)
        for kind in lib.routing_kinds(name):
            assert lib.get_routing(name, kind) is not None
    return lib


@pytest.mark.slow
def test_processes_killed_inside_writes_leave_a_library_that_opens_and_verifies(tmp_path):
    """16 writer processes, each killed at a seeded point inside one of its writes (at its k-th os.replace: an add,
    an overwrite, a remove, routing data or an index save half done); after each kill the library opens, repairs
    what the write left and verifies."""
    base = tiny_llama()
    root = tmp_path / "lib"
    lib = ExpertLibrary.create(root, base_model=base)
    for i in range(2):
        lib.add(rand_expert(base, f"seed{i}", seed=i, modules=("q_proj", "v_proj")))
    shapes = _shapes(base)
    rng = random.Random(0)
    sizes, interrupted = [], 0
    for trial in range(16):
        p = _worker(root, trial, shapes, pause=rng.randint(1, 40))
        state = p.stdout.readline().strip()  # "paused": the worker waits inside a write
        p.send_signal(signal.SIGKILL)
        _, err = p.communicate(timeout=60)
        assert state == "paused", err
        interrupted += any(root.rglob(TMP_PREFIX + "*"))  # temp files or folders of the write left behind
        sizes.append(len(_check_library(root)))
    assert max(sizes) > 2  # the workers did change the library before they were killed
    assert interrupted >= 8, f"only {interrupted} of 16 kills left a write's temp files to repair"


@pytest.mark.slow
def test_two_processes_writing_one_library_lose_nothing(tmp_path):
    base = tiny_llama()
    root = tmp_path / "lib"
    ExpertLibrary.create(root, base_model=base)
    shapes = _shapes(base)
    procs = [_worker(root, seed, shapes, "15") for seed in (1, 2)]  # each adds 15 experts, at the same time
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    lib = _check_library(root)
    assert sorted(lib.names()) == sorted(f"p{s}-{i}" for s in (1, 2) for i in range(1, 16))


def _version(base, seed: int):
    return rand_expert(base, "e", seed=seed, rank=4, modules=("q_proj", "v_proj", "down_proj"))


def test_threads_changing_experts_while_others_generate_see_one_version_each():
    """700 expert changes, each made while three threads are paused inside a call (a forward, or a step of a
    generate, between the base's two decoder layers): one thread replaces expert "e" between two versions and adds
    and removes others, three threads run forward and generate with "e". Every call's output must be exactly that
    of one version (a call never mixes layers of both, nor changes version mid-generation).

    A barrier makes the overlap certain, whatever the machine's speed: in each round the three callers stop inside
    a call and wait, the changer makes one change, then all four go on."""
    base = tiny_llama()
    v0, v1 = _version(base, 10), _version(base, 11)
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False, pad_token_id=0,
              output_scores=True, return_dict_in_generate=True)
    refs = []
    for v in (v0, v1):
        m = MoErgeModel(copy.deepcopy(base), build_router("explicit"))
        m.add_expert(v)
        with torch.no_grad():
            logits = m(input_ids=ids, experts={"e": 1.0}).logits
            scores = torch.stack(m.generate(ids, experts={"e": 1.0}, **kw).scores)
        refs.append((logits, scores))
    assert not torch.allclose(refs[0][0], refs[1][0])

    users, changes = 3, 700
    patched = copy.deepcopy(base)
    model = MoErgeModel(patched, build_router("explicit"))
    model.add_expert(v0)
    # the timeout only turns a deadlock into a failure: every wait ends as soon as the other threads arrive
    turn = threading.Barrier(users + 1, timeout=300)
    done = threading.Event()  # set by the changer before it releases the last round
    errors: list[BaseException] = []
    seen: list[tuple[str, int]] = []

    def pause(module, args) -> None:  # runs inside every forward pass of the patched model, in a caller's thread
        if not done.is_set():
            turn.wait()  # all three callers are inside a call: the changer may change now
            turn.wait()  # the change is made

    patched.model.layers[-1].register_forward_pre_hook(pause)

    def which(x: torch.Tensor, i: int) -> int:
        hits = [k for k in (0, 1) if torch.allclose(x, refs[k][i], atol=1e-5, rtol=1e-5)]
        assert len(hits) == 1, "an output that is neither version: mixed experts"
        return hits[0]

    def user(u: int) -> None:
        try:
            n = 0
            while not done.is_set():
                with torch.no_grad():
                    if (n + u) % 3:
                        seen.append(("forward", which(model(input_ids=ids, experts={"e": 1.0}).logits, 0)))
                    else:
                        seen.append(("generate", which(torch.stack(
                            model.generate(ids, experts={"e": 1.0}, **kw).scores), 1)))
                n += 1
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
            turn.abort()

    def changer() -> None:
        rng = random.Random(1)
        try:
            for i in range(changes):
                turn.wait()
                r = rng.random()
                if r < 0.6:
                    model.add_expert(v1 if i % 2 else v0, overwrite=True, persist=False)
                elif r < 0.8 or "x" not in model.experts:
                    model.add_expert(rand_expert(base, "x", seed=i, rank=2), overwrite=True, persist=False)
                else:
                    model.remove_expert("x", persist=False)
                if i == changes - 1:
                    done.set()
                turn.wait()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
            turn.abort()

    threads = [threading.Thread(target=user, args=(u,)) for u in range(users)] + [threading.Thread(target=changer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert done.is_set()
    # every round paused each caller in one forward pass: 3 × 700 passes, a generate taking 3 of them
    assert {kind for kind, _ in seen} == {"forward", "generate"} and {v for _, v in seen} == {0, 1}
    # new calls see the newest version
    model.add_expert(v1, overwrite=True, persist=False)
    with torch.no_grad():
        assert which(model(input_ids=ids, experts={"e": 1.0}).logits, 0) == 1


@pytest.mark.parametrize("router", ["arrow", "glider"])
def test_same_prompt_library_and_seed_give_the_same_routing_and_output_after_a_reload(tmp_path, router):
    base = tiny_chat_llama()
    lib = ExpertLibrary.create(tmp_path / "lib", base_model=base)
    for i, (n, d) in enumerate({"sort": "Sort words alphabetically.", "french": "Translate English to French.",
                                "sql": "Write SQL queries."}.items()):
        lib.add(rand_expert(base, n, seed=i, rank=4, description=d, examples=[d]))
    tok = tiny_tokenizer()
    prompts = tok(["sort: pear fig", "translate: the cat"], return_tensors="pt", padding=True)

    def run():
        model = MoErgeModel.from_library(copy.deepcopy(base), ExpertLibrary.open(lib.root),
                                         router=build_router(router, **({"local": "arrow"} if router == "glider"
                                                                        else {})), tokenizer=tok)
        torch.manual_seed(0)
        out = model.generate(**prompts, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
        return out, [(r.candidates, r.experts) for r in model.last_routing]

    first, again, reloaded = run(), run(), run()  # each run reopens the library and rebuilds the model
    for other in (again, reloaded):
        assert torch.equal(first[0], other[0])
        assert first[1] == other[1]


def test_a_reader_with_a_stale_manifest_gets_the_current_expert(tmp_path):
    base = tiny_llama()
    writer = ExpertLibrary.create(tmp_path / "lib", base_model=base)
    writer.add(rand_expert(base, "a", seed=1))
    reader = ExpertLibrary.open(writer.root)  # e.g. another process
    new = rand_expert(base, "a", seed=2)
    writer.add(new, overwrite=True)
    got = reader.get("a")
    m = next(iter(new.modules))
    assert torch.equal(got.modules[m].A, new.modules[m].A)


def test_last_routing_is_per_thread():
    base = tiny_llama()
    model = MoErgeModel(copy.deepcopy(base), build_router("explicit"))
    model.add_expert(rand_expert(base, "a", seed=1))
    model.add_expert(rand_expert(base, "b", seed=2))
    ids = torch.randint(3, VOCAB, (1, 4))
    with torch.no_grad():
        model(input_ids=ids, experts={"a": 1.0})
        t = threading.Thread(target=lambda: model(input_ids=ids, experts={"b": 1.0}))
        t.start()
        t.join()
    assert model.last_routing[0].experts == {"a": 1.0}
    assert copy.deepcopy(model).last_routing is None  # a copy is a new model
