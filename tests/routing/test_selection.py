"""select_weights: top-k, dynamic top-p and the null expert, against a direct reference."""

from __future__ import annotations

import math

import pytest
import torch

from moerge.routing import SelectionConfig, select_weights

INF = float("-inf")


def _softmax(vals):
    e = [math.exp(v) for v in vals]
    return [x / sum(e) for x in e]


@pytest.mark.parametrize("logits,kw,expected", [
    ([3.0, 2.0, 1.0], dict(top_k=2), _softmax([3, 2]) + [0.0]),
    ([1.0, 3.0, 2.0], dict(top_k=1), [0.0, 1.0, 0.0]),
    ([3.0, 2.0, 1.0], dict(top_k=None), _softmax([3, 2, 1])),
    ([5.0, 0.0, 0.0], dict(top_k=None, top_p=0.5), [1.0, 0.0, 0.0]),  # one expert already has p > 0.5
    ([1.0, 1.0, 1.0], dict(top_k=None, top_p=0.9), [1 / 3] * 3),  # a flat distribution needs all three
    ([1.0, 1.0, 1.0], dict(top_k=2, top_p=0.9), [0.5, 0.5, 0.0]),  # ... but top_k still caps it
    ([2.0, INF, 1.0], dict(top_k=3), _softmax([2, 1])[:1] + [0.0] + _softmax([2, 1])[1:]),
    ([INF, INF], dict(top_k=2), [0.0, 0.0]),
    ([0.0, 0.0], dict(top_k=2, null_logit=50.0), [0.0, 0.0]),  # the null expert takes everything: base only
    ([1.0, 0.0], dict(top_k=1, null_logit=1.0), [0.5, 0.0]),  # null ties with the best: half goes to the base
    ([2.0, 1.0], dict(top_k=2, null_logit=-50.0), _softmax([2, 1])),  # a null expert that is never chosen
])
def test_select_weights_table(logits, kw, expected):
    w = select_weights(torch.tensor([[logits]]), **kw)[0, 0]
    assert w.tolist() == pytest.approx(expected, abs=1e-6)


def test_weights_sum_to_one_over_chosen_and_respect_k():
    torch.manual_seed(0)
    z = torch.randn(4, 7, 6)
    for k in (1, 2, 3, 6):
        w = select_weights(z, top_k=k)
        assert torch.allclose(w.sum(-1), torch.ones(4, 7), atol=1e-6)
        assert int((w > 0).sum(-1).max()) <= k
        # the chosen experts are the k largest logits
        assert torch.equal((w > 0), torch.zeros_like(z, dtype=torch.bool).scatter(-1, z.topk(k, -1).indices, True))


def test_top_p_uses_more_experts_on_flatter_tokens():
    sharp = torch.tensor([8.0, 0.0, 0.0, 0.0])
    flat = torch.tensor([0.1, 0.0, 0.05, 0.02])
    w = select_weights(torch.stack([sharp, flat])[None], top_k=None, top_p=0.8)[0]
    assert int((w[0] > 0).sum()) == 1 and int((w[1] > 0).sum()) == 4


def test_null_expert_does_not_count_against_top_k():
    w = select_weights(torch.tensor([[[3.0, 2.0, 1.0]]]), top_k=2, null_logit=2.5)[0, 0]
    expected = _softmax([3.0, 2.5, 2.0])  # experts 0 and 1 are kept, plus the null expert
    assert w.tolist() == pytest.approx([expected[0], expected[2], 0.0], abs=1e-6)


@pytest.mark.parametrize("kw,match", [
    (dict(top_k=0), "top_k"), (dict(top_k=1.5), "top_k"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(null_logit=float("nan")), "null_logit"),
])
def test_selection_config_quotes_bad_values(kw, match):
    with pytest.raises(ValueError, match=match):
        SelectionConfig(**kw)


def test_top_k_fast_path_equals_the_general_path():
    from moerge.routing import select_weights

    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 5, 6, generator=g)
    z[0, :, 1] = float("-inf")  # a candidate without the module
    z[1, 2, :] = float("-inf")  # a token with no possible candidate
    for k in (1, 2, 3):
        fast = select_weights(z, top_k=k)
        general = select_weights(z, top_k=k, top_p=1.0)  # top_p=1 keeps the same set through the general path
        torch.testing.assert_close(fast, general)
        assert ((fast > 0).sum(-1) <= k).all() and torch.equal(fast[1, 2], torch.zeros(6))
    assert select_weights(z.to(torch.bfloat16), top_k=2).dtype == torch.bfloat16


