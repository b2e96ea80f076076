# The two commands (see README):  make run   |   make test
# Each creates .venv on first use with the CPU torch pin (a GPU user installs their own torch
# first, then `pip install -e .`).
VENV ?= .venv
PY := $(VENV)/bin/python
PROMPT ?= A train travels 60 km in 45 minutes. What is its average speed in km/h? Think step by step.
RUN_ARGS ?= --max-new-tokens 192 --block-size 64 --steps 4 --n 2 --seed 0
EXTRA_ARGS ?=

.PHONY: run test bench-cpu clean-venv

run: $(VENV)/.installed
	$(PY) -m powersample_fast.cli sample --model default --chat --prompt "$(PROMPT)" $(RUN_ARGS) $(EXTRA_ARGS) --stats

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

bench-cpu: $(VENV)/.installed
	$(PY) benchmarks/run_benchmarks.py --cpu-default --dtypes float32,bfloat16 --chains 1,8 --naive-chains 1,8 \
		--naive-budget 96 --block-size 32 --steps 4 --decode-tokens 32 --repeat 3

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $@

clean-venv:
	rm -rf $(VENV)
