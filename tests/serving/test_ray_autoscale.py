"""moerge on Ray Serve with autoscaled model replicas (`moerge serve --ray --autoscale MIN,MAX`), on a local Ray
cluster this module starts on 127.0.0.1 (2 CPUs): under a steady load of concurrent requests Serve adds a second
replica, the answers stay the single-process server's, and once the load stops it goes back to one. (Which replica
answers is Serve's multiplexing: a routing key stays on the replica that holds its experts, so with two experts
the first replica may keep both keys; that placement is tested in test_ray.py.)"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("ray")
pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

from helpers import ray_library, ray_serving  # noqa: E402

pytestmark = pytest.mark.slow

DEADLINE = 240.0  # a hang guard, not a speed target: how long Serve may take to scale on a loaded 2-CPU machine
PROMPTS = ["sort: z y x", "translate: thank you", "sort: b c a", "say goodbye in french"]


def _running():
    from ray import serve

    state = serve.status().applications["moerge"].deployments["moerge-model"]
    return state.replica_states.get("RUNNING", 0)


def test_autoscaling_adds_a_replica_under_load_and_drops_it_after(tmp_path):
    from starlette.testclient import TestClient

    from moerge.serving.app import create_app
    from moerge.serving.ray_app import RayConfig

    _, _, build = ray_library(tmp_path)
    config = RayConfig(replica_cpus=0.5, autoscaling={
        "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1, "upscale_delay_s": 0,
        "downscale_delay_s": 2, "look_back_period_s": 2})
    bodies = [{"model": "moerge", "messages": [{"role": "user", "content": p}], "max_tokens": 24,
               "temperature": 0} for p in PROMPTS]
    with ray_serving(build, str(tmp_path / "lib"), config=config) as url:
        local = build()  # after Serve took its copy: the router the partial holds is this process's from now on
        with TestClient(create_app(local, local.tokenizer)) as reference:
            expected = [reference.post("/v1/chat/completions", json=b).json()["choices"][0]["message"]
                        for b in bodies]
        assert _running() == 1
        stop, seen, wrong = threading.Event(), [], []

        def load(i):
            with httpx.Client(timeout=DEADLINE) as client:
                while not stop.is_set():
                    r = client.post(f"{url}/v1/chat/completions", json=bodies[i % len(bodies)])
                    if r.status_code != 200 or r.json()["choices"][0]["message"] != expected[i % len(bodies)]:
                        wrong.append(r.text)
                    seen.append(r.headers.get("x-moerge-replica"))

        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(load, i) for i in range(6)]
            deadline = time.monotonic() + DEADLINE
            try:
                while _running() < 2:  # six callers, one ongoing request wanted per replica: Serve adds one
                    assert time.monotonic() < deadline, "no second replica under load"
                    assert not wrong, wrong[:1]
                    time.sleep(0.5)
                count = len(seen)
                while len(seen) < count + 12:  # the load goes on with two replicas up
                    assert time.monotonic() < deadline, "requests stopped being answered"
                    time.sleep(0.5)
            finally:
                stop.set()
                for f in futures:
                    f.result()
        assert not wrong, wrong[:1]  # every answer under scaling was the single-process server's
        deadline = time.monotonic() + DEADLINE
        while _running() > 1:  # the load gone: back to the minimum
            assert time.monotonic() < deadline, "the second replica was never dropped"
            time.sleep(0.5)
        r = httpx.post(f"{url}/v1/chat/completions", json=bodies[0], timeout=DEADLINE)
        assert r.status_code == 200 and r.json()["choices"][0]["message"] == expected[0]
