"""Continuous batching (moerge.runtime.decode): rows that join a running batch and leave it get what each request
computes alone — the same greedy tokens as ``generate``, the same seeded samples, their own routing — and the
sampler applies OpenAI's fields as their definitions say."""

from __future__ import annotations

import copy

import pytest
import torch

from moerge import ExpertLibrary, MoErgeModel
from moerge.routers import build_router
from moerge.routing.embed import CallableEmbedder
from moerge.runtime.decode import DecodeBatch, Prompt
from moerge.runtime.sampling import RowSampler, Sampling

from helpers import save_peft_lora, tiny_chat_llama, tiny_gpt2, tiny_llama, tiny_qwen2_moe, tiny_tokenizer

STEPS = 6


def _letters(texts):  # a toy embedder for GLIDER's global stage: letter counts
    out = torch.zeros(len(texts), 26)
    for i, t in enumerate(texts):
        for ch in t.lower():
            if "a" <= ch <= "z":
                out[i, ord(ch) - 97] += 1
    return torch.nn.functional.normalize(out + 1e-3, dim=-1).numpy()


def _router(name: str):
    if name == "glider":  # global retrieval of 2 of the 3, then PHATGOOSE's gate, trained on the experts' examples
        return build_router("glider", candidates=2, embedder=CallableEmbedder(_letters, "letters", 26),
                            local_config={"top_k": 2, "train_steps": 2, "train_batch_size": 2})
    return build_router(name, top_k=2)


def _model(tmp_path, base, router: str, dense: bool = False, fused: bool = False) -> MoErgeModel:
    targets = ["c_attn", "c_fc"] if hasattr(base, "transformer") else ["q_proj", "v_proj", "down_proj"]
    # fused: an MoE model's router and fused expert weights too (PEFT's target_parameters)
    extra = {"target_parameters": ["gate.weight", "gate_up_proj", "down_proj"]} if fused else {}
    lib = ExpertLibrary.create(tmp_path / "lib", base_model=base)
    for i, name in enumerate(["a", "b", "c"]):
        lib.add_peft(save_peft_lora(base, tmp_path / name, seed=i, target_modules=targets, **extra), name,
                     description=f"expert {name}", examples=[f"task {name} example {j}" for j in range(3)],
                     base=base if fused else None)
    if dense:  # a full fine-tune: dense experts are mixed row by row (the joined batch's split path)
        tuned = copy.deepcopy(base)
        with torch.no_grad():
            for n, p in tuned.named_parameters():
                if n.endswith("weight") and p.dim() == 2 and "layers.1" in n:
                    p.add_(torch.randn_like(p) * 0.05)
        lib.add_delta(tuned, base, name="ft", description="fine-tune")
    return MoErgeModel.from_library(copy.deepcopy(base), lib, router=_router(router), tokenizer=tiny_tokenizer())


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 90, (int(length),), generator=g).tolist() for length in torch.randint(2, 14, (n,),
                                                                                                   generator=g)]


def _alone(model, ids, mix, steps=STEPS):
    t = torch.tensor([ids])
    out = model.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=steps, do_sample=False, experts=mix,
                         pad_token_id=0)
    return out[0, len(ids):].tolist(), model.last_routing[0]  # shorter when it ends at EOS


def _run(batch: DecodeBatch, prompts: list[Prompt], join_every: int = 2) -> dict:
    """Run ``prompts`` through ``batch``, one joining every ``join_every`` steps; each owner's rows' tokens."""
    got, pending, step = {}, list(prompts), 0
    while pending or len(batch):
        if pending and step % join_every == 0:
            batch.join(batch.prefill([pending.pop(0)]))
        if len(batch):
            batch.step()
            done = [r for r in batch.rows if r.budget_left <= 0]
            for r in done:
                got.setdefault(r.prompt.owner, {})[r.index] = r
            batch.leave(done)
        step += 1
    return got


@pytest.mark.parametrize("make_base,router,dense,fused", [
    (tiny_llama, "arrow", False, False), (tiny_llama, "arrow", True, False), (tiny_gpt2, "arrow", False, False),
    (tiny_chat_llama, "glider", False, False), (tiny_qwen2_moe, "arrow", True, False),
    (tiny_qwen2_moe, "arrow", False, True)])
def test_rows_joining_and_leaving_get_what_each_prompt_gets_alone(tmp_path, make_base, router, dense, fused):
    model = _model(tmp_path, make_base(0), router, dense, fused)
    mixes = [None, {"a": 1.0}, None, {"b": 0.5, "c": 0.5}, None, {"ft": 1.0} if dense else None, None]
    prompts = _prompts(len(mixes))
    expected = [_alone(model, p, m) for p, m in zip(prompts, mixes)]
    batch = DecodeBatch(model, pad_id=0)
    got = _run(batch, [Prompt(p, Sampling(temperature=0), STEPS, n=2 if i == 2 else 1, experts=m, owner=i)
                       for i, (p, m) in enumerate(zip(prompts, mixes))])
    for i, (tokens, routing) in enumerate(expected):
        rows = got[i]
        # a row goes on past EOS (ending rows is the caller's business)
        assert all(rows[j].tokens[:len(tokens)] == tokens for j in rows), (i, tokens, rows)
        mine = rows[0].state.trace()[0]  # the request's routing trace is its own
        assert mine.candidates == routing.candidates
        if len(tokens) == STEPS:  # (the weights are averaged over the tokens run)
            for name, w in routing.experts.items():
                assert mine.experts[name] == pytest.approx(w, abs=1e-4), (i, name)
    assert len(got[2]) == 2 and batch.cache is None and not len(batch)  # n=2: two rows; all gone at the end


