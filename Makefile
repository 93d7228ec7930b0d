PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU: 8 fake devices so that mesh tests run on one host.
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8
export JAX_PLATFORMS ?= cpu

.PHONY: venv lint-imports test test-fast test-faults test-lmms demo needle clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

# The layers (core -> serving -> CLIs, no cycles): pyproject.toml's [tool.importlinter] contracts.
lint-imports: venv
	$(BIN)/lint-imports --no-logo

# Two pytest workers (pytest-xdist; the machines have 2 cores), longest files first
# (tests/conftest.py's FILE_SECONDS), handed out in runs of consecutive tests (`--dist load`:
# most files stay on one worker, so module fixtures are mostly built once). A test whose worker
# died under it (XLA:CPU segfaults in compiling now and then, in no one test) runs once more on a
# fresh worker; any other failure fails (`--only-rerun` matches only xdist's crash report).
# `--dist loadfile` cannot rerun a crashed test, and hung after a crash in this stop's runs.
PYTEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist load --reruns 1 --only-rerun "crashed while running"

test: lint-imports
	$(PYTEST) tests

# Everything but the tests marked `slow` (subprocess / multi-step training, dataset generation, TFDS builds).
test-fast: lint-imports
	$(PYTEST) -m "not slow" tests

# Fault injection over several local processes (tests/test_multihost_failures.py): a failed
# save, SIGTERM and SIGKILL on one process. Minutes each, one at a time.
test-faults: lint-imports
	LLAMAVID_FAULT_TESTS=1 $(BIN)/python -m pytest -q tests/test_multihost_failures.py

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

# Needle in a video haystack (configs/needle.py): the synthetic needle clips (once), the tiny
# model trained on 4-64 frames, then asked about 64-4096-frame clips (workdir/needle/eval/needle.png).
# One CPU device: 8 fake ones would only split the small batch into serial shards.
NEEDLE := workdir/needle
needle: venv
	test -f $(NEEDLE)/data/long.json || $(BIN)/python -m llamavid_jax.data.synthetic --out $(NEEDLE)/data \
	  $$($(BIN)/python -c 'from configs import needle; print(needle.SYNTHETIC_ARGS)')
	XLA_FLAGS= $(BIN)/python -m train.train --config configs/needle.py
	XLA_FLAGS= $(BIN)/python -m eval.needle --ckpt $(NEEDLE)/train/inference --out $(NEEDLE)/eval --rope-scaling auto

clean:
	rm -rf $(VENV) $(LMMS_VENV) *.egg-info
