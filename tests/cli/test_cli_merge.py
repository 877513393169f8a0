"""The merge, compress and transfer commands of the moerge CLI, run in-process on tiny bases saved to disk."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from typer.testing import CliRunner

from moerge import ExpertLibrary, MoErgeModel
from moerge.adapters.merge import merge_experts
from moerge.cli import app

from helpers import peft_logits, rand_expert, tiny_llama

runner = CliRunner()


@pytest.fixture
def setup(tmp_path):
    base = tiny_llama(0)
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    lib = ExpertLibrary.create(tmp_path / "lib", base_model=base)
    for i, n in enumerate(("a", "b", "c")):
        lib.add(rand_expert(base, n, seed=i, rank=4))
    return base, base_dir, lib


def _run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout


def test_merge_cat_writes_a_peft_adapter_that_peft_runs(setup, tmp_path):
    base, base_dir, lib = setup
    code, out = _run("merge", "-l", lib.root, "--method", "cat", "--experts", "a,b", "--weights", "0.5,0.5",
                     "-o", tmp_path / "out", "--json")
    assert code == 0, out
    data = json.loads(out)
    assert data["ok"] and data["format"] == "peft" and data["low_rank"]
    ids = torch.randint(3, 96, (2, 8), generator=torch.Generator().manual_seed(0))
    reference = peft_logits(base, tmp_path / "out", ids)
    model = MoErgeModel.from_library(copy.deepcopy(base), lib)
    with torch.no_grad():
        ours = model(input_ids=ids, experts={"a": 0.5, "b": 0.5}).logits
    torch.testing.assert_close(reference, ours, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method, flags, kwargs", [
    ("ties", [], {}),
    ("dare_ties", ["--seed", "3", "--lines", "0.5,0.5"], {"layer_scaling": (0.5, 0.5)}),
])
def test_merge_writes_a_full_model_equal_to_the_api_merge(setup, tmp_path, method, flags, kwargs):
    from transformers import AutoModelForCausalLM

    base, base_dir, lib = setup
    code, out = _run("merge", "-l", lib.root, "--method", method, "--experts", "a,b,c", "--density", "0.5",
                     *flags, "--base", base_dir, "-o", tmp_path / "full")
    assert code == 0, out
    assert "full model" in out
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "full")
    model = MoErgeModel.from_library(copy.deepcopy(base), lib)
    if method.startswith("dare"):
        kwargs = {**kwargs, "generator": torch.Generator().manual_seed(3)}
    expected = model.merge({"a": 1.0, "b": 1.0, "c": 1.0}, method, density=0.5, **kwargs)
    for (n, p), q in zip(expected.state_dict().items(), saved.state_dict().values()):
        torch.testing.assert_close(q, p, msg=n)


def test_merge_into_the_library_and_refusals(setup, tmp_path):
    base, base_dir, lib = setup
    code, out = _run("merge", "-l", lib.root, "-m", "dare_ties", "-e", "a,b", "--density", "0.5", "--seed", "3",
                     "--rank", "4", "--into", "ab")
    assert code == 0, out
    lib = ExpertLibrary.open(lib.root)
    assert "ab" in lib.names() and lib.get("ab").metadata.source["method"] == "dare_ties"
    expected = merge_experts([lib.get("a"), lib.get("b")], None, "dare_ties", rank=4, density=0.5,
                             generator=torch.Generator().manual_seed(3))
    for m, w in expected.modules.items():
        torch.testing.assert_close(lib.get("ab").modules[m].delta_weight(), w.delta_weight())
    before = sorted(lib.names())
    for args, msg in [(("-e", "a,zzz", "--into", "x"), "zzz"), (("-e", "a,b", "-m", "nope", "--into", "x"), "nope"),
                      (("-e", "a,b", "-m", "ties", "--density", "2", "--into", "x"), "density"),
                      (("-e", "a,b"), "exactly one of")]:
        code, out = _run("merge", "-l", lib.root, *args, "--json")
        assert code == 1 and not json.loads(out)["ok"] and msg in json.loads(out)["error"], (args, out)
    assert sorted(ExpertLibrary.open(lib.root).names()) == before
    code, _ = _run("merge", "-l", tmp_path / "nolib", "-e", "a", "--into", "x")
    assert code == 1
    assert _run("merge", "--bogus")[0] == 2


def test_compress_stores_the_expert_packed(setup):
    _, _, lib = setup
    code, out = _run("compress", "-l", lib.root, "b", "--method", "compeft", "--density", "0.1", "--as", "b10",
                     "--json")
    assert code == 0, out
    data = json.loads(out)
    assert data["size_ratio"] > 5 and 0 < data["relative_error"] < 1
    lib = ExpertLibrary.open(lib.root)
    assert lib.get("b10").compressed and not lib.get("b").compressed
    code, out = _run("compress", "-l", lib.root, "c", "--method", "bitdelta")
    assert code == 0 and "size ratio" in out
    assert ExpertLibrary.open(lib.root).get("c").metadata.source["compression"]["method"] == "bitdelta"
    code, out = _run("compress", "-l", lib.root, "c", "--method", "bitdelta", "--json")
    assert code == 1 and "already compressed" in json.loads(out)["error"]


def test_transfer_to_a_new_base_version(setup, tmp_path):
    base, base_dir, lib = setup
    target = copy.deepcopy(base)
    with torch.no_grad():
        for p in target.parameters():
            p.mul_(1.01)
    target.save_pretrained(tmp_path / "v2")
    code, out = _run("transfer", "-l", lib.root, "a", "--source", base_dir, "--target", tmp_path / "v2",
                     "--into", tmp_path / "lib2", "--json")
    assert code == 0, out
    data = json.loads(out)
    assert data["distance"]["relative"] == pytest.approx(0.01, rel=1e-3)
    assert ExpertLibrary.open(tmp_path / "lib2").names() == ["a"]
    other = tiny_llama(0, intermediate_size=48)
    other.save_pretrained(tmp_path / "other")
    code, out = _run("transfer", "-l", lib.root, "a", "--source", base_dir, "--target", tmp_path / "other",
                     "--into", tmp_path / "lib3", "--json")
    assert code == 1 and "not a version of the source" in json.loads(out)["error"]
    assert not (tmp_path / "lib3").exists()


def test_bench_runs_every_scenario_on_a_tiny_model(tmp_path):
    code, out = _run("bench", "--tiny", "--experts", "3", "--batch", "1,2", "--prompt", "6", "--new", "3",
                     "--repeat", "1", "--mixed", "2", "--out", tmp_path)
    assert code == 0, out
    data = json.loads((tmp_path / "bench.json").read_text())
    rows = {(r["scenario"], r["batch"]): r for r in data["results"]}
    assert set(rows) == {(s, b) for s in ("base", "peft-1", "peft-mixed", "peft-xlora", "moerge-3") for b in (1, 2)}
    for (s, _), r in rows.items():
        assert r["prefill_tps"] > 0 and r["decode_tps"] > 0
        if s == "base":
            assert r["ratios"] == {"prefill": 1.0, "decode": 1.0}
    assert "| moerge-3 | 2 |" in (tmp_path / "bench.md").read_text() and data["header"][0].startswith("command:")


def test_library_verify_and_list(setup):
    _, _, lib = setup
    code, out = _run("library", "verify", "-l", lib.root, "--json")
    assert code == 0 and json.loads(out) == {"ok": True, "library": str(lib.root), "experts": 3, "problems": []}
    code, out = _run("library", "list", "-l", lib.root, "--json")
    assert code == 0 and [e["name"] for e in json.loads(out)["experts"]] == ["a", "b", "c"]
    f = lib.root / "experts" / "b" / "weights.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 1
    f.write_bytes(bytes(data))
    code, out = _run("library", "verify", "-l", lib.root, "--json")
    report = json.loads(out)
    assert code == 1 and not report["ok"] and len(report["problems"]) == 1
    assert "'b'" in report["problems"][0] and str(f) in report["problems"][0] and "sha256" in report["problems"][0]
    code, out = _run("library", "verify", "-l", lib.root / "nowhere")
    assert code == 1
