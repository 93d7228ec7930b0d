PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU: 8 fake devices so that mesh tests run on one host.
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8
export JAX_PLATFORMS ?= cpu

.PHONY: venv test test-fast test-lmms demo clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

test: venv
	$(BIN)/python -m pytest -q tests

# Everything but the tests marked `slow` (subprocess / multi-step training, dataset generation, TFDS builds).
test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow" tests

# lmms-eval (optional, its own venv): the `lmms` extra, then lmms-eval itself with --no-deps
# (its declared dependencies would replace torch; see pyproject.toml), then its test.
LMMS_VENV ?= .venv-lmms
LMMS_EVAL ?= lmms-eval==0.7.3

$(LMMS_VENV)/.installed: pyproject.toml
	$(PY) -m venv $(LMMS_VENV)
	$(LMMS_VENV)/bin/pip install -q --upgrade pip
	$(LMMS_VENV)/bin/pip install -q -e '.[test,lmms]'
	$(LMMS_VENV)/bin/pip install -q --no-deps '$(LMMS_EVAL)'
	touch $@

test-lmms: $(LMMS_VENV)/.installed
	$(LMMS_VENV)/bin/python -m pytest -q tests/test_eval_lmms.py

demo: venv
	$(BIN)/python -m train.demo --workdir workdir/demo

clean:
	rm -rf $(VENV) $(LMMS_VENV) *.egg-info
