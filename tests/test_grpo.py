"""The grpo stage (`algorithm.name: grpo | rloo`: TRL's GRPOTrainer / RLOOTrainer, alignment/grpo.py) on the tiny model:
a few steps train and publish an artifact that loads back through its lineage; the reference is the SFT model;
the reward wrapper passes per-prompt fields; impossible group settings fail at config load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from alignment.artifacts import ArtifactStore
from alignment.cli import main
from alignment.config import load_config
from alignment.grpo import GroupSpec, build_trainer, trl_reward_func
from alignment.policy import load_policy
from alignment.prompts import load_prompts
from _device import device_of

CONFIG = {
    "stage": "grpo", "run": "tiny", "seed": 0, "precision": "fp32", "algorithm": "grpo",
    "data": {"train": "data/instruct/train.jsonl", "eval": None, "max_prompts": 16},
    "reward": {"kind": "function", "function": "test_grpo:vowel_reward"},
    "peft": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
    "train": {"lr": 1.0e-2, "max_steps": 3, "batch_size": 8, "logging_steps": 1, "save_steps": 100},
    "group": {"num_generations": 4, "max_completion_length": 12, "beta": 0.04},
    # a random model never emits EOS: the guardrails that would stop it are tested apart
    "health": {"missing_eos_warn": None, "missing_eos_stop": None, "length_drift_stop": None,
               "entropy_collapse_stop": None},
}


def vowel_reward(prompts, completions):
    """Rule-based reward: the share of vowels among the letters (varies between random completions, so every
    group has a baseline to beat)."""
    out = []
    for text in completions:
        letters = [c for c in text.lower() if c.isalpha()]
        out.append(sum(c in "aeiou" for c in letters) / len(letters) if letters else 0.0)
    return out


def write_config(tmp_path: Path, **changes) -> Path:
    cfg = json.loads(json.dumps(CONFIG))
    for key, value in changes.items():
        node = cfg
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    path = tmp_path / "grpo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def store(tiny_store, tmp_path):
    root, run = tiny_store
    copy = tmp_path / "store"
    shutil.copytree(root, copy)
    return copy, run


def _first_reward_row(root, run) -> dict:
    """The first logged training step of the run's published grpo artifact (the first row with a reward)."""
    art = ArtifactStore(root).read_stage(run, "grpo")
    rows = (json.loads(line) for line in (art.path / "log_history.jsonl").read_text().splitlines())
    return next(r for r in rows if "reward" in r)


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_trains_a_few_steps_and_loads_back(store, tmp_path, algorithm):
    root, run = store
    cfg = write_config(tmp_path, algorithm=algorithm)
    assert main(["run", "grpo", "-c", str(cfg), "--artifacts", str(root)]) == 0

    s = ArtifactStore(root)
    art, sft = s.read_stage(run, "grpo"), s.read_stage(run, "sft")
    m = art.manifest
    assert m.lineage["parent"] == str(sft.path) and m.lineage["adapter"] is True
    assert m.lineage["algorithm"] == algorithm and m.lineage["reward"]["function"] == "test_grpo:vowel_reward"
    assert m.metrics["algorithm"] == algorithm and m.metrics["steps"] == 3
    assert 0.0 <= m.metrics["reward_first"] <= 1.0 and 0.0 <= m.metrics["reward_last"] <= 1.0
    assert m.metrics["kl_last"] != 0.0  # beta > 0: KL measured, and the policy moved away from the reference
    rows = [json.loads(line) for line in (art.path / "log_history.jsonl").read_text().splitlines()]
    assert [r["reward"] for r in rows if "reward" in r][0] == m.metrics["reward_first"]
    # The adapter does not claim the raw base as its base model (that would silently drop SFT).
    adapter_conf = json.loads((art.model_dir / "adapter_config.json").read_text())
    assert str(s.read_stage(run, "base").model_dir.resolve()) != adapter_conf["base_model_name_or_path"]

    # base + SFT + GRPO/RLOO loads back through the lineage, and differs from base + SFT.
    trained, before = load_policy(art, "fp32"), load_policy(sft, "fp32")
    changed = [n for n, p in trained.state_dict().items() if not torch.equal(p, before.state_dict()[n])]
    assert any("layers" in n for n in changed), "training changed no parameter"


