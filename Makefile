PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU: 8 fake devices so that mesh tests run on one host.
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8
export JAX_PLATFORMS ?= cpu

.PHONY: venv test test-fast demo clean

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

demo: venv
	$(BIN)/python -m train.demo --workdir workdir/demo

clean:
	rm -rf $(VENV) *.egg-info
