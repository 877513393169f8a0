"""GLIDER: global retrieval over the experts' descriptions (FAISS index kept in the library), the local gate
among each row's candidates, and the router contracts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from moerge import ExpertLibrary, MoErgeModel
from moerge.errors import LibraryError, RoutingError
from moerge.routers import build_router
from moerge.routing import Candidates, RouterContext, select_weights
from moerge.routing.embed import CallableEmbedder, default_sentence_embedder
from moerge.routing.retrieval import ExpertRetriever, RetrievalConfig, expert_texts

from helpers import rand_expert, tiny_chat_llama, tiny_tokenizer

EXPERTS = {
    "sort": ("Sort a list of numbers in ascending order.", ["Sort these numbers: 4, 1, 3", "Order 9, 2, 7 ascending"]),
    "french": ("Translate English text into French.", ["Translate to French: good night",
                                                       "How do you say 'cat' in French?"]),
    "sql": ("Write an SQL query that answers a question about a database table.",
            ["Write SQL to list every customer", "Query the orders table for last week's orders"]),
    "haiku": ("Write a short haiku poem about a topic.", ["Write a haiku about autumn", "A haiku on the sea"]),
}
PROMPTS = {
    "sort": "Arrange 12, 5, 8 and 1 from smallest to largest.",
    "french": "Please put 'the weather is nice today' into French.",
    "sql": "Give me a SELECT statement returning the users older than 30 from the users table.",
}


@pytest.fixture(scope="module")
def embedder():
    from moerge.routing.embed import as_embedder

    return as_embedder(None)  # what the router uses by default


def _lib(tmp_path, base, names=("sort", "french", "sql")):
    lib = ExpertLibrary.create(tmp_path / "lib", base_model=base)
    for i, n in enumerate(names):
        d, ex = EXPERTS[n]
        lib.add(rand_expert(base, n, seed=i, description=d, examples=ex))
    return lib


def _model(tmp_path, router=None, names=("sort", "french", "sql"), **kw):
    base = tiny_chat_llama()
    lib = _lib(tmp_path, base, names)
    router = router or build_router("glider", local="none", **kw)
    return MoErgeModel.from_library(base, lib, router=router, tokenizer=tiny_tokenizer())


def _batch(model, prompts):
    tok = model.tokenizer
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]
    return tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def test_the_retriever_alone_keeps_its_index_in_step_with_the_experts(tmp_path, embedder):
    base = tiny_chat_llama()
    lib = _lib(tmp_path, base)
    retriever = ExpertRetriever(RetrievalConfig(embedder=embedder))
    retriever.attach(RouterContext(store=lib))
    for name in lib.names():
        retriever.add(lib.get(name))
    names, scores = retriever.retrieve(list(PROMPTS.values()), 2)
    assert [row[0] for row in names] == list(PROMPTS) and scores.shape == (3, 2)
    q = retriever.query_vectors([PROMPTS["sql"]])
    np.testing.assert_allclose(scores[2, 0], float(q[0] @ retriever.index.vectors("sql")[0]), atol=1e-5)
    retriever.persist(lib)
    assert lib.embedder == {"id": embedder.id, "dim": embedder.dim}
    # an expert without a description is retrieved by its name; fewer experts than k: rows padded with "" and -inf
    new = rand_expert(base, "translate_to_french", seed=7)
    for name in ("sql", "french"):
        lib.remove(name)
        retriever.remove(name)
    lib.add(new)
    retriever.add(new)
    names, scores = retriever.retrieve([PROMPTS["french"]], 3)
    assert names == [["translate_to_french", "sort", ""]] and scores[0, 2] == -np.inf
    retriever.persist(lib)
    from moerge.library.index import ExpertIndex

    assert sorted(ExpertIndex.load(lib.routing_dir / "index").names) == ["sort", "translate_to_french"]
    assert expert_texts("translate_to_french", " ", ["", "Say hi in French"]) == ["translate to french",
                                                                                   "Say hi in French"]


def test_the_retriever_names_its_router_when_it_cannot_describe(embedder):
    def query(**config):
        retriever = ExpertRetriever(RetrievalConfig(embedder=embedder, query="description", **config), owner="twin")
        return retriever.query_vectors(["Sort 3, 1, 2"])

    with pytest.raises(RoutingError, match="router 'twin' describes tasks with the base model.*tokenizer"):
        query()
    with pytest.raises(RoutingError, match="router 'twin': describer must be callable"):
        query(describer="not callable")
    with pytest.raises(ValueError, match="expert_vectors"):
        RetrievalConfig(expert_vectors="mean")


def test_default_router_is_glider(tmp_path):
    base = tiny_chat_llama()
    model = MoErgeModel.from_library(base, _lib(tmp_path, base), tokenizer=tiny_tokenizer())
    assert model.router.name == "glider" and model.router.config.local == "lda"


def test_retrieves_the_right_expert_from_the_prompt(tmp_path):
    model = _model(tmp_path, candidates=2)
    names, scores = model.router.retrieve(list(PROMPTS.values()))
    assert [n[0] for n in names] == list(PROMPTS)
    assert (scores[:, 0] >= scores[:, 1]).all()
    # through generate: per-row candidates from the chat-formatted prompt (the user turn is what is embedded)
    model.generate(**_batch(model, list(PROMPTS.values())), max_new_tokens=2, do_sample=False)
    for row, task in zip(model.last_routing, PROMPTS):
        assert row.candidates[0] == task and row.top() == task
        assert len(row.candidates) == 2 and sum(row.experts.values()) == pytest.approx(1.0)


def test_sequence_weights_are_the_softmax_of_scores(tmp_path):
    model = _model(tmp_path, candidates=3, temperature=0.1)
    state = model.route(**_batch(model, list(PROMPTS.values())))
    c = state.candidates
    assert c.ids.shape == (3, 3) and len({tuple(r) for r in c.ids.tolist()}) == 3  # rows differ
    ref = torch.softmax(c.scores / 0.1, dim=-1)
    assert torch.allclose(c.weights, ref, atol=1e-6)


def test_batch_rows_equal_rows_alone_and_deterministic(tmp_path):
    model = _model(tmp_path, router=build_router("glider", candidates=2, local_config={"train_steps": 2}))
    prompts = list(PROMPTS.values())
    full = model(**_batch(model, prompts)).logits
    again = model(**_batch(model, prompts)).logits
    assert torch.equal(full, again)
    for i, p in enumerate(prompts):
        alone = model(**_batch(model, [p])).logits
        n = alone.shape[1]
        assert torch.allclose(full[i, -n:], alone[0], atol=5e-5)  # summation order of the batched gate matmul


@pytest.mark.parametrize("local", ["lda", "phatgoose", "arrow"])
def test_local_logits_plus_global_log_prior_then_top_k(tmp_path, local):
    router = build_router("glider", local=local, candidates=3, top_k=2, global_temperature=0.3,
                          local_config={"train_steps": 2} if local == "phatgoose" else {})
    model = _model(tmp_path, router=router)
    layer = next(iter(model.expert_set.layers.values()))
    x = torch.randn(2, 4, layer.in_features)
    cands = Candidates(torch.tensor([[0, 2, 1], [1, -1, -1]]), torch.tensor([[0.9, 0.5, 0.1], [0.7, 0, 0]]),
                       tuple(model.experts))
    w = router.gate(x, cands, layer.info)
    prior = torch.stack([torch.log_softmax(cands.scores[0] / 0.3, -1),
                         torch.tensor([0.0, 0.0, 0.0])])  # row 1: one candidate, probability 1 (empty slots: 0)
    ref = select_weights(router.local.logits(x, cands, layer.info) + prior.unsqueeze(1), top_k=2)
    assert torch.allclose(w, ref)
    assert torch.allclose(w.sum(-1), torch.ones(2, 4), atol=1e-6)
    assert int((w > 0).sum(-1).max()) <= 2 and (w[1, :, 1:] == 0).all()  # empty slots get nothing
    if local == "lda":  # statistics over every token, the temperature calibrated within GLIDER for them
        from moerge.routers.glider import LOCAL_TEMPERATURE

        alone = build_router("lda").config
        assert (router.local.config.positions, alone.positions) == ("all", "answer")
        assert router.local.routing_kind == "lda-r8-all" != build_router("lda").routing_kind
        assert router.local.config.temperature == LOCAL_TEMPERATURE["lda"]["all"] != alone.temperature
        # the local config wins; a temperature it does not name follows the statistics it chose
        assert build_router("glider", local_config={"temperature": 9.0}).local.config.temperature == 9.0
        other = build_router("glider", local_config={"positions": "answer"}).local.config
        assert (other.positions, other.temperature) == ("answer", LOCAL_TEMPERATURE["lda"]["answer"])


def test_adding_an_expert_changes_nothing_for_rows_that_do_not_select_it(tmp_path):
    router = build_router("glider", candidates=2, local="arrow")
    model = _model(tmp_path, router=router)
    batch = _batch(model, list(PROMPTS.values()))
    before = model(**batch).logits
    d, ex = EXPERTS["haiku"]
    model.add_expert(rand_expert(tiny_chat_llama(), "haiku", seed=9, description=d, examples=ex))
    after = model(**batch).logits
    state = model.route(**batch)
    untouched = [b for b in range(3) if "haiku" not in state.candidates.row_names(b)]
    assert len(untouched) >= 2
    for b in untouched:
        assert torch.equal(before[b], after[b])
    poem = _batch(model, ["Compose a haiku about the moon."])
    model(**poem)
    assert model.last_routing[0].candidates[0] == "haiku"


def test_index_lives_in_the_library_and_is_updated_incrementally(tmp_path, embedder):
    texts_embedded = []

    def counting(texts):
        texts_embedded.extend(texts)
        return embedder.encode(texts)

    emb = CallableEmbedder(counting, id=embedder.id, dim=embedder.dim)
    model = _model(tmp_path, router=build_router("glider", local="none", embedder=emb))
    lib = model.library
    assert (lib.routing_dir / "index" / "index.json").is_file()
    assert ExpertLibrary.open(lib.root).embedder == {"id": embedder.id, "dim": embedder.dim}
    n_first = len(texts_embedded)
    assert n_first == 3 * 3  # description + 2 examples per expert

    # reopening: the stored index is used, nothing is embedded again
    texts_embedded.clear()
    again = MoErgeModel.from_library(tiny_chat_llama(), ExpertLibrary.open(lib.root),
                                     router=build_router("glider", local="none", embedder=emb),
                                     tokenizer=tiny_tokenizer())
    assert texts_embedded == [] and sorted(again.router.index.names) == ["french", "sort", "sql"]
    again.close()  # it would follow the library and embed the addition below too

    # adding embeds only the new expert; removing drops it from the stored index
    d, ex = EXPERTS["haiku"]
    model.add_expert(rand_expert(tiny_chat_llama(), "haiku", seed=5, description=d, examples=ex))
    assert texts_embedded == [d, *ex]
    from moerge.library.index import ExpertIndex

    assert "haiku" in ExpertIndex.load(lib.routing_dir / "index").names
    model.remove_expert("sort")
    stored = ExpertIndex.load(lib.routing_dir / "index")
    assert sorted(stored.names) == ["french", "haiku", "sql"]
    assert model.router.retrieve([PROMPTS["sort"]], 3)[0][0][0] != "sort"


def test_an_index_from_another_embedder_is_refused(tmp_path, embedder):
    model = _model(tmp_path)
    other = CallableEmbedder(lambda ts: np.random.default_rng(0).standard_normal((len(ts), 8)), id="other-emb",
                             dim=8)
    with pytest.raises(LibraryError, match="all-MiniLM-L6-v2.*384.*other-emb.*8.*rebuild_index"):
        MoErgeModel.from_library(tiny_chat_llama(), model.library,
                                 router=build_router("glider", local="none", embedder=other),
                                 tokenizer=tiny_tokenizer())
    assert ExpertLibrary.open(model.library.root).embedder["id"] == embedder.id  # nothing changed
    with pytest.warns(UserWarning, match="re-embedding every expert"):
        rebuilt = MoErgeModel.from_library(tiny_chat_llama(), model.library, tokenizer=tiny_tokenizer(),
                                           router=build_router("glider", local="none", embedder=other,
                                                               rebuild_index=True))
    assert rebuilt.router.index.dim == 8
    assert ExpertLibrary.open(model.library.root).embedder == {"id": "other-emb", "dim": 8}


def test_description_query_uses_the_describer(tmp_path):
    described = []

    def describer(prompts):
        described.extend(prompts)
        return ["Translate English text into French." for _ in prompts]

    model = _model(tmp_path, query="description", describer=describer)
    names, _ = model.router.retrieve([PROMPTS["sort"], PROMPTS["sql"]], 1)
    assert names == [["french"], ["french"]] and len(described) == 2
    model.router.retrieve([PROMPTS["sort"]], 1)
    assert len(described) == 2  # cached by prompt
    both = _model(tmp_path / "b", query="both", description_weight=0.2, describer=describer)
    assert both.router.retrieve([PROMPTS["sql"]], 1)[0] == [["sql"]]  # the prompt dominates at weight 0.8


def test_default_describer_is_the_base_model(tmp_path):
    model = _model(tmp_path, query="description", describe_tokens=4)
    names, _ = model.router.retrieve([PROMPTS["sort"]], 2)
    assert len(names[0]) == 2 and model.router.describer.calls == 1


def test_needs_prompts_as_text(tmp_path):
    base = tiny_chat_llama()
    model = MoErgeModel.from_library(base, _lib(tmp_path, base), router=build_router("glider", local="none"))
    with pytest.raises(RoutingError, match="tokenizer"):
        model.generate(input_ids=torch.ones(1, 3, dtype=torch.long), max_new_tokens=1)


@pytest.mark.parametrize("kw,match", [
    (dict(candidates=0), "candidates"), (dict(local="moe"), "local"), (dict(query="both!"), "query"),
    (dict(description_weight=2.0), "description_weight"), (dict(temperature=0), "temperature"),
])
def test_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        build_router("glider", **kw)


def test_an_unchanged_index_is_not_rewritten(tmp_path):
    model = _model(tmp_path)
    folder = model.library.routing_dir / "index"
    path = folder / json.loads((folder / "index.json").read_text())["files"]["faiss"]
    before = path.stat().st_mtime_ns
    again = MoErgeModel.from_library(tiny_chat_llama(), ExpertLibrary.open(model.library.root),
                                     router=build_router("glider", local="none"), tokenizer=tiny_tokenizer())
    assert again.router.index is not None and path.stat().st_mtime_ns == before


def test_expert_vectors_centroid_or_each(tmp_path, embedder):
    centroid = _model(tmp_path / "c")  # default: one vector per expert, the normalised mean of its texts
    d, ex = EXPERTS["sort"]
    texts = embedder.encode([d, *ex])
    mean = texts.mean(0)
    np.testing.assert_allclose(centroid.router.index.vectors("sort"), (mean / np.linalg.norm(mean))[None], atol=1e-5)
    each = _model(tmp_path / "e", expert_vectors="each")
    np.testing.assert_allclose(each.router.index.vectors("sort"), texts, atol=1e-5)
    # "each" scores an expert by its best-matching text: a query equal to one example scores 1
    assert each.router.retrieve([ex[1]], 1)[1][0, 0] == pytest.approx(1.0, abs=1e-4)
    assert centroid.router.retrieve([ex[1]], 1)[1][0, 0] < 0.99
    # switching the setting on an existing library re-embeds its experts (the stored vectors are of the other kind)
    again = MoErgeModel.from_library(tiny_chat_llama(), centroid.library, tokenizer=tiny_tokenizer(),
                                     router=build_router("glider", local="none", expert_vectors="each"))
    assert again.router.index.vectors("sort").shape == (3, embedder.dim)
    with pytest.raises(ValueError, match="expert_vectors"):
        build_router("glider", expert_vectors="mean")


def test_fast_int8_embedder_matches_float32_and_pads_correctly():
    fast, exact = default_sentence_embedder(quantize=True), default_sentence_embedder()
    assert fast.id == exact.id and fast.dim == exact.dim == 384 and fast.quantized
    assert isinstance(fast._fast[1], torch.jit.ScriptModule)  # traced, not the eager fallback
    texts = [p for p in PROMPTS.values()] + ["Sort", "A much longer prompt " * 20]
    a, b = fast.encode(texts), exact.encode(texts)
    cos = (a * b).sum(1)
    assert cos.min() > 0.9, cos
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    alone = np.concatenate([fast.encode([t]) for t in texts])
    np.testing.assert_allclose(a, alone, atol=1e-6)  # a vector never depends on the texts embedded with it
    assert fast.encode([]).shape == (0, 384)
    # retrieval agrees with the float32 embedder on the prompts above
    experts = [EXPERTS[n][0] for n in PROMPTS]
    assert ((a[:3] @ fast.encode(experts).T).argmax(1) == (b[:3] @ exact.encode(experts).T).argmax(1)).all()


@pytest.mark.parametrize("damage", ["truncate-faiss", "flip-vectors", "delete-vectors", "json-garbage"])
def test_a_damaged_index_is_rebuilt_by_re_embedding(tmp_path, damage):
    model = _model(tmp_path)
    folder = model.library.routing_dir / "index"
    files = json.loads((folder / "index.json").read_text())["files"]
    prompts = ["Sort these words: pear apple fig", "Translate to French: the cat"]
    before = model.router.retrieve(prompts)[0]
    if damage == "truncate-faiss":
        f = folder / files["faiss"]
        f.write_bytes(f.read_bytes()[:20])
    elif damage == "flip-vectors":
        f = folder / files["vectors"]
        data = bytearray(f.read_bytes())
        data[-1] ^= 1
        f.write_bytes(bytes(data))
    elif damage == "delete-vectors":
        (folder / files["vectors"]).unlink()
    else:
        (folder / "index.json").write_text("{not json")
    with pytest.warns(UserWarning, match="rebuilt"):
        again = MoErgeModel.from_library(tiny_chat_llama(), ExpertLibrary.open(model.library.root),
                                         router=build_router("glider", local="none"), tokenizer=tiny_tokenizer())
        assert again.router.retrieve(prompts)[0] == before  # never trusted: rebuilt, same answers


def test_the_local_gates_of_a_large_library_are_read_for_the_candidates_only(tmp_path, embedder, monkeypatch):
    """PHATGOOSE gates stored in the library are read when a request first has their expert among its GLIDER
    candidates, not when the model is built; the answers are those of a router that read every gate at once."""
    from moerge.library.routing_data import RoutingStore
    from moerge.routers.phatgoose import PhatgooseRouter

    def glider():
        return build_router("glider", candidates=2, embedder=embedder, local="phatgoose",
                            local_config={"train_steps": 2})

    first = _model(tmp_path, router=glider(), names=("sort", "french", "sql", "haiku"))  # trains, stores gates
    lib, tok = first.library, first.tokenizer
    first.close()
    assert all(lib.routing_kinds(n) == ["phatgoose"] for n in lib.names())
    read: list[str] = []
    locked: list[bool] = []  # whether the model's lock was held while a gate was read
    real = RoutingStore.get
    models: list = []

    def counting(self, name, kind):
        read.append(name)
        locked.extend(m.expert_set.lock._is_owned() for m in models)
        return real(self, name, kind)

    monkeypatch.setattr(RoutingStore, "get", counting)
    model = MoErgeModel.from_library(tiny_chat_llama(), ExpertLibrary.open(lib.root), router=glider(),
                                     tokenizer=tok, follow=False)
    assert read == []  # nothing read to build the model
    models.append(model)
    batch = _batch(model, [PROMPTS["sql"]])
    got = model(**batch).logits
    chosen = set(model.last_routing[0].candidates)
    assert len(chosen) == 2 and sorted(read) == sorted(chosen)  # the candidates' gates, each read once
    assert locked == [False, False]  # read before routing the call, other calls not held up
    model(**batch)
    assert len(read) == len(set(read))  # not read again
    monkeypatch.setattr(PhatgooseRouter, "lazy_data", False)
    eager = MoErgeModel.from_library(tiny_chat_llama(), ExpertLibrary.open(lib.root), router=glider(),
                                     tokenizer=tok, follow=False)
    assert set(read) == set(lib.names())  # the eager router reads every gate when it is built
    assert torch.equal(got, eager(**batch).logits)
    # a gate file gone: the requests that need it fail naming the expert; the others are served
    monkeypatch.setattr(PhatgooseRouter, "lazy_data", True)
    fresh = MoErgeModel.from_library(tiny_chat_llama(), ExpertLibrary.open(lib.root), router=glider(),
                                     tokenizer=tok, follow=False)
    for n in lib.names():
        (lib.root / "experts" / n / lib.info(n)["routing"]["phatgoose"]["file"]).unlink()
    with pytest.raises(LibraryError, match="routing data 'phatgoose'") as e:
        fresh(**batch)
    assert e.value.expert in chosen
    assert torch.equal(model(**batch).logits, got)  # a model that read them before is unaffected
    for m in (model, eager, fresh):
        m.close()


@pytest.mark.parametrize("local", ["none", "lda"])
def test_prompt_evidence_joins_the_global_stage(tmp_path, local):
    """With ``prompt_weight``, a row's candidates are its best experts by cosine + τ_g · w · log softmax(lda_prompt
    score / τ_p) over every expert, and that sum is their score (so the log-prior and the sequence weights take
    both); an expert added later gets the prompt's statistics too, stored in the library."""
    from moerge.routing import RoutingRequest

    router = build_router("glider", local=local, candidates=2, prompt_weight=0.7, global_temperature=0.3)
    model = _model(tmp_path, router=router)
    prompts = list(PROMPTS.values())
    batch = _batch(model, prompts)

    def check():
        names = tuple(model.experts)
        request = RoutingRequest(batch["input_ids"], batch["attention_mask"], names, prompts=prompts)
        cands = router.select(request)
        got, sims = router.retrieve(prompts, len(names))
        cos = torch.tensor([[float(dict(zip(g, s))[n]) for n in names] for g, s in zip(got, sims)],
                           dtype=torch.float64)
        lp = torch.log_softmax(router.prompt.prompt_scores(request).double() / router.prompt.config.temperature, -1)
        top = (cos + 0.3 * 0.7 * lp).topk(2, dim=-1)
        assert torch.equal(cands.ids, top.indices)
        assert torch.allclose(cands.scores.double(), top.values, atol=1e-5)
        prior = router.log_prior(cands).double()  # Bayes: the two calibrated log-probabilities, renormalised
        both = torch.log_softmax(cos / 0.3 + 0.7 * lp, -1).gather(1, top.indices)
        assert torch.allclose(prior, torch.log_softmax(both, -1), atol=1e-4)
        if local == "none":
            assert torch.allclose(cands.weights, torch.softmax(cands.scores / router.config.temperature, -1))
        return names

    assert check() == ("sort", "french", "sql")
    model.add_expert(rand_expert(tiny_chat_llama(), "haiku", seed=9, description=EXPERTS["haiku"][0],
                                 examples=EXPERTS["haiku"][1]))
    model.wait_routing()
    assert check() == ("sort", "french", "sql", "haiku")
    lib = ExpertLibrary.open(model.library.root)
    assert lib.routing_for("haiku", "lda-r8-base-all", lib["haiku"].digest()) is not None
    with pytest.raises(ValueError, match="prompt_weight"):
        build_router("glider", prompt_weight=-1)


