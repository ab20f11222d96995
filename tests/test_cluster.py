"""Slurm chains: scripts per stage, each submitted with afterok on the jobs of the stages it reads (fake sbatch)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from alignment.cli import main


def _fake_sbatch(bin_dir, log):
    script = bin_dir / "sbatch"
    script.write_text(f"""#!/bin/bash
echo "$@" >> {log}
n=$(wc -l < {log})
echo "$((1000 + n));cluster"
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


def test_chain_submits_each_stage_after_the_stages_it_reads(tmp_path, monkeypatch, capsys):
    log = tmp_path / "calls.txt"
    _fake_sbatch(tmp_path, log)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert main(["slurm", "-c", "configs/tiny/pipeline.yaml", "--out", str(tmp_path / "jobs"), "--run", "r1",
                 "--artifacts", str(tmp_path / "art")]) == 0
    calls = log.read_text().splitlines()
    assert capsys.readouterr().out.split() == [str(1001 + i) for i in range(len(calls))]
    assert "--dependency" not in calls[0]
    # Each job waits for the jobs of the stages it reads (ids: base 1001, sft 1002, reward 1003, dpo 1004,
    # eval for dpo 1005, ppo 1006): dpo waits for sft only, so it can run beside the reward model; the first eval
    # beside ppo; the last eval for ppo and for the first eval (the same folder).
    waits = {1: "1001", 2: "1001:1002", 3: "1002", 4: "1001:1002:1003:1004", 5: "1002:1003",
             6: "1001:1002:1003:1004:1005:1006"}
    for i, after in waits.items():
        assert f"--dependency=afterok:{after} " in calls[i]
    first = (tmp_path / "jobs" / "r1-00-base.sbatch").read_text()
    assert "#SBATCH --requeue" in first and "run base -c" in first and "--run r1" in first
    assert f"--artifacts {tmp_path / 'art'}" in first
    # eval is listed twice: the first records what it publishes, the last removes that one once it replaced it
    record = tmp_path / "jobs" / "r1-04-eval.published.json"
    scripts = {p.name: p.read_text() for p in (tmp_path / "jobs").glob("*.sbatch")}
    assert f"--record-published {record}" in scripts["r1-04-eval.sbatch"]
    assert f"--drop-replaced {record}" in scripts["r1-06-eval.sbatch"]
    assert sum("--record-published" in t or "--drop-replaced" in t for t in scripts.values()) == 2


def test_a_chain_step_removes_only_what_an_earlier_step_of_its_chain_published(tmp_path):
    from alignment.cluster import chain_step_done
    from alignment.manifest import sha256_file

    def folder(name, text):
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text(text)
        return sha256_file(tmp_path / name / "manifest.json")

    final, rec = tmp_path / "eval", str(tmp_path / "r-04-eval.published.json")
    first = folder("eval", '{"the first eval of the chain": 1}')
    assert chain_step_done(final, None, rec, []) == [] and f'"{first}"' in Path(rec).read_text()
    unchanged = str(tmp_path / "r-09-eval.published.json")  # up to date: that artifact is an earlier command's
    assert chain_step_done(final, first, unchanged, []) == [] and not Path(unchanged).exists()
    (tmp_path / "eval").rename(tmp_path / "eval.old-20261205-100000")      # the last eval replaced it
    users = folder("eval.old-20261201-100000", '{"an earlier command": 1}')  # kept
    folder("eval", '{"the last eval of the chain": 1}')
    assert chain_step_done(final, users, None, [unchanged, rec]) == [tmp_path / "eval.old-20261205-100000"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["eval", "eval.old-20261201-100000"]
    # a link set aside under the store's name is not followed, even with a matching manifest
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "manifest.json").write_text('{"the first eval of the chain": 1}')
    (tmp_path / "eval.old-20261205-110000").symlink_to(outside)
    assert chain_step_done(final, None, None, [rec]) == [] and (outside / "manifest.json").exists()
    (tmp_path / "eval.old-20261205-110000").unlink()
    # a record naming another folder (or garbage) removes nothing
    other = tmp_path / "eval.old-20261201-100000"
    Path(rec).write_text('{"published": "/elsewhere/eval", "manifest_sha256": "%s"}' % users)
    assert chain_step_done(final, None, None, [rec]) == [] and other.is_dir()


