"""Runs one stage the same way for every stage: config -> lock -> inputs -> skip/resume -> run -> publish.

A stage module (`stages/<name>.py`) provides:
- `Config`: its pydantic schema (a `StageConfig` subclass);
- `UPSTREAM`: a tuple of stage names it reads, or `upstream(cfg) -> tuple` when that depends on the config;
- `run(cfg, ctx)`: sets up, trains and saves into `ctx.out_dir`, filling `ctx.metrics`.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from alignment import preemption, tracking
from alignment.artifacts import Artifact, ArtifactStore, remove_tree, write_json
from alignment.cluster import Ranks
from alignment.config import StageConfig, config_dict, config_hash, load_config, load_yaml
from alignment.errors import AlignError, ArtifactError, ConfigError
from alignment.manifest import BaseModelId, Manifest, git_commit, library_versions, list_outputs

STAGES = ("base", "sft", "reward", "dpo", "ppo", "label", "online_dpo", "eval")
log = logging.getLogger("align")


@dataclass
class StageContext:
    """What a stage's `run` gets besides its config."""

    stage: str
    run: str
    out_dir: Path
    inputs: dict[str, Artifact]
    resume_from: Path | None = None
    metrics: dict = field(default_factory=dict)
    base_model: BaseModelId | None = None
    lineage: dict = field(default_factory=dict)
    status: str = "complete"

    @property
    def checkpoints_dir(self) -> Path:
        return self.out_dir / "checkpoints"


