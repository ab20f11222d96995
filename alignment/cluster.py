"""The cluster: Slurm job chains for a pipeline, and the ranks of a multi-process stage.

Slurm. `align submit -c pipeline.yaml` renders one sbatch script per stage and submits each with
`--dependency=afterok:<the jobs of the earlier stages it reads>` (dpo waits for sft, not for the reward model;
alignment.pipeline_jobs.dependencies, as `align pipeline -j`) and `--kill-on-invalid-dep=yes`, so a failed stage
cancels everything downstream of it. Resources, later wins: what applies to every stage (a cluster profile
`configs/cluster/<name>.yaml`, the pipeline's `slurm:` section, command-line flags), then what is written for
one stage (the profile's `stages.<stage>` section, the pipeline step's `slurm:`), so a profile keeps the base
import and eval small while the flags scale the training stages. `--dry-run` prints the sbatch chain. Every job is
`--requeue`-able and asks for `--signal=B:USR1@<signal_seconds>`: the job script's trap passes the
signal to the stage, which saves a checkpoint and exits with `preemption.REQUEUE_EXIT`; the script
then runs `scontrol requeue`, and the requeued job re-runs the same `align run`, which resumes from
that checkpoint (an up-to-date stage just skips). Submissions are recorded in
`<artifacts>/<run>/.slurm.json` so `align status` can show job ids and states.

Ranks. Under `torchrun`, `accelerate launch` or `srun` (one task per GPU) every process runs the
same `align run`. Only rank 0 locks, decides skip/resume and publishes; the others get its decision
through `torch.distributed` and train alongside it (`Ranks`).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal

from alignment.config import Section, load_yaml
from alignment.errors import AlignError, ConfigError

PROFILE_DIR = Path("configs/cluster")
DEFAULT_PROFILE = "local"
SUBMISSIONS = ".slurm.json"


_NAMES = re.compile(r"[A-Za-z0-9_.\-]+(,[A-Za-z0-9_.\-]+)*")
_TIME = re.compile(r"(\d+(:\d{1,2}){0,2}|\d+-\d+(:\d{1,2}){0,2}|UNLIMITED|unlimited|infinite|INFINITE)")
_MEM = re.compile(r"\d+[KMGTkmgt]?[Bb]?")
_BEGIN = re.compile(r"[A-Za-z0-9:+\-/.]+")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class SlurmSpec(Section):
    """One stage's job: resources, how to launch its processes, and when to warn it before the limit."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str = "04:00:00"
    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 8
    mem: str = "32G"
    """Memory per node (`--mem`)."""
    signal_seconds: int = 300
    """USR1 this long before the time limit: enough to finish a step and write a checkpoint."""
    launcher: Literal["python", "srun", "accelerate"] = "python"
    """python: one process. srun: one task per GPU on every node (RANK/WORLD_SIZE from Slurm), each
    forwarded the preemption signal. accelerate: one `accelerate launch --config_file accelerate_config`
    per node (FSDP, DeepSpeed)."""
    accelerate_config: str | None = None
    begin: str | None = None
    """Slurm `--begin` (e.g. `now+1hour`, `2026-01-01T02:00`, `tomorrow`)."""
    env: dict[str, str] = {}
    """Exported in the job before the stage starts (e.g. HF_HOME, NCCL settings)."""
    setup: list[str] = []
    """Shell lines run before the stage (e.g. `module load cuda/12.4`, `source .venv/bin/activate`)."""
    extra: list[str] = []
    """Further `#SBATCH` lines, e.g. ["--constraint=a100", "--exclusive"]."""
    python: str | None = None
    """Interpreter on the compute nodes; default: the one running `align submit`."""

    def problems(self) -> list[tuple[str, str]]:
        out = self._format_problems()
        if self.launcher == "accelerate" and not self.accelerate_config:
            out.append(("accelerate_config", "launcher accelerate needs an accelerate config file "
                                             "(configs/accelerate/*.yaml)"))
        if self.launcher == "python" and (self.nodes > 1 or self.gpus_per_node > 1):
            out.append(("launcher", f"{self.nodes} node(s) x {self.gpus_per_node} GPU(s) need several processes: "
                                    "set launcher: srun (or accelerate)"))
        return out

    def _format_problems(self) -> list[tuple[str, str]]:
        """Values that land in `#SBATCH` lines or `export` lines of the job script: a newline there would end the
        directive block and run the rest as a shell command, and sbatch reads a malformed value only at submit
        time, on the cluster. So each is checked against the form Slurm documents for it."""
        out = [(key, f"expected {what}, got {value!r}") for key, value, pattern, what in (
            ("partition", self.partition, _NAMES, "a partition name (or a comma-separated list)"),
            ("account", self.account, _NAMES, "an account name"),
            ("qos", self.qos, _NAMES, "a QOS name"),
            ("time", self.time, _TIME, "a Slurm time limit (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS)"),
            ("mem", self.mem, _MEM, "a memory size such as 32G or 500M"),
            ("begin", self.begin, _BEGIN, "a Slurm --begin time such as now+1hour, 23:00 or 2026-01-01T02:00"),
        ) if value is not None and not pattern.fullmatch(value)]
        out += [(key, f"expected at least {least}, got {value}") for key, value, least in (
            ("nodes", self.nodes, 1), ("gpus_per_node", self.gpus_per_node, 0),
            ("cpus_per_task", self.cpus_per_task, 1), ("signal_seconds", self.signal_seconds, 0)) if value < least]
        out += [("env", f"{k!r}: expected a shell variable name") for k in self.env if not _ENV_NAME.fullmatch(k)]
        out += [(key, f"{value!r}: one line expected, without control characters")
                for key, values in (("extra", self.extra), ("setup", self.setup), ("env", self.env.values()),
                                    ("python", [self.python or ""]),
                                    ("accelerate_config", [self.accelerate_config or ""]))
                for value in values if _CONTROL.search(value)]
        return out

    @property
    def procs_per_node(self) -> int:
        return max(1, self.gpus_per_node) if self.launcher == "srun" else 1


