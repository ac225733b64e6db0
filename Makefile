# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# They create .venv with the CPU build of torch (a user with a GPU can `pip install torch==2.13.0`
# from the normal index into .venv for the CUDA build), then install swarmtrain into it.
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
BIN := $(VENV)/bin

.PHONY: demo test test-all setup setup-test dist benchmarks clean

$(BIN)/swarmtrain: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.test-deps: $(BIN)/swarmtrain
	$(BIN)/pip install --quiet -e ".[test]"
	@# a real Prometheus for the monitoring tests (Debian package; needs apt-get and root or sudo)
	@bash deploy/install-prometheus.sh || echo "note: Prometheus not installed; the tests that need it will be skipped"
	touch $@

setup: $(BIN)/swarmtrain

setup-test: $(VENV)/.test-deps

demo: setup
	$(BIN)/swarmtrain demo --peers 3

test: setup-test
	$(BIN)/python -m pytest -q --durations=15

test-all: setup-test
	$(BIN)/python -m pytest -q -m "slow or not slow"

# A wheel to install elsewhere (`pip install dist/swarmtrain-*.whl`, e.g. on a volunteer's machine or in
# the systemd unit's venv); it needs no venv of its own.
dist:
	rm -rf dist
	$(PYTHON) -m pip wheel --quiet --no-deps --wheel-dir dist .
	@ls dist/swarmtrain-*.whl

clean:
	rm -rf $(VENV) build dist *.egg-info
