# The two commands (see README):  make run   |   make test
# Each creates .venv on first use with the CPU torch pin (a GPU user installs their own torch
# first, then `pip install -e .`). The CLI is then .venv/bin/powersample-fast (or `make sample ARGS='...'`).
VENV ?= .venv
PY := $(VENV)/bin/python
# make run: one short chat prompt, a 128-token budget, 2 MH steps per block: 20-30 s on a 2-core CPU
PROMPT ?= Tom has 3 apples and buys 5 more. How many apples does he have now?
RUN_ARGS ?= --max-new-tokens 128 --block-size 64 --steps 2 --n 1 --seed 0
EXTRA_ARGS ?=
ARGS ?=

.PHONY: run sample test test-fast bench-cpu bench-methods-cpu clean-venv

# PROMPT reaches the program through the environment, unexpanded ($(value ...)), so quotes and $
# in it arrive as typed; RUN_ARGS / EXTRA_ARGS / ARGS are flags, split by the shell as typed.
run: export POWERSAMPLE_FAST_PROMPT = $(value PROMPT)
run: $(VENV)/.installed
	$(PY) -m powersample_fast.cli sample --model default --prompt "$$POWERSAMPLE_FAST_PROMPT" $(value RUN_ARGS) $(value EXTRA_ARGS) --stats

# any CLI arguments after `powersample-fast sample`, e.g. make sample ARGS='--prompt "What is 7 * 8?" --n 2'
sample: $(VENV)/.installed
	$(PY) -m powersample_fast.cli sample $(value ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

# the fast tier: every test but those marked slow (over ~2 s; tests/laws/ is all slow): under 2 minutes
test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow" tests

bench-cpu: $(VENV)/.installed
	$(PY) benchmarks/run_benchmarks.py --cpu-default --dtypes float32,bfloat16 --chains 1,8 --naive-chains 1,8 \
		--naive-budget 96 --block-size 32 --steps 4 --decode-tokens 32 --repeat 3

bench-methods-cpu: $(VENV)/.installed
	$(PY) benchmarks/bench_methods.py --budget 16 --repeats 3 --threads 1

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $@

clean-venv:
	rm -rf $(VENV)