def test_a_lazy_read_overtaken_by_a_replacement_changes_nothing():
    """An expert's vectors read lazily while the expert is replaced: the replacement's stand, the late read is
    dropped, and no gate table is left built from a state in between."""
    import threading

    from moerge.routing import Candidates
    from moerge.routing.selection import ExpertVectors

    vectors = ExpertVectors()
    started, release = threading.Event(), threading.Event()

    def slow_old(loaded):
        started.set()
        release.wait(30)
        return {"m": torch.ones(4)}

    vectors.set("b", {"m": torch.full((4,), 3.0)})
    vectors.set_lazy("a", slow_old)
    reader = threading.Thread(target=vectors.read, args=(["a"],))
    reader.start()
    assert started.wait(30)
    vectors.set_lazy("a", lambda loaded: {"m": torch.full((4,), 2.0)})  # the replacement, while the old is read
    release.set()
    reader.join(30)
    assert vectors.is_lazy("a")  # the old read did not take the new loader's place
    cands = Candidates(ids=torch.tensor([[0, 1]]), scores=torch.zeros(1, 2), names=("a", "b"))
    Vt, bias = vectors.gate_operands("m", cands, torch.device("cpu"))
    assert torch.equal(Vt[0, :, 0], torch.full((4,), 2.0)) and torch.equal(Vt[0, :, 1], torch.full((4,), 3.0))
    assert torch.isfinite(bias).all()
    vectors.remove("a")
    Vt, bias = vectors.gate_operands("m", cands, torch.device("cpu"))
    assert bias[0, 0, 0] == float("-inf") and torch.equal(Vt[0, :, 1], torch.full((4,), 3.0))  # no stale table


def test_a_table_built_while_the_vectors_change_is_not_kept():
    """Gate tables are built outside the lock (a discriminant takes a while): one built from vectors replaced
    meanwhile serves the request that asked for it but is not kept, and the next request builds from the new
    vectors; kept tables stay within the byte budget, least recently used dropped."""
    from dataclasses import dataclass

    from moerge.routing import Candidates
    from moerge.routing.selection import ExpertVectors

    vectors = ExpertVectors()
    vectors.set("a", {"m": torch.ones(4)})
    vectors.set("b", {"m": torch.full((4,), 2.0)})

    @dataclass(frozen=True)
    class Swap:  # a combine that replaces expert "a" while its table is being built
        def __call__(self, data, present):
            if not getattr(vectors, "_swapped", False):
                vectors._swapped = True
                vectors.set("a", {"m": torch.full((4,), 5.0)})
            return data, torch.zeros(len(data))

    cands = Candidates(ids=torch.tensor([[0, 1]]), scores=torch.zeros(1, 2), names=("a", "b"))
    Vt, _ = vectors.gate_operands("m", cands, torch.device("cpu"), combine=Swap())
    assert torch.equal(Vt[0, :, 0], torch.ones(4))  # built from the vectors it started with
    Vt, _ = vectors.gate_operands("m", cands, torch.device("cpu"), combine=Swap())
    assert torch.equal(Vt[0, :, 0], torch.full((4,), 5.0))  # not the stale table: built again from the new ones
    vectors.TABLE_BYTES = 120  # a combined table is (4 × 3) + 3 float32, 60 bytes: two fit
    for scale in (1.0, 2.0, 3.0, 4.0):
        vectors.gate_operands("m", cands, torch.device("cpu"), scale=scale, combine=Swap())
    assert len(vectors._tables) == 2 and vectors._table_bytes == sum(
        sum(t.numel() * t.element_size() for t in v) for v in vectors._tables.values()) <= 120
    vectors.TABLE_BYTES = 40  # a gate without combine keeps each expert's finished vector: 4 float32, two fit
    for scale in (2.0, 3.0):
        Vt, bias = vectors.gate_operands("m", cands, torch.device("cpu"), scale=scale)
        assert torch.equal(Vt[0], torch.stack([torch.full((4,), 5.0 * scale), torch.full((4,), 2.0 * scale)], 1))
        assert torch.equal(bias, torch.zeros(1, 1, 2))
    assert len(vectors._finished) == 2 and vectors._finished_bytes == 32
    assert [k[3] for k in vectors._tables] == [3.0, 4.0]  # the most recent kept


def test_a_set_of_experts_without_vectors_for_a_module_gets_empty_slots():
    """A table is built from the named experts' vectors alone: a row whose candidates have none for a module (other
    experts do) gets ``-inf`` for them there, with a combined gate as without."""
    from dataclasses import dataclass

    from moerge.routing import Candidates
    from moerge.routing.selection import ExpertVectors

    @dataclass(frozen=True)
    class Same:
        def __call__(self, data, present):
            return data, torch.zeros(len(data))

    vectors = ExpertVectors()
    vectors.set("a", {"m": torch.ones(4)})
    vectors.set("b", {"n": torch.ones(4)})
    cands = Candidates(ids=torch.tensor([[1, -1], [0, 1]]), scores=torch.zeros(2, 2), names=("a", "b"))
    for combine in (None, Same()):
        Vt, bias = vectors.gate_operands("m", cands, torch.device("cpu"), combine=combine)
        assert Vt.shape == (2, 4, 2) and torch.isinf(bias[0]).all()  # row 0: b has no vector for m, the other slot empty
        assert bias[1, 0, 0] == 0 and torch.isinf(bias[1, 0, 1]) and torch.equal(Vt[1, :, 0], torch.ones(4))
