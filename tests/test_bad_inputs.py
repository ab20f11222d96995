"""A table of bad inputs, each through the real CLI (`alignment.cli.main`, in-process): the exit code, exactly
one `align: error:` line naming the file, row or key, no traceback, and not one published file changed.

Kinds: configs, overrides, command lines, data rows, judges, artifacts, file systems. Every case runs on its
own copy of the session's tiny store (base + sft), so cases that plant or break something stay apart.
Secrets given in a case (an API key, URL credentials) must appear nowhere: not in stderr, not in the store.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from alignment import cli
from alignment.manifest import MANIFEST

SECRET = "sk-live-9fA8x7Q2w3e4r5t6y7u8"
URL_PASSWORD = "hunter2hunter2"


@dataclass
class Case:
    id: str
    argv: list[str]
    names: list[str]
    """Substrings the error line must contain (the file, row or key, and what is wrong)."""
    code: int = 2
    setup: Callable[[Path, Path], None] | None = None
    """(store root, scratch folder) -> None: write files, break the store, before the command runs."""
    env: dict = field(default_factory=dict)
    secrets: tuple[str, ...] = ()
    """Values that must not appear in stderr or anywhere in the store."""


# -- setups -------------------------------------------------------------------------------------------------


def _write(rel: str, text: str | bytes):
    def setup(root: Path, tmp: Path) -> None:
        p = tmp / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return setup


def _chat_rows(n: int) -> str:
    row = {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi."}]}
    return "".join(json.dumps(row) + "\n" for _ in range(n))


def _with_rows(rel: str, rows: list[bytes | str]):
    return _write(rel, b"".join(r if isinstance(r, bytes) else r.encode() for r in rows))


GOOD = _chat_rows(1)


def _break(rel: str, how: str):
    """Break a published file of the copied store: truncate, edit, plant, or rewrite the manifest."""
    def setup(root: Path, tmp: Path) -> None:
        p = root / rel
        if how == "truncate":
            with p.open("r+b") as f:
                f.truncate(100)
        elif how == "flip":
            data = bytearray(p.read_bytes())
            data[len(data) // 2] ^= 0xFF
            p.write_bytes(bytes(data))
        elif how == "delete":
            p.unlink()
        elif how == "garbage":
            p.write_text("{not json")
        elif how == "plant_pickle":
            p.write_bytes(pickle.dumps(_Boom(str(tmp / "PWNED"))))
        elif how == "sha":
            m = json.loads(p.read_text())
            m["outputs"][0]["sha256"] = "0" * 64
            p.write_text(json.dumps(m))
        elif how == "escape":
            m = json.loads(p.read_text())
            m["outputs"][0]["path"] = "../../../../etc/hostname"
            p.write_text(json.dumps(m))
        elif how == "symlink_out":
            target = p.parent / "adapter_config.json"
            outside = tmp / "outside.json"
            outside.write_bytes(target.read_bytes())
            target.unlink()
            target.symlink_to(outside)
    return setup


class _Boom:
    """A pickle that, if ever unpickled, creates a folder: proof that code from the store ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _symlinked_run(root: Path, tmp: Path) -> None:
    (tmp / "elsewhere").mkdir()
    (root / "linked").symlink_to(tmp / "elsewhere")


def _model_folder(kind: str):
    def setup(root: Path, tmp: Path) -> None:
        d = tmp / "hub"
        shutil.copytree(root / "tiny" / "base" / "model", d)
        if kind == "bin_only":
            for p in d.glob("*.safetensors"):
                p.unlink()
            (d / "pytorch_model.bin").write_bytes(pickle.dumps(_Boom(str(tmp / "PWNED"))))
        else:
            cfg = json.loads((d / "config.json").read_text())
            cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
            (d / "config.json").write_text(json.dumps(cfg))
            (d / "modeling_evil.py").write_text(f"import os\nos.mkdir({str(tmp / 'PWNED')!r})\n")
    return setup


def _file_at(rel: str):
    def setup(root: Path, tmp: Path) -> None:
        (tmp / rel).write_text("I am a file")
    return setup


