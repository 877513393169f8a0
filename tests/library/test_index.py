"""ExpertIndex: exact top-K, multi-vector experts, incremental add/remove, exact→HNSW switch, persistence."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moerge.errors import LibraryError
from moerge.library.index import ExpertIndex


def _unit(rng, n, d):
    v = rng.standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _brute(vectors: dict[str, np.ndarray], q: np.ndarray, k: int) -> list[str]:
    q = q / np.linalg.norm(q)
    best = {n: float((v @ q).max()) for n, v in vectors.items()}
    return sorted(best, key=lambda n: -best[n])[:k]


@pytest.mark.parametrize("per_expert", [1, 3])
def test_search_matches_brute_force(per_expert):
    rng = np.random.default_rng(0)
    idx = ExpertIndex(16, "emb")
    vecs = {f"e{i}": _unit(rng, per_expert, 16) for i in range(40)}
    for n, v in vecs.items():
        idx.add(n, v)
    q = rng.standard_normal((5, 16)).astype(np.float32)
    names, scores = idx.search(q, 4)
    for b in range(5):
        assert names[b] == _brute(vecs, q[b], 4)
        assert np.all(np.diff(scores[b]) <= 1e-6)  # best first
        qn = q[b] / np.linalg.norm(q[b])
        assert scores[b][0] == pytest.approx(float((vecs[names[b][0]] @ qn).max()), abs=1e-5)


def test_fewer_experts_than_k_pads():
    idx = ExpertIndex(4)
    idx.add("a", np.eye(4, dtype=np.float32)[:1])
    names, scores = idx.search(np.ones(4, dtype=np.float32), 3)
    assert names == [["a", "", ""]]
    assert np.isinf(scores[0, 1:]).all() and scores[0, 1:].max() < 0


def test_add_replace_remove_incremental():
    rng = np.random.default_rng(1)
    idx = ExpertIndex(8)
    e = np.eye(8, dtype=np.float32)
    idx.add("x", e[:1])
    idx.add("y", e[1:2])
    assert idx.search(e[0], 1)[0] == [["x"]]
    idx.add("x", e[2:3], key="v2")  # replace: the old vector is gone
    assert idx.search(e[0], 1)[0][0][0] != "x" or idx.search(e[0], 1)[1][0, 0] < 0.5
    assert idx.search(e[2], 1)[0] == [["x"]] and idx.key("x") == "v2"
    idx.remove("y")
    assert "y" not in idx and idx.names == ["x"] and len(idx) == 1
    with pytest.raises(KeyError):
        idx.remove("y")
    idx.add("z", _unit(rng, 2, 8))
    assert set(idx.names) == {"x", "z"}


@pytest.mark.parametrize("bad", [np.zeros((1, 5), np.float32), np.full((1, 8), np.nan, np.float32)])
def test_bad_vectors_refused_and_nothing_changes(bad):
    idx = ExpertIndex(8, "emb-a")
    idx.add("a", np.eye(8, dtype=np.float32)[:1])
    with pytest.raises(ValueError, match="'b'|NaN"):
        idx.add("b", bad)
    assert idx.names == ["a"]
    with pytest.raises(ValueError, match="dimension 5.*8.*emb-a"):
        idx.search(np.zeros((1, 5), np.float32), 1)


def test_switches_to_hnsw_above_threshold_and_stays_accurate():
    rng = np.random.default_rng(2)
    idx = ExpertIndex(32, approx_threshold=100)
    vecs = {f"e{i}": _unit(rng, 1, 32) for i in range(300)}
    for n, v in list(vecs.items())[:50]:
        idx.add(n, v)
    assert not idx.approximate
    for n, v in list(vecs.items())[50:]:
        idx.add(n, v)
    assert idx.approximate
    q = _unit(rng, 50, 32)
    names, _ = idx.search(q, 1)
    import faiss

    assert isinstance(faiss.downcast_index(idx._index.index), faiss.IndexHNSW)
    hits = sum(names[b][0] == _brute(vecs, q[b], 1)[0] for b in range(50))
    assert hits >= 45  # approximate, but close to exact at this size


def test_save_load_roundtrip_and_checks(tmp_path):
    rng = np.random.default_rng(3)
    idx = ExpertIndex(16, "emb-a")
    for i in range(10):
        idx.add(f"e{i}", _unit(rng, 2, 16), key=f"k{i}")
    idx.remove("e3")
    idx.save(tmp_path / "ix")
    q = _unit(rng, 3, 16)
    loaded = ExpertIndex.load(tmp_path / "ix", dim=16, embedder="emb-a")
    assert loaded.names == idx.names and loaded.key("e4") == "k4"
    assert loaded.search(q, 3)[0] == idx.search(q, 3)[0]
    with pytest.raises(LibraryError, match="dimension 16.*gives 384"):
        ExpertIndex.load(tmp_path / "ix", dim=384)
    with pytest.raises(LibraryError, match="emb-a.*emb-b"):
        ExpertIndex.load(tmp_path / "ix", embedder="emb-b")


def _files(folder):
    return json.loads((folder / "index.json").read_text())["files"]


def test_corrupt_faiss_file_is_rebuilt_from_vectors(tmp_path):
    rng = np.random.default_rng(4)
    idx = ExpertIndex(8)
    for i in range(5):
        idx.add(f"e{i}", _unit(rng, 1, 8))
    idx.save(tmp_path)
    q = _unit(rng, 2, 8)
    (tmp_path / _files(tmp_path)["faiss"]).write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="rebuilt"):
        loaded = ExpertIndex.load(tmp_path)
    assert loaded.search(q, 2)[0] == idx.search(q, 2)[0]


def test_tampered_vectors_refused(tmp_path):
    idx = ExpertIndex(8)
    idx.add("a", np.eye(8, dtype=np.float32)[:1])
    idx.save(tmp_path)
    vec = tmp_path / _files(tmp_path)["vectors"]
    data = bytearray(vec.read_bytes())
    data[-1] ^= 1
    vec.write_bytes(bytes(data))
    with pytest.raises(LibraryError, match="sha256"):
        ExpertIndex.load(tmp_path)


def test_a_save_killed_midway_leaves_the_previous_index(tmp_path, monkeypatch):
    import moerge.library.index as index_module

    rng = np.random.default_rng(7)
    idx = ExpertIndex(8)
    idx.add("a", _unit(rng, 1, 8))
    idx.save(tmp_path)
    q = _unit(rng, 3, 8)
    expected = ExpertIndex.load(tmp_path).search(q, 1)
    idx.add("b", _unit(rng, 1, 8))

    def killed(*a, **k):  # the new vectors and FAISS files are written; the switch to them is not
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(index_module, "atomic_write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        idx.save(tmp_path)
    monkeypatch.undo()
    old = ExpertIndex.load(tmp_path)
    assert old.names == ["a"] and old.search(q, 1)[0] == expected[0]
    np.testing.assert_array_equal(old.search(q, 1)[1], expected[1])
    idx.save(tmp_path)  # the next save switches and removes what the killed one left
    assert ExpertIndex.load(tmp_path).names == ["a", "b"]
    assert len([p for p in tmp_path.iterdir()]) == 3


def test_save_leaves_other_files_in_the_folder_alone(tmp_path):
    idx = ExpertIndex(8)
    idx.add("a", np.eye(8, dtype=np.float32)[:1])
    (tmp_path / "notes.txt").write_text("mine")
    idx.save(tmp_path)
    idx.add("b", np.eye(8, dtype=np.float32)[1:2])
    idx.save(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine" and len(list(tmp_path.iterdir())) == 4
