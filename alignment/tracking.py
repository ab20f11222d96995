"""Experiment tracking: one dashboard run per stage, grouped by pipeline run, linked by artifact lineage.

The runner wraps every stage:

    with tracking.stage_run(cfg, ctx):      # wandb.init(group=<run>, job_type=<stage>) + use_artifact(inputs)
        module.run(cfg, ctx)                # HF trainers report into that same run (report_to follows tracking)
    final = publish(...)
    tracking.published(final)               # samples table, final metrics, the artifact (file:// reference), finish

What a run holds (`tracking: wandb`):
- config: the resolved stage config with secrets redacted (`alignment.config.config_dict`);
- history: HF trainers log live (`train/loss`, `train/rewards/margins`, ...); our own loops call
  `tracking.log({"ppo/kl": ..., "objective/scores": ...}, step=...)` or, with a `log_history` row as it is
  appended, `tracking.log_row(row)` (the PPO loop's `on_log` callback). A stage that logged nothing live has its
  `<artifact>/log_history.jsonl` replayed at publish time, un-namespaced keys under `train/`;
- tables while the stage runs: `tracking.log_samples(rows, key, step)` (label's judged pairs, PPO's held-out
  responses at an eval step);
- a table `pairs` from `<artifact>/pairs.jsonl` (label's judged pairs with their soft labels);
- images: the artifact's report plots (`plots/*.png`, eval) under `plots/<name>`;
- one run per stage attempt chain: its id is kept in `<stage>.partial/tracking.json` and `wandb.init(id=...,
  resume="allow")` continues it after a requeue or restart; tags name the stage, the Slurm job (`slurm:<id>`,
  `slurm-restart:<n>`) and the git commit (`git:<sha>`);
- summary: `ctx.metrics`, flattened and namespaced by stage (`dpo/eval/rewards/margins`, `eval/dpo/win_rate`);
- a table `samples` from `<artifact>/samples.jsonl` (generative stages: label, ppo, eval) — one JSON object
  per generation with `prompt` and `response` (strings) and any scalar columns (`policy`, `reward`, `step`...);
- the artifact `<run>-<stage>` as a REFERENCE to the published folder (file://, nothing uploaded) plus its
  manifest's key fields as metadata. Each stage also declares its inputs' artifacts as used, so the lineage
  graph links base -> SFT -> reward -> DPO/PPO -> eval.

No WANDB_API_KEY (and no `wandb login`): the run is written offline under `<artifacts>/<run>/.tracking/wandb/`
and the log says which `wandb sync` command uploads it. Offline, wandb refuses `use_artifact`; the use is then
recorded as the same artifact (same digest) marked use-after-commit, which `wandb sync` turns into the same
lineage edge. Only rank 0 of a multi-process launch tracks. `tracking: tensorboard` writes event files under
`<artifacts>/<run>/.tracking/tensorboard/<stage>/` (HF trainers through TENSORBOARD_LOGGING_DIR); `none`: nothing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import secrets
import struct
from pathlib import Path

from alignment.config import config_dict, scrub
from alignment.errors import ConfigError

logger = logging.getLogger("align")
SAMPLES = "samples.jsonl"
"""Per-artifact file of sampled generations the tracker shows as a table (see the module docstring)."""
PAIRS = "pairs.jsonl"
"""label's training pairs, shown as a table `pairs` when the artifact is published."""
MAX_TABLE_ROWS = 200
PROJECT = "alignment"


def rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def tracking_dir(root: Path, run: str) -> Path:
    """Where a run's dashboards live locally: hidden beside the stage folders, like `.locks`."""
    return Path(root) / run / ".tracking"


