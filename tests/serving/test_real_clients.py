"""Clients no one here wrote, against the live server: langchain-openai (chat and completions models: invoke, stream,
batch, stream usage, structured output) and lm-eval's local-completions / local-chat-completions on a small local
task (loglikelihood and generate_until), each checked against the model's own numbers. Offline: the tasks' data is a
local JSON file and lm-eval's tokenizer is the tiny tokenizer saved to disk."""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from moerge.serving import ServerConfig, create_app

from helpers import (
    HANG_GUARD,
    client_for,
    live,
    two_expert_model,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clients")
    model, tok = two_expert_model(tmp)
    tok.save_pretrained(tmp / "tokenizer")
    with live(create_app(model, tok, ServerConfig(batch_window=0.01))) as url, client_for(url) as client:
        yield url, client, model, tok, tmp


def test_langchain_chat_model_invoke_stream_batch_and_usage(served):
    langchain_openai = pytest.importorskip("langchain_openai")
    url, client, *_ = served
    chat = langchain_openai.ChatOpenAI(base_url=f"{url}/v1", api_key="unused", model="moerge", temperature=0,
                                       max_tokens=8, max_retries=0, timeout=HANG_GUARD, stream_usage=True)
    question = "sort: pear fig"
    expected = client.chat.completions.create(model="moerge", messages=[{"role": "user", "content": question}],
                                              max_tokens=8, temperature=0).choices[0].message.content
    assert chat.invoke(question).content == expected
    chunks = list(chat.stream(question))
    assert "".join(c.content for c in chunks) == expected
    total = sum(chunks[1:], chunks[0])
    assert total.usage_metadata["output_tokens"] >= 1 and total.usage_metadata["input_tokens"] > 0
    answers = chat.batch([question, "hello", question])
    assert [a.content for a in answers][::2] == [expected, expected]
    # structured output: response_format with the model's JSON schema, decoded under it (xgrammar)
    from typing import Literal

    from pydantic import BaseModel

    class Answer(BaseModel):
        verdict: Literal["yes", "no"]
        sure: bool

    structured = langchain_openai.ChatOpenAI(base_url=f"{url}/v1", api_key="unused", model="moerge",
                                             temperature=0, max_tokens=40, max_retries=0, timeout=HANG_GUARD)
    answer = structured.with_structured_output(Answer, method="json_schema").invoke(question)
    assert isinstance(answer, Answer) and answer.verdict in ("yes", "no")


def test_langchain_completions_model_batches_in_one_request(served):
    langchain_openai = pytest.importorskip("langchain_openai")
    url, client, *_ = served
    llm = langchain_openai.OpenAI(base_url=f"{url}/v1", api_key="unused", model="moerge", temperature=0,
                                  max_tokens=6, max_retries=0, timeout=HANG_GUARD, batch_size=4)
    prompts = ["abc", "hello there", "zz", "sort: b a", "x"]
    alone = [client.completions.create(model="moerge", prompt=p, max_tokens=6, temperature=0).choices[0].text
             for p in prompts]
    assert llm.batch(prompts) == alone  # LangChain sends lists of prompts to /v1/completions
    assert "".join(llm.stream(prompts[1])) == alone[1]


def _task(tmp, name: str, yaml: str, rows: list[dict]) -> str:
    folder = tmp / "tasks" / name
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{name}.yaml").write_text(yaml.format(name=name, data=data))
    return str(tmp / "tasks")


MC_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
target_delimiter: ""
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""

GEN_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
"""

MC_ROWS = [{"question": "The cat", "choices": [" sat", " flew", " ran"], "answer": 0},
           {"question": "Two plus two is", "choices": [" four", " five"], "answer": 1}]
GEN_ROWS = [{"question": "sort: b a", "answer": "a b"}, {"question": "hello", "answer": "hi"}]


def _reference_loglikelihood(model, tok, context: str, continuation: str) -> tuple[float, bool]:
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    cont = tok(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        lp = torch.log_softmax(model(ids, attention_mask=torch.ones_like(ids), experts={"sort": 1.0}).logits[0]
                               .float(), -1)
    rows = lp[len(ctx) - 1: len(ctx) + len(cont) - 1]
    picked = rows[torch.arange(len(cont)), torch.tensor(cont)]
    return float(picked.sum()), bool((rows.argmax(-1) == torch.tensor(cont)).all())


def test_lm_eval_local_completions_loglikelihood_and_generation(served, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    url, client, model, tok, tmp = served
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    path = _task(tmp, "moerge_mc", MC_YAML, MC_ROWS)
    _task(tmp, "moerge_gen", GEN_YAML, GEN_ROWS)
    out = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=f"model=moerge/sort,base_url={url}/v1/completions,tokenizer_backend=huggingface,"
                   f"tokenizer={tmp / 'tokenizer'},num_concurrent=2,max_retries=1,batch_size=4",
        tasks=["moerge_mc", "moerge_gen"], task_manager=TaskManager(include_path=path), log_samples=True)
    for doc, sample in zip(MC_ROWS, sorted(out["samples"]["moerge_mc"], key=lambda s: s["doc_id"])):
        for choice, (logprob, greedy) in zip(doc["choices"], [r[0] for r in sample["resps"]]):
            ref, ref_greedy = _reference_loglikelihood(model, tok, doc["question"], choice)
            assert logprob == pytest.approx(ref, abs=1e-3) and greedy == ref_greedy
    assert 0.0 <= out["results"]["moerge_mc"]["acc,none"] <= 1.0
    for doc, sample in zip(GEN_ROWS, sorted(out["samples"]["moerge_gen"], key=lambda s: s["doc_id"])):
        expected = client.completions.create(model="moerge/sort", prompt=doc["question"], max_tokens=6,
                                             temperature=0, stop=["\n"]).choices[0].text
        assert sample["resps"][0][0] == expected


def test_lm_eval_local_chat_completions_generation(served, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    url, client, *_ , tmp = served
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    path = _task(tmp, "moerge_chat_gen", GEN_YAML, GEN_ROWS)
    out = lm_eval.simple_evaluate(
        model="local-chat-completions",
        model_args=f"model=moerge,base_url={url}/v1/chat/completions,num_concurrent=2,max_retries=1",
        tasks=["moerge_chat_gen"], task_manager=TaskManager(include_path=path), log_samples=True,
        apply_chat_template=True)
    for doc, sample in zip(GEN_ROWS, sorted(out["samples"]["moerge_chat_gen"], key=lambda s: s["doc_id"])):
        expected = client.chat.completions.create(
            model="moerge", messages=[{"role": "user", "content": doc["question"]}], max_tokens=6, temperature=0,
            stop=["\n"]).choices[0].message.content
        assert sample["resps"][0][0] == expected
    with httpx.Client(base_url=url, timeout=HANG_GUARD) as http:
        assert http.get("/metrics").status_code == 200
