# dilatedseg: `make help` lists the targets.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
DATASET ?= shapes
STAGE ?= all
SWEEP ?= dilations
COUNT ?=
INIT ?=
ARGS ?=
# The CLI of the PYTHON make installed into, activated or not.
DILATEDSEG = $(PYTHON) -m dilatedseg
# The stages `STAGE=all` runs, in order: the paper's pipeline for the dataset. CamVid and KITTI
# train the context module jointly with the front-end (no separate context stage); Cityscapes
# fine-tunes both jointly after the context stage; the CRF-RNN is VOC's (and the embedded set's).
STAGES_camvid := frontend joint
STAGES_kitti := frontend joint
STAGES_cityscapes := frontend context joint
STAGES ?= $(or $(STAGES_$(DATASET)),frontend context crf)

export NO_ALBUMENTATIONS_UPDATE := 1

.PHONY: help install test lint train sweep bench report clean

help:  ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 12

install:  ## install torch (CPU wheel 2.13.0 unless one is present), the package and dev tools
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install -e ".[dev]"
	$(PIP) install --no-deps sweeps==0.3.0

test:  ## run the whole test suite
	$(PYTHON) -m pytest -q

lint:  ## ruff
	$(PYTHON) -m ruff check .

DATASETS := $(sort $(basename $(notdir $(filter-out conf/base.yaml conf/debug.yaml,$(wildcard conf/*.yaml)))))
STAGE_NAMES := $(sort $(basename $(notdir $(wildcard conf/stage/*.yaml))))
# A misspelt name stops make with the names there are (before anything runs).
check_names = $(if $(filter $(DATASET),$(DATASETS)),,$(error DATASET=$(DATASET) has no \
	conf/$(DATASET).yaml; datasets: $(DATASETS)))$(if $(filter $(STAGE),all $(STAGE_NAMES)),,\
	$(error STAGE=$(STAGE) has no conf/stage/$(STAGE).yaml; stages: $(STAGE_NAMES) or all))$(if \
	$(and $(INIT),$(filter all,$(STAGE))),$(error INIT=$(INIT) is where one stage starts: name \
	it, e.g. STAGE=context))

# One stage: conf/<dataset>.yaml + conf/stage/<stage>.yaml (+ conf/<dataset>/<stage>.yaml if present).
stage_configs = --config conf/$(DATASET).yaml --config conf/stage/$(1).yaml \
	$(if $(wildcard conf/$(DATASET)/$(1).yaml),--config conf/$(DATASET)/$(1).yaml)
# The recipe lines of one stage of `STAGE=all` (make stops at the first that fails).
define fit_stage
	@echo "== stage $(1) on $(DATASET) =="
	$(DILATEDSEG) fit $(call stage_configs,$(1)) $(ARGS)

endef

train:  ## train STAGE (frontend|context|joint|crf|all) on DATASET; INIT=ckpt overrides the start
	$(check_names)
ifeq ($(STAGE),all)
	$(foreach stage,$(STAGES),$(call fit_stage,$(stage)))
	@$(DILATEDSEG) summary --dataset $(DATASET) -- $(call stage_configs,frontend) $(ARGS)
else
	$(DILATEDSEG) fit $(call stage_configs,$(STAGE)) $(if $(INIT),--model.init_from=$(INIT)) $(ARGS)
endif

sweep:  ## run sweeps/<SWEEP>.yaml locally (no W&B server): a whole grid, or COUNT trials
	$(DILATEDSEG) sweep sweeps/$(SWEEP).yaml --local $(if $(COUNT),--count $(COUNT)) $(ARGS)

# Runs go to runs/report/ (apart from yours); ARGS: the report's options (--quick: a smoke test,
# --count N) and any CLI option for every run, e.g. ARGS=--data.init_args.root=...
report:  ## reproduce the paper's ablations on DATASET: reports/<dataset>/report.md + figures
	$(PYTHON) -m dilatedseg.report --dataset $(DATASET) --out reports/$(DATASET) $(ARGS)

bench:  ## performance table + bench-results/bench.json; ARGS="--quick" or "--only frontend data"
	$(PYTHON) benchmarks/run.py $(ARGS)

clean:  ## remove runs, generated data and caches
	rm -rf runs data wandb lightning_logs .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
