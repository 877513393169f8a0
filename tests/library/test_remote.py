"""Libraries on object storage: a real S3 API (moto's server mode, started here on 127.0.0.1), through fsspec/s3fs.

The mirror and the content cache are per test (``MOERGE_CACHE``); "another machine" is another cache folder. The
``s3`` fixture (tests/conftest.py) gives a fresh bucket on a moto server started for the session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from moerge import ExpertLibrary, MoErgeModel
from moerge.errors import LibraryError
from moerge.library.remote import REMOTE_LOCK

from helpers import rand_expert, s3_keys, tiny_llama

HERE = Path(__file__).resolve().parent


keys = s3_keys


def other_machine(monkeypatch, tmp_path: Path, name: str) -> None:
    """From here on, libraries opened use another cache folder: another machine's mirror."""
    monkeypatch.setenv("MOERGE_CACHE", str(tmp_path / name))


def library_with_a(s3):
    """A library on the store holding expert 'a' (seed 1); returns its base and the writer's library."""
    base = tiny_llama(0)
    lib = ExpertLibrary.create(s3.url, base_model=base)
    lib.add(rand_expert(base, "a", seed=1))
    return base, lib


def same(a, b) -> bool:
    return set(a.modules) == set(b.modules) and all(
        torch.equal(a.modules[m].A, b.modules[m].A) and torch.equal(a.modules[m].B, b.modules[m].B) for m in a.modules)


def test_round_trip_reads_only_what_is_used(s3, monkeypatch, tmp_path):
    base = tiny_llama(0)
    lib = ExpertLibrary.create(s3.url, base_model=base)
    for i, name in enumerate(["alpha", "beta"]):
        lib.add(rand_expert(base, name, seed=i + 1))
    # the usual layout on the store: a local library copied there is a library there, and back
    assert keys(s3) == ["experts/alpha/expert.json", "experts/alpha/weights.safetensors", "experts/beta/expert.json",
                        "experts/beta/weights.safetensors", "library.json"]
    other_machine(monkeypatch, tmp_path, "b")
    lib2 = ExpertLibrary.open(s3.url)
    assert lib2.names() == ["alpha", "beta"] and lib2.url == s3.url and repr(lib2).startswith(f"ExpertLibrary('{s3.url}'")
    mirror = lib2.root
    assert not list(mirror.rglob("weights.safetensors"))  # opening reads the manifest only
    assert lib2.stored("beta").shapes()  # the layout: expert.json only
    assert not list(mirror.rglob("weights.safetensors"))
    assert same(lib2["alpha"], rand_expert(base, "alpha", seed=1))
    blobs = tmp_path / "b" / "blobs"
    sha = lib2.info("alpha")["files"]["weights.safetensors"]
    assert (blobs / sha).is_file() and not (blobs / lib2.info("beta")["files"]["weights.safetensors"]).exists()
    assert [p.parent.name for p in mirror.rglob("weights.safetensors")] == ["alpha"]
    assert lib2.verify() == []


def test_replace_never_overwrites_what_the_old_manifest_lists(s3, monkeypatch, tmp_path):
    base, lib = library_with_a(s3)
    other_machine(monkeypatch, tmp_path, "reader")
    reader = ExpertLibrary.open(s3.url)  # holds the old manifest
    lib.add(rand_expert(base, "a", seed=2), overwrite=True)
    objects = lib.info("a")["objects"]
    assert list(objects) == ["weights.safetensors"] and objects["weights.safetensors"].startswith("experts/a/v-")
    assert "experts/a/weights.safetensors" not in keys(s3)  # the old object goes once the manifest names the new
    # the reader's manifest names the old bytes, now gone: it re-reads the manifest and gets the new expert
    assert same(reader["a"], rand_expert(base, "a", seed=2))
    lib.add(rand_expert(base, "a", seed=3), overwrite=True)  # and once more: back to the usual place
    assert "objects" not in lib.info("a") and "experts/a/weights.safetensors" in keys(s3)
    other_machine(monkeypatch, tmp_path, "c")
    assert same(ExpertLibrary.open(s3.url)["a"], rand_expert(base, "a", seed=3))