def test_prompt_evidence_is_neutral_for_an_expert_without_statistics(tmp_path):
    """An expert whose prompt statistics are not in yet (being computed) scores as the average expert in the
    prompt's term: retrieval alone decides for it, as GLIDER retrieves an expert at once."""
    from moerge.routing import RoutingRequest

    router = build_router("glider", local="none", candidates=3, prompt_weight=1.0)
    model = _model(tmp_path, router=router)
    prompts = list(PROMPTS.values())
    batch = _batch(model, prompts)
    names = tuple(model.experts)
    request = RoutingRequest(batch["input_ids"], batch["attention_mask"], names, prompts=prompts)
    router.prompt.on_remove_expert("sql")  # its statistics gone, the expert still there
    partial = router.prompt.prompt_scores(request).double()
    assert torch.isinf(partial[:, 2]).all() and torch.isfinite(partial[:, :2]).all()
    cands = router.select(request)
    got, sims = router.retrieve(prompts, len(names))
    cos = torch.tensor([[float(dict(zip(g, s))[n]) for n in names] for g, s in zip(got, sims)], dtype=torch.float64)
    partial[:, 2] = partial[:, :2].mean(-1)  # sql scores as the average of the others
    lp = torch.log_softmax(partial / router.prompt.config.temperature, -1)
    top = (cos + router.config.global_temperature * lp).topk(3, dim=-1)
    assert torch.equal(cands.ids, top.indices)
    assert torch.allclose(cands.scores.double(), top.values, atol=1e-5)
    assert (cands.ids == 2).any(-1).all()  # sql is still a candidate of every row
