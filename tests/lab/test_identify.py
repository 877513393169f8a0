"""The per-token identification metric against the gate weights the routed model records, the calibration's
likelihoods against their formula, and the training loss computed on the scored tokens only."""

from __future__ import annotations

import pytest
import torch

from moerge import ExpertLibrary, MoErgeModel
from moerge.lab.calibrate import calibrate_global
from moerge.lab.identify import identification_markdown, layer_of, token_identification
from moerge.lab.tasks import Example
from moerge.routers import build_router
from moerge.routing.training import answer_positions, collate, lm_loss

from helpers import rand_expert, tiny_chat_llama, tiny_tokenizer

EXAMPLES = [Example("upper", "Uppercase this.", "a b c", "A B C"), Example("upper", "caps:", "x y", "X Y"),
            Example("plural", "Plural of:", "cat", "cats"), Example("plural", "Plural?", "box", "boxes"),
            Example("other", "Something else.", "q", "r")]


def _model(tmp_path, router):
    base = tiny_chat_llama()
    lib = ExpertLibrary.create(tmp_path / "lib", base_model=base)
    lib.add(rand_expert(base, "upper", seed=1, description="Write text in capitals.",
                        examples=["Uppercase this.\n\na b", "caps: d e f"]))
    lib.add(rand_expert(base, "plural", seed=2, description="Give the plural of a noun.",
                        examples=["Plural of: dog", "Plural? fox"]))
    return MoErgeModel.from_library(base, lib, router=router, tokenizer=tiny_tokenizer(), follow=False)


