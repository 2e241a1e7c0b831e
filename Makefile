# odm-sr: `make help` lists the targets.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
SHARED ?= ../shared
ARGS   ?=

.DEFAULT_GOAL := help
.PHONY: help install train clean-main sweep mini mechanism bench-step bench-memory mini-repro gpu-wheels gpu-check gpu-real gpu-real-shared op-count eval upscale export bench-export complexity report wandb-sync test test-fast lint clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

install: ## create .venv and install odm-sr (editable) with the pinned versions of constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev,sweep]'
	@$(PY) -c "import odm_sr, torch, lightning; print('odm-sr installed: torch', torch.__version__, 'lightning', lightning.__version__)"

MAIN_DIR ?= logs/main

train: ## the main job: FP small EDSR x4 on the embedded sample images (reused once trained), then 2-bit ODM QAT; prints the table
	@if [ -f $(MAIN_DIR)/fp/results.json ]; then echo "reusing the FP model of $(MAIN_DIR)/fp (make clean-main retrains it)"; \
	else $(VENV)/bin/odm-sr-train experiment=main_fp hydra.run.dir=$(MAIN_DIR)/fp auto_resume=true; fi
	$(VENV)/bin/odm-sr-train experiment=main_odm model.pretrained=$(MAIN_DIR)/fp/checkpoints/last.ckpt \
		hydra.run.dir=$(MAIN_DIR)/odm_w2a2 auto_resume=true $(ARGS)

clean-main: ## forget the main job's cached FP model
	rm -rf $(MAIN_DIR)

eval: ## evaluate a checkpoint: make eval ARGS="ckpt=<path> data=sr291"
	$(VENV)/bin/odm-sr-eval $(ARGS)

upscale: ## super-resolve one image: make upscale ARGS="<ckpt> <in.png> <out.png>"
	$(VENV)/bin/odm-sr-upscale $(ARGS)

SWEEP ?= ablation_j

sweep: ## run a sweep of conf/sweep (finished jobs are skipped): make sweep SWEEP=ablation_j ARGS="experiment=mini_edsr_x4_w2a2_odm"
	$(VENV)/bin/odm-sr-train -m +sweep=$(SWEEP) $(ARGS)

mini: ## the main table at CPU size: FP small EDSR on T91+BSD200 (reused once trained), then the 8 mini QAT runs
	@if [ -f logs/mini/fp/results.json ]; then echo "reusing logs/mini/fp"; \
	else $(VENV)/bin/odm-sr-train experiment=mini_edsr_x4_fp; fi
	$(VENV)/bin/odm-sr-train -m +sweep=mini_table $(ARGS)

LOGS ?= $${ODM_SR_LOGS:-logs}
MECHANISM_SWEEPS ?= mr_scale mr_ablation mr_ablation_strong mr_norm

mechanism: ## does ODM's MR act? 3000-step CPU sweeps (mr_scale, mr_ablation(_strong), mr_norm, mr_methods) + report; resumable
	@if [ -f $(LOGS)/mini/fp/results.json ]; then echo "reusing $(LOGS)/mini/fp"; \
	else $(VENV)/bin/odm-sr-train experiment=mini_edsr_x4_fp; fi
	for s in $(MECHANISM_SWEEPS); do \
		$(VENV)/bin/odm-sr-train -m +sweep=$$s experiment=mini_long_edsr_x4_w2a2_odm $(ARGS) || exit 1; done
	$(VENV)/bin/odm-sr-train -m +sweep=mr_methods $(ARGS)
	$(VENV)/bin/odm-sr-report $(LOGS)/sweeps --mechanism

export: ## integer ONNX graph + packed weights of a static-quantized checkpoint: make export ARGS="<ckpt> out/model.onnx"
	$(VENV)/bin/odm-sr-export $(ARGS)

complexity: ## storage / BitOPs table: make complexity ARGS="--model edsr_baseline --method fp pams daq ddtb odm --bits 2 4"
	$(VENV)/bin/odm-sr-complexity $(ARGS)

report: ## paper-style table (md, tex, png) of a run or sweep dir: make report DIR=logs/sweeps/ablation_j
	$(VENV)/bin/odm-sr-report $(DIR) $(ARGS)

