"""The sft stage through its real entry point: training changes the adapter, outputs load back,
skip / force / resume-after-SIGKILL / lock / bad input behave as documented."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path


import pytest

from alignment.artifacts import ArtifactStore
from alignment.cli import main

REPO = Path(__file__).resolve().parent.parent


def _align(*args) -> int:
    return main([str(a) for a in args])


def test_sft_trains_the_adapter_and_keeps_the_base(tiny_store):
    import torch
    from safetensors.torch import load_file

    root, run = tiny_store
    store = ArtifactStore(root)
    sft = store.read_stage(run, "sft")  # verifies every output's sha256
    base = store.read_stage(run, "base")
    m = sft.manifest.metrics
    assert m["eval_loss"] < m["eval_loss_before"], m
    assert m["steps"] == 8 and m["trainable_params"] < m["total_params"]
    assert sft.manifest.inputs["base"].manifest_sha256 == base.manifest_sha256
    assert sft.manifest.base_model == base.manifest.base_model
    assert sft.manifest.lineage["parent"] == str(base.path)
    weights = load_file(sft.model_dir / "adapter_model.safetensors")
    lora_b = [t for k, t in weights.items() if "lora_B" in k]
    assert lora_b and all(torch.count_nonzero(t) > 0 for t in lora_b)  # LoRA B starts at zero


def test_published_adapter_loads_back_for_generation(tiny_store):
    import torch

    from alignment.models import load_tokenizer
    from alignment.policy import load_policy

    root, run = tiny_store
    sft = ArtifactStore(root).read_stage(run, "sft")
    tok = load_tokenizer(sft.model_dir)
    model = load_policy(sft, "fp32")
    prompt = tok.apply_chat_template([{"role": "user", "content": "Describe the moon."}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 5
    merged_differs = any(not torch.equal(a, b) for a, b in zip(
        model.state_dict().values(), load_policy(ArtifactStore(root).read_stage(run, "base"), "fp32").state_dict().values()))
    assert merged_differs
    assert all(p.requires_grad for p in model.parameters())  # merged policy is trainable like a fresh load


def test_up_to_date_stage_is_skipped_and_force_keeps_the_old(tiny_store, tmp_path, caplog):
    import shutil

    root, _ = tiny_store
    shutil.copytree(root / "tiny", tmp_path / "tiny")
    before = (tmp_path / "tiny" / "sft" / "manifest.json").read_text()
    assert _align("run", "sft", "-c", "configs/tiny/sft.yaml", "--artifacts", tmp_path) == 0
    assert "sft: up to date (manifest" in caplog.text and "skipping" in caplog.text
    assert (tmp_path / "tiny" / "sft" / "manifest.json").read_text() == before
    assert _align("run", "sft", "-c", "configs/tiny/sft.yaml", "--artifacts", tmp_path, "--force") == 0
    aside = list((tmp_path / "tiny").glob("sft.old-*"))
    assert len(aside) == 1 and (aside[0] / "manifest.json").read_text() == before


def test_missing_upstream_says_which_stage_to_run(tmp_path, capsys):
    assert _align("run", "sft", "-c", "configs/tiny/sft.yaml", "--artifacts", tmp_path) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs the 'base' artifact" in err[0] and "align run base" in err[0]


def test_bad_row_is_one_line_exit_2_and_nothing_is_lost(tiny_store, tmp_path, capsys):
    shared, run = tiny_store
    root = tmp_path / "art"  # a copy: the failed attempt's partial folder must not land in the session's store
    for stage in ("base", "sft"):
        shutil.copytree(shared / run / stage, root / run / stage)
    bad = tmp_path / "bad.jsonl"
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]}]
    bad.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    before = (root / run / "sft" / "manifest.json").read_text()
    code = _align("run", "sft", "-c", "configs/tiny/sft.yaml", "--artifacts", root, f"data.train={bad}", "--force")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == [f"align: error: {bad}: row 2: messages[1].role: expected one of system, user, assistant, got 'robot'"]
    assert (root / run / "sft" / "manifest.json").read_text() == before


def test_bad_config_key_is_one_line_exit_2(capsys):
    code = _align("run", "sft", "-c", "configs/tiny/sft.yaml", "train.lr=fast")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == ["align: error: configs/tiny/sft.yaml (command line): train.lr: expected a number, got 'fast'"]


def test_bad_peft_kernel_is_one_line_exit_2(capsys):
    code = _align("run", "sft", "-c", "configs/tiny/sft.yaml", "peft.kernel=triton")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("align: error: configs/tiny/sft.yaml (command line): peft.kernel:"), err
    assert "fused" in err[0], err


def test_second_writer_is_refused_by_the_lock(tiny_store, capsys):
    root, run = tiny_store
    with ArtifactStore(root).lock("locked", "sft"):
        code = _align("run", "sft", "-c", "configs/tiny/sft.yaml", "--artifacts", root, "--run", "locked",
                      f"inputs.base={root / run / 'base'}")
    err = capsys.readouterr().err
    assert code == 2 and "another process" in err and f"pid {os.getpid()}" in err


def _wait_for_checkpoint(partial: Path, proc, timeout=120) -> Path:
    deadline = time.time() + timeout
    while time.time() < deadline:
        done = [p for p in (partial / "checkpoints").glob("checkpoint-*") if (p / "trainer_state.json").exists()]
        if done:
            return done[0]
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


def test_sigkill_mid_training_resumes_from_checkpoint(tiny_store, tmp_path):
    root, run = tiny_store
    args = [sys.executable, "-m", "alignment.cli", "run", "sft", "-c", "configs/tiny/sft.yaml", "--artifacts",
            str(tmp_path), "--run", "killed", f"inputs.base={root / run / 'base'}", "train.max_steps=200",
            "train.save_steps=10", "train.batch_size=4", "threads=1"]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    partial = tmp_path / "killed" / "sft.partial"
    try:
        _wait_for_checkpoint(partial, proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (tmp_path / "killed" / "sft").exists()  # nothing that looks complete
    assert proc.returncode == -signal.SIGKILL
    res = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resuming interrupted run from" in res.stderr
    art = ArtifactStore(tmp_path).read_stage("killed", "sft")
    assert art.manifest.metrics["resumed_from_step"] >= 10
    assert art.manifest.metrics["steps"] == 200
    assert not (art.path / "checkpoints").exists()


def test_status_and_config_show(tiny_store, capsys):
    root, run = tiny_store
    assert _align("status", run, "--artifacts", root) == 0
    out = capsys.readouterr().out
    assert "base" in out and "sft" in out and "complete" in out and "eval_loss=" in out
    assert _align("config", "show", "-c", "configs/tiny/sft.yaml", "train.lr=0.25") == 0
    out = capsys.readouterr().out
    assert "lr: 0.25" in out and "stage: sft" in out


def test_peft_kernel_fused_trains_the_adapter_peft_does(tiny_store, tmp_path, monkeypatch):
    """peft.kernel: the fused LoRA forward (the default, which trained the tiny store's sft) and peft's own train the
    same adapter through the stage's entry point, up to float rounding; and the fused one really ran."""
    import shutil

    import torch
    from safetensors.torch import load_file

    from alignment import fused_lora

    root, run = tiny_store
    shutil.copytree(root / run / "base", tmp_path / run / "base")
    calls = []
    fuse = fused_lora.fuse_lora_layers
    monkeypatch.setattr(fused_lora, "fuse_lora_layers", lambda model: calls.append(fuse(model)) or calls[-1])
    assert _align("run", "sft", "-c", "configs/tiny/sft.yaml", "--artifacts", tmp_path, "peft.kernel=peft") == 0
    assert calls == []  # peft's forward: nothing patched
    peft_run = ArtifactStore(tmp_path).read_stage(run, "sft")
    fused_run = ArtifactStore(root).read_stage(run, "sft")
    a = load_file(fused_run.model_dir / "adapter_model.safetensors")
    b = load_file(peft_run.model_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys() and any("lora_B" in k for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5)
    assert peft_run.manifest.metrics["eval_loss"] == pytest.approx(fused_run.manifest.metrics["eval_loss"], rel=1e-4)
    shutil.rmtree(tmp_path / run / "sft")
    assert _align("run", "sft", "-c", "configs/tiny/sft.yaml", "--artifacts", tmp_path) == 0
    assert calls and calls[0] > 0  # the default patched the trainer's LoRA layers
