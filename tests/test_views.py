"""Routing views: the per-layer × expert usage matrix and its heatmap PNG."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from moerge import MoErgeModel
from moerge.routers import build_router
from moerge.routing import RowRouting
from moerge.views import save_usage_heatmap, token_usage, usage_matrix

from helpers import VOCAB, rand_expert, tiny_llama


def test_usage_matrix_averages_each_layers_modules():
    row = RowRouting(experts={"a": 0.6, "b": 0.4}, candidates=["a", "b"], scores=[0.9, 0.5], layer_usage={
        "model.layers.0.self_attn.q_proj": {"a": 1.0, "b": 0.0},
        "model.layers.0.mlp.down_proj": {"a": 0.5, "b": 0.5},
        "model.layers.10.self_attn.q_proj": {"a": 0.2, "b": 0.8},
        "model.layers.2.self_attn.q_proj": {"a": 0.0, "b": 1.0},
    })
    names, experts, M = usage_matrix(row)
    assert names == ["layer 0", "layer 2", "layer 10"] and experts == ["a", "b"]  # numeric order
    np.testing.assert_allclose(M, [[0.75, 0.25], [0.0, 1.0], [0.2, 0.8]])
    names, _, M = usage_matrix(row, by="module")
    assert len(names) == 4 and M.shape == (4, 2)
    seq = RowRouting(experts={"a": 0.3, "b": 0.7}, candidates=["a", "b"], scores=[0.3, 0.7])
    assert usage_matrix(seq)[0] == ["all modules"] and usage_matrix(seq)[2].tolist() == [[0.3, 0.7]]
    with pytest.raises(ValueError, match="by must"):
        usage_matrix(row, by="token")


def test_heatmap_of_a_routed_batch_is_written(tmp_path):
    import matplotlib.image

    base = tiny_llama()
    model = MoErgeModel(copy.deepcopy(base), build_router("arrow", top_k=2))
    model.expert_set.install([rand_expert(base, f"e{i}", seed=i) for i in range(3)], model.router)
    with torch.no_grad():
        model(input_ids=torch.randint(3, VOCAB, (2, 6)))
    path = save_usage_heatmap(model.last_routing, tmp_path / "views" / "usage.png", titles=["first", "second"])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 200
    assert img[..., :3].std() > 0.05  # not a blank canvas
    with pytest.raises(ValueError, match="no routing"):
        save_usage_heatmap([], tmp_path / "x.png")


def test_token_usage_gives_each_tokens_gate_weights_per_layer():
    base = tiny_llama()
    model = MoErgeModel(copy.deepcopy(base), build_router("arrow", top_k=2))
    model.expert_set.install([rand_expert(base, f"e{i}", seed=i) for i in range(3)], model.router)
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    layers, tokens, experts, W = token_usage(model, ids, row=1)
    assert layers == ["layer 0", "layer 1"] and len(tokens) == 7 and experts == ["e0", "e1", "e2"]
    assert W.shape == (2, 7, 3)
    np.testing.assert_allclose(W.sum(-1), 1.0, atol=1e-5)  # each token's weights sum to 1 in every module
    assert ((W > 0).sum(-1) <= 2 * 3).all()  # top-2 per module, averaged over a layer's modules
    # the per-token weights average to the trace's per-layer usage
    row = model.last_routing[1]
    names, _, M = usage_matrix(row)
    np.testing.assert_allclose(W.mean(1), M, atol=1e-5)
