"""Fine-tuning transfer: an expert made on one version of a tiny base, applied to a perturbed version of it."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from moerge import ExpertLibrary, MoErgeModel
from moerge.adapters.delta import expert_from_diff
from moerge.adapters.transfer import base_distance, transfer_expert
from moerge.core.fingerprint import base_parameters
from moerge.errors import BaseMismatchError

from helpers import rand_expert, tiny_llama

NOISE = 0.01


def _perturbed(source, noise=NOISE, seed=7):
    target = copy.deepcopy(source)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in target.parameters():
            p.add_(noise * p.abs().mean() * torch.randn(p.shape, generator=g))
    target.config._name_or_path = "tiny-llama-0-v2"
    return target


def _finetune(source, seed=3):
    ft = copy.deepcopy(source)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in ft.model.layers:
            for lin in (layer.self_attn.q_proj, layer.mlp.down_proj):
                lin.weight.add_(3.0 * lin.weight.abs().mean() * torch.randn(lin.weight.shape, generator=g))
    return ft


def _versions():
    """A source base, a fine-tune of it, an updated version of it and the fine-tune's diff expert ``ft``."""
    source = tiny_llama(0)
    finetuned = _finetune(source)
    return source, finetuned, _perturbed(source), expert_from_diff(finetuned, source, "ft")


def test_distance_between_two_versions():
    source = tiny_llama(0)
    target = _perturbed(source)
    d = base_distance(source, target)
    sp, tp = torch.cat([p.detach().reshape(-1) for p in source.parameters()]), \
        torch.cat([p.detach().reshape(-1) for p in target.parameters()])
    assert d.relative == pytest.approx(((tp - sp).norm() / sp.norm()).item(), rel=1e-4)
    assert d.cosine == pytest.approx(torch.nn.functional.cosine_similarity(sp, tp, dim=0).item(), abs=1e-6)
    assert 0 < d.relative < 5 * NOISE and d.changed == d.total
    assert set(d.per_module) >= {"model.layers.0.self_attn.q_proj", "lm_head"}
    assert base_distance(source, copy.deepcopy(source)).relative == 0.0
    assert "relative distance" in d.summary()


def test_transferred_diff_lands_on_the_target_and_carries_the_finetune(tmp_path):
    source, finetuned, target, expert = _versions()
    moved, dist = transfer_expert(expert, source, target)
    assert moved.metadata.base_model == "tiny-llama-0-v2"
    assert moved.metadata.source["transfer"]["distance"]["relative"] == pytest.approx(dist.relative)
    # the target's library accepts it (same architecture; its fingerprint is the target's)
    lib = ExpertLibrary.create(tmp_path / "lib", base_model=target)
    lib.add(moved)
    model = MoErgeModel.from_library(copy.deepcopy(target), lib)
    merged = model.merge({"ft": 1.0})
    for (n, p_src), p_ft, p_tgt, p_m in zip(source.named_parameters(), finetuned.parameters(), target.parameters(),
                                            merged.parameters()):
        torch.testing.assert_close(p_m, p_tgt + (p_ft - p_src), atol=1e-5, rtol=1e-5, msg=n)
    # the patch carries the fine-tune: target + Δ behaves like source + Δ far more than the target alone does
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = finetuned(input_ids=ids).logits
        with_patch = model(input_ids=ids, experts={"ft": 1.0}).logits
        without = target(input_ids=ids).logits
    assert (with_patch - want).abs().mean() < 0.25 * (without - want).abs().mean()


def test_transfer_refuses_other_architectures_and_other_sources():
    source = tiny_llama(0)
    expert = expert_from_diff(_finetune(source), source, "ft")
    with pytest.raises(BaseMismatchError, match="not a version of the source.*intermediate|shape") as e:
        transfer_expert(expert, source, tiny_llama(0, intermediate_size=48))
    assert e.value.expert == "ft"
    with pytest.raises(BaseMismatchError, match="vocab_size"):
        transfer_expert(expert, source, tiny_llama(0, vocab_size=100))
    with pytest.raises(BaseMismatchError, match="not made on the given source base"):
        transfer_expert(expert, tiny_llama(5), tiny_llama(5))
    moved, _ = transfer_expert(expert, tiny_llama(5), tiny_llama(6), strict_source=False)
    assert moved.name == "ft"


def test_lora_expert_transfers_unchanged_weights():
    source = tiny_llama(0)
    target = _perturbed(source)
    e = rand_expert(source, "lora", seed=2)
    moved, dist = transfer_expert(e, source, target, name="lora-v2")
    assert moved.name == "lora-v2" and math.isfinite(dist.relative)
    for m, w in e.modules.items():
        assert torch.equal(moved.modules[m].A, w.A) and torch.equal(moved.modules[m].B, w.B)


def test_transfer_reads_a_base_patched_by_a_live_model_as_the_plain_base(tmp_path):
    source, _, target, expert = _versions()
    plain_moved, plain_dist = transfer_expert(expert, source, target)
    plain_names = [n for n, _ in source.named_parameters()]
    # a live model patches the source in place: every linear module the diff changes becomes a wrapper
    lib = ExpertLibrary.create(tmp_path / "lib", base_model=source)
    lib.add(expert)
    lib.add(rand_expert(source, "lora", seed=2))
    live = MoErgeModel.from_library(source, lib, router="explicit")
    assert "model.layers.0.mlp.down_proj.base_layer.weight" in dict(source.named_parameters())
    assert list(base_parameters(source)) == plain_names
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        routed_before = live(input_ids=ids, experts={"ft": 0.5, "lora": 0.5}).logits
        base_logits = source(input_ids=ids).logits

    moved, dist = transfer_expert(expert, source, target)
    assert moved.name == plain_moved.name and moved.metadata == plain_moved.metadata
    assert dist == plain_dist  # relative, cosine, per-module distances, counts
    assert moved.modules.keys() == plain_moved.modules.keys()
    for m, w in plain_moved.modules.items():
        assert torch.equal(moved.modules[m].delta, w.delta), m
    assert base_distance(source, target) == plain_dist
    # the live model is untouched: it still routes, to the same output as before the transfer
    with torch.no_grad():
        routed_after = live(input_ids=ids, experts={"ft": 0.5, "lora": 0.5}).logits
    assert torch.equal(routed_after, routed_before)
    assert not torch.allclose(routed_after, base_logits)
    assert live.last_routing is not None and live.patched_modules
