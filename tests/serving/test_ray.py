"""moerge on Ray Serve, on a local Ray cluster this module starts on 127.0.0.1 (2 CPUs): an ingress and 2 model
replicas of a tiny chat model over a library of two experts, called over HTTP as a client would. The failure cases
come last (a replica killed, a client leaving mid-stream, the library becoming unreadable, every replica dead): they
share the cluster, so each leaves it serving again."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import threading
import time

import pytest

pytest.importorskip("ray")
pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

from helpers import rand_expert, ray_library, ray_serving  # noqa: E402

pytestmark = pytest.mark.slow

SORT = ["sort: z y x", "sort: b c a", "put q w e in order"]
FRENCH = ["translate: thank you", "say goodbye in french", "translate: good night"]
DEADLINE = 180.0  # seconds a replica may take to follow the library (it polls the manifest several times a second)


def _body(prompt, **kw):
    return {"model": "moerge", "messages": [{"role": "user", "content": prompt}], "max_tokens": 4,
            "temperature": 0, **kw}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ray")
    base, lib, build = ray_library(tmp)
    with ray_serving(build, str(tmp / "lib")) as url:
        yield {"url": url, "lib": lib, "base": base, "local": build()}


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
        assert got.headers["x-moerge-global-stage"] == "ingress"  # the replica took the ingress's ranking
    completion = {"model": "moerge", "prompt": "sort: c a b", "max_tokens": 3, "temperature": 0}
    got = httpx.post(f"{url}/v1/completions", json=completion, timeout=120).json()
    assert got["choices"][0]["text"] == reference.post("/v1/completions", json=completion).json()["choices"][0]["text"]
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=_body(SORT[2], stream=True), timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and len(events) >= 3
    with reference.stream("POST", "/v1/chat/completions", json=_body(SORT[2], stream=True)) as r:
        want = [line for line in r.iter_lines() if line.startswith("data: ")]
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


def _answer(r, reference, body):
    """``r`` is a 200 whose answer equals the single-process server's for ``body``."""
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"] == \
        reference.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]


def _replica_actors():
    import ray

    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "moerge-model" in a["name"])


def _settled():
    """The model replicas once Serve runs both (a replica killed by an earlier test is restarted meanwhile)."""
    from ray import serve
    from ray.serve.schema import DeploymentStatus

    deadline = time.monotonic() + DEADLINE
    while True:
        state = serve.status().applications["moerge"].deployments["moerge-model"]
        actors = _replica_actors()
        if state.status == DeploymentStatus.HEALTHY and state.replica_states.get("RUNNING") == 2 \
                and len(actors) == 2:
            return actors
        assert time.monotonic() < deadline, (state, actors)
        time.sleep(0.5)


def _kill_every_replica():
    import ray

    actors = [a for a in ray.util.list_named_actors(all_namespaces=True) if "moerge-model" in a["name"]]
    for a in actors:
        ray.kill(ray.get_actor(a["name"], namespace=a["namespace"]), no_restart=True)
    return sorted(a["name"] for a in actors)


def _until_answered(url, reference, body, what):
    """Poll (up to ``DEADLINE``) until a request is answered 200 with the single-process server's answer; what the
    ingress answered meanwhile must be that or a 503 with a JSON error naming the cause."""
    deadline = time.monotonic() + DEADLINE
    while True:
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=DEADLINE)
        if r.status_code == 200:
            _answer(r, reference, body)
            return r
        assert r.status_code == 503 and "model replica" in r.json()["error"]["message"], r.text
        assert time.monotonic() < deadline, f"{what}: not served again within {DEADLINE} s: {r.text}"
        time.sleep(0.5)


def test_the_ranking_travels_only_from_the_ingress(cluster, reference):
    """A client cannot hand rankings over: the request body's field is refused (as by the single-process server),
    a header of that name is neither forwarded nor taken, and the answer stays the routed one."""
    url = cluster["url"]
    bogus = {"fingerprint": "x", "prompt": SORT[0], "names": ["french"], "scores": [1.0]}
    r = httpx.post(f"{url}/v1/chat/completions", json=_body(SORT[0], moerge={"given": bogus}), timeout=120)
    assert r.status_code == 400 and "given" in r.text
    body = _body(SORT[0], moerge={"trace": True})
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120,
                   headers={"x-moerge-global-stage": "ingress", "x-moerge-given": json.dumps(bogus)})
    _answer(r, reference, body)
    assert r.json()["moerge"]["routing"] == reference.post("/v1/chat/completions", json=body).json()["moerge"]["routing"]


