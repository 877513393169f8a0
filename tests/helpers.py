"""Test helpers shared by the suite: tiny random models and tokenizers built in memory, PEFT adapters saved to
temp folders, PEFT's own logits for comparison, random LoRA experts. Fully offline."""

from __future__ import annotations

import contextlib
import copy
import functools
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

VOCAB = 96


def tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
               tie_word_embeddings=False)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    model.config._name_or_path = f"tiny-llama-{seed}"
    return model.eval()


def tiny_qwen2_moe(seed: int = 0):
    """An MoE model whose shared expert's linear modules see tokens flattened to (rows·T, hidden)."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(seed)
    model = Qwen2MoeForCausalLM(Qwen2MoeConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
        shared_expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, tie_word_embeddings=False))
    model.config._name_or_path = f"tiny-qwen2-moe-{seed}"
    return model.eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                       bos_token_id=1, eos_token_id=2, pad_token_id=0))
    model.config._name_or_path = f"tiny-gpt2-{seed}"
    return model.eval()


def save_peft_lora(base, folder: Path, seed: int = 0, **lora_kwargs) -> Path:
    """Save a PEFT LoRA adapter with random (non-zero) A and B for ``base`` into ``folder``."""
    from peft import LoraConfig, get_peft_model

    kwargs = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                  init_lora_weights=False)
    kwargs.update(lora_kwargs)
    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(**kwargs))
    with torch.no_grad():  # make the update large enough that a wrong scale or layout shows in the logits
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.mul_(3.0)
    peft_model.save_pretrained(str(folder))
    return folder


def peft_logits(base, folder: Path, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits of PEFT's own LoRA forward for the adapter in ``folder``."""
    from peft import PeftModel

    pm = PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()
    with torch.no_grad():
        return pm(input_ids=input_ids).logits


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_tokenizer():
    """A character-level fast tokenizer with a ChatML chat template, built in memory (vocab < 128)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = CHATML
    fast.padding_side = "left"
    return fast


TOK_VOCAB = 128


def tiny_chat_llama(seed: int = 0):
    """A tiny Llama whose vocabulary covers :func:`tiny_tokenizer`."""
    return tiny_llama(seed, vocab_size=TOK_VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def rand_expert(base, name: str, *, seed: int = 0, rank: int = 4, modules=("q_proj", "v_proj", "down_proj"),
                scale: float = 2.0, description: str = "", examples=()):
    """A random (non-zero) LoRA expert for ``base`` on the modules whose names end with ``modules``."""
    from moerge import Expert, ExpertMetadata, LoRAWeights
    from moerge.core.fingerprint import linear_shape

    g = torch.Generator().manual_seed(seed)
    mods = {}
    for mname, mod in base.named_modules():
        if isinstance(mod, torch.nn.Linear) and mname.rsplit(".", 1)[-1] in modules:
            out_f, in_f = linear_shape(mod)
            mods[mname] = LoRAWeights(torch.randn(rank, in_f, generator=g) / in_f ** 0.5,
                                      torch.randn(out_f, rank, generator=g) / rank ** 0.5, scale)
    return Expert(name, mods, ExpertMetadata(description=description, examples=list(examples)))


@contextlib.contextmanager
def s3_server():
    """A real S3 API on 127.0.0.1: moto's server mode in a child process (not an in-process mock); yields its
    endpoint URL and stops it on exit."""
    import subprocess
    import sys
    import time
    import urllib.request

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(url + "/moto-api/", timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError("moto's server did not start") from None
                time.sleep(0.1)
        else:
            raise RuntimeError("moto's server did not answer within 30 s")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def s3_keys(s3) -> list[str]:
    """The keys under ``lib/`` in the ``s3`` fixture's bucket, relative to the library."""
    out = s3.list_objects_v2(Bucket=s3.bucket).get("Contents", [])
    return sorted(o["Key"][len("lib/"):] for o in out if o["Key"].startswith("lib/"))


def free_port() -> int:
    """A TCP port of 127.0.0.1 that was free a moment ago (for servers that bind their own socket)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


HANG_GUARD = 300  # seconds: only a request that never gets an answer takes this long


@contextmanager
def live(app) -> Iterator[str]:
    """Serve ``app`` on 127.0.0.1 in a thread; yields its URL. The socket is bound and listening before uvicorn
    starts, so requests queue until it accepts them: no wait for startup, and no other process can take the port.
    If the server fails, the socket is closed and every queued or later request fails at once."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    import uvicorn

    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))

    def run() -> None:
        try:
            srv.run(sockets=[sock])
        finally:
            sock.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        srv.should_exit = True
        thread.join(timeout=HANG_GUARD)


