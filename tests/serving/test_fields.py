"""The OpenAI fields clients rely on, and the scheduling under them, on a live server: log-probabilities equal to the
model's, echo for scoring, prompt lists and token ids, n, seeds that hold under batching and streaming, stop strings
never leaked, penalties and logit bias, stream usage, rows that finish on their own, cancelled work, the body limit
and tokenization off the event loop. The tiny tokenizer has one token per character."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from moerge.runtime.sampling import Sampling
from moerge.serving import ServerConfig, create_app
from moerge.serving.engine import Cancelled, Job

from helpers import (
    HANG_GUARD,
    client_for,
    live,
    tiny_tokenizer,
    two_expert_model,
)

openai = pytest.importorskip("openai")

EOS = 2  # the tiny tokenizer's </s>
NO_END = {"0": -100, str(EOS): -100, "5": -100}  # logit_bias keeping a completion going: no <pad>, </s>, <|im_end|>


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fields")
    model, tok = two_expert_model(tmp)
    app = create_app(model, tok, ServerConfig(batch_window=0.0, max_body_bytes=20_000))
    with live(app) as url, httpx.Client(base_url=url, timeout=HANG_GUARD) as http, client_for(url) as client:
        yield http, client, model, tok, app.state.engine


def _logprobs(model, ids: list[int], mix=None) -> torch.Tensor:
    """``(T, V)`` log-probabilities of the next token after each position of ``ids`` (the reference)."""
    t = torch.tensor([ids])
    with torch.no_grad():
        return torch.log_softmax(model(t, attention_mask=torch.ones_like(t), experts=mix).logits[0].float(), -1)


def test_chat_logprobs_are_the_models(served):
    _, client, model, tok, _ = served
    messages = [{"role": "user", "content": "sort: b a"}]
    r = client.chat.completions.create(model="moerge/sort", messages=messages, max_tokens=6, temperature=0,
                                       logprobs=True, top_logprobs=3, logit_bias=NO_END)
    content = r.choices[0].logprobs.content
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    gen = [tok.convert_tokens_to_ids(c.token) for c in content]
    ref = _logprobs(model, ids + gen, {"sort": 1.0})[len(ids) - 1:]
    assert "".join(c.token for c in content) == r.choices[0].message.content and len(content) == 6
    for i, c in enumerate(content):
        assert c.logprob == pytest.approx(float(ref[i, gen[i]]), abs=1e-4)
        assert [tok.convert_tokens_to_ids(t.token) for t in c.top_logprobs] == ref[i].topk(3).indices.tolist()
        assert c.bytes == list(c.token.encode())
    assert r.usage.completion_tokens == 6


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_echo_scores_the_prompt_as_lm_eval_asks(served, max_tokens):
    http, _, model, tok, _ = served
    # lm-eval's local-completions loglikelihood: token ids, echo, logprobs=1, max_tokens 1 (it drops the last)
    ids, other = (tok(t, add_special_tokens=False)["input_ids"] for t in ("the cat sat", "on it"))
    r = http.post("/v1/completions", json={"model": "moerge/french", "prompt": [ids, other], "echo": True,
                                           "logprobs": 1, "max_tokens": max_tokens, "temperature": 0}).json()
    ref = _logprobs(model, ids, {"french": 1.0})
    first, second = r["choices"]
    lp = first["logprobs"]
    assert first["text"].startswith("the cat sat") and len(lp["tokens"]) == len(ids) + max_tokens
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    for pos in range(1, len(ids)):
        assert lp["token_logprobs"][pos] == pytest.approx(float(ref[pos - 1, ids[pos]]), abs=1e-4)
        assert len(lp["top_logprobs"][pos]) == 1
    assert lp["text_offset"][:3] == [0, 1, 2]
    assert second["index"] == 1 and second["text"].startswith("on it")
    assert r["usage"]["prompt_tokens"] == len(ids) + 5 and r["usage"]["completion_tokens"] == 2 * max_tokens


def test_prompt_lists_token_ids_and_n_give_each_prompts_choices(served):
    http, client, _, tok, _ = served
    prompts = ["abc", "hello", "zz top"]
    alone = [client.completions.create(model="moerge", prompt=p, max_tokens=5, temperature=0).choices[0].text
             for p in prompts]
    r = client.completions.create(model="moerge", prompt=prompts, max_tokens=5, temperature=0, n=2)
    assert [c.index for c in r.choices] == list(range(6))
    assert [c.text for c in r.choices] == [t for t in alone for _ in range(2)]
    ids = tok("hello", add_special_tokens=False)["input_ids"]
    assert client.completions.create(model="moerge", prompt=ids, max_tokens=5, temperature=0).choices[0].text \
        == alone[1]
    sampled = client.completions.create(model="moerge", prompt="abc", max_tokens=12, temperature=1.0, n=3, seed=5,
                                        logit_bias=NO_END)
    assert len({c.text for c in sampled.choices}) > 1  # the samples draw on their own
    r = http.post("/v1/completions", json={"model": "moerge", "prompt": [ids, [500]], "max_tokens": 2})
    assert r.status_code == 400 and "prompt[1] holds token id 500" in r.json()["error"]["message"]


def test_a_seed_gives_the_same_text_alone_in_a_batch_and_streamed(served):
    _, client, _, _, _ = served
    ask = dict(model="moerge", prompt="once upon", max_tokens=16, temperature=1.0, seed=1234, logit_bias=NO_END)
    alone = client.completions.create(**ask).choices[0].text

    def other(i):
        if i == 0:  # a concurrent stream
            return "".join(c.choices[0].text for c in client.completions.create(
                model="moerge", prompt="a stream", max_tokens=20, temperature=1.0, stream=True) if c.choices)
        return client.completions.create(model="moerge", prompt=f"noise {i}", max_tokens=3 + 5 * i,
                                         temperature=1.0).choices[0].text

    for _ in range(2):
        with ThreadPoolExecutor(5) as pool:
            others = [pool.submit(other, i) for i in range(4)]
            seeded = pool.submit(lambda: client.completions.create(**ask).choices[0].text)
            assert seeded.result() == alone
            [f.result() for f in others]
    streamed = "".join(c.choices[0].text for c in client.completions.create(**ask, stream=True) if c.choices)
    assert streamed == alone
    assert client.completions.create(**{**ask, "seed": 99}).choices[0].text != alone


def test_a_stop_string_is_never_streamed_and_usage_counts_to_it(served):
    _, client, _, _, _ = served
    ask = dict(model="moerge", prompt="abc", max_tokens=20, temperature=0, logit_bias=NO_END)
    full = client.completions.create(**ask).choices[0].text
    assert len(full) == 20
    stop = full[6:9]  # three characters in the middle: the stream must not send their first two
    cut = full.index(stop)
    whole = client.completions.create(**ask, stop=[stop])
    pieces, usage, finish = [], None, None
    for chunk in client.completions.create(**ask, stop=[stop], stream=True, stream_options={"include_usage": True}):
        if chunk.choices:
            pieces.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
            assert chunk.usage is None
        else:  # the last chunk: the usage, no choices
            usage = chunk.usage
    assert whole.choices[0].text == "".join(pieces) == full[:cut] and finish == "stop"
    # the tokens run are counted up to the one that completed the stop string (one token per character here)
    assert whole.usage.completion_tokens == usage.completion_tokens == cut + len(stop)
    assert usage.prompt_tokens == whole.usage.prompt_tokens == 3


def test_logit_bias_and_penalties_change_the_choice(served):
    _, client, _, tok, _ = served
    x = tok.convert_tokens_to_ids("x")
    r = client.completions.create(model="moerge", prompt="abc", max_tokens=5, temperature=0, logit_bias={str(x): 100})
    assert r.choices[0].text == "xxxxx"
    # a frequency penalty larger than any logit gap makes a repeated greedy token give way
    plain = client.completions.create(model="moerge", prompt="abc", max_tokens=12, temperature=0,
                                      logit_bias=NO_END).choices[0].text
    assert len(set(plain)) < len(plain)  # the tiny model repeats itself
    spread = client.completions.create(model="moerge", prompt="abc", max_tokens=12, temperature=0,
                                       logit_bias=NO_END, frequency_penalty=2.0, presence_penalty=2.0)
    assert spread.choices[0].text != plain and len(set(spread.choices[0].text)) > len(set(plain))


def _hold_steps(engine):
    """Make the engine run a decode step only when the test releases one; returns (release, restore)."""
    gate, real = threading.Semaphore(0), engine.batch.step

    def step():
        gate.acquire()
        return real()

    engine.batch.step = step
    return gate, lambda: setattr(engine.batch, "step", real)


def _wait_for(condition, what: str):
    deadline = time.monotonic() + HANG_GUARD
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.01)


def test_short_requests_finish_while_a_long_one_runs(served):
    _, _, _, _, engine = served
    long = Job([10, 11, 12], 100, Sampling(temperature=0, logit_bias={0: -100, EOS: -100, 5: -100}), [])
    engine.submit(long)
    _wait_for(lambda: len(engine.batch) == 1, "the long request runs")
    shorts = [Job([20 + i, 21], 2, Sampling(temperature=0, logit_bias={0: -100, EOS: -100, 5: -100}), []) for i in range(3)]
    for job in shorts:
        engine.submit(job)
    results = [job.future.result(timeout=HANG_GUARD) for job in shorts]
    assert not long.future.done()  # the short ones joined the running batch and left it when done
    assert all(r["choices"][0]["completion_tokens"] == 2 for r in results)
    assert max(r["batch_size"] for r in results) >= 2
    assert long.future.result(timeout=HANG_GUARD)["choices"][0]["completion_tokens"] == 100


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_leaves_has_its_work_cancelled(served, stream):
    http, _, _, _, engine = served
    gate, restore = _hold_steps(engine)
    try:
        body = {"model": "moerge", "prompt": "abc", "max_tokens": 100, "logit_bias": NO_END, "stream": stream}
        url = str(http.base_url.join("/v1/completions"))

        first, leave = threading.Event(), threading.Event()

        def ask():
            if not stream:  # a client that gives up on a whole completion: it closes its connection unanswered
                data = json.dumps(body).encode()
                with socket.create_connection((http.base_url.host, http.base_url.port), timeout=HANG_GUARD) as s:
                    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                              b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
                    leave.wait(HANG_GUARD)
                return "gave up"
            with httpx.Client(timeout=HANG_GUARD) as c, c.stream("POST", url, json=body) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        first.set()
                        leave.wait(HANG_GUARD)
                        return "first piece"  # leave after the first piece: the connection closes
            return "ended"

        with ThreadPoolExecutor(1) as pool:
            asked = pool.submit(ask)
            # the row is in the batch (its steps are held) until the client leaves
            _wait_for(lambda: len(engine.batch) == 1 or first.is_set(), "the request runs")
            job = engine.batch.rows[0].prompt.owner
            leave.set()
            assert asked.result(timeout=HANG_GUARD) == ("first piece" if stream else "gave up")
        _wait_for(job.cancelled.is_set, "the server sees the client leave")
        steps = len(engine.batches)
        gate.release(1000)
        _wait_for(lambda: len(engine.batch) == 0, "the cancelled row leaves")
        assert len(engine.batches) - steps <= 1 and isinstance(job.future.exception(), Cancelled)
    finally:
        restore()
        gate.release(1000)


def test_the_body_limit_and_tokenizing_off_the_event_loop(served):
    http, client, _, _, engine = served
    r = http.post("/v1/completions", json={"model": "moerge", "prompt": "a" * 30_000, "max_tokens": 1})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: the limit holds as the body arrives
        yield b'{"model": "moerge", "prompt": "'
        for _ in range(30):
            yield b"a" * 1000
        yield b'"}'

    r = http.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    # while one request's prompt is being tokenized, the server answers others
    entered, release, real = threading.Event(), threading.Event(), engine.tokenize

    def slow(text):
        if text == "slow prompt":
            entered.set()
            release.wait(HANG_GUARD)
        return real(text)

    engine.tokenize = slow
    try:
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(lambda: client.completions.create(model="moerge", prompt="slow prompt",
                                                                    max_tokens=2, temperature=0))
            assert entered.wait(HANG_GUARD)
            assert [m.id for m in client.models.list().data][0] == "moerge"  # answered meanwhile
            assert client.completions.create(model="moerge", prompt="quick", max_tokens=1).choices
            release.set()
            assert pending.result(timeout=HANG_GUARD).choices[0].text is not None
    finally:
        engine.tokenize = real
        release.set()


def test_stream_usage_and_chunks_follow_openais_shape(served):
    http, client, _, _, _ = served
    chunks = list(client.chat.completions.create(model="moerge", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=4, temperature=0, stream=True, n=2, logprobs=True,
                                                 stream_options={"include_usage": True}))
    *pieces, last = chunks
    assert last.choices == [] and last.usage.completion_tokens >= 2
    firsts = {}
    for c in pieces:
        (choice,) = c.choices
        firsts.setdefault(choice.index, choice.delta.role)
        if choice.delta.content:
            assert choice.logprobs.content and "".join(t.token for t in choice.logprobs.content) == \
                choice.delta.content
    assert firsts == {0: "assistant", 1: "assistant"}
    raw = http.post("/v1/completions", json={"model": "moerge", "prompt": "ab", "max_tokens": 2, "stream": True})
    events = [line[6:] for line in raw.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and all("usage" not in json.loads(e) for e in events[:-1])


def test_metrics_in_prometheus_format(served):
    from prometheus_client.parser import text_string_to_metric_families

    http, client, _, _, _ = served
    before = _samples(http, text_string_to_metric_families)
    r = client.completions.create(model="moerge/sort", prompt="abc", max_tokens=3, temperature=0, logit_bias=NO_END)
    assert http.post("/v1/completions", json={"prompt": "a", "max_tokens": "x"}).status_code == 400
    after = _samples(http, text_string_to_metric_families)

    def grew(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert grew("moerge_requests_total", route="/v1/completions", status="200") == 1
    assert grew("moerge_requests_total", route="/v1/completions", status="400") == 1
    assert grew("moerge_completion_tokens_total") == r.usage.completion_tokens == 3
    assert grew("moerge_prompt_tokens_total") == 3
    assert grew("moerge_expert_requests_total", expert="sort") == 1
    assert grew("moerge_batch_rows_count") == 2  # the first token comes from the prefill, then two steps
    assert grew("moerge_time_to_first_token_seconds_count") == 1
    assert grew("moerge_request_seconds_count", route="/v1/completions") == 2
    assert after[("moerge_expert_cache_experts", ())] == 2


def _samples(http, parse) -> dict:
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in parse(r.text) for s in f.samples}


def test_text_tail_never_sends_a_stop_string_or_text_it_takes_back():
    from moerge.runtime.sampling import Pick
    from moerge.serving.engine import TextTail

    tok = tiny_tokenizer()
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731 - as Engine.decode gives it
    ids = tok("say: the END is near", add_special_tokens=False)["input_ids"]
    tail = TextTail(decode, ["END", "near"], {EOS})
    sent = "".join(tail.add(Pick(t, None, None)) for t in ids)
    assert sent == tail.text == "say: the " and tail.finish == "stop"
    assert tail.counted == len("say: the END")  # counted to the token that completed the stop string
    # a partial match that turns out not to be a stop string is sent once it is known
    tail = TextTail(decode, ["ENDS"], {EOS})
    pieces = [tail.add(Pick(t, None, None)) for t in tok("an END.", add_special_tokens=False)["input_ids"]]
    assert pieces[-2:] == ["", "END."] and "".join(pieces) == "an END." and tail.finish is None
    assert tail.add(Pick(EOS, None, None)) == "" and tail.finish == "stop" and tail.counted == len("an END.")


def test_a_failure_outside_a_row_fails_its_requests_and_the_server_goes_on(served):
    _, client, _, _, engine = served
    real = type(engine.batch).join

    def broken(self, prefilled):
        raise RuntimeError("no room to pad the cache")

    type(engine.batch).join = broken
    try:
        with pytest.raises(openai.InternalServerError, match="no room to pad the cache"):
            client.completions.create(model="moerge", prompt="abc", max_tokens=3)
    finally:
        type(engine.batch).join = real
    assert client.completions.create(model="moerge", prompt="abc", max_tokens=3, temperature=0).choices[0].text
    assert engine._worker.is_alive() and not engine._jobs and not engine._choices


def test_response_format_constrains_the_text_to_the_schema(served):
    http, client, _, _, _ = served
    schema = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]},
                                               "n": {"type": "integer"}},
              "required": ["answer", "n"], "additionalProperties": False}
    for seed in range(3):  # a random tiny model, sampled: only the constraint makes this JSON
        r = client.chat.completions.create(
            model="moerge", messages=[{"role": "user", "content": "yes or no?"}], max_tokens=40, temperature=1.0,
            seed=seed, response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}})
        if r.choices[0].finish_reason == "stop":
            value = json.loads(r.choices[0].message.content)
            assert set(value) == {"answer", "n"} and value["answer"] in ("yes", "no") and isinstance(value["n"], int)
        else:  # cut by max_tokens inside a long number, which the schema does not bound
            assert re.fullmatch(r'\{"answer": "(yes|no)", "n": -?[0-9]*', r.choices[0].message.content)
    r = client.completions.create(model="moerge", prompt="{", max_tokens=30, temperature=0,
                                  extra_body={"response_format": {"type": "json_object"}})
    text = r.choices[0].text
    assert text.startswith("{") and (r.choices[0].finish_reason == "length" or isinstance(json.loads(text), dict))
    bad = http.post("/v1/completions", json={"prompt": "a", "response_format": {
        "type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object", "properties": 5}}}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "response_format.json_schema.schema"
