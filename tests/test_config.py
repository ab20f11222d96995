"""Config loading: every shipped YAML validates; every kind of mistake is named by file and key path."""

from __future__ import annotations

from pathlib import Path

import pytest

from alignment.config import apply_overrides, config_hash, load_config, redact
from alignment.errors import ConfigError
from alignment.runner import load_stage_config, stage_of_file

# Stage configs; cluster profiles and accelerate files have their own checks (test_cluster.py and below).
CONFIGS = sorted(p for p in Path("configs").rglob("*.yaml")
                 if not p.name.startswith("pipeline") and p.parent.name not in ("cluster", "accelerate"))
PIPELINES = sorted(Path("configs").rglob("pipeline*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=str)
def test_every_shipped_config_validates(path):
    cfg = load_stage_config(stage_of_file(path), path)
    assert cfg.stage == stage_of_file(path)


@pytest.mark.parametrize("path", sorted(Path("configs/cluster").glob("*.yaml")), ids=str)
def test_every_cluster_profile_validates(path):
    from alignment.cluster import SlurmSpec, _profile_layers

    common, per_stage = _profile_layers(path)  # the `stages:` section overrides the common settings per stage
    SlurmSpec.model_validate(common)
    for settings in per_stage.values():
        SlurmSpec.model_validate({**common, **settings})


@pytest.mark.parametrize("path", sorted(Path("configs/accelerate").glob("*.yaml")), ids=str)
def test_every_accelerate_config_is_a_launch_config(path):
    import yaml

    spec = yaml.safe_load(path.read_text())
    assert spec["distributed_type"] in ("MULTI_GPU", "MULTI_CPU", "FSDP", "DEEPSPEED"), path
    assert spec["num_processes"] >= 1


@pytest.mark.parametrize("path", PIPELINES, ids=str)
def test_every_pipeline_names_existing_valid_configs(path):
    import yaml

    spec = yaml.safe_load(path.read_text())
    assert spec["stages"], path
    for step in spec["stages"]:
        cfg_path = path.parent / step.get("config", f"{step['stage']}.yaml")
        load_stage_config(step["stage"], cfg_path, step.get("overrides", []))


def _sft_config(tmp_path, text: str) -> Path:
    p = tmp_path / "sft.yaml"
    p.write_text("stage: sft\n" + text)
    return p


def _problems(path, overrides=()) -> list[str]:
    from stages.sft import Config

    with pytest.raises(ConfigError) as e:
        load_config(Config, path, overrides)
    return e.value.problems


def test_wrong_type_names_file_and_key(tmp_path):
    p = _sft_config(tmp_path, "train:\n  lr: fast\n")
    assert _problems(p) == [f"{p}: train.lr: expected a number, got 'fast'"]


def test_all_problems_reported_at_once_with_suggestion(tmp_path):
    p = _sft_config(tmp_path, "train:\n  lrr: 0.1\n  batch_size: many\npeft:\n  method: magic\n")
    problems = _problems(p)
    assert len(problems) == 3
    assert f"{p}: train.lrr: unknown key (did you mean 'lr'?)" in problems
    assert f"{p}: train.batch_size: expected an integer, got 'many'" in problems
    assert any(s.startswith(f"{p}: peft.method: expected one of") and "'magic'" in s for s in problems)


def test_override_error_is_attributed_to_the_command_line(tmp_path):
    p = _sft_config(tmp_path, "")
    assert _problems(p, ["train.epochs=lots"]) == [f"{p} (command line): train.epochs: expected a number, got 'lots'"]


def test_impossible_combination_is_fatal(tmp_path):
    p = _sft_config(tmp_path, "merge: true\npeft:\n  method: full\n")
    assert any("merge:" in s and "full fine-tuning" in s for s in _problems(p))


def test_overrides_win_and_parse_as_yaml(tmp_path):
    from stages.sft import Config

    p = _sft_config(tmp_path, "train:\n  lr: 0.1\n")
    cfg = load_config(Config, p, ["train.lr=0.5", "data.eval=null", "peft.target_modules=[q_proj, v_proj]"])
    assert cfg.train.lr == 0.5 and cfg.data.eval is None and cfg.peft.target_modules == ["q_proj", "v_proj"]


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="expected key.path=value"):
        apply_overrides({}, ["novalue"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_stage_config("sft", tmp_path / "nope.yaml")


def test_stage_mismatch_is_refused():
    with pytest.raises(ConfigError, match="configures 'base', not 'sft'"):
        load_stage_config("sft", "configs/tiny/base.yaml")


def test_hash_ignores_run_and_threads_but_not_hyperparameters():
    a = load_stage_config("sft", "configs/tiny/sft.yaml")
    b = load_stage_config("sft", "configs/tiny/sft.yaml", ["run=other", "threads=1", "onednn_cache=64"])
    c = load_stage_config("sft", "configs/tiny/sft.yaml", ["train.lr=0.5"])
    assert config_hash(a) == config_hash(b) != config_hash(c)


def test_onednn_cache_reaches_the_environment_before_the_stage_runs(tmp_path, monkeypatch):
    """oneDNN reads ONEDNN_PRIMITIVE_CACHE_CAPACITY at its first primitive, so the runner sets it from the config
    before the stage starts; a value the environment already holds wins."""
    import os

    from alignment.runner import run_stage

    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    run_stage("base", "configs/tiny/base.yaml", ["onednn_cache=7"], root=tmp_path, run="r")
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "7"
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "200")
    run_stage("base", "configs/tiny/base.yaml", ["onednn_cache=7"], root=tmp_path, run="r2")
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "200"
    with pytest.raises(ConfigError, match="onednn_cache"):
        load_stage_config("base", "configs/tiny/base.yaml", ["onednn_cache=-1"])


def test_secrets_are_redacted():
    out = redact({"judge": {"api_key": "sk-123", "model": "m", "max_new_tokens": 64}, "hf_token": "hf_x",
                  "items": [{"password": "p"}], "openai_api_key": "sk-9", "pad_token": "<pad>"})
    assert out == {"judge": {"api_key": "***", "model": "m", "max_new_tokens": 64}, "hf_token": "***",
                   "items": [{"password": "***"}], "openai_api_key": "***", "pad_token": "<pad>"}


def test_secrets_are_scrubbed_by_value_from_configs_logs_and_text(monkeypatch, caplog):
    """What a `*_env` variable holds and URL credentials never reach a manifest's config, a log line or an error."""
    import logging

    from alignment.config import config_dict, install_log_redaction, scrub_text

    monkeypatch.setenv("MY_JUDGE_CREDENTIAL", "s3cr3t-value-123")
    cfg = load_stage_config("label", "configs/tiny/label.yaml", [
        "judge.kind=openai", "judge.model=m", "judge.api_key_env=MY_JUDGE_CREDENTIAL",
        "judge.base_url=http://user:pa55word@host:8080/v1?k=s3cr3t-value-123"])
    dumped = str(config_dict(cfg))
    assert "pa55word" not in dumped and "s3cr3t-value-123" not in dumped
    assert config_dict(cfg)["judge"]["base_url"] == "http://***@host:8080/v1?k=***"
    assert config_dict(cfg)["judge"]["api_key_env"] == "MY_JUDGE_CREDENTIAL"  # the name is no secret
    install_log_redaction()
    caplog.set_level("INFO", logger="align")
    logging.getLogger("align").info("calling %s with key %s", "https://a:b@x.org/v1", "s3cr3t-value-123")
    assert caplog.records[-1].getMessage() == "calling https://***@x.org/v1 with key ***"
    assert scrub_text("error from s3cr3t-value-123") == "error from ***"


def test_bounds_strict_scalars_and_duplicates_name_the_key(tmp_path):
    p = _sft_config(tmp_path, "seed: 1\ntrain:\n  lr: 0.1\n  max_steps: true\n")
    assert _problems(p) == [f"{p}: train.max_steps: expected a number, got true"]
    p = _sft_config(tmp_path, "train:\n  batch_size: 0\n  lr: -1.0\npeft:\n  dropout: 1.0\n")
    assert _problems(p) == [f"{p}: peft.dropout: must be in [0, 1), got 1.0", f"{p}: train.lr: must be > 0, got -1.0",
                            f"{p}: train.batch_size: must be >= 1, got 0"]
    p = _sft_config(tmp_path, "packing: 1\n")
    assert _problems(p) == [f"{p}: packing: expected true or false, got 1"]
    p = _sft_config(tmp_path, "train:\n  lr: 0.1\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match=r"line 4, column 3: duplicate key 'lr' \(first given on line 3\)"):
        load_stage_config("sft", p)
    with pytest.raises(ConfigError, match="the value is not valid YAML"):
        apply_overrides({}, ["train.lr=[1"])
