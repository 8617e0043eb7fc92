# Two commands on a fresh machine: `make demo` and `make test`. Both set up
# first. PYTHON may point at any interpreter (a venv, conda); the setup installs
# into its environment.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

# One stamp folder per environment: a stamp left by another interpreter says
# nothing about what this one has (after `make` with python3, `make PYTHON=venv/bin/python
# test` must still install ruff and pytest into the venv). sys.prefix tells venvs
# apart even where their python is a symlink to the same binary.
ENV_KEY := $(shell $(PYTHON) -c "import hashlib, sys; print(hashlib.sha256(sys.prefix.encode()).hexdigest()[:12])" 2>/dev/null)
STAMPS := .make/$(or $(ENV_KEY),no-python)
# what the installs read: a change to any of them sets up again
SETUP_FILES := pyproject.toml setup.py Makefile

.PHONY: setup demo test test-long lint bench clean

setup: $(STAMPS)/dev.stamp

# Torch is installed only when none is importable, and then as the pinned CPU
# build that lies on local disk: an unpinned `pip install torch` would pull a
# multi-GB CUDA build onto a CPU machine.
define install_torch
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q "torch==2.13.0"
endef

# the demo needs the training CLI's extra only (scikit-learn, tqdm, matplotlib)
$(STAMPS)/cli.stamp: $(SETUP_FILES)
	$(install_torch)
	$(PIP) install -q -e ".[cli]"
	@mkdir -p $(STAMPS) && touch $@

# the tests also need the test tools and Triton (its interpreter runs the kernels on a CPU)
$(STAMPS)/dev.stamp: $(SETUP_FILES)
	$(install_torch)
	$(PIP) install -q -e ".[cli,test,triton]"
	@mkdir -p $(STAMPS) && touch $@ $(STAMPS)/cli.stamp

demo: $(STAMPS)/cli.stamp
	$(PYTHON) -m sse_sam_fast train

# the tests marked long (torchrun jobs of several processes, about a minute on 2 cores) run in
# test-long, which keeps `make test` within its two minutes
test: setup
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest -q -m "not long"

test-long: setup
	$(PYTHON) -m pytest -q -m long

lint: setup
	$(PYTHON) -m ruff check .

bench: setup
	$(PIP) install -q -e ".[bench]"
	$(PYTHON) -m pytest benchmarks -q

clean:
	rm -rf .make build *.egg-info .pytest_cache .ruff_cache
