"""`align status`: every stage's key figures under the names the stages write, and why a stage stopped."""

from __future__ import annotations

import json
import shutil

import pytest

from alignment.artifacts import ArtifactStore
from alignment.errors import AlignError
from alignment.status import _key_metrics, _partial_state, stage_rows

# Metrics as the stages write them (shapes copied from a tiny pipeline run's metrics.json files).
REWARD = {"eval_accuracy": 0.5, "eval_accuracy_before": 0.6875, "eval_ece": 0.4217, "eval_mean_margin": 0.4486,
          "eval_length_corr": -0.2098, "gate_passed": True, "train_loss": 0.407}
DPO = {"eval": {"dpo/prefers_chosen_sum": 0.75, "sft/prefers_chosen_sum": 0.625, "rewards/accuracies": 0.59375,
                "rewards/margins": 0.00107, "kl_seq": 0.002973}, "train": {"loss": 0.69}}
PPO = {"algorithm": "ppo", "eval_reward": {"first": 1.1, "last": 0.632, "max": 1.1, "min": 0.63},
       "kl": {"first": 0.0, "last": 0.31, "max": 0.85, "min": -0.04},
       "missing_eos_rate": {"first": 1.0, "last": 0.875, "max": 1.0, "min": 0.875}}
LABEL = {"pairs": 24, "gold_agreement": 0.55, "position_bias_rate": 0.9, "unparseable_rate": 0.0, "judged": 48}
EVAL = {"baseline": "sft", "win_rate": 0.46875, "models": {
    "sft": {"gold": {"pass_rate": 0.1875}, "reward": {"mean": 2.5}},
    "dpo": {"judge": {"win_rate": 0.46875}, "gold": {"pass_rate": 0.25}, "reward": {"mean": 2.5},
            "kl": {"kl_seq": 0.0014}},
    "ppo": {"judge": {"win_rate": 1.0}, "gold": {"pass_rate": 0.0625}, "reward": {"mean": 3.6},
            "kl": {"kl_seq": 1.27}}}}


def test_each_stage_shows_its_own_figures():
    assert _key_metrics(REWARD, "reward") == "acc=0.688->0.5  ece=0.422  margin=0.449  len_corr=-0.21"
    assert _key_metrics({**REWARD, "gate_passed": False}, "reward").endswith("gate FAILED")
    held = {**REWARD, "eval_sets": ["heldout_phrasings"], "heldout_phrasings_accuracy": 0.8125}
    assert _key_metrics(held, "reward") == ("acc=0.688->0.5  heldout_phrasings_acc=0.812  ece=0.422  margin=0.449  "
                                            "len_corr=-0.21")
    assert _key_metrics(DPO, "dpo") == "pref_acc=0.625->0.75  reward_acc=0.594  margin=0.00107  kl=0.00297"
    assert _key_metrics(PPO, "ppo") == "reward=1.1->0.632  kl=0->0.31  missing_eos=1->0.875"
    assert _key_metrics(LABEL, "label") == "pairs=24  gold_agree=0.55  pos_bias=0.9  unparsed=0"
    grpo = {"algorithm": "grpo", "reward_first": 0.1, "reward_last": 0.4, "kl_last": 0.02, "steps": 8}
    assert _key_metrics(grpo, "ppo") == _key_metrics(grpo, "grpo") == "reward=0.1->0.4  kl=0.02  steps=8"


def test_eval_names_whose_win_rate_it_is():
    line = _key_metrics(EVAL, "eval")
    assert line == ("dpo vs sft: win=0.469 gold=0.25 reward=2.5 kl=0.0014;  "
                    "ppo vs sft: win=1 gold=0.0625 reward=3.6 kl=1.27;  sft: gold=0.188 reward=2.5")


def test_unknown_stage_and_missing_figures_fall_back_quietly():
    assert _key_metrics({"eval_loss": 1.5, "note": "x"}, "someday") == "eval_loss=1.5"
    assert _key_metrics({}, "dpo") == ""


def test_partial_states_name_their_cause(tmp_path):
    assert _partial_state(tmp_path).startswith("interrupted (partial; killed")
    (tmp_path / "failure.json").write_text(json.dumps({"kind": "preempted", "error": "Requeue", "message": "x"}))
    assert _partial_state(tmp_path).startswith("preempted (checkpoint saved")


