"""The PPO loop's callbacks: what `PPOTrainer.train` calls around each update, and the health guardrails.

A callback sees each update's log row and may ask the loop to save a checkpoint or stop (`Control`), or raise
`HealthStop`. Callbacks with a state (the health monitor's first values and strikes) give it to the checkpoint
as JSON (`state_dict` / `load_state_dict`), so a resumed run judges exactly as the uninterrupted one would.

- `HealthCallback`: the guardrails (`HealthSpec`, `HealthMonitor`): warn, or stop past a limit;
- `JsonlLog`: one JSON line per row into `log_history.jsonl` (rewritten from the checkpoint's history on resume);
- `ProgressBar`: tqdm over updates with the score, the KL and the held-out reward;
- `GoldCheck`: the held-out gold pass rate (`alignment.gold`) next to the held-out reward;
- `StopOnPreemption`: a requested preemption (Slurm's SIGUSR1) saves a checkpoint and stops between updates.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from alignment.config import Section
from alignment.errors import AlignError

log = logging.getLogger("align")


@dataclass
class Control:
    """What the callbacks ask of the loop after an update (as HF's TrainerControl)."""

    save: bool = False
    stop: bool = False


class PPOCallback:
    """No-op hooks; subclasses override what they need. `name` keys the callback's state in checkpoints."""

    name = "callback"

    def on_train_begin(self, trainer, history: list[dict]) -> None:
        """The loop starts (or resumes with `history`, the rows up to the checkpoint)."""

    def on_evaluate(self, trainer, row: dict, rows: list[dict], texts: list[str]) -> None:
        """Held-out responses `texts` to prompt rows `rows` were scored into `row`; add more metrics to it."""

    def on_update_end(self, trainer, row: dict, control: Control) -> None:
        """An update's row (step 0: the evaluation before training) is complete; set `control`, or raise."""

    def on_log(self, trainer, row: dict) -> None:
        """The row was appended to the history."""

    def on_train_end(self, trainer) -> None:
        """The loop ends (all updates done, or stopped)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


# -- health guardrails ---------------------------------------------------------------------------------------------


class HealthStop(AlignError):
    """Training went wrong in a way that makes going on pointless (the message says what and which limit)."""


class Diverged(HealthStop):
    """A training statistic came out NaN, infinite or null: the weights after that update are not usable, so
    no checkpoint of them is kept (those from before it are)."""


class HealthSpec(Section):
    """Guardrails: each check warns past its warn limit and stops the run (HealthStop) past its stop limit for
    `patience` consecutive updates. None switches a limit off."""

    negative_kl_warn: float | None = -0.5
    """Mean KL per response (k1, nats) below this: the policy's log-probs and the sampler disagree (a bug:
    padding, temperature, top-k) or the estimate is noise from tiny batches."""
    negative_kl_stop: float | None = -5.0
    missing_eos_warn: float | None = 0.5
    """Share of responses without an EOS above this."""
    missing_eos_stop: float | None = 0.95
    length_drift_warn: float | None = 2.0
    """Mean response length vs the first update's: above this factor, or below its inverse."""
    length_drift_stop: float | None = 4.0
    entropy_collapse_warn: float | None = 0.3
    """Mean token entropy vs the first update's: below this fraction."""
    entropy_collapse_stop: float | None = 0.05
    reward_hacking_warn: float | None = 0.05
    """Held-out gold score (alignment.gold on prompts with constraints) fallen by more than this from its best
    evaluation so far while the held-out reward rose above that evaluation's: the policy optimises the RM, not the
    task. (From the best, not the first: a run whose gold rose 0.43 -> 0.62 and fell back to 0.44 is hacking too.)"""
    reward_hacking_stop: float | None = 0.25
    patience: int = 3
    """Consecutive updates past a stop limit before stopping (single small batches are noisy)."""


FINITE_KEYS = ("ppo/kl", "ppo/entropy", "ppo/response_length", "ppo/policy_loss", "ppo/value_loss", "ppo/grad_norm",
               "train/loss", "train/grad_norm")
