"""PEFT adapters by hub id (``org/name``), through huggingface_hub's own cache: a cache laid out here as the hub
client writes it (refs, snapshots, blobs), read offline — no network — with pinned revisions and subfolders."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from moerge import ExpertLibrary, MoErgeModel
from moerge.adapters.peft_loader import load_peft_lora
from moerge.errors import ExpertFormatError

from helpers import peft_logits, save_peft_lora, tiny_llama

IDS = torch.tensor([[5, 17, 33, 9, 61, 4, 12]])


def publish(cache: Path, repo: str, folder: Path, *, refs: tuple[str, ...] = ("main",), subfolder: str = "") -> str:
    """Put ``folder``'s files into ``cache`` as the hub client stores a downloaded snapshot; returns its commit."""
    commit = hashlib.sha1(f"{repo}:{folder}:{subfolder}".encode()).hexdigest()
    root = cache / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / commit / subfolder
    snap.mkdir(parents=True, exist_ok=True)
    (root / "blobs").mkdir(exist_ok=True)
    for f in sorted(folder.iterdir()):
        blob = root / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))  # as the hub client links them
    (root / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (root / "refs" / ref).write_text(commit)
    return commit


@pytest.fixture
def hub(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_hub_ids_resolve_through_the_cache_with_pinned_revisions(hub, tmp_path):
    base = tiny_llama()
    old = save_peft_lora(base, tmp_path / "old", seed=1)
    new = save_peft_lora(base, tmp_path / "new", seed=2)
    first = publish(hub, "acme/sql-lora", old, refs=("v1",))
    latest = publish(hub, "acme/sql-lora", new, refs=("main",))

    e = load_peft_lora("acme/sql-lora", name="sql")  # main
    assert e.metadata.source["hub"] == {"repo_id": "acme/sql-lora", "revision": None, "commit": latest,
                                        "subfolder": None}
    pinned = load_peft_lora("acme/sql-lora", name="sql", revision="v1")
    by_commit = load_peft_lora("acme/sql-lora", name="sql", revision=first)
    assert pinned.metadata.source["hub"]["commit"] == by_commit.metadata.source["hub"]["commit"] == first
    assert pinned.digest() == by_commit.digest() == load_peft_lora(old, name="sql").digest() != e.digest()

    lib = ExpertLibrary.create(tmp_path / "lib", base_model=base)
    assert lib.add_peft("acme/sql-lora", name="sql", revision="v1").digest() == pinned.digest()
    assert lib.get("sql").metadata.source["hub"]["commit"] == first
    model = MoErgeModel.from_library(tiny_llama(), tmp_path / "lib", router="explicit")
    model.add_expert("acme/sql-lora", name="latest")
    with torch.no_grad():
        ours = model(input_ids=IDS, experts={"latest": 1.0}).logits
    assert torch.allclose(ours, peft_logits(base, new, IDS), atol=1e-5)


def test_a_subfolder_of_a_hub_repository(hub, tmp_path):
    folder = save_peft_lora(tiny_llama(), tmp_path / "ad", seed=3)
    publish(hub, "acme/many", folder, subfolder="adapters/sql")
    e = load_peft_lora("acme/many", name="sql", subfolder="adapters/sql")
    assert e.digest() == load_peft_lora(folder, name="sql").digest()
    assert e.metadata.source["hub"]["subfolder"] == "adapters/sql"


def test_hub_failures_are_refused_naming_repository_and_revision(hub, tmp_path):
    publish(hub, "acme/sql-lora", save_peft_lora(tiny_llama(), tmp_path / "ad"))
    with pytest.raises(ExpertFormatError, match=r"acme/absent@main is not in the hub cache .*offline") as e:
        load_peft_lora("acme/absent", name="x")
    assert e.value.expert == "x"
    with pytest.raises(ExpertFormatError, match=r"acme/sql-lora@v9"):
        load_peft_lora("acme/sql-lora", name="x", revision="v9")
    with pytest.raises(ExpertFormatError, match="nor a hub repository id"):
        load_peft_lora(str(tmp_path / "nowhere"), name="x")
    with pytest.raises(ExpertFormatError, match="revision='v1' is for hub repositories"):
        load_peft_lora(tmp_path / "ad", name="x", revision="v1")


def test_cli_adds_a_hub_adapter_at_a_revision(hub, tmp_path, monkeypatch):
    from moerge.cli import app

    base = tiny_llama()
    old = save_peft_lora(base, tmp_path / "old", seed=1)
    first = publish(hub, "acme/sql-lora", old, refs=("v1",))
    publish(hub, "acme/sql-lora", save_peft_lora(base, tmp_path / "new", seed=2))
    ExpertLibrary.create(tmp_path / "lib", base_model=base)
    run = CliRunner().invoke(app, ["library", "add", "acme/sql-lora", "-n", "sql", "-l", str(tmp_path / "lib"),
                                   "--revision", "v1", "--json"])
    assert run.exit_code == 0, run.output
    lib = ExpertLibrary.open(tmp_path / "lib")
    assert lib.get("sql").digest() == load_peft_lora(old, name="sql").digest()
    assert lib.get("sql").metadata.source["hub"]["commit"] == first
