# Set-up is two commands: `make demo` and `make test`. Each creates .venv and installs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SHARED ?= ../shared
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE := 1

# On a GPU machine whose environment already has a CUDA build of torch (with torchvision and
# timm): SYSTEM_TORCH=1 builds .venv on top of that environment's packages instead of
# installing the pinned ones (`make clean` first if .venv exists). TORCH_INDEX=URL takes the
# pinned torch from another wheel index instead (a CUDA build of 2.13.0, say).
SYSTEM_TORCH ?=
TORCH_INDEX ?=

.PHONY: install test test-fast demo bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(if $(SYSTEM_TORCH),--system-site-packages) $(VENV)
ifeq ($(SYSTEM_TORCH),)
	# Pinned, in this order: torch first, so nothing pulls another build (torchvision's CUDA wheel is made importable beside a CPU torch by src/sparseinv/_torchvision_compat.py).
	$(BIN)/pip install --quiet torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install --quiet torchvision==0.28.0
	$(BIN)/pip install --quiet timm==1.0.31
else
	# The environment's own torch, torchvision and timm; nothing of theirs is reinstalled.
	$(BIN)/python -c "from importlib.metadata import version as v; print('sparseinv: using', *(f'{p} {v(p)}' for p in ('torch', 'torchvision', 'timm')))"
endif
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