# -- the table ----------------------------------------------------------------------------------------------

SFT = "configs/tiny/sft.yaml"
DPO = "configs/tiny/dpo.yaml"
LABEL = "configs/tiny/label.yaml"
BASE = "configs/tiny/base.yaml"
RUN = ["run", "sft", "-c", SFT, "--run", "tiny"]  # the published sft of the store: config errors come first
OPENAI = ["judge.kind=openai", "judge.model=m", "judge.base_url=http://127.0.0.1:9/v1", "judge.retries=0",
          "judge.timeout_s=2"]


def _sft_file(text: str):
    return _write("c.yaml", "stage: sft\nrun: tiny\n" + text)


CASES = [
    # -- config files ---------------------------------------------------------------------------------------
    Case("config-missing", ["run", "sft", "-c", "{tmp}/nope.yaml"], ["nope.yaml: config file not found"]),
    Case("config-is-folder", ["run", "sft", "-c", "{tmp}"], ["config file not found (it is a folder)"]),
    Case("config-not-utf8", ["run", "sft", "-c", "{tmp}/c.yaml"], ["c.yaml: not UTF-8 text (byte 0xff"],
         setup=_write("c.yaml", b"stage: sft\nrun: \xff\xfe\n")),
    Case("config-bad-yaml", ["run", "sft", "-c", "{tmp}/c.yaml"], ["c.yaml: not valid YAML: line 3", "expected ',' or ']'"],
         setup=_write("c.yaml", "stage: sft\ntrain: {lr: [1\n")),
    Case("config-duplicate-key", ["run", "sft", "-c", "{tmp}/c.yaml"], ["c.yaml", "duplicate key 'seed'"],
         setup=_write("c.yaml", "stage: sft\nseed: 1\nseed: 2\n")),
    Case("config-duplicate-nested-key", ["run", "sft", "-c", "{tmp}/c.yaml"],
         ["c.yaml", "line 5", "duplicate key 'lr' (first given on line 4)"],
         setup=_write("c.yaml", "stage: sft\nrun: tiny\ntrain:\n  lr: 0.1\n  lr: 0.2\n")),
    Case("config-top-level-list", ["run", "sft", "-c", "{tmp}/c.yaml"], ["c.yaml: expected a mapping"],
         setup=_write("c.yaml", "- stage: sft\n")),
    Case("config-no-stage", ["run", "sft", "-c", "{tmp}/c.yaml"], ["c.yaml: stage: required key is missing"],
         setup=_write("c.yaml", "seed: 1\n")),
    Case("config-other-stage", ["run", "sft", "-c", BASE], ["base.yaml: stage: this file configures 'base'"]),
    Case("config-pipeline-file", ["run", "sft", "-c", "configs/tiny/pipeline.yaml"],
         ["pipeline.yaml: a pipeline file", "`align pipeline -c configs/tiny/pipeline.yaml`"]),
    Case("config-unknown-stage", ["run", "sfft", "-c", SFT], ["unknown stage 'sfft'"]),
    Case("config-file-names-unknown-stage", ["run", "sft", "-c", "{tmp}/c.yaml"],
         ["c.yaml: stage: unknown stage 'nosuch'"], setup=_write("c.yaml", "stage: nosuch\n")),
    Case("config-unknown-key", ["run", "sft", "-c", "{tmp}/c.yaml"], ["c.yaml: train.lrr: unknown key", "'lr'"],
         setup=_sft_file("train:\n  lrr: 0.1\n")),
    Case("config-run-escapes", ["run", "sft", "-c", "{tmp}/c.yaml"], ["c.yaml: run: expected one folder name"],
         setup=_write("c.yaml", "stage: sft\nrun: ../../x\n")),
    Case("config-bool-for-int", ["run", "sft", "-c", "{tmp}/c.yaml"], ["train.max_steps: expected a number"],
         setup=_sft_file("train:\n  max_steps: true\n")),
    Case("config-nan", ["run", "sft", "-c", "{tmp}/c.yaml"], ["train.lr: expected a finite number"],
         setup=_sft_file("train:\n  lr: .nan\n")),
    # -- values (overrides): each names the key and says "command line" ------------------------------------
    *[Case(f"value-{key}={value}", RUN + [f"{key}={value}"], [f"(command line): {key}: {msg}"]) for key, value, msg in [
        ("train.lr", "-1", "must be > 0"),
        ("train.lr", "0", "must be > 0"),
        ("train.lr", ".inf", "expected a finite number"),
        ("train.lr", "fast", "expected a number"),
        ("train.batch_size", "0", "must be >= 1"),
        ("train.eval_batch_size", "-3", "must be >= 1"),
        ("train.grad_accum", "0", "must be >= 1"),
        ("train.max_length", "0", "must be >= 1"),
        ("train.max_steps", "0", "must be >= 1 (or -1"),
        ("train.max_steps", "true", "expected a number, got true"),
        ("train.max_steps", "1.5", "expected an integer"),
        ("train.epochs", "0", "must be > 0"),
        ("train.logging_steps", "0", "must be >= 1"),
        ("train.save_steps", "-1", "must be >= 1"),
        ("train.warmup_ratio", "1.5", "must be in [0, 1)"),
        ("train.weight_decay", "-0.1", "must be >= 0"),
        ("train.lr_scheduler", "sawtooth", "expected one of"),
        ("train.gradient_checkpointing", "1", "expected true or false"),
        ("seed", "-1", "must be in [0, 4294967295]"),
        ("seed", "99999999999", "must be in [0, 4294967295]"),
        ("seed", "abc", "expected an integer"),
        ("packing", "1", "expected true or false"),
        ("merge", "'yes'", "expected true or false"),
        ("precision", "fp64", "expected one of"),
        ("tracking", "mlflow", "expected one of"),
        ("threads", "0", "must be >= 1"),
        ("peft.method", "magic", "expected one of"),
        ("peft.dropout", "-0.1", "must be in [0, 1)"),
        ("peft.r", "0", ""),
        ("data.eval_fraction", "0", "expected a fraction"),
        ("data.max_train_examples", "0", "expected at least 1"),
        ("data.max_bad_fraction", "1.5", "expected a fraction"),
        ("run", "../x", "expected one folder name"),
        ("run", "/abs/path", "expected one folder name"),
        ("run", ".hidden", "expected one folder name"),
        ("run", "a/b", "expected one folder name"),
    ]],
    Case("value-combination", RUN + ["merge=true", "peft.method=full"], ["(command line): merge:", "no adapter"]),
    Case("inputs-unknown-key", RUN + ["inputs.sfft=/x"], ["(command line): inputs.sfft: unknown key",
                                                          "reads base"]),
    Case("inputs-secret-under-made-up-key", RUN + [f"inputs.openai_key={SECRET}"],
         ["inputs.openai_key: unknown key"], secrets=(SECRET,)),
    Case("inputs-wrong-stage", ["run", "dpo", "-c", DPO, "--run", "tiny", "inputs.sft={root}/tiny/base"],
         ["inputs.sft:", "is a 'base' artifact, not 'sft'"]),
    Case("inputs-not-an-artifact", ["run", "dpo", "-c", DPO, "--run", "tiny", "inputs.sft={tmp}"],
         ["no manifest.json"]),
    # -- overrides that are not key=value ------------------------------------------------------------------
    Case("override-bad-yaml", RUN + ["train.lr=[1"], ["override 'train.lr': the value is not valid YAML"]),
    Case("override-no-value", RUN + ["novalue"], ["unrecognized arguments: novalue"]),
    Case("override-no-value-first", ["run", "sft", "novalue", "-c", SFT], ["override 'novalue': expected key.path"]),
    Case("override-empty-key", RUN + ["=1"], ["override '=1': expected key.path=value"]),
    Case("override-empty-part", RUN + ["train..lr=1"], ["override 'train..lr': empty part"]),
    Case("override-into-scalar", RUN + ["train.lr.x=1"], ["override 'train.lr.x': train.lr is not a section"]),
    Case("override-into-list", ["run", "sft", "-c", "configs/tiny/sft-mixture.yaml", "data.sources.0.weight=2"],
         ["override 'data.sources.0.weight': data.sources is not a section"]),
    Case("override-duplicate-in-value", RUN + ["train={{lr: 1, lr: 2}}"], ["override 'train'", "duplicate key 'lr'"]),
    # -- command lines -------------------------------------------------------------------------------------
    Case("cli-unknown-option", RUN + ["--bogus"], ["unrecognized arguments: --bogus"]),
    Case("cli-run-no-stage", ["run", "-c", SFT], ["align run: the following arguments are required: stage (see"]),
    Case("cli-run-escapes", ["run", "sft", "-c", SFT, "--run", "../../x"], ["--run: expected one folder name"]),
    Case("cli-run-absolute", ["run", "sft", "-c", SFT, "--run", "/tmp/x"], ["--run: expected one folder name"]),
    Case("cli-run-from-env", ["run", "sft", "-c", SFT], ["ALIGN_RUN: expected one folder name"],
         env={"ALIGN_RUN": "../up"}),
    Case("cli-status-escapes", ["status", "../x"], ["run name '../x': expected one folder name"]),
    Case("cli-report-escapes", ["report", "../x"], ["run name '../x': expected one folder name"]),
    Case("cli-verify-escapes", ["verify", "../x"], ["run name '../x': expected one folder name"]),
    Case("cli-status-no-run", ["status", "nosuchrun"], ["run 'nosuchrun' not found"]),
    Case("cli-artifacts-is-a-file", ["run", "sft", "-c", SFT, "--artifacts", "{tmp}/f"],
         ["f: the artifact root is a file"], setup=_file_at("f")),
    Case("cli-artifacts-under-a-file", ["run", "sft", "-c", SFT, "--artifacts", "{tmp}/f/store"],
         ["f/store", "Not a directory"], setup=_file_at("f")),
    Case("cli-symlinked-run", ["run", "sft", "-c", SFT, "--run", "linked"], ["outside the artifact root"],
         setup=_symlinked_run),
    # -- pipelines -----------------------------------------------------------------------------------------
    Case("pipeline-unknown-stage", ["pipeline", "-c", "{tmp}/p.yaml"], ["p.yaml: stages.0.stage: unknown stage"],
         setup=_write("p.yaml", "stages:\n  - {stage: sfft}\n")),
    Case("submit-unknown-stage", ["submit", "-c", "{tmp}/p.yaml", "--dry-run", "--out", "{tmp}/jobs"],
         ["p.yaml: stages.0.stage: unknown stage"], setup=_write("p.yaml", "stages:\n  - {stage: sfft}\n")),
    Case("submit-step-key-typo", ["submit", "-c", "{tmp}/p.yaml", "--dry-run", "--out", "{tmp}/jobs"],
         ["p.yaml: stages.0: expected {stage: NAME, config: FILE"],
         setup=_write("p.yaml", "stages:\n  - {stage: base, overides: [seed=1]}\n")),
    Case("pipeline-run-escapes", ["pipeline", "-c", "{tmp}/p.yaml"], ["p.yaml: run: expected one folder name"],
         setup=_write("p.yaml", "run: ../x\nstages:\n  - {stage: base}\n")),
    Case("pipeline-no-stages", ["pipeline", "-c", "{tmp}/p.yaml"], ["p.yaml: stages: expected a non-empty list"],
         setup=_write("p.yaml", "run: x\nstages: []\n")),
    Case("pipeline-jobs-zero", ["pipeline", "-c", "{tmp}/p.yaml"], ["p.yaml: jobs: expected a whole number >= 1"],
         setup=_write("p.yaml", "run: x\njobs: 0\nstages:\n  - {stage: base}\n")),
    Case("pipeline-jobs-flag", ["pipeline", "-c", "{tmp}/p.yaml", "-j", "0"], ["-j/--jobs: expected a whole number"],
         setup=_write("p.yaml", "run: x\nstages:\n  - {stage: base}\n")),
    Case("pipeline-duplicate-key", ["pipeline", "-c", "{tmp}/p.yaml"], ["p.yaml", "duplicate key 'run'"],
         setup=_write("p.yaml", "run: x\nrun: y\nstages: []\n")),
    # -- data rows (sft reads them before loading any model) ----------------------------------------------
    Case("data-missing-file", RUN + ["data.train={tmp}/none.jsonl"], ["none.jsonl: file not found"]),
    Case("data-not-json", RUN + ["data.train={tmp}/d.jsonl"], ["d.jsonl: row 2: not valid JSON"],
         setup=_with_rows("d.jsonl", [GOOD, "{oops\n"])),
    Case("data-row-is-a-list", RUN + ["data.train={tmp}/d.jsonl"], ["d.jsonl: row 1: expected a JSON object"],
         setup=_with_rows("d.jsonl", ["[1, 2]\n", GOOD])),
    Case("data-not-utf8", RUN + ["data.train={tmp}/d.jsonl"], ["d.jsonl: row 3: not UTF-8 text (byte 0xff"],
         setup=_with_rows("d.jsonl", [GOOD, GOOD, b'{"messages": "\xff"}\n'])),
    Case("data-huge-row", RUN + ["data.train={tmp}/d.jsonl"], ["d.jsonl: row 2: longer than the"],
         setup=_with_rows("d.jsonl", [GOOD, json.dumps({"messages": [{"role": "user", "content": "x" * (2 << 20)}]})
                                      + "\n"])),
    Case("data-no-fields", RUN + ["data.train={tmp}/d.jsonl"], ["d.jsonl: row 1: missing field"],
         setup=_with_rows("d.jsonl", ['{"text": "hi"}\n'])),
    Case("data-bad-role", RUN + ["data.train={tmp}/d.jsonl"], ["d.jsonl: row 1:"],
         setup=_with_rows("d.jsonl", ['{"messages": [{"role": "wizard", "content": "hi"}]}\n'])),
    Case("data-empty", RUN + ["data.train={tmp}/d.jsonl"], ["d.jsonl: no rows"], setup=_with_rows("d.jsonl", ["\n"])),
    Case("data-eval-bad-row", RUN + ["data.eval={tmp}/e.jsonl"], ["e.jsonl: row 1: not valid JSON"],
         setup=_with_rows("e.jsonl", ["nope\n"])),
    Case("prefs-missing-rejected", ["run", "dpo", "-c", DPO, "--run", "tiny", "data.train={tmp}/p.jsonl"],
         ["p.jsonl", "row 1"],
         setup=_with_rows("p.jsonl", [json.dumps({"prompt": "hi", "chosen": "a"}) + "\n"])),
    Case("prefs-not-utf8", ["run", "dpo", "-c", DPO, "--run", "tiny", "data.train={tmp}/p.jsonl"],
         ["p.jsonl: row 1: not UTF-8"], setup=_with_rows("p.jsonl", [b'{"prompt": "\xc3\x28"}\n'])),
    Case("prompts-bad-row", ["run", "label", "-c", LABEL, "--run", "tiny", "prompts.train={tmp}/q.jsonl"],
         ["q.jsonl: row 1"], setup=_with_rows("q.jsonl", ['{"nothing": 1}\n'])),
    # -- judges --------------------------------------------------------------------------------------------
    Case("judge-key-pasted-as-env-name", ["run", "label", "-c", LABEL, "--run", "tiny", *OPENAI,
                                          f"judge.api_key_env={SECRET.replace('-', '_')}"],
         ["(command line): judge.api_key_env: expected the NAME of an environment variable"],
         secrets=(SECRET.replace("-", "_"),)),
    Case("judge-env-not-set", ["run", "label", "-c", LABEL, "--run", "tiny", *OPENAI,
                               "judge.api_key_env=NO_SUCH_KEY_VAR"], ["NO_SUCH_KEY_VAR is not set"]),
    Case("judge-url-credentials", ["run", "label", "-c", LABEL, "--run", "tiny", *OPENAI[:2],
                                   f"judge.base_url=http://me:{URL_PASSWORD}@127.0.0.1:9/v1", *OPENAI[3:]],
         ["judge endpoint http://***@127.0.0.1:9/v1 is not answering"], secrets=(URL_PASSWORD,)),
    Case("judge-key-by-value", ["run", "label", "-c", LABEL, "--run", "tiny", *OPENAI,
                                "judge.api_key_env=ALIGN_TEST_JUDGE_KEY",
                                f"judge.base_url=http://127.0.0.1:9/v1?key={SECRET}"],
         ["is not answering"], env={"ALIGN_TEST_JUDGE_KEY": SECRET}, secrets=(SECRET,)),
    Case("judge-unknown-kind", ["run", "label", "-c", LABEL, "--run", "tiny", "judge.kind=oracle"],
         ["judge.kind: expected one of"]),
    Case("judge-openai-no-url", ["run", "label", "-c", LABEL, "--run", "tiny", "judge.kind=openai"],
         ["judge.base_url: kind 'openai' needs base_url and model"]),
    Case("judge-bad-clamp", ["run", "label", "-c", LABEL, "--run", "tiny", "judge.clamp=[0.6, 0.4]"],
         ["judge.clamp: expected [lo, hi]"]),
    Case("judge-same-labels", ["run", "label", "-c", LABEL, "--run", "tiny", "judge.labels=[A, A]"],
         ["judge.labels: expected two different"]),
    Case("judge-timeout-zero", ["run", "label", "-c", LABEL, "--run", "tiny", "judge.timeout_s=0"],
         ["judge.timeout_s: must be > 0"]),
    Case("judge-retries-negative", ["run", "label", "-c", LABEL, "--run", "tiny", "judge.retries=-1"],
         ["judge.retries: must be >= 0"]),
    Case("judge-no-constitution", ["run", "label", "-c", LABEL, "--run", "tiny", "judge.constitution={tmp}/x.md"],
         ["judge.constitution:", "x.md: file not found"]),
    Case("label-k-one", ["run", "label", "-c", LABEL, "--run", "tiny", "sampling.k=1"],
         ["sampling.k: expected at least 2"]),
    # -- artifacts -----------------------------------------------------------------------------------------
    Case("upstream-missing", ["run", "dpo", "-c", DPO, "--run", "empty"],
         ["dpo needs the 'sft' artifact of run 'empty'"]),
    Case("upstream-truncated", ["run", "dpo", "-c", DPO, "--run", "tiny"],
         ["adapter_model.safetensors: 100 bytes, the manifest says", "re-run stage 'sft' with --force"],
         setup=_break("tiny/sft/model/adapter_model.safetensors", "truncate")),
    Case("upstream-bit-flip", ["run", "dpo", "-c", DPO, "--run", "tiny"],
         ["adapter_model.safetensors: sha256", "changed since it was published"],
         setup=_break("tiny/sft/model/adapter_model.safetensors", "flip")),
    Case("upstream-file-deleted", ["run", "dpo", "-c", DPO, "--run", "tiny"],
         ["adapter_config.json: missing (the manifest lists it)"],
         setup=_break("tiny/sft/model/adapter_config.json", "delete")),
    Case("upstream-manifest-garbage", ["run", "dpo", "-c", DPO, "--run", "tiny"],
         ["sft/manifest.json: not a valid manifest"], setup=_break("tiny/sft/manifest.json", "garbage")),
    Case("upstream-manifest-sha-edited", ["run", "dpo", "-c", DPO, "--run", "tiny"],
         ["the manifest says 000000000000"], setup=_break("tiny/sft/manifest.json", "sha")),
    Case("upstream-manifest-escapes", ["run", "dpo", "-c", DPO, "--run", "tiny"],
         ["output '../../../../etc/hostname' points outside the artifact"],
         setup=_break("tiny/sft/manifest.json", "escape")),
    Case("upstream-symlink-out", ["run", "dpo", "-c", DPO, "--run", "tiny"],
         ["'model/adapter_config.json' points outside the artifact"],
         setup=_break("tiny/sft/model/adapter_model.safetensors", "symlink_out")),
    Case("upstream-planted-pickle", ["run", "dpo", "-c", DPO, "--run", "tiny"],
         ["sft/model/adapter_model.bin: not listed in the manifest", "never loaded"],
         setup=_break("tiny/sft/model/adapter_model.bin", "plant_pickle")),
    Case("verify-broken", ["verify", "tiny"], ["1 of 2 artifact(s) do not verify: tiny/sft"],
         setup=_break("tiny/sft/model/adapter_model.safetensors", "truncate")),
    Case("base-model-pickle-only", ["run", "base", "-c", BASE, "--run", "hub", "model.source=pretrained",
                                    "model.name={tmp}/hub"], ["model.name:", "holds only pickle weights"],
         setup=_model_folder("bin_only")),
    Case("base-model-remote-code", ["run", "base", "-c", BASE, "--run", "hub", "model.source=pretrained",
                                    "model.name={tmp}/hub"], ["model.name:", "needs its own Python code"],
         setup=_model_folder("remote_code")),
    Case("base-pretrained-no-name", ["run", "base", "-c", BASE, "--run", "hub", "model.source=pretrained"],
         ["model.name: source 'pretrained' needs"]),
    Case("base-tiny-zero-layers", ["run", "base", "-c", BASE, "--run", "hub", "model.tiny.layers=0"],
         ["model.tiny.layers: must be >= 1"]),
]


