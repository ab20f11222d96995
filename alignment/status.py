"""`align status [RUN]`: one row per stage with status, age, config hash and key metrics.

When the run was submitted to Slurm (`align submit` records `<run>/.slurm.json`), a `slurm` column shows
each stage's newest job id and state (from squeue / `scontrol show job`); without Slurm it stays empty."""

from __future__ import annotations

import json
import re
import time
from datetime import datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

from alignment.artifacts import ArtifactStore, first_problem
from alignment.errors import AlignError
from alignment.manifest import MANIFEST
from alignment.logs import STAGE_LOG
from alignment.runner import STAGES, latest_checkpoint

KEY_METRICS = ("eval_loss", "eval_loss_before", "accuracy", "win_rate", "mean_reward", "kl")
"""Shown for a stage without its own figures below (a stage added later, an old artifact)."""


def stage_rows(store: ArtifactStore, run: str) -> list[dict]:
    rows = []
    jobs = slurm_jobs(store.root / run)
    for stage in STAGES:
        if stage in jobs and not (store.stage_dir(run, stage) / MANIFEST).is_file() \
                and not store.partial_dir(run, stage).exists():
            rows.append({"stage": stage, "status": "submitted", "age_s": None, "config_hash": "", "metrics": ""})
        final, partial = store.stage_dir(run, stage), store.partial_dir(run, stage)
        if (final / MANIFEST).is_file():
            rows.append(_published_row(store, stage, final))
        if partial.exists():
            running = store.lock(run, stage).held_elsewhere()
            rows.append({"stage": stage, "status": "running" if running else _partial_state(partial),
                         "age_s": time.time() - partial.stat().st_mtime, "config_hash": "",
                         "metrics": progress(partial, time.time() if running else None)})
    for r in rows:
        r["slurm"] = jobs.get(r["stage"], "")
    return rows


def _published_row(store: ArtifactStore, stage: str, final: Path) -> dict:
    """A published artifact's row; one that does not verify (cached hashes) shows as broken with the first reason."""
    age = time.time() - (final / MANIFEST).stat().st_mtime
    manifest, _, problems = store.check_published(final)
    if problems:
        return {"stage": stage, "status": "broken", "age_s": age,
                "config_hash": manifest.config_hash[:12] if manifest else "", "metrics": first_problem(problems)}
    age = _finished_age(manifest.finished_at, age)
    changed = changed_inputs(manifest, final)
    status = manifest.status + (f"; stale: {', '.join(changed)} changed since" if changed else "")
    return {"stage": stage, "status": status, "age_s": age, "config_hash": manifest.config_hash[:12],
            "metrics": _key_metrics(manifest.metrics, stage)}


def _finished_age(finished_at: str, fallback: float) -> float:
    """Seconds since the manifest says the stage finished (a copied or restored store keeps it; the file's mtime
    does not); the file's age when the manifest has no readable time."""
    try:
        return max(0.0, time.time() - datetime.strptime(finished_at, "%Y-%m-%dT%H:%M:%S%z").timestamp())
    except (TypeError, ValueError):
        return fallback


def changed_inputs(manifest, folder: Path) -> list[str]:
    """The inputs whose artifact is no longer the one this stage (published in `folder`) was made from: re-run,
    `--force`d or removed since. Its figures are of the old input, and `align pipeline` would re-run it; as
    `dvc status` says. A relative recorded path (the default `./artifacts`) is also looked for beside `folder`,
    so status run from another directory does not call every input changed."""
    import hashlib

    changed = []
    for name, entry in manifest.inputs.items():
        where = [Path(entry.path)] + ([] if Path(entry.path).is_absolute() else [folder.parent / entry.stage])
        now = None
        for path in where:
            try:
                now = hashlib.sha256((path / MANIFEST).read_bytes()).hexdigest()
                break
            except OSError:
                continue
        if now != entry.manifest_sha256:
            changed.append(name)
    return changed


def _partial_state(partial: Path) -> str:
    """Why a partial folder that nobody holds stopped: the runner's `failure.json`, else a hard kill."""
    from alignment.runner import FAILURE_FILE

    try:
        f = json.loads((partial / FAILURE_FILE).read_text())
    except (OSError, ValueError):
        return "interrupted (partial; killed, resumes on re-run)"
    if f.get("kind") == "preempted":
        return "preempted (checkpoint saved, resumes on re-run)"
    if f.get("kind") == "interrupted":
        return "interrupted (Ctrl-C; resumes on re-run)"
    msg = f.get("message", "")
    return f"failed: {f.get('error', 'error')}: {msg[:100] + '...' if len(msg) > 100 else msg}"


_STEP_LINE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d) DEBUG align: step (\d+): ")
_ATTEMPT = "] attempt started on "