def _spec(layers: list[tuple[str, dict]]) -> SlurmSpec:
    """Merge the layers (later wins) and validate, naming the layer a bad key came from."""
    from pydantic import ValidationError

    merged, problems = {}, []
    for where, raw in layers:
        if raw is None:
            continue
        if not isinstance(raw, dict):
            problems.append(f"{where}: expected a mapping, got {type(raw).__name__}")
            continue
        for k in raw:
            if k not in SlurmSpec.model_fields:
                problems.append(f"{where}.{k}: unknown key")
        merged.update(raw)
    if problems:
        raise ConfigError(problems)
    try:
        spec = SlurmSpec.model_validate(merged)
    except ValidationError as e:
        raise ConfigError([f"{layers[-1][0]}: {'.'.join(map(str, err['loc']))}: {err['msg']}"
                           for err in e.errors()]) from None
    bad = spec.problems()
    if bad:
        raise ConfigError([f"slurm settings ({', '.join(w for w, r in layers if r)}): {k}: {m}" for k, m in bad])
    return spec


def profile_path(profile: str | None) -> Path:
    name = profile or os.environ.get("ALIGN_CLUSTER_PROFILE") or DEFAULT_PROFILE
    p = Path(name)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return p
    return PROFILE_DIR / f"{name}.yaml"


# -- the job script -----------------------------------------------------------------------------------

def _directives(stage: str, run: str, spec: SlurmSpec, log_dir: Path) -> list[str]:
    """The #SBATCH options of a stage's job."""
    sb = [f"--job-name=align-{run}-{stage}", f"--time={spec.time}", f"--nodes={spec.nodes}",
          f"--ntasks-per-node={spec.procs_per_node}", f"--cpus-per-task={spec.cpus_per_task}", f"--mem={spec.mem}",
          "--requeue", f"--signal=B:USR1@{spec.signal_seconds}", "--kill-on-invalid-dep=yes",
          # A requeued job appends to the same log, so the first attempt's lines stay readable.
          "--open-mode=append", f"--output={log_dir}/{run}-{stage}-%j.log"]
    sb += [f"--partition={spec.partition}"] * bool(spec.partition)
    sb += [f"--account={spec.account}"] * bool(spec.account)
    sb += [f"--qos={spec.qos}"] * bool(spec.qos)
    sb += [f"--gpus-per-node={spec.gpus_per_node}"] * bool(spec.gpus_per_node)
    sb += [f"--begin={spec.begin}"] * bool(spec.begin)
    return sb + list(spec.extra)


