"""Compressed experts: ComPEFT and BitDelta formulas, packed storage in the library (round trip, size, refusals),
low-rank SVD, and the runtime using the reconstruction."""

from __future__ import annotations

import json
import math

import pytest
import torch

from moerge import DeltaWeights, ExpertLibrary, MoErgeModel
from moerge.adapters.compress import compress_expert, compress_tensor, storage_bytes
from moerge.errors import ExpertFormatError, LibraryError

from helpers import rand_expert


def test_compeft_keeps_the_top_magnitudes_with_one_scale():
    t = torch.tensor([[0.1, -3.0, 2.0, 0.05], [-0.2, 1.0, -4.0, 0.3]])
    p = compress_tensor(t, "compeft", density=0.25)  # keep 2 of 8: −4 and −3
    scale = (4.0 + 3.0) / 2
    torch.testing.assert_close(p.dense(), torch.tensor([[0, -scale, 0, 0], [0, 0, -scale, 0]]))
    q = compress_tensor(t, "compeft", density=0.25, alpha=2.0)
    assert q.scale == pytest.approx(2.0 * t.std().item())


def test_bitdelta_is_sign_times_mean_magnitude_and_the_best_such_scale():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(40, 24, generator=g)
    p = compress_tensor(t, "bitdelta")
    torch.testing.assert_close(p.dense(), torch.sign(t) * t.abs().mean())
    err = lambda s: ((t - s * torch.sign(t)) ** 2).sum().item()  # noqa: E731
    assert err(p.scale) <= min(err(p.scale * 0.9), err(p.scale * 1.1))
    assert p.signs.numel() == math.ceil(t.numel() / 8) and p.mask is None


def test_packed_signs_round_trip_odd_sizes():
    for shape in [(1, 1), (3, 5), (7, 9)]:
        t = torch.randn(*shape)
        for method in ("compeft", "bitdelta"):
            p = compress_tensor(t, method, density=0.4)
            d = p.dense()
            assert d.shape == t.shape
            nz = d != 0
            assert torch.equal(torch.sign(d[nz]), torch.sign(t[nz]))


def _payload(path) -> int:
    """Bytes of a safetensors file's tensor data (the file less its JSON header)."""
    data = path.read_bytes()
    return len(data) - 8 - int.from_bytes(data[:8], "little")


@pytest.mark.parametrize("method, kw, min_ratio", [
    ("compeft", dict(density=0.1), 10.0),  # float32: 32 bits → 1 mask bit + 0.1 sign bits
    ("bitdelta", {}, 30.0),
    ("svd", dict(rank=2), 1.9),
])
def test_library_stores_the_packed_form_and_loads_the_same_weights(tmp_path, base, input_ids, method, kw, min_ratio):
    lib = ExpertLibrary.create(tmp_path / "lib", base_model=base)
    original = rand_expert(base, "x", seed=1, rank=4)
    small = compress_expert(original, method, **kw)
    ratio = storage_bytes(original) / storage_bytes(small)
    assert ratio >= min_ratio, ratio
    lib.add(small)
    dense_lib = ExpertLibrary.create(tmp_path / "dense", base_model=base)
    dense_lib.add(original)
    on_disk, dense_size = (_payload(x.root / "experts" / "x" / "weights.safetensors") for x in (lib, dense_lib))
    assert on_disk * min_ratio <= dense_size * 1.05, (on_disk, dense_size)
    loaded = lib.get("x")
    assert loaded.metadata.source["compression"]["method"] == method
    for m, w in small.modules.items():
        torch.testing.assert_close(loaded.modules[m].delta_weight(), w.delta_weight())
    assert loaded.digest() == small.digest()
    # the runtime serves the reconstruction
    with torch.no_grad():
        plain = base(input_ids=input_ids).logits
        model = MoErgeModel.from_library(base, lib)
        got = model(input_ids=input_ids, experts={"x": 1.0}).logits
    assert (got - plain).abs().max() > 1e-3


def test_compressed_dense_expert_keeps_its_bias(base):
    import copy

    from moerge.adapters.delta import expert_from_diff

    ft = copy.deepcopy(base)
    with torch.no_grad():
        ft.model.layers[0].mlp.down_proj.weight.add_(torch.randn_like(ft.model.layers[0].mlp.down_proj.weight))
    e = expert_from_diff(ft, base, "ft")
    c = compress_expert(e, "compeft", density=0.3)
    w = c.modules["model.layers.0.mlp.down_proj"]
    assert isinstance(w, DeltaWeights) and (w.delta != 0).float().mean().item() == pytest.approx(0.3, abs=0.01)
    with pytest.raises(ValueError, match="already compressed"):
        compress_expert(c, "bitdelta")


