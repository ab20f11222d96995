"""Tracking: key namespacing, the replay of log_history, and real offline wandb runs read back from disk."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from alignment import tracking
from alignment.cli import main

FAKE_TOKEN = "sk-FAKE-token-0123456789"
FAKE_ENV_VALUE = "sk-FAKE-judge-key-9876543210"


def test_namespacing_and_flattening():
    assert tracking.namespaced({"loss": 0.5, "eval_loss": 0.7, "rewards/margins": 0.1, "step": 3, "note": "x"}) == \
        {"train/loss": 0.5, "eval/loss": 0.7, "rewards/margins": 0.1}
    assert tracking.flatten({"eval": {"kl": 1.0, "bad": float("nan")}, "steps": 4, "list": [1]}, "dpo") == \
        {"dpo/eval/kl": 1.0, "dpo/steps": 4}


def test_mode_is_offline_without_a_key(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert tracking.wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert tracking.wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert tracking.wandb_mode() == "disabled"


def test_tracking_key_defaults_and_stays_out_of_the_hash(monkeypatch):
    from alignment.config import config_hash
    from stages.dpo import Config

    monkeypatch.setenv("ALIGN_TRACKING", "wandb")
    a = Config(stage="dpo")
    # Outside the runner a trainer reports nowhere; the runner's stage_run points it at the stage's run.
    assert a.tracking == "wandb" and a.report_to == "none" and a._report_to_follows_tracking
    b = Config(stage="dpo", tracking="none")
    c = Config(stage="dpo", tracking="wandb", report_to="tensorboard")
    assert c.report_to == "tensorboard" and not c._report_to_follows_tracking
    assert config_hash(a) == config_hash(b) == config_hash(c)
    monkeypatch.setenv("ALIGN_TRACKING", "none")
    assert Config(stage="dpo").tracking == "none"


class Recorder(tracking.Tracker):
    def __init__(self, ctx):
        super().__init__(None, ctx, Path("."))
        self.calls = []

    def _log(self, metrics, step):
        self.calls.append(("log", metrics, step))

    def _samples(self, rows):
        self.calls.append(("samples", rows))

    def _summary(self, values):
        self.calls.append(("summary", values))


def test_published_replays_log_history_only_when_nothing_was_logged_live(tmp_path):
    (tmp_path / "log_history.jsonl").write_text(json.dumps({"loss": 1.0, "step": 2}) + "\n"
                                                + json.dumps({"ppo/kl": 0.1, "objective/scores": 0.3, "step": 4}) + "\n")
    (tmp_path / tracking.SAMPLES).write_text(json.dumps({"prompt": "p", "response": "r", "reward": 0.5}) + "\n")
    ctx = SimpleNamespace(stage="ppo", run="r", metrics={"eval": {"reward": 0.4}})
    rec = Recorder(ctx)
    rec.published(tmp_path)
    assert rec.calls == [("log", {"train/loss": 1.0}, 2), ("log", {"ppo/kl": 0.1, "objective/scores": 0.3}, 4),
                         ("samples", [{"prompt": "p", "response": "r", "reward": 0.5}]),
                         ("summary", {"ppo/eval/reward": 0.4})]
    live = Recorder(ctx)
    live.log({"ppo/kl": 0.2}, step=1)
    live.published(tmp_path)
    assert [c[0] for c in live.calls] == ["log", "samples", "summary"]


def _wait_until_flushed(files, timeout_s: float = 30.0) -> None:
    """wandb's writer process may still be flushing a finished run's file under load: wait for its exit record."""
    import time

    def flushed(f) -> bool:
        try:
            return any(r.WhichOneof("record_type") == "exit" for r in tracking.wandb_records(f))
        except Exception:  # a record cut short mid-write
            return False

    deadline = time.monotonic() + timeout_s
    for f in files:
        while not flushed(f):
            assert time.monotonic() < deadline, f"{f}: no exit record after {timeout_s} s"
            time.sleep(0.5)


@pytest.mark.slow
def test_offline_wandb_runs_group_lineage_metrics_and_no_secrets(tiny_store, tmp_path, monkeypatch):
    from alignment.judges import Judge, register_judge

    class FirstIsBetter(Judge):  # pure position bias
        name = "rule:first"

        def first_better(self, prompts, first, second):
            return [0.6] * len(first)

    register_judge("first_test", lambda spec, inputs, precision: FirstIsBetter(spec))
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("FAKE_JUDGE_KEY", FAKE_ENV_VALUE)
    src, run = tiny_store
    root = tmp_path / "store"
    shutil.copytree(src, root)
    shutil.rmtree(root / run / ".tracking", ignore_errors=True)  # only this test's runs
    # (A secret typed as a config key is refused now: `inputs.*` takes stage names only. The judge's key, read
    # from the variable judge.api_key_env names, is the secret that must not reach the dashboard.)
    args = ["--artifacts", str(root), "--run", run, "tracking=wandb"]
    assert main(["run", "dpo", "-c", "configs/tiny/dpo.yaml", "train.max_steps=4", "train.logging_steps=1",
                 "eval.kl_prompts=0", *args]) == 0
    assert main(["run", "eval", "-c", "configs/tiny/eval.yaml", "reward=false", "judge.kind=first_test",
                 "judge.api_key_env=FAKE_JUDGE_KEY", "max_prompts=4", "kl.prompts=2", *args]) == 0

    files = sorted((root / run / ".tracking" / "wandb").glob("offline-run-*/run-*.wandb"))
    _wait_until_flushed(files)
    runs = {r["job_type"]: r for r in map(tracking.read_offline_run, files)}
    assert len(files) == 2 and set(runs) == {"dpo", "eval"}  # one run per stage: the HF trainer made none of its own
    dpo, ev = runs["dpo"], runs["eval"]
    assert dpo["group"] == ev["group"] == run and dpo["name"] == f"{run}/dpo"

    # Resolved config, secrets redacted; HF's trainer logged live into the same run (one run per stage).
    assert dpo["config"]["dpo"]["beta"] == 0.1 and dpo["config"]["inputs"] == {}
    assert ev["config"]["judge"]["api_key_env"] == "FAKE_JUDGE_KEY"
    keys = {k for row in dpo["history"] for k in row}
    assert {"train/loss", "train/rewards/margins", "train/global_step"} <= keys
    assert dpo["summary"]["dpo/steps"] == 4 and "dpo/eval/rewards/margins" in dpo["summary"]
    # The rule judge always prefers the first-shown response: both orders cancel to ties, all disagreeing.
    assert ev["summary"]["eval/win_rate"] == 0.5 and ev["summary"]["eval/models/dpo/judge/position_disagreement"] == 1
    assert "eval/models/dpo/kl/kl_seq" in ev["summary"]
    table = next(row for row in ev["history"] if row.get("samples/_type") == "table-file")
    assert table["samples/nrows"] == 4 * 2  # 4 prompts x (baseline + policy), from the artifact's samples.jsonl
    plots = sorted(p.stem for p in (root / run / "eval" / "plots").glob("*.png"))
    images = {k.split("/")[1] for row in ev["history"] for k in row if k.startswith("plots/") and k.endswith("/_type")
              and row[k] == "image-file"}
    assert plots and images == set(plots)  # the report plots, as images
    assert dpo["tags"][0] == "dpo" and any(t.startswith("git:") for t in dpo["tags"])
    # the HF trainer logged live: the history was not replayed a second time at publish
    assert [row["train/global_step"] for row in dpo["history"] if "train/loss" in row] == [1, 2, 3, 4]

    # Lineage: each run logs its own artifact as a file:// reference and uses its inputs' artifacts, the
    # same versions (digests) their producers logged: sft -> dpo -> eval.
    produced = {a["name"]: a for r in runs.values() for a in r["artifacts"] if not a["used"] and a["type"] != "run_table"}
    used = {(r["job_type"], a["name"]): a for r in runs.values() for a in r["artifacts"] if a["used"]}
    assert set(produced) == {f"{run}-dpo", f"{run}-eval"}
    assert f"file://{(root / run / 'dpo').resolve()}/manifest.json" in produced[f"{run}-dpo"]["refs"]
    assert ("dpo", f"{run}-sft") in used and ("eval", f"{run}-sft") in used
    assert used["eval", f"{run}-dpo"]["digest"] == produced[f"{run}-dpo"]["digest"]

    # No secret anywhere in what wandb wrote.
    for f in (root / run / ".tracking").rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            assert FAKE_TOKEN.encode() not in data and FAKE_ENV_VALUE.encode() not in data, f


def _has_tensorboard() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


def test_run_id_is_kept_for_the_attempt_chain(tmp_path):
    ids = iter(["first", "second"])
    partial = tmp_path / "sft.partial"
    partial.mkdir()
    assert tracking.attempt_run_id(partial, lambda: next(ids)) == "first"
    assert tracking.attempt_run_id(partial, lambda: next(ids)) == "first"  # a requeued attempt resumes the run
    fresh = tmp_path / "other.partial"
    fresh.mkdir()
    assert tracking.attempt_run_id(fresh, lambda: next(ids)) == "second"


def test_tags_name_the_slurm_job_and_the_commit(monkeypatch):
    from alignment.manifest import git_commit

    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    tags = tracking.run_tags("ppo")
    assert tags[:3] == ["ppo", "slurm:4242", "slurm-restart:1"]
    commit = git_commit()
    assert (f"git:{commit[:12]}" in tags) if commit else len(tags) == 3


def test_live_rows_and_sample_tables_reach_the_active_tracker(tmp_path):
    ctx = SimpleNamespace(stage="ppo", run="r", metrics={})
    rec = Recorder(ctx)
    rec.samples_table = lambda rows, key, step: rec.calls.append(("table", key, step, rows))
    tracking._active = rec
    try:
        tracking.log_row({"ppo/kl": 0.2, "loss": 1.5, "step": 3, "note": "x"})
        tracking.log_samples([{"prompt": "p", "response": "r", "reward": 1.0}], key="ppo/eval_samples", step=3)
    finally:
        tracking._active = None
    assert rec.calls == [("log", {"ppo/kl": 0.2, "train/loss": 1.5}, 3),
                         ("table", "ppo/eval_samples", 3, [{"prompt": "p", "response": "r", "reward": 1.0}])]
    tracking.log_row({"loss": 1.0, "step": 1})  # no active tracker: nothing, no error


def _events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


@pytest.mark.skipif(not _has_tensorboard(), reason="tensorboard not installed (pip install -e '.[test]')")
def test_tensorboard_tracker_writes_events_that_read_back(tmp_path):
    """Live rows, a samples table, the report plots as images and the summary, read back with TensorBoard's own
    EventAccumulator."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    final = tmp_path / "store" / "r" / "eval"
    (final / "plots").mkdir(parents=True)
    fig, ax = plt.subplots(figsize=(2, 1.5))
    ax.plot([0, 1], [1, 0])
    fig.savefig(final / "plots" / "reward.png")
    plt.close(fig)
    (final / tracking.SAMPLES).write_text(json.dumps({"prompt": "p|q", "response": "r", "reward": 0.5}) + "\n")
    (final / tracking.PAIRS).write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "a", "rejected": "b",
                                                            "p_chosen": 0.75}) + "\n" for i in range(300)))
    from alignment.runner import load_stage_config

    cfg = load_stage_config("eval", "configs/tiny/eval.yaml")
    ctx = SimpleNamespace(stage="eval", run="r", metrics={"win_rate": 0.75}, inputs={}, out_dir=final)
    tb = tracking.TensorboardTracker(cfg, ctx, tmp_path / "store")
    tb.log({"ppo/kl": 0.5}, step=2)
    tb.log({"ppo/kl": 0.25}, step=4)
    tb.published(final)
    tb.finish()
    acc = _events(tb.dir)
    assert [(e.step, e.value) for e in acc.Scalars("ppo/kl")] == [(2, 0.5), (4, 0.25)]
    assert acc.Scalars("eval/win_rate")[0].value == 0.75
    (image,) = acc.Images("plots/reward")
    assert image.width == 200 and image.height == 150
    text = acc.Tensors("samples/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| prompt | response | reward |" in text and "p\\|q" in text
    pairs = acc.Tensors("pairs/text_summary")[0].tensor_proto.string_val[0].decode().splitlines()
    assert pairs[0] == "| prompt | chosen | rejected | p_chosen |" and len(pairs) == 2 + tracking.MAX_TABLE_ROWS


@pytest.mark.slow
@pytest.mark.skipif(not _has_tensorboard(), reason="tensorboard not installed (pip install -e '.[test]')")
def test_a_stage_with_tracking_tensorboard_writes_the_trainers_curves(tiny_store, tmp_path):
    root, run = tiny_store
    shutil.copytree(root / run / "base", tmp_path / run / "base")
    assert main(["run", "sft", "-c", "configs/tiny/sft.yaml", "tracking=tensorboard", "train.max_steps=4",
                 "train.logging_steps=1", "--artifacts", str(tmp_path), "--run", run]) == 0
    acc = _events(tmp_path / run / ".tracking" / "tensorboard" / "sft")
    tags = acc.Tags()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]  # the HF trainer, live, into our folder
    assert acc.Scalars("sft/eval_loss")[0].value > 0  # the stage's summary
    assert "tags/text_summary" in tags["tensors"] and "config/text_summary" in tags["tensors"]


