"""Gold pass rate of policy artifacts on all three eval splits, per constraint kind, and paired gains.

Every prompt of each split (200 each: in-distribution, held-out phrasings, held-out kinds) answered greedily
(128 new tokens, batch 64), each response checked by `alignment.gold`: a prompt passes when every constraint is
met; per kind, the share of that kind's constraints met. `--sample K` also samples K answers per prompt at
temperature 1 on the first two splits (what an on-policy method can find to reinforce). The first policy is the
baseline: every other one gets its per-prompt gain with a percentile-bootstrap 95% CI. `--strict` counts an
answer cut at the budget without an EOS as failed (the checker otherwise scores the cut text, and a policy that
runs on collects the "at least N words / sentences" constraints). `--seeds NAME=A,B,C` adds a row for the seeds
A, B, C of one recipe: per prompt the mean over the seeds, its gain's CI bootstrapped over prompts. `--kinds`
adds, per split, the share of each constraint kind met by each policy (as scored: a cut answer keeps what its text
met; a seeds row averages its seeds): where a gain comes from, and what it cost. `--sealed` adds the sealed split
(data/sealed/phrasings.jsonl: wordings written after the held-out figures had steered the recipes; docs/data.md) to
what is evaluated and reported: only for a recipe frozen before the look, and every look is logged there.
`--sealed2` adds the second one (data/sealed/phrasings2.jsonl, a fourth set of wordings) under the same rule.
`--by-wording` bootstraps the CIs over wordings (the phrasing of each prompt's own constraint kind, 20-32 per
held-out split), then over prompts inside them: how far another set of wordings could move the figure.
`--splits indist` evaluates and reports only the named splits: a pilot that chooses a recipe on the in-distribution
split then never generates on the held-out ones (a policy's row appears in reports that ask for splits it has).
`--plot PNG` draws the report's gains with their CIs, one panel per split (the `--seeds` rows when there are any).

    OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 .venv/bin/python bench/gold_splits.py --out bench/out/gold.json \\
        sft=A/smollm2/sft ppo=A/smollm2/ppo [--sample 4]
    .venv/bin/python bench/gold_splits.py --out bench/out/gold.json --report   # tables from the saved outcomes
    .venv/bin/python bench/gold_splits.py --out bench/out/gold.json --report --strict --seeds ppo3=ppo,ppo1,ppo2
    .venv/bin/python bench/gold_splits.py --out bench/out/gold.json --report --seeds ppo3=ppo,ppo1,ppo2 --kinds sft ppo3
    .venv/bin/python bench/gold_splits.py --out bench/out/pilots.json --splits indist --report --strict sft=A/smollm2/sft \\
        pilot=B/smollm2/online_dpo

Outcomes accumulate in `--out` (one key per name), so policies can be evaluated in separate calls.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from alignment.evaluation import bootstrap_ci, cluster_bootstrap_ci, finished_only, wording_of  # noqa: E402

SPLITS = {"indist": "data/instruct/eval.jsonl", "phrasings": "data/instruct/eval_heldout_phrasings.jsonl",
          "kinds": "data/instruct/eval_heldout_kinds.jsonl"}
SEALED = {"sealed": "data/sealed/phrasings.jsonl", "sealed2": "data/sealed/phrasings2.jsonl"}
"""The sealed splits (docs/data.md): each read only with its flag (--sealed, --sealed2), for a recipe frozen before
the look. The second one, a fourth set of wordings, was written when the first had been read for seven recipes."""


def per_kind(rows: list[dict], texts: list[str], k: int = 1) -> dict[str, float]:
    """Share of each kind's constraints met (a prompt with two constraints counts once for each kind); `texts`
    holds k answers per prompt, prompt-major."""
    from alignment import gold

    met = defaultdict(list)
    for i, text in enumerate(texts):
        for c in rows[i // k]["constraints"]:
            met[c["type"]].append(float(gold.check(text, c)))
    return {k: sum(v) / len(v) for k, v in sorted(met.items())}


def evaluate(path: Path, sample: int, splits: dict = SPLITS, precision: str = "auto") -> dict:
    from alignment import gold
    from alignment.artifacts import ArtifactStore
    from alignment.generation import GenerationSpec, generate
    from alignment.models import load_tokenizer
    from alignment.policy import load_policy
    from alignment.prompts import load_prompts

    art = ArtifactStore(path.parent.parent).read(path)
    model, tok = load_policy(art, precision).eval(), load_tokenizer(art.model_dir)
    out = {}
    for split, file in splits.items():
        rows = [p for p in load_prompts(str(REPO / file), None) if p.get("constraints")]
        prompts = [r["prompt"] for r in rows]
        roll = generate(model, tok, prompts, GenerationSpec(max_new_tokens=128, batch_size=64), greedy=True)
        res = {"gold": [float(gold.passes(t, r["constraints"])) for r, t in zip(rows, roll.texts)],
               "eos": roll.has_eos.tolist(),
               "per_kind": per_kind(rows, roll.texts), "length": sum(roll.lengths) / len(rows),
               "finished": roll.has_eos.float().mean().item()}
        if sample and split not in ("kinds", *SEALED):
            spec = GenerationSpec(max_new_tokens=128, batch_size=64, do_sample=True, num_return_sequences=sample)
            res["sampled_per_kind"] = per_kind(rows, generate(model, tok, prompts, spec, seed=1).texts, sample)
        out[split] = res
        print(f"{path}: {split} gold {sum(res['gold']) / len(rows):.3f}, {res['length']:.1f} tokens, "
              f"finished {res['finished']:.2f}", flush=True)
    return out


def gold_of(res: dict, strict: bool) -> list[float]:
    """Per-prompt gold; strict: an answer cut at the token budget (no EOS) fails, whatever its text meets."""
    return finished_only(res["gold"], res["eos"]) if strict else res["gold"]


def seeds_mean(results: dict, members: list[str], strict: bool, splits: dict = SPLITS) -> dict:
    """One policy trained with several seeds (`members`: their names in `results`) as one row: per split and prompt
    the mean outcome over the seeds (strictness applied per seed first), so the paired bootstrap over prompts
    gives the CI of the seed-averaged gain (as bench/seeds_eval.py does); tokens averaged over the seeds."""
    out = {}
    for split in splits:
        per_seed = [gold_of(results[m][split], strict) for m in members]
        kinds = [results[m][split].get("per_kind", {}) for m in members]
        out[split] = {"gold": [sum(xs) / len(xs) for xs in zip(*per_seed, strict=True)],
                      "eos": [True] * len(per_seed[0]),
                      "length": sum(results[m][split]["length"] for m in members) / len(members),
                      "per_kind": {k: sum(pk[k] for pk in kinds) / len(kinds)
                                   for k in kinds[0] if all(k in pk for pk in kinds)}}
    return out


def wording_clusters(splits: dict) -> dict[str, list[str]]:
    """Per split, each prompt's wording label. A row without a template id (user data) is its own cluster: one
    shared label would make all such rows one wording, drawn or left out together."""
    out = {}
    for split, path in splits.items():
        rows = [json.loads(line) for line in (REPO / path).read_text().splitlines() if line.strip()]
        out[split] = [wording_of(r) or f"row {i}" for i, r in enumerate(rows)]
    return out


def gains(results: dict, base: str, strict: bool = False, splits: dict = SPLITS,
          clusters: dict[str, list[str]] | None = None) -> dict[str, dict[str, tuple]]:
    """Per policy and split: (gold, gain over `base`, CI low, CI high); the base's own entries are (gold,). `clusters`
    (split -> a label per prompt): the CIs resample those clusters and then prompts inside them
    (`cluster_bootstrap_ci`), instead of prompts alone."""
    out = {}
    for name in [base] + [n for n in results if n != base]:
        out[name] = {}
        for split in splits:
            g, g0 = gold_of(results[name][split], strict), gold_of(results[base][split], strict)
            if name == base:
                out[name][split] = (sum(g) / len(g),)
                continue
            d = [a - b for a, b in zip(g, g0, strict=True)]
            if clusters and len(clusters[split]) != len(d):  # outcomes of an older build of the split's file
                sys.exit(f"gold_splits: --by-wording: {len(d)} outcomes of {name} on {split}, but "
                         f"{splits[split]} has {len(clusters[split])} prompts now")
            lo, hi = cluster_bootstrap_ci(d, clusters[split], n_boot=10_000, seed=0) if clusters else \
                bootstrap_ci(d, n_boot=10_000, seed=0)
            out[name][split] = (sum(g) / len(g), sum(d) / len(d), lo, hi)
    return out


def report(results: dict, table: dict, base: str, splits: dict = SPLITS) -> str:
    """`gains`' output as a markdown table, with each policy's mean tokens per split from `results`."""
    lines = ["| policy | " + " | ".join(f"{s} gold (gain vs {base} [95% CI])" for s in splits) + " | tokens |",
             "|---|" + "---|" * (len(splits) + 1)]
    for name, row in table.items():
        cells = [f"{row[s][0]:.3f}" + (f", {row[s][1]:+.3f} [{row[s][2]:+.3f}, {row[s][3]:+.3f}]"
                                         if len(row[s]) > 1 else "") for s in splits]
        tokens = "/".join(f"{results[name][s]['length']:.0f}" for s in splits)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {tokens} |")
    return "\n".join(lines)


def plot_gains(table: dict, base: str, splits: dict, path: Path, bar: float = 0.10) -> None:
    """One panel per split: each policy's gain over `base` with its 95% CI, a line at 0 and one at `bar` (#13's
    +0.10), policies top to bottom in the table's order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in table if n != base]
    fig, axes = plt.subplots(1, len(splits), figsize=(3.2 * len(splits), 0.45 * len(names) + 1.4), sharex=True,
                             sharey=True, squeeze=False)
    for ax, split in zip(axes[0], splits):
        for y, name in enumerate(names):
            _, gain, lo, hi = table[name][split]
            ax.errorbar(gain, y, xerr=[[gain - lo], [hi - gain]], fmt="o", capsize=3,
                        color="tab:green" if lo > 0 else "tab:gray")
        ax.axvline(0, color="black", lw=0.8)
        ax.axvline(bar, color="tab:red", lw=0.8, ls="--")
        ax.set_title(split, fontsize=9)
        ax.set_xlabel(f"gain vs {base}", fontsize=8)
    axes[0][0].set_yticks(range(len(names)), names, fontsize=8)
    axes[0][0].invert_yaxis()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def check_plot_path(path: Path | None) -> None:
    """Refuse a --plot path the figure could not be written to, before any policy is evaluated: a folder, or a
    path under a file or an unwritable folder."""
    if path is None:
        return
    folder = next(p for p in path.parents if p.exists())  # the nearest one there is: created up to the file
    if path.is_dir() or not folder.is_dir() or not os.access(folder, os.W_OK):
        sys.exit(f"gold_splits: --plot {path}: expected a PNG file path that can be written")


