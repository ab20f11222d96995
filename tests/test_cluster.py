"""Slurm chains: scripts per stage, each submitted with afterok on the previous job (fake sbatch)."""

from __future__ import annotations

import os
import stat

from alignment.cli import main


def _fake_sbatch(bin_dir, log):
    script = bin_dir / "sbatch"
    script.write_text(f"""#!/bin/bash
echo "$@" >> {log}
n=$(wc -l < {log})
echo "$((1000 + n));cluster"
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


def test_chain_submits_stages_in_order_with_afterok(tmp_path, monkeypatch, capsys):
    log = tmp_path / "calls.txt"
    _fake_sbatch(tmp_path, log)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert main(["slurm", "-c", "configs/tiny/pipeline.yaml", "--out", str(tmp_path / "jobs"), "--run", "r1",
                 "--artifacts", str(tmp_path / "art")]) == 0
    calls = log.read_text().splitlines()
    assert capsys.readouterr().out.split() == [str(1001 + i) for i in range(len(calls))]
    assert "--dependency" not in calls[0]
    for i in range(1, len(calls)):
        assert f"--dependency=afterok:{1000 + i} " in calls[i]
    first = (tmp_path / "jobs" / "r1-00-base.sbatch").read_text()
    assert "#SBATCH --requeue" in first and "run base -c" in first and "--run r1" in first
    assert f"--artifacts {tmp_path / 'art'}" in first


def test_missing_sbatch_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert main(["slurm", "-c", "configs/tiny/pipeline.yaml", "--out", str(tmp_path / "jobs")]) == 2
    assert "sbatch not found" in capsys.readouterr().err


def test_dry_run_writes_scripts_only(tmp_path, capsys):
    assert main(["slurm", "-c", "configs/smollm2/pipeline.yaml", "--out", str(tmp_path), "--dry-run"]) == 0
    paths = capsys.readouterr().out.split()
    assert paths and all(p.endswith(".sbatch") and os.path.exists(p) for p in paths)
