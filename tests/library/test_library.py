"""ExpertLibrary: round trips through disk, atomic writes, hashes, names, bases."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from moerge import DeltaWeights, Expert, ExpertLibrary, ExpertMetadata, LoRAWeights
from moerge.adapters.peft_loader import load_peft_lora
from moerge.core.fingerprint import fingerprint
from moerge.core.safe_io import TMP_PREFIX
from moerge.errors import BaseMismatchError, ExpertFormatError, LibraryError

from helpers import rand_expert, save_peft_lora, tiny_llama


def _expert(name: str, seed: int = 0, dtype=torch.float32) -> Expert:
    g = torch.Generator().manual_seed(seed)
    mods = {
        "model.layers.0.self_attn.q_proj": LoRAWeights(torch.randn(4, 32, generator=g), torch.randn(32, 4, generator=g),
                                                       0.5),
        "model.layers.1.mlp.down_proj": LoRAWeights(torch.randn(2, 64, generator=g), torch.randn(32, 2, generator=g),
                                                    2.0),
        "model.layers.1.self_attn.v_proj": DeltaWeights(torch.randn(16, 32, generator=g), torch.randn(16, generator=g)),
    }
    meta = ExpertMetadata(description=f"expert {name}", examples=["ex one", "ex two"], source={"type": "test"})
    return Expert(name, mods, meta).to(dtype)


def test_round_trip_through_disk(tmp_path, base):
    lib = ExpertLibrary.create(tmp_path / "lib", base_model=base)
    original = lib.add(_expert("alpha", 1))
    lib.add(_expert("beta", 2, torch.bfloat16))
    reopened = ExpertLibrary.open(tmp_path / "lib")
    assert reopened.names() == ["alpha", "beta"] and len(reopened) == 2 and list(reopened) == ["alpha", "beta"]
    assert "alpha" in reopened and "gamma" not in reopened
    loaded = reopened["alpha"]
    assert loaded.metadata.to_json() == original.metadata.to_json()
    assert loaded.spec() == original.spec()
    for m, w in original.modules.items():
        for k, t in w.tensors(m).items():
            assert torch.equal(loaded.state_dict()[k], t)
    assert reopened["beta"].modules["model.layers.0.self_attn.q_proj"].A.dtype == torch.bfloat16
    info = reopened.info("alpha")
    assert info["kind"] == "mixed" and info["ranks"] == [2, 4] and info["description"] == "expert alpha"
    assert reopened.verify() == []
    assert reopened.base_fingerprint["modules"]["model.layers.0.self_attn.q_proj"] == [32, 32]
    # experts added without a fingerprint are stamped with the (compact) fingerprint they were checked against
    stamped = loaded.metadata.base_fingerprint
    assert stamped["shapes_digest"] == reopened.base_fingerprint["shapes_digest"] and "modules" not in stamped


def test_layout_on_disk_is_safetensors_and_json(tmp_path, base):
    lib = ExpertLibrary.create(tmp_path / "lib", base_model=base)
    lib.add(_expert("alpha"))
    files = sorted(p.relative_to(tmp_path / "lib").as_posix() for p in (tmp_path / "lib").rglob("*") if p.is_file())
    assert files == [".moerge.lock", "experts/alpha/expert.json", "experts/alpha/weights.safetensors",
                     "library.json"]
    manifest = json.loads((tmp_path / "lib" / "library.json").read_text())
    assert manifest["format"] == "moerge-library" and manifest["format_version"] == 1
    assert set(manifest["experts"]["alpha"]["files"]) == {"expert.json", "weights.safetensors"}


def test_order_of_addition_survives_reopening(tmp_path, base):
    lib = ExpertLibrary.create(tmp_path / "lib", base_model=base)
    for name in ["zeta", "alpha", "mu"]:
        lib.add(_expert(name))
    assert lib.names() == ["zeta", "alpha", "mu"] == ExpertLibrary.open(tmp_path / "lib").names()


def test_remove(tmp_path, base):
    lib = ExpertLibrary.create(tmp_path / "lib", base_model=base)
    lib.add(_expert("alpha"))
    lib.add(_expert("beta"))
    lib.remove("alpha")
    assert lib.names() == ["beta"] and not (tmp_path / "lib" / "experts" / "alpha").exists()
    assert ExpertLibrary.open(tmp_path / "lib").names() == ["beta"]
    with pytest.raises(LibraryError, match="no expert named 'alpha'"):
        lib.remove("alpha")
    with pytest.raises(LibraryError, match="no expert named 'nope'"):
        lib.get("nope")


def test_failed_add_leaves_the_library_as_it_was(tmp_path, base, monkeypatch):
    lib = ExpertLibrary.create(tmp_path / "lib", base_model=base)
    lib.add(_expert("alpha"))
    before = {p: p.read_bytes() for p in (tmp_path / "lib").rglob("*") if p.is_file()}

    import moerge.library.manifest as manifest_mod

    calls = {"n": 0}
    real = manifest_mod.atomic_write_json

    def failing_manifest_write(path, obj):
        if str(path).endswith("library.json"):
            calls["n"] += 1
            raise OSError("disk full (injected)")
        return real(path, obj)

    monkeypatch.setattr(manifest_mod, "atomic_write_json", failing_manifest_write)
    with pytest.raises(OSError, match="injected"):
        lib.add(_expert("beta"))
    with pytest.raises(OSError, match="injected"):
        lib.add(_expert("alpha", seed=5), overwrite=True)
    monkeypatch.undo()
    assert calls["n"] == 2
    after = {p: p.read_bytes() for p in (tmp_path / "lib").rglob("*") if p.is_file()}
    assert after == before
    assert lib.names() == ["alpha"] and ExpertLibrary.open(tmp_path / "lib").verify() == []
    assert torch.equal(lib["alpha"].state_dict()["model.layers.0.self_attn.q_proj.lora_A"],
                       _expert("alpha").state_dict()["model.layers.0.self_attn.q_proj.lora_A"])


def test_leftovers_of_an_interrupted_write_are_cleaned_on_open(tmp_path, base):
    lib = ExpertLibrary.create(tmp_path / "lib", base_model=base)
    lib.add(_expert("alpha"))
    (tmp_path / "lib" / "experts" / f"{TMP_PREFIX}beta-1234").mkdir()
    (tmp_path / "lib" / "experts" / "orphan").mkdir()  # renamed into place but never listed in the manifest
    (tmp_path / "lib" / f"{TMP_PREFIX}abc").write_text("half a manifest")
    reopened = ExpertLibrary.open(tmp_path / "lib")
    assert reopened.names() == ["alpha"]
    assert sorted(p.name for p in (tmp_path / "lib" / "experts").iterdir()) == ["alpha"]
    assert not list((tmp_path / "lib").glob(TMP_PREFIX + "*"))


def test_tampered_file_is_detected(tmp_path, base):
    lib = ExpertLibrary.create(tmp_path / "lib", base_model=base)
    lib.add(_expert("alpha"))
    f = tmp_path / "lib" / "experts" / "alpha" / "weights.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(LibraryError, match=r"expert 'alpha', file .*weights.safetensors: sha256 does not match"):
        lib.get("alpha")
    assert len(lib.verify()) == 1


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", "", ".hidden", "x" * 200, "a\\b", "sp ace", "trailing\n", "two\nlines"])
def test_bad_expert_names_are_refused(tmp_path, base, name):
    lib = ExpertLibrary.create(tmp_path / "lib", base_model=base)
    with pytest.raises(ExpertFormatError, match="invalid expert name"):
        _expert("ok").renamed(name)
    sneaky = _expert("ok")
    sneaky.name = name  # renamed after construction: the library checks again
    with pytest.raises(ExpertFormatError, match="invalid expert name"):
        lib.add(sneaky)
    assert lib.names() == [] and [p.name for p in (tmp_path / "lib" / "experts").iterdir()] == []


def test_duplicate_name_needs_overwrite(tmp_path, base):
    lib = ExpertLibrary.create(tmp_path / "lib", base_model=base)
    lib.add(_expert("alpha", 1))
    with pytest.raises(LibraryError, match="differs only in case from 'alpha'"):
        lib.add(_expert("Alpha", 1))
    with pytest.raises(LibraryError, match="already exists"):
        lib.add(_expert("alpha", 2))
    lib.add(_expert("alpha", 2), overwrite=True)
    assert torch.equal(lib["alpha"].modules["model.layers.0.self_attn.q_proj"].A,
                       _expert("alpha", 2).modules["model.layers.0.self_attn.q_proj"].A)
    assert lib.names() == ["alpha"]


def test_expert_for_another_base_is_refused(tmp_path, base):
    lib = ExpertLibrary.create(tmp_path / "lib", base_model=base)
    wrong_shape = Expert("w", {"model.layers.0.self_attn.q_proj": LoRAWeights(torch.randn(2, 48), torch.randn(48, 2))})
    with pytest.raises(BaseMismatchError, match="maps 48→48"):
        lib.add(wrong_shape)
    absent = Expert("w", {"model.layers.7.self_attn.q_proj": LoRAWeights(torch.randn(2, 32), torch.randn(32, 2))})
    with pytest.raises(BaseMismatchError, match="does not have"):
        lib.add(absent)
    other = tiny_llama(0, vocab_size=128)
    folder = save_peft_lora(other, tmp_path / "other", seed=1)
    diff_expert = load_peft_lora(folder, name="p")
    diff_expert.metadata.base_fingerprint = fingerprint(other)
    with pytest.raises(BaseMismatchError, match="vocab_size"):
        lib.add(diff_expert)
    assert lib.names() == []


def test_create_refuses_existing_or_foreign_folders(tmp_path, base):
    ExpertLibrary.create(tmp_path / "lib", base_model=base)
    with pytest.raises(LibraryError, match="already exists"):
        ExpertLibrary.create(tmp_path / "lib", base_model=base)
    assert ExpertLibrary.create(tmp_path / "lib", base_model=base, exist_ok=True).names() == []
    with pytest.raises(BaseMismatchError):
        ExpertLibrary.create(tmp_path / "lib", base_model=tiny_llama(0, hidden_size=48), exist_ok=True)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("x")
    with pytest.raises(LibraryError, match="not empty"):
        ExpertLibrary.create(tmp_path / "junk")


@pytest.mark.parametrize("content,match", [
    (None, "library.json is missing"),
    ("{not json", "cannot parse"),
    ('{"format": "other"}', "not a moerge library"),
    ('{"format": "moerge-library", "format_version": 99, "experts": {}}', "format_version 99"),
    ('{"format": "moerge-library", "format_version": 1, "experts": {"../x": {}}}', "invalid expert name"),
])
def test_open_refuses_bad_manifests(tmp_path, content, match):
    (tmp_path / "lib").mkdir()
    if content is not None:
        (tmp_path / "lib" / "library.json").write_text(content)
    with pytest.raises(LibraryError, match=match):
        ExpertLibrary.open(tmp_path / "lib")


def test_symlinked_expert_folder_is_refused(tmp_path, base):
    lib = ExpertLibrary.create(tmp_path / "lib", base_model=base)
    lib.add(_expert("alpha"))
    outside = tmp_path / "outside"
    os.replace(tmp_path / "lib" / "experts" / "alpha", outside)
    os.symlink(outside, tmp_path / "lib" / "experts" / "alpha")
    with pytest.raises(LibraryError, match="leads out of the library"):
        lib.get("alpha")


def test_failed_overwrite_swap_keeps_the_old_expert(tmp_path, base, monkeypatch):
    lib = ExpertLibrary.create(tmp_path / "lib", base_model=base)
    lib.add(_expert("alpha", 1))
    experts = tmp_path / "lib" / "experts"
    real_replace = os.replace
    moves = []

    def moving_the_new_folder_in_fails(src, dst):
        moves.append((Path(src).name, Path(dst).name))
        if Path(src).name.startswith(TMP_PREFIX + "alpha-") and Path(dst) == experts / "alpha":
            raise OSError("rename failed (injected)")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", moving_the_new_folder_in_fails)
    with pytest.raises(OSError, match="injected"):
        lib.add(_expert("alpha", 2), overwrite=True)
    monkeypatch.undo()
    # the old folder was moved aside, the new one failed to take its place, and the old one went back
    aside = [d for s, d in moves if s == "alpha"]
    assert len(aside) == 1 and aside[0].startswith(TMP_PREFIX + "old-alpha-") and (aside[0], "alpha") in moves
    assert sorted(p.name for p in experts.iterdir()) == ["alpha"]
    assert torch.equal(lib["alpha"].modules["model.layers.0.self_attn.q_proj"].A,
                       _expert("alpha", 1).modules["model.layers.0.self_attn.q_proj"].A)
    assert ExpertLibrary.open(tmp_path / "lib").verify() == []


def test_open_restores_an_expert_whose_overwrite_was_interrupted(tmp_path, base):
    lib = ExpertLibrary.create(tmp_path / "lib", base_model=base)
    lib.add(_expert("alpha", 1))
    experts = tmp_path / "lib" / "experts"
    # the state a crash leaves between "move the old folder aside" and "write the manifest"
    os.replace(experts / "alpha", experts / f"{TMP_PREFIX}old-alpha-1a2b3c4d")
    other = ExpertLibrary.create(tmp_path / "scratch", base_model=base)
    other.add(_expert("alpha", 2))
    os.replace(tmp_path / "scratch" / "experts" / "alpha", experts / "alpha")
    reopened = ExpertLibrary.open(tmp_path / "lib")
    assert reopened.verify() == []
    assert torch.equal(reopened["alpha"].modules["model.layers.0.self_attn.q_proj"].A,
                       _expert("alpha", 1).modules["model.layers.0.self_attn.q_proj"].A)
    assert sorted(p.name for p in experts.iterdir()) == ["alpha"]


def test_two_library_objects_on_one_folder_do_not_lose_changes(tmp_path, base):
    first = ExpertLibrary.create(tmp_path / "lib", base_model=base)
    second = ExpertLibrary.open(tmp_path / "lib")
    first.add(_expert("alpha"))
    second.add(_expert("beta"))  # second's view is stale: the write re-reads the manifest under the lock
    first.add(_expert("gamma"))
    assert ExpertLibrary.open(tmp_path / "lib").names() == ["alpha", "beta", "gamma"]
    second.remove("alpha")
    first.refresh()
    assert first.names() == ["beta", "gamma"]


def test_overwrite_keeps_the_expert_in_its_place(tmp_path, base):
    lib = ExpertLibrary.create(tmp_path / "lib", base_model=base)
    for n in ("a", "b", "c"):
        lib.add(_expert(n))
    lib.add(_expert("a", 3), overwrite=True)
    assert lib.names() == ["a", "b", "c"] == ExpertLibrary.open(tmp_path / "lib").names()


def test_routing_data_round_trip_replace_and_checks(tmp_path, base, monkeypatch):
    lib = ExpertLibrary.create(tmp_path / "lib", base_model=base)
    lib.add(_expert("alpha", 1))
    assert lib.get_routing("alpha", "phatgoose") is None and lib.routing_kinds("alpha") == []
    gates = {"m.q": torch.randn(32), "m.v": torch.randn(64)}
    lib.put_routing("alpha", "phatgoose", gates, {"digest": "d1"})
    t, info = ExpertLibrary.open(lib.root).get_routing("alpha", "phatgoose")
    assert info == {"digest": "d1"} and all(torch.equal(t[k], v) for k, v in gates.items())
    first = lib.info("alpha")["routing"]["phatgoose"]["file"]
    assert oct((lib.root / "experts" / "alpha" / first).stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    lib.put_routing("alpha", "phatgoose", {"m.q": torch.zeros(32)}, {"digest": "d2"})
    files = sorted(p.name for p in (lib.root / "experts" / "alpha").iterdir())
    assert first not in files and sum(f.startswith("routing-phatgoose") for f in files) == 1  # old file removed
    assert lib.get_routing("alpha", "phatgoose")[1]["digest"] == "d2"

    # a crash while writing the manifest keeps the old data valid and listed
    import moerge.library.manifest as manifest_mod

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(manifest_mod, "atomic_write_json", boom)
    with pytest.raises(OSError):
        lib.put_routing("alpha", "phatgoose", {"m.q": torch.ones(32)}, {"digest": "d3"})
    monkeypatch.undo()
    again = ExpertLibrary.open(lib.root)
    assert again.get_routing("alpha", "phatgoose")[1]["digest"] == "d2"
    assert sum(p.name.startswith("routing-") for p in (lib.root / "experts" / "alpha").iterdir()) == 1

    # tampering is caught; a bad kind and an unknown expert are refused
    path = lib.root / "experts" / "alpha" / again.info("alpha")["routing"]["phatgoose"]["file"]
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(LibraryError, match="sha256"):
        again.get_routing("alpha", "phatgoose")
    with pytest.raises(ValueError, match="alphanumeric"):
        lib.put_routing("alpha", "../evil", gates)
    with pytest.raises(LibraryError, match="no expert named 'nope'"):
        lib.put_routing("nope", "phatgoose", gates)
    # one kind dropped: its file and entry gone, the other kind kept; dropping again finds nothing
    lib.put_routing("alpha", "lda-r8", {"m.q": torch.ones(32)}, {"digest": "d4"})
    lda_file = lib.info("alpha")["routing"]["lda-r8"]["file"]
    assert lib.drop_routing("alpha", "lda-r8") is True
    reopened = ExpertLibrary.open(lib.root)
    assert reopened.routing_kinds("alpha") == ["phatgoose"] and reopened.get_routing("alpha", "lda-r8") is None
    assert not (lib.root / "experts" / "alpha" / lda_file).exists()
    assert lib.drop_routing("alpha", "lda-r8") is False
    with pytest.raises(LibraryError, match="no expert named 'nope'"):
        lib.drop_routing("nope", "phatgoose")
    # replacing the expert's weights drops its routing data (made for the old weights)
    lib.add(_expert("alpha", 9), overwrite=True)
    assert lib.routing_kinds("alpha") == []


def test_open_removes_routing_leftovers_and_keeps_the_listed_data(tmp_path, base):
    lib = ExpertLibrary.create(tmp_path / "lib", base_model=base)
    lib.add(_expert("alpha"))
    lib.put_routing("alpha", "phatgoose", {"m.q": torch.ones(4)}, {"digest": "d"})
    listed = lib.info("alpha")["routing"]["phatgoose"]["file"]
    folder = lib.root / "experts" / "alpha"
    index = lib.routing_dir / "index"
    index.mkdir(parents=True)
    # what crashes leave: routing data written but never listed, temp files of writes in the expert's folder and
    # in the index folder
    (folder / "routing-phatgoose-0badf00d.safetensors").write_bytes(b"never listed")
    (folder / f"{TMP_PREFIX}half").write_bytes(b"half a file")
    (index / f"{TMP_PREFIX}half").write_bytes(b"half an index")
    (index / "notes.txt").write_text("not a leftover")
    reopened = ExpertLibrary.open(lib.root)
    assert sorted(p.name for p in folder.iterdir()) == sorted(["expert.json", "weights.safetensors", listed])
    assert [p.name for p in index.iterdir()] == ["notes.txt"]
    assert reopened.verify() == []
    assert torch.equal(reopened.routing_for("alpha", "phatgoose", "d")["m.q"], torch.ones(4))
    assert reopened.routing_for("alpha", "phatgoose", "other weights") is None
    assert reopened.routing_for("alpha", "xlora", "d") is None and reopened.routing_for("nope", "phatgoose", "d") is None


def test_a_pickled_library_is_a_working_copy_of_the_same_folder(tmp_path, base):
    lib = ExpertLibrary.create(tmp_path / "lib", base_model=base)
    lib.add(_expert("alpha", 1))
    copy = pickle.loads(pickle.dumps(lib))
    copy.add(_expert("beta", 2))
    copy.put_routing("beta", "phatgoose", {"m.q": torch.zeros(4)}, {"digest": "b"})
    copy.set_embedder("emb", 8)
    assert copy.routing_kinds("beta") == ["phatgoose"] and copy.embedder == {"id": "emb", "dim": 8}
    assert lib.names() == ["alpha"]  # the original's view is as it last read it
    lib.refresh()
    assert lib.names() == ["alpha", "beta"] and lib.routing_kinds("beta") == ["phatgoose"]
    assert lib.embedder == {"id": "emb", "dim": 8} and lib.verify() == []


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_add_many_is_one_commit_all_or_nothing(tmp_path, base, monkeypatch):
    from moerge.library.manifest import Manifest

    lib = ExpertLibrary.create(tmp_path / "lib", base_model=base)
    lib.add(rand_expert(base, "kept", seed=9))
    commits = []
    real = Manifest.commit
    monkeypatch.setattr(Manifest, "commit", lambda self, d: (commits.append(len(d["experts"])), real(self, d)))
    added = lib.add_many([rand_expert(base, f"e{i}", seed=i) for i in range(5)])
    assert [e.name for e in added] == [f"e{i}" for i in range(5)] and commits == [6]
    assert lib.names() == ["kept"] + [f"e{i}" for i in range(5)] and lib.verify() == []
    too_big = rand_expert(base, "big", rank=lib.max_rank + 1)
    before = sorted(p.name for p in (tmp_path / "lib" / "experts").iterdir())
    for batch, match in [([rand_expert(base, "n1", seed=1), too_big], "rank"),
                         ([rand_expert(base, "n2", seed=2), rand_expert(base, "kept", seed=3)], "already exists"),
                         ([rand_expert(base, "n3", seed=2), rand_expert(base, "N3", seed=3)], "given twice")]:
        with pytest.raises((LibraryError, ExpertFormatError), match=match):
            lib.add_many(batch)
        assert len(ExpertLibrary.open(tmp_path / "lib")) == 6
        assert sorted(p.name for p in (tmp_path / "lib" / "experts").iterdir()) == before
    assert commits == [6]


def test_opening_reads_the_manifest_alone_and_older_manifests_are_brought_up_to_date(tmp_path, base, monkeypatch):
    from moerge.library.experts import ExpertFiles

    lib = ExpertLibrary.create(tmp_path / "lib", base_model=base)
    lib.add_many([rand_expert(base, f"e{i}", seed=i, description=f"does {i}", examples=[f"ex {i}"])
                  for i in range(3)])
    data = json.loads((tmp_path / "lib" / "library.json").read_text())
    assert len(data["layouts"]) == 1 and {e["layout"] for e in data["experts"].values()} == set(data["layouts"])
    assert data["experts"]["e1"]["metadata"]["base_fingerprint"] == "library"  # not 10 KB per expert
    full = {n: lib.get(n) for n in lib.names()}
    real_header = ExpertFiles.header

    def refused(self, name, files):
        raise AssertionError(f"expert.json of {name} was read")

    monkeypatch.setattr(ExpertFiles, "header", refused)
    reopened = ExpertLibrary.open(tmp_path / "lib")
    for n in reopened.names():
        stored = reopened.stored(n)
        assert stored.metadata == full[n].metadata and stored.spec() == full[n].spec()
    monkeypatch.setattr(ExpertFiles, "header", real_header)
    # a manifest written before the table: each expert.json read once, at the next open, and recorded
    for e in data["experts"].values():
        del e["layout"], e["metadata"]
    del data["layouts"]
    (tmp_path / "lib" / "library.json").write_text(json.dumps(data))
    ExpertLibrary.open(tmp_path / "lib")
    upgraded = json.loads((tmp_path / "lib" / "library.json").read_text())
    assert upgraded["layouts"] and all("layout" in e and "metadata" in e for e in upgraded["experts"].values())
    monkeypatch.setattr(ExpertFiles, "header", refused)
    again = ExpertLibrary.open(tmp_path / "lib")
    assert [again.stored(n).metadata for n in again.names()] == [full[n].metadata for n in again.names()]
    lib.remove("e0")
    lib.remove("e1")
    lib.remove("e2")
    assert json.loads((tmp_path / "lib" / "library.json").read_text())["layouts"] == {}  # unused layouts dropped
