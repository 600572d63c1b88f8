# Two commands for a newcomer: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
RUN    ?= runs/demo
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-fast bench lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,distributed]'
	touch $(STAMP)

install: $(STAMP)

# extract -> adapt -> eval on the embedded synthetic phantom set (generated on first use, no download)
demo: install
	$(PY) cli.py extract --out features
	rm -rf $(RUN)
	$(PY) cli.py adapt --features features/synthetic-phantoms/effnet-lite0+minilm --loss infonce --head mlp --out $(RUN)
	$(PY) cli.py eval --run $(RUN) --split test --k 1,5,10 --fewshot-seeds 1

test: install
	$(PY) -m pytest -q -ra

test-fast: install
	$(PY) -m pytest -q -ra -m "not slow"

bench: install
	$(PY) benchmarks/extract.py
	$(PY) benchmarks/adapt.py
	$(PY) benchmarks/eval.py

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf features runs reports data/synthetic-phantoms .pytest_cache