def _published_files(root: Path) -> dict[str, str]:
    """sha256 of every file inside a folder holding a manifest (published or moved aside)."""
    out = {}
    for m in root.glob(f"*/*/{MANIFEST}"):
        for p in sorted(m.parent.rglob("*")):
            if p.is_file() and not p.is_symlink():
                out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _run_case(case: Case, root: Path, tmp: Path, capsys, monkeypatch) -> tuple[int, str]:
    for k, v in case.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("ALIGN_DEBUG", raising=False)
    argv = [a.format(root=root, tmp=tmp) for a in case.argv]
    if "--artifacts" not in argv:
        argv += ["--artifacts", str(root)]
    capsys.readouterr()
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(case, tiny_store, tmp_path, capsys, monkeypatch):
    src, _ = tiny_store
    root, tmp = tmp_path / "store", tmp_path / "scratch"
    shutil.copytree(src, root, symlinks=True)
    tmp.mkdir()
    if case.setup:
        case.setup(root, tmp)
    before = _published_files(root)
    code, err = _run_case(case, root, tmp, capsys, monkeypatch)
    errors = [line for line in err.splitlines() if line.startswith("align: error:")]
    assert "Traceback" not in err, err[-3000:]
    assert code == case.code, err[-3000:]
    assert len(errors) == 1, err[-3000:]
    for name in case.names:
        assert name in errors[0], errors[0]
    assert _published_files(root) == before, "a published artifact changed"
    assert not (tmp / "PWNED").exists(), "code from the store ran"
    for secret in case.secrets:
        assert secret not in err
        for p in root.rglob("*"):
            if p.is_file():
                assert secret.encode() not in p.read_bytes(), p