def wandb_mode() -> str:
    """online with an API key (env or `wandb login`), else offline; WANDB_MODE wins when set."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        import netrc

        if netrc.netrc().authenticators("api.wandb.ai"):
            return "online"
    except (OSError, netrc.NetrcParseError):
        pass
    return "offline"


def flatten(metrics: dict, prefix: str = "") -> dict:
    """{"eval": {"kl": 1}} -> {"<prefix>/eval/kl": 1}; numbers, strings and bools only (lists are dropped)."""
    out = {}
    for k, v in metrics.items():
        key = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten(v, key))
        elif isinstance(v, bool) or isinstance(v, (int, str)) or (isinstance(v, float) and math.isfinite(v)):
            out[key] = v
    return out


def namespaced(row: dict) -> dict:
    """A log_history row as dashboard keys: `loss` -> `train/loss`, `eval_loss` -> `eval/loss`, `ppo/kl` kept."""
    out = {}
    for k, v in row.items():
        if k == "step" or not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        if "/" in k:
            out[k] = v
        elif k.startswith("eval_"):
            out["eval/" + k[5:]] = v
        else:
            out["train/" + k] = v
    return out


def read_jsonl(path: Path, limit: int | None = None) -> list[dict]:
    """The rows of a JSONL file (the first `limit`), skipping lines that do not parse; [] when absent."""
    if not Path(path).is_file():
        return []
    rows = []
    with Path(path).open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if limit is not None and len(rows) >= limit:
                break
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    continue
    return rows


# -- the active tracker ----------------------------------------------------------------------------

_active: "Tracker | None" = None


def active() -> "Tracker | None":
    return _active


def log(metrics: dict, step: int | None = None) -> None:
    """Log namespaced metrics to the running stage's dashboard (no-op when tracking is off)."""
    if _active is not None:
        _active.log(metrics, step)


def log_row(row: dict) -> None:
    """Log one `log_history` row live, as it is appended (the PPO loop's `on_log` callback calls this per update):
    keys namespaced as in the replay (`loss` -> `train/loss`, `ppo/kl` kept), at the row's `step`. Once a stage
    logged anything live, `published` does not replay `log_history.jsonl`, so no curve is drawn twice."""
    values = namespaced(row)
    if values and _active is not None:
        step = row.get("step")
        _active.log(values, int(step) if isinstance(step, (int, float)) else None)


def trainer_logged_live() -> None:
    """An HF trainer reporting into this stage's dashboard logged a row (`training.callbacks`): the curves are
    live, so `published` must not replay `log_history.jsonl` on top of them."""
    if _active is not None:
        _active.logged += 1


def log_samples(rows: list[dict], key: str = "samples", step: int | None = None) -> None:
    """Show generations as a table now (label's judged pairs, PPO's held-out responses at an eval step): one row per
    dict, columns in first-seen order, non-scalars as JSON. At most MAX_TABLE_ROWS rows."""
    if rows and _active is not None:
        _active.samples_table(scrub(list(rows)[:MAX_TABLE_ROWS]), key, step)


class Tracker:
    """Base: does nothing. Subclasses for wandb and tensorboard."""

    def __init__(self, cfg, ctx, root: Path):
        self.cfg, self.ctx, self.root = cfg, ctx, Path(root)
        self.logged = 0

    def log(self, metrics: dict, step: int | None = None) -> None:
        self.logged += 1
        self._log(metrics, step)

    def _log(self, metrics: dict, step: int | None) -> None:
        pass

    def published(self, final: Path) -> None:
        """Replay curves if nothing was logged live, show samples and final metrics, log the artifact."""
        if not self.logged:
            for i, row in enumerate(read_jsonl(final / "log_history.jsonl")):
                values = namespaced(row)
                if values:
                    self._log(values, int(row.get("step", i)))
        # Secrets by value (what *_env variables hold, URL credentials) never reach a dashboard.
        self._samples(scrub(read_jsonl(final / SAMPLES, MAX_TABLE_ROWS)))
        # label's judged pairs (prompt, chosen, rejected, soft label), beside what the stage logged itself
        self.samples_table(scrub(read_jsonl(final / PAIRS, MAX_TABLE_ROWS)), "pairs", None)
        self._images(sorted(Path(final).glob("plots/*.png")))
        self._summary(scrub(flatten(self.ctx.metrics, self.ctx.stage)))
        self._artifact(final)

    def _samples(self, rows: list[dict]) -> None:
        self.samples_table(rows, "samples", None)

    def samples_table(self, rows: list[dict], key: str, step: int | None) -> None:
        pass

    def _images(self, paths: list[Path]) -> None:
        """The artifact's report plots (eval's `plots/*.png`), as images under `plots/<name>`."""

    def _summary(self, values: dict) -> None:
        pass

    def _artifact(self, final: Path) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


