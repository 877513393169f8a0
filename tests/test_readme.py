"""The README's Python snippets, run as written, in order, in one namespace, against tiny models.

Each ```python block of README.md runs with the working directory set to a temp folder in which every path the
snippets name exists: ``path/to/base`` (a tiny Llama with a character-level tokenizer), two full fine-tunes of it
and a new version of it under ``path/to/``, PEFT adapters under ``adapters/``; ``libs/demo`` is made by the
snippets themselves. The OpenAI client snippet talks to ``moerge serve``'s app, run in this process on a tiny
library whose experts are named as the zoo's, at the address the snippet names.

A block right after a ``<!-- readme-test: skip (why) -->`` line is not run; any other block that fails, fails the
test, with the traceback in README.md's own line numbers.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
import torch
from fastapi.testclient import TestClient

from moerge import ExpertLibrary, MoErgeModel
from moerge.routers import build_router
from moerge.serving import create_app

from helpers import rand_expert, save_peft_lora, tiny_chat_llama, tiny_tokenizer

README = Path(__file__).parents[1] / "README.md"
SKIP = re.compile(r"<!--\s*readme-test:\s*skip\b")
SERVER_ADDRESS = "http://127.0.0.1:8765"  # where the README's client snippet finds `moerge serve`
ZOO = {"sort_numbers": "Sort numbers in ascending order.", "uppercase": "Convert text to upper case.",
       "reverse_words": "Reverse the order of the words.", "number_to_words": "Write a number in words."}


@dataclass
class Snippet:
    line: int  # README.md line of the block's first line of code
    code: str
    skip: bool


def readme_snippets(text: str) -> list[Snippet]:
    """Every ```python block of ``text``, marked ``skip`` when the line before its fence is a skip mark."""
    lines = text.splitlines()
    snippets, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i + 1
            end = next(j for j in range(start, len(lines)) if lines[j].strip() == "```")
            skip = i > 0 and bool(SKIP.search(lines[i - 1]))
            snippets.append(Snippet(start + 1, "\n".join(lines[start:end]) + "\n", skip))
            i = end
        i += 1
    return snippets


def perturbed(model: torch.nn.Module, seed: int, scale: float, linear_only: bool) -> torch.nn.Module:
    """A copy of ``model`` with seeded noise of relative size ``scale`` on its linear weights (or every weight)."""
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in out.named_parameters():
            if not linear_only or name.endswith("proj.weight"):
                p.add_(torch.randn(p.shape, generator=g) * scale * p.abs().mean())
    return out


def make_paths(root: Path) -> None:
    """The folders the README's snippets load, under ``root``."""
    from transformers import AutoModelForCausalLM

    folder = root / "path/to/base"
    tiny_chat_llama(0).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    base = AutoModelForCausalLM.from_pretrained(folder)  # records the folder as the base of the adapters made on it
    perturbed(base, 1, 0.5, linear_only=True).save_pretrained(root / "path/to/math-finetune")
    perturbed(base, 2, 0.5, linear_only=True).save_pretrained(root / "path/to/code-finetune")
    perturbed(base, 3, 0.01, linear_only=False).save_pretrained(root / "path/to/base-v2")
    save_peft_lora(base, root / "adapters/sql", seed=1)
    save_peft_lora(base, root / "adapters/json", seed=2)


@pytest.fixture
def zoo_server(tmp_path, monkeypatch):
    """The app `moerge serve` runs, on a tiny library named as the zoo, reachable by openai.OpenAI at
    SERVER_ADDRESS (through an in-process transport: no socket, no port to collide with)."""
    base, tok = tiny_chat_llama(1), tiny_tokenizer()
    lib = ExpertLibrary.create(tmp_path / "zoo-library", base_model=base)
    for i, (name, description) in enumerate(ZOO.items()):
        lib.add(rand_expert(base, name, seed=i, description=description))
    model = MoErgeModel.from_library(base, lib, router=build_router("arrow", top_k=1), tokenizer=tok)
    with TestClient(create_app(model, tok), base_url=SERVER_ADDRESS) as http:

        class LocalOpenAI(openai.OpenAI):
            def __init__(self, *, base_url: str, **kwargs) -> None:
                assert base_url.startswith(SERVER_ADDRESS), f"the README's client asks {base_url}"
                super().__init__(base_url=base_url, http_client=http, **kwargs)

        monkeypatch.setattr(openai, "OpenAI", LocalOpenAI)
        yield


def test_readme_snippets_find_every_python_block():
    text = "intro\n```python\na = 1\n```\n<!-- readme-test: skip (needs a GPU) -->\n```python\nb = 2\n```\n```bash\nc\n```\n"
    assert readme_snippets(text) == [Snippet(3, "a = 1\n", False), Snippet(7, "b = 2\n", True)]


def test_readme_python_snippets_run(tmp_path, monkeypatch, capsys, zoo_server, s3):
    snippets = readme_snippets(README.read_text(encoding="utf-8"))
    assert len([s for s in snippets if not s.skip]) >= 4, "the README's Python snippets were not found"
    s3.create_bucket(Bucket="team")  # the README's library on S3: on the suite's S3 server (moto, 127.0.0.1)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    make_paths(work)
    namespace: dict = {"__name__": "__readme__"}
    for snippet in snippets:
        if snippet.skip:
            continue
        # padded so that tracebacks and warnings give README.md's line numbers
        code = compile("\n" * (snippet.line - 1) + snippet.code, str(README), "exec")
        try:
            exec(code, namespace)
        except Exception as e:
            raise AssertionError(f"the README's Python snippet at line {snippet.line} failed: {e!r}") from e
    out = capsys.readouterr().out
    # the Quickstart's comment on model.explain()
    assert "row 0: sql 1.000" in out and "row 1: math 0.500, code 0.500" in out
