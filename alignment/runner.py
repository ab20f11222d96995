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
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from alignment import launch, logs, preemption, tracking
from alignment.artifacts import Artifact, ArtifactStore, pause_point, remove_tree, write_json
from alignment.cluster import Ranks
from alignment.config import (StageConfig, config_dict, config_hash, install_log_redaction, load_config, load_yaml,
                              name_problem, scrub)
from alignment.errors import AlignError, ArtifactError, ConfigError
from alignment.manifest import MANIFEST, BaseModelId, Manifest, git_commit, library_versions, list_outputs
from alignment.pipeline_jobs import (Step, dependencies, drop_replaced_intermediates, how_ended, run_steps,
                                     threads_for)

STAGES = ("base", "sft", "reward", "dpo", "ppo", "grpo", "label", "online_dpo", "eval", "generate")
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

    def cache_folder(self, configured: str | None, kind: str) -> Path | None:
        """A stage's `cache_dir` setting: None means `<artifact root>/.cache/<kind>`, "none" no cache."""
        if configured == "none":
            return None
        return Path(configured) if configured else self.out_dir.parent.parent / ".cache" / kind


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
    data = load_yaml(path)
    stage = data.get("stage")
    if stage is None and "stages" in data:
        raise ConfigError([f"{path}: a pipeline file (it lists stages:), not one stage's config; run it with "
                           f"`align pipeline -c {path}`, or name one stage's file (e.g. its stages' config:)"])
    if not isinstance(stage, str):
        raise ConfigError([f"{path}: stage: required key is missing (which stage this file configures)"])
    if stage not in STAGES:
        raise ConfigError([f"{path}: stage: unknown stage '{stage}'; stages: {', '.join(STAGES)}"])
    return stage


def load_stage_config(stage: str, path: str | Path, overrides: list[str] = ()) -> StageConfig:
    declared = stage_of_file(path)
    if declared != stage:
        raise ConfigError([f"{path}: stage: this file configures '{declared}', not '{stage}'"])
    module = stage_module(stage)
    cfg = load_config(module.Config, path, overrides)
    _check_input_keys(module, cfg, path, overrides)
    return cfg


def _check_input_keys(module, cfg, path, overrides) -> None:
    """`inputs.<stage>` must name a stage this one reads: a typo (`inputs.sfft`) would be ignored, and a value
    under a made-up key (`inputs.openai_key=sk-...`) would land in the manifest. The value is never echoed."""
    wanted = upstream_of(module, cfg)
    problems = []
    for key in cfg.inputs:
        if key not in wanted:
            src = f"{path} (command line)" if any(o.startswith(("inputs=", f"inputs.{key}=")) for o in overrides) \
                else str(path)
            reads = ", ".join(wanted) or "no artifacts"
            problems.append(f"{src}: inputs.{key}: unknown key: stage '{cfg.stage}' reads {reads}")
    if problems:
        raise ConfigError(problems)


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
        m = inputs[up].manifest
        if m.status == "failed_gate" and not cfg.allow_failed_inputs:
            why = "; ".join(map(str, (m.metrics or {}).get("gate_failures") or [])) or "see its manifest"
            raise ArtifactError(f"inputs.{up}: {inputs[up].path} failed its quality gate ({why}); retrain it, or set "
                                "allow_failed_inputs=true to use it anyway")
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
    install_log_redaction()
    module = stage_module(stage)
    cfg = load_stage_config(stage, config_path, overrides)
    run = _run_name(run, cfg.run)
    store = ArtifactStore(root)
    # transformers 5.2x fetches "hub kernels" (compiled code from the Hub, e.g. kernels-community/rotary) on a GPU
    # when the `kernels` package is installed: code from the network at run time, and with HF_HUB_OFFLINE (a
    # cluster node) a ValueError in the first training step. Off unless the user turns them on.
    os.environ.setdefault("USE_HUB_KERNELS", "NO")
    if cfg.onednn_cache is not None:  # read by oneDNN at its first primitive, so before any torch work
        os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(cfg.onednn_cache))
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    # A SIGUSR1 (Slurm's warning before the time limit) makes the trainer checkpoint and stop.
    preemption.reset()
    preemption.install()
    # Several processes (torchrun / accelerate / srun): all train, only rank 0 locks, decides and publishes.
    ranks = Ranks()
    lock = store.lock(run, stage) if ranks.main else nullcontext()
    with lock:
        plan = ranks.from_main(lambda: _plan(store, run, stage, cfg, module, force, lock))
        final, current, ctx, inputs, chash = plan
        if current is not None:
            _raise_if_failed_gate(current.manifest, final)
            return final
        started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        pause_point("run:before")
        with logs.stage_log(ctx.out_dir, stage, enabled=ranks.main):
            _announce(cfg, ctx, chash, config_path, write=ranks.main)
            with _failure_recorded(ctx.out_dir, enabled=ranks.main):
                with tracking.stage_run(cfg, ctx, store.root):
                    module.run(cfg, ctx)
                ranks.barrier()  # every rank has finished writing before rank 0 hashes the outputs
                pause_point("run:after")
                return _finish(store, cfg, ctx, chash, inputs, started, ranks)


