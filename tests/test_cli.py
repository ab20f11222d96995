"""The CLI as a TRL user meets it: TrainingArguments names, `train.args`, `config schema STAGE`, pipeline overrides."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from alignment.errors import ConfigError
from alignment.runner import load_stage_config, route_overrides
from alignment.training import trainer_args


def _align(*args):
    return subprocess.run([sys.executable, "-m", "alignment.cli", *args], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ))


def test_training_arguments_names_are_accepted_and_the_command_line_wins():
    # configs/tiny/sft.yaml says `lr`; the override's `learning_rate` is the same setting and wins.
    cfg = load_stage_config("sft", "configs/tiny/sft.yaml", ["train.learning_rate=0.003",
                                                            "train.per_device_train_batch_size=3",
                                                            "train.gradient_accumulation_steps=2"])
    assert (cfg.train.lr, cfg.train.batch_size, cfg.train.grad_accum) == (0.003, 3, 2)
    args = trainer_args(cfg.train, out_dir="x", seed=1, precision="fp32", report_to="none")
    assert (args["learning_rate"], args["per_device_train_batch_size"], args["gradient_accumulation_steps"]) == \
        (0.003, 3, 2)


def test_train_args_pass_through_and_are_checked_at_load():
    cfg = load_stage_config("sft", "configs/tiny/sft.yaml", ["train.args={optim: adafactor, eval_strategy: steps}"])
    args = trainer_args(cfg.train, out_dir="x", seed=1, precision="fp32", report_to="none")
    assert args["optim"] == "adafactor" and args["eval_strategy"] == "steps"
    with pytest.raises(ConfigError) as err:
        load_stage_config("sft", "configs/tiny/sft.yaml",
                          ["train.args={optimm: adafactor, eval_strategy: sometimes, learning_rate: 1, seed: 3, "
                           "torch_compile: maybe}"])
    (line,) = err.value.problems
    assert line.startswith("configs/tiny/sft.yaml (command line): train.args: ")
    for part in ("optimm: not a transformers.TrainingArguments field (did you mean 'optim'?)",
                 "eval_strategy: expected one of ['epoch', 'no', 'steps'], got 'sometimes'",
                 "learning_rate: set train.lr instead", "seed: not settable here",
                 "torch_compile: Input should be a valid boolean"):
        assert part in line


def test_config_schema_lists_every_key_with_type_default_and_doc():
    out = _align("config", "schema", "sft")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    lr = lines.index("train.lr: float = 0.0002  (also: learning_rate)")
    assert lines[lr + 1].strip().startswith("Peak learning rate")
    assert "train.args: dict[str, Any] = {}" in lines
    assert any(line.startswith("peft.method: one of 'lora'") for line in lines)
    assert any(line.startswith("data.sources.<i>.weight: float | None = null") for line in lines)
    manifest = _align("config", "schema", "manifest")
    assert json.loads(manifest.stdout)["title"] == "Manifest"
    bad = _align("config", "schema", "sfft")
    assert bad.returncode == 2 and "unknown stage 'sfft'" in bad.stderr


def test_pipeline_overrides_are_routed_by_stage():
    routed = route_overrides(["sft.train.lr=1e-4", "dpo:beta=0.2", "seed=3", "ppo.eval.batch_size=2"],
                             ["sft", "dpo", "ppo"])
    assert routed == {"sft": ["train.lr=1e-4", "seed=3"], "dpo": ["beta=0.2", "seed=3"],
                      "ppo": ["seed=3", "eval.batch_size=2"]}
    with pytest.raises(ConfigError, match="the pipeline has no stage 'reward'"):
        route_overrides(["reward:train.lr=1"], ["sft", "dpo"])


@pytest.mark.slow
def test_align_pipeline_applies_a_routed_override_and_train_args(tiny_store, tmp_path):
    root, run = tiny_store
    shutil.copytree(root / run / "base", tmp_path / "p" / "base")
    pipe = tmp_path / "pipeline.yaml"
    pipe.write_text(f"run: p\nstages:\n  - {{stage: sft, config: {os.path.abspath('configs/tiny/sft.yaml')}}}\n")
    out = _align("pipeline", "-c", str(pipe), "--artifacts", str(tmp_path), "sft.train.max_steps=2",
                 "sft.train.args={logging_first_step: true}", "sft.train.logging_steps=2")
    assert out.returncode == 0, out.stderr[-3000:]
    from alignment.artifacts import ArtifactStore

    art = ArtifactStore(tmp_path).read_stage("p", "sft")
    assert art.manifest.config["train"]["max_steps"] == 2 and art.manifest.metrics["steps"] == 2
    rows = [json.loads(line) for line in (art.path / "log_history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]  # logging_first_step reached the trainer
    log = (art.path / "stage.log").read_text()
    assert "step 1: {" in log and '"loss"' in log  # the trainer's rows are in the stage log


def test_a_reader_that_goes_away_ends_the_command_quietly():
    # `align config schema ppo | head -1`: the pipe's reader is gone before align writes (its read end closed
    # here at once), so every write fails with EPIPE. Exit 141 like a shell's SIGPIPE, and nothing on stderr:
    # no "align: error", no "Exception ignored ... BrokenPipeError" at the interpreter's exit.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([sys.executable, "-m", "alignment.cli", "config", "schema", "ppo"], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=300, env=dict(os.environ))
    finally:
        os.close(write_end)
    assert proc.returncode == 141, proc.stderr
    assert proc.stderr == ""


@pytest.mark.parametrize("override, expected", [
    ("train.max_steps=2", "command line: 'train.max_steps=2': train: unknown key (did you mean 'tracking'?) "
                          "(stages base, eval, ppo; with no stage prefix it goes to every stage: write "
                          "STAGE.train.max_steps=2"),
    ("grpo.train.lr=1", "(stages base, sft, reward, dpo, eval, ppo; the pipeline runs no 'grpo' stage, so it went"),
    ("seed=abc", "command line: 'seed=abc': seed: expected an integer, got 'abc' (stages base, sft, reward, dpo, eval, "
                 "ppo)"),
])
def test_a_pipeline_override_without_a_stage_prefix_is_one_line_naming_the_stages_it_misses(override, expected):
    """Sent to every stage, an override that fits some is one line (not one per stage), blamed on the command line
    and not on a stage's YAML file, with how to send it to one stage."""
    r = _align("submit", "-c", "configs/tiny/pipeline.yaml", "--dry-run", "--artifacts", "/nonexistent/x", override)
    errors = [x for x in r.stderr.splitlines() if x.startswith("align: error:")]
    assert r.returncode == 2 and len(errors) == 1 and expected in errors[0], r.stderr


