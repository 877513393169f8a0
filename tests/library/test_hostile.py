"""Hostile and broken expert files: each refused with an error naming the file, the expert and the problem, and
nothing changed in the library or the live model."""

from __future__ import annotations

import copy
import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from moerge import ExpertLibrary, MoErgeModel
from moerge.adapters.peft_loader import load_peft_lora
from moerge.core.safe_io import check_safetensors_header, load_safetensors, load_safetensors_verified
from moerge.errors import ExpertFormatError, MoErgeError, RoutingError

from helpers import VOCAB, save_peft_lora, tiny_llama


# ---------------------------------------------------------------------------------------------------------------
# safetensors files crafted byte by byte
# ---------------------------------------------------------------------------------------------------------------
def _raw(header: dict | str, data: bytes) -> bytes:
    h = header if isinstance(header, str) else json.dumps(header)
    hb = h.encode()
    return struct.pack("<Q", len(hb)) + hb + data


def _two_tensors() -> tuple[dict, bytes]:
    a, b = torch.arange(6, dtype=torch.float32), torch.ones(4, dtype=torch.float32)
    header = {"a": {"dtype": "F32", "shape": [6], "data_offsets": [0, 24]},
              "b": {"dtype": "F32", "shape": [4], "data_offsets": [24, 40]}}
    return header, a.numpy().tobytes() + b.numpy().tobytes()


def test_a_well_formed_crafted_file_loads(tmp_path):
    header, data = _two_tensors()
    f = tmp_path / "ok.safetensors"
    f.write_bytes(_raw(header, data))
    got = load_safetensors(f)
    assert torch.equal(got["a"], torch.arange(6.0)) and torch.equal(got["b"], torch.ones(4))
    real = tmp_path / "real.safetensors"  # and what safetensors itself writes passes the same checks
    real.write_bytes(save({"x": torch.randn(3, 5), "y": torch.zeros(0, 2), "z": torch.ones(2, dtype=torch.int64)}))
    assert set(check_safetensors_header(real)) == {"x", "y", "z"}


def _dup_header() -> str:
    return ('{"a": {"dtype": "F32", "shape": [6], "data_offsets": [0, 24]}, '
            '"a": {"dtype": "F32", "shape": [4], "data_offsets": [24, 40]}}')


