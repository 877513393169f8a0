"""The OpenAI-compatible server, live on 127.0.0.1, driven by the official openai client."""

from __future__ import annotations

import copy
import importlib
import json
import re
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from moerge import ExpertLibrary, MoErgeModel
from moerge.routers import build_router
from moerge.serving import ServerConfig, create_app
from moerge.serving.protocol import OpenAIError, parse_completion

from helpers import HANG_GUARD, client_for, live, save_peft_lora, tiny_chat_llama, tiny_tokenizer

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")


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


def _past_the_tokenizer(model, tok) -> list[int]:
    """The ids the model has logits for but the tokenizer has no text for: the server never chooses them."""
    return list(range(len(tok), model.base.get_output_embeddings().weight.shape[0]))


def _reference(model, tok, messages, max_tokens, experts=None):
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    batch = tok([text], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                             experts=experts, suppress_tokens=_past_the_tokenizer(model, tok))
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


def _adapter_files(folder, truncate: int = 0) -> dict:
    """The multipart files of the PEFT adapter in ``folder`` (its weights cut short by ``truncate`` bytes)."""
    weights = (folder / "adapter_model.safetensors").read_bytes()
    return {"adapter_config": ("adapter_config.json", (folder / "adapter_config.json").read_bytes()),
            "adapter_model": ("adapter_model.safetensors", weights[: len(weights) - truncate])}


def _finished(http, upload: dict) -> dict:
    """The upload's status once it is done or failed, polled; the deadline only guards against a hang."""
    deadline = time.monotonic() + HANG_GUARD
    while (status := http.get(upload["status_url"]).json())["status"] not in ("done", "failed"):
        assert time.monotonic() < deadline, status
        time.sleep(0.01)
    return status


def _served(client) -> list[str]:
    return [m.id for m in client.models.list().data]


def test_an_uploaded_expert_is_added_in_the_background_then_served(server):
    http, client, model, tok, base, tmp = server
    files = _adapter_files(save_peft_lora(base, tmp / "upload", seed=7, r=2, target_modules=["q_proj"]))
    r = http.post("/v1/experts", files=files, data={"name": "json", "description": "Write JSON.",
                                                    "examples": json.dumps(["make json"])})
    upload = r.json()
    assert r.status_code == 202 and (upload["name"], upload["status"]) == ("json", "pending")
    assert upload["status_url"] == f"/v1/experts/pending/{upload['id']}"
    status = _finished(http, upload)
    assert status["status"] == "done" and status["error"] is None and status["expert"]["id"] == "moerge/json"
    assert "moerge/json" in _served(client)
    assert "json" in ExpertLibrary.open(model.library.root).names()  # persisted, with the library's checks
    assert ExpertLibrary.open(model.library.root)["json"].metadata.examples == ["make json"]
    assert upload["id"] in [u["id"] for u in http.get("/v1/experts/pending").json()["data"]]
    out = client.chat.completions.create(model="moerge/json", messages=[{"role": "user", "content": "x"}],
                                         max_tokens=2, temperature=0, extra_body={"moerge": {"trace": True}})
    assert out.model_extra["moerge"]["routing"][0]["experts"] == {"json": 1.0}
    assert http.delete("/v1/experts/json").json()["deleted"] is True
    assert "moerge/json" not in _served(client) and "json" not in ExpertLibrary.open(model.library.root)


def test_a_broken_upload_fails_in_its_status_and_changes_nothing(server):
    http, client, model, _, base, tmp = server
    files = _adapter_files(save_peft_lora(base, tmp / "broken", seed=8, r=2, target_modules=["q_proj"]), truncate=10)
    served, stored = _served(client), ExpertLibrary.open(model.library.root).names()
    r = http.post("/v1/experts", files=files, data={"name": "broken"})
    assert r.status_code == 202
    status = _finished(http, r.json())
    assert status["status"] == "failed" and status["expert"] is None
    message = status["error"]["message"]
    assert "malformed safetensors" in message and "'broken'" in message and "adapter_model.safetensors" in message
    assert status["error"]["type"] == "invalid_request_error" and "moerge-upload-" not in message
    assert _served(client) == served and ExpertLibrary.open(model.library.root).names() == stored


