"""The artifact store on its own: atomic publish, hash verification, locks, set-aside."""

from __future__ import annotations

import json
import multiprocessing as mp

import pytest

from alignment.artifacts import ArtifactStore
from alignment.errors import ArtifactError, LockError
from alignment.manifest import Manifest, json_schema, list_outputs, sha256_file


def _publish(store: ArtifactStore, run="r", stage="sft", payload=b"weights") -> None:
    partial = store.partial_dir(run, stage)
    (partial / "model").mkdir(parents=True)
    (partial / "model" / "w.bin").write_bytes(payload)
    (partial / "checkpoints").mkdir()
    m = Manifest(stage=stage, run=run, config={}, config_hash="h", outputs=list_outputs(partial))
    store.publish(run, stage, m)


def test_publish_lists_outputs_with_hashes_and_renames(tmp_path):
    store = ArtifactStore(tmp_path)
    _publish(store)
    assert not store.partial_dir("r", "sft").exists()
    art = store.read_stage("r", "sft")
    assert [o.path for o in art.manifest.outputs] == ["model/w.bin"]  # checkpoints are not outputs
    assert art.manifest.outputs[0].sha256 == sha256_file(tmp_path / "r" / "sft" / "model" / "w.bin")
    assert art.manifest.outputs[0].size == len(b"weights")


def test_partial_folder_without_manifest_is_not_an_artifact(tmp_path):
    store = ArtifactStore(tmp_path)
    store.partial_dir("r", "sft").mkdir(parents=True)
    with pytest.raises(ArtifactError, match="run it first"):
        store.read_stage("r", "sft", needed_by="dpo")


def test_tampered_output_is_detected(tmp_path):
    store = ArtifactStore(tmp_path)
    _publish(store)
    (tmp_path / "r" / "sft" / "model" / "w.bin").write_bytes(b"weightz")
    with pytest.raises(ArtifactError, match="changed since it was published"):
        store.read_stage("r", "sft")


def test_republish_moves_the_old_artifact_aside(tmp_path):
    store = ArtifactStore(tmp_path)
    _publish(store, payload=b"one")
    _publish(store, payload=b"two")
    olds = list((tmp_path / "r").glob("sft.old-*"))
    assert len(olds) == 1 and (olds[0] / "model" / "w.bin").read_bytes() == b"one"
    assert (tmp_path / "r" / "sft" / "model" / "w.bin").read_bytes() == b"two"


def _hold_lock(root, ready, release):
    with ArtifactStore(root).lock("r", "sft"):
        ready.set()
        release.wait(30)


def test_lock_refuses_a_second_writer(tmp_path):
    ctx = mp.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_hold_lock, args=(tmp_path, ready, release))
    p.start()
    try:
        assert ready.wait(10)
        lock = ArtifactStore(tmp_path).lock("r", "sft")
        assert lock.held_elsewhere()
        with pytest.raises(LockError, match=f"pid {p.pid}"):
            lock.__enter__()
    finally:
        release.set()
        p.join(10)
    with ArtifactStore(tmp_path).lock("r", "sft"):  # released when the holder exits
        pass


def test_manifest_schema_is_json_schema():
    schema = json_schema()
    assert schema["type"] == "object"
    assert {"config_hash", "outputs", "inputs", "stage", "run"} <= set(schema["properties"])
    json.dumps(schema)


# -- hardening (issue 15) -------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["../x", "/abs", "a/b", ".hidden", "..", "", "x" * 101, "a\nb"])
def test_run_and_stage_names_are_one_folder_under_the_root(tmp_path, bad):
    store = ArtifactStore(tmp_path)
    for call in (lambda: store.stage_dir(bad, "sft"), lambda: store.stage_dir("r", bad),
                 lambda: store.partial_dir(bad, "sft"), lambda: store.lock(bad, "sft"), lambda: store.run_dir(bad)):
        with pytest.raises(ArtifactError, match="expected one folder name"):
            call()


def test_a_symlink_out_of_the_root_is_refused(tmp_path):
    (tmp_path / "outside").mkdir()
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "r").symlink_to(tmp_path / "outside")
    with pytest.raises(ArtifactError, match="outside the artifact root"):
        ArtifactStore(tmp_path / "root").stage_dir("r", "sft")


def test_the_root_must_be_a_folder(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ArtifactError, match="the artifact root is a file"):
        ArtifactStore(tmp_path / "f")


def test_hashes_are_cached_but_an_edit_that_keeps_size_and_mtime_is_caught(tmp_path, monkeypatch):
    import os

    from alignment import artifacts

    store = ArtifactStore(tmp_path)
    _publish(store)
    store.read_stage("r", "sft")  # hashes once, fills the cache
    calls = []
    real = artifacts.sha256_file
    monkeypatch.setattr(artifacts, "sha256_file", lambda p: calls.append(p) or real(p))
    store.read_stage("r", "sft")
    assert calls == []  # nothing re-hashed: size, mtime, ctime and inode unchanged
    f = tmp_path / "r" / "sft" / "model" / "w.bin"
    st = f.stat()
    f.write_bytes(b"weightz")  # same size
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime put back; ctime cannot be
    with pytest.raises(ArtifactError, match="w.bin: sha256 .* the manifest says"):
        store.read_stage("r", "sft")
    assert calls == [f]


