"""Rankings retrieved by another process (moerge on Ray Serve's ingress) handed to this process's retrievers
(:data:`moerge.routing.retrieval.GIVEN`): taken instead of embedding and searching, only for the same prompt text,
the same experts and embedder (the fingerprint), and deep enough; results equal the retriever's own search."""

from __future__ import annotations

import numpy as np
import pytest

from moerge import ExpertLibrary, MoErgeModel
from moerge.routers import build_router
from moerge.routing.embed import CallableEmbedder, as_embedder
from moerge.routing.retrieval import GIVEN, ExpertRetriever, RetrievalConfig

from helpers import rand_expert, tiny_chat_llama, tiny_tokenizer

EXPERTS = {
    "sort": ("Sort a list of numbers in ascending order.", ["Sort these numbers: 4, 1, 3"]),
    "french": ("Translate English text into French.", ["Translate to French: good night"]),
    "sql": ("Write an SQL query that answers a question about a database table.", ["Write SQL to list customers"]),
}
SORT, FRENCH = "Arrange 12, 5, 8 and 1 from smallest to largest.", "Please put 'the weather is nice' into French."


@pytest.fixture(scope="module")
def embedder():
    return as_embedder(None)  # the default embedder, as the ingress and the routers use it


@pytest.fixture(autouse=True)
def _empty_given():
    GIVEN.clear()
    yield
    GIVEN.clear()


class Counting:
    """The real embedder, counting the texts it embeds."""

    def __init__(self, embedder):
        self.texts: list[str] = []
        self.embedder = CallableEmbedder(self._encode, id=embedder.id, dim=embedder.dim)
        self._real = embedder

    def _encode(self, texts):
        self.texts.extend(texts)
        return self._real.encode(texts)


def _retriever(embedder, names=("sort", "french", "sql"), **config):
    base = tiny_chat_llama()
    r = ExpertRetriever(RetrievalConfig(embedder=embedder, **config))
    for i, n in enumerate(names):
        d, ex = EXPERTS[n]
        r.add(rand_expert(base, n, seed=i, description=d, examples=ex))
    return r


def test_a_given_ranking_is_returned_without_embedding(embedder):
    ingress = _retriever(embedder)
    names, scores, fingerprint = ingress.ranking(SORT, 8)
    assert len(names) == 3 and names[0] == "sort" and fingerprint
    want_names, want_scores = ingress.retrieve([SORT], 2)

    counting = Counting(embedder)
    replica = _retriever(counting.embedder)
    assert replica.fingerprint() == fingerprint  # same experts' texts, same embedder
    counting.texts.clear()
    entry = GIVEN.give(fingerprint, SORT, names, scores)
    got_names, got_scores = replica.retrieve([SORT], 2)
    assert counting.texts == [] and entry["taken"] == 1  # neither embedded nor searched
    assert got_names == want_names and np.array_equal(got_scores, want_scores)
    assert got_scores.dtype == np.float32 and got_scores.shape == (1, 2)

    # a batch: the given prompt is taken, the other one alone embedded; rows as the retriever's own search
    got_names, got_scores = replica.retrieve([FRENCH, SORT], 3)
    assert counting.texts == [FRENCH]
    want_names, want_scores = ingress.retrieve([FRENCH, SORT], 3)
    assert got_names == want_names and np.array_equal(got_scores, want_scores)


def test_a_ranking_is_taken_only_for_the_same_text_experts_and_embedder_and_deep_enough(embedder):
    ingress = _retriever(embedder)
    names, scores, fingerprint = ingress.ranking(SORT, 8)
    counting = Counting(embedder)
    replica = _retriever(counting.embedder)
    replica.fingerprint()
    counting.texts.clear()
    GIVEN.give(fingerprint, SORT, names, scores)

    replica.retrieve([SORT + " "], 2)  # another text
    assert counting.texts == [SORT + " "]
    replica.retrieve([SORT], 5)  # deeper than 3 experts: the whole ranking, padded
    assert counting.texts == [SORT + " "]
    got_names, got_scores = replica.retrieve([SORT], 5)
    assert got_names[0][3:] == ["", ""] and np.isneginf(got_scores[0, 3:]).all()

    GIVEN.clear()
    GIVEN.give(fingerprint, SORT, names[:1], scores[:1])  # one expert deep: enough for k=1 only
    replica.retrieve([SORT], 1)
    assert counting.texts == [SORT + " "]
    replica.retrieve([SORT], 2)
    assert counting.texts == [SORT + " ", SORT]

    # another expert set (an expert the ingress does not know yet), or another way of making the vectors: no match
    fewer = _retriever(embedder, names=("sort", "french"))
    assert fewer.fingerprint() != fingerprint
    each = _retriever(embedder, expert_vectors="each")
    assert each.fingerprint() != fingerprint
    described = _retriever(embedder, query="description", describer=lambda ps: ps)
    assert described.fingerprint() is None  # its queries are not the prompt alone

    # the fingerprint follows the experts
    replica.remove("sql")
    assert replica.fingerprint() == fewer.fingerprint()
    d, ex = EXPERTS["sql"]
    replica.add(rand_expert(tiny_chat_llama(), "sql", seed=2, description=d, examples=ex))
    assert replica.fingerprint() == fingerprint


def test_glider_in_a_model_routes_with_a_given_ranking_as_with_its_own(tmp_path, embedder):
    """GLIDER's global stage, unchanged, takes the handed ranking for the prompt text it reads (the last user
    message): the routing equals the routing it finds itself, and the prompt is not embedded."""
    base = tiny_chat_llama()
    lib = ExpertLibrary.create(tmp_path / "lib", base_model=base)
    for i, (n, (d, ex)) in enumerate(EXPERTS.items()):
        lib.add(rand_expert(base, n, seed=i, description=d, examples=ex))
    counting = Counting(embedder)
    model = MoErgeModel.from_library(base, lib, router=build_router("glider", local="none", embedder=counting.embedder),
                                     tokenizer=tiny_tokenizer())
    tok = model.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": FRENCH}], tokenize=False, add_generation_prompt=True)
    batch = tok([text], return_tensors="pt", add_special_tokens=False)
    model.generate(**batch, max_new_tokens=1, do_sample=False)
    own = [r.to_json() for r in model.last_routing]
    assert counting.texts[-1] == FRENCH

    ingress = _retriever(embedder)
    names, scores, fingerprint = ingress.ranking(FRENCH, 8)
    assert fingerprint == model.router.retriever.fingerprint()
    GIVEN.give(fingerprint, FRENCH, names, scores)
    counting.texts.clear()
    model.generate(**batch, max_new_tokens=1, do_sample=False)
    assert counting.texts == [] and [r.to_json() for r in model.last_routing] == own
    model.close()


def test_a_given_ranking_must_be_well_formed():
    with pytest.raises(ValueError):
        GIVEN.give("f", "p", ["a", "b"], [1.0])
    with pytest.raises(ValueError):
        GIVEN.give("f", "p", ["a", ""], [1.0, 0.5])
    assert len(GIVEN) == 0
