"""The library, route and generate commands of the moerge CLI, in-process, on a tiny chat model saved to disk."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading

import pytest
import torch
from typer.testing import CliRunner

from moerge import ExpertLibrary
from moerge.cli import app

from helpers import save_peft_lora, tiny_chat_llama, tiny_tokenizer

runner = CliRunner()


def _run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture
def setup(tmp_path):
    base = tiny_chat_llama()
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    tiny_tokenizer().save_pretrained(base_dir)
    adapters = {n: save_peft_lora(base, tmp_path / n, seed=i, r=4, target_modules=["q_proj", "v_proj"])
                for i, n in enumerate(("sort", "french"))}
    return base, base_dir, adapters, tmp_path / "lib"


def _json(args):
    result = runner.invoke(app, [str(a) for a in args] + ["--json"])
    return result.exit_code, json.loads(result.stdout.strip().splitlines()[-1])


def test_library_commands_end_to_end(setup, tmp_path):
    base, base_dir, adapters, lib_dir = setup
    code, data = _json(["library", "init", lib_dir, "--base", base_dir, "--max-rank", "8"])
    assert code == 0 and data["max_rank"] == 8 and ExpertLibrary.open(lib_dir).base_fingerprint
    code, data = _json(["library", "add", adapters["sort"], "-n", "sort", "-l", lib_dir, "-d",
                        "Sort words alphabetically.", "--example", "sort: pear fig", "--example", "order: b a"])
    assert code == 0 and data["expert"] == "sort" and data["kind"] == "lora" and data["ranks"] == [4]
    assert _json(["library", "add", adapters["french"], "-n", "french", "-l", lib_dir, "-d",
                  "Translate English to French."])[0] == 0
    code, data = _json(["library", "add", adapters["sort"], "-n", "sort", "-l", lib_dir])  # exists already
    assert code == 1 and "already exists" in data["error"]
    # a broken adapter: exit code 1, the file and the expert named, nothing changed
    f = adapters["french"] / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-9])
    code, data = _json(["library", "add", adapters["french"], "-n", "broken", "-l", lib_dir])
    assert code == 1 and str(f) in data["error"] and "'broken'" in data["error"]
    # a full fine-tune, stored as its low-rank difference from the base
    tuned = tiny_chat_llama()
    with torch.no_grad():
        tuned.model.layers[0].self_attn.q_proj.weight.add_(0.01)
    tuned.save_pretrained(tmp_path / "tuned")
    code, data = _json(["library", "add", tmp_path / "tuned", "-n", "tuned", "--finetune", "--rank", "2",
                        "--base", base_dir, "-l", lib_dir])
    assert code == 0 and data["modules"] == 1 and data["ranks"] == [2]
    code, data = _json(["library", "list", "-l", lib_dir])
    assert [e["name"] for e in data["experts"]] == ["sort", "french", "tuned"]
    code, data = _json(["library", "show", "sort", "-l", lib_dir])
    assert code == 0 and data["examples"] == ["sort: pear fig", "order: b a"]
    assert data["description"] == "Sort words alphabetically."
    assert _json(["library", "show", "nope", "-l", lib_dir])[0] == 1
    code, data = _json(["library", "rm", "tuned", "-l", lib_dir])
    assert code == 0 and data["experts"] == 2
    assert _json(["library", "verify", "-l", lib_dir]) == (0, {"ok": True, "library": str(lib_dir), "experts": 2,
                                                                "problems": []})
    code, out = _run("library", "list", "-l", lib_dir)  # the table for people
    assert code == 0 and "sort" in out and "french" in out


@pytest.fixture
def lib(setup):
    base, base_dir, adapters, lib_dir = setup
    lib = ExpertLibrary.create(lib_dir, base_model=base)
    lib.add_peft(adapters["sort"], "sort", description="Sort words alphabetically.",
                 examples=["Sort these words: pear apple fig"])
    lib.add_peft(adapters["french"], "french", description="Translate English text into French.",
                 examples=["Translate to French: the cat sleeps"])
    return base_dir, lib_dir


def test_route_explains_candidates_weights_and_layer_usage(lib):
    base_dir, lib_dir = lib
    code, data = _json(["route", "Sort these words: kiwi banana", "-l", lib_dir, "--base", base_dir,
                        "--router", "glider", "--explain"])
    assert code == 0 and data["router"] == "glider"
    assert list(data["candidates"])[0] == "sort"  # retrieval ranks the sorting expert first
    assert sum(data["experts"].values()) == pytest.approx(1.0, abs=1e-5)
    usage = data["layer_usage"]
    assert usage and all(sum(u.values()) == pytest.approx(1.0, abs=1e-4) for u in usage.values())
    code, out = _run("route", "Sort these words: kiwi banana", "-l", lib_dir, "--base", base_dir, "--router", "arrow",
                     "--explain")
    assert code == 0 and "candidate" in out and "q_proj" in out  # a table, then the per-layer account


def test_router_options_on_the_command_line(lib):
    base_dir, lib_dir = lib
    code, data = _json(["route", "Sort these words: kiwi banana", "-l", lib_dir, "--base", base_dir,
                        "--router", "glider?candidates=1&local=none"])
    assert code == 0 and data["experts"] == {"sort": pytest.approx(1.0)}  # one candidate, mixed per sequence
    code, data = _json(["route", "x", "-l", lib_dir, "--base", base_dir, "--router", "glider?candidates"])
    assert code == 1 and "key=value" in data["error"] and "'candidates'" in data["error"]
    code, data = _json(["route", "x", "-l", lib_dir, "--base", base_dir, "--router", "glider?nope=1"])
    assert code == 1 and "nope" in data["error"] and "candidates" in data["error"]  # its options are listed


def test_generate_with_routing_or_a_forced_mix(lib):
    base_dir, lib_dir = lib
    code, data = _json(["generate", "Translate to French: the dog", "-l", lib_dir, "--base", base_dir, "-n", "4",
                        "--router", "arrow"])
    assert code == 0 and isinstance(data["answer"], str) and set(data["experts"]) <= {"sort", "french"}
    code, data = _json(["generate", "anything", "-l", lib_dir, "--base", base_dir, "-n", "3",
                        "--experts", "french=1"])
    assert code == 0 and data["experts"] == {"french": 1.0}
    code, data = _json(["generate", "anything", "-l", lib_dir, "--base", base_dir, "--experts", "nope=1"])
    assert code == 1 and "unknown expert" in data["error"]
    code, data = _json(["generate", "anything", "-l", lib_dir, "--base", base_dir, "--experts", "french=x"])
    assert code == 1 and "name=weight" in data["error"]


def test_generate_under_an_expert_cache_budget_and_pins(lib):
    base_dir, lib_dir = lib
    code, full = _json(["generate", "anything", "-l", lib_dir, "--base", base_dir, "-n", "3", "--experts", "french=1"])
    code2, small = _json(["generate", "anything", "-l", lib_dir, "--base", base_dir, "-n", "3", "--experts",
                          "french=1", "--cache-mib", "0", "--pin", "sort"])
    assert code == code2 == 0 and small["answer"] == full["answer"]
    code, data = _json(["generate", "anything", "-l", lib_dir, "--base", base_dir, "--pin", "nope"])
    assert code == 1 and "pin" in data["error"] and "nope" in data["error"]


def test_route_shows_the_task_description_the_llm_wrote(lib):
    base_dir, lib_dir = lib
    code, data = _json(["route", "Sort these words: kiwi banana", "-l", lib_dir, "--base", base_dir,
                        "--query", "both"])
    assert code == 0 and isinstance(data["description"], str) and data["candidates"]
    code, data = _json(["route", "x", "-l", lib_dir, "--base", base_dir, "--router", "arrow", "--query", "both"])
    assert code == 1 and "glider" in data["error"]


@pytest.mark.slow
def test_eval_command_runs_the_harness(tmp_path):
    code, out = _run("eval", "--methods", "base,oracle", "--tasks", "uppercase", "--limit", "2", "--out", tmp_path)
    assert code == 0, out
    result = json.loads((tmp_path / "eval.json").read_text())
    assert set(result["scores"]) >= {"base", "oracle"}


@pytest.mark.parametrize("module", ["fastapi", "uvicorn"])
def test_serve_without_the_server_extra_says_what_to_install(lib, monkeypatch, module):
    base_dir, lib_dir = lib
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed: importing it fails, find_spec is None
    code, out = _run("serve", "-l", lib_dir, "--base", base_dir)
    assert code == 1 and module in out and 'pip install "moerge[server]"' in " ".join(out.split())


HANG_GUARD = 300  # seconds: only a server that never starts or never answers takes this long


def _listening_port(proc: subprocess.Popen) -> int:
    """The port ``moerge serve --port 0`` listens on, from uvicorn's startup line (logged once it accepts)."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if m := re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", line):
            return int(m.group(1))
    raise AssertionError("moerge serve ended before listening:\n" + "".join(seen))