def kinds_report(results: dict, names: list[str], splits: dict = SPLITS) -> str:
    """Per split, one row per constraint kind: the share of that kind's constraints each policy met."""
    blocks = []
    for split in splits:
        per = [results[n][split].get("per_kind", {}) for n in names]
        lines = [f"| {split}: kind | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for k in sorted({k for pk in per for k in pk}):
            cells = [pk.get(k) for pk in per]
            lines.append(f"| {k} | " + " | ".join("-" if c is None else f"{c:.2f}" for c in cells) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def chosen_splits(names: str | None, sealed: bool, sealed2: bool = False) -> dict:
    """The splits to evaluate and report: the three (and a sealed one with its flag: --sealed, --sealed2), or the
    `--splits` subset, so that a pilot choosing a recipe reads only the split it is allowed to choose on."""
    opened = {"sealed": sealed, "sealed2": sealed2}
    pool = {**SPLITS, **{k: v for k, v in SEALED.items() if opened[k]}}
    if names is None:
        return pool
    picked = list(dict.fromkeys(s.strip() for s in names.split(",") if s.strip()))
    bad = [s for s in picked if s not in pool]
    if bad or not picked:
        closed = [s for s in bad if s in SEALED]
        hint = f" (the {closed[0]} split needs --{closed[0]} too)" if closed else ""
        sys.exit(f"gold_splits: --splits {names!r}: expected a comma-separated subset of {', '.join(pool)}{hint}")
    return {s: pool[s] for s in picked}


def check_policies(specs: list[str]) -> None:
    for spec in specs:  # every argument checked before hours of generation start
        name, _, path = spec.partition("=")
        if not name or not (Path(path) / "manifest.json").is_file():
            sys.exit(f"gold_splits: {spec!r}: expected NAME=ARTIFACT_DIR of a published stage (with manifest.json)")


def verify_policies(specs: list[str]) -> None:
    """Each artifact's outputs against their recorded sizes and hashes, all before the first is scored: a copy
    carried from another machine can be incomplete."""
    from alignment.artifacts import ArtifactStore
    from alignment.errors import AlignError

    for spec in specs:
        path = Path(spec.partition("=")[2])
        try:
            ArtifactStore(path.parent.parent).read(path)
        except AlignError as e:
            sys.exit(f"gold_splits: {spec!r}: {e}")


def seed_groups(specs: list[str], known: set, out: Path) -> dict[str, list[str]]:
    groups = {}
    for spec in specs:  # checked before generation too: a typo must not cost the run its table
        name, _, members = spec.partition("=")
        missing = [m for m in members.split(",") if m not in known]
        if not name or not members or missing:
            sys.exit(f"gold_splits: --seeds {spec!r}: expected NAME=A,B,C with A, B, C in {out} or evaluated "
                     f"now (missing: {', '.join(missing) or 'a name'})")
        groups[name] = members.split(",")
    return groups


def reportable(results: dict, wanted: list[str], splits: dict, out: Path) -> dict:
    """The outcomes that cover every reported split (older ones may lack the sealed split, a pilot's all but one);
    a policy the report needs (`wanted`) without them is one line naming what is missing."""
    absent = [m for m in wanted if m not in results]
    if absent:
        sys.exit(f"gold_splits: no outcomes for {', '.join(absent)} in {out}")
    have = {n: r for n, r in results.items() if all(s in r for s in splits)}
    if not have:
        sys.exit(f"gold_splits: no policy in {out} has outcomes on {', '.join(splits)}")
    missing = [m for m in wanted if m not in have]
    if missing:
        lacking = [s for s in splits if any(s not in results.get(m, {}) for m in missing)]
        sys.exit(f"gold_splits: no {'/'.join(lacking)} outcomes for "
                 f"{', '.join(missing)} in {out}")
    return have


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("policies", nargs="*", help="NAME=ARTIFACT_DIR; the first is the baseline of the report")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--sample", type=int, default=0)
    p.add_argument("--report", action="store_true", help="print the table of everything in --out")
    p.add_argument("--baseline", default=None, help="the policy gains are measured against (default: the first)")
    p.add_argument("--strict", action="store_true", help="count answers cut at the budget (no EOS) as failed")
    p.add_argument("--kinds", nargs="*", default=None, metavar="NAME",
                   help="also print per-kind tables (as scored) for these policies (default: every one)")
    p.add_argument("--seeds", action="append", default=[], metavar="NAME=A,B,C",
                   help="report the policies A, B, C (seeds of one recipe) as one row NAME: the per-prompt mean")
    p.add_argument("--by-wording", action="store_true",
                   help="CIs that resample the wordings (a prompt's own constraint phrasing), then prompts in them")
    p.add_argument("--sealed", action="store_true",
                   help="also evaluate and report the sealed split (docs/data.md: only for a recipe frozen beforehand)")
    p.add_argument("--sealed2", action="store_true",
                   help="also evaluate and report the second sealed split (a fourth set of wordings; the same rule)")
    p.add_argument("--plot", type=Path, default=None, metavar="PNG",
                   help="also draw the gains and CIs (of the --seeds rows if any, else of every policy), one panel per "
                        "split, to this file")
    p.add_argument("--splits", default=None, metavar="A,B",
                   help="evaluate and report only these splits (e.g. indist for a pilot that must not read the rest)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="the policies' weights when answering (auto: bf16 where the hardware runs it fast); fp32 on "
                        "a GPU keeps the numerics close to an fp32 CPU host's (greedy answers differed on 1-9 of 200 "
                        "prompts per split)")
    args = p.parse_args(argv)
    splits = chosen_splits(args.splits, args.sealed, args.sealed2)
    check_plot_path(args.plot)
    check_policies(args.policies)
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    known = set(results) | {spec.partition("=")[0] for spec in args.policies}
    groups = seed_groups(args.seeds, known, args.out)
    unknown = [n for n in args.kinds or () if n not in known | set(groups)]
    if unknown:
        sys.exit(f"gold_splits: --kinds: no results for {', '.join(unknown)} in {args.out} (nor evaluated now)")
    verify_policies(args.policies)
    for spec in args.policies:
        name, _, path = spec.partition("=")
        results[name] = evaluate(Path(path), args.sample, splits, args.precision)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results))
    if args.report or args.seeds or not args.policies:
        wanted = [m for ms in groups.values() for m in ms] + [n for n in [args.baseline, *(args.kinds or ())]
                                                              if n and n not in groups]
        results = reportable(results, wanted, splits, args.out)
        for name, members in groups.items():
            results[name] = seeds_mean(results, members, args.strict, splits)
        clusters = wording_clusters(splits) if args.by_wording else None
        base = args.baseline or next(iter(results))
        table = gains(results, base, args.strict, splits, clusters)
        print(report(results, table, base, splits))
        if args.plot:  # the seed-averaged rows when there are any: one point per recipe, not per seed
            plot_gains({n: table[n] for n in table if n == base or not groups or n in groups}, base, splits, args.plot)
    if args.kinds is not None:
        print("\n" + kinds_report(results, args.kinds or list(results), splits))


if __name__ == "__main__":
    main()