def test_truncated_reward_replaces_the_score_of_cut_completions(store, tmp_path):
    # vowel_reward is in [0, 1]; a cut completion now scores -3, so the step's mean reward is at most
    # 1 x (share finished) - 3 x (share cut), and below 0 whenever most are cut (12 tokens on a random model)
    root, run = store
    cfg = write_config(tmp_path, **{"train.max_steps": 1, "group.truncated_reward": -3.0})
    assert main(["run", "grpo", "-c", str(cfg), "--artifacts", str(root)]) == 0
    row = _first_reward_row(root, run)
    cut = row["completions/clipped_ratio"]
    assert cut > 0.5 and row["reward"] <= (1 - cut) * 1.0 - 3.0 * cut + 1e-6


def test_greedy_member_reaches_the_sampler_through_the_stage(store, tmp_path, monkeypatch):
    """group.greedy_member: every rollout call of the run decodes the first row of each group greedily."""
    import alignment.generation as generation

    calls, real = [], generation.generate
    monkeypatch.setattr(generation, "generate", lambda *a, **k: calls.append((len(a[2]), list(k.get(
        "greedy_rows", ())))) or real(*a, **k))
    root, run = store
    cfg = write_config(tmp_path, **{"train.max_steps": 1, "group.greedy_member": True})
    assert main(["run", "grpo", "-c", str(cfg), "--artifacts", str(root)]) == 0
    assert calls and all(rows and rows == list(range(0, n, 4)) for n, rows in calls)


def test_soft_overlong_punishment_adds_a_length_reward(store, tmp_path):
    # DAPO's soft overlong punishment with max 12, soft 6: a completion of L tokens adds 0 up to 6 tokens, (6 - L) / 6
    # above, -1 at 12 (cut). On the random model most completions are cut, so the length reward's mean is at most
    # -(share cut), and TRL's reward is the sum of the two functions' means.
    root, run = store
    cfg = write_config(tmp_path, **{"train.max_steps": 1, "group.soft_overlong": 6})
    assert main(["run", "grpo", "-c", str(cfg), "--artifacts", str(root)]) == 0
    row = _first_reward_row(root, run)
    length, source = row["rewards/soft_overlong_punishment_reward/mean"], row["rewards/function_reward/mean"]
    cut = row["completions/clipped_ratio"]
    assert cut > 0.5 and length <= -cut + 1e-6
    assert row["reward"] == pytest.approx(source + length, abs=1e-5)


def test_reference_of_full_fine_tuning_is_the_sft_model(store, tmp_path):
    """Without an adapter to switch off, TRL reloads the reference from config._name_or_path (the raw base):
    build_trainer must hand it base + SFT merged instead."""
    root, run = store
    from stages.grpo import Config

    cfg = load_config(Config, write_config(tmp_path, **{"peft": {"method": "full"}}))
    s = ArtifactStore(root)
    sft, base = s.read_stage(run, "sft"), s.read_stage(run, "base")
    trainer, _ = build_trainer(cfg, sft, load_prompts(cfg.data.train, 8), vowel_reward, tmp_path / "ckpt")
    ref = trainer.ref_model.state_dict()
    sft_w, base_w = load_policy(sft, "fp32").state_dict(), load_policy(base, "fp32").state_dict()
    assert all(torch.equal(ref[n], sft_w[n]) for n in sft_w)
    assert not all(torch.equal(ref[n], base_w[n]) for n in base_w), "SFT must differ from base for this to mean much"
    assert any(p.requires_grad for p in trainer.model.parameters())
    assert not any(p.requires_grad for p in trainer.ref_model.parameters())