def test_counts_are_the_argmax_of_the_gate_the_model_records(tmp_path):
    model = _model(tmp_path, build_router("arrow", top_k=1))
    tok = model.tokenizer
    got = token_identification(model, tok, EXAMPLES, batch_size=2, temperatures=(0.5, 1.0, 2.0))
    # the reference: the one-hot weights the routed forward records (top_k=1), row by row
    names = list(model.experts)
    hits = {"prompt": {}, "answer": {}}
    tokens = {"prompt": {}, "answer": {}}
    for e in EXAMPLES:
        b = collate(tok, [(e.prompt, e.target)])
        with model.routing(b["input_ids"], b["attention_mask"]) as state:
            state.keep_tokens = True
            model.base(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        answer = answer_positions(b["labels"])[0]  # the tokens that write the answer
        for module in model.patched_modules:
            w = state.token_weights(module)[0]  # (T, K)
            picked = [names[int(state.candidates.ids[0, k])] if w[t, k] > 0 else None
                      for t, k in enumerate(w.argmax(-1).tolist())]
            layer = layer_of(module)
            for kind, mask in (("prompt", ~answer), ("answer", answer)):
                sel = [p for p, m in zip(picked, mask.tolist()) if m]
                hits[kind][layer] = hits[kind].get(layer, 0) + sum(p == e.task for p in sel)
                tokens[kind][layer] = tokens[kind].get(layer, 0) + len(sel)
    for kind in ("prompt", "answer"):
        assert dict(got.tokens[kind]) == tokens[kind]
        assert dict(got.hits[kind]) == hits[kind]
    assert sum(got.tokens["answer"].values()) == sum(  # the prompt's last token through the one writing <|im_end|>
        len(tok(e.target + "<|im_end|>", add_special_tokens=False)["input_ids"]) * len(model.patched_modules)
        for e in EXAMPLES)
    conf = got.confusion
    assert set(conf) == {"upper", "plural", "other"} and sum(conf["other"].values()) > 0
    assert all(set(c) <= {"upper", "plural", "(none)"} for c in conf.values())
    # likelihoods: only the rows whose true expert is a candidate count ("other" has none)
    assert got.nll_tokens == sum(got.tokens["answer"].values()) - sum(conf["other"].values())
    assert got.best_temperature() in (0.5, 1.0, 2.0) and got.nll[got.best_temperature()] == min(got.nll.values())
    assert "| arrow |" in identification_markdown([got])


def test_calibration_likelihood_is_the_softmax_of_the_cosines(tmp_path):
    model = _model(tmp_path, build_router("glider", local="none", candidates=2))
    glider = model.router
    exs = EXAMPLES[:4]
    best, curve = calibrate_global(glider, exs, grid=(0.01, 0.1, 1.0))
    names, sims = glider.retrieve([e.prompt for e in exs], 2)
    for t, v in curve.items():
        ref = -sum(float(torch.log_softmax(torch.tensor(s, dtype=torch.float64) / t, 0)[row.index(e.task)])
                   for row, s, e in zip(names, sims, exs)) / len(exs)
        assert abs(v - ref) < 1e-9
    assert curve[best] == min(curve.values())
    assert not glider.has_linear_gate  # GLIDER without a local gate: nothing per token to identify
    with pytest.raises(ValueError, match="no linear local gate"):
        token_identification(model, model.tokenizer, exs)


def test_within_glider_the_temperature_divides_the_local_logits_only(tmp_path):
    """GLIDER's posterior is ``softmax(local / τ + log_prior)``: the calibration's likelihood of the true expert
    against that formula, from the local gate's and the global stage's own terms."""
    model = _model(tmp_path, build_router("glider", local="arrow", candidates=2, global_temperature=0.05))
    glider, tok = model.router, model.tokenizer
    exs = EXAMPLES[:4]
    temps = (0.5, 2.0)
    got = token_identification(model, tok, exs, batch_size=4, temperatures=temps)
    ref = {t: 0.0 for t in temps}
    names = list(model.experts)
    for e in exs:
        b = collate(tok, [(e.prompt, e.target)])
        answer = answer_positions(b["labels"])[0]
        seen = []  # (module, input) of every patched module, in the forward
        hooks = [model.base.get_submodule(m).register_forward_pre_hook(
            lambda mod, a, seen=seen: seen.append((mod, a[0]))) for m in model.patched_modules]
        try:
            with torch.no_grad(), model.routing(b["input_ids"], b["attention_mask"]) as state:
                model.base(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
                cands = state.candidates
                prior = glider.log_prior(cands)[0]  # (K,)
                slot = cands.ids[0].tolist().index(names.index(e.task))
                for mod, x in seen:
                    local = glider.local.logits(x.reshape(1, -1, x.shape[-1]), cands, mod.info)[0]  # (T, K)
                    for t in temps:
                        ref[t] -= float(torch.log_softmax(local / t + prior, -1)[answer, slot].sum())
        finally:
            for h in hooks:
                h.remove()
    for t in temps:
        assert got.nll[t] == pytest.approx(ref[t], rel=1e-4)
    assert got.nll[0.5] != pytest.approx(got.nll[2.0], rel=1e-3)  # the temperature matters


def test_lm_loss_is_the_models_loss_on_the_scored_tokens():
    base, tok = tiny_chat_llama(), tiny_tokenizer()
    b = collate(tok, [("Uppercase this.", "A B C"), ("Plural of: cat", "cats")])
    ref = base(**b).loss
    got = lm_loss(base, b)
    assert torch.allclose(got, ref, atol=1e-6)
    g_ref = torch.autograd.grad(ref, base.model.layers[0].mlp.up_proj.weight)[0]
    g_got = torch.autograd.grad(lm_loss(base, b), base.model.layers[0].mlp.up_proj.weight)[0]
    assert torch.allclose(g_got, g_ref, atol=1e-6)
    assert not base.lm_head._forward_pre_hooks  # the hook is gone


@pytest.mark.parametrize("chatml", [True, False])
def test_the_answer_is_written_through_the_token_generation_stops_at(chatml):
    """With a ChatML template the tokens that write the answer end with the one writing ``<|im_end|>`` (where
    generation stops): the newline the template puts after it is in the sequence, unscored, and no position writes
    it. Without a template the EOS token ends the answer and nothing follows it."""
    from moerge.routing.training import encode_pair

    tok = tiny_tokenizer()
    if not chatml:
        tok.chat_template = None
    ids, labels = encode_pair(tok, "Plural of: cat", "cats")
    scored = [t for t in labels if t != -100]
    end = "<|im_end|>" if chatml else tok.eos_token
    assert tok.decode(scored) == "cats" + end
    assert tok.decode(ids[len(ids) - len(scored) - (1 if chatml else 0):]) == "cats" + end + ("\n" if chatml else "")
    b = collate(tok, [("Plural of: cat", "cats")])
    writes = answer_positions(b["labels"])[0].nonzero().flatten().tolist()
    ends = (b["input_ids"][0] == tok.convert_tokens_to_ids(end)).nonzero().flatten().tolist()
    assert len(writes) == len(scored) and writes[-1] == ends[-1] - 1  # the last writer is the token before the end