def test_an_upload_with_wait_answers_once_the_expert_is_added_or_refused(server):
    http, client, model, _, base, tmp = server
    folder = save_peft_lora(base, tmp / "waited", seed=9, r=2, target_modules=["v_proj"])
    r = http.post("/v1/experts?wait=true", files=_adapter_files(folder), data={"name": "waited"})
    assert r.status_code == 200 and r.json() == {"object": "expert", "id": "moerge/waited", "name": "waited",
                                                 "modules": 2, "kind": "lora"}
    assert "moerge/waited" in _served(client)  # visible as soon as the answer came
    r = http.post("/v1/experts?wait=true", files=_adapter_files(folder, truncate=10),
                  data={"name": "waited", "overwrite": "true"})
    assert r.status_code == 400 and "malformed safetensors" in r.json()["error"]["message"]
    assert model.get_expert("waited").modules.keys() == ExpertLibrary.open(model.library.root)["waited"].modules.keys()
    assert http.delete("/v1/experts/waited").status_code == 200


@pytest.mark.parametrize("change, status, param, match", [
    ({"drop": "adapter_model"}, 400, "adapter_model", "'adapter_model' is missing"),
    ({"drop": "name"}, 400, "name", "'name' is missing"),
    ({"data": {"examples": "[1]"}}, 400, "examples", "JSON list of strings"),
    ({"data": {"name": "../up"}}, 400, "name", "invalid expert name"),
    ({"data": {"name": "sort"}}, 409, "name", "'sort' already exists"),
    ({"query": "?wait=maybe"}, 400, "wait", "'wait' is invalid"),
])
def test_an_upload_is_refused_at_once_naming_the_field_at_fault(server, change, status, param, match):
    http, client, _, _, base, tmp = server
    files = _adapter_files(save_peft_lora(base, tmp / "fields", seed=1, r=2, target_modules=["q_proj"]))
    files.pop(change.get("drop"), None)
    data = {"name": "fresh", **change.get("data", {})}
    data.pop(change.get("drop"), None)
    before = len(http.get("/v1/experts/pending").json()["data"])
    r = http.post(f"/v1/experts{change.get('query', '')}", files=files, data=data)
    error = r.json()["error"]
    assert (r.status_code, error["param"], error["type"]) == (status, param, "invalid_request_error")
    assert match in error["message"], error
    assert len(http.get("/v1/experts/pending").json()["data"]) == before  # nothing was queued
    assert _served(client) == ["moerge", "moerge/sort", "moerge/french"]


def test_deleting_an_expert_the_model_does_not_have_is_404(server):
    http, client, model, _, base, tmp = server
    r = http.delete("/v1/experts/never")
    assert r.status_code == 404 and r.json()["error"] == {"message": "no expert 'never'",
                                                          "type": "invalid_request_error", "param": None,
                                                          "code": "expert_not_found"}
    folder = save_peft_lora(base, tmp / "gone", seed=3, r=2, target_modules=["q_proj"])
    assert http.post("/v1/experts?wait=true", files=_adapter_files(folder), data={"name": "gone"}).status_code == 200
    ExpertLibrary.open(model.library.root).remove("gone")  # as another process does, through its own library
    r = http.delete("/v1/experts/gone")
    assert r.status_code == 404 and r.json()["error"]["code"] == "expert_not_found"
    assert "moerge/gone" not in _served(client) and "gone" not in ExpertLibrary.open(model.library.root)