class WandbTracker(Tracker):
    def __init__(self, cfg, ctx, root: Path):
        super().__init__(cfg, ctx, root)
        try:
            import wandb
        except ImportError:
            raise ConfigError(["tracking: wandb is not installed (pip install -e '.[tracking]'), "
                               "or set tracking: none"]) from None
        self.wandb = wandb
        # wandb's own terminal lines ("Generating checksum ...", "URL not available offline") would interleave with
        # the stage's log and its one-line errors; our own line says where the run is and how to sync it.
        if os.environ.setdefault("WANDB_SILENT", "true").lower() in ("true", "1"):
            from wandb.errors import term

            term.termsetup(wandb.Settings(silent=True), None)  # wandb read the variable already if imported before
        self.mode = wandb_mode()
        self.dir = Path(os.environ.get("WANDB_DIR") or tracking_dir(root, ctx.run))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.run_id = attempt_run_id(ctx.out_dir, lambda: secrets.token_hex(6))  # wandb ids: [a-z0-9_-]
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", PROJECT), group=ctx.run, job_type=ctx.stage,
            name=f"{ctx.run}/{ctx.stage}", dir=str(self.dir), mode=self.mode, reinit="finish_previous",
            # One run per stage attempt chain: a requeued or restarted attempt resumes the same run (same id,
            # kept in the partial folder), so its curves continue instead of starting a second run.
            id=self.run_id, resume="allow",
            config=config_dict(cfg), tags=run_tags(ctx.stage), settings=_settings(wandb),
        )
        # The x axis HF's WandbCallback also uses, so live trainer logs and our own loops share it.
        self.run.define_metric("train/global_step")
        self.run.define_metric("*", step_metric="train/global_step", step_sync=True)
        for art in ctx.inputs.values():
            self._use(art)

    # -- lineage ------------------------------------------------------------------------------------
    def _artifact_of(self, path: Path, manifest):
        art = self.wandb.Artifact(name=f"{manifest.run}-{manifest.stage}", type=manifest.stage,
                                  metadata=_artifact_metadata(manifest))
        # A reference: the files stay in the artifact store; wandb records their paths and checksums. The manifest
        # and its outputs only: the stage log keeps growing after publishing, and would change the digest between
        # the producer's log_artifact and a consumer's use of the same version.
        folder = Path(path).resolve()
        for rel in ["manifest.json", *(o.path for o in manifest.outputs)]:
            art.add_reference((folder / rel).as_uri(), name=f"{manifest.stage}/{rel}")
        return art

    def _use(self, art) -> None:
        wb_art = self._artifact_of(art.path, art.manifest)
        if self.mode != "offline":
            self.run.use_artifact(wb_art)
            return
        try:
            # Offline, use_artifact raises; the same artifact logged as used-after-commit is what use_artifact
            # writes for a draft artifact, and `wandb sync` turns it into the lineage edge.
            self.run._log_artifact(wb_art, is_user_created=True, use_after_commit=True)
        except Exception as e:  # a private API: lineage is worth a warning, not a failed stage
            logger.warning("[tracking] could not record the use of %s offline (%s); lineage is in the config",
                           art.path, e)
            self.run.config.update({"inputs_used": {art.stage: str(art.path)}}, allow_val_change=True)

    # -- logging ------------------------------------------------------------------------------------
    def _log(self, metrics: dict, step: int | None) -> None:
        values = {k: v for k, v in flatten(metrics).items() if not isinstance(v, str)}
        if step is not None:
            values["train/global_step"] = step
        self.run.log(values)

    def samples_table(self, rows: list[dict], key: str, step: int | None) -> None:
        if not rows:
            return
        columns, data = table_of(rows)
        values = {key: self.wandb.Table(columns=columns, data=data)}
        if step is not None:
            values["train/global_step"] = step
        self.run.log(values)

    def _images(self, paths: list[Path]) -> None:
        if paths:
            self.run.log({f"plots/{p.stem}": self.wandb.Image(str(p), caption=p.name) for p in paths})

    def _summary(self, values: dict) -> None:
        for k, v in values.items():
            self.run.summary[k] = v

    def _artifact(self, final: Path) -> None:
        from alignment.artifacts import ArtifactStore

        art = ArtifactStore(final.parent.parent).read(final, verify=False)
        self.run.log_artifact(self._artifact_of(final, art.manifest), aliases=["latest", art.manifest.status])

    def finish(self, exit_code: int = 0) -> None:
        run_dir = getattr(self.run.settings, "sync_dir", None) or self.dir
        self.run.finish(exit_code=exit_code)
        if self.mode == "offline":
            logger.info("[tracking] wandb run %s/%s written offline to %s; upload it with: wandb sync %s",
                        self.ctx.run, self.ctx.stage, run_dir, run_dir)