def test_reward_wrapper_passes_text_and_the_prompts_fields():
    records = [{"prompt": [{"role": "user", "content": "a"}], "constraints": [{"type": "lowercase"}]},
               {"prompt": [{"role": "user", "content": "b"}], "reference": "B!"}]
    seen = {}

    def score(prompts, completions, **fields):
        seen.update(prompts=prompts, completions=completions, **fields)
        return [1, 2]

    reward = trl_reward_func(score, records, "function_reward")
    out = reward(prompts=[r["prompt"] for r in records[::-1]],
                 completions=[[{"role": "assistant", "content": "x"}], [{"role": "assistant", "content": "y"}]],
                 prompt_index=[1, 0], completion_ids=[[1], [2]], trainer_state=None)
    assert out == [1.0, 2.0] and reward.__name__ == "function_reward"
    assert seen["completions"] == ["x", "y"]
    assert seen["constraints"] == [None, [{"type": "lowercase"}]] and seen["reference"] == ["B!", None]
    # group.truncated_reward: a completion that does not end in an EOS (cut at the length limit) gets it instead
    cut = trl_reward_func(score, records, truncated_reward=-0.5, eos_ids={7, 9})
    kw = dict(prompts=[r["prompt"] for r in records[::-1]], prompt_index=[1, 0], trainer_state=None,
              completions=[[{"role": "assistant", "content": "x"}], [{"role": "assistant", "content": "y"}]])
    assert cut(completion_ids=[[1, 9], [2, 3]], **kw) == [1.0, -0.5]
    assert cut(completion_ids=[[7], [5, 7]], **kw) == [1.0, 2.0]
    with pytest.raises(ValueError, match="truncated_reward needs the eos_ids"):
        trl_reward_func(score, records, truncated_reward=0.0)


def test_eos_ids_are_the_generation_configs_and_the_tokenizers():
    from types import SimpleNamespace

    from alignment.grpo import eos_ids

    tok = SimpleNamespace(eos_token_id=2)
    assert eos_ids(SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[2, 5])), tok) == {2, 5}
    assert eos_ids(SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=3)), tok) == {2, 3}
    assert eos_ids(SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=None)), tok) == {2}


@pytest.mark.parametrize("changes, expected", [
    ({"train.batch_size": 6}, "train.batch_size: train.batch_size x train.grad_accum = 6 completions per step "
                              "must be a multiple of group.num_generations (4)"),
    ({"group.num_generations": 1}, "group.num_generations: a group needs at least 2"),
    ({"algorithm": {"name": "rloo", "loss_type": "grpo"}}, "algorithm.loss_type: unknown key"),
    ({"algorithm": {"name": "grpo", "normalize_advantages": True}},
     "algorithm.normalize_advantages: unknown key"),
    ({"algorithm": "ppo"}, "algorithm: expected name grpo or rloo"),
    ({"algorithm": {"name": "rloo", "chosen_nll": 1.0}}, "algorithm.chosen_nll: unknown key"),
    ({"algorithm": {"name": "grpo", "chosen_nll": -1.0}}, "algorithm.chosen_nll: "),
    ({"group.loss_type": "grpo"}, "group.loss_type: unknown key"),
    ({"group.beta": -0.1}, "group.beta: expected a KL coefficient >= 0"),
    ({"group.sampler": "vllm"}, "group.sampler: expected one of 'engine' or 'trl', got 'vllm'"),
    ({"group.truncated_reward": "low"}, "group.truncated_reward:"),
    ({"group.greedy_member": True, "group.sampler": "trl"}, "group.greedy_member: needs group.sampler: engine"),
    ({"group.soft_overlong": 20}, "group.soft_overlong: expected 1..group.max_completion_length (12) tokens, or "
                                  "null for none"),
    ({"health.bogus": 1}, "health.bogus: unknown key"),
    ({"health.patience": "abc"}, "health.patience: expected an integer, got 'abc'"),
])
def test_impossible_group_settings_fail_at_config_load(tmp_path, capsys, changes, expected):
    cfg = write_config(tmp_path, **changes)
    assert main(["run", "grpo", "-c", str(cfg), "--artifacts", str(tmp_path / "store")]) == 2
    assert f"align: error: {cfg}: {expected}" in capsys.readouterr().err


