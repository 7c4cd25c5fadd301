# The README's two commands: `make demo` and `make test`. Each creates .venv when it is missing.
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.edgeprune-installed
PYTHON ?= python3

.PHONY: demo test lint bench bench-search supernet system clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: an unpinned torch resolves to the CUDA build (gigabytes).
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

# Cross compilers, qemu-user, arm-none-eabi and cmake from Debian, when missing.
system:
	./tools/system-packages.sh

# The product on its defaults: search the shipped supernet for a Cortex-A7 board, 50 ms, and compile the choice.
demo: $(STAMP) system
	$(BIN)/edgeprune build --target cortex-a7 --latency 50ms -o out/demo

test: $(STAMP) system
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -ra

# How the shipped supernet was made (~27 min on 2 cores; same seed, same data split and subnet draws).
supernet: $(STAMP)
	$(BIN)/edgeprune train-supernet --steps 600 --seed 0 -o edgeprune/search/assets/supernet-digit-scenes.pt

lint: $(STAMP)
	$(BIN)/ruff check edgeprune tests bench
	$(BIN)/lint-imports

bench: $(STAMP)
	$(BIN)/python bench/dense.py

bench-search: $(STAMP) system
	$(BIN)/python bench/search.py

clean:
	rm -rf out .pytest_cache
