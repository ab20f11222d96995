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