def _launch(align: list[str], spec: SlurmSpec) -> tuple[str, str]:
    """The command line that starts the stage under `spec.launcher`, and how USR1 reaches its processes."""
    q = shlex.join
    if spec.launcher == "python":
        return q(align), 'kill -USR1 "$child"'
    if spec.launcher == "srun":
        # One task per GPU; each task maps Slurm's ids to the torch.distributed ones.
        per_task = "export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS; exec " + q(align)
        launch = q(["srun", "--kill-on-bad-exit=1", "bash", "-c", per_task])
        return launch, 'scancel --signal=USR1 "$SLURM_JOB_ID"'  # every process of the job step, every node
    acc = [align[0], "-m", "accelerate.commands.launch", "--config_file", str(Path(spec.accelerate_config).resolve()),
           "--num_machines", str(spec.nodes), "--num_processes", str(spec.nodes * max(1, spec.gpus_per_node)),
           "--main_process_ip", "$MASTER_ADDR", "--main_process_port", "$MASTER_PORT",
           "--machine_rank", "$SLURM_NODEID", "-m", "alignment.cli", *align[3:]]
    # The launcher ignores USR1 (it would die of it); its workers install their own handler.
    per_node = "trap '' USR1; exec " + " ".join(a if a.startswith("$") else shlex.quote(a) for a in acc)
    launch = q(["srun", "--kill-on-bad-exit=1", "--ntasks-per-node=1", "bash", "-c", per_node])
    return launch, 'scancel --signal=USR1 "$SLURM_JOB_ID"'


def sbatch_script(stage: str, config: Path, overrides: list[str], *, run: str, artifacts: Path,
                  spec: SlurmSpec, workdir: Path, log_dir: Path, chain: list[str] = ()) -> str:
    """A bash job script that runs `align run <stage>` and requeues itself when the stage checkpoints. `chain`:
    the step's `--record-published` / `--drop-replaced` flags (`chain_flags`)."""
    from alignment.preemption import REQUEUE_EXIT

    sb = _directives(stage, run, spec, log_dir)
    align = [spec.python or sys.executable, "-m", "alignment.cli", "run", stage, "-c", str(config), *overrides,
             "--artifacts", str(artifacts), "--run", run, *chain]
    launch, forward = _launch(align, spec)
    lines = ["#!/bin/bash", *(f"#SBATCH {x}" for x in sb), "",
             f"# Stage '{stage}' of run '{run}'. Written by `align submit`; re-submitting rewrites it.",
             "set -uo pipefail", f"cd {shlex.quote(str(workdir))}",
             "export OMP_WAIT_POLICY=PASSIVE", "export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}",
             *(f"export {k}={shlex.quote(v)}" for k, v in spec.env.items()), *spec.setup]
    if spec.launcher != "python":
        lines += ['export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
                  "export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))"]
    lines += [
        'echo "[align] job $SLURM_JOB_ID: stage ' + stage + ' on $(hostname), restart ${SLURM_RESTART_COUNT:-0}"',
        "",
        "# Slurm signals only this shell (--signal=B:...), and bash runs a trap only when the foreground",
        "# command returns: so the stage runs in the background, and `wait` is interrupted by the trap.",
        "child=''",
        "forwarded=0",
        'on_usr1() { echo "[align] USR1: asking the stage to checkpoint and stop"; forwarded=1; '
        f'[ -n "$child" ] && {forward}; }}',
        "trap on_usr1 USR1",
        f"{launch} &",
        "child=$!",
        "while :; do",
        '    code=0; wait "$child" || code=$?',
        "    # >128 after our trap means wait was interrupted, not that the stage ended: wait again.",
        '    if [ "$forwarded" = 1 ] && [ "$code" -gt 128 ]; then forwarded=0; continue; fi',
        "    break",
        "done",
        f'if [ "$code" -eq {REQUEUE_EXIT} ]; then',
        '    echo "[align] stage saved a checkpoint: requeueing job $SLURM_JOB_ID (it resumes from there)"',
        '    scontrol requeue "$SLURM_JOB_ID" && exit 0',
        '    echo "[align] scontrol requeue failed: re-submit to resume"',
        "fi",
        'echo "[align] stage exited with $code"',
        'exit "$code"',
        "",
    ]
    return "\n".join(lines)