def test_a_client_leaving_mid_stream_harms_nothing(cluster, reference):
    """A client closes its connection after a stream's first event: the ingress and the replica go on serving,
    and the next requests (streamed or not) are answered as the single-process server answers them."""
    url = cluster["url"]
    before = _settled()
    for _ in range(3):
        with httpx.Client(timeout=120) as client:
            with client.stream("POST", f"{url}/v1/chat/completions",
                               json=_body(SORT[0], stream=True, max_tokens=64)) as r:
                assert r.status_code == 200
                first = next(line for line in r.iter_lines() if line.startswith("data: "))
                assert "chat.completion.chunk" in first
        # leaving the with-blocks closed the connection before the stream ended
    for prompt in SORT + FRENCH:
        _answer(httpx.post(f"{url}/v1/chat/completions", json=_body(prompt), timeout=120), reference,
                _body(prompt))
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=_body(SORT[1], stream=True), timeout=120) as r:
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and not any('"error"' in e for e in events), events
    assert _replica_actors() == before  # no replica died or was restarted


def _unreadable_library(cluster, reference, spoil):
    """``spoil(folder)`` makes the library unreadable (and returns how to undo it): requests are answered, or
    refused with an error that names the library; the ingress goes on answering; once the library is back,
    requests are answered as before, by the same replicas."""
    url, root = cluster["url"], str(cluster["lib"].root)
    before = _settled()
    undo = spoil(root)
    try:
        for prompt in SORT[:2] + FRENCH[:2]:
            body = _body(prompt)
            r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
            if r.status_code == 200:
                _answer(r, reference, body)
            else:
                error = r.json()["error"]["message"]
                assert r.status_code in (400, 500, 503) and "library" in error and root in error, r.text
        r = httpx.get(f"{url}/v1/models", timeout=120)
        assert r.status_code == 200 and r.json()["data"][0]["id"] == "moerge"
    finally:
        undo()
    for prompt in SORT[:2] + FRENCH[:2]:
        _until_answered(url, reference, _body(prompt), "the library restored")
    assert _replica_actors() == before


def test_a_library_folder_moved_away_falls_back_and_names_the_library(cluster, reference):
    def spoil(root):
        os.rename(root, root + ".away")
        return lambda: os.rename(root + ".away", root)

    _unreadable_library(cluster, reference, spoil)


def test_a_library_manifest_replaced_by_garbage_falls_back_and_names_the_library(cluster, reference):
    def spoil(root):
        manifest = os.path.join(root, "library.json")
        shutil.copy(manifest, manifest + ".saved")
        with open(manifest, "w") as f:
            f.write("{ not json")
        return lambda: os.replace(manifest + ".saved", manifest)

    _unreadable_library(cluster, reference, spoil)


def test_every_replica_dead_at_once(cluster, reference):
    """Every model replica killed at once: the requests sent meanwhile wait for Serve to start new replicas and are
    all answered; while no replica can start (the library gone), the ingress answers 503 with a JSON error naming
    the cause once ``replica_wait_s`` has passed; once replicas start again, requests are answered again."""
    from ray import serve

    from moerge.serving.ray_app import Ingress, RayConfig

    url, root = cluster["url"], str(cluster["lib"].root)
    _settled()
    killed = _kill_every_replica()
    assert len(killed) == 2
    bodies = [_body(p) for p in SORT + FRENCH]
    answers: dict[int, httpx.Response] = {}

    def send(i):
        answers[i] = httpx.post(f"{url}/v1/chat/completions", json=bodies[i], timeout=DEADLINE)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, body in enumerate(bodies):  # none lost: held until Serve restarted the replicas
        _answer(answers[i], reference, body)
    restarted = _settled()
    assert not set(restarted) & set(killed)

    # no replica can start while the library is gone: the ingress's wait for one ends in a 503 naming the cause
    # (an ingress built here with a short wait, over the running deployment's handle; the HTTP one waits 120 s)
    os.rename(root, root + ".away")
    try:
        killed = _kill_every_replica()
        ingress = Ingress(serve.get_deployment_handle("moerge-model", app_name="moerge"), root + ".away",
                          RayConfig(replica_wait_s=5))
        response = asyncio.run(_call(ingress, bodies[0]))
        assert response.status_code == 503
        error = json.loads(response.body)["error"]
        assert error["code"] == 503 and "no model replica took the request within 5 s" in error["message"]
    finally:
        os.rename(root + ".away", root)
    r = _until_answered(url, reference, bodies[1], "every replica killed with the library away")
    assert r.headers["x-moerge-replica"]
    assert not set(_settled()) & set(killed)
    assert httpx.get(f"{url}/v1/models", timeout=120).status_code == 200


async def _call(ingress, body):
    """``ingress`` called as Serve calls it, with a Starlette request of ``body`` to /v1/chat/completions."""
    from starlette.requests import Request

    raw = json.dumps(body).encode()
    sent = False

    async def receive():
        nonlocal sent
        if sent:
            await asyncio.Event().wait()
        sent = True
        return {"type": "http.request", "body": raw, "more_body": False}

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "query_string": b"",
             "headers": [(b"content-type", b"application/json")], "scheme": "http", "server": ("test", 80),
             "client": ("127.0.0.1", 0), "root_path": "", "http_version": "1.1"}
    return await ingress(Request(scope, receive))