def _corrupt(lib, fn):
    path = lib.root / "experts" / "x" / "expert.json"
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))
    manifest = json.loads((lib.root / "library.json").read_text())
    import hashlib

    manifest["experts"]["x"]["files"]["expert.json"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (lib.root / "library.json").write_text(json.dumps(manifest))
    return ExpertLibrary.open(lib.root)


@pytest.mark.parametrize("damage, match", [
    (lambda d: next(iter(d["modules"].values()))["compressed"]["lora_A"].update(shape=[3, 3]), "bytes"),
    (lambda d: next(iter(d["modules"].values()))["compressed"]["lora_A"].update(method="zip"), "bad compression"),
    (lambda d: next(iter(d["modules"].values()))["compressed"]["lora_A"].update(scale="nan"), "bad compression"),
    (lambda d: next(iter(d["modules"].values()))["compressed"].update(lora_C={}), "cannot decompress"),
    (lambda d: next(iter(d["modules"].values())).pop("compressed"), "missing tensor|not described"),
])
def test_bad_compression_entries_are_refused_with_the_expert_named(tmp_path, base, damage, match):
    lib = ExpertLibrary.create(tmp_path / "lib", base_model=base)
    lib.add(compress_expert(rand_expert(base, "x", seed=1), "compeft", density=0.2))
    with pytest.raises((ExpertFormatError, LibraryError), match=match) as info:
        _corrupt(lib, damage).get("x")
    assert info.value.expert == "x"


def test_bad_settings_are_refused(base):
    e = rand_expert(base, "x")
    for kw, match in [(dict(method="zip"), "unknown compression"), (dict(method="compeft", density=0), "density"),
                      (dict(method="svd"), "rank"), (dict(method="svd", rank=0), "rank")]:
        with pytest.raises(ValueError, match=match):
            compress_expert(e, **kw)


def test_svd_cuts_a_lora_rank_to_the_best_approximation(base):
    e = rand_expert(base, "x", rank=6)
    c = compress_expert(e, "svd", rank=2)
    for m, w in e.modules.items():
        full = w.delta_weight()
        S = torch.linalg.svdvals(full)
        assert c.modules[m].rank == 2
        err = torch.linalg.matrix_norm(c.modules[m].delta_weight() - full)
        torch.testing.assert_close(err, S[2:].norm(), atol=1e-4, rtol=1e-3)


def test_sparse_positions_are_stored_as_gap_bytes():
    from moerge.adapters.packed import PackedSigns, _decode_gaps, encode_gaps

    pos = torch.tensor([0, 1, 254, 255, 256, 900, 1200])  # gaps 1, 1, 253, 1, 1, 644 (two escapes), 300 (one)
    b = encode_gaps(pos)
    assert b.tolist() == [1, 1, 253, 1, 1, 0, 0, 134, 0, 45]
    assert torch.equal(_decode_gaps(b), pos)
    g = torch.Generator().manual_seed(0)
    t = torch.randn(64, 300, generator=g)
    sparse, dense = compress_tensor(t, "compeft", density=0.05), compress_tensor(t, "compeft", density=0.5)
    assert sparse.gaps is not None and sparse.mask is None and dense.mask is not None and dense.gaps is None
    assert sparse.gaps.numel() < math.ceil(t.numel() / 8)
    expected = torch.zeros(t.numel(), dtype=torch.bool)
    expected[t.abs().flatten().topk(round(0.05 * t.numel())).indices] = True
    d = sparse.dense()
    assert torch.equal(d != 0, expected.view(t.shape)) and torch.equal(d.sign()[d != 0], t.sign()[d != 0])
    again = PackedSigns.from_tensors("k", sparse.spec(), sparse.tensors("k"), expert="x", file=None)
    assert torch.equal(again.dense(), d)
    bad = dict(sparse.tensors("k"), **{"k.gaps": torch.tensor([255, 255, 255, 255], dtype=torch.uint8) * 0 + 200})
    with pytest.raises(ExpertFormatError, match="beyond|bytes"):
        PackedSigns.from_tensors("k", {**sparse.spec(), "shape": [2, 2]}, bad, expert="x", file=None)