def test_a_commit_that_fails_changes_nothing_on_the_store(s3, monkeypatch, tmp_path):
    base, lib = library_with_a(s3)
    before = s3.get_object(Bucket=s3.bucket, Key="lib/library.json")["Body"].read()
    from moerge.library import remote

    def refuse(self, data):
        raise LibraryError("the store refused", file=self.where("library.json"))

    monkeypatch.setattr(remote.RemoteStore, "write_manifest", refuse)
    with pytest.raises(LibraryError, match="the store refused"):
        lib.add(rand_expert(base, "a", seed=2), overwrite=True)
    with pytest.raises(LibraryError, match="the store refused"):
        lib.add(rand_expert(base, "b", seed=3))
    monkeypatch.undo()
    for k, v in s3.env.items():
        monkeypatch.setenv(k, v)
    assert s3.get_object(Bucket=s3.bucket, Key="lib/library.json")["Body"].read() == before
    other_machine(monkeypatch, tmp_path, "fresh")
    fresh = ExpertLibrary.open(s3.url)
    assert fresh.names() == ["a"] and same(fresh["a"], rand_expert(base, "a", seed=1))  # the old bytes, intact
    assert fresh.verify() == []
    lib.refresh()
    assert lib.names() == ["a"] and same(lib["a"], rand_expert(base, "a", seed=1))  # the writer's mirror too


def test_a_manifest_changed_behind_the_lock_is_not_overwritten(s3):
    base, lib = library_with_a(s3)
    real = lib.remote.push

    def meddle(old, new, mirror):  # a writer that ignores the lock commits between our read and our write
        out = real(old, new, mirror)
        body = json.loads(s3.get_object(Bucket=s3.bucket, Key="lib/library.json")["Body"].read())
        body["embedder"] = {"id": "someone-else", "dim": 3}
        s3.put_object(Bucket=s3.bucket, Key="lib/library.json", Body=json.dumps(body).encode())
        return out

    lib.remote.push = meddle
    with pytest.raises(LibraryError, match="another writer changed the manifest"):
        lib.add(rand_expert(base, "b", seed=2))
    lib.remote.push = real
    stored = json.loads(s3.get_object(Bucket=s3.bucket, Key="lib/library.json")["Body"].read())
    assert list(stored["experts"]) == ["a"] and stored["embedder"]["id"] == "someone-else"
    lib.add(rand_expert(base, "b", seed=2))  # tried again, it goes through on top of the other change
    stored = json.loads(s3.get_object(Bucket=s3.bucket, Key="lib/library.json")["Body"].read())
    assert list(stored["experts"]) == ["a", "b"] and stored["embedder"]["id"] == "someone-else"


def test_a_held_lock_makes_a_writer_wait_then_refuses(s3, monkeypatch):
    base = tiny_llama(0)
    lib = ExpertLibrary.create(s3.url, base_model=base)
    holder = {"owner": "host:123:cafe", "since": __import__("time").time()}
    s3.put_object(Bucket=s3.bucket, Key=f"lib/{REMOTE_LOCK}", Body=json.dumps(holder).encode())
    lib.remote.lock_timeout = 0.5
    with pytest.raises(LibraryError, match=r"another writer holds the library's lock: host:123:cafe") as e:
        lib.add(rand_expert(base, "a", seed=1))
    assert e.value.file == f"{s3.url}/{REMOTE_LOCK}"
    assert keys(s3) == [REMOTE_LOCK, "library.json"] and len(ExpertLibrary.open(s3.url)) == 0
    # a lock older than lock_ttl was left by a writer that died: it is broken, with a warning
    lib.remote.lock_ttl = -1.0  # any age is over it
    with pytest.warns(RuntimeWarning, match="taking over a lock held by host:123:cafe"):
        lib.add(rand_expert(base, "a", seed=1))
    assert lib.names() == ["a"] and REMOTE_LOCK not in keys(s3)  # released after the write


WRITER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from helpers import rand_expert, tiny_llama
    from moerge import ExpertLibrary
    base, lib = tiny_llama(0), ExpertLibrary.open({url!r})
    for i in range(3):
        lib.add(rand_expert(base, f"{{sys.argv[1]}}{{i}}", seed=i))
