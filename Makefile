# One-command entry points for a fresh machine (only Python 3.11 needed).
# `make demo` runs the main job, `make test` runs the test suite; each sets up .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.curvlab-installed
CONSTRAINTS := .constraints.txt

.PHONY: setup demo test check clean

setup: $(STAMP)

# torch 2.13.0 first (a local CPU build); every later pip call is constrained so torch is never replaced.
# backpack-for-pytorch declares torchvision, which has no working CPU build here: install it --no-deps
# after its real dependencies (einops, unfoldNd). See ../shared/SETUP.md.
$(STAMP): pyproject.toml plugins/curvlab-ekfac/pyproject.toml plugins/curvlab-lars/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	echo "torch==2.13.0" > $(CONSTRAINTS)
	$(BIN)/pip install -q -c $(CONSTRAINTS) numpy scipy matplotlib tqdm pytest scikit-learn einops unfoldNd mnist1d requests submitit optuna
	$(BIN)/pip install -q --no-deps backpack-for-pytorch
	$(BIN)/pip install -q -c $(CONSTRAINTS) --no-deps --no-build-isolation -e .
	$(BIN)/pip install -q -c $(CONSTRAINTS) --no-deps --no-build-isolation -e plugins/curvlab-ekfac
	$(BIN)/pip install -q -c $(CONSTRAINTS) --no-deps --no-build-isolation -e plugins/curvlab-lars
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/curvlab demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

check: $(STAMP)
	$(BIN)/curvlab check

clean:
	rm -rf $(VENV) $(CONSTRAINTS) demo_output

# Optional peer libraries for the benchmark comparison (curvlab/bench/peers.py); never needed by the core.
# --no-deps: curvlinops declares torchvision (see ../shared/SETUP.md); their real import-time deps are listed.
.PHONY: peers
peers: $(STAMP)
	$(BIN)/pip install -q -c $(CONSTRAINTS) --no-deps asdfghjkl curvlinops-for-pytorch pytorch-optimizer singd
	$(BIN)/pip install -q -c $(CONSTRAINTS) --no-deps einconv linear_operator opt-einsum
