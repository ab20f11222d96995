"""A stage with 2 processes on CPU (torchrun, gloo): the ranks agree, only rank 0 writes, the result loads."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from alignment.artifacts import ArtifactStore

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _mp_stage import tensors_sha256  # noqa: E402

TORCHRUN = Path(sys.executable).with_name("torchrun")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(probe: Path, root: Path, *args: str) -> subprocess.CompletedProcess:
    """torchrun parses abbreviated options even after the script (`--run` is ambiguous for it): the artifact
    root and run name go through the environment instead."""
    probe.mkdir(parents=True, exist_ok=True)
    cmd = [str(TORCHRUN), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "tests/_mp_stage.py", *args]
    env = {**os.environ, "ALIGN_TEST_PROBE_DIR": str(probe), "OMP_NUM_THREADS": "1", "ALIGN_ARTIFACTS": str(root),
           "ALIGN_RUN": "mp"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def _check_ranks(probe: Path, art, steps: int) -> None:
    ranks = [json.loads((probe / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["step"] == ranks[1]["step"] == steps
    assert ranks[0]["sha256"] == ranks[1]["sha256"], "the ranks ended with different weights"
    published = tensors_sha256(load_file(art.model_dir / "adapter_model.safetensors"))
    assert published == ranks[0]["sha256"], "the artifact is not the weights the ranks trained"
    writes = (probe / "writes.txt").read_text().split("\n")
    writers = {line.split()[0] for line in writes if line}
    assert writers == {"0"}, f"ranks other than 0 wrote the artifact: {writes}"
    assert sum(line.startswith("0 publish") for line in writes) == 1


@pytest.fixture(scope="module")
def mp_store(tiny_store, tmp_path_factory):
    root, run = tiny_store
    mine = tmp_path_factory.mktemp("mp")
    shutil.copytree(root / run / "base", mine / "mp" / "base")
    return mine


def test_sft_and_dpo_with_two_processes(mp_store, tmp_path):
    from alignment.policy import load_policy

    store = ArtifactStore(mp_store)
    sft = _torchrun(tmp_path / "sft", mp_store, "run", "sft", "-c", "configs/tiny/sft.yaml", "threads=1", "train.max_steps=4", "train.batch_size=4")
    assert sft.returncode == 0, sft.stderr[-4000:]
    art = store.read_stage("mp", "sft")  # published once, every output's hash verified
    assert art.manifest.metrics["steps"] == 4
    _check_ranks(tmp_path / "sft", art, 4)
    assert sft.stderr.count("[sft] published") == 1

    dpo = _torchrun(tmp_path / "dpo", mp_store, "run", "dpo", "-c", "configs/tiny/dpo.yaml", "threads=1", "train.max_steps=2", "train.batch_size=4",
                    "data.max_train_pairs=16", "data.max_eval_pairs=8", "eval.kl_prompts=4")
    assert dpo.returncode == 0, dpo.stderr[-4000:]
    dart = store.read_stage("mp", "dpo")
    _check_ranks(tmp_path / "dpo", dart, 2)

    import torch

    policy = load_policy(dart, "fp32")  # base + SFT + DPO adapters merged: loads and runs
    with torch.no_grad():
        logits = policy(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()