def stage_module(name: str):
    if name not in STAGES:
        raise AlignError(f"unknown stage '{name}'; stages: {', '.join(STAGES)}")
    try:
        return importlib.import_module(f"stages.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"stages.{name}":
            raise AlignError(f"stage '{name}' is not implemented yet") from None
        raise


def stage_of_file(path: str | Path) -> str:
    stage = load_yaml(path).get("stage")
    if not isinstance(stage, str):
        raise ConfigError([f"{path}: stage: required key is missing (which stage this file configures)"])
    return stage


def load_stage_config(stage: str, path: str | Path, overrides: list[str] = ()) -> StageConfig:
    declared = stage_of_file(path)
    if declared != stage:
        raise ConfigError([f"{path}: stage: this file configures '{declared}', not '{stage}'"])
    return load_config(stage_module(stage).Config, path, overrides)


def upstream_of(module, cfg) -> tuple[str, ...]:
    fn = getattr(module, "upstream", None)
    return tuple(fn(cfg)) if callable(fn) else tuple(getattr(module, "UPSTREAM", ()))


def resolve_inputs(store: ArtifactStore, run: str, stage: str, cfg: StageConfig, names) -> dict[str, Artifact]:
    inputs = {}
    for up in names:
        if up in cfg.inputs:
            inputs[up] = store.read(Path(cfg.inputs[up]))
            if inputs[up].stage != up:
                raise ArtifactError(f"inputs.{up}: {cfg.inputs[up]} is a '{inputs[up].stage}' artifact, not '{up}'")
        else:
            inputs[up] = store.read_stage(run, up, needed_by=stage)
    return inputs


def common_base(inputs: dict[str, Artifact]) -> BaseModelId | None:
    """All inputs must descend from the same base weights + tokenizer."""
    found: tuple[str, Artifact] | None = None
    for name, art in inputs.items():
        bm = art.manifest.base_model
        if bm is None:
            continue
        if found and found[1].manifest.base_model.fingerprint != bm.fingerprint:
            other = found[1].manifest.base_model
            raise ArtifactError(
                f"{art.path} was built on base '{bm.name}' (fingerprint {bm.fingerprint[:12]}) but "
                f"{found[1].path} on base '{other.name}' ({other.fingerprint[:12]}); an adapter only fits its own "
                f"base: re-run '{name}' on this run's base (--force) or point inputs.{name} at a matching artifact")
        found = found or (name, art)
    return found[1].manifest.base_model if found else None


def run_stage(stage: str, config_path: str, overrides: list[str] = (), *, root=None, run: str | None = None,
              force: bool = False) -> Path:
    module = stage_module(stage)
    cfg = load_stage_config(stage, config_path, overrides)
    run = run or os.environ.get("ALIGN_RUN") or cfg.run
    store = ArtifactStore(root)
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    # A SIGUSR1 (Slurm's warning before the time limit) makes the trainer checkpoint and stop.
    preemption.reset()
    preemption.install()
    # Several processes (torchrun / accelerate / srun): all train, only rank 0 locks, decides and publishes.
    ranks = Ranks()
    with store.lock(run, stage) if ranks.main else nullcontext():
        plan = ranks.from_main(lambda: _plan(store, run, stage, cfg, module, force))
        final, current, ctx, inputs, chash = plan
        if current is not None:
            _raise_if_failed_gate(current.manifest, final)
            return final
        log.info("[%s] run '%s', config %s (%s)\n%s", stage, run, chash[:12], config_path,
                 json.dumps(config_dict(cfg), indent=2))
        started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        with tracking.stage_run(cfg, ctx, store.root):
            module.run(cfg, ctx)
        ranks.barrier()  # every rank has finished writing before rank 0 hashes the outputs
        if preemption.requested_anywhere():
            log.warning("[%s] checkpoint saved, requeue: not publishing; the same command resumes from %s",
                        stage, latest_checkpoint(ctx.checkpoints_dir) or ctx.out_dir)
            raise preemption.Requeue(f"{stage}: stopped at a checkpoint on request (exit {preemption.REQUEUE_EXIT}); "
                                     "checkpoint saved, requeue: the same command resumes")
        final, manifest = ranks.from_main(lambda: _publish(store, cfg, ctx, chash, inputs, started))
        tracking.published(final)
        _raise_if_failed_gate(manifest, final)
        return final


def _plan(store, run, stage, cfg, module, force):
    """Rank 0's decision: (final dir, the up-to-date artifact or None, the context to run, inputs, config hash)."""
    inputs = resolve_inputs(store, run, stage, cfg, upstream_of(module, cfg))
    base = common_base(inputs)
    chash = config_hash(cfg)
    input_hashes = {k: a.manifest_sha256 for k, a in inputs.items()}
    final = store.stage_dir(run, stage)
    current = None if force or not final.exists() else _up_to_date(store, final, chash, input_hashes)
    if current is not None:
        return final, current, None, inputs, chash
    ctx = _prepare_partial(store, run, stage, chash, input_hashes, inputs, base)
    return final, None, ctx, inputs, chash


def _raise_if_failed_gate(manifest: Manifest, final: Path) -> None:
    """A gated artifact is kept for inspection, but the command (and a pipeline) must not look successful,
    neither when it is made nor when a re-run finds it up to date."""
    if manifest.status == "failed_gate":
        raise AlignError(f"{manifest.stage}: quality gate failed: {'; '.join(manifest.metrics.get('gate_failures', []))} "
                         f"(artifact kept at {final}, status failed_gate); change the config or re-run with --force")


def _up_to_date(store, final: Path, chash: str, input_hashes: dict) -> Artifact | None:
    """The published artifact when its config and inputs match this run's, else None (re-run)."""
    try:
        old = store.read(final, verify=False)
    except ArtifactError:
        return None
    m = old.manifest
    if m.config_hash != chash or {k: v.manifest_sha256 for k, v in m.inputs.items()} != input_hashes:
        log.info("%s: config or inputs changed since %s; re-running", m.stage, m.finished_at)
        return None
    note = "" if m.status == "complete" else f" [status: {m.status}]"
    log.info("%s: up to date (manifest %s), skipping%s", m.stage, old.manifest_sha256[:12], note)
    return old


def _prepare_partial(store, run, stage, chash, input_hashes, inputs, base) -> StageContext:
    """Resume the partial folder when it was started with the same config and inputs, else set it aside."""
    partial = store.partial_dir(run, stage)
    state = {"config_hash": chash, "inputs": input_hashes}
    resume = None
    if partial.exists():
        old = _read_state(partial)
        if old == state:
            resume = latest_checkpoint(partial / "checkpoints")
            log.info("[%s] resuming interrupted run from %s", stage, resume or "the start (no checkpoint yet)")
        else:
            aside = store.set_aside(partial, "stale")
            log.info("[%s] partial work from another config moved aside to %s", stage, aside)
    partial.mkdir(parents=True, exist_ok=True)
    write_json(partial / "run_state.json", state)
    return StageContext(stage=stage, run=run, out_dir=partial, inputs=inputs, resume_from=resume,
                        base_model=base)


def _read_state(partial: Path) -> dict | None:
    try:
        return json.loads((partial / "run_state.json").read_text())
    except (OSError, ValueError):
        return None


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete HF Trainer checkpoint (trainer_state.json is written last)."""
    if not folder.is_dir():
        return None
    done = [p for p in folder.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)


def _publish(store, cfg, ctx: StageContext, chash, inputs, started) -> tuple[Path, Manifest]:
    remove_tree(ctx.checkpoints_dir)
    write_json(ctx.out_dir / "metrics.json", ctx.metrics)
    manifest = Manifest(
        stage=ctx.stage, run=ctx.run, status=ctx.status, config=config_dict(cfg), config_hash=chash,
        inputs={k: {"stage": a.stage, "path": str(a.path), "manifest_sha256": a.manifest_sha256}
                for k, a in inputs.items()},
        outputs=list_outputs(ctx.out_dir), metrics=ctx.metrics, base_model=ctx.base_model,
        lineage=ctx.lineage, versions=library_versions(), git_commit=git_commit(), host=socket.gethostname(),
        started_at=started, finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    final = store.publish(ctx.run, ctx.stage, manifest)
    log.info("[%s] published %s (status %s)", ctx.stage, final, ctx.status)
    return final, manifest


def run_pipeline(path: str, *, root=None, run: str | None = None, force: bool = False) -> list[Path]:
    """Run the stages a pipeline file lists, in order, each skipped when up to date."""
    spec = load_yaml(path)
    steps, problems = spec.get("stages"), []
    if not isinstance(steps, list) or not steps:
        raise ConfigError([f"{path}: stages: expected a non-empty list of {{stage, config}}"])
    for i, step in enumerate(steps):
        if not isinstance(step, dict) or set(step) - {"stage", "config", "overrides", "slurm"} or "stage" not in step:
            problems.append(f"{path}: stages.{i}: expected {{stage: NAME, config: FILE, overrides: [...]}}")
    if problems:
        raise ConfigError(problems)
    run = run or spec.get("run")
    out = []
    for step in steps:
        cfg_file = Path(path).parent / step.get("config", f"{step['stage']}.yaml")
        out.append(_run_in_subprocess(step["stage"], cfg_file, step.get("overrides", []), root, run, force))
    return out


def _run_in_subprocess(stage: str, cfg_file: Path, overrides: list[str], root, run, force) -> Path:
    """One process per stage: memory is returned between stages and peak RSS is per stage."""
    cmd = [sys.executable, "-m", "alignment.cli", "run", stage, "-c", str(cfg_file), *overrides]
    cmd += ["--artifacts", str(root)] if root else []
    cmd += ["--run", run] if run else []
    cmd += ["--force"] if force else []
    log.info("== %s: %s", stage, " ".join(cmd[2:]))
    code = subprocess.call(cmd)
    if code != 0:
        err = AlignError(f"pipeline stopped at stage '{stage}' (exit {code}); fix it and re-run: finished stages skip")
        err.exit_code = code if code > 0 else 1
        raise err
    return ArtifactStore(root).stage_dir(run or os.environ.get("ALIGN_RUN") or _run_of(cfg_file), stage)


def _run_of(cfg_file: Path) -> str:
    return str(load_yaml(cfg_file).get("run", "default"))
