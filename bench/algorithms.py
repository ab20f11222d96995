"""DPO, online DPO, PPO, GRPO and RLOO from one SFT artifact, at the same generation budget, over seeds.

    .venv/bin/python bench/algorithms.py --profile smollm2 --seeds 3 --artifacts /tmp/bench-alg
    .venv/bin/python bench/algorithms.py --profile tiny --seeds 1 --artifacts /tmp/bench-tiny   # smoke (a test)

1. base, sft and reward are built once (run `<profile>-bench`), so every algorithm starts from the same SFT policy
   and is scored by the same reward model.
2. The generation budget is `--responses` sampled responses of at most `--max-new-tokens` tokens each (the same
   generated-token capacity for every on-policy method, all scored by the same reward model): online DPO gets
   `rounds x prompts_per_round x K` of them,
   PPO `updates x batch_size`, GRPO/RLOO `max_steps x batch_size x grad_accum` completions; every method's
   response limit is set to `--max-new-tokens`. Offline DPO generates nothing (it trains on the bundled pairs).
3. Each (algorithm, seed) is one `align run` subprocess with configs/<profile>/<algorithm>.yaml (the stage named in
   the file: dpo, online_dpo, ppo, grpo for grpo.yaml and rloo.yaml) and only those keys, the seed and the inputs
   overridden. Wall time and user+sys CPU seconds of the child are measured (wait4). A run its stage's health
   guardrail stops (exit 2, `... stopped at step N: ...`) is a result of that seed: listed under the table with the
   guardrail's line, not evaluated; any other failure stops the bench.
4. Every policy and the SFT model answer the prompts of each eval split greedily: gold pass rate (every constraint
   met, `alignment.gold`), reward-model score (raw), mean response length (tokens), and KL(policy || SFT) on
   sampled responses (`alignment.dpo.sampled_kl`). Pass rates get a percentile bootstrap CI over prompts (each
   prompt's outcome averaged over seeds), and so does the per-prompt difference to the SFT model. Each policy is
   evaluated in its own process, `--jobs` at a time (one thread each when more than one).

Writes `<out-dir>/algorithms-<profile>.json`, the table between `<!-- results:<profile> -->` markers in `--doc`
(docs/algorithms.md) and a plot (`--plot`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))  # the benches' shared helpers
from _child import run_align  # noqa: E402

ALGORITHMS = ("dpo", "online_dpo", "ppo", "grpo", "rloo")
SPLITS = {
    "in-distribution": "data/instruct/eval.jsonl",
    "held-out phrasings": "data/instruct/eval_heldout_phrasings.jsonl",
    "held-out kinds": "data/instruct/eval_heldout_kinds.jsonl",
}
"""Eval splits by name; a file that is not there yet is skipped with a note (the data work adds them)."""
STOPPED = re.compile(r"align: error: (\w+: stopped at (?:update|step) \d+: [^\r\n]*)")
"""A stage's health guardrail stopping the run (exit 2, alignment/ppo_callbacks.py): a result of the recipe on that
seed, reported in the table, not a crash of the bench. Not anchored at a line start: a progress bar's last
redraw may precede it on the same line."""


# -- running the stages ---------------------------------------------------------------------------------


def align(args: list[str], env_extra: dict | None = None) -> dict:
    """One `align` subprocess; its wall time and the child's user+sys CPU seconds (wait4, not self-reported)."""
    done = run_align(args, {"ALIGN_TRACKING": "none", "PYTHONPATH": str(REPO), **(env_extra or {})})
    timing = {"wall_s": round(done.wall_s, 1), "cpu_s": round(done.usage.ru_utime + done.usage.ru_stime, 1)}
    stop = guardrail_stop(done.code, done.err)
    if stop:
        return {**timing, "stopped": stop}
    if done.code != 0:
        sys.exit(f"align {' '.join(args)} failed ({done.code}):\n{done.err[-3000:]}")
    return timing


def guardrail_stop(code: int, err: str) -> str | None:
    """The guardrail's one line when a run ended that way (exit 2 + `STOPPED`), else None."""
    found = STOPPED.search(err) if code == 2 else None
    return found.group(1) if found else None


