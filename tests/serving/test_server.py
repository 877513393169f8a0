"""The OpenAI-compatible server, live on 127.0.0.1, driven by the official openai client."""

from __future__ import annotations

import copy
import importlib
import json
import re
import socket
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import pytest
import torch

from moerge import ExpertLibrary, MoErgeModel
from moerge.routers import build_router
from moerge.serving import ServerConfig, create_app
from moerge.serving.protocol import OpenAIError, parse_completion

from helpers import save_peft_lora, tiny_chat_llama, tiny_tokenizer

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")


HANG_GUARD = 300  # seconds: only a request that never gets an answer takes this long


@contextmanager
def live(app) -> Iterator[str]:
    """Serve ``app`` on 127.0.0.1 in a thread; yields its URL. The socket is bound and listening before uvicorn
    starts, so requests queue until it accepts them: no wait for startup, and no other process can take the port.
    If the server fails, the socket is closed and every queued or later request fails at once."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
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
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=HANG_GUARD)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("server")
    base = tiny_chat_llama()
    lib = ExpertLibrary.create(tmp / "lib", base_model=base)
    for i, (n, d) in enumerate({"sort": "Sort words.", "french": "Translate to French."}.items()):
        lib.add_peft(save_peft_lora(base, tmp / n, seed=i, r=4, target_modules=["q_proj", "v_proj"]), n,
                     description=d)
    tok = tiny_tokenizer()
    model = MoErgeModel.from_library(copy.deepcopy(base), lib, router=build_router("arrow", top_k=1), tokenizer=tok)
    app = create_app(model, tok, ServerConfig(batch_window=0.0))  # its tests send one request at a time
    with live(app) as url, httpx.Client(base_url=url, timeout=HANG_GUARD) as http, client_for(url) as client:
        yield http, client, model, tok, base, tmp


def _reference(model, tok, messages, max_tokens, experts=None):
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    batch = tok([text], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                             experts=experts)
    ids = out[0, batch["input_ids"].shape[1]:].tolist()
    end = tok.convert_tokens_to_ids("<|im_end|>")
    kept = []
    for t in ids:
        if t in (tok.eos_token_id, tok.pad_token_id, end):
            break
        kept.append(t)
    return tok.decode(kept, skip_special_tokens=True)


def test_models_lists_the_routed_model_and_each_expert(server):
    _, client, *_ = server
    assert [m.id for m in client.models.list().data] == ["moerge", "moerge/sort", "moerge/french"]


def test_chat_completion_with_routing_trace(server):
    _, client, model, tok, *_ = server
    messages = [{"role": "user", "content": "sort: pear fig"}]
    r = client.chat.completions.create(model="moerge", messages=messages, max_tokens=6, temperature=0,
                                       extra_body={"moerge": {"trace": True}})
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == _reference(model, tok, messages, 6)  # what generate gives
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens <= 6
    trace = r.model_extra["moerge"]["routing"][0]
    assert set(trace["experts"]) <= {"sort", "french"} and trace["layer_usage"]


def test_an_experts_model_id_forces_it_and_exclusion_works(server):
    _, client, model, tok, *_ = server
    messages = [{"role": "user", "content": "hello there"}]
    r = client.chat.completions.create(model="moerge/french", messages=messages, max_tokens=5, temperature=0,
                                       extra_body={"moerge": {"trace": True}})
    assert r.model_extra["moerge"]["routing"][0]["experts"] == {"french": 1.0}
    assert r.choices[0].message.content == _reference(model, tok, messages, 5, experts={"french": 1.0})
    r = client.chat.completions.create(model="moerge", messages=messages, max_tokens=3, temperature=0,
                                       extra_body={"moerge": {"exclude": ["french"], "trace": True}})
    assert set(r.model_extra["moerge"]["routing"][0]["experts"]) == {"sort"}
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="moerge/nope", messages=messages, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="unknown expert"):
        client.chat.completions.create(model="moerge", messages=messages, max_tokens=2,
                                       extra_body={"moerge": {"experts": {"nope": 1.0}}})


def test_streaming_gives_the_same_text_as_one_response(server):
    _, client, *_ = server
    messages = [{"role": "user", "content": "translate: cat"}]
    whole = client.chat.completions.create(model="moerge", messages=messages, max_tokens=8, temperature=0)
    pieces, finish = [], None
    for chunk in client.chat.completions.create(model="moerge", messages=messages, max_tokens=8, temperature=0,
                                                stream=True):
        assert chunk.object == "chat.completion.chunk"
        if chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        finish = chunk.choices[0].finish_reason or finish
    assert "".join(pieces) == whole.choices[0].message.content and finish == whole.choices[0].finish_reason
    text = client.completions.create(model="moerge", prompt="abc", max_tokens=5, temperature=0)
    streamed = "".join(c.choices[0].text for c in client.completions.create(model="moerge", prompt="abc",
                                                                            max_tokens=5, temperature=0,
                                                                            stream=True))
    assert text.object == "text_completion" and streamed == text.choices[0].text


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(server):
    _, _, model, tok, *_ = server
    prompts = [f"item {i}: sort b a" for i in range(4)]
    # the worker closes a batch as soon as it holds max_batch jobs; the window only bounds a wait that never ends
    app = create_app(model, tok, ServerConfig(max_batch=4, batch_window=HANG_GUARD))
    with live(app) as url, client_for(url) as client:

        def ask(p):
            return client.chat.completions.create(model="moerge", messages=[{"role": "user", "content": p}],
                                                  max_tokens=4, temperature=0)

        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(ask, prompts))
    assert [r.model_extra["moerge"]["batch_size"] for r in results] == [4] * 4  # all four ran in one batch
    for p, r in zip(prompts, results):  # and each row is its prompt's answer, routed on its own
        assert r.choices[0].message.content == _reference(model, tok, [{"role": "user", "content": p}], 4)


def test_an_expert_uploaded_over_http_is_checked_then_served(server):
    http, client, model, tok, base, tmp = server
    folder = save_peft_lora(base, tmp / "upload", seed=7, r=2, target_modules=["q_proj"])
    files = {"adapter_config": ("adapter_config.json", (folder / "adapter_config.json").read_bytes()),
             "adapter_model": ("adapter_model.safetensors", (folder / "adapter_model.safetensors").read_bytes())}
    r = http.post("/v1/experts", files=files, data={"name": "json", "description": "Write JSON.",
                                                    "examples": json.dumps(["make json"])})
    assert r.status_code == 200 and r.json()["id"] == "moerge/json"
    assert "moerge/json" in [m.id for m in client.models.list().data]
    assert "json" in ExpertLibrary.open(model.library.root).names()  # persisted, with the library's checks
    out = client.chat.completions.create(model="moerge/json", messages=[{"role": "user", "content": "x"}],
                                         max_tokens=2, temperature=0, extra_body={"moerge": {"trace": True}})
    assert out.model_extra["moerge"]["routing"][0]["experts"] == {"json": 1.0}
    broken = dict(files, adapter_model=("adapter_model.safetensors", files["adapter_model"][1][:-10]))
    r = http.post("/v1/experts", files=broken, data={"name": "broken"})
    assert r.status_code == 400 and "malformed safetensors" in r.json()["error"]["message"]
    assert "broken" in r.json()["error"]["message"] and "moerge/broken" not in [m.id for m in client.models.list().data]
    assert http.delete("/v1/experts/json").json()["deleted"] is True
    assert "moerge/json" not in [m.id for m in client.models.list().data]
    assert http.delete("/v1/experts/json").status_code == 404


def test_bad_requests_are_refused_and_the_server_keeps_serving(server):
    http, client, *_ = server
    messages = [{"role": "user", "content": "hi"}]
    for body, match in [({"seed": [1]}, "seed"), ({"stop": [1]}, "stop"), ({"n": 2}, "n > 1"),
                        ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 10_000}, "context"),
                        ({"moerge": {"exclude": ["nope"]}}, "unknown experts"),
                        ({"moerge": {"experts": {"sort": "x"}}}, "not a number")]:
        r = http.post("/v1/chat/completions", json={"model": "moerge", "messages": messages, **body})
        assert r.status_code == 400 and match in r.json()["error"]["message"], (body, r.text)
    ok = client.chat.completions.create(model="moerge", messages=messages, max_tokens=2, temperature=0)
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_a_stop_sequence_ends_a_stream_early(server):
    _, client, *_ = server
    prompts = ["abc", "hello world", "sort: b a", "zzz", "1 2 3", "the cat", "x", "qwerty"]
    answers = {p: client.completions.create(model="moerge", prompt=p, max_tokens=12, temperature=0).choices[0].text
               for p in prompts}
    prompt, full = max(answers.items(), key=lambda t: len(set(t[1])))  # the answer with the most distinct chars
    assert len(set(full)) >= 3, answers
    stop = next(c for c in full[1:] if c != full[0])  # a character after the start, never the first one
    chunks = list(client.completions.create(model="moerge", prompt=prompt, max_tokens=12, temperature=0,
                                            stream=True, stop=[stop]))
    text = "".join(c.choices[0].text for c in chunks)
    assert text == full[: full.index(stop)] and chunks[-1].choices[0].finish_reason == "stop"


def test_the_server_needs_its_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if not installed
    for name in [n for n in sys.modules if n == "moerge.serving" or n.startswith("moerge.serving.")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(ImportError, match=re.escape('pip install "moerge[server]"')):
        importlib.import_module("moerge.serving")


def _parse(body, chat=False, tokenizer=None):
    return parse_completion(body, chat=chat, experts=["sort", "french"], tokenizer=tokenizer, default_max_tokens=16)


@pytest.mark.parametrize("body, status, param, match", [
    ([], 400, None, "JSON object"),
    ({"prompt": ""}, 400, "prompt", "non-empty string"),
    ({"prompt": "a", "model": "other"}, 404, "model", "does not exist"),
    ({"prompt": "a", "moerge": [1]}, 400, "moerge", "must be an object"),
    ({"prompt": "a", "moerge": {"experts": {}}}, 400, "moerge.experts", "map expert names"),
    ({"prompt": "a", "moerge": {"experts": {"sort": True}}}, 400, "moerge.experts", "not a number"),
    ({"prompt": "a", "moerge": {"exclude": "sort"}}, 400, "moerge.exclude", "list of expert names"),
    ({"prompt": "a", "stop": ["1", "2", "3", "4", "5"]}, 400, "stop", "at most 4"),
    ({"prompt": "a", "seed": True}, 400, "seed", "integer"),
    ({"prompt": "a", "temperature": "hot"}, 400, None, "must be numbers"),
    ({"prompt": "a", "temperature": -1}, 400, None, "temperature ≥ 0"),
    ({"prompt": "a", "top_p": 0}, 400, None, "top_p in (0, 1]"),
])
def test_a_completion_request_is_refused_with_the_field_at_fault(body, status, param, match):
    with pytest.raises(OpenAIError, match=re.escape(match)) as err:
        _parse(body)
    assert (err.value.status, err.value.param) == (status, param)


def test_a_chat_request_needs_messages_and_a_chat_template():
    with pytest.raises(OpenAIError, match="messages must be") as err:
        _parse({"messages": ["hi"]}, chat=True, tokenizer=tiny_tokenizer())
    assert err.value.param == "messages"
    no_template = type("Tok", (), {"chat_template": None})()
    with pytest.raises(OpenAIError, match="no chat template"):
        _parse({"messages": [{"role": "user", "content": "hi"}]}, chat=True, tokenizer=no_template)
    parts = [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]
    req = _parse({"messages": [{"role": "user", "content": parts}]}, chat=True, tokenizer=tiny_tokenizer())
    assert req.chat and "hi there" in req.text


def test_a_parsed_request_gives_the_engines_job():
    req = _parse({"prompt": ["abc"], "model": "moerge/sort", "moerge": {"experts": {"french": 1.0},
                                                                         "exclude": ["sort", "french"]},
                  "stop": "x", "temperature": 0, "seed": 3})
    assert (req.model, req.experts, req.exclude, req.stop) == ("moerge/sort", {"sort": 1.0}, ("french", "sort"), ["x"])
    job = req.job(prompt_tokens=3, context_length=None)
    assert (job.text, job.max_tokens, job.temperature, job.top_p, job.seed) == ("abc", 16, 0.0, 1.0, 3)
    assert req.job(prompt_tokens=10, context_length=12).max_tokens == 2  # the default fits the context
    with pytest.raises(OpenAIError, match="context of 12 tokens"):
        _parse({"prompt": "abc", "max_tokens": 3}).job(prompt_tokens=10, context_length=12)
    with pytest.raises(OpenAIError, match="the prompt is empty"):
        req.job(prompt_tokens=0, context_length=None)
