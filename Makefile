# Two commands on a fresh machine: `make demo` and `make test`. Both set up
# first. PYTHON may point at any interpreter (a venv, conda); the setup installs
# into its environment.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
STAMP := .make/setup.stamp

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

# Torch is installed only when none is importable, and then as the pinned CPU
# build that lies on local disk: an unpinned `pip install torch` would pull a
# multi-GB CUDA build onto a CPU machine.
$(STAMP): pyproject.toml setup.py
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[cli,test,triton]"
	@mkdir -p .make && touch $@

demo: setup
	$(PYTHON) -m sse_sam_fast train

test: setup
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest -q

lint: setup
	$(PYTHON) -m ruff check .

bench: setup
	$(PIP) install -q -e ".[bench]"
	$(PYTHON) -m pytest benchmarks -q

clean:
	rm -rf .make build *.egg-info .pytest_cache .ruff_cache