def test_adapter_on_lm_head_is_refused_before_training(store, tmp_path, capsys):
    root, _ = store
    cfg = write_config(tmp_path, **{"peft.target_modules": ["q_proj", "lm_head"]})
    assert main(["run", "grpo", "-c", str(cfg), "--artifacts", str(root)]) == 2
    assert ("peft.target_modules: GRPO/RLOO compute log-probs from lm_head.weight directly"
            in capsys.readouterr().err)


def test_group_spec_maps_onto_trl_configs():
    from trl import GRPOConfig, RLOOConfig

    from alignment.grpo import GRPO, RLOO

    spec = GroupSpec(num_generations=2, beta=0.1, max_completion_length=7)
    common = dict(output_dir="/tmp/unused", per_device_train_batch_size=2, use_cpu=True, bf16=False)
    grpo = GRPOConfig(**common, **spec.trl_kwargs(), **GRPO(loss_type="dr_grpo").trl_kwargs())
    assert (grpo.num_generations, grpo.beta, grpo.loss_type, grpo.max_completion_length) == (2, 0.1, "dr_grpo", 7)
    rloo = RLOOConfig(**common, **spec.trl_kwargs(), **RLOO(normalize_advantages=True).trl_kwargs())
    assert (rloo.num_generations, rloo.beta, rloo.normalize_advantages) == (2, 0.1, True)


@pytest.mark.parametrize("profile", ["tiny", "smollm2"])
@pytest.mark.parametrize("name", ["grpo", "rloo"])
def test_shipped_configs_load_with_their_algorithm(profile, name):
    from alignment.runner import load_stage_config

    cfg = load_stage_config("grpo", f"configs/{profile}/{name}.yaml")
    assert cfg.algorithm.name == name and cfg.stage == "grpo"
    short = load_stage_config("grpo", f"configs/{profile}/{name}.yaml", [f"algorithm={name}"])
    assert short.algorithm == type(cfg.algorithm)()  # the short form is the method's defaults


def test_rlvr_recipe_needs_only_sft_and_scores_cut_completions_zero():
    """configs/smollm2/grpo-rlvr.yaml: the gold check as the reward (no reward artifact upstream) and a completion
    cut at the eval stage's budget scored 0, the two settings its measured run depends on."""
    from alignment.runner import load_stage_config
    from stages.grpo import upstream

    cfg = load_stage_config("grpo", "configs/smollm2/grpo-rlvr.yaml")
    eval_cfg = load_stage_config("eval", "configs/smollm2/eval.yaml")
    assert upstream(cfg) == ("sft",) and cfg.reward.function == "alignment.reward_sources:gold_reward"
    assert cfg.group.truncated_reward == 0.0 and not cfg.group.mask_truncated_completions
    assert cfg.group.max_completion_length == eval_cfg.generation.max_new_tokens


