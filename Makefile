# The two commands of the README:
#   make repro   set up .venv, install pinned packages, convert the bundled model, run `dvc repro`
#   make test    set up .venv, run the default test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.locedit-installed
# `dvc plots show`'s page with vega inline (.dvc/config: plots.html_template), so it renders offline
PLOTS_PAGE := .dvc/plots/offline.html

.PHONY: setup repro beyond scale scale-costs scale-docs test test-all lint bench zoo gpu-check gpu-check-dry clean-outputs

setup: $(STAMP) $(PLOTS_PAGE)

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet --no-deps -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

$(PLOTS_PAGE): $(STAMP)
	$(BIN)/python -m locedit.analysis.plots_page $@

repro: setup
	@# .dvc/ is in git; a copy without .git runs `dvc repro` without SCM (no `dvc exp` there)
	git rev-parse --git-dir >/dev/null 2>&1 || $(BIN)/dvc config --local core.no_scm true
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro
	@echo "Commit dvc.lock to make this run the baseline of dvc exp show / dvc metrics diff: git add dvc.lock && git commit -m 'Baseline run'"
	@echo "Reports in reports/ (dvc exp show, dvc plots show); MLflow UI: $(BIN)/mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db, then http://127.0.0.1:5000/#/experiments/1/runs?viewStateShareKey=headline&workflowType=machine_learning"

# Issue 21's additions on the default facts (conf/experiment/beyond.yaml), into outputs/beyond
# and reports/beyond so that the default pipeline's results stay as they are.
BEYOND := outputs/beyond/params.yaml
beyond: setup
	mkdir -p outputs/beyond
	$(BIN)/locedit compose experiment=beyond paths.outputs=outputs/beyond \
		paths.reports=reports/beyond --output $(BEYOND)
	export LOCEDIT_PIPELINE_ID=beyond-$$(date +%Y%m%dT%H%M%S); \
	for stage in prepare filter stats trace edit analyze; do \
		$(BIN)/locedit run $$stage --params $(BEYOND) || exit 1; done

# Issue 29's scale run (conf/experiment/scale.yaml): FACTS known facts (default 100) into
# outputs/scale-FACTS and reports/scale-FACTS. Each stage records its wall time and peak memory
# in outputs/scale-FACTS/costs.json; a rerun resumes where a killed run stopped.
# REUSE=outputs/scale-100 starts a smaller run from a larger one's trace cache and edit rows:
# its facts are the first of the larger run's and it takes the larger run's calibrated noise
# sigma (trace.noise_sigma; calibrated on its own facts, tracing and the edits' noised probes
# would differ), so every cached result, keyed by its inputs, params and code, applies as it is.
FACTS ?= 100
SCALE := outputs/scale-$(FACTS)
scale: setup
	mkdir -p $(SCALE)
ifdef REUSE
	mkdir -p $(SCALE)/cache $(SCALE)/edit/rows
	cp -rn $(REUSE)/cache/trace $(SCALE)/cache/
	cp -n $(REUSE)/edit/rows/*.jsonl $(SCALE)/edit/rows/
endif
	$(BIN)/locedit compose experiment=scale data.max_facts=$(FACTS) paths.outputs=$(SCALE) \
		paths.reports=reports/scale-$(FACTS) \
		$(if $(REUSE),trace.noise_sigma=$$($(BIN)/python -c 'import json, sys; print(json.load(open(sys.argv[1]))["sigma"])' $(REUSE)/trace/noise.json)) \
		--output $(SCALE)/params.yaml
	export LOCEDIT_PIPELINE_ID=scale-$(FACTS)-$$(date +%Y%m%dT%H%M%S); \
	for stage in prepare filter stats trace edit analyze; do \
		$(BIN)/locedit run $$stage --params $(SCALE)/params.yaml || exit 1; done

# The cost table of the scale runs that exist (outputs/scale-*): docs/scale-run/costs.md.
scale-costs: setup
	PYTHONPATH=src $(BIN)/python scripts/scale_costs.py --output docs/scale-run/costs.md

# The committed report of the 100-fact run: its summary, tables and figures, the cost table
# and an index with the headline (docs/scale-run/README.md). SCALE_CODE=<commit> names the code
# that ran when it is not the last commit of src/.
scale-docs: scale-costs
	test -f reports/scale-100/summary.md || { echo "no reports/scale-100: run make scale first"; exit 1; }
	mkdir -p docs/scale-run/tables docs/scale-run/figures
	cp reports/scale-100/summary.md reports/scale-100/tables.md docs/scale-run/
	cp reports/scale-100/tables/*.md docs/scale-run/tables/
	cp reports/scale-100/figures/*.png docs/scale-run/figures/
	PYTHONPATH=src $(BIN)/python scripts/scale_report.py --facts 100 --output docs/scale-run/README.md \
		--readme README.md $(if $(SCALE_CODE),--code "$(SCALE_CODE)")

test: setup
	$(BIN)/python -m pytest -q -n 2 --dist load --durations=15

test-all: setup
	$(BIN)/python -m pytest -q -n 2 --dist load -m ""

lint: setup
	$(BIN)/ruff check src tests benchmarks

# Every causal-LM class of transformers, tiny and random: pass or refused (docs/models.md).
zoo: setup
	PYTHONPATH=src $(BIN)/python scripts/model_zoo.py

bench: setup
	$(BIN)/python benchmarks/tracing.py
	$(BIN)/python benchmarks/editing.py

# On a GPU machine with torch+transformers in the system python3 (no .venv, no network):
# device tests on CUDA, then benchmarks/gpu_check.py -> benchmarks/results/*-cuda.json.
gpu-check:
	PYTHON=$(PYTHON) scripts/gpu_check.sh

# The same on the CPU with tiny shapes, in the project's .venv (16 s on an idle 2-core
# machine): does the script run?
gpu-check-dry: setup
	PYTHON=$(BIN)/python scripts/gpu_check.sh --dry