def test_requests_are_served_while_an_upload_prepares_its_routing_data(server, monkeypatch):
    _, _, model, tok, base, tmp = server
    reached, release = threading.Event(), threading.Event()
    prepare = model.router.prepare_expert

    def held(expert):  # the upload's routing-data step, held until the test lets it go
        reached.set()
        assert release.wait(HANG_GUARD)
        return prepare(expert)

    monkeypatch.setattr(model.router, "prepare_expert", held)
    folder = save_peft_lora(base, tmp / "held", seed=4, r=2, target_modules=["q_proj"])
    messages = [{"role": "user", "content": "sort: b a"}]
    # one upload may wait while another runs, and the server remembers one finished upload
    app = create_app(model, tok, ServerConfig(batch_window=0.0, max_pending_uploads=1, upload_history=1))
    with live(app) as url, httpx.Client(base_url=url, timeout=HANG_GUARD) as http, client_for(url) as client:
        try:
            first = http.post("/v1/experts", files=_adapter_files(folder), data={"name": "held1"}).json()
            assert reached.wait(HANG_GUARD)
            assert http.get(first["status_url"]).json()["status"] == "running"
            second = http.post("/v1/experts", files=_adapter_files(folder), data={"name": "held2"}).json()
            assert http.get(second["status_url"]).json()["status"] == "pending"
            full = http.post("/v1/experts", files=_adapter_files(folder), data={"name": "held3"})
            assert full.status_code == 429 and full.json()["error"]["code"] == "too_many_uploads"
            again = http.post("/v1/experts", files=_adapter_files(folder), data={"name": "held1"})
            assert again.status_code == 409 and first["status_url"] in again.json()["error"]["message"]
            answer = client.chat.completions.create(model="moerge", messages=messages, max_tokens=6, temperature=0)
            assert answer.choices[0].message.content == _reference(model, tok, messages, 6)
            assert "moerge/held1" not in _served(client)  # invisible until its routing data is ready
            assert [u["status"] for u in http.get("/v1/experts/pending").json()["data"]] == ["pending", "running"]
        finally:
            release.set()
        assert _finished(http, second)["status"] == "done"  # the worker adds uploads in order: both are added
        assert {"moerge/held1", "moerge/held2"} <= set(_served(client))
        assert [u["id"] for u in http.get("/v1/experts/pending").json()["data"]] == [second["id"]]
        assert http.get(first["status_url"]).status_code == 404  # beyond the history kept
        for name in ("held1", "held2"):
            assert http.delete(f"/v1/experts/{name}").status_code == 200


def test_a_server_on_a_library_without_gates_serves_at_once_and_trains_them_meanwhile(tmp_path, monkeypatch):
    import moerge.routers.phatgoose as pg

    base = tiny_chat_llama()
    lib = ExpertLibrary.create(tmp_path / "lib", base_model=base)
    for i, n in enumerate(("sort", "french")):
        lib.add_peft(save_peft_lora(base, tmp_path / n, seed=i, r=4, target_modules=["q_proj", "v_proj"]), n,
                     description=f"{n} words", examples=[f"{n}: b a", f"{n}: c d e"])
    release, real = threading.Event(), pg.train_phatgoose_gates

    def held(*a, **kw):  # training held until the test lets it go
        assert release.wait(HANG_GUARD)
        return real(*a, **kw)

    monkeypatch.setattr(pg, "train_phatgoose_gates", held)
    tok = tiny_tokenizer()
    router = build_router("phatgoose", top_k=1, train_steps=2, train_batch_size=2)
    model = MoErgeModel.from_library(copy.deepcopy(base), lib, router=router, tokenizer=tok, follow=False,
                                     train_routing="background", train_in="thread")  # held in this process
    messages = [{"role": "user", "content": "sort: b a"}]
    with live(create_app(model, tok, ServerConfig(batch_window=0.0))) as url, \
            httpx.Client(base_url=url, timeout=HANG_GUARD) as http, client_for(url) as client:
        try:
            listed = http.get("/v1/experts").json()
            assert [(e["name"], e["routing"]) for e in listed["data"]] == [("sort", "training"), ("french", "training")]
            answer = client.chat.completions.create(model="moerge/sort", messages=messages, max_tokens=6,
                                                    temperature=0)  # an expert by name: served at once
            assert answer.choices[0].message.content == _reference(model, tok, messages, 6, {"sort": 1.0})
            routed = client.chat.completions.create(model="moerge", messages=messages, max_tokens=6, temperature=0)
            assert routed.choices[0].message.content == _reference(model, tok, messages, 6)
        finally:
            release.set()
        assert model.wait_routing(HANG_GUARD)
        assert [e["routing"] for e in http.get("/v1/experts").json()["data"]] == ["ready", "ready"]
        assert ExpertLibrary.open(lib.root).routing_kinds("sort") == ["phatgoose"]
    model.close()