"""Statistics that are numbers in every healthy update: one that is NaN, infinite or null (TRL logs a NaN
entropy or KL as null) means the update diverged, e.g. bf16 at a high learning rate. Checked before the limits
above, whose ratios would otherwise fail on it."""
BEST_KEYS = ("eval/gold", "eval/reward", "step")
"""What the monitor keeps of the evaluation with the best gold score (the reward-hacking check's reference)."""
FIXES = {
    "ppo": {"missing_eos": "raise ppo.max_new_tokens or ppo.missing_eos_penalty",
            "entropy": "lower ppo.lr, raise ppo.kl_coef or ppo.ent_coef", "kl": "ppo.kl_coef",
            "stopped": "a checkpoint was saved; change the limit to go on", "unit": "update",
            "diverged": "lower ppo.lr or ppo.max_grad_norm, or train in fp32 (precision: fp32)"},
    # GRPO/RLOO (TRL's logged rows, alignment/grpo.py): a group whose completions are all cut scores the same,
    # so once every completion runs on there is no advantage left to bring the policy back (docs/ppo.md)
    "grpo": {"missing_eos": "raise group.max_completion_length, lower train.lr or raise group.beta",
             "entropy": "lower train.lr or raise group.beta", "kl": "group.beta",
             "diverged": "lower train.lr, or train in fp32 (precision: fp32)",
             "stopped": "the run resumes from its last checkpoint (train.save_steps) once the limit is changed",
             "unit": "step"},
}
"""What each stage's messages tell the user to change."""


class HealthMonitor:
    """Applies a HealthSpec to the stream of update statistics (pure: numbers in, warnings/stop out)."""

    def __init__(self, spec: HealthSpec, stage: str = "ppo"):
        self.spec, self.stage, self.fix = spec, stage, FIXES[stage]
        self.first: dict = {}
        self.strikes: dict[str, int] = {}
        self.warnings: dict[str, int] = {}

    def state_dict(self) -> dict:
        return {"first": self.first, "strikes": self.strikes, "warnings": self.warnings}

    def load_state_dict(self, state: dict) -> None:
        self.first, self.strikes, self.warnings = dict(state["first"]), dict(state["strikes"]), dict(state["warnings"])

    def check(self, row: dict) -> list[str]:
        """Warnings for this update's row; raises HealthStop when a check stays past its stop limit."""
        s, out = self.spec, []
        bad = [f"{k} = {row[k]}" for k in FINITE_KEYS if k in row and not _finite(row[k])]
        if bad:
            raise Diverged(f"{self.stage}: stopped at {self.fix['unit']} {row.get('step', '?')}: {', '.join(bad)}: "
                           f"the update diverged ({self.fix['diverged']}; the checkpoints from before it are kept)")
        for key in ("ppo/response_length", "ppo/entropy", "eval/reward", "eval/gold"):
            if key in row and key not in self.first:
                self.first[key] = row[key]
        checks = []
        if "ppo/kl" in row:
            kl = row["ppo/kl"]
            checks.append(("negative_kl", _lt(kl, s.negative_kl_warn), _lt(kl, s.negative_kl_stop),
                           f"KL per response is {kl:.3f} nats, negative: the log-probs of the update disagree with "
                           "the sampler (padding/position ids, temperature, top-k/top-p?)", "negative_kl_stop"))
        if "ppo/missing_eos_rate" in row:
            r = row["ppo/missing_eos_rate"]
            checks.append(("missing_eos", _gt(r, s.missing_eos_warn), _gt(r, s.missing_eos_stop),
                           f"{r:.0%} of responses hit max_new_tokens without an EOS ({self.fix['missing_eos']})",
                           "missing_eos_stop"))
        if "ppo/response_length" in row and self.first.get("ppo/response_length"):
            f = row["ppo/response_length"] / self.first["ppo/response_length"]
            drift = max(f, 1 / f) if f > 0 else float("inf")
            checks.append(("length_drift", _gt(drift, s.length_drift_warn), _gt(drift, s.length_drift_stop),
                           f"mean response length drifted {f:.2f}x from the first update's "
                           f"{self.first['ppo/response_length']:.1f} tokens (length hacking?)", "length_drift_stop"))
        if "ppo/entropy" in row and self.first.get("ppo/entropy"):
            f = row["ppo/entropy"] / self.first["ppo/entropy"]
            checks.append(("entropy_collapse", _lt(f, s.entropy_collapse_warn), _lt(f, s.entropy_collapse_stop),
                           f"token entropy fell to {f:.0%} of the first update's ({row['ppo/entropy']:.3f} nats): "
                           f"the policy is collapsing ({self.fix['entropy']})",
                           "entropy_collapse_stop"))
        if "eval/gold" in row and "eval/reward" in row and "eval/gold" in self.first:
            # the best evaluation so far (kept in `first`, so checkpoints from before it resume as "best = first")
            best = {k: self.first.get(f"best/{k}", self.first.get(k, 0)) for k in BEST_KEYS}
            gold_drop = best["eval/gold"] - row["eval/gold"]
            rose = row["eval/reward"] > best["eval/reward"]
            checks.append(("reward_hacking", rose and _gt(gold_drop, s.reward_hacking_warn),
                           rose and _gt(gold_drop, s.reward_hacking_stop),
                           f"held-out reward rose {best['eval/reward']:.3f} -> {row['eval/reward']:.3f} while "
                           f"the gold check fell {best['eval/gold']:.3f} -> {row['eval/gold']:.3f} (its best, at "
                           f"update {best['step']}; reward hacking: raise {self.fix['kl']}, improve the RM)",
                           "reward_hacking_stop"))
            if row["eval/gold"] > self.first.get("best/eval/gold", float("-inf")):
                self.first.update({f"best/{k}": row.get(k, 0) for k in BEST_KEYS})
        for name, warn, stop, message, limit in checks:
            if warn or stop:
                self.warnings[name] = self.warnings.get(name, 0) + 1
                out.append(message)
            self.strikes[name] = self.strikes.get(name, 0) + 1 if stop else 0
            if self.strikes[name] >= max(1, s.patience if name != "reward_hacking" else 1):
                raise HealthStop(f"{self.stage}: stopped at {self.fix['unit']} {row.get('step', '?')}: {message}; past "
                                 f"health.{limit}={getattr(s, limit)} for {self.strikes[name]} consecutive "
                                 f"check(s) ({self.fix['stopped']})")
        return out


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _gt(x: float, limit: float | None) -> bool:
    return limit is not None and x > limit