def test_every_stage_s_config_problems_are_reported_at_once(tmp_path):
    r = _align("submit", "-c", "configs/tiny/pipeline.yaml", "--dry-run", "--artifacts", str(tmp_path),
               "sft.train.lr=fast", "dpo.train.lr=fast")
    errors = [x for x in r.stderr.splitlines() if x.startswith("align: error:")]
    assert r.returncode == 2 and [e.split(": ")[2] for e in errors] == ["configs/tiny/sft.yaml (command line)",
                                                                        "configs/tiny/dpo.yaml (command line)"]


def test_an_override_that_adds_an_unknown_section_is_blamed_on_the_command_line():
    with pytest.raises(ConfigError, match=r"^configs/tiny/base.yaml \(command line\): train: unknown key"):
        load_stage_config("base", "configs/tiny/base.yaml", ["train.max_steps=2"])


def test_store_commands_take_the_run_as_run_and_pipeline_do_too(tmp_path, capsys):
    """`align status --run R` = `align status R`; two different runs, or none where one is needed, is one line."""
    from alignment import cli
    from alignment.artifacts import ArtifactStore
    from alignment.manifest import Manifest, list_outputs

    store = ArtifactStore(tmp_path)
    partial = store.partial_dir("r", "sft")
    (partial / "model").mkdir(parents=True)
    (partial / "model" / "w.bin").write_bytes(b"w")
    store.publish("r", "sft", Manifest(stage="sft", run="r", config={}, config_hash="h", outputs=list_outputs(partial)))
    assert cli.main(["verify", "--run", "r", "--artifacts", str(tmp_path)]) == 0
    assert "1 artifact(s) verified" in capsys.readouterr().out
    for argv, line in [(["status", "r", "--run", "x"], "align: error: align status: RUN 'r' and --run 'x' disagree"),
                       (["report"], "align: error: align report: the run is required: `align report RUN`"),
                       (["export", "--run", "r", "sft"],
                        "align: error: align export: unrecognized arguments: --run; the run is positional here"),
                       (["--nope", "status"], "align: error: align status: unrecognized arguments: --nope (see "
                                              "align status -h)")]:
        with pytest.raises(SystemExit) as e:
            cli.main([*argv, "--artifacts", str(tmp_path)])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1 and err.startswith(line), err
    with pytest.raises(SystemExit):
        cli.main(["nosuch"])
    assert capsys.readouterr().err.startswith("align: error: argument cmd: invalid choice")  # no "align: align:"
