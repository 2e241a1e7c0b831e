# odm-sr: `make help` lists the targets.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
ARGS   ?=

.DEFAULT_GOAL := help
.PHONY: help install train eval upscale test test-fast lint clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

install: ## create .venv and install odm-sr (editable) with the pinned versions of constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev,sweep]'
	@$(PY) -c "import odm_sr, torch, lightning; print('odm-sr installed: torch', torch.__version__, 'lightning', lightning.__version__)"

train: ## the main job: train the small EDSR x4 on the embedded sample images, test it, print the table (ARGS=overrides)
	$(VENV)/bin/odm-sr-train experiment=main $(ARGS)

eval: ## evaluate a checkpoint: make eval ARGS="ckpt=<path> data=sr291"
	$(VENV)/bin/odm-sr-eval $(ARGS)

upscale: ## super-resolve one image: make upscale ARGS="<ckpt> <in.png> <out.png>"
	$(VENV)/bin/odm-sr-upscale $(ARGS)

test: ## run the test suite (tests needing ../shared/data skip with a reason where it is absent)
	WANDB_MODE=disabled $(PY) -m pytest -q $(ARGS)

test-fast: ## the test suite without the slow trainings
	WANDB_MODE=disabled $(PY) -m pytest -q -m "not slow" $(ARGS)

lint: ## ruff over src, tests and bench
	$(VENV)/bin/ruff check src tests

clean: ## remove caches and run outputs (keeps .venv)
	rm -rf logs outputs .pytest_cache .ruff_cache build src/*.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