def _lt(x: float, limit: float | None) -> bool:
    return limit is not None and x < limit


class HealthCallback(PPOCallback):
    """The guardrails as a callback: warnings into the log; a stop limit raises HealthStop (the loop then saves a
    checkpoint and re-raises)."""

    name = "health"

    def __init__(self, spec: "HealthSpec"):
        self.monitor = HealthMonitor(spec)

    def on_update_end(self, trainer, row, control):
        for warning in self.monitor.check(row):
            log.warning("[ppo] update %s: %s", row.get("step", "?"), warning)

    def state_dict(self):
        return self.monitor.state_dict()

    def load_state_dict(self, state):
        self.monitor.load_state_dict(state)


class JsonlLog(PPOCallback):
    """`log_history.jsonl`: one row per line, appended as the loop goes (a kill loses at most the last line)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_train_begin(self, trainer, history):
        self.path.write_text("".join(json.dumps(r) + "\n" for r in history))  # rows past the checkpoint go

    def on_log(self, trainer, row):
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


class LiveTracking(PPOCallback):
    """The stage's dashboard as the loop goes: one row per update, and the held-out responses at each eval as a
    sample table (alignment.tracking; a no-op when the stage runs without a dashboard)."""

    def on_log(self, trainer, row):
        from alignment import tracking

        tracking.log_row(row)

    def on_evaluate(self, trainer, row, rows, texts):
        from alignment import tracking

        samples = [{"prompt": (r.get("prompt") or [{}])[-1].get("content", "") if isinstance(r.get("prompt"), list)
                    else str(r.get("prompt", "")), "response": t} for r, t in zip(rows, texts)]
        tracking.log_samples(samples, key="ppo/eval_samples", step=getattr(trainer, "update", None))


class ProgressBar(PPOCallback):
    def __init__(self, desc: str = "ppo"):
        self.desc, self.bar = desc, None

    def on_train_begin(self, trainer, history):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=trainer.spec.updates, initial=trainer.update, desc=self.desc, unit="update",
                        dynamic_ncols=True)

    def on_log(self, trainer, row):
        if self.bar is None or "objective/scores" not in row:
            return
        self.bar.update(1)
        self.bar.set_postfix(score=f"{row['objective/scores']:.3f}", kl=f"{row['ppo/kl']:.3f}",
                             **({"eval": f"{row['eval/reward']:.3f}"} if "eval/reward" in row else {}))

    def on_train_end(self, trainer):
        if self.bar is not None:
            self.bar.close()


class GoldCheck(PPOCallback):
    """`eval/gold`: mean `alignment.gold.score` of the held-out responses whose prompts have constraints (the
    signal the reward-hacking guardrail compares with the held-out reward)."""

    def on_evaluate(self, trainer, row, rows, texts):
        g = gold_mean(rows, texts)
        if g is not None:
            row["eval/gold"] = g


def gold_mean(rows: list[dict], completions: list[str]) -> float | None:
    """Mean gold score over the prompts that have constraints; None without any."""
    from alignment import gold

    scored = [gold.score(c, r["constraints"]) for r, c in zip(rows, completions) if r.get("constraints")]
    return sum(scored) / len(scored) if scored else None


class StopOnPreemption(PPOCallback):
    """Slurm's SIGUSR1 (alignment.preemption): checkpoint after the update in flight, then stop."""

    def on_update_end(self, trainer, row, control):
        from alignment import preemption

        if preemption.requested():
            control.save = control.stop = True
            if trainer.update < trainer.spec.updates:
                log.warning("[ppo] preemption requested: checkpoint-%d saved, stopping", trainer.update)