def progress(partial: Path, now: float | None = None) -> str:
    """How far a partial stage got: its last logged training step, of the run's total once a checkpoint has
    recorded it, the newest complete checkpoint (where a re-run resumes), and, while it runs (`now` given), when it
    last logged and the time left at its latest steps' median pace. PPO counts updates from its log_history.jsonl."""
    ckpt = latest_checkpoint(partial / "checkpoints")
    state = _read_json(ckpt / "trainer_state.json") if ckpt else {}
    times = _logged_steps(partial / STAGE_LOG)
    total = state.get("max_steps")
    if not times:  # PPO: its own loop logs one row per update
        rows = _tail_lines(partial / "log_history.jsonl", 4096)
        step = _json_object(rows[-1]).get("step") if rows else None
        times, total = ([(None, step)] if isinstance(step, int) else []), _ppo_updates(partial)
    parts = []
    if times:
        step = times[-1][1]
        parts.append(f"step {step}/{total} ({100 * step / total:.0f}%)" if total else f"step {step}")
        paced = [(t, s) for t, s in times[-10:] if t is not None]
        if now is not None and paced:
            parts.append(f"logged {_age(max(0.0, now - paced[-1][0]))} ago")
            per_step = sorted((t1 - t0) / (s1 - s0) for (t0, s0), (t1, s1) in zip(paced, paced[1:]) if s1 > s0)
            if total and per_step:  # the median interval: a pause (a stopped job, a busy host) does not count
                parts.append(f"~{_age((total - step) * per_step[len(per_step) // 2])} left")
    if ckpt:
        parts.append(f"checkpoint {ckpt.name.split('-')[-1]}")
    return ", ".join(parts)


def _logged_steps(log: Path) -> list[tuple[float, int]]:
    """(time, step) of the training rows the newest attempt wrote to the stage log (its tail)."""
    out = []
    for line in _tail_lines(log, 65536):
        if _ATTEMPT in line:
            out = []  # a resumed run: the pace is this attempt's
        m = _STEP_LINE.match(line)
        if m:
            out.append((datetime.strptime(m[1], "%Y-%m-%dT%H:%M:%S").timestamp(), int(m[2])))
    return out


def _tail_lines(path: Path, nbytes: int) -> list[str]:
    """The whole lines in the last `nbytes` of a file (a long stage log is not read whole)."""
    try:
        with path.open("rb") as f:
            size = f.seek(0, 2)
            f.seek(max(0, size - nbytes))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return []
    return lines[1:] if size > nbytes else lines  # the first one may start mid-line


def _read_json(path: Path) -> dict:
    try:
        return _json_object(path.read_text(encoding="utf-8"))
    except OSError:
        return {}


