PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test install install-test clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q -e .

install-test: $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	@# Debian's chromium for the review desk's browser test (Playwright never downloads a browser here)
	command -v chromium >/dev/null || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium) || echo "chromium not installed: the browser test will say why it skips"

demo: install
	$(BIN)/pixelvote demo

test: install-test
	$(BIN)/python -m pytest -q

clean:
	rm -rf pixelvote-demo .pytest_cache