def say(line: str) -> None:
    """One line in one write: print() writes the newline apart, so lines of runs side by side ran together."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def stage_of(config: Path) -> str:
    from alignment.runner import stage_of_file

    return stage_of_file(config)


def budget_overrides(algorithm: str, config: Path, responses: int, max_new_tokens: int) -> list[str]:
    """Keys that give `algorithm` `responses` sampled responses of at most `max_new_tokens` tokens."""
    from alignment.config import load_yaml

    spec = load_yaml(config)
    if algorithm == "online_dpo":
        rounds = spec.get("online", {}).get("rounds", 3)
        k = spec.get("generation", {}).get("num_return_sequences", 4)
        # The same reward as PPO/GRPO/RLOO: the shared reward model (the tiny profile's own scorer is the gold check).
        return [f"online.prompts_per_round={max(1, responses // (rounds * k))}",
                f"generation.max_new_tokens={max_new_tokens}"]
    if algorithm == "ppo":
        batch = spec.get("ppo", {}).get("batch_size", 8)
        return [f"ppo.updates={max(1, responses // batch)}", f"ppo.max_new_tokens={max_new_tokens}"]
    if algorithm in ("grpo", "rloo"):
        train = spec.get("train", {})
        per_step = train.get("batch_size", 8) * train.get("grad_accum", 1)
        return [f"train.max_steps={max(1, responses // per_step)}",
                f"group.max_completion_length={max_new_tokens}"]
    return []  # offline DPO: trains on the bundled pairs, generates nothing


GOLD = "alignment.reward_sources:gold_reward"


def reward_overrides(algorithm: str, reward: str) -> list[str]:
    """`--reward gold`: every on-policy method optimises the verifiable constraint check (RLVR, Tulu 3) instead
    of the reward model; the eval splits' prompts are never trained on, so held-out figures stay honest."""
    if algorithm == "dpo":
        return []
    if reward == "model":  # the shared reward model (the tiny profile's online DPO scores with the gold check)
        return ["scorer.kind=model", "scorer.function=null"] if algorithm == "online_dpo" else []
    if algorithm == "online_dpo":
        return ["scorer.kind=function", f"scorer.function={GOLD}"]
    keys = ["reward.kind=function", f"reward.function={GOLD}"]
    return keys + (["ppo.value_init=zero"] if algorithm == "ppo" else [])  # no reward model to copy a head from


def timed_run(cmd: list[str], artifact: Path, cache: Path, lock: threading.Lock | None = None) -> dict:
    """`align(cmd)`, remembering its time by artifact: a re-run that finds the artifact up to date (a bench resumed
    after a crash) reports the time of the run that made it, not the seconds the skip took. `lock` guards the
    cache file when runs go side by side."""
    manifest = artifact / "manifest.json"
    before = manifest.read_bytes() if manifest.is_file() else None
    timing = align(cmd)
    if "stopped" in timing:
        return timing
    with lock or contextlib.nullcontext():
        times = json.loads(cache.read_text()) if cache.is_file() else {}
        if before is not None and manifest.read_bytes() == before:  # built before this bench: time unknown here
            return {**times.get(str(artifact), {"wall_s": None, "cpu_s": None}), "reused": True}
        times[str(artifact)] = timing
        cache.write_text(json.dumps(times, indent=1))
    return timing


def shared_inputs(profile: str, root: Path, run: str, shared: Path | None) -> dict:
    """base, sft and reward of the bench run (built once, skipped when up to date), or `--shared`'s."""
    if shared is not None:
        return {"shared": str(shared)}
    times = {}
    for stage in ("base", "sft", "reward"):
        times[stage] = align(["run", stage, "-c", f"configs/{profile}/{stage}.yaml", "--artifacts", str(root),
                              "--run", run])
    return times