def stage_folder(stage: str, config_path: str, overrides: list[str] = (), *, root=None, run: str | None = None) -> Path:
    """Where `run_stage` with these arguments publishes (its config is read and checked, nothing is run)."""
    cfg = load_stage_config(stage, config_path, overrides)
    return ArtifactStore(root).stage_dir(_run_name(run, cfg.run), stage)


def _finish(store, cfg, ctx, chash, inputs, started, ranks) -> Path:
    """After `module.run`: requeue when a checkpoint was requested, else publish (rank 0) and check the gate."""
    stage = ctx.stage
    if preemption.requested_anywhere():
        log.warning("[%s] checkpoint saved, requeue: not publishing; the same command resumes from %s",
                    stage, latest_checkpoint(ctx.checkpoints_dir) or ctx.out_dir)
        raise preemption.Requeue(f"{stage}: stopped at a checkpoint on request (exit {preemption.REQUEUE_EXIT}); "
                                 "checkpoint saved, requeue: the same command resumes")
    final, manifest = ranks.from_main(lambda: _publish(store, cfg, ctx, chash, _unchanged(store, inputs), started))
    tracking.published(final)
    _raise_if_failed_gate(manifest, final)
    return final


CONFIG_FILE = "config.yaml"
"""The resolved config of a stage (secrets redacted), an output of its artifact; the console gets one line."""
FAILURE_FILE = "failure.json"
"""Why the last attempt in a partial folder stopped (`align status` shows it); removed when an attempt starts."""


def _announce(cfg, ctx, chash, config_path, write: bool) -> None:
    import yaml

    text = yaml.safe_dump(config_dict(cfg), sort_keys=False)  # as config.yaml and `align config show` give it
    if write:
        (ctx.out_dir / CONFIG_FILE).write_text(text, encoding="utf-8")
    log.info("[%s] run '%s', config %s (%s; resolved: %s in the artifact, log: %s)", ctx.stage, ctx.run, chash[:12],
             config_path, CONFIG_FILE, logs.STAGE_LOG)
    log.debug("[%s] resolved config:\n%s", ctx.stage, text.rstrip())