# -- submitting ---------------------------------------------------------------------------------------

def submit_chain(pipeline: str, *, run: str | None, artifacts: str | None, out_dir: str | None = None,
                 dry_run: bool = False, profile: str | None = None, flags: dict | None = None,
                 overrides: list[str] = ()) -> list[str]:
    """Write one script per stage and submit each with afterok on the jobs of the stages it reads. Returns one
    entry per stage: {stage, script, command} plus job_id and after (the job ids it waits for) when submitted;
    a dry run's `command` is a shell line that would submit it, so the commands together read (and run) as the
    chain. `flags` are command-line settings
    (SlurmSpec keys) for every stage; `overrides` (`STAGE:key=value`, `STAGE.key=value` or `key=value` for every
    stage, as `align pipeline` reads them) are passed on to `align run`."""
    from alignment.pipeline_jobs import dependencies
    from alignment.runner import pipeline_steps, route_overrides, step_configs, superseded

    spec = load_yaml(pipeline)
    steps, problems = pipeline_steps(pipeline, spec)
    if problems:
        raise ConfigError(problems)
    run = run or spec.get("run") or "default"
    artifacts = Path(artifacts or os.environ.get("ALIGN_ARTIFACTS") or "artifacts").resolve()
    out = Path(out_dir or artifacts / run / "slurm").resolve()
    prof = profile_path(profile)
    prof_data, per_stage = _profile_layers(prof)
    cli = {k: v for k, v in (flags or {}).items() if v is not None}
    routed = route_overrides(overrides, [step["stage"] for step in steps])
    # Each job waits (afterok) for the jobs of the earlier stages it reads, not for the job before it: dpo runs
    # beside the reward model. Loading every config first also refuses a bad key before anything is submitted.
    # An earlier step of a stage listed again is left out when the last one is up to date (runner.superseded).
    loaded = step_configs(pipeline, steps, routed)
    left_out = superseded(loaded, artifacts, run)  # each one said, as `align pipeline` says it
    keep = [i for i in range(len(steps)) if i not in left_out]
    waits = dependencies([loaded[i][0] for i in keep], [loaded[i][4] for i in keep])
    # Every stage's settings are checked before the first script is written: a bad value leaves nothing behind.
    specs = {i: _spec(_layers(prof, prof_data, per_stage.get(loaded[i][0]), pipeline, spec.get("slurm"), i, steps[i],
                              cli, loaded[i][0])) for i in keep}
    out.mkdir(parents=True, exist_ok=True)
    chain = chain_flags([(i, loaded[i][0]) for i in keep], out, run)
    jobs, lines = [], []
    for k, i in enumerate(keep):
        stage, config, extra, _, _ = loaded[i]
        res = specs[i]
        script = out / f"{run}-{i:02d}-{stage}.sbatch"
        script.write_text(sbatch_script(stage, config.resolve(), extra, run=run, artifacts=artifacts, spec=res,
                                        workdir=Path.cwd(), log_dir=out, chain=chain[i]))
        if dry_run:
            var = f"job_{i}_{stage}"
            after = [f"${{{lines[j][0]}}}" for j in sorted(waits[k])]
            # A shell line that submits this stage after the ones it reads: the chain reads as it would run.
            lines.append((var, f"{var}=$(" + " ".join(sbatch_command(script, after, quote=True)) + " | cut -d';' -f1)"))
            jobs.append({"stage": stage, "script": str(script), "command": lines[-1][1]})
            continue
        jobs.append({"stage": stage, **_submit(script, [jobs[j]["job_id"] for j in sorted(waits[k])], jobs,
                                               out, f"{run}-{stage}")})
    if not dry_run:
        record_submission(artifacts, run, {"submitted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                           "pipeline": str(Path(pipeline).resolve()), "profile": str(prof),
                                           "jobs": jobs})
    return jobs


