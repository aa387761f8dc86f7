# Two commands on a fresh machine:  make demo  |  make test
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
THREADS ?= 2

.PHONY: venv demo test bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# PyTorch: the pinned CPU wheel, installed only where no torch is importable
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	OMP_NUM_THREADS=$(THREADS) $(BIN)/stableflows train --config configs/demo.toml

test: $(STAMP)
	OMP_NUM_THREADS=$(THREADS) $(BIN)/python -m pytest tests

bench: $(STAMP)
	OMP_NUM_THREADS=$(THREADS) $(BIN)/python -m benchmarks.run $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
