"""`align judge audit`: how far to trust a judge, measured on preference pairs with human labels.

Reports agreement with the human labels (the judge's P(human-chosen) > 0.5; ties count half), the mean soft
label given to the human-chosen response, the position-bias rate (both orders judged and the winners differ),
the unparseable rate (judge calls with no usable answer), agreement per category, and throughput; as a rich
table, a PNG (agreement per category + the histogram of soft labels) and optionally JSON.

Pairs are shown with the human-chosen response first on even rows and second on odd rows, so a judge that
always picks one position scores 50% even with `both_orders: false`.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from alignment.errors import ConfigError
from alignment.judges import JudgeSpec, Verdict, build_judge
from alignment.outputs import check_output, check_plot, save_png, write_text
from alignment.preferences import load_pairs

log = logging.getLogger("align")


def run_audit(spec: JudgeSpec, inputs: dict, data: str, *, precision: str = "auto", limit: int | None = None,
              batch: int = 16) -> dict:
    """Judge every pair of `data` (at most `limit`) and return the report (see the module doc)."""
    judge = build_judge(spec, inputs, precision)
    judge.check()
    report = audit_judge(judge, data, limit=limit, batch=batch)
    judge.close()
    return report


def audit_judge(judge, data: str, *, limit: int | None = None, batch: int = 16) -> dict:
    """The report of an already built judge on the human-labelled pairs of `data` (the label stage's gate)."""
    from tqdm.auto import tqdm

    pairs = load_pairs(data)[:limit]
    prompts = [p["prompt"] for p in pairs]
    chosen = [p["chosen"][0]["content"] for p in pairs]
    rejected = [p["rejected"][0]["content"] for p in pairs]
    a = [c if i % 2 == 0 else r for i, (c, r) in enumerate(zip(chosen, rejected))]
    b = [r if i % 2 == 0 else c for i, (c, r) in enumerate(zip(chosen, rejected))]
    verdicts: list[Verdict] = []
    t0 = time.perf_counter()
    with tqdm(total=len(pairs), desc="[audit] judging", unit="pair", disable=None, leave=False) as bar:
        for s in range(0, len(pairs), batch):
            verdicts += judge.compare(prompts[s:s + batch], a[s:s + batch], b[s:s + batch])
            bar.update(min(batch, len(pairs) - s))
    seconds = time.perf_counter() - t0
    # P(human-chosen better) per pair: p_a where chosen was shown as a, 1 - p_a otherwise.
    p_human = [v.p_a if i % 2 == 0 else 1.0 - v.p_a for i, v in enumerate(verdicts)]
    return summarise(pairs, verdicts, p_human, judge.name, data, seconds)


def gate_failures(report: dict, *, min_agreement: float | None, max_position_bias: float | None) -> list[str]:
    """One message per threshold the judge misses on the human-labelled pairs (empty: fit to label).

    A judge that never judged both orders has no position-bias rate; with a threshold set that is a failure too,
    since the bias it would reveal is exactly what the gate is for.
    """
    out = []
    if min_agreement is not None and report["agreement"] < min_agreement:
        out.append(f"judge agreement with human labels {report['agreement']:.3f} < min_agreement {min_agreement}")
    bias = report["position_bias_rate"]
    if max_position_bias is not None and (bias is None or bias > max_position_bias):
        shown = "not measured (both_orders is off)" if bias is None else f"{bias:.3f}"
        out.append(f"judge position-bias rate {shown} > max_position_bias {max_position_bias}")
    return out


def _agree(p: float) -> float:
    return 1.0 if p > 0.5 else 0.5 if p == 0.5 else 0.0


def summarise(pairs: list[dict], verdicts: list[Verdict], p_human: list[float], judge_name: str, data: str,
              seconds: float) -> dict:
    n = len(pairs)
    both = [v for v in verdicts if v.p_ba is not None and v.unparsed_calls == 0]
    calls = sum(1 + (v.p_ba is not None) for v in verdicts)
    by_cat: dict[str, list[float]] = {}
    for p, ph in zip(pairs, p_human):
        by_cat.setdefault(p.get("category", "all"), []).append(_agree(ph))
    # First-order accuracy: the verdict of the single order where the human-chosen response was shown first.
    first_shown = [v.p_ab if i % 2 == 0 else v.p_ba for i, v in enumerate(verdicts)]
    first_shown = [_agree(x) for x in first_shown if x is not None]
    return {
        "judge": judge_name, "data": data, "pairs": n,
        "agreement": round(sum(map(_agree, p_human)) / n, 4),
        "mean_p_human_chosen": round(sum(p_human) / n, 4),
        "agreement_human_chosen_shown_first": round(sum(first_shown) / len(first_shown), 4) if first_shown else None,
        "position_bias_rate": round(sum(v.disagree for v in both) / len(both), 4) if both else None,
        "unparseable_rate": round(sum(v.unparsed_calls for v in verdicts) / calls, 4) if calls else None,
        "pairs_per_s": round(n / seconds, 3) if seconds else None,
        "agreement_by_category": {c: round(sum(v) / len(v), 4) for c, v in sorted(by_cat.items())},
        "p_human_chosen": [round(x, 4) for x in p_human],
    }


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"judge audit: {report['judge']} on {report['data']} ({report['pairs']} pairs)")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for key in ("agreement", "mean_p_human_chosen", "agreement_human_chosen_shown_first", "position_bias_rate",
                "unparseable_rate", "pairs_per_s"):
        value = report[key]
        t.add_row(key, "-" if value is None else f"{value:.3f}")
    for cat, value in report["agreement_by_category"].items():
        t.add_row(f"agreement, category {cat}", f"{value:.3f}")
    Console().print(t)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    cats = list(report["agreement_by_category"])
    left.bar(cats, [report["agreement_by_category"][c] for c in cats], color="#4c72b0")
    left.axhline(report["agreement"], color="k", linestyle="--", label=f"overall {report['agreement']:.2f}")
    left.axhline(0.5, color="grey", linestyle=":", label="chance")
    left.set_ylim(0, 1)
    left.set_ylabel("agreement with human label")
    left.tick_params(axis="x", rotation=30)
    left.legend(loc="lower right")
    right.hist(report["p_human_chosen"], bins=20, range=(0, 1), color="#55a868")
    right.axvline(0.5, color="grey", linestyle=":")
    right.set_xlabel("judge P(human-chosen is better)")
    right.set_ylabel("pairs")
    bias = report["position_bias_rate"]
    fig.suptitle(f"{report['judge'][:60]}  |  position bias {'-' if bias is None else f'{bias:.2f}'}  |  "
                 f"unparseable {report['unparseable_rate']:.2f}", fontsize=9)
    fig.tight_layout()
    save_png(fig, path, "--out", dpi=110)
    plt.close(fig)


