"""moerge on Ray Serve, on a local Ray cluster this module starts on 127.0.0.1 (2 CPUs): an ingress and 2 model
replicas of a tiny chat model over a library of two experts, called over HTTP as a client would."""

from __future__ import annotations

import functools
import time

import pytest

pytest.importorskip("ray")
pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

from helpers import rand_expert, ray_serving, tiny_chat_llama, tiny_tokenizer  # noqa: E402

pytestmark = pytest.mark.slow

SORT = ["sort: z y x", "sort: b c a", "put q w e in order"]
FRENCH = ["translate: thank you", "say goodbye in french", "translate: good night"]
DEADLINE = 180.0  # seconds a replica may take to follow the library (it polls the manifest several times a second)


def _body(prompt, **kw):
    return {"model": "moerge", "messages": [{"role": "user", "content": prompt}], "max_tokens": 4,
            "temperature": 0, **kw}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from moerge import ExpertLibrary, MoErgeModel
    from moerge.routers import build_router

    tmp = tmp_path_factory.mktemp("ray")
    base, tok = tiny_chat_llama(), tiny_tokenizer()
    base.save_pretrained(tmp / "base")
    lib = ExpertLibrary.create(tmp / "lib", base_model=base)
    lib.add(rand_expert(base, "sort", seed=1, description="sort a list of letters alphabetically",
                        examples=["sort: c b a", "put d a c in order"]))
    lib.add(rand_expert(base, "french", seed=2, description="translate english text to french",
                        examples=["translate: good morning", "say hello in french"]))
    build = functools.partial(MoErgeModel.from_library, str(tmp / "base"), str(tmp / "lib"),
                              router=build_router("glider", local="none"), tokenizer=tok)
    with ray_serving(build, str(tmp / "lib")) as url:
        local = MoErgeModel.from_library(str(tmp / "base"), str(tmp / "lib"),
                                         router=build_router("glider", local="none"), tokenizer=tok)
        yield {"url": url, "lib": lib, "base": base, "local": local}


@pytest.fixture(scope="module")
def reference(cluster):
    """The single-process server over the same base and library (its app in-process)."""
    from starlette.testclient import TestClient

    from moerge.serving.app import create_app

    with TestClient(create_app(cluster["local"], cluster["local"].tokenizer)) as client:
        yield client


def test_answers_equal_the_single_process_server(cluster, reference):
    url = cluster["url"]
    for prompt in SORT[:2] + FRENCH[:2]:
        body = _body(prompt, moerge={"trace": True})
        got = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
        want = reference.post("/v1/chat/completions", json=body).json()
        assert got.status_code == 200, got.text
        data = got.json()
        assert data["choices"][0]["message"] == want["choices"][0]["message"]
        assert data["moerge"]["replica"] == got.headers["x-moerge-replica"]
        assert data["moerge"]["routing"] == want["moerge"]["routing"]  # the same routing trace
    completion = {"model": "moerge", "prompt": "sort: c a b", "max_tokens": 3, "temperature": 0}
    got = httpx.post(f"{url}/v1/completions", json=completion, timeout=120).json()
    assert got["choices"][0]["text"] == reference.post("/v1/completions", json=completion).json()["choices"][0]["text"]
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=_body(SORT[2], stream=True), timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and len(events) >= 3
    with reference.stream("POST", "/v1/chat/completions", json=_body(SORT[2], stream=True)) as r:
        want = [line for line in r.iter_lines() if line.startswith("data: ")]
    import json

    text = lambda evs: "".join(json.loads(e[6:])["choices"][0]["delta"].get("content") or ""  # noqa: E731
                               for e in evs[:-1])
    assert text(events) == text(want)


def test_bad_input_is_answered_by_the_replica_with_a_clear_error(cluster):
    url = cluster["url"]
    r = httpx.post(f"{url}/v1/chat/completions", content=b"{bad", headers={"content-type": "application/json"},
                   timeout=120)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/chat/completions", json=_body("sort: a", max_tokens=-3), timeout=120)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = httpx.post(f"{url}/v1/chat/completions", json=_body("x", moerge={"experts": {"nope": 1.0}}), timeout=120)
    assert r.status_code == 400 and "nope" in r.json()["error"]["message"]


def test_requests_for_the_same_experts_stay_on_a_warm_replica(cluster):
    """After each routing key's first request, its requests land on a replica that holds its experts (Serve's
    multiplexing, keyed by the retrieved expert); the two experts' traffic is spread over both replicas."""
    url = cluster["url"]
    seen: dict[str, list[str]] = {"sort": [], "french": []}
    for i in range(24):
        key, prompts = ("sort", SORT) if i % 2 == 0 else ("french", FRENCH)
        r = httpx.post(f"{url}/v1/chat/completions", json=_body(prompts[i // 2 % 3], max_tokens=2), timeout=120)
        assert r.status_code == 200, r.text
        seen[key].append(r.headers["x-moerge-replica"])
    # a replica reports the keys it holds asynchronously, so a key's first requests may land elsewhere
    warm = sum(r == replicas[-1] for replicas in seen.values() for r in replicas[2:])
    assert warm / sum(len(v) - 2 for v in seen.values()) >= 0.95, seen
    assert seen["sort"][-1] != seen["french"][-1], seen


def test_an_expert_added_to_the_library_is_served_by_every_replica(cluster):
    """Another process (here the test) adds an expert to the library folder: the ingress retrieves it and every
    replica follows the library and serves it."""
    url = cluster["url"]
    cluster["lib"].add(rand_expert(cluster["base"], "shout", seed=3, description="write text in capital letters",
                                   examples=["shout: hello", "make abc uppercase"]))
    knows: dict[str, bool] = {}
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline and (len(knows) < 2 or not all(knows.values())):
        r = httpx.get(f"{url}/v1/experts", timeout=120)
        names = {e["name"] for e in r.json()["data"]}
        knows[r.headers["x-moerge-replica"]] = "shout" in names
    assert len(knows) == 2 and all(knows.values()), knows
    r = httpx.post(f"{url}/v1/chat/completions", json=_body("shout: good morning", moerge={"trace": True}),
                   timeout=120)
    assert r.status_code == 200 and r.json()["moerge"]["routing"][0]["experts"].get("shout", 0) > 0, r.text


def test_a_replica_killed_mid_run_loses_no_request(cluster, reference):
    """A model replica is killed (kill -9 of its actor): the requests that follow are retried on the other one
    and all answered, equal to the single-process server's answers."""
    import ray

    actors = [a for a in ray.util.list_named_actors(all_namespaces=True) if "moerge-model" in a["name"]]
    assert len(actors) == 2
    ray.kill(ray.get_actor(actors[0]["name"], namespace=actors[0]["namespace"]), no_restart=True)
    for prompt in SORT + FRENCH:
        body = _body(prompt)
        r = httpx.post(f"{cluster['url']}/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        want = reference.post("/v1/chat/completions", json=body).json()
        assert r.json()["choices"][0]["message"] == want["choices"][0]["message"]