class TensorboardTracker(Tracker):
    def __init__(self, cfg, ctx, root: Path):
        super().__init__(cfg, ctx, root)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(["tracking: tensorboard needs the tensorboard package (pip install tensorboard), "
                               "or set tracking: none"]) from None
        self.dir = tracking_dir(root, ctx.run) / "tensorboard" / ctx.stage
        self.writer = SummaryWriter(log_dir=str(self.dir))
        self.writer.add_text("config", "```\n" + json.dumps(config_dict(cfg), indent=2) + "\n```")
        self.writer.add_text("tags", ", ".join(run_tags(ctx.stage)))

    def _log(self, metrics: dict, step: int | None) -> None:
        for k, v in flatten(metrics).items():
            if not isinstance(v, str):
                self.writer.add_scalar(k, v, step)

    def samples_table(self, rows: list[dict], key: str, step: int | None) -> None:
        if not rows:
            return
        columns, data = table_of(rows)
        # A markdown table: TensorBoard's text plugin renders it as one.
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in row) + " |"
                  for row in data]
        self.writer.add_text(key, "\n".join(lines), step or 0)

    def _images(self, paths: list[Path]) -> None:
        import numpy as np
        from PIL import Image

        for p in paths:
            with Image.open(p) as im:
                self.writer.add_image(f"plots/{p.stem}", np.asarray(im.convert("RGB")), 0, dataformats="HWC")

    def _summary(self, values: dict) -> None:
        for k, v in values.items():
            if not isinstance(v, str):
                self.writer.add_scalar(k, v, 0)

    def finish(self, exit_code: int = 0) -> None:
        self.writer.close()
        logger.info("[tracking] tensorboard events in %s: tensorboard --logdir %s", self.dir, self.dir.parent)


def _settings(wandb):
    """No program arguments, environment or code capture: an `inputs.hf_token=...` typed on the command line must
    not end up on a dashboard (the manifest records commit, host and versions instead)."""
    try:
        return wandb.Settings(console="off", x_disable_meta=True, save_code=False, silent=True)
    except Exception:  # a wandb without the private x_disable_meta: arguments are then recorded; still run
        logger.warning("[tracking] this wandb cannot turn off metadata capture; command-line arguments are recorded")
        return wandb.Settings(console="off", save_code=False, silent=True)


RUN_ID_FILE = "tracking.json"
"""In a stage's partial folder: the dashboard run id of this attempt chain (runner bookkeeping, not an output)."""


def attempt_run_id(partial: Path, new_id) -> str:
    """The run id stored in the partial folder by an earlier attempt (requeue, restart, resume), else a new one,
    stored. Partial work set aside (another config) takes its id with it: a fresh chain gets a fresh run."""
    path = Path(partial) / RUN_ID_FILE
    try:
        found = json.loads(path.read_text()).get("wandb_run_id")
        if isinstance(found, str) and found:
            return found
    except (OSError, ValueError, AttributeError):
        pass
    run_id = new_id()
    if path.parent.is_dir():
        path.write_text(json.dumps({"wandb_run_id": run_id}) + "\n")
    return run_id


def run_tags(stage: str) -> list[str]:
    """The stage, the Slurm job (id, and the restart count of a requeued one) and the code's git commit."""
    from alignment.manifest import git_commit

    tags = [stage]
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        tags.append(f"slurm:{job}")
        if os.environ.get("SLURM_RESTART_COUNT", "0") not in ("", "0"):
            tags.append(f"slurm-restart:{os.environ['SLURM_RESTART_COUNT']}")
    commit = git_commit()
    if commit:
        tags.append(f"git:{commit[:12]}")
    return tags