def audit_command(config: str, overrides: list[str], *, data: str, limit: int | None, root, run: str | None,
                  out: str, json_out: str | None) -> dict:
    """The CLI entry: the judge of a label config (its `judge:` section, precision and run's artifacts)."""
    import os

    from alignment.artifacts import ArtifactStore
    from alignment.judge_local import judge_upstream
    from alignment.runner import load_stage_config, resolve_inputs

    # Options first: a refusal should come before minutes of judging, and before anything is written.
    if limit is not None and limit < 1:
        raise ConfigError([f"--limit {limit}: expected a number of pairs >= 1 (leave it out to judge them all)"])
    check_plot(out, "--out", inputs=(data, config))
    if json_out:
        check_output(json_out, "--json", inputs=(data, config), suffixes=(".json",), force_flag=None)
    cfg = load_stage_config("label", config, overrides)
    run = run or os.environ.get("ALIGN_RUN") or cfg.run
    inputs = resolve_inputs(ArtifactStore(root), run, "judge audit", cfg, judge_upstream(cfg.judge))
    report = run_audit(cfg.judge, inputs, data, precision=cfg.precision, limit=limit)
    print_table(report)
    plot(report, Path(out))
    log.info("[audit] plot written to %s", out)
    if json_out:
        write_text(Path(json_out), "--json", json.dumps(report, indent=2))
    return report
