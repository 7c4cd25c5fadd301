# The README's two commands: `make demo` and `make test`. Each creates .venv when it is missing.
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.edgeprune-installed
PYTHON ?= python3

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: an unpinned torch resolves to the CUDA build (gigabytes).
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/edgeprune targets
	$(BIN)/edgeprune compile builtin:mobilenetv2-0.5-128 --target host -o out/demo
	$(BIN)/edgeprune measure out/demo --runs 200

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra

lint: $(STAMP)
	$(BIN)/ruff check edgeprune tests bench

bench: $(STAMP)
	$(BIN)/python bench/dense.py

clean:
	rm -rf out .pytest_cache