def chain_flags(steps: list[tuple[int, str]], out: Path, run: str) -> dict[int, list[str]]:
    """Per step (index, stage) of a chain, the `align run` flags that let it tidy up after itself as `align pipeline`
    does (pipeline_jobs.drop_replaced_intermediates): a stage listed again later records the manifest it publishes,
    and its last step removes the artifacts those steps published and it replaced. Each job is its own process, so
    the record is a file beside the scripts; a stale one from an earlier submission is removed here."""
    flags: dict[int, list[str]] = {i: [] for i, _ in steps}
    for n, (i, stage) in enumerate(steps):
        later = [j for j, s in steps[n + 1:] if s == stage]
        record = out / f"{run}-{i:02d}-{stage}.published.json"
        record.unlink(missing_ok=True)
        if later:
            flags[i] += ["--record-published", str(record)]
            flags[later[-1]] += ["--drop-replaced", str(record)]
    return flags


def chain_step_done(final: Path, before: str | None, record: str | None, drops: list[str]) -> list[Path]:
    """After a chain step's stage succeeded (rank 0): write `record` when it published a new manifest at `final`
    (not when it found its artifact up to date: that one is an earlier command's result), then remove the
    artifacts moved aside from `final` whose manifests the `drops` records name. Returns the folders removed."""
    from alignment.artifacts import write_json
    from alignment.pipeline_jobs import drop_replaced, manifest_digest

    now = manifest_digest(final)
    if record and now is not None and now != before:
        write_json(Path(record), {"published": str(final), "manifest_sha256": now})
    digests = set()
    for path in drops:
        try:
            entry = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            continue  # no record: that step found its artifact up to date, or never ran; nothing of it goes
        if isinstance(entry, dict) and entry.get("published") == str(final) and \
                re.fullmatch(r"[0-9a-f]{64}", str(entry.get("manifest_sha256"))):
            digests.add(entry["manifest_sha256"])
    return drop_replaced(final, digests)


def _submit(script: Path, after: list[str], submitted: list[dict], log_dir: Path, name: str) -> dict:
    """sbatch one stage's script after the jobs `after`; on refusal the jobs already `submitted` are cancelled."""
    try:
        done = subprocess.run(sbatch_command(script, after), capture_output=True, text=True, check=True)
    except FileNotFoundError:
        raise AlignError("sbatch not found: run on a Slurm login node, or use --dry-run to write the scripts") from None
    except subprocess.CalledProcessError as e:
        if submitted:
            _cancel([j["job_id"] for j in submitted])
        raise AlignError(f"sbatch refused {script}: {e.stderr.strip() or e.returncode}"
                         + ("; the jobs already submitted were cancelled" if submitted else "")) from None
    job_id = done.stdout.strip().split(";")[0]
    return {"job_id": job_id, "script": str(script), "after": after, "log": str(log_dir / f"{name}-{job_id}.log"),
            "command": shlex.join(done.args)}


def sbatch_command(script: Path, after: list[str], quote: bool = False) -> list[str]:
    """The one sbatch call per stage: `after`, the ids of the jobs it waits for (shell variables in a dry run)."""
    dep = [f"--dependency=afterok:{':'.join(after)}"] if after else []
    return ["sbatch", "--parsable", *dep, shlex.quote(str(script)) if quote else str(script)]


def _profile_layers(prof: Path) -> tuple[dict, dict]:
    """(the profile's settings for every stage, its `stages:` section {stage: settings for that stage})."""
    from alignment.runner import STAGES

    data = dict(load_yaml(prof))
    per_stage = data.pop("stages", None) or {}
    if not isinstance(per_stage, dict):
        raise ConfigError([f"{prof}: stages: expected a mapping {{stage: settings}}"])
    bad = [f"{prof}: stages.{k}: unknown stage (stages: {', '.join(STAGES)})" for k in per_stage if k not in STAGES]
    if bad:
        raise ConfigError(bad)
    return data, per_stage


