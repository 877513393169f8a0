"""Sibling modules (q/k/v, gate/up) share one gate-and-shrink step on CPU: the groups are seen from which modules
receive the same input tensor, and a routed model answers as it does with every module stepping alone (to the
rounding of a wider matmul), with local gates of each finish, sequence weights, half precision, beams and the
routing trace."""

from __future__ import annotations

import copy

import pytest
import torch

from moerge import MoErgeModel
from moerge.routers import build_router
from moerge.runtime import siblings as S

from helpers import VOCAB, rand_expert, tiny_llama

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(autouse=True)
def _torch_path(monkeypatch):
    """Siblings share a step on the torch path only: the native CPU step (which takes prompts whose factors are
    still in the banks, and decode steps) is off here."""
    monkeypatch.setenv("MOERGE_NO_KERNEL", "1")


def _model(router="arrow", dtype=torch.float32, modules=ALL, **kw):
    base = tiny_llama()
    model = MoErgeModel(copy.deepcopy(base).to(dtype), build_router(router, **kw), expert_dtype=dtype)
    experts = [rand_expert(base, f"e{i}", seed=i, rank=(2, 4, 3)[i % 3],
                           modules=modules if i % 2 else tuple(m for m in modules if m != "k_proj"))
               for i in range(5)]
    model.expert_set.install(experts, model.router)
    return model


def _ids(rows=S.MAX_ROWS, seed=1):
    return torch.randint(3, VOCAB, (rows, 9), generator=torch.Generator().manual_seed(seed))


def _names(model, group):
    by_index = {layer.patch_index: name for name, layer in model.expert_set.layers.items()}
    return tuple(by_index[i].rsplit(".", 1)[-1] for i in group)


def _alone(model):
    """A copy of the model's sibling groups, cleared (every module steps alone) — restore with the return value."""
    groups = dict(model.expert_set.siblings.group_of)
    model.expert_set.siblings.group_of.clear()
    return groups


def _decode(model, ids, steps=4, **kw):
    """Greedy decode with the KV cache by hand: the logits of the prompt and of each step."""
    out = []
    with torch.no_grad(), model.routing(input_ids=ids, **kw):
        res = model.base(input_ids=ids, use_cache=True)
        out.append(res.logits)
        for _ in range(steps):
            nxt = res.logits[:, -1:].argmax(-1)
            res = model.base(input_ids=nxt, past_key_values=res.past_key_values, use_cache=True)
            out.append(res.logits)
    return out


def test_the_groups_are_the_modules_that_read_one_input():
    model = _model()
    with torch.no_grad():
        model(input_ids=_ids())
    groups = set(model.expert_set.siblings.group_of.values())
    assert {_names(model, g) for g in groups} == {("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")}
    assert len(groups) == 2 * model.base.config.num_hidden_layers  # per layer: attention's and the MLP's


