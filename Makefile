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
	$(BIN)/python -m pytest -q -ra --durations=25  # the slowest, so the suite can be kept well under 30 min

# How the shipped supernet was made: 1500 steps (progressive shrinking, then the sandwich with PSS-Net pools), one
# thread, 50 min of wall time on a 2-core machine shared with other jobs. A training state is written to out/ every
# 5 minutes; an interrupted run continues with the same command plus --resume. The shipped file differs from this
# command's in one way: its first 225 steps ran under an 1800-step schedule (warmup 45 steps instead of 37, learning
# rate within 2%) before the run was resumed as a 1500-step one, still in the full-network phase.
supernet: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/edgeprune train-supernet --steps 1500 --seed 0 \
		-o edgeprune/search/assets/supernet-digit-scenes.pt --checkpoint out/supernet.state

lint: $(STAMP)
	$(BIN)/ruff check edgeprune tests bench
	$(BIN)/lint-imports

bench: $(STAMP)
	$(BIN)/python bench/dense.py

bench-search: $(STAMP) system
	$(BIN)/python bench/search.py

clean:
	rm -rf out .pytest_cache
