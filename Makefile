# Two entry points: `make demo` (set up, then run the micro phase end to end)
# and `make test` (set up, start the single-node SLURM test cluster, run pytest).
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch by default; on a GPU cluster use e.g. TORCH="torch==2.13.0"
# from an index with CUDA builds, or any torch >= 2.9 (torch.optim.Muon).
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
WORKDIR ?= .

.PHONY: setup demo test test-fast cluster-up cluster-down clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV) || { echo "python3 -m venv failed: install python3-venv (apt-get install -y python3-venv)"; exit 1; }
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

demo: setup
	$(PY) -m pipeline manifest --phase micro --workdir $(WORKDIR)
	$(PY) -m pipeline submit --phase micro --workdir $(WORKDIR) --wait --cells-per-task 3
	$(PY) -m pipeline collect --phase micro --workdir $(WORKDIR)
	$(PY) -m pipeline analyze --phase micro --workdir $(WORKDIR)
	$(PY) -m pipeline report --phase micro --workdir $(WORKDIR)

cluster-up:
	bash tests/slurm/cluster.sh up

cluster-down:
	bash tests/slurm/cluster.sh down

test: setup cluster-up
	$(PY) -m pytest -q -ra

test-fast: setup
	$(PY) -m pytest -q -ra -m "not slurm and not slow"

clean:
	rm -rf results logs report checkpoints .cache manifests/micro.csv
