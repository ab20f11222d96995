"""`align submit` on a real single-node Slurm cluster (tests/slurm_cluster.py), not a mock.

The chain publishes every stage; a failing stage cancels its dependents; a job signalled mid-training
checkpoints, requeues itself and resumes from that checkpoint (restart count 1) into a valid artifact.
Skipped when Slurm is not installed (scripts/install-slurm.sh), failed instead when ALIGN_REQUIRE_SERVICES=1.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from alignment.artifacts import ArtifactStore
from alignment.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parent))
import slurm_cluster  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TINY = [s["stage"] for s in yaml.safe_load((REPO / "configs/tiny/pipeline.yaml").read_text())["stages"]]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = slurm_cluster.missing()
    if why:
        if os.environ.get("ALIGN_REQUIRE_SERVICES") == "1":
            pytest.fail(f"ALIGN_REQUIRE_SERVICES=1 but no Slurm here: {why}")
        pytest.skip(f"no real Slurm: {why}")
    c = slurm_cluster.SlurmCluster(tmp_path_factory.mktemp("slurm"))
    c.start()
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(c.conf)  # sbatch/squeue/scontrol here and in the jobs find this cluster
    yield c
    c.stop()
    if old is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old


def _submit(capsys, *args) -> list[str]:
    assert main(["submit", *args]) == 0, capsys.readouterr().err
    return capsys.readouterr().out.split()


def _pipeline(tmp_path, run: str, steps: list[dict]) -> Path:
    """A pipeline file naming the tiny configs by absolute path (config paths are relative to the file)."""
    for s in steps:
        s["config"] = str(REPO / "configs" / "tiny" / f"{s['stage']}.yaml")
    path = tmp_path / f"{run}.yaml"
    path.write_text(yaml.safe_dump({"run": run, "stages": steps}))
    return path


def test_chain_publishes_every_stage_and_status_shows_jobs(cluster, tmp_path, capsys):
    art = tmp_path / "art"
    ids = _submit(capsys, "-c", "configs/tiny/pipeline.yaml", "--artifacts", str(art), "--run", "chain")
    assert len(ids) == len(TINY)
    states = cluster.wait(ids, timeout=240)
    assert set(states.values()) == {"COMPLETED"}, (states, _logs(art / "chain"))
    store = ArtifactStore(art)
    arts = {stage: store.read_stage("chain", stage) for stage in TINY}  # published, every output's hash verified
    reads = {"sft": ["base"], "reward": ["base", "sft"], "dpo": ["sft"], "ppo": ["sft", "reward"],
             "eval": ["base", "sft", "reward", "dpo", "ppo"]}
    for stage, before in reads.items():  # afterok: each stage started once the stages it reads had finished
        for b in before:
            assert arts[stage].manifest.started_at >= arts[b].manifest.finished_at, (stage, b)
    # the first eval (for dpo) was replaced by the last one: the chain removed it, as `align pipeline` does
    assert not list((art / "chain").glob("*.old-*")), sorted(p.name for p in (art / "chain").iterdir())
    assert main(["status", "chain", "--artifacts", str(art)]) == 0
    out = capsys.readouterr().out
    assert "replaced artifact" not in out
    newest = dict(zip(TINY, ids))  # eval is submitted twice: status shows each stage's newest job
    assert len(newest) < len(ids)
    for jid in newest.values():
        assert f"job {jid} COMPLETED" in out


def test_failing_stage_cancels_its_dependents(cluster, tmp_path, capsys):
    art = tmp_path / "art"
    ids = _submit(capsys, "-c", "configs/tiny/pipeline.yaml", "--artifacts", str(art), "--run", "broken",
                  "sft:data.train=/nonexistent/rows.jsonl")  # passes the config check at submit, fails in the job
    states = cluster.wait(ids, timeout=120)
    assert states[ids[0]] == "COMPLETED"  # base
    assert states[ids[1]] == "FAILED"
    assert cluster.job(ids[1])["ExitCode"] == "2:0"
    assert all(states[j] == "CANCELLED" for j in ids[2:]), states
    assert {cluster.job(j).get("Reason") for j in ids[2:]} == {"DependencyNeverSatisfied"}
    log = Path(glob.glob(str(art / "broken" / "slurm" / f"broken-sft-{ids[1]}.log"))[0]).read_text()
    assert "rows.jsonl: file not found" in log
    assert not any((art / "broken" / s).exists() for s in TINY[1:])


def test_signalled_job_requeues_and_resumes_from_its_checkpoint(cluster, tmp_path, capsys):
    art = tmp_path / "art"
    pipeline = _pipeline(tmp_path, "pre", [
        {"stage": "base"},
        # Slow enough to be signalled mid-training; a checkpoint every step.
        {"stage": "sft", "overrides": ["train.max_steps=120", "train.save_steps=1", "train.logging_steps=10"]},
    ])
    ids = _submit(capsys, "-c", str(pipeline), "--artifacts", str(art))
    sft = ids[1]
    ckpts = str(art / "pre" / "sft.partial" / "checkpoints" / "checkpoint-*" / "trainer_state.json")
    deadline = time.monotonic() + 120
    while not glob.glob(ckpts):
        assert time.monotonic() < deadline, cluster.queue()
        time.sleep(0.2)
    assert cluster.job(sft)["JobState"] == "RUNNING"
    # What Slurm does at --signal=B:USR1@N, without waiting for the time limit.
    subprocess.run(["scancel", "--signal=USR1", "--batch", sft], check=True)
    states = cluster.wait(ids, timeout=180)
    job = cluster.job(sft)
    log = Path(art / "pre" / "slurm" / f"pre-sft-{sft}.log").read_text()
    assert states[sft] == "COMPLETED" and job["Restarts"] == "1", (states, job, log[-3000:])
    assert "checkpoint saved, requeue" in log
    assert f"requeueing job {sft}" in log
    assert "restart 1" in log and "resuming interrupted run from" in log
    artifact = ArtifactStore(art).read_stage("pre", "sft")  # valid: every output's hash verified
    metrics = artifact.manifest.metrics
    assert 1 <= metrics["resumed_from_step"] < 120 and metrics["steps"] == 120

    import torch

    from alignment.policy import load_policy

    with torch.no_grad():
        logits = load_policy(artifact, "fp32")(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()


def _logs(run_dir: Path) -> str:
    return "\n".join(f"--- {p}\n{p.read_text()[-1500:]}" for p in sorted(run_dir.glob("slurm/*.log")))