def test_trl_samples_through_our_engine_with_the_lora_merged(store, tmp_path):
    """GRPO/RLOO rollouts go through alignment.generation (LoRA merged in place, seeded rows): TRL's completion
    contract (ids through the first EOS), the same tokens as sampling with the adapter unmerged (fp32), the base
    weights bit for bit as before (read back from the stash), and TRL's own path where ours does not apply."""
    from alignment.generation import GenerationSpec, generate
    from alignment.grpo import engine_completions

    root, run = store
    from stages.grpo import Config

    cfg = load_config(Config, write_config(tmp_path))
    sft = ArtifactStore(root).read_stage(run, "sft")
    trainer, tok = build_trainer(cfg, sft, load_prompts(cfg.data.train, 8), vowel_reward, tmp_path / "ckpt")
    assert trainer.greedy_member is False  # group.greedy_member's default, handed to engine_completions
    model = trainer.model
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # a trained-looking adapter: merged and unmerged sampling now differ from the base's
            p.data.normal_(0, 0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    prompts = [r["prompt"] for r in load_prompts(cfg.data.train, 3)]
    ids = [tok.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
           for p in prompts for _ in range(4)]

    out = trainer._generate_single_turn(ids, None, {}, 4)
    completions, logprobs = out
    assert logprobs is None and len(completions) == 12 and trainer._engine_calls == (0, 0)
    for c in completions:
        assert len(c) <= 12 and (c[-1] == tok.eos_token_id or len(c) == 12)
        assert tok.eos_token_id not in c[:-1]
    # merged in place, not into copies; on a GPU the stash declines by design (generation.WeightStash.fits)
    assert (trainer._weight_stash._file is not None) == (device_of(model).type == "cpu")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    # the same seed through the unmerged adapter: the same tokens
    spec = GenerationSpec(max_new_tokens=12, do_sample=True, batch_size=12, autocast="off")  # precision fp32
    seed = (cfg.seed * 1_000_003) % 2**31
    ro = generate(model, tok, [None] * 12, spec, seed=seed, prompt_ids=ids)
    assert [r[:n] for r, n in zip(ro.response_ids.tolist(), ro.lengths)] == completions
    # the next call in the same step draws from new streams
    assert engine_completions(trainer, ids) != completions and trainer._engine_calls == (0, 1)
    # group.greedy_member: the first row of each group of 4 is the policy's greedy answer, the rest as sampled
    trainer.greedy_member, trainer._engine_calls = True, (None,)  # the first call of the step again
    mixed = engine_completions(trainer, ids)
    greedy = generate(model, tok, [None] * 3, spec.model_copy(update={"do_sample": False, "batch_size": 3}),
                      prompt_ids=ids[::4])
    assert [mixed[i] for i in (0, 4, 8)] == [r[:n] for r, n in zip(greedy.response_ids.tolist(), greedy.lengths)]
    assert [c for i, c in enumerate(mixed) if i % 4] == [c for i, c in enumerate(completions) if i % 4]
    trainer.greedy_member = False

    trainer.args.repetition_penalty = 1.1  # not ours to emulate: TRL's own sampling
    trainer._engine_calls = None
    trainer._generate_single_turn(ids, None, {}, 4)
    assert trainer._engine_calls is None


def test_sampler_trl_keeps_trls_own_trainer():
    from trl import GRPOTrainer, RLOOTrainer

    from alignment.grpo import trainer_class

    assert trainer_class("grpo", "trl")[1] is GRPOTrainer and trainer_class("rloo", "trl")[1] is RLOOTrainer
    with_nll = trainer_class("grpo", "trl", chosen_nll=0.5)[1]  # algorithm.chosen_nll: TRL's sampler, our bonus
    assert issubclass(with_nll, GRPOTrainer) and with_nll is not GRPOTrainer and with_nll.chosen_nll == 0.5
    assert with_nll.chosen_min_score is None and trainer_class("grpo", "trl", 0.5, 1.0)[1].chosen_min_score == 1.0
    engine = trainer_class("rloo")[1]
    assert issubclass(engine, RLOOTrainer) and engine is not RLOOTrainer and engine.__name__ == "RLOOTrainer"


def test_a_run_whose_completions_are_all_cut_is_stopped_by_the_guardrail_with_one_line(store, tmp_path, capsys):
    # A random model cuts every completion at 12 tokens: the PPO stage's missing-EOS guardrail, on TRL's logged
    # clipped_ratio, stops the run at the third logged row (patience 3) instead of publishing a run-on policy.
    root, run = store
    cfg = write_config(tmp_path, **{"train.max_steps": 4, "health.missing_eos_warn": 0.5,
                                    "health.missing_eos_stop": 0.95})
    assert main(["run", "grpo", "-c", str(cfg), "--artifacts", str(root)]) == 2
    err = capsys.readouterr().err
    assert "align: error: grpo: stopped at step 3: 100% of responses hit max_new_tokens without an EOS" in err
    assert "health.missing_eos_stop=0.95 for 3 consecutive" in err and "group.max_completion_length" in err
    assert "Traceback" not in err
    assert not (root / run / "grpo").exists()  # nothing published


def inf_reward(prompts, completions):
    return [float("inf")] * len(completions)


def test_an_infinite_reward_is_one_line_not_a_run_trained_on_nothing(store, tmp_path, capsys):
    # TRL takes it: the group mean is inf, no advantage is left, and the run would publish an untrained policy
    root, run = store
    cfg = write_config(tmp_path, **{"reward.function": "test_grpo:inf_reward"})
    assert main(["run", "grpo", "-c", str(cfg), "--artifacts", str(root)]) == 2
    err = capsys.readouterr().err
    assert "align: error: reward function_reward: completion 0 scored inf; rewards must be finite" in err
    assert "Traceback" not in err and not (root / run / "grpo").exists()


def test_a_diverged_run_stops_at_the_first_nan_row_with_one_line(store, tmp_path, capsys):
    # a learning rate no run survives: the first update makes the LoRA weights huge, the next forward overflows
    root, run = store
    cfg = write_config(tmp_path, **{"train.lr": 1.0e30, "train.max_steps": 4, "train.save_steps": 1})
    assert main(["run", "grpo", "-c", str(cfg), "--artifacts", str(root)]) == 2
    err = capsys.readouterr().err
    assert "align: error: grpo: stopped at step " in err and "= nan" in err and "the update diverged" in err
    assert "lower train.lr, or train in fp32" in err and "Traceback" not in err
    assert not (root / run / "grpo").exists()  # nothing published


def test_the_grpo_guardrail_keeps_the_first_logged_row_as_its_reference_after_a_resume(caplog):
    from types import SimpleNamespace

    from alignment.grpo import health_callback
    from alignment.ppo_callbacks import HealthSpec

    first = {"completions/mean_length": 40.0, "completions/clipped_ratio": 0.1, "entropy": 2.0}
    late = {"completions/mean_length": 100.0, "completions/clipped_ratio": 0.2, "entropy": 1.9}
    cb = health_callback(HealthSpec())
    state = SimpleNamespace(log_history=[first, late], global_step=30)  # resumed: the history holds row 1
    with caplog.at_level("WARNING", logger="align"):
        cb.on_log(None, state, None, logs=late)
        cb.on_log(None, state, None, logs={"train_runtime": 1.0})  # the final summary row: not checked
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == ["[grpo] step 30: mean response length drifted 2.50x from the first update's 40.0 tokens "
                        "(length hacking?)"]


def test_chosen_bonus_marks_each_groups_best_where_the_group_differs():
    from alignment.grpo import chosen_bonus

    nan = float("nan")
    rewards = torch.tensor([0.5, 1.0, 1.0, 0.0,     # two tied best: both chosen
                            1.0, 1.0, 1.0, 1.0,     # all equal: no pair, no chosen
                            nan, 0.2, 0.1, nan,     # unscorable rows never chosen
                            nan, 0.3, nan, nan])    # one scored row: nothing to beat
    assert chosen_bonus(rewards, 4, 1.5).tolist() == [0, 1.5, 1.5, 0, 0, 0, 0, 0, 0, 1.5, 0, 0, 0, 0, 0, 0]
    assert chosen_bonus(rewards[:4], 2, 1.0).tolist() == [0, 1.0, 1.0, 0]  # groups of two: (0.5, 1) and (1, 0)


def test_chosen_min_score_keeps_the_bonus_for_groups_whose_best_reaches_it():
    from alignment.grpo import chosen_bonus

    rewards = torch.tensor([0.5, 1.0, 1.0, 0.0,     # best 1.0 >= 1.0: both tied best chosen
                            0.2, 0.6, 0.6, 0.0,     # best 0.6: partly right, not imitated
                            1.0, 1.2, 0.0, 0.0])    # best 1.2 (above the floor) alone
    assert chosen_bonus(rewards, 4, 0.5, min_score=1.0).tolist() == [0, .5, .5, 0, 0, 0, 0, 0, 0, .5, 0, 0]
    assert chosen_bonus(rewards, 4, 0.5).tolist() == [0, .5, .5, 0, 0, .5, .5, 0, 0, .5, 0, 0]  # no floor


def test_chosen_min_score_without_chosen_nll_is_a_config_error_naming_both(tmp_path):
    from alignment.errors import ConfigError
    from stages.grpo import Config

    path = write_config(tmp_path, algorithm={"name": "grpo", "chosen_min_score": 1.0})
    with pytest.raises(ConfigError) as e:
        load_config(Config, path)
    assert str(e.value).count("\n") == 0 and "algorithm.chosen_min_score" in str(e.value) \
        and "set algorithm.chosen_nll" in str(e.value) and str(path) in str(e.value)
    fine = write_config(tmp_path, algorithm={"name": "grpo", "chosen_nll": 1.0, "chosen_min_score": 1.0})
    assert load_config(Config, fine).algorithm.chosen_min_score == 1.0


@pytest.mark.parametrize("min_score", [None, 0.3])
def test_chosen_nll_adds_its_weight_to_the_advantage_of_each_groups_best(store, tmp_path, min_score):
    """algorithm.chosen_nll reaches TRL's GRPO trainer; the advantages of a training batch are TRL's group-normalised
    ones (recomputed here from the rewards it scored) plus the weight on each group's best completion (with
    algorithm.chosen_min_score, a best that reaches it)."""
    from alignment.grpo import chosen_bonus
    from stages.grpo import Config

    root, run = store
    floor = {} if min_score is None else {"chosen_min_score": min_score}
    cfg = load_config(Config, write_config(tmp_path, algorithm={"name": "grpo", "chosen_nll": 0.5, **floor}))
    sft = ArtifactStore(root).read_stage(run, "sft")
    score = lambda prompts, completions, **fields: vowel_reward(prompts, completions)  # noqa: E731
    trainer, _ = build_trainer(cfg, sft, load_prompts(cfg.data.train, 8), score, tmp_path / "ckpt")
    assert trainer.chosen_nll == 0.5 and trainer.chosen_min_score == min_score
    trainer.model.train()
    inputs = [row for row in trainer.train_dataset.select(range(2)) for _ in range(4)]  # TRL's sampler: G in a row
    out = trainer._generate_and_score_completions(inputs)
    rewards = trainer._rewards_per_func[:, 0]
    groups = rewards.view(-1, 4)
    plain = ((groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-4)).view(-1)
    bonus = chosen_bonus(rewards, 4, 0.5, min_score)
    if min_score is None:
        assert bonus.sum() >= 1.0  # random completions differ in their vowel share: each group has a best
    assert torch.allclose(out["advantages"], plain + bonus, atol=1e-5)
    assert trainer._metrics["train"]["chosen_nll/frac"] == [(bonus > 0).float().mean().item()]


def test_look_10s_logged_rows_stop_the_two_diverged_seeds_where_they_went_nan_and_not_the_third():
    """The rows three GRPO seeds logged on an H200 (bench/results/grpo_look10_h200_rows.json): seeds 0 and 2 ran on,
    logged a NaN gradient norm at steps 25 and 40 and then crashed in the health check; seed 1 finished."""
    from types import SimpleNamespace

    from alignment.grpo import health_callback
    from alignment.ppo_callbacks import Diverged, HealthSpec

    saved = json.loads((Path(__file__).parents[1] / "bench" / "results" / "grpo_look10_h200_rows.json").read_text())
    names = ["reward", "completions/mean_length", "completions/clipped_ratio", "grad_norm", "entropy", "kl"]
    stopped = {}
    for seed, rows in saved["seeds"].items():
        cb, history = health_callback(HealthSpec()), []
        for step, *values in rows:
            logs = {k: float(v) if v == "NaN" else v for k, v in zip(names, values)}
            logs["loss"] = 0.0
            history.append(logs)
            try:
                cb.on_log(None, SimpleNamespace(log_history=history, global_step=step), None, logs=logs)
            except Diverged as e:
                stopped[seed] = (step, str(e).split(": ")[2])
                break
    assert stopped == {"0": (25, "train/grad_norm = nan"), "2": (40, "train/grad_norm = nan")}