wandb-sync: ## upload the offline wandb runs under logs/ (needs network and WANDB_API_KEY)
	$(VENV)/bin/wandb sync --include-offline $$(find logs -type d -name 'offline-run-*' | sort)

bench-step: ## step-time ratios FP/PAMS/DAQ/DDTB/ODM (bench/results/step_time_*.json)
	WANDB_MODE=disabled $(PY) bench/step_time.py $(ARGS)

bench-memory: ## eval peak memory and time, whole vs tiled (bench/results/eval_memory.json)
	$(PY) bench/eval_memory.py $(ARGS)

op-count: ## aten ops and host syncs per training step of each method, and compile graph breaks (bench/op_count.py)
	WANDB_MODE=disabled $(PY) bench/op_count.py $(ARGS)

mini-repro: ## CPU-sized paper table: FP + PAMS/DAQ/DDTB/ODM at 4 and 2 bits on sr291 (30 min measured, up to ~75 under load; resumable)
	WANDB_MODE=disabled $(PY) bench/mini_repro.py $(ARGS)

bench-export: ## integer ONNX export: exactness vs PyTorch, file size, ORT speed: make bench-export ARGS="--ckpt odm=<ckpt>"
	WANDB_MODE=disabled $(PY) bench/export_bench.py $(ARGS)

gpu-wheels: ## the wheels the GPU machine lacks (hydra-core, omegaconf, antlr4) into bench/gpu-wheels/ (git-ignored)
	mkdir -p bench/gpu-wheels
	if ls ../shared/gpu-wheels/*.whl >/dev/null 2>&1; then cp ../shared/gpu-wheels/*.whl bench/gpu-wheels/; else \
	  $(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
	    -c constraints.txt -d bench/gpu-wheels hydra-core omegaconf && \
	  $(PY) -m pip wheel -q --no-deps -c constraints.txt -w bench/gpu-wheels antlr4-python3-runtime; fi
	@ls -l bench/gpu-wheels

gpu-check: ## GPU machine: step times, op/sync counts, compile, MR balance at paper size (< 5 min); DRY=1: on the CPU
	$(if $(DRY),PYTHON=$(PY)) bash bench/gpu_check.sh $(if $(DRY),--dry-run) $(ARGS)

gpu-real: ## GPU machine: QAT from the official IMDN x4 weights, PAMS/DAQ/DDTB/ODM W2A2 (< 9 min); DRY=1: on the CPU
	$(if $(DRY),PYTHON=$(PY)) bash bench/gpu_real.sh $(if $(DRY),--dry-run) $(ARGS)

gpu-real-shared: ## shared/ in the checkout (git-ignored, hard links, ~50 MB) with what gpu-real needs there
	@if [ -e shared ]; then echo "shared/ exists: remove it first (rm -r shared)" >&2; exit 1; fi
	for d in data/benchmark/Set5/HR data/benchmark/Set5/LR_bicubic/X4 data/benchmark/B100/HR \
	         data/benchmark/B100/LR_bicubic/X4 data/train/BSD200/HR; do \
	  mkdir -p shared/$$(dirname $$d) && (cp -rl $(SHARED)/$$d shared/$$d 2>/dev/null || cp -r $(SHARED)/$$d shared/$$d) \
	  || exit 1; done
	mkdir -p shared/models/imdn shared/gpu-wheels
	cp -l $(SHARED)/models/imdn/IMDN_x4.pth shared/models/imdn/ 2>/dev/null || cp $(SHARED)/models/imdn/IMDN_x4.pth shared/models/imdn/
	cp $$(ls bench/gpu-wheels/*.whl 2>/dev/null || ls $(SHARED)/gpu-wheels/*.whl) shared/gpu-wheels/
	@du -sh shared

test: ## run the test suite on every core, one test file per worker (tests needing ../shared/data skip with a reason where it is absent)
	WANDB_MODE=disabled $(PY) -m pytest -q -n auto --dist loadfile $(ARGS)

test-fast: ## the test suite without the slow trainings
	WANDB_MODE=disabled $(PY) -m pytest -q -m "not slow" $(ARGS)

lint: ## ruff over src, tests and bench
	$(VENV)/bin/ruff check src tests bench

clean: ## remove caches and run outputs (keeps .venv)
	rm -rf logs outputs .pytest_cache .ruff_cache build src/*.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
