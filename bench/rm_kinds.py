"""Reward models side by side, per constraint kind, on one of their scored sets: #13's criterion (held-out-phrasing
accuracy >= 0.8 in every kind the RM trains on) read from each run's metrics.json, the way docs/reward.md's tables
report it. Nothing is scored again; prints a markdown table (kinds x runs) and, with --json, writes the same figures.

    python3 bench/rm_kinds.py s0=/work/art/RMG/rm0/reward s1=/work/art/RMG/rm1/reward [--set heldout_phrasings]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_run(path: Path, set_name: str) -> dict:
    """The figures of one run on one set, from a reward artifact folder or its metrics.json. Raises ValueError."""
    file = path / "metrics.json" if path.is_dir() else path
    try:
        metrics = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: not a readable metrics.json ({e.__class__.__name__})") from None
    by_kind = metrics.get(f"{set_name}_by_category") if isinstance(metrics, dict) else None
    if not isinstance(by_kind, dict):
        raise ValueError(f"{file}: no per-kind figures for set {set_name!r} ({set_name}_by_category)")
    return {"kinds": {k: (v["accuracy"], v["pairs"]) for k, v in by_kind.items()},
            "accuracy": metrics[f"{set_name}_accuracy"], "ci": metrics.get(f"{set_name}_accuracy_ci"),
            "length_corr": metrics.get(f"{set_name}_length_corr")}


def table(runs: dict[str, dict], floor: float) -> list[str]:
    """Markdown rows: one per kind (accuracy, pairs), then all kinds with the CI, kinds >= floor, length corr."""
    names = list(runs)
    kinds = sorted({k for r in runs.values() for k in r["kinds"]})
    rows = ["| kind | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for k in kinds:
        cells = []
        for n in names:
            acc, pairs = runs[n]["kinds"].get(k, (None, 0))
            cells.append("-" if acc is None else f"{'**' if acc < floor else ''}{acc:.2f}{'**' if acc < floor else ''}"
                         f" ({pairs})")
        rows.append(f"| {k} | " + " | ".join(cells) + " |")

    def overall(r):
        ci = f" [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]" if r["ci"] else ""
        return f"{r['accuracy']:.3f}{ci}"

    rows.append("| all kinds | " + " | ".join(overall(runs[n]) for n in names) + " |")
    rows.append(f"| kinds >= {floor:g} | " + " | ".join(
        f"{passed(runs[n], floor)} of {len(runs[n]['kinds'])}" for n in names) + " |")
    rows.append("| length corr | " + " | ".join(
        "-" if runs[n]["length_corr"] is None else f"{runs[n]['length_corr']:+.2f}" for n in names) + " |")
    return rows


def passed(run: dict, floor: float) -> int:
    return sum(acc >= floor for acc, _ in run["kinds"].values())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", metavar="NAME=PATH", help="a reward artifact folder or its metrics.json")
    ap.add_argument("--set", default="heldout_phrasings", help="eval (data.eval) or a data.eval_sets name")
    ap.add_argument("--min", type=float, default=0.8, dest="floor", help="the per-kind floor (#13: 0.8)")
    ap.add_argument("--json", type=Path, help="also write {name: figures} here")
    args = ap.parse_args(argv)
    runs = {}
    for spec in args.runs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            return _fail(f"{spec!r}: expected NAME=PATH")
        if name in runs:
            return _fail(f"{name}: named twice")
        try:
            runs[name] = read_run(Path(path), args.set)
        except ValueError as e:
            return _fail(str(e))
    print("\n".join(table(runs, args.floor)))
    if args.json:
        args.json.write_text(json.dumps({n: {**r, "kinds_at_floor": passed(r, args.floor)} for n, r in runs.items()},
                                        indent=1))
    return 0


def _fail(message: str) -> int:
    print(f"rm_kinds: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
