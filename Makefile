# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

export HF_HUB_OFFLINE = 1
export MLFLOW_DISABLE_TELEMETRY = true
export DS_ACCELERATOR ?= cpu
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

DEMO_DIR ?= runs/demo

.PHONY: install demo test test-fast clean

install: $(STAMP)

# torch first and alone: a later `torch` requirement must find it satisfied, never fetch a CUDA build.
$(STAMP): requirements.txt requirements-test.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -r requirements.txt pytest==9.2.0
	$(PIP) install -q --no-deps open-clip-torch==3.3.0
	$(PIP) install -q --no-deps --no-build-isolation -e .
	$(PY) -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(STAMP)

demo: install
	bash launch/demo.sh $(DEMO_DIR)

test: install
	$(PY) -m pytest -q tests

test-fast: install
	$(PY) -m pytest -q -m "not slow" tests

clean:
	rm -rf $(VENV) .cache runs