""")


def test_concurrent_writers_in_other_processes_are_serialised(s3, tmp_path):
    base = tiny_llama(0)
    ExpertLibrary.create(s3.url, base_model=base)
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(tests=str(HERE.parent), url=s3.url))
    procs = [subprocess.Popen([sys.executable, str(script), who], env={**os.environ, **s3.env,
                                                                       "MOERGE_CACHE": str(tmp_path / who)},
                              stderr=subprocess.PIPE, text=True) for who in ("p", "q")]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()
    lib = ExpertLibrary.open(s3.url)
    assert sorted(lib.names()) == ["p0", "p1", "p2", "q0", "q1", "q2"]
    assert lib.verify() == [] and REMOTE_LOCK not in keys(s3)


@pytest.mark.parametrize("damage", ["other bytes", "truncated", "vanished"])
def test_a_bad_object_is_refused_naming_expert_and_url_and_nothing_is_kept(s3, monkeypatch, tmp_path, damage):
    base, lib = library_with_a(s3)
    key = "lib/experts/a/weights.safetensors"
    good = s3.get_object(Bucket=s3.bucket, Key=key)["Body"].read()
    if damage == "vanished":
        s3.delete_object(Bucket=s3.bucket, Key=key)
    else:
        bad = good[: len(good) // 2] if damage == "truncated" else good[:-8] + b"\x00" * 8
        s3.put_object(Bucket=s3.bucket, Key=key, Body=bad)
    other_machine(monkeypatch, tmp_path, "reader")
    reader = ExpertLibrary.open(s3.url)
    problem = "missing on the store" if damage == "vanished" else "does not match the manifest's sha256"
    with pytest.raises(LibraryError, match=problem) as e:
        reader.get("a")
    assert e.value.expert == "a" and e.value.file == f"{s3.url}/experts/a/weights.safetensors"
    files = reader.info("a")["files"]
    kept = {p.name for p in (tmp_path / "reader" / "blobs").iterdir()}
    assert kept == {files["expert.json"]}  # the checked expert.json only: nothing unverified is kept
    assert not (reader.root / "experts" / "a" / "weights.safetensors").exists()
    assert any("weights.safetensors" in p for p in reader.verify())
    s3.put_object(Bucket=s3.bucket, Key=key, Body=good)  # mended on the store: the same reader reads it
    assert same(reader.get("a"), rand_expert(base, "a", seed=1))


def test_a_corrupt_file_in_the_local_cache_is_fetched_again(s3, monkeypatch, tmp_path):
    base, lib = library_with_a(s3)
    other_machine(monkeypatch, tmp_path, "reader")
    reader = ExpertLibrary.open(s3.url)
    reader.get("a")
    sha = reader.info("a")["files"]["weights.safetensors"]
    blob = tmp_path / "reader" / "blobs" / sha
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))  # the mirror's file is a link to it: both are bad now
    reopened = ExpertLibrary.open(s3.url)
    assert same(reopened.get("a"), rand_expert(base, "a", seed=1))
    assert __import__("hashlib").sha256(blob.read_bytes()).hexdigest() == sha


def test_an_unreachable_store_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("MOERGE_CACHE", str(tmp_path / "cache"))
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once the socket is closed
    options = {"key": "k", "secret": "s",
               "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}", "region_name": "us-east-1"},
               "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2}}
    with pytest.raises(LibraryError, match="Could not connect") as e:
        ExpertLibrary.open("s3://nowhere/lib", storage_options=options)
    assert e.value.file == "s3://nowhere/lib/library.json"
    with pytest.raises(LibraryError, match="no library here") as e:
        ExpertLibrary.open("memory://nothing/here")
    assert e.value.file == "memory://nothing/here/library.json"


def test_a_model_serves_and_follows_a_library_on_the_store(s3, monkeypatch, tmp_path):
    from moerge.routers import build_router

    base, lib = library_with_a(s3)
    lib.add(rand_expert(base, "b", seed=2))
    other_machine(monkeypatch, tmp_path, "server")
    served = ExpertLibrary.open(s3.url)
    model = MoErgeModel.from_library(tiny_llama(0), served, router=build_router("fixed", weights={"a": 1.0}))
    try:
        assert model.resident_experts == []
        ids = torch.randint(3, 90, (1, 6), generator=torch.Generator().manual_seed(0))
        out = model(input_ids=ids).logits
        reference = MoErgeModel.from_library(tiny_llama(0), ExpertLibrary.open(s3.url),
                                             router=build_router("fixed", weights={"a": 1.0}), follow=False)
        assert torch.equal(out, reference(input_ids=ids).logits) and model.resident_experts == ["a"]
        reference.close()
        lib.add(rand_expert(base, "c", seed=3))  # another machine adds an expert: the model takes it in
        assert model.follower.interval == 1.0
        assert model.follower.wait(lambda: "c" in model.experts, timeout=60), model.follower.error
        lib.remove("b")
        assert model.follower.wait(lambda: "b" not in model.experts, timeout=60), model.follower.error
    finally:
        model.close()


def test_the_routing_index_travels_through_the_store(s3, monkeypatch, tmp_path):
    import hashlib

    import numpy as np

    from moerge.routers import build_router
    from moerge.routing.embed import CallableEmbedder

    from helpers import tiny_chat_llama, tiny_tokenizer

    embedded: list[str] = []

    def encode(texts):
        embedded.extend(texts)
        return np.stack([np.random.default_rng(int(hashlib.sha256(t.encode()).hexdigest()[:8], 16))
                         .standard_normal(16) for t in texts])

    base = tiny_chat_llama()
    lib = ExpertLibrary.create(s3.url, base_model=base)
    for i, (name, text) in enumerate([("sql", "write a SQL query"), ("poem", "write a poem about the sea")]):
        lib.add(rand_expert(base, name, seed=i + 1, description=text, examples=[text]))

    def model_on(cache: str):
        other_machine(monkeypatch, tmp_path, cache)
        router = build_router("glider", local="none", embedder=CallableEmbedder(encode, id="hash-16", dim=16))
        return MoErgeModel.from_library(tiny_chat_llama(), ExpertLibrary.open(s3.url), router=router,
                                        tokenizer=tiny_tokenizer(), follow=False)

    model_on("one").close()
    assert embedded  # the first machine embedded the experts and stored the index on the store
    stored = keys(s3)
    assert "routing/index/index.json" in stored and any(k.startswith("routing/index/vectors-") for k in stored)
    embedded.clear()
    second = model_on("two")  # another machine: the index comes from the store, nothing is embedded again
    assert embedded == [] and sorted(second.router.retriever.index.names) == ["poem", "sql"]
    second.close()


def _hub_cache(cache: Path, repo: str, files: dict[str, bytes], commit: str = "a" * 40) -> None:
    """A Hugging Face Hub cache holding ``files`` of dataset ``repo`` at ``main``, laid out as huggingface_hub
    lays it out (blobs named by ETag, snapshot links, refs/main)."""
    import hashlib

    folder = cache / f"datasets--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    for rel, data in files.items():
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = folder / "snapshots" / commit / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))


def test_a_library_on_the_hub_is_read_offline_from_its_cache(tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    base = tiny_llama(0)
    local = ExpertLibrary.create(tmp_path / "lib", base_model=base)
    local.add(rand_expert(base, "a", seed=1))
    local.add(rand_expert(base, "b", seed=2))
    files = {str(p.relative_to(local.root)): p.read_bytes() for p in local.root.rglob("*")
             if p.is_file() and not p.name.startswith(".")}
    hub = tmp_path / "hub"
    _hub_cache(hub, "org/experts", files)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MOERGE_CACHE", str(tmp_path / "cache"))
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    lib = ExpertLibrary.open("hf://datasets/org/experts")
    assert lib.names() == ["a", "b"] and lib.url == "hf://datasets/org/experts"
    assert same(lib["b"], rand_expert(base, "b", seed=2)) and lib.verify() == []
    with pytest.raises(LibraryError, match="read-only"):
        lib.add(rand_expert(base, "c", seed=3))
    assert ExpertLibrary.open("hf://datasets/org/experts").names() == ["a", "b"]
    # a file the cache holds with other bytes than the manifest says: refused, naming the expert and the URL
    bad = dict(files)
    bad["experts/a/weights.safetensors"] = files["experts/a/weights.safetensors"][:-4] + b"\0\0\0\0"
    _hub_cache(hub, "org/experts", bad, commit="b" * 40)
    monkeypatch.setenv("MOERGE_CACHE", str(tmp_path / "cache2"))
    with pytest.raises(LibraryError, match="does not match the manifest's sha256") as e:
        ExpertLibrary.open("hf://datasets/org/experts").get("a")
    assert e.value.expert == "a" and e.value.file == "hf://datasets/org/experts/experts/a/weights.safetensors"
    with pytest.raises(LibraryError, match="no library here"):
        ExpertLibrary.open("hf://datasets/org/nothing")


def test_a_manifest_pointing_files_elsewhere_is_refused(s3, monkeypatch, tmp_path):
    base = tiny_llama(0)
    lib = ExpertLibrary.create(s3.url, base_model=base)
    lib.add_many([rand_expert(base, "a", seed=1), rand_expert(base, "b", seed=2)])
    body = json.loads(s3.get_object(Bucket=s3.bucket, Key="lib/library.json")["Body"].read())
    body["experts"]["a"]["objects"] = {"weights.safetensors": "experts/b/weights.safetensors"}  # b's object
    s3.put_object(Bucket=s3.bucket, Key="lib/library.json", Body=json.dumps(body).encode())
    other_machine(monkeypatch, tmp_path, "reader")
    with pytest.raises(LibraryError, match="'objects' names a key outside") as e:
        ExpertLibrary.open(s3.url)
    assert e.value.expert == "a" and e.value.file == f"{s3.url}/library.json"
    with pytest.raises(LibraryError, match="'objects'"):
        lib.remove("a")  # a writer refuses it too: nothing of b's is deleted
    assert "experts/b/weights.safetensors" in keys(s3)


def test_a_forked_child_reads_from_the_store(s3, monkeypatch, tmp_path):
    base, lib = library_with_a(s3)
    other_machine(monkeypatch, tmp_path, "reader")
    reader = ExpertLibrary.open(s3.url)
    assert reader.remote.stamp() is not None  # the parent has used its connection (fsspec: not fork-safe)
    pid = os.fork()
    if pid == 0:  # the child: a fresh filesystem object, not the parent's event loop
        code = 1
        try:
            code = 0 if same(reader.get("a"), rand_expert(base, "a", seed=1)) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