@pytest.mark.slow
def test_a_failed_data_load_shows_as_failed_with_its_message(tiny_store, tmp_path):
    """The real runner on a broken training file: status says failed and why, not 'interrupted'."""
    from alignment.runner import run_stage

    root, run = tiny_store
    shutil.copytree(root / run / "base", tmp_path / "r" / "base")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi", "completion": "there"}\nnot json at all\n')
    with pytest.raises(AlignError) as err:
        run_stage("sft", "configs/tiny/sft.yaml", [f"data.train={bad}"], root=tmp_path, run="r")
    rows = {r["stage"]: r for r in stage_rows(ArtifactStore(tmp_path), "r")}
    status = rows["sft"]["status"]
    assert status.startswith(f"failed: {type(err.value).__name__}: "), status
    assert "bad.jsonl" in status
    # the attempt's log is kept with the partial work, the error last
    log = (tmp_path / "r" / "sft.partial" / "stage.log").read_text()
    assert "attempt started" in log and "bad.jsonl" in log.splitlines()[-1]
    assert rows["base"]["metrics"].startswith("params=")


def _log_line(t: float, text: str) -> str:
    import time

    return f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.localtime(t))} DEBUG align: {text}\n"


def test_a_partial_stage_shows_its_step_of_the_total_its_checkpoint_and_time_left(tmp_path):
    """The last logged step of the newest attempt, of max_steps from the newest complete checkpoint (a torn one
    skipped); time left = steps to go x the median seconds a step over the latest rows, so a pause (a stopped job)
    does not count: intervals 4, 4, 192, 4 s a step -> 4 s; (200 - 80) x 4 s = 480 s = 8m."""
    from alignment.status import progress

    part = tmp_path / "reward.partial"
    (part / "checkpoints" / "checkpoint-50").mkdir(parents=True)
    (part / "checkpoints" / "checkpoint-50" / "trainer_state.json").write_text('{"global_step": 50, "max_steps": 200}')
    (part / "checkpoints" / "checkpoint-75").mkdir()
    (part / "checkpoints" / "checkpoint-75" / "trainer_state.json").write_text('{"global_st')  # killed mid-write
    t = 1_800_000_000.0
    log = [_log_line(t - 5000, f"step {s}: {{}}") for s in (5, 10, 15)]  # an earlier attempt, at another pace
    log.append(_log_line(t - 100, "[reward] attempt started on host (pid 1, rank 0, Slurm job -)").replace(
        "DEBUG", "INFO"))
    log += [_log_line(t + dt, f'step {s}: {{"loss": 0.6}}') for dt, s in ((0, 60), (20, 65), (40, 70), (1000, 75),
                                                                          (1020, 80))]
    (part / "stage.log").write_text("".join(log))
    assert progress(part) == "step 80/200 (40%), checkpoint 50"
    assert progress(part, now=t + 1050) == "step 80/200 (40%), logged 30s ago, ~8m left, checkpoint 50"
    (part / "checkpoints" / "checkpoint-50" / "trainer_state.json").unlink()  # no checkpoint yet: no total
    assert progress(part, now=t + 1050) == "step 80, logged 30s ago"
    assert progress(tmp_path / "nothing.partial") == ""


