"""moerge on Ray Serve over a library on S3 (a real S3 API on 127.0.0.1, moto's server): the ingress and both
replicas open it by URL, and an expert another process adds to the bucket is routed to through the ingress."""

from __future__ import annotations

import functools
import os
import time
import uuid

import pytest

pytest.importorskip("ray")
pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")
boto3 = pytest.importorskip("boto3")

from helpers import rand_expert, ray_serving, tiny_chat_llama, tiny_tokenizer  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def s3_cluster(tmp_path_factory, s3_endpoint):
    from moerge import ExpertLibrary, MoErgeModel
    from moerge.routers import build_router

    tmp = tmp_path_factory.mktemp("ray-s3")
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": s3_endpoint, "MOERGE_CACHE": str(tmp / "cache")}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # before Ray starts: its workers inherit the S3 settings
    try:
        bucket = f"b{uuid.uuid4().hex[:12]}"
        boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1", aws_access_key_id="testing",
                     aws_secret_access_key="testing").create_bucket(Bucket=bucket)
        url = f"s3://{bucket}/lib"
        base, tok = tiny_chat_llama(), tiny_tokenizer()
        base.save_pretrained(tmp / "base")
        lib = ExpertLibrary.create(url, base_model=base)
        lib.add(rand_expert(base, "sort", seed=1, description="sort a list of letters alphabetically",
                            examples=["sort: c b a"]))
        build = functools.partial(MoErgeModel.from_library, str(tmp / "base"), url,
                                  router=build_router("glider", local="none"), tokenizer=tok)
        with ray_serving(build, url) as http:
            yield {"url": http, "lib": lib, "base": base}
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_a_library_on_s3_is_served_and_followed(s3_cluster):
    url = s3_cluster["url"]
    body = {"model": "moerge", "messages": [{"role": "user", "content": "sort: z y x"}], "max_tokens": 3,
            "temperature": 0, "moerge": {"trace": True}}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200 and r.headers["x-moerge-route"] == "sort", r.text
    s3_cluster["lib"].add(rand_expert(s3_cluster["base"], "shout", seed=3, description="write text in capital "
                                      "letters", examples=["shout: hello", "make abc uppercase"]))
    body["messages"][0]["content"] = "shout: good morning"
    deadline = time.monotonic() + 180  # the replicas poll the bucket's manifest
    while True:
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        if r.headers["x-moerge-route"] == "shout" and r.json()["moerge"]["routing"][0]["experts"].get("shout"):
            break
        assert time.monotonic() < deadline, r.json()["moerge"]
        time.sleep(0.5)