def test_size_mode_checks_sizes_only(tmp_path, monkeypatch):
    store = ArtifactStore(tmp_path)
    _publish(store)
    monkeypatch.setenv("ALIGN_VERIFY", "size")
    (tmp_path / "r" / "sft" / "model" / "w.bin").write_bytes(b"weightz")
    store.read_stage("r", "sft")  # same size: passes in size mode ...
    with pytest.raises(ArtifactError, match="sha256"):
        store.read(tmp_path / "r" / "sft", verify="full")  # ... but never for `align verify`
    (tmp_path / "r" / "sft" / "model" / "w.bin").write_bytes(b"w")
    with pytest.raises(ArtifactError, match="1 bytes, the manifest says 7"):
        store.read_stage("r", "sft")


def test_unlisted_files_make_an_artifact_broken_and_verify_lists_it(tmp_path, capsys):
    from alignment.cli import main

    store = ArtifactStore(tmp_path)
    _publish(store)
    _publish(store, stage="dpo")
    assert main(["verify", "--artifacts", str(tmp_path)]) == 0
    assert "2 artifact(s) verified" in capsys.readouterr().out
    (tmp_path / "r" / "sft" / "model" / "pytorch_model.bin").write_bytes(b"\x80\x04planted")
    with pytest.raises(ArtifactError, match="pytorch_model.bin: not listed in the manifest"):
        store.read_stage("r", "sft")
    assert main(["verify", "r", "--artifacts", str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert "r/sft: BROKEN" in out and "r/dpo: ok" in out
    assert err.strip().splitlines() == ["align: error: 1 of 2 artifact(s) do not verify: r/sft; re-run those stages "
                                        "with --force (the broken copies are moved aside, not deleted)"]


def test_status_shows_a_broken_artifact_and_stale_partials(tmp_path):
    from alignment.status import stage_rows

    store = ArtifactStore(tmp_path)
    _publish(store)
    (tmp_path / "r" / "sft" / "model" / "w.bin").write_bytes(b"w")
    rows = {r["stage"]: r for r in stage_rows(store, "r")}
    assert rows["sft"]["status"] == "broken" and "1 bytes, the manifest says 7" in rows["sft"]["metrics"]
    for _ in range(3):
        store.partial_dir("r", "dpo").mkdir(parents=True)
        store.set_aside(store.partial_dir("r", "dpo"), "stale")
    assert len(store.stale_folders("r")) == 1  # only the newest stale partial is kept


def test_checkpoints_stay_until_the_artifact_is_in_place(tmp_path, monkeypatch):
    import os
    from pathlib import Path

    store = ArtifactStore(tmp_path)
    seen = []
    real = os.rename

    def rename(src, dst):
        seen.append((str(src), (Path(src) / "checkpoints").is_dir()))
        return real(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    _publish(store)
    assert seen == [(str(store.partial_dir("r", "sft")), True)]  # renamed with its checkpoints ...
    assert not (tmp_path / "r" / "sft" / "checkpoints").exists()  # ... removed once in place


def test_a_read_only_store_gives_a_read_only_lock(tmp_path, monkeypatch):
    import errno
    import os

    store = ArtifactStore(tmp_path)
    _publish(store)
    real = os.open

    def ro(path, flags, *a, **k):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", ro)
    with store.lock("r", "sft") as lock:
        assert lock.read_only and lock.why.errno == errno.EROFS


def test_a_corrupted_artifact_is_not_up_to_date(tiny_store, tmp_path, caplog):
    """Truncating a published file: `status` says broken, and the stage re-runs instead of "up to date, skipping";
    the broken copy is moved aside, not deleted."""
    import shutil

    from alignment.runner import run_stage
    from alignment.status import stage_rows

    src, run = tiny_store
    root = tmp_path / "store"
    shutil.copytree(src, root)
    weights = root / run / "base" / "model" / "model.safetensors"
    with weights.open("r+b") as f:
        f.truncate(1000)
    store = ArtifactStore(root)
    assert {r["stage"]: r["status"] for r in stage_rows(store, run)}["base"] == "broken"
    caplog.set_level("INFO", logger="align")
    run_stage("base", "configs/tiny/base.yaml", root=root, run=run)
    assert "does not verify" in caplog.text and "up to date" not in caplog.text
    store.read_stage(run, "base")  # verifies again
    olds = list((root / run).glob("base.old-*"))
    assert len(olds) == 1 and (olds[0] / "model" / "model.safetensors").stat().st_size == 1000


def test_a_missing_stage_s_hint_names_the_store_and_an_unknown_run_says_so(tmp_path, monkeypatch):
    """The suggested command, pasted, must write where the artifact was looked for, not to ./artifacts."""
    monkeypatch.delenv("ALIGN_ARTIFACTS", raising=False)
    store = ArtifactStore(tmp_path)
    _publish(store, run="r", stage="base")
    with pytest.raises(ArtifactError) as e:
        store.read_stage("r", "sft", needed_by="dpo")
    assert "run it first" in str(e.value) and str(e.value).endswith(f"--run r --artifacts {tmp_path}`")
    with pytest.raises(ArtifactError) as e:
        store.read_stage("nosuch", "sft")
    assert f"there is no run 'nosuch' under {tmp_path} (runs: r)" in str(e.value)