def table_of(rows: list[dict]) -> tuple[list[str], list[list]]:
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    return columns, [[_cell(r.get(c)) for c in columns] for r in rows]


def _cell(v):
    return v if isinstance(v, (int, float, str, bool)) or v is None else json.dumps(v)


def _artifact_metadata(manifest) -> dict:
    return scrub({"stage": manifest.stage, "run": manifest.run, "status": manifest.status,
            "config_hash": manifest.config_hash, "lineage": manifest.lineage,
            "base_model": manifest.base_model.model_dump() if manifest.base_model else None,
            "metrics": flatten(manifest.metrics), "finished_at": manifest.finished_at})


# -- the runner's two calls ------------------------------------------------------------------------


@contextlib.contextmanager
def stage_run(cfg, ctx, root=None):
    """Open the stage's dashboard run around `module.run`; it stays open for `published` to finish it."""
    global _active
    kind = getattr(cfg, "tracking", "none")
    if kind != "none" and getattr(cfg, "_report_to_follows_tracking", False):
        cfg.report_to = kind  # HF trainers log into this run (wandb: WandbCallback reuses wandb.run)
    if kind == "none" or rank() != 0:
        yield None
        return
    root = Path(root) if root is not None else ctx.out_dir.parent.parent
    saved_env = {k: os.environ.get(k) for k in ("TENSORBOARD_LOGGING_DIR",)}
    if kind == "tensorboard":
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(tracking_dir(root, ctx.run) / "tensorboard" / ctx.stage)
    tracker = WandbTracker(cfg, ctx, root) if kind == "wandb" else TensorboardTracker(cfg, ctx, root)
    _active = tracker
    try:
        yield tracker
    except BaseException:
        _close(1)
        raise
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    from alignment import preemption

    if preemption.requested():
        # The runner requeues instead of publishing: mark the run preempted, not finished.
        with contextlib.suppress(Exception):
            if isinstance(tracker, WandbTracker):
                tracker.run.mark_preempting()
        _close(preemption.REQUEUE_EXIT)


def published(final: Path) -> None:
    """After the runner published the artifact: log it (with samples and final metrics) and finish the run."""
    if _active is None:
        return
    try:
        _active.published(Path(final))
    except Exception as e:  # the artifact is published; a dashboard hiccup must not fail the stage
        logger.warning("[tracking] logging the published artifact failed: %s", e)
        _close(0)
        return
    _close(0)


def _close(exit_code: int) -> None:
    global _active
    tracker, _active = _active, None
    if tracker is not None:
        try:
            tracker.finish(exit_code)
        except Exception as e:
            logger.warning("[tracking] closing the dashboard run failed: %s", e)


# -- reading offline wandb runs back (tests, `align report`) --------------------------------------------


def wandb_records(path: Path):
    """Protobuf records of an offline `run-<id>.wandb` file (LevelDB log framing: 32 KiB blocks of chunks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a wandb run file")
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if n == 0 and kind == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind == 1:
            full = chunk
        elif kind == 2:
            pending = chunk
            continue
        elif kind == 3:
            pending += chunk
            continue
        else:
            full, pending = pending + chunk, b""
        rec = pb.Record()
        rec.ParseFromString(full)
        yield rec


def read_offline_run(path: Path) -> dict:
    """{"group", "job_type", "name", "id", "tags", "config", "history": [..], "summary", "artifacts": [..]}."""
    out = {"group": None, "job_type": None, "name": None, "id": None, "tags": [], "config": {}, "history": [],
           "summary": {},
           "artifacts": []}
    for rec in wandb_records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out.update(group=rec.run.run_group, job_type=rec.run.job_type, name=rec.run.display_name,
                       id=rec.run.run_id, tags=list(rec.run.tags))
            for item in rec.run.config.update:
                out["config"][item.key] = json.loads(item.value_json)
        elif kind == "config":
            for item in rec.config.update:
                out["config"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "history":
            out["history"].append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                                   for i in rec.history.item})
        elif kind == "summary":
            for item in rec.summary.update:
                out["summary"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "artifact":
            a = rec.artifact
            out["artifacts"].append({"name": a.name, "type": a.type, "used": a.use_after_commit,
                                     "digest": a.digest,
                                     "refs": [c.ref for c in a.manifest.contents if c.ref]})
    return out
