# ov-sd-trainer: every target installs what it needs first (idempotent, quick when done).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Nothing downloads at run time: tests, demo and regression run offline.
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 DO_NOT_TRACK=1
DEMO_DIR ?= outputs/demo
# Two pytest workers (one per core of the 2-core reference machine; each test runs one intra-op thread); the tests
# sharing a costly fixture run on one worker (tests/conftest.py's XDIST_GROUPS). WORKERS=0 runs in one process.
WORKERS ?= 2
XDIST := -n $(WORKERS) --dist loadgroup

.PHONY: install test test-slow ci-test test-install quality format demo regression clean

install: $(STAMP)

$(STAMP): setup.cfg setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(OFFLINE) $(PY) -m pytest -q -rs $(XDIST) --durations=15

test-slow: $(STAMP)
	$(OFFLINE) $(PY) -m pytest -q -rs $(XDIST) -m slow

# CI: the default and the slow tests in ONE session, so the session fixtures (tiny pipeline, trained run, FP32
# export) are built once for both.
ci-test: $(STAMP)
	$(OFFLINE) $(PY) -m pytest -q -rs $(XDIST) -m "slow or not slow" --durations=30

# The wheel in a fresh virtualenv, run outside the checkout (marked slow: ~3 min; CI runs it within ci-test).
test-install: $(STAMP)
	$(OFFLINE) $(PY) -m pytest -q -rs -m slow tests/test_install.py

quality: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

demo: $(STAMP)
	$(OFFLINE) $(VENV)/bin/ov-sd demo --output $(DEMO_DIR)

# QAT (short) + export + optimum-intel's PTQ peers + eval of the reference model, checked against
# ov_sd_trainer/eval/regression_thresholds.json; exits non-zero on a failed stage or check.
regression: $(STAMP)
	$(OFFLINE) OMP_NUM_THREADS=1 $(VENV)/bin/ov-sd regression --output outputs/regression

clean:
	rm -rf outputs build *.egg-info .pytest_cache .ruff_cache