def test_a_partial_ppo_counts_its_updates_of_the_configured_ones(tmp_path):
    from alignment.status import progress

    part = tmp_path / "ppo.partial"
    (part / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (part / "checkpoints" / "checkpoint-2" / "trainer_state.json").write_text('{"update": 2}')
    (part / "config.yaml").write_text("stage: ppo\nppo:\n  updates: 12\n")
    (part / "log_history.jsonl").write_text('{"step": 0}\n{"step": 1}\n{"step": 3, "kl": 0.1}\n')
    assert progress(part, now=0.0) == "step 3/12 (25%), checkpoint 2"


def test_status_rows_show_a_partial_stages_progress(tmp_path):
    part = tmp_path / "r" / "sft.partial"
    part.mkdir(parents=True)
    (part / "stage.log").write_text(_log_line(1_800_000_000.0, 'step 10: {"loss": 2.5}'))
    rows = {r["stage"]: r for r in stage_rows(ArtifactStore(tmp_path), "r")}
    assert rows["sft"]["status"].startswith("interrupted") and rows["sft"]["metrics"] == "step 10"


def test_a_stage_whose_input_was_republished_shows_as_stale(tiny_store, tmp_path):
    """As `dvc status`: after `--force` upstream, a downstream stage's figures are of the old input."""
    root, run = tiny_store
    for stage in ("base", "sft"):  # only these: other tests may leave partial folders in the shared run
        shutil.copytree(root / run / stage, tmp_path / "r" / stage)
    sft_manifest = tmp_path / "r" / "sft" / "manifest.json"
    m = json.loads(sft_manifest.read_text())
    m["inputs"]["base"]["path"] = str(tmp_path / "r" / "base")  # the copy's base, as a run in this root records it
    sft_manifest.write_text(json.dumps(m))
    rows = {r["stage"]: r for r in stage_rows(ArtifactStore(tmp_path), "r")}
    assert rows["sft"]["status"] == "complete" and rows["base"]["status"] == "complete"

    base_manifest = tmp_path / "r" / "base" / "manifest.json"
    base_manifest.write_text(json.dumps(json.loads(base_manifest.read_text()), indent=1))  # republished: new bytes
    rows = {r["stage"]: r for r in stage_rows(ArtifactStore(tmp_path), "r")}
    assert rows["sft"]["status"] == "complete; stale: base changed since" and rows["base"]["status"] == "complete"
    shutil.rmtree(tmp_path / "r" / "base")
    rows = {r["stage"]: r for r in stage_rows(ArtifactStore(tmp_path), "r")}
    assert "base" not in rows and rows["sft"]["status"] == "complete; stale: base changed since"


def test_status_says_what_replaced_artifacts_hold_and_how_to_remove_them(tmp_path, capsys):
    """Re-published stages are moved aside, never deleted for the user; status says so, with their size."""
    from alignment.manifest import Manifest, list_outputs
    from alignment.status import print_status

    store = ArtifactStore(tmp_path)
    for payload in (b"x" * 2**20, b"y" * 2**20, b"z"):
        partial = store.partial_dir("r", "sft")
        (partial / "model").mkdir(parents=True)
        (partial / "model" / "w.bin").write_bytes(payload)
        store.publish("r", "sft", Manifest(stage="sft", run="r", config={}, config_hash="h",
                                           outputs=list_outputs(partial)))
    print_status(str(tmp_path), "r")
    out = " ".join(capsys.readouterr().out.split())
    assert f"2 replaced artifact(s) kept aside (2.0 MiB); remove with: rm -rf {tmp_path / 'r'}/*.old-*" in out


def test_a_stage_s_age_is_from_its_manifest_not_the_file_time():
    """A copied or restored store gives every manifest a new mtime; the age shown is since the stage finished."""
    import time

    from alignment.status import _finished_age

    an_hour_ago = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(time.time() - 3600))
    assert 3590 < _finished_age(an_hour_ago, 5.0) < 3700
    assert _finished_age("", 5.0) == 5.0 and _finished_age("yesterday", 5.0) == 5.0


def test_inputs_recorded_relative_to_another_directory_are_found_beside_the_stage(tiny_store, tmp_path):
    """With the default `./artifacts`, inputs are recorded relative to where the stage ran; status may run elsewhere."""
    from alignment.status import changed_inputs

    root, run = tiny_store
    for stage in ("base", "sft"):
        shutil.copytree(root / run / stage, tmp_path / "r" / stage)
    m = json.loads((tmp_path / "r" / "sft" / "manifest.json").read_text())
    m["inputs"]["base"]["path"] = "artifacts/r/base"  # as the stage recorded it, run from a repository root
    from alignment.manifest import Manifest

    assert changed_inputs(Manifest.model_validate(m), tmp_path / "r" / "sft") == []
    m["inputs"]["base"]["manifest_sha256"] = "0" * 64
    assert changed_inputs(Manifest.model_validate(m), tmp_path / "r" / "sft") == ["base"]
