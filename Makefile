# One-command set-up: `make demo` and `make test` create .venv on first use and install labelkit into it.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU machines this project runs on carry these torch wheels locally; a newer torch would be downloaded.
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-all bench clean-venv

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

clean-venv:
	rm -rf $(VENV)