def test_a_bad_key_is_refused_before_any_job_is_submitted(tmp_path, monkeypatch, capsys):
    log = tmp_path / "calls.txt"
    _fake_sbatch(tmp_path, log)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert main(["slurm", "-c", "configs/tiny/pipeline.yaml", "--out", str(tmp_path / "jobs"), "--run", "r2",
                 "--artifacts", str(tmp_path / "art"), "eval:tie_band=wide"]) == 2
    assert "eval.yaml (command line): tie_band" in capsys.readouterr().err
    assert not log.exists()  # not even base was submitted


def test_missing_sbatch_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert main(["slurm", "-c", "configs/tiny/pipeline.yaml", "--out", str(tmp_path / "jobs")]) == 2
    assert "sbatch not found" in capsys.readouterr().err


def test_dry_run_prints_the_sbatch_chain_first_and_submits_nothing(tmp_path, monkeypatch, capsys):
    log = tmp_path / "calls.txt"
    _fake_sbatch(tmp_path, log)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert main(["slurm", "-c", "configs/smollm2/pipeline.yaml", "--out", str(tmp_path / "jobs"), "--run", "r",
                 "--dry-run", "sft.train.lr=1e-4"]) == 0
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert lines[0].startswith("# the sbatch chain (nothing submitted)") and len(lines) == 8  # header + 7 steps
    assert lines[1] == f"job_0_base=$(sbatch --parsable {tmp_path}/jobs/r-00-base.sbatch | cut -d';' -f1)"
    assert lines[2] == (f"job_1_sft=$(sbatch --parsable --dependency=afterok:${{job_0_base}} "
                        f"{tmp_path}/jobs/r-01-sft.sbatch | cut -d';' -f1)")
    assert "#!/bin/bash" not in out.out + out.err  # the scripts are in files (printed with -v)
    assert not log.exists()
    assert "train.lr=1e-4" in (tmp_path / "jobs" / "r-01-sft.sbatch").read_text()
    assert "train.lr=1e-4" not in (tmp_path / "jobs" / "r-00-base.sbatch").read_text()  # routed to sft only
    # The printed chain is the submission: run by bash, it submits the same calls in order.
    done = subprocess.run(["bash", "-c", "\n".join(lines[1:])], capture_output=True, text=True,
                          env={**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"})
    assert done.returncode == 0, done.stderr
    calls = log.read_text().splitlines()
    assert len(calls) == 7 and "--dependency=afterok:1001 " in calls[1] and "--dependency=afterok:1002 " in calls[3]
    assert "--dependency=afterok:1001:1002:1003:1004:1005:1006 " in calls[6]  # the last eval: every step before it


def test_dry_run_names_each_step_it_leaves_out_as_align_pipeline_does(tmp_path, monkeypatch, capsys, caplog):
    import yaml

    from alignment import runner

    # As when the run is up to date: the first eval would only republish what the last one replaces.
    monkeypatch.setattr(runner, "looks_fresh", lambda loaded, *args, **kwargs: [True] * len(loaded))
    caplog.set_level("INFO", logger="align")
    path = "configs/tiny/pipeline.yaml"
    steps = yaml.safe_load(open(path))["stages"]
    runner._plan_steps(path, steps, runner.route_overrides([], [s["stage"] for s in steps]), tmp_path / "art", "r",
                       False, jobs=1)
    said = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert said == ["pipeline: step 4 (eval) left out: the file's last eval step is up to date"]
    caplog.clear()
    assert main(["submit", "-c", path, "--out", str(tmp_path / "jobs"), "--run", "r", "--artifacts",
                 str(tmp_path / "art"), "--dry-run"]) == 0
    assert [r.getMessage() for r in caplog.records if "left out" in r.getMessage()] == said  # the same line
    chain = capsys.readouterr().out
    assert "job_3_dpo=" in chain and "job_4_eval" not in chain and "job_5_ppo=" in chain


def _script(tmp_path, *args) -> str:
    assert main(["submit", "-c", "configs/tiny/pipeline.yaml", "--out", str(tmp_path / "jobs"), "--run", "r",
                 "--artifacts", str(tmp_path / "art"), "--dry-run", *args]) == 0
    return (tmp_path / "jobs" / "r-01-sft.sbatch").read_text()


def test_job_script_requeues_on_usr1_and_kills_invalid_dependents(tmp_path, capsys):
    text = _script(tmp_path, "-v")
    assert "#!/bin/bash" in capsys.readouterr().err  # --dry-run -v prints the scripts
    for line in ("#SBATCH --requeue", "#SBATCH --signal=B:USR1@60", "#SBATCH --kill-on-invalid-dep=yes",
                 "trap on_usr1 USR1", 'scontrol requeue "$SLURM_JOB_ID"', "#SBATCH --time=00:30:00"):
        assert line in text  # the `local` profile's values


def test_settings_precedence_profile_pipeline_stage_flags(tmp_path, capsys):
    pipe = tmp_path / "p.yaml"
    pipe.write_text(f"""run: r
slurm: {{time: "01:00:00", mem: 3G, partition: fromfile}}
stages:
  - {{stage: base, config: {os.getcwd()}/configs/tiny/base.yaml}}
  - {{stage: sft, config: {os.getcwd()}/configs/tiny/sft.yaml, slurm: {{mem: 5G, signal_seconds: 120}}}}
""")
    assert main(["submit", "-c", str(pipe), "--out", str(tmp_path), "--dry-run", "--partition", "cli",
                 "--begin", "now+1hour", "--account", "acct"]) == 0
    base, sft = (tmp_path / "r-00-base.sbatch").read_text(), (tmp_path / "r-01-sft.sbatch").read_text()
    assert "--time=01:00:00" in base and "--mem=3G" in base and "--signal=B:USR1@60" in base
    assert "--mem=5G" in sft and "--signal=B:USR1@120" in sft
    for text in (base, sft):
        assert "--partition=cli" in text and "--begin=now+1hour" in text and "--account=acct" in text
        assert "fromfile" not in text


def test_gpu_profile_launches_one_task_per_gpu(tmp_path, capsys):
    text = _script(tmp_path, "--profile", "gpu-example", "--nodes", "2")
    assert "--gpus-per-node=4" in text and "--ntasks-per-node=4" in text and "--nodes=2" in text
    assert "srun --kill-on-bad-exit=1 bash -c" in text and "RANK=$SLURM_PROCID" in text
    assert 'scancel --signal=USR1 "$SLURM_JOB_ID"' in text  # the signal reaches every rank on every node


def test_gpu_profile_keeps_base_and_eval_small(tmp_path, capsys):
    """Per-stage resources: the profile's `stages:` beat chain-wide flags; a pipeline step's `slurm:` beats both."""
    _script(tmp_path, "--profile", "gpu-example", "--nodes", "2", "--partition", "big")
    jobs = tmp_path / "jobs"
    base, sft, eval_ = ((jobs / f"r-{i:02d}-{s}.sbatch").read_text() for i, s in ((0, "base"), (1, "sft"), (6, "eval")))
    assert "--nodes=1" in base and "--gpus-per-node" not in base and "--exclusive" not in base
    assert "--ntasks-per-node=1" in base and "srun" not in base and "--time=01:00:00" in base
    assert "--nodes=1" in eval_ and "--gpus-per-node=1" in eval_ and "--exclusive" not in eval_
    assert "--nodes=2" in sft and "--gpus-per-node=4" in sft and "#SBATCH --exclusive" in sft
    for text in (base, sft, eval_):
        assert "--partition=big" in text  # what no stage section sets, the flags still set everywhere


def test_profile_stage_section_errors_name_the_stage(tmp_path, capsys):
    prof = tmp_path / "p.yaml"
    prof.write_text("stages:\n  bsae: {nodes: 1}\n  sft: {gpu: 1}\n")
    assert main(["submit", "-c", "configs/tiny/pipeline.yaml", "--out", str(tmp_path), "--dry-run",
                 "--profile", str(prof)]) == 2
    assert f"{prof}: stages.bsae: unknown stage" in capsys.readouterr().err
    prof.write_text("stages:\n  sft: {gpu: 1}\n")
    assert main(["submit", "-c", "configs/tiny/pipeline.yaml", "--out", str(tmp_path), "--dry-run",
                 "--profile", str(prof)]) == 2
    assert f"{prof}: stages.sft.gpu: unknown key" in capsys.readouterr().err


def test_bad_profile_key_is_a_config_error(tmp_path, capsys):
    prof = tmp_path / "p.yaml"
    prof.write_text("gpus: 2\n")
    assert main(["submit", "-c", "configs/tiny/pipeline.yaml", "--out", str(tmp_path), "--dry-run",
                 "--profile", str(prof)]) == 2
    assert f"{prof}.gpus: unknown key" in capsys.readouterr().err


@pytest.mark.parametrize("flags, key", [
    (["--partition", "gpu\ntouch /tmp/owned"], "partition"),   # a newline would end the #SBATCH block
    (["--time", "banana"], "time"), (["--time", "4h"], "time"),
    (["--nodes", "-3"], "nodes"), (["--gpus-per-node", "-1"], "gpus_per_node"),
    (["--begin", "now; rm -rf x"], "begin"), (["--account", "a b"], "account"),
])
def test_a_value_slurm_would_misread_is_refused_and_nothing_is_written(tmp_path, capsys, flags, key):
    out = tmp_path / "jobs"
    assert main(["submit", "-c", "configs/tiny/pipeline.yaml", "--out", str(out), "--dry-run", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"command line): {key}: expected" in err[0]
    assert not out.exists()


def test_profile_values_are_checked_too_and_slurm_forms_pass(tmp_path, capsys):
    prof = tmp_path / "p.yaml"
    prof.write_text("env: {'BAD-NAME': x}\nextra: [\"--exclusive\\nrm -rf /\"]\nmem: lots\n")
    assert main(["submit", "-c", "configs/tiny/pipeline.yaml", "--out", str(tmp_path / "j"), "--dry-run",
                 "--profile", str(prof)]) == 2
    err = capsys.readouterr().err
    assert "mem: expected a memory size" in err and "env: 'BAD-NAME'" in err and "extra: '--exclusive" in err
    prof.write_text("mem: 500M\nbegin: 2026-01-01T02:00\n")
    assert main(["submit", "-c", "configs/tiny/pipeline.yaml", "--out", str(tmp_path / "j"), "--dry-run",
                 "--profile", str(prof), "--time", "1-02:30:00", "--partition", "gpu,debug"]) == 0
    script = (tmp_path / "j" / "tiny-01-sft.sbatch").read_text()
    assert "#SBATCH --time=1-02:30:00" in script and "#SBATCH --partition=gpu,debug" in script
    assert "#SBATCH --begin=2026-01-01T02:00" in script and "#SBATCH --mem=500M" in script


def test_trap_forwards_usr1_and_requeues_on_exit_3(tmp_path):
    """The job script's own logic, run by bash without Slurm: a fake stage that exits 3 on USR1
    (as the runner does after checkpointing) and a fake scontrol that records the requeue."""
    import signal
    import subprocess
    import time

    from alignment.cluster import SlurmSpec, sbatch_script

    stage = tmp_path / "stage.py"
    stage.write_text("import signal, sys, time, pathlib\n"
                     "signal.signal(signal.SIGUSR1, lambda *a: sys.exit(3))\n"
                     f"pathlib.Path('{tmp_path}/started').touch()\n"
                     "time.sleep(60)\n")
    py = tmp_path / "fakepython"
    py.write_text(f"#!/bin/bash\nexec {sys.executable} {stage}\n")
    scontrol = tmp_path / "scontrol"
    scontrol.write_text(f"#!/bin/bash\necho \"$@\" > {tmp_path}/scontrol.txt\n")
    for f in (py, scontrol):
        f.chmod(0o755)
    script = tmp_path / "job.sh"
    script.write_text(sbatch_script("sft", Path("x.yaml"), [], run="r", artifacts=tmp_path, spec=SlurmSpec(python=str(py)),
                                    workdir=tmp_path, log_dir=tmp_path))
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "77"}
    job = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 20
    while not (tmp_path / "started").exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    job.send_signal(signal.SIGUSR1)
    out, _ = job.communicate(timeout=20)
    assert job.returncode == 0, out
    assert (tmp_path / "scontrol.txt").read_text().split() == ["requeue", "77"]
    assert "requeueing job 77" in out


def test_status_shows_job_ids_without_slurm(tmp_path, monkeypatch, capsys):
    from alignment.cluster import record_submission

    record_submission(tmp_path, "r", {"jobs": [{"stage": "base", "job_id": "41"}, {"stage": "sft", "job_id": "42"}]})
    monkeypatch.setenv("PATH", str(tmp_path))  # no squeue/scontrol: ids only, no error
    assert main(["status", "r", "--artifacts", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "job 41" in out and "job 42" in out and "submitted" in out


def test_usr1_checkpoints_exits_requeue_and_the_same_command_resumes(tiny_store, tmp_path):
    """The runner's side of preemption, without Slurm: USR1 mid-training -> checkpoint, no publish, exit 3;
    the same command resumes from that checkpoint and publishes."""
    import shutil
    import signal
    import subprocess
    import time

    from alignment.artifacts import ArtifactStore
    from alignment.preemption import REQUEUE_EXIT

    root, run = tiny_store
    shutil.copytree(root / run / "base", tmp_path / "pre" / "base")
    cmd = [sys.executable, "-m", "alignment.cli", "run", "sft", "-c", "configs/tiny/sft.yaml", "--artifacts",
           str(tmp_path), "--run", "pre", "train.max_steps=60", "train.save_steps=1", "train.logging_steps=50"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    ckpts = tmp_path / "pre" / "sft.partial" / "checkpoints"
    deadline = time.monotonic() + 60
    while not list(ckpts.glob("checkpoint-*/trainer_state.json")):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == REQUEUE_EXIT, err[-3000:]
    assert "checkpoint saved, requeue" in err and "align: error" not in err
    assert not (tmp_path / "pre" / "sft").exists()
    from alignment.status import stage_rows

    (row,) = [r for r in stage_rows(ArtifactStore(tmp_path), "pre") if r["stage"] == "sft"]
    assert row["status"].startswith("preempted (checkpoint saved"), row
    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming interrupted run from" in resumed.stderr
    metrics = ArtifactStore(tmp_path).read_stage("pre", "sft").manifest.metrics
    assert 1 <= metrics["resumed_from_step"] < 60 and metrics["steps"] == 60


def test_accelerate_multi_cpu_config_runs_two_processes(tiny_store, tmp_path):
    """`accelerate launch --config_file configs/accelerate/multi-cpu.yaml` as docs/cluster.md shows it: two ranks
    train the tiny SFT together (same final weights), only rank 0 writes and publishes."""
    import json
    import shutil
    import socket

    from safetensors.torch import load_file

    from alignment.artifacts import ArtifactStore

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _mp_stage import tensors_sha256

    root, run = tiny_store
    shutil.copytree(root / run / "base", tmp_path / "acc" / "base")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    probe = tmp_path / "probe"
    probe.mkdir()
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file",
           "configs/accelerate/multi-cpu.yaml", "--main_process_port", str(port), "tests/_mp_stage.py",
           "run", "sft", "-c", "configs/tiny/sft.yaml", "threads=1", "train.max_steps=2", "train.batch_size=4"]
    env = {**os.environ, "ALIGN_TEST_PROBE_DIR": str(probe), "OMP_NUM_THREADS": "1", "ALIGN_ARTIFACTS": str(tmp_path),
           "ALIGN_RUN": "acc"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [json.loads((probe / f"rank{r}.json").read_text()) for r in (0, 1)]  # two processes ran
    assert ranks[0]["step"] == ranks[1]["step"] == 2 and ranks[0]["sha256"] == ranks[1]["sha256"]
    art = ArtifactStore(tmp_path).read_stage("acc", "sft")
    assert tensors_sha256(load_file(art.model_dir / "adapter_model.safetensors")) == ranks[0]["sha256"]
    writers = {line.split()[0] for line in (probe / "writes.txt").read_text().splitlines() if line}
    assert writers == {"0"}