def _json_object(text: str) -> dict:
    """The JSON object in `text`, {} for anything else (a torn or foreign file is no progress, not an error)."""
    try:
        data = json.loads(text)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _ppo_updates(partial: Path) -> int | None:
    import yaml

    try:
        cfg = yaml.safe_load((partial / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    updates = (cfg.get("ppo") or {}).get("updates") if isinstance(cfg, dict) else None
    return updates if isinstance(updates, int) else None


def slurm_jobs(run_dir: Path) -> dict[str, str]:
    """{stage: "job <id> <STATE>"} for the run's newest Slurm submission; {} when it was never submitted.
    States need squeue/scontrol; without them (not a Slurm node) only the job ids show."""
    from alignment.cluster import job_states, read_submissions

    subs = read_submissions(run_dir)["submissions"]
    if not subs:
        return {}
    jobs = {j["stage"]: j["job_id"] for j in subs[-1].get("jobs", []) if "job_id" in j}
    states = job_states(list(jobs.values()))
    return {stage: f"job {jid} {states.get(jid, '')}".strip() for stage, jid in jobs.items()}


def _key_metrics(metrics: dict, stage: str | None = None) -> str:
    """A stage's key figures, read under the names the stage writes (nested dicts as `a.b`)."""
    figures = FIGURES.get(stage)
    if figures is None:
        return "  ".join(f"{k}={_num(metrics[k])}" for k in KEY_METRICS if _is_num(metrics.get(k)))
    return "  ".join(part for part in figures(metrics) if part)


def _get(metrics: dict, path: str):
    node = metrics
    for part in path.split("|"):  # `|` separates nesting levels: keys themselves hold '/' and '.'
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _num(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _fig(label: str, metrics: dict, path: str, before: str | None = None) -> str:
    """`label=value`, or `label=before->after` when the stage recorded the value before training too."""
    v, b = _get(metrics, path), _get(metrics, before) if before else None
    if not _is_num(v):
        return ""
    return f"{label}={_num(b)}->{_num(v)}" if _is_num(b) else f"{label}={_num(v)}"


def _curve(label: str, metrics: dict, name: str) -> str:
    """A PPO curve summary ({first, last, max, min}) as first->last."""
    return _fig(label, metrics, f"{name}|last", f"{name}|first")


def eval_figures(m: dict) -> list[str]:
    """Per policy, naming whose figure it is: its judge win rate against the baseline, gold pass rate, reward,
    KL from the baseline; then the baseline's own gold and reward."""
    base, models = m.get("baseline", "baseline"), m.get("models") or {}
    out = []
    for name, pm in [*((n, pm) for n, pm in models.items() if n != base), *((n, pm) for n, pm in models.items()
                                                                            if n == base)]:
        parts = [_fig("win", pm, "judge|win_rate"), _fig("gold", pm, "gold|pass_rate"),
                 _fig("reward", pm, "reward|mean"), _fig("kl", pm, "kl|kl_seq")]
        parts = [p for p in parts if p]
        if parts:
            out.append(f"{name}{' vs ' + base if name != base else ''}: {' '.join(parts)};")
    if out:
        return [*out[:-1], out[-1].rstrip(";")]
    return [_fig("win_rate", m, "win_rate"), _fig("gold", m, "gold_pass_rate")]  # an eval from before `models`


FIGURES = {
    "base": lambda m: [_fig("params", m, "parameters")],
    "sft": lambda m: [_fig("eval_loss", m, "eval_loss", "eval_loss_before"),
                      _fig("ppl", m, "perplexity", "perplexity_before")],
    "reward": lambda m: [_fig("acc", m, "eval_accuracy", "eval_accuracy_before"),
                         *(_fig(f"{s}_acc", m, f"{s}_accuracy") for s in m.get("eval_sets") or []),
                         _fig("ece", m, "eval_ece"), _fig("margin", m, "eval_mean_margin"),
                         _fig("len_corr", m, "eval_length_corr"), "" if m.get("gate_passed", True) else "gate FAILED"],
    "label": lambda m: [_fig("pairs", m, "pairs"), _fig("gold_agree", m, "gold_agreement"),
                        _fig("pos_bias", m, "position_bias_rate"), _fig("unparsed", m, "unparseable_rate")],
    "dpo": lambda m: [_fig("pref_acc", m, "eval|dpo/prefers_chosen_sum", "eval|sft/prefers_chosen_sum"),
                      _fig("reward_acc", m, "eval|rewards/accuracies"), _fig("margin", m, "eval|rewards/margins"),
                      _fig("kl", m, "eval|kl_seq")],
    "ppo": lambda m: [_curve("reward", m, "eval_reward"), _curve("kl", m, "kl"),
                      _curve("missing_eos", m, "missing_eos_rate"), _curve("gold", m, "eval_gold")]
    if m.get("algorithm", "ppo") == "ppo" else _grpo_figures(m),
    "grpo": lambda m: _grpo_figures(m),
    "eval": eval_figures,
}
"""Per stage: the figures `align status` shows, from the metrics.json the stage writes."""


def _grpo_figures(m: dict) -> list[str]:
    return [_fig("reward", m, "reward_last", "reward_first"), _fig("kl", m, "kl_last"),
            _fig("steps", m, "steps")]


def _age(seconds: float | None) -> str:
    if seconds is None:
        return ""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def print_status(root: str | None, run: str | None) -> None:
    store = ArtifactStore(root)
    runs = [run] if run else store.runs()
    if not runs:
        raise AlignError(f"no runs under {store.root}")
    console = Console()
    for name in runs:
        if not store.run_dir(name).is_dir():
            raise AlignError(f"run '{name}' not found under {store.root}")
        table = Table(title=f"run {name} ({Path(store.root) / name})")
        rows = stage_rows(store, name)
        slurm = any(r["slurm"] for r in rows)
        for col in ("stage", "status", "age", "config", "metrics") + ("slurm",) * slurm:
            table.add_column(col)
        for r in rows:
            table.add_row(r["stage"], r["status"], _age(r["age_s"]), r["config_hash"], r["metrics"],
                          *[r["slurm"]] * slurm)
        console.print(table)
        stale = store.stale_folders(name)
        if stale:  # partial work of an older config: never resumed, only disk used
            console.print(f"{len(stale)} stale partial folder(s), never resumed; remove with: "
                          f"rm -rf {' '.join(str(p) for p in stale)}", soft_wrap=True)
        replaced = sorted(store.run_dir(name).glob("*.old-*"))
        if replaced:  # kept, never deleted for the user: say what they hold and how to drop them
            console.print(f"{len(replaced)} replaced artifact(s) kept aside ({_mib(replaced)} MiB); remove with: "
                          f"rm -rf {store.run_dir(name)}/*.old-*", soft_wrap=True)


def _mib(folders: list[Path]) -> str:
    """Disk use of folders, in MiB (symlinks not followed)."""
    total = sum(f.lstat().st_size for d in folders for f in d.rglob("*") if f.is_file() and not f.is_symlink())
    return f"{total / 2**20:,.1f}"