def train_all(args, root: Path, run: str, out_dir: Path) -> list[dict]:
    """Every (algorithm, seed) run: its artifact folder, wall and CPU time, and its budget keys. `--jobs N` runs N at
    once (each on `threads=1` unless --override sets threads): on a 2-core CPU two one-thread runs finish sooner
    than one after the other on two threads, and each run's CPU seconds stay its own (wait4)."""
    sft, reward = args.shared_dir / "sft", args.shared_dir / "reward"
    threads = [] if args.jobs < 2 or any(o.startswith("threads=") for o in args.override) else ["threads=1"]
    todo = []
    for algorithm in args.algorithms:
        config = REPO / "configs" / args.profile / f"{algorithm}.yaml"
        stage = stage_of(config)
        keys = (budget_overrides(algorithm, config, args.responses.get(algorithm), args.max_new_tokens)
                + reward_overrides(algorithm, args.reward))
        needs_rm = stage != "dpo" and args.reward == "model"
        for seed in range(args.seeds.get(algorithm)):
            name = f"{args.prefix or run}-{algorithm}-s{seed}"
            cmd = ["run", stage, "-c", str(config), "--artifacts", str(root), "--run", name, f"seed={seed}",
                   f"inputs.sft={sft}", *([f"inputs.reward={reward}"] if needs_rm else []), *keys, *args.override,
                   *threads]
            todo.append(({"algorithm": algorithm, "seed": seed, "artifact": str(root / name / stage),
                          "budget_keys": keys}, cmd))
    lock = threading.Lock()

    def one(job) -> dict:
        row, cmd = job
        say(f"[bench] {row['algorithm']} seed {row['seed']}: align {' '.join(cmd[:4])} {' '.join(cmd[8:])}")
        timing = timed_run(cmd, Path(row["artifact"]), out_dir / f"timings-{args.profile}.json", lock)
        say(f"[bench] {row['algorithm']} seed {row['seed']} " + (f"stopped: {timing['stopped']}"
                                                                 if "stopped" in timing else f"done: {timing}"))
        return {**row, **timing}

    pool = ThreadPoolExecutor(max_workers=max(1, args.jobs))
    try:
        return list(pool.map(one, todo))
    finally:  # a failed run (not a guardrail stop) stops the bench: queued runs dropped, running ones finish
        pool.shutdown(cancel_futures=True)


# -- evaluating the policies ------------------------------------------------------------------------------


def load_splits(names: list[str], limit: int | None) -> dict[str, list[dict]]:
    from alignment.prompts import load_prompts

    out = {}
    for name in names:
        path = REPO / SPLITS.get(name, name)
        if not path.is_file():
            print(f"[bench] split '{name}': {path.relative_to(REPO)} not there yet, skipped", flush=True)
            continue
        out[name] = [p for p in load_prompts(str(path), limit) if p.get("constraints")]
    return out


