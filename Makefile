# Set-up is two commands: `make demo` and `make test`. Each creates .venv and installs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SHARED ?= ../shared
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE := 1

.PHONY: install test test-fast demo bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	# Pinned, in this order: the CPU torch first, so nothing pulls a CUDA build (torchvision's CUDA wheel is made importable by src/sparseinv/_torchvision_compat.py).
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet torchvision==0.28.0
	$(BIN)/pip install --quiet timm==1.0.31
	# ONNX export and its runtime (sparseinv export, evaluate --onnx), pinned as well.
	$(BIN)/pip install --quiet onnx==1.23.2 onnxruntime==1.32.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The inner loop: everything but the end-to-end and multi-process checks (CI runs `make test`).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

demo: $(STAMP)
	$(BIN)/sparseinv demo --shared $(SHARED) --out demo-output

clean:
	rm -rf $(VENV) demo-output