@contextmanager
def _failure_recorded(out_dir: Path, enabled: bool):
    """Leave `failure.json` in the partial folder when the stage raises, so status can name the cause."""
    path = out_dir / FAILURE_FILE
    if enabled:
        path.unlink(missing_ok=True)
    try:
        yield
    except BaseException as e:
        if enabled and out_dir.is_dir():  # a failed quality gate is published already: no partial to mark
            kind = ("preempted" if isinstance(e, preemption.Requeue) else
                    "interrupted" if isinstance(e, KeyboardInterrupt) else "failed")
            write_json(path, {"kind": kind, "error": type(e).__name__, "message": scrub(str(e).splitlines()[0][:300])
                              if str(e) else "", "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        raise


def _run_name(given: str | None, configured: str) -> str:
    """--run, else $ALIGN_RUN, else the config's run: one safe folder name under the artifact root."""
    source = "--run" if given else "ALIGN_RUN" if os.environ.get("ALIGN_RUN") else "run"
    run = given or os.environ.get("ALIGN_RUN") or configured
    problem = name_problem(run)
    if problem:
        raise ConfigError([f"{source}: {problem} (got {run!r})"])
    return run


def _plan(store, run, stage, cfg, module, force, lock=None):
    """Rank 0's decision: (final dir, the up-to-date artifact or None, the context to run, inputs, config hash)."""
    inputs = resolve_inputs(store, run, stage, cfg, upstream_of(module, cfg))
    base = common_base(inputs)
    chash = config_hash(cfg)
    input_hashes = {k: a.manifest_sha256 for k, a in inputs.items()}
    final = store.stage_dir(run, stage)
    read_only = getattr(lock, "read_only", False)
    finished = None if read_only else _finish_interrupted_publish(store, run, stage, chash, input_hashes)
    if finished is not None:
        return final, finished, None, inputs, chash
    if final.exists() and not read_only:
        store.tidy(final)
    current = None if force or not final.exists() else _up_to_date(store, final, chash, input_hashes)
    if current is not None:
        return final, current, None, inputs, chash
    if read_only:
        raise ArtifactError(f"{store.root}: the artifact store is not writable ({lock.why.strerror}) and stage "
                            f"'{stage}' of run '{run}' is not up to date; run it where the store is writable")
    ctx = _prepare_partial(store, run, stage, chash, input_hashes, inputs, base)
    return final, None, ctx, inputs, chash


def _finish_interrupted_publish(store, run, stage, chash, input_hashes) -> Artifact | None:
    """A kill between writing the manifest and the rename left a complete, verifying partial folder: put it in
    place instead of training again (the old artifact, if any, is moved aside as in any publish)."""
    partial = store.partial_dir(run, stage)
    if not (partial / MANIFEST).is_file():
        return None
    try:
        art = store.read(partial)
    except ArtifactError as e:
        log.info("[%s] the partial folder's manifest does not verify (%s); resuming the stage instead", stage, e)
        return None
    if not _made_from(art.manifest, chash, input_hashes):
        return None
    final = store.commit(run, stage)
    log.info("[%s] finished the publish an interrupted run had started: %s", stage, final)
    return store.read(final)


def _unchanged(store, inputs: dict[str, Artifact]) -> dict[str, Artifact]:
    """Refuse to publish when an input was republished (`--force` upstream) or changed while this stage ran:
    the manifest would name one input and hold weights trained on another."""
    for name, art in inputs.items():
        try:
            now = store.read(art.path).manifest_sha256
        except ArtifactError as e:
            now, why = None, str(e)
        else:
            why = f"manifest {art.manifest_sha256[:12]} -> {now[:12]}"
        if now != art.manifest_sha256:
            raise ArtifactError(f"inputs.{name}: {art.path} changed while this stage ran ({why}); nothing published, "
                                "since this stage trained on what was there before. Re-run it to train on the new input")
    return inputs


def _raise_if_failed_gate(manifest: Manifest, final: Path) -> None:
    """A gated artifact is kept for inspection, but the command (and a pipeline) must not look successful,
    neither when it is made nor when a re-run finds it up to date."""
    if manifest.status == "failed_gate":
        raise AlignError(f"{manifest.stage}: quality gate failed: {'; '.join(manifest.metrics.get('gate_failures', []))} "
                         f"(artifact kept at {final}, status failed_gate); change the config or re-run with --force")


def _made_from(manifest: Manifest, chash: str, input_hashes: dict) -> bool:
    """The manifest names this config hash and exactly these inputs (by their manifests' hashes)."""
    return manifest.config_hash == chash and \
        {k: v.manifest_sha256 for k, v in manifest.inputs.items()} == input_hashes


def _up_to_date(store, final: Path, chash: str, input_hashes: dict) -> Artifact | None:
    """The published artifact when its config and inputs match this run's, else None (re-run)."""
    try:
        old = store.read(final)
    except ArtifactError as e:
        log.warning("%s: the published artifact does not verify (%s); re-running (it is moved aside, not deleted)",
                    final.name, e)
        return None
    m = old.manifest
    if not _made_from(m, chash, input_hashes):
        log.info("%s: config or inputs changed since %s; re-running", m.stage, m.finished_at)
        return None
    note = "" if m.status == "complete" else f" [status: {m.status}]"
    log.info("%s: up to date (manifest %s), skipping%s", m.stage, old.manifest_sha256[:12], note)
    return old


def _prepare_partial(store, run, stage, chash, input_hashes, inputs, base) -> StageContext:
    """Resume the partial folder when it was started with the same config and inputs, else set it aside."""
    partial = store.partial_dir(run, stage)
    # An adapter stage writes its parent's merged weights under `<run>/.merged` when it saves; refuse a symlink
    # out of the root now, before the training that would otherwise be thrown away.
    from alignment.policy import MERGED_DIR

    store.check_under_root(store.run_dir(run) / MERGED_DIR)
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
    done = [p for p in folder.glob("checkpoint-*") if checkpoint_step(p) is not None
            and _complete_state(p / "trainer_state.json")]
    return max(done, key=checkpoint_step, default=None)


def checkpoint_step(folder: Path) -> int | None:
    """The step of a `checkpoint-<digits>` folder; None for any other name (a copy such as `checkpoint-4.bak`, a
    folder another tool left), which is never resumed from."""
    tail = folder.name.removeprefix("checkpoint-")
    return int(tail) if tail != folder.name and tail.isascii() and tail.isdigit() else None


def _complete_state(path: Path) -> bool:
    """HF writes trainer_state.json in place, not atomically: a kill mid-write leaves a file that does not parse,
    and that checkpoint is incomplete (the one before it is still whole)."""
    try:
        return isinstance(json.loads(path.read_text(encoding="utf-8")), dict)
    except (OSError, ValueError):
        return False


def _publish(store, cfg, ctx: StageContext, chash, inputs, started) -> tuple[Path, Manifest]:
    # Checkpoints stay until the artifact is in place (ArtifactStore.commit): a kill before that resumes from them.
    from alignment.hardware import accelerator_metrics

    metrics, lineage = scrub({**ctx.metrics, **accelerator_metrics()}), scrub(ctx.lineage)
    write_json(ctx.out_dir / "metrics.json", metrics)
    manifest = Manifest(
        stage=ctx.stage, run=ctx.run, status=ctx.status, config=config_dict(cfg), config_hash=chash,
        inputs={k: {"stage": a.stage, "path": str(a.path), "manifest_sha256": a.manifest_sha256}
                for k, a in inputs.items()},
        outputs=list_outputs(ctx.out_dir), metrics=metrics, base_model=ctx.base_model,
        lineage=lineage, versions=library_versions(), git_commit=git_commit(), host=socket.gethostname(),
        started_at=started, finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    final = store.publish(ctx.run, ctx.stage, manifest)
    log.info("[%s] published %s (status %s)", ctx.stage, final, ctx.status)
    return final, manifest


class ToEveryStage(str):
    """An override with no stage prefix, routed to every stage: a stage it does not fit says so."""


def route_overrides(overrides, stages, where: str = "command line") -> dict[str, list[str]]:
    """`sft.train.lr=1e-4` or `sft:train.lr=1e-4` -> {"sft": ["train.lr=1e-4"]}; `seed=1` -> every stage.
    The first dotted part is a stage only when the pipeline runs that stage (ppo's own `eval.batch_size` is
    written `ppo.eval.batch_size`)."""
    routed: dict[str, list[str]] = {s: [] for s in stages}
    for item in overrides:
        key, sep, value = item.partition("=")
        head, colon, rest = key.partition(":")
        if not colon:
            head, dot, rest = key.partition(".")
            if not (dot and head in routed):
                head, rest = None, key
        if head is None:
            for s in routed:
                routed[s].append(ToEveryStage(item))
        elif head not in routed:
            raise ConfigError([f"{where}: override '{item}': the pipeline has no stage '{head}' "
                               f"(stages: {', '.join(routed)})"])
        elif not rest:
            raise ConfigError([f"{where}: override '{item}': expected {head}.key.path=value"])
        else:
            routed[head].append(f"{rest}{sep}{value}")
    return routed


def run_pipeline(path: str, *, root=None, run: str | None = None, force: bool = False,
                 overrides: list[str] = (), jobs: int | None = None) -> list[Path]:
    """Run the stages a pipeline file lists, each skipped when up to date. `overrides` as `route_overrides`
    reads them, applied after the pipeline file's own per-stage overrides. `jobs` (else the file's `jobs:`,
    else 1): how many stage processes run at once, each starting when the earlier stages it reads have finished
    (alignment.pipeline_jobs). Every stage's config is loaded before the first one starts, so a bad key in the
    last stage fails now, not after an hour of training."""
    spec = load_yaml(path)
    steps, problems = pipeline_steps(path, spec)
    if spec.get("run") is not None and name_problem(spec.get("run")):
        problems.append(f"{path}: run: {name_problem(spec.get('run'))} (got {spec.get('run')!r})")
    where = f"{path}: jobs" if jobs is None else "command line: -j/--jobs"
    jobs = spec.get("jobs", 1) if jobs is None else jobs
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        problems.append(f"{where}: expected a whole number >= 1 (stage processes at once), got {jobs!r}")
    try:
        launch.choice()
    except ValueError as e:
        problems.append(f"environment: {e}")
    if problems:
        raise ConfigError(problems)
    run = run or spec.get("run")
    if run is not None:
        _run_name(run, run)
    store = ArtifactStore(root)  # --artifacts pointing at a file: say so before the first stage starts
    planned = _plan_steps(path, steps, route_overrides(overrides, [step["stage"] for step in steps]),
                          root, run, force, jobs)
    t0 = time.perf_counter()
    log_dir = store.run_dir(planned[0][1]) / "logs" if jobs > 1 else None
    finished = run_steps([p[0] for p in planned], jobs, log_dir)
    for old in drop_replaced_intermediates(finished):
        log.debug("pipeline: removed %s (published and replaced by this pipeline)", old)
    _report(finished, time.perf_counter() - t0, jobs)
    folders = [store.stage_dir(run_of, step.stage) for step, run_of in planned]
    _say_where_results_are(store, planned[-1][1], folders)
    return folders


def _say_where_results_are(store: ArtifactStore, run: str, folders: list[Path]) -> None:
    """The pipeline's last line: what to open next (its last eval report) and the command for the metrics."""
    report = next((f / "report.html" for f in reversed(folders) if (f / "report.html").is_file()), None)
    log.info("pipeline: done; metrics: `align status --run %s%s`%s", run, store.flag(),
             f"; report: {report}" if report else "")


def pipeline_steps(path, spec: dict) -> tuple[list[dict], list[str]]:
    """A pipeline file's `stages:` list and what is wrong with its steps (`align pipeline` and `align submit`
    read the file the same way). A missing or empty list is fatal at once."""
    steps, problems = spec.get("stages"), []
    if not isinstance(steps, list) or not steps:
        raise ConfigError([f"{path}: stages: expected a non-empty list of {{stage, config}}"])
    for i, step in enumerate(steps):
        if not isinstance(step, dict) or set(step) - {"stage", "config", "overrides", "slurm"} or "stage" not in step:
            problems.append(f"{path}: stages.{i}: expected {{stage: NAME, config: FILE, overrides: [...]}}")
        elif step["stage"] not in STAGES:
            problems.append(f"{path}: stages.{i}.stage: unknown stage {step['stage']!r}; stages: {', '.join(STAGES)}")
        elif not isinstance(step.get("overrides", []), list) or not isinstance(step.get("config", ""), str):
            problems.append(f"{path}: stages.{i}: overrides must be a list of key.path=value, config a file name")
    return steps, problems


def _report(finished, wall: float, jobs: int) -> None:
    """The pipeline's time and every stage's (wall, user, sys), then the first failure as the error."""
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF)  # the imports the forked stages share (alignment/launch.py)
    log.info("pipeline: %.0f s wall, %.0f s user + %.0f s sys CPU (stage processes and this one, -j %d)",
             wall, own.ru_utime + sum(f.user_s for f in finished), own.ru_stime + sum(f.sys_s for f in finished), jobs)
    for f in sorted(finished, key=lambda f: f.step.index):
        log.info("   %-10s %7.0f s wall %7.0f s user %5.0f s sys%s", f.step.stage, f.wall_s, f.user_s, f.sys_s,
                 "" if f.code == 0 else "  (failed)")
    failed = next((f for f in finished if f.code != 0), None)
    if failed is not None:
        code = failed.code
        err = AlignError(f"pipeline stopped at stage '{failed.step.stage}' ({how_ended(code)}); fix it and re-run: "
                         "finished stages skip")
        err.exit_code = code if code > 0 else 128 - code
        raise err


def _plan_steps(path, steps, routed, root, run, force, jobs):
    """[(Step, its run name)]: each step's command, with the cores split between the stages that can run side by
    side (`threads_for`), and the earlier steps it waits for. Loading each config here checks it before any stage
    runs."""
    loaded = step_configs(path, steps, routed)
    fresh = [False] * len(loaded) if force else looks_fresh(loaded, root, run)
    left_out = set() if force else superseded(loaded, root, run, fresh)
    kept = [i for i in range(len(loaded)) if i not in left_out]
    loaded, fresh = [loaded[i] for i in kept], [fresh[i] for i in kept]
    deps = dependencies([x[0] for x in loaded], [reads for *_, reads in loaded])
    threads, planned = threads_for(deps, jobs), []
    for i, (stage, cfg_file, extra, cfg, _) in enumerate(loaded):
        if jobs > 1 and cfg.threads is None:
            extra = [*extra, f"threads={threads[i]}"]
        command = _stage_command(stage, cfg_file, extra, root, run, force)
        run_of = _step_run(run, cfg)
        published = ArtifactStore(root).stage_dir(run_of, stage) if run_of else None
        planned.append((Step(i, stage, command, deps[i], preload=not fresh[i], published=published), run_of))
    return planned


def looks_fresh(loaded: list[tuple], root, run: str | None) -> list[bool]:
    """Per step: its artifact looks up to date now, and so does every earlier step it reads (one that re-runs makes
    its readers re-run). A guess from the manifests before anything runs; every step checks again when it starts."""
    reads = dependencies([x[0] for x in loaded], [x[4] for x in loaded], own_stage=False)
    store, fresh = ArtifactStore(root), []
    for i, (stage, _, _, cfg, _) in enumerate(loaded):
        fresh.append(all(fresh[j] for j in reads[i]) and _looks_up_to_date(store, _step_run(run, cfg), stage, cfg))
    return fresh


def superseded(loaded: list[tuple], root, run: str | None, fresh: list[bool] | None = None) -> set[int]:
    """Steps to leave out: an earlier step of a stage the pipeline lists again, when no step reads it and that
    stage's last step will find its artifact up to date. Such a step (eval for dpo alone, while ppo trains) is
    there to fill the answer cache for the last one; run, it would only publish an artifact the last step
    replaces. A guess from the manifests (`fresh`: `looks_fresh`, computed here when not given): when wrong it
    costs the overlap, never a result (every step checks again when it starts)."""
    stages = [x[0] for x in loaded]
    if len(set(stages)) == len(stages):
        return set()
    read = set().union(*dependencies(stages, [x[4] for x in loaded], own_stage=False))
    fresh = looks_fresh(loaded, root, run) if fresh is None else fresh
    last = {stage: i for i, stage in enumerate(stages)}
    out = {i for i, stage in enumerate(stages) if last[stage] != i and i not in read and fresh[last[stage]]}
    for i in sorted(out):  # `align pipeline` and `align submit` alike: a step missing from the chain is said
        log.info("pipeline: step %d (%s) left out: the file's last %s step is up to date", i, stages[i], stages[i])
    return out


def _step_run(run: str | None, cfg) -> str:
    """The run a pipeline step writes to: --run, else $ALIGN_RUN, else its config's `run`."""
    return run or os.environ.get("ALIGN_RUN") or cfg.run


def _looks_up_to_date(store, run: str, stage: str, cfg) -> bool:
    """The published artifact's manifest names this config and these inputs (nothing is written or run)."""
    try:
        inputs = resolve_inputs(store, run, stage, cfg, upstream_of(stage_module(stage), cfg))
        manifest, _ = store.load_manifest(store.stage_dir(run, stage))
    except AlignError:
        return False
    return manifest.status == "complete" and \
        _made_from(manifest, config_hash(cfg), {k: a.manifest_sha256 for k, a in inputs.items()})


def step_configs(path, steps, routed) -> list[tuple]:
    """Per pipeline step: (stage, config file, overrides, the loaded config, the stages it reads from this run).
    A stage whose config points `inputs.<stage>` at an artifact does not read that stage from the run."""
    out, problems, everywhere = [], [], {}
    for step in steps:  # every step's problems at once, not the first stage's alone
        stage, cfg_file = step["stage"], Path(path).parent / step.get("config", f"{step['stage']}.yaml")
        extra = [str(o) for o in [*step.get("overrides", []), *routed[stage]]]
        try:
            cfg = load_stage_config(stage, cfg_file, extra)
        except ConfigError as e:
            for line in e.problems:
                item = _unprefixed_cause(line, routed[stage])
                if item is None:
                    problems.append(line)
                else:  # one line per such override, naming the stages it does not fit
                    everywhere.setdefault((item, line.split("(command line): ", 1)[1]), []).append(stage)
            continue
        out.append((stage, cfg_file, extra, cfg, set(upstream_of(stage_module(stage), cfg)) - set(cfg.inputs)))
    for (item, why), stages in everywhere.items():
        problems.append(f"command line: '{item}': {why} (stages {', '.join(dict.fromkeys(stages))}"
                        f"{_routing_hint(item) if 'unknown key' in why else ''})")
    if problems:
        raise ConfigError(problems)
    return out


def _routing_hint(item: str) -> str:
    """Why an override without a stage prefix reached a stage that has no such key, and how to aim it."""
    first = item.partition("=")[0].split(".")[0]
    if first in STAGES:  # meant for a stage this pipeline does not run
        return f"; the pipeline runs no '{first}' stage, so it went to every stage"
    return f"; with no stage prefix it goes to every stage: write STAGE.{item} for one"


def _unprefixed_cause(line: str, overrides) -> str | None:
    """The override without a stage prefix that a stage's config error `line` is about, if any."""
    for item in overrides:
        first = item.partition("=")[0].strip().split(".")[0]
        if isinstance(item, ToEveryStage) and any(f"(command line): {first}{c}" in line for c in ".:"):
            return str(item)
    return None


def _stage_command(stage: str, cfg_file: Path, overrides: list[str], root, run, force) -> list[str]:
    """One process per stage: memory is returned between stages and peak RSS is per stage."""
    cmd = [sys.executable, "-m", "alignment.cli", "run", stage, "-c", str(cfg_file), *overrides]
    cmd += ["--artifacts", str(root)] if root else []
    cmd += ["--run", run] if run else []
    cmd += ["--force"] if force else []
    cmd += ["--debug"] if os.environ.get("ALIGN_DEBUG") else []
    return cmd