@pytest.mark.skipif(_has_tensorboard(), reason="tensorboard is installed: the stage would run")
def test_tensorboard_without_the_package_is_a_clear_error(tmp_path, capsys):
    code = main(["run", "base", "-c", "configs/tiny/base.yaml", "tracking=tensorboard", "--artifacts", str(tmp_path)])
    assert code == 2
    assert "tracking: tensorboard needs the tensorboard package (pip install tensorboard)" in capsys.readouterr().err


@pytest.mark.slow
def test_a_requeued_stage_resumes_its_wandb_run(tiny_store, tmp_path):
    """USR1 mid-training (Slurm's warning), exit 3, the same command again: one wandb run id for both attempts,
    tagged with the Slurm job, resumed (`resume="allow"`) rather than split into two runs."""
    import signal
    import subprocess
    import sys
    import time

    from alignment.preemption import REQUEUE_EXIT

    root, run = tiny_store
    shutil.copytree(root / run / "base", tmp_path / "q" / "base")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path), SLURM_JOB_ID="777", ALIGN_TRACKING="wandb")
    cmd = [sys.executable, "-m", "alignment.cli", "run", "sft", "-c", "configs/tiny/sft.yaml", "--artifacts",
           str(tmp_path), "--run", "q", "train.max_steps=40", "train.save_steps=1", "train.logging_steps=1"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    ckpts = tmp_path / "q" / "sft.partial" / "checkpoints"
    deadline = time.monotonic() + 120
    while not list(ckpts.glob("checkpoint-*/trainer_state.json")):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == REQUEUE_EXIT, err[-3000:]
    run_id = json.loads((tmp_path / "q" / "sft.partial" / tracking.RUN_ID_FILE).read_text())["wandb_run_id"]
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**env, "SLURM_RESTART_COUNT": "1"})
    assert again.returncode == 0, again.stderr[-3000:]
    files = sorted((tmp_path / "q" / ".tracking" / "wandb").glob("offline-run-*/run-*.wandb"))
    _wait_until_flushed(files)
    attempts = [tracking.read_offline_run(f) for f in files]
    assert len(attempts) == 2 and {a["id"] for a in attempts} == {run_id}
    assert all(f.name == f"run-{run_id}.wandb" for f in files)
    assert "slurm:777" in attempts[0]["tags"] and "slurm-restart:1" in attempts[1]["tags"]
    steps = sorted({row["train/global_step"] for a in attempts for row in a["history"] if "train/loss" in row})
    assert steps[0] == 1 and steps[-1] == 40  # one curve across both attempts, continued from the checkpoint
