"""The suite's environment (offline, Triton's interpreter without a GPU, two threads) and shared fixtures; the helpers
they use are in tests/helpers.py."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("CUDA_VISIBLE_DEVICES") == "" or not os.path.exists("/dev/nvidiactl"):
    # no GPU: Triton kernels run under its interpreter, which must be chosen before triton is imported (only the
    # kernel tests send CPU tensors to the kernel: moerge.runtime.kernels.CPU)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))

from helpers import VOCAB, s3_server, tiny_llama, tiny_tokenizer  # noqa: E402


@pytest.fixture
def interpreted(monkeypatch):
    """moerge.runtime.kernels with the kernel run on CPU tensors, under Triton's interpreter (chosen above)."""
    pytest.importorskip("triton")
    import moerge.runtime.kernels as K

    if not K.INTERPRET:
        pytest.skip("triton's interpreter is not on (a GPU machine: the gpu tests run the kernel)")
    monkeypatch.setattr(K, "CPU", True)
    return K


@pytest.fixture
def base():
    return tiny_llama(0)

@pytest.fixture
def input_ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, VOCAB, (3, 10), generator=g)

@pytest.fixture
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 API on 127.0.0.1 (moto's server mode, a child process) for the whole session."""
    with s3_server() as url:
        yield url


@pytest.fixture
def s3(s3_endpoint, monkeypatch, tmp_path):
    """A fresh bucket on the S3 server, the S3 environment pointing at it, and a moerge cache of this test's own;
    a boto3 client with ``.bucket``, ``.url`` (``s3://<bucket>/lib``) and ``.env``."""
    import uuid

    import boto3

    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": s3_endpoint, "MOERGE_CACHE": str(tmp_path / "cache")}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1", aws_access_key_id="testing",
                          aws_secret_access_key="testing")
    client.bucket = f"b{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=client.bucket)
    client.url = f"s3://{client.bucket}/lib"
    client.env = env
    return client