def _layers(prof, prof_data, prof_stage, pipeline, pipe_slurm, i, step, cli, stage) -> list[tuple[str, dict]]:
    """Settings for one stage, later wins: what applies to every stage (the profile, the pipeline's `slurm:`, the
    command line), then what is written for this stage (the profile's `stages.<stage>`, the step's `slurm:`).
    So a profile can keep `base` and `eval` small while `--nodes 2` scales the training stages."""
    return [(str(prof), prof_data), (f"{pipeline}: slurm", pipe_slurm), ("command line", cli),
            (f"{prof}: stages.{stage}", prof_stage), (f"{pipeline}: stages.{i}.slurm", step.get("slurm"))]


def _cancel(job_ids: list[str]) -> None:
    subprocess.run(["scancel", *job_ids], capture_output=True)


def record_submission(artifacts: Path, run: str, entry: dict) -> None:
    """Append to `<artifacts>/<run>/.slurm.json` (newest last)."""
    from alignment.artifacts import write_json

    path = Path(artifacts) / run / SUBMISSIONS
    path.parent.mkdir(parents=True, exist_ok=True)
    data = read_submissions(path.parent)
    data["submissions"].append(entry)
    write_json(path, data)


def read_submissions(run_dir: Path) -> dict:
    try:
        data = json.loads((Path(run_dir) / SUBMISSIONS).read_text())
        if isinstance(data.get("submissions"), list):
            return data
    except (OSError, ValueError, AttributeError):
        pass
    return {"submissions": []}


def job_states(job_ids: list[str]) -> dict[str, str]:
    """{job id: state (+ reason / restarts)} from squeue, then `scontrol show job` for finished jobs.

    Empty when Slurm is not reachable here: status then shows the artifacts only."""
    states: dict[str, str] = {}
    if not job_ids:
        return states
    try:
        out = subprocess.run(["squeue", "-h", "-j", ",".join(job_ids), "-o", "%i|%T|%r"], capture_output=True,
                             text=True, timeout=10)
        for line in out.stdout.splitlines() if out.returncode == 0 else []:
            jid, state, reason = (line.split("|") + ["", ""])[:3]
            states[jid] = state + (f" ({reason})" if reason and reason != "None" else "")
        for jid in job_ids:
            if jid in states:
                continue
            show = subprocess.run(["scontrol", "show", "job", "-o", jid], capture_output=True, text=True, timeout=10)
            fields = dict(t.partition("=")[::2] for t in show.stdout.split() if "=" in t)
            if show.returncode == 0 and "JobState" in fields:
                restarts = fields.get("Restarts", "0")
                states[jid] = fields["JobState"] + (f" (restarts {restarts})" if restarts not in ("", "0") else "")
    except (OSError, subprocess.SubprocessError):
        return states
    return states


# -- ranks ----------------------------------------------------------------------------------------------

class Ranks:
    """This process's place in a multi-process launch (torchrun / accelerate launch / srun per GPU).

    With one process everything is local and free. With several, `torch.distributed` is initialised
    here (nccl on GPUs, gloo on CPU; the HF trainer then finds it ready) so rank 0 can hand its
    decisions to the others."""

    def __init__(self):
        self.rank = int(os.environ.get("RANK", "0"))
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        if self.world > 1:
            import torch
            import torch.distributed as dist

            if not dist.is_initialized():
                if torch.cuda.is_available():
                    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
                dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def from_main(self, fn):
        """Rank 0 computes fn(); every rank gets its result, or raises when rank 0 failed."""
        if self.world == 1:
            return fn()
        import torch.distributed as dist

        box, error = [None], None
        if self.main:
            try:
                box = [("ok", fn())]
            except BaseException as e:
                error, box = e, [("error", f"{type(e).__name__}: {e}")]
        dist.broadcast_object_list(box, src=0)
        if error is not None:
            raise error
        kind, value = box[0]
        if kind == "error":
            raise AlignError(f"rank {self.rank}: rank 0 stopped: {value}")
        return value

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()