def test_serve_command_answers_over_http(lib):
    import httpx

    base_dir, lib_dir = lib
    with subprocess.Popen([sys.executable, "-m", "moerge.cli", "serve", "-l", str(lib_dir), "--base", str(base_dir),
                           "--router", "arrow", "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}) as proc:
        guard = threading.Timer(HANG_GUARD, proc.kill)  # a hung server ends, and so does the read of its output
        guard.start()
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{_listening_port(proc)}", timeout=HANG_GUARD) as http:
                models = http.get("/v1/models").json()
                assert [m["id"] for m in models["data"]] == ["moerge", "moerge/sort", "moerge/french"]
                r = http.post("/v1/completions", json={"prompt": "abc", "max_tokens": 3, "temperature": 0}).json()
                assert r["object"] == "text_completion" and isinstance(r["choices"][0]["text"], str)
        finally:
            proc.terminate()
            proc.wait()
            guard.cancel()


def test_library_commands_on_a_library_in_s3(setup, s3, monkeypatch, tmp_path):
    """The same commands with ``-l s3://…``: the library lives on a real S3 API (moto's server on 127.0.0.1)."""
    from helpers import s3_keys

    base, base_dir, adapters, _ = setup
    code, data = _json(["library", "init", s3.url, "--base", base_dir])
    assert code == 0 and data["library"] == s3.url and s3_keys(s3) == ["library.json"]
    code, data = _json(["library", "add", adapters["sort"], "-n", "sort", "-l", s3.url, "-d", "Sort words.",
                        "--example", "sort: pear fig"])
    assert code == 0 and data["expert"] == "sort" and "experts/sort/weights.safetensors" in s3_keys(s3)
    monkeypatch.setenv("MOERGE_CACHE", str(tmp_path / "elsewhere"))  # another machine
    code, data = _json(["library", "show", "sort", "-l", s3.url])
    assert code == 0 and data["examples"] == ["sort: pear fig"]
    code, data = _json(["library", "verify", "-l", s3.url])
    assert code == 0 and data["ok"] and data["experts"] == 1
    code, data = _json(["generate", "anything", "-l", s3.url, "--base", base_dir, "-n", "2", "--experts", "sort=1"])
    assert code == 0 and data["experts"] == {"sort": 1.0}
    assert "routing/index/index.json" in s3_keys(s3)  # the default router's index, stored for every machine
    code, data = _json(["library", "rm", "sort", "-l", s3.url])
    assert code == 0 and not [k for k in s3_keys(s3) if k.startswith("experts/")]
    code, data = _json(["library", "list", "-l", f"s3://{s3.bucket}/nothing"])
    assert code == 1 and f"s3://{s3.bucket}/nothing/library.json" in data["error"] and "no library" in data["error"]


def test_serve_on_ray_checks_its_options_and_library_before_starting_ray(lib, tmp_path, monkeypatch):
    base_dir, lib_dir = lib
    code, out = _run("serve", "-l", lib_dir, "--base", base_dir, "--ray", "--autoscale", "3")
    assert code == 1 and "--autoscale takes 'MIN,MAX'" in out
    code, out = _run("serve", "-l", lib_dir, "--base", base_dir, "--ray", "--replicas", "0")
    assert code == 1 and "replicas must be a positive integer" in out
    code, out = _run("serve", "-l", tmp_path / "missing", "--base", base_dir, "--ray")
    assert code == 1 and "missing" in out
    code, out = _run("serve", "-l", lib_dir, "--base", base_dir, "--ray", "--router", "glider?candidates=zero")
    assert code == 1 and "candidates" in out
    code, out = _run("serve", "-l", lib_dir, "--base", base_dir, "--ray", "--router", "nosuch")
    assert code == 1 and "nosuch" in out
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    code, out = _run("serve", "-l", lib_dir, "--base", base_dir, "--ray")
    assert code == 1 and 'pip install "moerge[server,ray]"' in " ".join(out.split())


def test_serve_refuses_a_key_for_everything_without_a_key(tmp_path):
    code, out = _run("serve", "-l", tmp_path, "--api-key-for-all")
    assert code == 1 and "--api-key-for-all needs --api-key" in out


def test_library_add_takes_the_base_a_dora_adapter_needs(setup):
    base, base_dir, _, lib_dir = setup
    assert _json(["library", "init", lib_dir, "--base", base_dir])[0] == 0
    dora = save_peft_lora(base, lib_dir.parent / "dora", r=4, target_modules=["q_proj", "v_proj"], use_dora=True)
    code, data = _json(["library", "add", dora, "-n", "dora", "-l", lib_dir])
    assert code == 1 and "DoRA" in data["error"] and "--base" in data["error"]  # exact only against the base
    assert ExpertLibrary.open(lib_dir).names() == []
    code, data = _json(["library", "add", dora, "-n", "dora", "-l", lib_dir, "--base", base_dir])
    assert code == 0 and data["kind"] == "delta" and data["modules"] == 4