def client_for(url: str):
    """The official openai client on the server at ``url``."""
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=HANG_GUARD)


def two_expert_model(tmp: Path):
    """A tiny chat Llama over a library of two PEFT experts, ``sort`` and ``french`` (Arrow, top-1), with the tiny
    tokenizer: the model the server tests serve. Returns ``(model, tokenizer)``."""
    from moerge import ExpertLibrary, MoErgeModel
    from moerge.routers import build_router

    base = tiny_chat_llama()
    lib = ExpertLibrary.create(tmp / "lib", base_model=base)
    for i, name in enumerate(["sort", "french"]):
        lib.add_peft(save_peft_lora(base, tmp / name, seed=i, target_modules=["q_proj", "v_proj"]), name,
                     description=name)
    tok = tiny_tokenizer()
    return MoErgeModel.from_library(copy.deepcopy(base), lib, router=build_router("arrow", top_k=1), tokenizer=tok), tok


def ray_library(tmp: Path):
    """A tiny chat Llama saved under ``tmp/base`` and a library ``tmp/lib`` of two experts, ``sort`` and ``french``,
    for the Ray tests. Returns ``(base, library, build)``: ``build()`` makes the routed model a replica serves
    (GLIDER's global stage alone); the single-process reference is ``build()`` too — once per process: the router
    object is the partial's, so each replica gets its own copy by unpickling it."""
    from moerge import ExpertLibrary, MoErgeModel
    from moerge.routers import build_router

    base, tok = tiny_chat_llama(), tiny_tokenizer()
    base.save_pretrained(tmp / "base")
    lib = ExpertLibrary.create(tmp / "lib", base_model=base)
    lib.add(rand_expert(base, "sort", seed=1, description="sort a list of letters alphabetically",
                        examples=["sort: c b a", "put d a c in order"]))
    lib.add(rand_expert(base, "french", seed=2, description="translate english text to french",
                        examples=["translate: good morning", "say hello in french"]))
    # a partial of the library's own function: the replicas' workers unpickle it without this test module
    build = functools.partial(MoErgeModel.from_library, str(tmp / "base"), str(tmp / "lib"),
                              router=build_router("glider", local="none"), tokenizer=tok)
    return base, lib, build


@contextlib.contextmanager
def ray_serving(build, library: str, replicas: int = 2, config=None):
    """moerge on Ray Serve (:func:`moerge.serving.ray_app.build_app`) on a local Ray cluster started here (2 CPUs,
    127.0.0.1; its workers inherit this process's environment), with ``replicas`` of 1/replicas CPU or ``config``
    (a :class:`~moerge.serving.ray_app.RayConfig`); yields the HTTP URL, and stops it all on exit."""
    import ray
    from ray import serve

    from moerge.serving.ray_app import RayConfig, build_app

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="moerge-tests")
    try:
        # Serve's proxy binds the port itself, after it was found free: another process (Ray's own workers take
        # ports as they start) may have taken it meanwhile, so a taken port is tried again with another
        for attempt in range(3):
            port = free_port()
            try:
                serve.start(http_options={"host": "127.0.0.1", "port": port})
                serve.run(build_app(build, library, config=config or RayConfig(replicas=replicas,
                                                                               replica_cpus=1 / replicas)),
                          route_prefix="/", name="moerge")
                break
            except Exception as e:  # noqa: BLE001 - only a port taken meanwhile is tried again
                if "Failed to bind" not in str(e) or attempt == 2:
                    raise
                serve.shutdown()
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


CACHE_NAMES = [f"e{i}" for i in range(6)]


def six_expert_library(path):
    """Six experts of different ranks and modules (the banks hold slots of several sizes), on tiny_chat_llama."""
    from moerge import ExpertLibrary

    base = tiny_chat_llama()
    lib = ExpertLibrary.create(path, base_model=base)
    for i, n in enumerate(CACHE_NAMES):
        mods = ("q_proj", "v_proj", "down_proj") if i % 2 else ("q_proj", "o_proj", "up_proj", "gate_proj")
        lib.add(rand_expert(base, n, seed=i, rank=2 + i, modules=mods, description=f"expert {n}"))
    return lib


def count_reads(monkeypatch) -> list[str]:
    """The names of the experts whose weights files are read from now on, one entry per read."""
    from moerge.library.experts import ExpertFiles

    got: list[str] = []
    real = ExpertFiles.load

    def load(self, name, files):
        got.append(name)
        return real(self, name, files)

    monkeypatch.setattr(ExpertFiles, "load", load)
    return got