@pytest.mark.parametrize("router,kw", [("arrow", dict(top_k=2)), ("arrow", dict(top_k=None))])
def test_a_shared_step_answers_as_each_module_alone(router, kw, monkeypatch):
    model = _model(router, **kw)
    ids = _ids()
    _decode(model, ids)  # the prompt's forward shows the groups
    shared_steps = []
    real = S.group_step

    def spy(parts, selection):
        step = real(parts, selection)
        shared_steps.append(step is not None)
        return step

    monkeypatch.setattr("moerge.runtime.siblings.group_step", spy)
    fused, trace = _decode(model, ids), model.last_routing
    assert shared_steps and all(shared_steps)  # every group shared its step
    groups = _alone(model)
    alone, trace_alone = _decode(model, ids), model.last_routing
    model.expert_set.siblings.group_of.update(groups)
    for a, b in zip(fused, alone, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for a, b in zip(trace, trace_alone, strict=True):  # the trace reads each member's own weights
        assert a.layer_usage.keys() == b.layer_usage.keys()
        for m in a.layer_usage:
            assert a.layer_usage[m] == pytest.approx(b.layer_usage[m], abs=1e-5)


@pytest.mark.parametrize("finish", ["none", "abs", "standardized"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_shared_step_is_each_members_step_side_by_side(finish, dtype):
    from moerge.routing import LinearGate, SelectionConfig
    from moerge.runtime.gathered import GatheredLoRA, GatheredModule

    g = torch.Generator().manual_seed(0)
    B, T, IN, K = 2, 5, 16, 3
    parts = []
    for i, (r, out) in enumerate([(4, 8), (6, 5), (2, 7)]):  # three members of other ranks and widths
        Vt, At = torch.randn(B, IN, K, generator=g), torch.randn(B, IN, K * r, generator=g)
        bias = torch.randn(B, 1, K, generator=g)
        bias[1, 0, 2] = float("-inf")  # a candidate without a vector
        E = torch.zeros(B, K, K * r)
        for k in range(K):
            E[:, k, k * r:(k + 1) * r] = 1
        lora = GatheredLoRA(torch.cat([Vt, At], 2).to(dtype), torch.randn(B, K * r, out, generator=g).to(dtype),
                            E.to(dtype), LinearGate(Vt, bias, finish))
        parts.append((i, GatheredModule(B, lora, [], dtype)))
    selection = SelectionConfig(top_k=2)
    x = torch.randn(B, T, IN, generator=g).to(dtype)
    h, w = S.group_step(parts, selection)(x)
    assert w.shape == (B, T, 3, K)
    start = 0
    for j, (_, part) in enumerate(parts):  # each member's own fast step, on its own output
        y = torch.zeros(B, T, part.lora.Bt.shape[2], dtype=dtype)
        want_y, want_w = part.fast_step(selection)(x, y.clone())
        r = part.lora.Bt.shape[1]
        got_y = y.baddbmm_(h[:, :, start:start + r], part.lora.Bt)
        start += r
        torch.testing.assert_close(w[:, :, j], want_w)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got_y.float(), want_y.float(), atol=tol, rtol=tol)


def test_members_that_cannot_share_a_step_step_alone():
    from moerge.routing import LinearGate, SelectionConfig
    from moerge.runtime.gathered import GatheredLoRA, GatheredModule

    def part(finish="abs", k=3, dense=False):
        lora = GatheredLoRA(torch.zeros(1, 4, k + 2 * k), torch.zeros(1, 2 * k, 3), torch.zeros(1, k, 2 * k),
                            LinearGate(torch.zeros(1, 4, k), torch.zeros(1, 1, k), finish))
        return GatheredModule(1, lora, [object()] if dense else [], torch.float32)

    sel = SelectionConfig(top_k=2)
    assert S.group_step([(0, part()), (1, part())], sel) is not None
    assert S.group_step([(0, part())], sel) is None  # one member: nothing to share
    assert S.group_step([(0, part()), (1, part("none"))], sel) is None  # other finishes
    assert S.group_step([(0, part()), (1, part(k=2))], sel) is None  # other candidate counts
    assert S.group_step([(0, part()), (1, part(dense=True))], sel) is None  # dense experts
    assert S.group_step([(0, part()), (1, part())], SelectionConfig(top_k=2, top_p=0.5)) is None  # top-p
    assert S.group_step([(0, part()), (1, part())], None) is None  # a gate but no selection


def test_sequence_weights_share_the_shrink():
    model = _model()
    ids = _ids()
    mix = [{"e0": 0.3, "e1": 0.7}, {"e1": 0.5, "e3": 0.5}]
    _decode(model, ids, experts=mix)
    fused = _decode(model, ids, experts=mix)
    groups = _alone(model)
    alone = _decode(model, ids, experts=mix)
    model.expert_set.siblings.group_of.update(groups)
    for a, b in zip(fused, alone, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_generate_with_beams_and_half_precision_gives_the_same_tokens(monkeypatch):
    model = _model(dtype=torch.bfloat16, top_k=2)  # bfloat16 experts too: the shared step runs in bfloat16
    ids = _ids(rows=1)
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False, pad_token_id=0, num_beams=2)
    model.generate(ids, **kw)  # the groups
    shared = []
    real = S.group_step
    monkeypatch.setattr("moerge.runtime.siblings.group_step", lambda *a: shared.append(real(*a)) or shared[-1])
    fused = model.generate(ids, **kw)
    assert shared and all(step is not None for step in shared)
    groups = _alone(model)
    alone = model.generate(ids, **kw)
    model.expert_set.siblings.group_of.update(groups)
    assert torch.equal(fused, alone)


def test_larger_batches_step_each_module_alone(monkeypatch):
    model = _model(top_k=2)
    ids = _ids(rows=S.MAX_ROWS + 1)
    _decode(model, ids)
    monkeypatch.setattr("moerge.runtime.siblings.group_step", lambda *a: pytest.fail("a shared step at a large batch"))
    _decode(model, ids)
    assert model.expert_set.siblings.group_of  # the groups are known, and not used


def test_a_wrong_group_costs_time_never_the_answer():
    model = _model(top_k=2)
    ids = _ids()
    want = _decode(model, ids)
    layers = model.expert_set.layers
    q = layers["model.layers.0.self_attn.q_proj"].patch_index
    o = layers["model.layers.0.self_attn.o_proj"].patch_index
    down = layers["model.layers.1.mlp.down_proj"].patch_index
    wrong = {q: (q, o), o: (q, o), down: (down,)}  # o_proj reads the attention's output, not q's input
    model.expert_set.siblings.group_of.clear()
    model.expert_set.siblings.group_of.update(wrong)
    got = _decode(model, ids)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_the_groups_survive_a_copy_and_a_pickle():
    import pickle

    model = _model()
    with torch.no_grad():
        model(input_ids=_ids())
    sib = model.expert_set.siblings
    for other in (copy.deepcopy(sib), pickle.loads(pickle.dumps(sib))):
        assert other.group_of == sib.group_of and other is not sib
        other.observe(0, torch.zeros(1, 2, 3))  # its own record of inputs
