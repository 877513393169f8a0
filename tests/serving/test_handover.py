"""The ranking moerge on Ray Serve's ingress hands to a model replica (:data:`moerge.routing.retrieval.GIVEN`)
travels only as an argument of the replica's handle: the single-process server, over HTTP, has no way to set it
(the request field is refused, headers are not read), and its answers stay those of its own global stage."""

from __future__ import annotations

import json

import httpx
import pytest

from moerge import ExpertLibrary, MoErgeModel
from moerge.routers import build_router
from moerge.routing.retrieval import GIVEN
from moerge.serving import ServerConfig, create_app

from helpers import HANG_GUARD, live, rand_expert, tiny_chat_llama, tiny_tokenizer

pytest.importorskip("uvicorn")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("handover")
    base = tiny_chat_llama()
    lib = ExpertLibrary.create(tmp / "lib", base_model=base)
    lib.add(rand_expert(base, "sort", seed=1, description="sort a list of letters alphabetically",
                        examples=["sort: c b a"]))
    lib.add(rand_expert(base, "french", seed=2, description="translate english text to french",
                        examples=["translate: good morning"]))
    model = MoErgeModel.from_library(base, lib, router=build_router("glider", local="none"), tokenizer=tiny_tokenizer())
    GIVEN.clear()
    with live(create_app(model, model.tokenizer, ServerConfig(batch_window=0.0))) as url, \
            httpx.Client(base_url=url, timeout=HANG_GUARD) as http:
        yield http, model
    GIVEN.clear()
    model.close()


def test_the_single_process_server_takes_no_ranking_from_a_client(server):
    http, model = server
    body = {"model": "moerge", "messages": [{"role": "user", "content": "sort: z y x"}], "max_tokens": 2,
            "temperature": 0, "moerge": {"trace": True}}
    own = http.post("/v1/chat/completions", json=body).json()
    assert own["moerge"]["routing"][0]["candidates"]["sort"] > own["moerge"]["routing"][0]["candidates"]["french"]
    bogus = {"fingerprint": model.router.retriever.fingerprint(), "prompt": "sort: z y x", "names": ["french"],
             "scores": [1.0]}  # even with the right fingerprint
    for field in ("given", "candidates", "global_stage"):
        r = http.post("/v1/chat/completions", json={**body, "moerge": {"trace": True, field: bogus}})
        assert r.status_code == 400 and field in r.json()["error"]["message"], r.text
    r = http.post("/v1/chat/completions", json={**body, field: bogus})
    assert r.status_code == 400
    r = http.post("/v1/chat/completions", json=body, headers={"x-moerge-given": json.dumps(bogus),
                                                                "x-moerge-global-stage": "ingress"})
    assert r.status_code == 200 and "x-moerge-global-stage" not in r.headers
    assert r.json()["moerge"]["routing"] == own["moerge"]["routing"] and r.json()["choices"] == own["choices"]
    assert len(GIVEN) == 0 and GIVEN.taken == 0