def test_bad_requests_are_refused_and_the_server_keeps_serving(server):
    http, client, *_ = server
    messages = [{"role": "user", "content": "hi"}]
    for body, match in [({"seed": [1]}, "seed"), ({"stop": [1]}, "stop"), ({"n": 0}, "'n'"),
                        ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 10_000}, "context"),
                        ({"moerge": {"exclude": ["nope"]}}, "unknown experts"),
                        ({"moerge": {"experts": {"sort": "x"}}}, "moerge.experts.sort")]:
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
    ({"prompt": "a", "moerge": [1]}, 400, "moerge", "valid dictionary"),
    ({"prompt": "a", "moerge": {"experts": {}}}, 400, "moerge.experts", "map expert names"),
    ({"prompt": "a", "moerge": {"experts": {"sort": True}}}, 400, "moerge.experts.sort", "valid number"),
    ({"prompt": "a", "moerge": {"exclude": "sort"}}, 400, "moerge.exclude", "valid list"),
    ({"prompt": "a", "stop": ["1", "2", "3", "4", "5"]}, 400, "stop", "at most 4"),
    ({"prompt": "a", "seed": True}, 400, "seed", "valid integer"),
    ({"prompt": "a", "temperature": "hot"}, 400, "temperature", "valid number"),
    ({"prompt": "a", "temperature": -1}, 400, "temperature", "greater than or equal to 0"),
    ({"prompt": "a", "top_p": 0}, 400, "top_p", "greater than 0"),
    # coercions refused: a string, a fraction or a boolean is not a token count; "no" is not a boolean
    ({"prompt": "a", "max_tokens": "10"}, 400, "max_tokens", "valid integer"),
    ({"prompt": "a", "max_tokens": 3.9}, 400, "max_tokens", "valid integer"),
    ({"prompt": "a", "max_tokens": True}, 400, "max_tokens", "valid integer"),
    ({"prompt": "a", "max_tokens": float("inf")}, 400, "max_tokens", "valid integer"),
    ({"prompt": "a", "stream": "no"}, 400, "stream", "valid boolean"),
    ({"prompt": "a", "temperature": float("nan")}, 400, "temperature", "finite number"),
    ({"prompt": "a", "seed": 2**70}, 400, "seed", "less than"),
    ({"prompt": "\ud800"}, 400, "prompt", "lone surrogate"),
    ({"prompt": "a", "n": 65}, 400, "n", "less than or equal to 64"),
    ({"prompt": "a", "logprobs": 21}, 400, "logprobs", "less than or equal to 20"),
    ({"prompt": "a", "logprobs": True}, 400, "logprobs", "valid integer"),
    ({"prompt": "a", "echo": 1}, 400, "echo", "valid boolean"),
    ({"prompt": "a", "presence_penalty": 2.5}, 400, "presence_penalty", "less than or equal to 2"),
    ({"prompt": "a", "frequency_penalty": -3}, 400, "frequency_penalty", "greater than or equal to -2"),
    ({"prompt": "a", "logit_bias": {"x": 1}}, 400, "logit_bias.x", "pattern"),
    ({"prompt": "a", "logit_bias": {"5": 101}}, 400, "logit_bias.5", "less than or equal to 100"),
    ({"prompt": "a", "stream_options": {"include_usage": True}}, 400, "stream_options", "streamed"),
    ({"prompt": "a", "stream": True, "echo": True}, 400, "echo", "not supported with stream"),
    ({"prompt": "a", "stream": True, "stream_options": {"include_usage": "yes"}}, 400,
     "stream_options.include_usage", "valid boolean"),
    ({"prompt": [[1, 2], [-1]]}, 400, "prompt.1.0", "greater than or equal to 0"),
    ({"prompt": [[1, 2], "a"]}, 400, "prompt.0", "valid"),
    # fields OpenAI defines that this server does not support yet, and fields nobody defines: never ignored
    ({"prompt": "a", "tools": [{"type": "function"}]}, 400, "tools", "not supported by this server"),
    ({"prompt": "a", "response_format": {"type": "xml"}}, 400, "response_format.type", "'text', 'json_object'"),
    ({"prompt": "a", "response_format": {"type": "json_schema"}}, 400, "response_format.json_schema", "required"),
    ({"prompt": "a", "response_format": {"type": "json_object", "json_schema": {"name": "x"}}}, 400,
     "response_format.json_schema", "only then"),
    ({"prompt": "a", "suffix": "b"}, 400, "suffix", "not supported"),
    ({"prompt": "a", "wat": 1}, 400, "wat", "unknown field"),
])
def test_a_completion_request_is_refused_with_the_field_at_fault(body, status, param, match):
    with pytest.raises(OpenAIError, match=re.escape(match)) as err:
        _parse(body)
    assert (err.value.status, err.value.param) == (status, param)