def evaluate(art_path: Path, sft_model, tok, splits: dict, scorer, args) -> dict:
    """Per split: per-prompt gold outcome, RM score and length of the greedy response; KL on sampled ones."""
    from alignment.artifacts import ArtifactStore
    from alignment.dpo import sampled_kl, separate_reference
    from alignment.evaluation import constraint_gold
    from alignment.generation import GenerationSpec, generate
    from alignment.policy import load_policy

    policy = sft_model if art_path is None else load_policy(ArtifactStore(art_path.parent.parent).read(art_path),
                                                             args.precision)
    spec = GenerationSpec(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    out = {}
    for name, rows in splits.items():
        roll = generate(policy, tok, [r["prompt"] for r in rows], spec, greedy=True)
        out[name] = {"gold": constraint_gold(rows, roll.texts), "rm": scorer([r["prompt"] for r in rows], roll.texts),
                     "length": roll.lengths, "finished": roll.has_eos.float().mean().item()}
    first = next(iter(splits.values()))[: args.kl_prompts]
    kl = {"kl_seq": 0.0} if art_path is None else sampled_kl(
        policy, lambda: separate_reference(sft_model), tok, [r["prompt"] for r in first],
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=0)
    return {"splits": out, "kl_seq": kl["kl_seq"]}


def evaluate_one(args) -> None:
    """The child of `evaluate_all`: one policy (`--evaluate ARTIFACT`, or `sft`) against the shared SFT model and
    reward model, its result as JSON in `--result`."""
    import torch

    from alignment.artifacts import ArtifactStore
    from alignment.models import load_tokenizer
    from alignment.policy import load_policy
    from alignment.reward_sources import ModelReward

    if args.jobs > 1:
        torch.set_num_threads(1)  # side by side with another evaluation: one core each
    store = ArtifactStore(args.shared_dir.parent)
    sft = store.read(args.shared_dir / "sft")
    sft_model, tok = load_policy(sft, args.precision).eval(), load_tokenizer(sft.model_dir)
    scorer = ModelReward.from_artifact(store.read(args.shared_dir / "reward"), args.precision)
    splits = load_splits(args.splits, args.max_eval_prompts)
    art = None if args.evaluate == "sft" else Path(args.evaluate)
    Path(args.result).write_text(json.dumps(evaluate(art, sft_model, tok, splits, scorer, args)))


def evaluate_all(args, trained: list[dict]) -> dict:
    """The SFT model and every trained policy, each in its own process (`evaluate_one`), `--jobs` at a time."""
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="bench-eval-", dir=args.out_dir))
    jobs = [("sft", {"algorithm": "sft", "seed": 0})] + [(row["artifact"], row) for row in trained
                                                         if "stopped" not in row]  # nothing published to score

    def one(i: int) -> dict:
        target, row = jobs[i]
        result = work / f"{i}.json"
        say(f"[bench] evaluating {row['algorithm']} seed {row['seed']}")
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO),
               **({"OMP_NUM_THREADS": "1"} if args.jobs > 1 else {})}
        proc = subprocess.run([sys.executable, __file__, *args.argv, "--evaluate", target, "--result", str(result)],
                              cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if proc.returncode != 0:
            sys.exit(f"evaluating {target} failed ({proc.returncode}):\n{proc.stderr.decode(errors='replace')[-3000:]}")
        return json.loads(result.read_text())

    pool = ThreadPoolExecutor(max_workers=max(1, args.jobs))
    try:
        done = list(pool.map(one, range(len(jobs))))
    finally:
        pool.shutdown(cancel_futures=True)
    results = {"sft": [done[0]]}
    for (_, row), res in zip(jobs[1:], done[1:]):
        results.setdefault(row["algorithm"], []).append({**res, **row})
    shutil.rmtree(work, ignore_errors=True)
    return results


# -- summarising ---------------------------------------------------------------------------------------


def per_prompt_mean(runs: list[dict], split: str) -> list[float]:
    """Each prompt's gold outcome averaged over seeds (the unit the bootstrap resamples)."""
    cols = [r["splits"][split]["gold"] for r in runs]
    return [sum(c[i] for c in cols) / len(cols) for i in range(len(cols[0]))]


def _mean_time(runs: list[dict], key: str) -> float | None:
    """Mean over seeds; None when a run was built outside this bench (`--shared` runs made by hand)."""
    values = [r.get(key, 0.0) for r in runs]
    return None if any(v is None for v in values) else sum(values) / len(values)


def summarise(results: dict) -> dict:
    """Per algorithm and split: pass rate and CI, difference to SFT and CI; RM score, KL, length, time."""
    from alignment.evaluation import bootstrap_ci

    base = results["sft"]
    table = {}
    for algorithm, runs in results.items():
        row = {"seeds": len(runs) if algorithm != "sft" else 0}
        for split in runs[0]["splits"]:
            mine, ref = per_prompt_mean(runs, split), per_prompt_mean(base, split)
            diff = [a - b for a, b in zip(mine, ref)]
            row[split] = {"pass": sum(mine) / len(mine), "pass_ci": bootstrap_ci(mine),
                          "delta": sum(diff) / len(diff), "delta_ci": bootstrap_ci(diff), "n": len(mine)}
        all_rm = [x for r in runs for s in r["splits"].values() for x in s["rm"]]
        all_len = [x for r in runs for s in r["splits"].values() for x in s["length"]]
        row.update(rm=sum(all_rm) / len(all_rm), length=sum(all_len) / len(all_len),
                   kl=sum(r["kl_seq"] for r in runs) / len(runs),
                   wall_s=_mean_time(runs, "wall_s"), cpu_s=_mean_time(runs, "cpu_s"))
        table[algorithm] = row
    return table


def markdown(table: dict, args, splits: list[str], trained: list[dict] = ()) -> str:
    head = ["algorithm", *[f"gold, {s} (95% CI)" for s in splits], *[f"vs SFT, {s} (95% CI)" for s in splits],
            "RM score", "KL to SFT", "mean length", "seeds", "wall s / seed", "CPU s / seed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for algorithm, row in table.items():
        cells = [algorithm]
        cells += [f"{row[s]['pass']:.3f} [{row[s]['pass_ci'][0]:.3f}, {row[s]['pass_ci'][1]:.3f}]" for s in splits]
        cells += ["-" if algorithm == "sft" else f"{row[s]['delta']:+.3f} "
                  f"[{row[s]['delta_ci'][0]:+.3f}, {row[s]['delta_ci'][1]:+.3f}]" for s in splits]
        cells += [f"{row['rm']:.3f}", f"{row['kl']:.3f}", f"{row['length']:.1f}", str(row["seeds"] or "-"),
                  *("-" if row[k] is None or algorithm == "sft" else f"{row[k]:.0f}" for k in ("wall_s", "cpu_s"))]
        lines.append("| " + " | ".join(cells) + " |")
    n = {s: next(iter(table.values()))[s]["n"] for s in splits}
    jobs = getattr(args, "jobs", 1)
    threads = next((o.split("=", 1)[1] for o in getattr(args, "override", []) if o.startswith("threads=")), "1")
    side_by_side = f"; training runs {jobs} at a time, {threads} thread(s) each" * (jobs > 1)
    target = "the gold constraint check (RLVR)" if getattr(args, "reward", "model") == "gold" else "the reward model"
    lines.append(f"\nProfile `{args.profile}`, {args.seeds.describe('seed(s)')}, budget "
                 f"{args.responses.describe('sampled responses')} x "
                 f"{args.max_new_tokens} tokens per on-policy run, optimising {target}; prompts per split {n}; greedy, "
                 f"{args.max_new_tokens} new tokens{side_by_side}. Command: `python bench/algorithms.py "
                 f"{' '.join(args.argv)}`")
    stopped = [r for r in trained if "stopped" in r]
    if stopped:  # the seeds column counts the evaluated runs only; these are the rest
        lines.append("\nStopped by the stage's health guardrail (nothing published, not evaluated): " + "; ".join(
            f"{r['algorithm']} seed {r['seed']} (`{r['stopped']}`)" for r in stopped) + ".")
    return "\n".join(lines)


def plot(table: dict, splits: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / max(len(table), 1)
    for i, (algorithm, row) in enumerate(table.items()):
        xs = [j + i * width for j in range(len(splits))]
        ys = [row[s]["pass"] for s in splits]
        err = [[y - row[s]["pass_ci"][0] for y, s in zip(ys, splits)],
               [row[s]["pass_ci"][1] - y for y, s in zip(ys, splits)]]
        ax.bar(xs, ys, width, yerr=err, capsize=3, label=algorithm)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(splits))], splits)
    ax.set_ylabel("gold pass rate (95% bootstrap CI)")
    ax.set_ylim(0, 1)
    ax.legend(ncol=len(table), fontsize=8, loc="upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_doc(doc: Path, profile: str, text: str) -> None:
    """Replace the block between the profile's markers (append one when the doc has none)."""
    start, end = f"<!-- results:{profile} -->", f"<!-- /results:{profile} -->"
    old = doc.read_text() if doc.is_file() else ""
    block = f"{start}\n{text}\n{end}"
    if start in old and end in old:
        new = old[: old.index(start)] + block + old[old.index(end) + len(end):]
    else:
        new = old.rstrip() + ("\n\n" if old else "") + block + "\n"
    doc.write_text(new)


class PerAlgorithm(NamedTuple):
    """A count for every algorithm (`default`) with exceptions (`each`): `--seeds 3,dpo=1`, `--responses 768,ppo=384`."""

    default: int | None
    each: dict[str, int]

    def get(self, algorithm: str) -> int:
        return self.each.get(algorithm, self.default)

    def describe(self, unit: str) -> str:
        """`3 seed(s), dpo 1`: the footnote's words."""
        return f"{self.default} {unit}" + "".join(f", {a} {n}" for a, n in self.each.items())


def _per_algorithm(text: str) -> PerAlgorithm:
    """`N`, `N,ALGORITHM=N,...` or `ALGORITHM=N,...` (the default then comes from parse), every count >= 1."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    plain = [t for t in items if "=" not in t]
    try:
        each = {k.strip(): int(v) for k, v in (t.split("=", 1) for t in items if "=" in t)}
        counts = [int(v) for v in plain] + list(each.values())
    except ValueError:
        counts = None
    if not items or counts is None or len(plain) > 1 or any(n < 1 for n in counts):
        raise argparse.ArgumentTypeError(f"expected N or N,ALGORITHM=N,... with counts >= 1; got {text!r}")
    return PerAlgorithm(int(plain[0]) if plain else None, each)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--profile", default="smollm2", choices=["tiny", "smollm2"])
    p.add_argument("--seeds", type=_per_algorithm, default=PerAlgorithm(3, {}),
                   help="seeds per algorithm: N, or N,ALGORITHM=N,... (e.g. 3,dpo=1: the table's seeds column says)")
    p.add_argument("--algorithms", type=lambda s: s.split(","), default=list(ALGORITHMS))
    p.add_argument("--artifacts", type=Path, default=Path("/tmp/bench-algorithms"))
    p.add_argument("--responses", type=_per_algorithm, default=PerAlgorithm(None, {}),
                   help="sampled responses per on-policy run: N, or per algorithm (online_dpo=768,ppo=384; a "
                        "smaller budget for one method is then named in the table's footnote)")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--splits", type=lambda s: s.split(","), default=list(SPLITS))
    p.add_argument("--max-eval-prompts", type=int, default=None)
    p.add_argument("--jobs", type=int, default=1,
                   help="training runs at once (each on one thread unless --override threads=N); 2 on a 2-core CPU")
    p.add_argument("--kl-prompts", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--override", action="append", default=[], help="key=value for every training run")
    p.add_argument("--out-dir", type=Path, default=REPO / "bench" / "out")
    p.add_argument("--doc", type=Path, default=REPO / "docs" / "algorithms.md")
    p.add_argument("--plot", type=Path, default=None)
    p.add_argument("--reward", choices=["model", "gold"], default="model",
                   help="what the on-policy methods optimise: the shared reward model, or the gold check (RLVR)")
    p.add_argument("--shared", type=Path, default=None,
                   help="a run folder whose base/sft/reward artifacts to start from (else built as <profile>-bench)")
    p.add_argument("--prefix", default=None, help="run-name prefix of the trained runs (default <profile>-bench)")
    p.add_argument("--results-tag", default=None, help="doc marker suffix (default the profile; e.g. smollm2-gold)")
    p.add_argument("--evaluate", help=argparse.SUPPRESS)  # (internal) the policy an evaluation child evaluates
    p.add_argument("--result", help=argparse.SUPPRESS)  # (internal) where that child writes its JSON
    args = p.parse_args(argv)
    tiny = args.profile == "tiny"
    args.seeds = args.seeds._replace(default=args.seeds.default or 3)
    args.responses = args.responses._replace(default=args.responses.default or (64 if tiny else 768))
    args.max_new_tokens = args.max_new_tokens or (16 if tiny else 128)  # SmolLM2 SFT finishes within 128
    args.precision = "fp32" if tiny else "auto"
    args.plot = args.plot or REPO / "docs" / "img" / f"algorithms_{args.profile}{'_gold' * (args.reward == 'gold')}.png"
    args.argv = argv
    for flag, counts in (("--seeds", args.seeds), ("--responses", args.responses)):
        unknown = [a for a in counts.each if a not in ALGORITHMS]
        if unknown:
            p.error(f"{flag}: unknown {unknown}; choose from {', '.join(ALGORITHMS)}")
    args.shared_dir = (args.shared.resolve() if args.shared else args.artifacts / f"{args.profile}-bench")
    args.tag = args.results_tag or args.profile + ("-gold" if args.reward == "gold" else "")
    unknown = [a for a in args.algorithms if a not in ALGORITHMS]
    if unknown:
        p.error(f"--algorithms: unknown {unknown}; choose from {', '.join(ALGORITHMS)}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(sys.argv[1:] if argv is None else argv)
    if args.evaluate:
        evaluate_one(args)
        return {}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    root, run = args.artifacts, f"{args.profile}-bench"
    setup = shared_inputs(args.profile, root, run, args.shared)
    trained = train_all(args, root, run, args.out_dir)
    results = evaluate_all(args, trained)
    table = summarise(results)
    splits = list(next(iter(table.values())).keys() - {"seeds", "rm", "length", "kl", "wall_s", "cpu_s"})
    splits = [s for s in args.splits if s in splits]
    text = markdown(table, args, splits, trained)
    print(text)
    (args.out_dir / f"algorithms-{args.tag}.json").write_text(
        json.dumps({"setup": setup, "trained": trained, "table": table, "results": results}, indent=1))
    write_doc(args.doc, args.tag, text)
    plot(table, splits, args.plot)
    return table


if __name__ == "__main__":
    main()