def test_a_seeded_row_draws_the_same_tokens_alone_or_joined(tmp_path):
    model = _model(tmp_path, tiny_llama(0), "arrow")
    prompts = _prompts(5, seed=3)
    seeded = Sampling(temperature=1.0, top_p=0.95, seed=1234)

    def run(others: int, join_every: int):
        batch = DecodeBatch(model, pad_id=0)
        jobs = [Prompt(p, Sampling(temperature=1.0), 12, owner=i) for i, p in enumerate(prompts[:others])]
        jobs.insert(others // 2, Prompt(prompts[4], seeded, 12, owner="seeded"))
        torch.manual_seed(others)  # the global generator is not what a seeded row draws from
        return _run(batch, jobs, join_every)["seeded"][0].tokens

    alone = run(0, 1)
    assert run(4, 1) == alone and run(3, 3) == alone
    other_seed = Sampling(temperature=1.0, top_p=0.95, seed=99)
    batch = DecodeBatch(model, pad_id=0)
    assert _run(batch, [Prompt(prompts[4], other_seed, 12, owner=0)])[0][0].tokens != alone


def test_echo_gives_each_prompt_tokens_logprob_under_the_prompts_routing(tmp_path):
    model = _model(tmp_path, tiny_llama(0), "arrow")
    ids = _prompts(1, seed=5)[0]
    batch = DecodeBatch(model, pad_id=0)
    done = batch.prefill([Prompt(ids, Sampling(temperature=0, top_logprobs=3), 0, echo=True)])
    [row] = done.rows
    assert row.done and not row.picks  # max_new 0: scored, nothing generated
    t = torch.tensor([ids])
    with torch.no_grad():
        ref = torch.log_softmax(model(t, attention_mask=torch.ones_like(t)).logits[0].float(), -1)
    assert row.prompt_logprobs[0] is None
    for pos, pick in enumerate(row.prompt_logprobs[1:], start=1):
        assert pick.token == ids[pos]
        assert pick.logprob == pytest.approx(float(ref[pos - 1, ids[pos]]), abs=1e-5)
        assert [a for a, _ in pick.top] == ref[pos - 1].topk(3).indices.tolist()


def test_the_sampler_applies_penalties_bias_temperature_and_nucleus_as_defined():
    logits = torch.tensor([2.0, 1.5, 1.0, 0.0, -1.0])
    # frequency and presence penalties (OpenAI: logit - count * frequency - (count > 0) * presence) and logit_bias
    s = RowSampler(Sampling(temperature=0, frequency_penalty=0.4, presence_penalty=0.3, logit_bias={4: 3.5},
                            top_logprobs=2))
    first = s(logits)
    assert first.token == 4  # -1 + 3.5 = 2.5 > 2.0
    assert first.logprob == pytest.approx(float(torch.log_softmax(logits, -1)[4]))  # the model's, before the bias
    assert [t for t, _ in first.top] == [0, 1]
    assert s(logits).token == 0  # token 4 once: 2.5 - 0.4 - 0.3 = 1.8 < 2.0
    assert s(logits).token == 4  # token 0 once: 2.0 - 0.7 = 1.3 < 1.8
    assert s(logits).token == 1  # token 4 twice: 2.5 - 0.8 - 0.3 = 1.4 < 1.5 (token 1, never drawn)
    # nucleus: top_p keeps the fewest most likely tokens reaching it; temperature -> 0 limit is argmax
    probs = torch.softmax(logits, -1)
    keep = int((probs.sort(descending=True).values.cumsum(0) < 0.6).sum()) + 1
    draws = {RowSampler(Sampling(temperature=1.0, top_p=0.6, seed=k))(logits).token for k in range(200)}
    assert draws == set(range(keep))
    # a row's seed gives the same draws whatever the global generator does
    a, b = RowSampler(Sampling(seed=7)), RowSampler(Sampling(seed=7))
    torch.manual_seed(0)
    seq_a = [a(logits).token for _ in range(20)]
    torch.manual_seed(1)
    seq_b = [b(logits).token for _ in range(20)]
    assert seq_a == seq_b and len(set(seq_a)) > 1
    # a top_p or a temperature at the edge of float32 still gives a token (both were server errors)
    assert RowSampler(Sampling(top_p=5e-324, seed=1))(logits).token == 0
    assert RowSampler(Sampling(temperature=1e-300, seed=1))(logits).token == 0
    # samples of one request (n > 1) draw differently
    assert [RowSampler(Sampling(seed=7), index=1)(logits).token for _ in range(20)] != seq_a


def test_prompts_prefilled_together_keep_their_own_routing_trace(tmp_path):
    model = _model(tmp_path, tiny_llama(0), "arrow")
    short, long = _prompts(2, seed=11)[0][:3], _prompts(2, seed=12)[1] + _prompts(2, seed=13)[1]
    alone = DecodeBatch(model, pad_id=0).prefill([Prompt(short, Sampling(temperature=0), 1)]).rows[0]
    together = DecodeBatch(model, pad_id=0).prefill([Prompt(long, Sampling(temperature=0), 1),
                                                      Prompt(short, Sampling(temperature=0), 1)]).rows[1]
    a, b = alone.state.trace()[0], together.state.trace()[0]  # the padding before the short prompt is not its
    assert a.candidates == b.candidates
    for name, w in a.experts.items():
        assert b.experts[name] == pytest.approx(w, abs=1e-5)
    assert together.picks[0].token == alone.picks[0].token