@pytest.mark.parametrize("make,match", [
    (lambda h, d: _raw(h, d)[:-7], "after the length|outside|bytes"),  # truncated data
    (lambda h, d: struct.pack("<Q", 10_000) + b"{}", "header says it is 10000 bytes"),  # header longer than file
    (lambda h, d: b"\x01\x02", "shorter than the 8-byte"),
    (lambda h, d: _raw({"a": {"dtype": "F32", "shape": [6], "data_offsets": [0, 24]},
                        "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, d[:24]), "overlap"),
    (lambda h, d: _raw(_dup_header(), d), "appears twice"),
    (lambda h, d: _raw({"a": {"dtype": "F32", "shape": [7], "data_offsets": [0, 24]}}, d[:24]), "needs 28 bytes"),
    (lambda h, d: _raw({"a": {"dtype": "Q4", "shape": [6], "data_offsets": [0, 24]}}, d[:24]), "unknown dtype"),
    (lambda h, d: _raw(h, d + b"\x00" * 8), "8 bytes after the last tensor"),
    (lambda h, d: _raw("[1, 2]", b""), "not a JSON object"),
    (lambda h, d: _raw("{not json", b""), "not JSON"),
    (lambda h, d: _raw({"a": {"dtype": "F32", "shape": [6], "data_offsets": [0, 24], "extra": 1}}, d[:24]),
     "exactly dtype"),
])
@pytest.mark.parametrize("verified", [False, True])
def test_malformed_safetensors_are_refused_naming_the_file(tmp_path, make, match, verified):
    header, data = _two_tensors()
    f = tmp_path / "bad.safetensors"
    f.write_bytes(make(header, data))
    with pytest.raises(ExpertFormatError, match=match) as e:
        if verified:  # a library's read: the sha256 matches (the manifest lists this very file), the checks still run
            load_safetensors_verified(f, hashlib.sha256(f.read_bytes()).hexdigest(), expert="x")
        else:
            load_safetensors(f, expert="x")
    assert e.value.file == str(f) and e.value.expert == "x"


def test_a_verified_read_checks_the_sha256_and_gives_what_safetensors_gives(tmp_path):
    tensors = {"x": torch.randn(3, 5), "y": torch.zeros(0, 2), "z": torch.ones(2, dtype=torch.int64),
               "w": torch.randn(4, 2).to(torch.bfloat16)}
    f = tmp_path / "real.safetensors"
    f.write_bytes(save(tensors))
    digest = hashlib.sha256(f.read_bytes()).hexdigest()
    got = load_safetensors_verified(f, digest)
    assert set(got) == set(tensors)
    assert all(got[k].dtype == t.dtype and torch.equal(got[k], t) for k, t in tensors.items())
    assert load_safetensors_verified(f, "0" * 64) is None  # another sha256: nothing is parsed or returned


# ---------------------------------------------------------------------------------------------------------------
# PEFT adapter folders
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture
def adapter(tmp_path, base):
    return save_peft_lora(base, tmp_path / "ad", seed=0, r=4, target_modules=["q_proj", "v_proj"])


def _edit_config(folder: Path, **edits) -> Path:
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(edits)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return folder


def _edit_tensors(folder: Path, fn) -> Path:
    f = folder / "adapter_model.safetensors"
    tensors = load_safetensors(f)
    f.write_bytes(save(fn(dict(tensors))))
    return folder


def _a_key(tensors: dict) -> str:
    return next(k for k in sorted(tensors) if "lora_A" in k)


@pytest.mark.parametrize("edit,match,which", [
    (lambda f: _edit_config(f, r=True), "positive integer", "config"),
    (lambda f: _edit_config(f, lora_alpha=True), "finite number", "config"),
    (lambda f: _edit_config(f, rank_pattern={"q_proj": 0}), "positive integer", "config"),
    (lambda f: _edit_config(f, rank_pattern=["q_proj"]), "mapping", "config"),
    (lambda f: _edit_config(f, alpha_pattern={"(": 2}), "not a valid pattern", "config"),
    (lambda f: _edit_config(f, lora_magic_mode="on"), "does not know", "config"),
    (lambda f: _edit_config(f, target_modules={"q_proj": 1}), "must be a module name pattern", "config"),
    (lambda f: _edit_tensors(f, lambda t: {**t, _a_key(t): t[_a_key(t)].to(torch.int32)}), "not a float", "weights"),
    (lambda f: _edit_tensors(f, lambda t: {**t, _a_key(t): t[_a_key(t)][:0]}), "empty|rank", "weights"),
    (lambda f: _edit_tensors(f, lambda t: {**t, _a_key(t).replace("base_model.model.", ""): t[_a_key(t)].clone()}),
     "two tensors hold lora_A", "weights"),
    (lambda f: _edit_tensors(f, lambda t: {**t, _a_key(t): t[_a_key(t)] * float("inf")}), "NaN or Inf", "weights"),
])
def test_broken_peft_adapters_are_refused_naming_file_and_expert(adapter, edit, match, which):
    edit(adapter)
    with pytest.raises(ExpertFormatError, match=match) as e:
        load_peft_lora(adapter, name="bad")
    assert e.value.expert == "bad"
    assert e.value.file == str(adapter / ("adapter_config.json" if which == "config" else "adapter_model.safetensors"))


def test_unset_unknown_config_fields_are_ignored(adapter):
    _edit_config(adapter, some_future_flag=None, another=False)
    assert load_peft_lora(adapter, name="ok").modules


def test_rank_cap(adapter):
    with pytest.raises(ExpertFormatError, match="exceeds the cap of 2"):
        load_peft_lora(adapter, name="big", max_rank=2)
    assert load_peft_lora(adapter, name="fine", max_rank=4).modules


@pytest.mark.parametrize("suffix", [".bin", ".pt"])
def test_pickle_weights_are_never_loaded(adapter, suffix, monkeypatch):
    (adapter / "adapter_model.safetensors").unlink()
    evil = adapter / f"adapter_model{suffix}"
    evil.write_bytes(b"\x80\x04cos\nsystem\n(Vtouch /tmp/pwned\ntR.")  # a pickle that would run a command
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called on an expert file"))
    with pytest.raises(ExpertFormatError, match="never loads pickle") as e:
        load_peft_lora(adapter, name="evil")
    assert e.value.file == str(evil)


def test_a_pickle_beside_a_corrupt_safetensors_is_not_a_fallback(adapter, monkeypatch):
    torch.save({"x": torch.ones(1)}, adapter / "adapter_model.bin")
    f = adapter / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("fell back to the pickle"))
    with pytest.raises(ExpertFormatError, match="malformed safetensors") as e:
        load_peft_lora(adapter, name="x")
    assert e.value.file == str(f)


# ---------------------------------------------------------------------------------------------------------------
# nothing changes in the library or the live model
# ---------------------------------------------------------------------------------------------------------------
def _state(lib: ExpertLibrary, model: MoErgeModel) -> tuple:
    files = sorted((str(p.relative_to(lib.root)), p.read_bytes()) for p in Path(lib.root).rglob("*")
                   if p.is_file() and p.name != ".moerge.lock")
    return files, model.experts, {n: p.clone() for n, p in model.base.state_dict().items()}


def _same(a: tuple, b: tuple) -> bool:
    return a[0] == b[0] and a[1] == b[1] and a[2].keys() == b[2].keys() and all(torch.equal(a[2][k], b[2][k])
                                                                                    for k in a[2])


@pytest.mark.parametrize("damage", ["truncate", "nan", "other-base", "absent-module", "config"])
def test_a_refused_adapter_changes_neither_library_nor_model(tmp_path, base, damage):
    lib = ExpertLibrary.create(tmp_path / "lib", base)
    lib.add_peft(save_peft_lora(base, tmp_path / "good", seed=1), name="good")
    model = MoErgeModel.from_library(copy.deepcopy(base), lib, router="explicit")
    if damage == "other-base":
        folder = save_peft_lora(tiny_llama(seed=0, vocab_size=VOCAB + 8, hidden_size=48), tmp_path / "bad", seed=2,
                                target_modules=["q_proj", "v_proj"])
    elif damage == "absent-module":
        other = tiny_llama(seed=0, num_hidden_layers=3)
        folder = save_peft_lora(other, tmp_path / "bad", seed=2, target_modules=["q_proj"])
    else:
        folder = save_peft_lora(base, tmp_path / "bad", seed=2)
        f = folder / "adapter_model.safetensors"
        if damage == "truncate":
            f.write_bytes(f.read_bytes()[:-10])
        elif damage == "nan":
            _edit_tensors(folder, lambda t: {**t, _a_key(t): t[_a_key(t)] * float("nan")})
        else:
            _edit_config(folder, r=-1)
    before = _state(lib, model)
    with pytest.raises(MoErgeError) as e:
        model.add_expert(folder, name="bad")
    assert "bad" in str(e.value) and (e.value.file or "") != ""
    assert _same(before, _state(lib, model))
    ids = torch.randint(3, VOCAB, (1, 5))
    with torch.no_grad():  # the model still serves the good expert, and only it
        model(input_ids=ids, experts={"good": 1.0})
    with pytest.raises(RoutingError, match="unknown expert"):
        model(input_ids=ids, experts={"bad": 1.0})


# ---------------------------------------------------------------------------------------------------------------
# prompts
# ---------------------------------------------------------------------------------------------------------------
def test_empty_and_overlong_prompts_are_refused(tmp_path, base):
    lib = ExpertLibrary.create(tmp_path / "lib", base)
    lib.add_peft(save_peft_lora(base, tmp_path / "good", seed=1), name="good")
    model = MoErgeModel.from_library(copy.deepcopy(base), lib, router="explicit")
    with pytest.raises(RoutingError, match="empty"):
        model.generate(input_ids=torch.zeros(1, 0, dtype=torch.long), experts={"good": 1.0}, max_new_tokens=2)
    with pytest.raises(RoutingError, match="empty"):  # only padding
        model.generate(input_ids=torch.tensor([[5, 6], [0, 0]]), attention_mask=torch.tensor([[1, 1], [0, 0]]),
                       experts={"good": 1.0}, max_new_tokens=2)
    n = base.config.max_position_embeddings
    with pytest.raises(RoutingError, match=f"longer than the model's context of {n}"):
        model.generate(input_ids=torch.ones(1, n + 1, dtype=torch.long), experts={"good": 1.0}, max_new_tokens=2)
    with pytest.raises(RoutingError, match="context"):  # the prompt fits but the requested generation does not
        model.generate(input_ids=torch.ones(1, n - 2, dtype=torch.long), experts={"good": 1.0}, max_new_tokens=8)


def _lib_with(tmp_path, base, name="alpha"):
    from helpers import rand_expert

    lib = ExpertLibrary.create(tmp_path / "lib", base_model=base)
    lib.add(rand_expert(base, name, seed=0))
    return lib


def test_links_out_of_the_library_are_refused(tmp_path, base):
    import os

    lib = _lib_with(tmp_path, base)
    root = Path(lib.root)
    # a file of the expert replaced by a link to an identical copy elsewhere: refused all the same
    f = root / "experts" / "alpha" / "weights.safetensors"
    copy_ = tmp_path / "copy.safetensors"
    copy_.write_bytes(f.read_bytes())
    f.unlink()
    os.symlink(copy_, f)
    with pytest.raises(MoErgeError, match="link") as e:
        lib.get("alpha")
    assert e.value.file == str(f) and e.value.expert == "alpha"
    f.unlink()
    f.write_bytes(copy_.read_bytes())
    lib.get("alpha")
    # the whole experts folder moved out and linked back
    os.replace(root / "experts", tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", root / "experts")
    with pytest.raises(MoErgeError, match="leads out of the library"):
        lib.get("alpha")


def test_library_rank_cap_and_base_name(tmp_path, base):
    from helpers import rand_expert

    lib = ExpertLibrary.create(tmp_path / "lib", base_model=base, max_rank=4)
    assert ExpertLibrary.open(lib.root).max_rank == 4
    with pytest.raises(ExpertFormatError, match="exceeds the library's cap of 4"):
        lib.add(rand_expert(base, "big", rank=8))
    lib.add(rand_expert(base, "ok", rank=4))
    other = save_peft_lora(base, tmp_path / "other", seed=3, r=2)
    _edit_config(other, base_model_name_or_path="meta-llama/Llama-3-8B")
    with pytest.raises(MoErgeError, match="Llama-3-8B") as e:
        lib.add_peft(other, name="other")
    assert e.value.file == str(other / "adapter_model.safetensors") and lib.names() == ["ok"]
    with pytest.warns(UserWarning, match="Llama-3-8B"):
        lib.add_peft(other, name="other", allow_other_base=True)
    same = save_peft_lora(base, tmp_path / "same", seed=4, r=2)  # the same model under an org prefix: accepted
    _edit_config(same, base_model_name_or_path=f"some-org/{base.config._name_or_path}")
    lib.add_peft(same, name="same")
    local = save_peft_lora(base, tmp_path / "local", seed=5, r=2)  # a folder path: its name says nothing
    _edit_config(local, base_model_name_or_path="/data/checkpoints/final")
    lib.add_peft(local, name="local")
    with pytest.raises(ValueError, match="max_rank"):
        ExpertLibrary.create(tmp_path / "lib2", base_model=base, max_rank=0)
