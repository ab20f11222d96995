"""A damaged or hostile artifact store, through the real commands: a symlink out of the root, a corrupted manifest,
a truncated weights file, a foreign checkpoint folder or a planted pickle is one `align: error:` line naming the
file, exit 2 (or a stage shown as broken); nothing is written outside the root and nothing from the store runs."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest

from alignment import cli

SFT, DPO = "configs/tiny/sft.yaml", "configs/tiny/dpo.yaml"


@pytest.fixture
def store(tiny_store, tmp_path) -> Path:
    """A writable copy of the session's tiny run (base + sft)."""
    src, _ = tiny_store
    root = tmp_path / "art"
    shutil.copytree(src, root, symlinks=True)
    return root


def _align(capsys, *args) -> tuple[int, list[str]]:
    """(exit code, the `align: error:` lines) of one command; no traceback may show."""
    capsys.readouterr()
    code = cli.main(list(args))
    out = capsys.readouterr()
    assert "Traceback" not in out.err and "unexpected" not in out.err, out.err[-2000:]
    return code, [x for x in out.err.splitlines() if x.startswith("align: error:")]


def _rewrite_listed(root: Path, stage: str, rel: str, data: bytes) -> None:
    """Replace an output and update its manifest entry to match, so the artifact still verifies."""
    folder = root / "tiny" / stage
    (folder / rel).write_bytes(data)
    manifest = json.loads((folder / "manifest.json").read_text())
    entry = next(o for o in manifest["outputs"] if o["path"] == rel)
    entry.update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _resumable_sft(root: Path, checkpoint: str) -> Path:
    """An sft.partial folder the next `align run sft` resumes (its run_state matches), with an empty checkpoint."""
    from alignment.artifacts import ArtifactStore
    from alignment.config import config_hash
    from alignment.runner import load_stage_config

    store = ArtifactStore(root)
    partial = store.partial_dir("tiny", "sft")
    ckpt = partial / "checkpoints" / checkpoint
    ckpt.mkdir(parents=True)
    state = {"config_hash": config_hash(load_stage_config("sft", SFT)),
             "inputs": {"base": store.read_stage("tiny", "base").manifest_sha256}}
    (partial / "run_state.json").write_text(json.dumps(state))
    return ckpt


def test_a_merged_cache_symlinked_outside_the_root_is_refused(store, tmp_path, capsys):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (store / "tiny" / ".merged").symlink_to(outside)
    code, errors = _align(capsys, "-q", "run", "dpo", "-c", DPO, "--artifacts", str(store), "--run", "tiny")
    assert code == 2 and len(errors) == 1 and ".merged" in errors[0] and "outside the artifact root" in errors[0]
    assert not any(outside.iterdir()), "merged weights were written outside the artifact root"
    assert not (store / "tiny" / "dpo").exists()
    assert not (store / "tiny" / "dpo.partial").exists(), "refused only after training"


def test_a_stage_folder_symlinked_outside_the_root_fails_verify_and_report(store, tmp_path, capsys):
    moved = tmp_path / "sft9"
    (store / "tiny" / "sft").rename(moved)
    (store / "tiny" / "sft").symlink_to(moved)
    code, errors = _align(capsys, "verify", "tiny", "--artifacts", str(store))
    assert code == 2 and errors and "tiny/sft" in errors[0]
    code, errors = _align(capsys, "report", "tiny", "--artifacts", str(store))
    assert code == 2 and len(errors) == 1 and "outside the artifact root" in errors[0]
    assert not (store / "tiny" / "report.html").exists()


@pytest.mark.parametrize("damage", ["config", "metrics", "weights"])
def test_report_shows_a_stage_that_does_not_verify_as_broken(store, capsys, damage):
    sft = store / "tiny" / "sft"
    target = {"config": sft / "config.yaml", "metrics": sft / "metrics.json",
              "weights": sft / "model" / "adapter_model.safetensors"}[damage]
    with target.open("r+b") as f:
        f.truncate(10)
    code, _ = _align(capsys, "report", "tiny", "--artifacts", str(store))
    html = (store / "tiny" / "report.html").read_text()
    assert code == 0 and f"broken: {target}" in html
    assert ">complete<" in html  # base still is


@pytest.mark.parametrize("text", [b"{not json", b"[1, 2, 3]", b'{"status": 5}', b'{"metrics": [1]}',
                                  b"\xff\xfe\x00", b"[" * 200_000])
