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
	OMP_NUM_THREADS=$(THREADS) $(BIN)/stableflows train --config configs/demo.toml --overwrite

test: $(STAMP)
	OMP_NUM_THREADS=$(THREADS) $(BIN)/python -m pytest tests

bench: $(STAMP)
	OMP_NUM_THREADS=$(THREADS) $(BIN)/python -m benchmarks.run $(ARGS)

# Fashion-MNIST for the 28x28 tier: Debian's package puts the IDX files in $(FMNIST_DIR)
FMNIST_PKG := dataset-fashion-mnist
FMNIST_DIR := /usr/share/datasets/fashion-mnist
FMNIST_FILES := train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte
.PHONY: data
data:
	@missing=""; for f in $(FMNIST_FILES); do [ -f $(FMNIST_DIR)/$$f.gz ] || [ -f $(FMNIST_DIR)/$$f ] || missing="$$missing $$f"; done; \
	if [ -z "$$missing" ]; then echo "Fashion-MNIST: installed in $(FMNIST_DIR)"; exit 0; fi; \
	if ! command -v apt-get >/dev/null 2>&1; then \
	  echo "make data: no apt-get here. Get the four IDX files ($(FMNIST_FILES), each optionally .gz)"; \
	  echo "  of Fashion-MNIST and put them in a folder DIR, then pass --data-dir DIR or set STABLEFLOWS_FASHION_MNIST_DIR=DIR."; \
	  exit 1; fi; \
	if [ "$$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null 2>&1; then SUDO=sudo; else \
	  echo "make data: installing needs root. Run as root: apt-get install $(FMNIST_PKG)"; exit 1; fi; \
	echo "installing $(FMNIST_PKG) with apt-get ..."; \
	$$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(FMNIST_PKG) >/dev/null \
	  || { echo "make data: apt-get install $(FMNIST_PKG) failed (is it in your apt sources?)"; exit 1; }; \
	for f in $(FMNIST_FILES); do [ -f $(FMNIST_DIR)/$$f.gz ] || [ -f $(FMNIST_DIR)/$$f ] \
	  || { echo "make data: $(FMNIST_PKG) installed but $(FMNIST_DIR) lacks $$f"; exit 1; }; done; \
	echo "Fashion-MNIST: installed in $(FMNIST_DIR)"

clean:
	rm -rf $(VENV) runs .pytest_cache