def test_the_table_is_big_enough():
    kinds = {c.id.split("-")[0] for c in CASES}
    assert len(CASES) >= 80 and {"config", "value", "override", "cli", "data", "judge", "upstream"} <= kinds


# -- cases that need more than a command line ---------------------------------------------------------------


def test_read_only_store_up_to_date_is_a_no_op_and_a_stale_stage_one_line(tiny_store, tmp_path, capsys,
                                                                          monkeypatch, caplog):
    """A store on a read-only file system: EROFS for every file created or opened for writing under it."""
    src, _ = tiny_store
    root = tmp_path / "store"
    shutil.copytree(src, root)
    before = _published_files(root)
    real_open, real_mkdir = os.open, Path.mkdir

    def ro_open(path, flags, *a, **k):
        if str(path).startswith(str(root)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *a, **k)

    def ro_mkdir(self, *a, **k):
        if str(self).startswith(str(root)) and not self.exists():
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(os, "open", ro_open)
    monkeypatch.setattr(Path, "mkdir", ro_mkdir)
    (root / "tiny" / ".locks" / "sft.lock").unlink(missing_ok=True)  # nothing to open read-only either
    capsys.readouterr()
    assert cli.main(["run", "sft", "-c", SFT, "--run", "tiny", "--artifacts", str(root)]) == 0
    assert "sft: up to date" in caplog.text
    code = cli.main(["run", "sft", "-c", SFT, "--run", "tiny", "--artifacts", str(root), "train.lr=0.5"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("align: error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert "the artifact store is not writable (Read-only file system)" in errors[0] and str(root) in errors[0]
    assert _published_files(root) == before


def test_disk_full_while_publishing_is_one_line_and_keeps_the_work(tiny_store, tmp_path, capsys, monkeypatch):
    """ENOSPC when the manifest is written: one line naming the file, nothing published changes, the work stays
    in the partial folder, and the next run (space freed) publishes."""
    from alignment import artifacts

    src, _ = tiny_store
    root = tmp_path / "store"
    shutil.copytree(src, root)
    before = _published_files(root)
    real = artifacts.ArtifactStore.publish

    def full(self, run, stage, manifest):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.partial_dir(run, stage) / "manifest.json.tmp"))

    monkeypatch.setattr(artifacts.ArtifactStore, "publish", full)
    argv = ["run", "base", "-c", BASE, "--run", "full", "--artifacts", str(root)]
    capsys.readouterr()
    code = cli.main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("align: error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert "base.partial/manifest.json.tmp: No space left on device; the disk is full" in errors[0]
    assert _published_files(root) == before
    assert (root / "full" / "base.partial" / "model").is_dir()
    monkeypatch.setattr(artifacts.ArtifactStore, "publish", real)
    assert cli.main(argv) == 0
    assert artifacts.ArtifactStore(root).read_stage("full", "base", needed_by="test").manifest.status == "complete"


def test_debug_adds_the_traceback(tiny_store, capsys, monkeypatch):
    root, _ = tiny_store
    monkeypatch.setenv("ALIGN_DEBUG", "0")  # restored (unset) afterwards; main() sets it for pipeline children
    assert cli.main(["--debug", "run", "sft", "-c", SFT, "--artifacts", str(root), "train.lr=-1"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "align: error:" in err


def test_planted_checkpoint_pickle_is_never_unpickled(tiny_store, tmp_path, capsys):
    """A resumable-looking partial folder (matching run_state.json, a complete checkpoint) whose rng/optimizer
    files are malicious pickles: resuming refuses them (weights_only loads) and nothing runs."""
    from alignment.artifacts import ArtifactStore
    from alignment.config import config_hash
    from alignment.runner import load_stage_config

    src, _ = tiny_store
    root = tmp_path / "store"
    shutil.copytree(src, root)
    store = ArtifactStore(root)
    overrides = ["train.lr=0.003"]
    cfg = load_stage_config("sft", SFT, overrides)
    partial = store.partial_dir("tiny", "sft")
    ckpt = partial / "checkpoints" / "checkpoint-4"
    ckpt.mkdir(parents=True)
    base = store.read_stage("tiny", "base")
    (partial / "run_state.json").write_text(json.dumps({"config_hash": config_hash(cfg),
                                                        "inputs": {"base": base.manifest_sha256}}))
    marker = tmp_path / "PWNED"
    for name in ("rng_state.pth", "optimizer.pt", "scheduler.pt", "training_args.bin"):
        (ckpt / name).write_bytes(pickle.dumps(_Boom(str(marker))))
    shutil.copytree(root / "tiny" / "sft" / "model", ckpt, dirs_exist_ok=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 4, "log_history": [], "max_steps": 8,
                                                         "best_model_checkpoint": None}))
    before = _published_files(root)
    capsys.readouterr()
    code = cli.main(["run", "sft", "-c", SFT, "--run", "tiny", "--artifacts", str(root), *overrides])
    err = capsys.readouterr().err
    assert not marker.exists(), "a pickle from the store was executed"
    assert code != 0 and len([x for x in err.splitlines() if x.startswith("align: error:")]) == 1, err[-2000:]
    assert "Traceback" not in err
    assert _published_files(root) == before