def test_a_chat_request_needs_messages_and_a_chat_template():
    with pytest.raises(OpenAIError, match="valid dictionary") as err:
        _parse({"messages": ["hi"]}, chat=True, tokenizer=tiny_tokenizer())
    assert err.value.param == "messages.0"
    for messages, param in [([{"content": "hi"}], "messages.0.role"), ([], "messages"),
                            ([{"role": "user", "content": [{"type": "text", "text": 3}]}], "messages.0.content.0.text"),
                            ([{"role": "user"}], "messages.0"), ([{"role": "system", "content": None},
                                                                  {"role": "user", "content": "hi"}], "messages.0")]:
        with pytest.raises(OpenAIError) as err:
            _parse({"messages": messages}, chat=True, tokenizer=tiny_tokenizer())
        assert (err.value.status, err.value.param) == (400, param)
    no_template = type("Tok", (), {"chat_template": None})()
    with pytest.raises(OpenAIError, match="no chat template"):
        _parse({"messages": [{"role": "user", "content": "hi"}]}, chat=True, tokenizer=no_template)
    parts = [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]
    req = _parse({"messages": [{"role": "user", "content": parts}]}, chat=True, tokenizer=tiny_tokenizer())
    assert req.chat and "hi there" in req.prompts[0]
    with pytest.raises(OpenAIError, match="top_logprobs needs logprobs") as err:
        _parse({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, chat=True,
               tokenizer=tiny_tokenizer())


def test_a_parsed_request_gives_the_engines_jobs():
    req = _parse({"prompt": ["abc"], "model": "moerge/sort", "moerge": {"experts": {"french": 1.0},
                                                                         "exclude": ["sort", "french"]},
                  "stop": "x", "temperature": 0, "seed": 3, "logit_bias": {"7": -100}, "presence_penalty": 0.5})
    assert (req.model, req.experts, req.exclude, req.stop) == ("moerge/sort", {"sort": 1.0}, ("french", "sort"), ["x"])
    three = lambda text: [5, 6, 7][: len(text)]  # noqa: E731 - a tokenizer for the test
    [job] = req.jobs(three, vocab_size=100, context_length=None)
    s = job.sampling
    assert (job.ids, job.max_tokens, s.temperature, s.top_p, s.seed) == ([5, 6, 7], 16, 0.0, 1.0, 3)
    assert (s.logit_bias, s.presence_penalty, s.top_logprobs) == ({7: -100.0}, 0.5, None)
    assert req.jobs(lambda t: [1] * 10, 100, context_length=12)[0].max_tokens == 2  # the default fits the context
    with pytest.raises(OpenAIError, match="context of 12 tokens"):
        _parse({"prompt": "abc", "max_tokens": 3}).jobs(lambda t: [1] * 10, 100, context_length=12)
    with pytest.raises(OpenAIError, match="prompt is empty"):
        req.jobs(lambda t: [], 100, context_length=None)
    with pytest.raises(OpenAIError, match="logit_bias names token id 7"):
        req.jobs(three, vocab_size=7, context_length=None)
    # several prompts, as text or token ids; ids the model does not have are refused naming the prompt
    many = _parse({"prompt": [[1, 2], [3]], "n": 2, "echo": True, "logprobs": 1, "max_tokens": 0})
    jobs = many.jobs(three, vocab_size=4, context_length=None)
    assert [j.ids for j in jobs] == [[1, 2], [3]] and all(j.n == 2 and j.echo for j in jobs)
    with pytest.raises(OpenAIError, match=r"prompt\[1\] holds token id 3"):
        many.jobs(three, vocab_size=3, context_length=None)
    with pytest.raises(OpenAIError, match="max_tokens 0 asks for nothing"):
        _parse({"prompt": "a", "max_tokens": 0}).jobs(three, 100, None)


def test_the_server_reads_experts_when_requests_need_them_and_lists_which_are_resident(tmp_path):
    base = tiny_chat_llama()
    lib = ExpertLibrary.create(tmp_path / "lib", base_model=base)
    for i, n in enumerate(("sort", "french", "upper")):
        lib.add_peft(save_peft_lora(base, tmp_path / n, seed=i, r=4, target_modules=["q_proj", "v_proj"]), n)
    tok = tiny_tokenizer()
    model = MoErgeModel.from_library(copy.deepcopy(base), lib, router="fixed", tokenizer=tok, follow=False,
                                     cache_bytes=1)  # room for no expert beyond the one a request needs
    app = create_app(model, tok, ServerConfig(batch_window=0.0))
    with live(app) as url, httpx.Client(base_url=url, timeout=HANG_GUARD) as http:
        listed = http.get("/v1/experts").json()
        assert [e["resident"] for e in listed["data"]] == [False, False, False]
        assert listed["cache"]["resident"] == 0 and listed["cache"]["budget_bytes"] == 1
        messages = [{"role": "user", "content": "hello there"}]
        for name in ("french", "upper"):
            r = http.post("/v1/chat/completions", json={"model": f"moerge/{name}", "messages": messages,
                                                        "max_tokens": 3, "temperature": 0})
            assert r.status_code == 200
            assert r.json()["choices"][0]["message"]["content"] == _reference(model, tok, messages, 3,
                                                                              experts={name: 1.0})
        listed = http.get("/v1/experts").json()
        assert {e["name"]: e["resident"] for e in listed["data"]} == {"sort": False, "french": False, "upper": True}
        assert listed["cache"]["evictions"] >= 1 and listed["cache"]["misses"] >= 2
        # the library moved away under the server: an expert it must read is a 503 naming the library, not the
        # client's fault; the expert it holds still answers, and once the library is back so does the other
        moved = tmp_path / "elsewhere"
        (tmp_path / "lib").rename(moved)
        r = http.post("/v1/chat/completions", json={"model": "moerge/sort", "messages": messages, "max_tokens": 3})
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "library_unavailable" and "lib" in r.json()["error"]["message"]
        r = http.post("/v1/chat/completions", json={"model": "moerge/sort", "messages": messages, "max_tokens": 3,
                                                    "stream": True})  # a stream reports it in an event, the same way
        events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
        assert [e["error"]["type"] for e in events if "error" in e] == ["server_error"], r.text
        assert "expert library could not be read" in events[-1]["error"]["message"]
        assert http.post("/v1/chat/completions", json={"model": "moerge/upper", "messages": messages,
                                                       "max_tokens": 3}).status_code == 200
        moved.rename(tmp_path / "lib")
        r = http.post("/v1/chat/completions", json={"model": "moerge/sort", "messages": messages, "max_tokens": 3,
                                                    "temperature": 0})
        assert r.status_code == 200, r.text
    model.close()


def test_a_server_over_a_library_in_s3_stores_uploads_there(s3, tmp_path, monkeypatch):
    from helpers import s3_keys

    base = tiny_chat_llama()
    lib = ExpertLibrary.create(s3.url, base_model=base)
    lib.add_peft(save_peft_lora(base, tmp_path / "sort", seed=1, r=4, target_modules=["q_proj"]), "sort",
                 description="Sort words.")
    tok = tiny_tokenizer()
    monkeypatch.setenv("MOERGE_CACHE", str(tmp_path / "server"))
    model = MoErgeModel.from_library(copy.deepcopy(base), ExpertLibrary.open(s3.url),
                                     router=build_router("arrow", top_k=1), tokenizer=tok)
    app = create_app(model, tok, ServerConfig(batch_window=0.0))
    try:
        with live(app) as url, httpx.Client(base_url=url, timeout=HANG_GUARD) as http, client_for(url) as client:
            folder = save_peft_lora(base, tmp_path / "json", seed=2, r=2, target_modules=["v_proj"])
            r = http.post("/v1/experts?wait=true", files=_adapter_files(folder), data={"name": "json"})
            assert r.status_code == 200, r.text
            assert "experts/json/weights.safetensors" in s3_keys(s3)
            monkeypatch.setenv("MOERGE_CACHE", str(tmp_path / "elsewhere"))
            assert ExpertLibrary.open(s3.url).names() == ["sort", "json"]  # another machine sees it
            out = client.chat.completions.create(model="moerge/json", messages=[{"role": "user", "content": "x"}],
                                                 max_tokens=2, temperature=0,
                                                 extra_body={"moerge": {"trace": True}})
            assert out.model_extra["moerge"]["routing"][0]["experts"] == {"json": 1.0}
            assert http.delete("/v1/experts/json").status_code == 200
            assert "experts/json/weights.safetensors" not in s3_keys(s3)
    finally:
        model.close()


def test_an_api_key_guards_expert_changes_and_optionally_everything(tmp_path):
    base = tiny_chat_llama()
    lib = ExpertLibrary.create(tmp_path / "lib", base_model=base)
    lib.add_peft(save_peft_lora(base, tmp_path / "sort", seed=1, r=4, target_modules=["q_proj"]), "sort")
    tok = tiny_tokenizer()
    folder = save_peft_lora(base, tmp_path / "json", seed=2, r=2, target_modules=["v_proj"])
    msg = [{"role": "user", "content": "x"}]
    for everything in (False, True):
        model = MoErgeModel.from_library(copy.deepcopy(base), ExpertLibrary.open(lib.root),
                                         router=build_router("arrow", top_k=1), tokenizer=tok, follow=False)
        app = create_app(model, tok, ServerConfig(batch_window=0.0, api_key="s3cret", api_key_for_all=everything))
        with live(app) as url, httpx.Client(base_url=url, timeout=HANG_GUARD) as http:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
                r = http.post("/v1/experts?wait=true", files=_adapter_files(folder), data={"name": "json"},
                              headers=headers)
                assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
                assert http.delete("/v1/experts/sort", headers=headers).status_code == 401
            assert "json" not in ExpertLibrary.open(lib.root) and "sort" in model.experts
            key = {"Authorization": "Bearer s3cret"}
            r = http.post("/v1/experts?wait=true", files=_adapter_files(folder), data={"name": "json"}, headers=key)
            assert r.status_code == 200, r.text
            assert http.delete("/v1/experts/json", headers=key).status_code == 200
            body = {"model": "moerge", "messages": msg, "max_tokens": 2}
            assert http.post("/v1/chat/completions", json=body).status_code == (401 if everything else 200)
            with openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0) as client:
                assert client.chat.completions.create(model="moerge", messages=msg, max_tokens=2).choices
            if everything:
                with openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0) as client:
                    with pytest.raises(openai.AuthenticationError):
                        client.models.list()
        model.close()
    locked = MoErgeModel.from_library(copy.deepcopy(base), ExpertLibrary.open(lib.root),
                                      router=build_router("arrow", top_k=1), tokenizer=tok, follow=False)
    with live(create_app(locked, tok, ServerConfig(batch_window=0.0, admin=False))) as url, \
            httpx.Client(base_url=url, timeout=HANG_GUARD) as http:
        r = http.post("/v1/experts", files=_adapter_files(folder), data={"name": "json"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "admin_disabled"
        assert http.delete("/v1/experts/sort").status_code == 403
    locked.close()


def test_uploads_are_staged_in_the_librarys_own_area_and_leftovers_of_dead_servers_removed(tmp_path):
    import os

    from moerge.serving.uploads import Uploads

    base = tiny_chat_llama()
    lib = ExpertLibrary.create(tmp_path / "lib", base_model=base)
    area = lib.root / ".moerge-uploads"
    area.mkdir()
    dead = area / "999999999-deadbeef"  # no such process: a server killed midway through an upload
    (dead / "upload-x").mkdir(parents=True)
    alive = area / f"{os.getppid()}-cafecafe"  # a live process's
    alive.mkdir()
    model = MoErgeModel.from_library(base, lib, router="fixed", follow=False)
    uploads = Uploads(model, 2, 10)
    assert uploads.scratch.parent == area and uploads.scratch.name.startswith(f"{os.getpid()}-")
    assert not dead.exists() and alive.exists()
    folder = save_peft_lora(base, tmp_path / "a", seed=1, r=2, target_modules=["q_proj"])
    up = uploads.submit("a", (folder / "adapter_config.json").read_bytes(),
                        (folder / "adapter_model.safetensors").read_bytes())
    assert up.folder.parent == uploads.scratch
    up.finished.result(timeout=HANG_GUARD)
    assert up.error is None and not up.folder.exists()
    uploads.close()
    assert not uploads.scratch.exists()
    model.close()


@pytest.mark.parametrize("raw", [b"{", b"[]", b"null", b'"text"', b"", b"\xff\xfe{}", b'{"prompt": "\\ud800"}',
                                 b'{"prompt": "a", "max_tokens": Infinity}', b'{"prompt": "a", "max_tokens": 1e400}',
                                 b'{"prompt": "a", "seed": 1180591620717411303424}', b"[" * 100_000])
def test_a_malformed_body_is_a_400_and_the_connection_goes_on(server, raw):
    """Bytes no client should send: a 400 in OpenAI's error shape (never a 500), and the next request on the same
    keep-alive connection is answered."""
    http, *_ = server
    r = http.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert r.json()["error"]["type"] == "invalid_request_error"
    ok = http.post("/v1/completions", json={"model": "moerge", "prompt": "x", "max_tokens": 1})
    assert ok.status_code == 200, ok.text


def test_serve_freezes_what_is_loaded_out_of_the_collector_while_it_serves(server, monkeypatch):
    """A full collection of a loaded model's objects paused every call in flight (~0.2 s on this CPU, every few
    requests): serve() freezes them while uvicorn runs, and unfreezes them when it returns."""
    import gc

    from moerge.serving import app as app_module

    _, _, model, tok, _, _ = server
    seen = {}

    def run(app, **kw):
        seen["frozen"] = gc.get_freeze_count()
        seen["app"] = app

    monkeypatch.setattr(app_module.uvicorn, "run", run)
    app_module.serve(model, tok, port=1)
    assert seen["frozen"] > 1000 and seen["app"] is not None
    assert gc.get_freeze_count() == 0