def test_report_reads_a_corrupted_manifest_as_status_does(store, capsys, text):
    (store / "tiny" / "sft" / "manifest.json").write_bytes(text)
    code, _ = _align(capsys, "report", "tiny", "--artifacts", str(store))
    assert code == 0
    assert "broken: " + str(store / "tiny" / "sft" / "manifest.json") in (store / "tiny" / "report.html").read_text()


def test_report_out_never_lands_in_an_artifact_nor_over_another_file(store, tmp_path, capsys):
    inside = store / "tiny" / "sft" / "report.html"
    code, errors = _align(capsys, "report", "tiny", "--artifacts", str(store), "--out", str(inside))
    assert code == 2 and len(errors) == 1 and "inside the published artifact" in errors[0] and not inside.exists()
    other = tmp_path / "rows.jsonl"
    other.write_text("{}\n")
    code, errors = _align(capsys, "report", "tiny", "--artifacts", str(store), "--out", str(other))
    assert code == 2 and "--out" in errors[0] and other.read_text() == "{}\n"
    for _ in range(2):  # a re-run replaces its own page
        assert _align(capsys, "report", "tiny", "--artifacts", str(store))[0] == 0
    code, _ = _align(capsys, "verify", "tiny", "--artifacts", str(store))
    assert code == 0


def test_a_checkpoint_folder_without_a_step_number_is_ignored(store, capsys):
    ckpt = _resumable_sft(store, "checkpoint-abc")
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 4, "max_steps": 8}))
    assert _align(capsys, "status", "tiny", "--artifacts", str(store))[0] == 0
    code, errors = _align(capsys, "-q", "run", "sft", "-c", SFT, "--artifacts", str(store), "--run", "tiny",
                          "--force")
    assert code == 0, errors
    assert json.loads((store / "tiny" / "sft" / "manifest.json").read_text())["metrics"]["resumed_from_step"] == 0


class _Planted:
    """A pickle that, if ever unpickled, creates a file: proof that code from the store ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_a_pickled_checkpoint_is_one_line_naming_it_and_how_to_go_on(store, tmp_path, capsys):
    ckpt = _resumable_sft(store, "checkpoint-4")
    shutil.copytree(store / "tiny" / "sft" / "model", ckpt, dirs_exist_ok=True)
    marker = tmp_path / "PWNED"
    for name in ("rng_state.pth", "optimizer.pt", "scheduler.pt"):
        (ckpt / name).write_bytes(pickle.dumps(_Planted(str(marker))))
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 4, "max_steps": 8, "train_batch_size": 8,
                                                         "log_history": [], "best_model_checkpoint": None}))
    code, errors = _align(capsys, "-q", "run", "sft", "-c", SFT, "--artifacts", str(store), "--run", "tiny",
                          "--force")
    assert not marker.exists(), "a pickle from the store was executed"
    assert code == 2 and len(errors) == 1, errors
    assert str(ckpt) in errors[0] and "cannot be loaded safely" in errors[0] and "remove that folder" in errors[0]


@pytest.mark.parametrize("command", [["export", "tiny", "sft"], ["-q", "run", "dpo", "-c", DPO, "--run", "tiny"]])
def test_truncated_weights_that_verify_are_one_line_naming_the_file(store, capsys, command):
    weights = store / "tiny" / "sft" / "model" / "adapter_model.safetensors"
    _rewrite_listed(store, "sft", "model/adapter_model.safetensors", weights.read_bytes()[:100])
    assert _align(capsys, "verify", "tiny", "--artifacts", str(store))[0] == 0
    code, errors = _align(capsys, *command, "--artifacts", str(store))
    assert code == 2 and len(errors) == 1 and f"{weights}: not a readable safetensors file" in errors[0], errors


def test_ppo_rotation_ranks_numbered_checkpoints_only(tmp_path):
    from alignment import ppo_state

    for name in ("checkpoint-2", "checkpoint-10", "checkpoint-3", "checkpoint-abc", "checkpoint-4.bak"):
        (tmp_path / name).mkdir()
        (tmp_path / name / ppo_state.STATE).write_text("{}")
    ppo_state.rotate(tmp_path, keep=2)  # by number, 10 is the newest: a string sort would keep 3 and 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-3", "checkpoint-4.bak",
                                                          "checkpoint-abc"]
