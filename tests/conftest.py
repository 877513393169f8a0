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

from helpers import VOCAB, tiny_llama, tiny_tokenizer  # noqa: E402


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
