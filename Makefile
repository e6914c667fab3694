# One-command set-up: `make demo` and `make test` create .venv on first use and install labelkit into it.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU machines this project runs on carry these torch wheels locally; a newer torch would be downloaded.
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-all bench clean-venv gpu-wheels

# Wheels of labelkit's dependencies that a GPU machine's CUDA image may lack (it has torch, timm, pyarrow, ...,
# and no network): bench/gpu.sh installs the ones it finds missing from here. GPU_PY: that machine's Python.
GPU_PY ?= 3.12
GPU_WHEELS := webdataset braceexpand jsonschema jsonschema-specifications referencing rpds-py 'setuptools>=77,<82'

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/labelkit generate

test: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

test-all: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m ''

gpu-wheels: $(BIN)/.installed
	$(BIN)/python -m pip download --quiet --no-deps --only-binary=:all: --python-version $(GPU_PY) --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl $(GPU_WHEELS)

clean-venv:
	rm -rf $(VENV)
