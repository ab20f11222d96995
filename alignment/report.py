"""Reports: the eval stage's `report.html` + `plots/*.png`, and `align report RUN` (one page per pipeline run).

Both pages are self-contained: plots are PNGs inlined as base64 data URIs and the CSS is inline, so a page
can be mailed, attached to a ticket or opened from an artifact store without its folder. Plots are drawn
with matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import base64
import html
import json
import time
from pathlib import Path

from alignment.tracking import flatten, read_jsonl

REWARD_KEYS = ("objective/scores", "eval/reward", "rewards/margins", "rewards/chosen", "rewards/rejected")
KL_KEYS = ("ppo/kl", "objective/kl", "kl")
CURVE_KEYS = ("loss", "train/loss", "eval_loss", "rewards/margins", "rewards/accuracies", "accuracy",
              "objective/scores", "ppo/kl", "eval/reward", "objective/rlhf_reward")
COLORS = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860"]

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1100px;
color:#222;padding:0 16px}h1{font-size:1.6em;margin-bottom:4px}h2{margin-top:28px;border-bottom:1px solid #ddd;
padding-bottom:4px}.sub{color:#666}table{border-collapse:collapse;margin:8px 0;font-size:0.92em}
td,th{border:1px solid #ddd;padding:4px 8px;text-align:right;vertical-align:top}th{background:#f4f4f4}
td.l,th.l{text-align:left}.grid{display:flex;flex-wrap:wrap;gap:12px}.grid figure{margin:0;flex:1 1 480px}
.grid figure.wide{flex-basis:100%}figure img{max-width:100%;border:1px solid #eee}figcaption{color:#666;font-size:0.85em}
.resp{white-space:pre-wrap;text-align:left;max-width:330px;font-size:0.9em}.ok{color:#2a7a2a}.bad{color:#b03030}
code{background:#f4f4f4;padding:1px 4px;border-radius:3px}.kv td{text-align:left}
"""


# -- plotting helpers ------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for i, r in enumerate(rows):
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            xs.append(r.get("step", i))
            ys.append(v)
    return xs, ys


def plot_training_curves(histories: dict[str, Path], path: Path, final_kl: dict[str, float] | None = None) -> Path | None:
    """Reward (left) and KL (right) over training steps of each policy, from `<artifact>/log_history.jsonl`."""
    data = {name: read_jsonl(p) for name, p in histories.items()}
    data = {k: v for k, v in data.items() if v}
    if not data:
        return None
    plt = _plt()
    fig, (ax_r, ax_k) = plt.subplots(1, 2, figsize=(10, 3.6))
    any_kl = False
    for ci, (name, rows) in enumerate(data.items()):
        color = COLORS[ci % len(COLORS)]
        styles = iter(["-", "--", ":", "-."])
        for key in REWARD_KEYS:
            xs, ys = _series(rows, key)
            if xs:
                ax_r.plot(xs, ys, next(styles, "-"), color=color, label=f"{name}: {key}")
        for key in KL_KEYS:
            xs, ys = _series(rows, key)
            if xs:
                ax_k.plot(xs, ys, color=color, label=f"{name}: {key}")
                any_kl = True
                break
        else:
            if final_kl and name in final_kl:
                last = max((r.get("step", 0) for r in rows), default=0)
                ax_k.scatter([last], [final_kl[name]], color=color, marker="o",
                             label=f"{name}: KL to baseline (eval, sampled)")
                any_kl = True
    ax_r.set_title("reward during training")
    ax_r.set_xlabel("step")
    ax_r.legend(fontsize=7)
    ax_k.set_title("KL(policy || reference) during training")
    ax_k.set_xlabel("step")
    if any_kl:
        ax_k.legend(fontsize=7)
    else:
        ax_k.text(0.5, 0.5, "no KL logged", ha="center", va="center", transform=ax_k.transAxes, color="#888")
    return _save(fig, path)


def plot_reward_distributions(rewards: dict[str, list[float]], baseline: str, path: Path) -> Path | None:
    """Histogram of reward-model scores of each model's responses: the baseline (before) vs each policy (after)."""
    if not rewards:
        return None
    lo = min(min(v) for v in rewards.values())
    hi = max(max(v) for v in rewards.values())
    bins = [lo + (hi - lo) * i / 20 for i in range(21)] if hi > lo else 10
    labelled = {(f"{name} (baseline)" if name == baseline else name): vals for name, vals in rewards.items()}
    return _histograms(labelled, bins, "{:.3f}", "reward-model score of responses", "reward", path)


def plot_win_rates(models: dict, policies: list[str], baseline: str, path: Path) -> Path | None:
    """Stacked win / tie / loss bars per policy against the baseline, with the win rate and its 95% CI."""
    names = [p for p in policies if "judge" in models.get(p, {})]
    if not names:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 1.7 + 0.6 * len(names)))
    for i, name in enumerate(names):
        j = models[name]["judge"]
        n = j["n"]
        w, t, lo = j["wins"] / n, j["ties"] / n, j["losses"] / n
        ax.barh(i, w, color="#55A868", label="win" if i == 0 else None)
        ax.barh(i, t, left=w, color="#BBBBBB", label="tie" if i == 0 else None)
        ax.barh(i, lo, left=w + t, color="#C44E52", label="loss" if i == 0 else None)
        ci = j["win_rate_ci"]
        err = [[max(0.0, j["win_rate"] - ci[0])], [max(0.0, ci[1] - j["win_rate"])]]
        ax.errorbar([j["win_rate"]], [i], xerr=err, fmt="D",
                    color="black", capsize=4, label="win rate (95% CI)" if i == 0 else None)
    ax.axvline(0.5, color="#444", lw=0.8, ls="--")
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names)
    ax.invert_yaxis()  # first policy on top, as in the table
    ax.set_xlim(0, 1)
    ax.set_title(f"judge: policy vs {baseline} (both orders, ties count half)")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=4, frameon=False)
    return _save(fig, path)


def plot_gold_by_split(splits: dict, path: Path) -> Path | None:
    """Gold pass rate of each model on each prompt set (in-distribution, held-out phrasings, held-out kinds),
    bars with their bootstrap 95% CIs."""
    names = list(dict.fromkeys(n for s in splits.values() for n in s["models"]))
    sets = [s for s, v in splits.items() if v["models"]]
    if not sets:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6.4, 2.4 * len(sets)), 3.6))
    width = 0.8 / max(len(names), 1)
    for ci, name in enumerate(names):
        xs, ys, err = [], [], [[], []]
        for i, s in enumerate(sets):
            m = splits[s]["models"].get(name)
            if m is None:
                continue
            xs.append(i - 0.4 + width * (ci + 0.5))
            ys.append(m["pass_rate"])
            err[0].append(max(0.0, m["pass_rate"] - m["pass_rate_ci"][0]))
            err[1].append(max(0.0, m["pass_rate_ci"][1] - m["pass_rate"]))
        ax.bar(xs, ys, width, yerr=err, capsize=3, color=COLORS[ci % len(COLORS)], label=name)
    ax.set_xticks(range(len(sets)))
    ax.set_xticklabels([f"{s}\n({splits[s]['prompts']} prompts)" for s in sets], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("gold pass rate")
    ax.set_title("gold pass rate per prompt set (95% bootstrap CI)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_lengths(lengths: dict[str, list[int]], path: Path) -> Path | None:
    if not lengths:
        return None
    hi = max(max(v) for v in lengths.values() if v) or 1
    bins = list(range(0, hi + max(1, hi // 20) + 1, max(1, hi // 20)))
    return _histograms(lengths, bins, "{:.1f}", "response length", "generated tokens", path)


def _histograms(series: dict[str, list], bins, mean_fmt: str, title: str, xlabel: str, path: Path) -> Path:
    """Overlaid histograms, one per model, each labelled with its mean."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for ci, (name, vals) in enumerate(series.items()):
        ax.hist(vals, bins=bins, alpha=0.5, color=COLORS[ci % len(COLORS)],
                label=f"{name}: mean {mean_fmt.format(sum(vals) / len(vals))}")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("responses")
    ax.legend(fontsize=8)
    return _save(fig, path)


# -- html helpers ----------------------------------------------------------------------------------


def _e(x) -> str:
    return html.escape(str(x))


def _num(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return _e(v)


def _figure(path: Path | None, caption: str, wide: bool = False) -> str:
    if path is None or not Path(path).is_file():
        return ""
    cls = " class='wide'" if wide else ""
    return (f'<figure{cls}><img src="{data_uri(path)}" alt="{_e(caption)}">'
            f'<figcaption>{_e(caption)}</figcaption></figure>')


def _page(title: str, body: str) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(title)}</title>"
            f"<style>{CSS}</style></head><body>{body}<p class='sub'>generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')}"
            "</p></body></html>")


def _ci(c) -> str:
    return f" [{c[0]:.2f}, {c[1]:.2f}]" if c else ""


def _model_table(models: dict, names: list[str], baseline: str) -> str:
    head = ("<tr><th class='l'>model</th><th>win rate vs baseline [95% CI]</th><th>W / T / L</th><th>soft win</th>"
            "<th>position disagreement</th><th>reward mean ± std</th><th>reward gain</th><th>KL / response</th>"
            "<th>KL / token</th><th>gold pass [95% CI]</th><th>length mean / median</th><th>missing EOS</th></tr>")
    rows = []
    for n in names:
        m = models[n]
        j, r, k, g = m.get("judge"), m.get("reward"), m.get("kl"), m.get("gold")
        gain = m.get("reward_gain")
        wtl = f"{j['wins']} / {j['ties']} / {j['losses']}" if j else "–"
        rows.append(
            f"<tr><td class='l'><b>{_e(n)}</b>{' (baseline)' if n == baseline else ''}</td>"
            f"<td>{_num(j['win_rate']) + _ci(j['win_rate_ci']) if j else '–'}</td>"
            f"<td>{wtl}</td>"
            f"<td>{_num(j['soft_win_rate']) if j else '–'}</td>"
            f"<td>{_num(j.get('position_disagreement')) if j else '–'}</td>"
            f"<td>{_num(r['mean']) + ' ± ' + _num(r['std']) if r else '–'}</td>"
            f"<td>{_num(gain['mean']) + _ci(gain['mean_ci']) if gain else '–'}</td>"
            f"<td>{_num(k['kl_seq'], 4) if k else '–'}</td><td>{_num(k['kl_per_token'], 4) if k else '–'}</td>"
            f"<td>{_num(g['pass_rate']) + _ci(g['pass_rate_ci']) if g else '–'}</td>"
            f"<td>{_num(m['length_tokens']['mean'], 1)} / {_num(m['length_tokens']['median'], 1)}</td>"
            f"<td>{_num(m['missing_eos_rate'])}</td></tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _rate_cell(m: dict | None, digits: int) -> str:
    """A pass rate with its CI and the number of prompts scored, or a dash."""
    return f"<td>{_num(m['pass_rate'], digits) + _ci(m['pass_rate_ci'])} ({m['n']})</td>" if m else "<td>–</td>"


def _splits_table(splits: dict) -> str:
    """Models x prompt sets: gold pass rate [95% CI] (n)."""
    sets = [s for s, v in splits.items() if v["models"]]
    if not sets:
        return ""
    names = list(dict.fromkeys(n for s in sets for n in splits[s]["models"]))
    head = "<tr><th class='l'>model</th>" + "".join(
        f"<th>{_e(s)}<br><small><code>{_e(splits[s]['source'])}</code></small></th>" for s in sets) + "</tr>"
    rows = []
    for n in names:
        cells = []
        for s in sets:
            m = splits[s]["models"].get(n)
            cells.append(_rate_cell(m, 3))
        rows.append(f"<tr><td class='l'><b>{_e(n)}</b></td>{''.join(cells)}</tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _kinds_table(split: dict) -> str:
    """One prompt set's pass rate per constraint kind (the row's category) and model."""
    names = list(split["models"])
    kinds = sorted({k for m in split["models"].values() for k in m.get("by_kind", {})})
    if not kinds:
        return ""
    head = "<tr><th class='l'>kind</th>" + "".join(f"<th>{_e(n)}</th>" for n in names) + "</tr>"
    rows = []
    for k in kinds:
        cells = []
        for n in names:
            m = split["models"][n].get("by_kind", {}).get(k)
            cells.append(_rate_cell(m, 2))
        rows.append(f"<tr><td class='l'>{_e(k)}</td>{''.join(cells)}</tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _forgetting_table(f: dict) -> str:
    """Per model: perplexity on general text (and its ratio to the reference), held-out-kind gold (and change)."""
    names = list(dict.fromkeys([*f.get("ppl", {}), *f.get("heldout_kinds_gold", {})]))
    if not names:
        return ""
    head = ("<tr><th class='l'>model</th><th>perplexity</th><th>ratio to reference</th>"
            f"<th>gold on {_e(f.get('heldout_set', 'held-out kinds'))}</th><th>change from reference</th></tr>")
    rows = []
    for n in names:
        ref = " (reference)" if n == f.get("reference") else ""
        rows.append(f"<tr><td class='l'><b>{_e(n)}</b>{ref}</td><td>{_num(f.get('ppl', {}).get(n), 2)}</td>"
                    f"<td>{_num(f.get('ppl_ratio', {}).get(n))}</td>"
                    f"<td>{_num(f.get('heldout_kinds_gold', {}).get(n))}</td>"
                    f"<td>{_num(f.get('heldout_kinds_gold_change', {}).get(n))}</td></tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _samples_table(samples: list[dict], names: list[str], shown: int) -> str:
    by_id: dict = {}
    for s in samples:
        by_id.setdefault(str(s["id"]), {"prompt": s["prompt"]})[s["policy"]] = s
    head = "<tr><th class='l'>prompt</th>" + "".join(f"<th class='l'>{_e(n)}</th>" for n in names) + "</tr>"
    rows = []
    for _, item in list(by_id.items())[:shown]:
        cells = []
        for n in names:
            s = item.get(n, {})
            tags = []
            if "reward" in s:
                tags.append(f"reward {s['reward']:.2f}")
            if "gold" in s:
                ok = s["gold"] >= 1
                tags.append(f"<span class='{'ok' if ok else 'bad'}'>gold {'pass' if ok else 'fail'}</span>")
            if "p_beats_baseline" in s:
                tags.append(f"P(beats baseline) {s['p_beats_baseline']:.2f}")
            cells.append(f"<td class='resp'>{_e(s.get('response', ''))}<br><small>{' · '.join(tags)}</small></td>")
        rows.append(f"<tr><td class='resp'>{_e(item['prompt'])}</td>{''.join(cells)}</tr>")
    return f"<table>{head}{''.join(rows)}</table>"


# -- the eval stage's report -----------------------------------------------------------------------


def _splits_section(metrics: dict) -> str:
    """Gold per prompt set, per kind within each set, and forgetting (empty when the run measured none)."""
    splits, f = metrics.get("splits") or {}, metrics.get("forgetting")
    out = ""
    if any(v["models"] for v in splits.values()):
        out += ("<h2>Gold pass rate by split</h2><p class='sub'>Every constraint of the prompt met; bootstrap 95% "
                "CI over prompts; (n) prompts scored.</p>" + _splits_table(splits))
        for s, v in splits.items():
            table = _kinds_table(v)
            if table:
                out += f"<h3>{_e(s)}: by kind</h3>{table}"
    if f:
        out += (f"<h2>Forgetting</h2><p class='sub'>Perplexity on <code>{_e(f.get('text'))}</code> "
                f"({f.get('tokens', 0)} tokens) and gold on kinds no stage trained on, against "
                f"<b>{_e(f.get('reference'))}</b>.</p>" + _forgetting_table(f))
    return out



def write_eval_report(out_dir: Path, *, metrics: dict, samples: list[dict], histories: dict[str, Path],
                      rewards: dict[str, list[float]], lengths: dict[str, list[int]], inputs: dict[str, str],
                      baseline: str, policies: list[str], run: str, shown: int = 12) -> Path:
    """Write `plots/*.png` and a self-contained `report.html` into out_dir; returns the report's path."""
    out_dir = Path(out_dir)
    plots = out_dir / "plots"
    models = metrics["models"]
    final_kl = {n: models[n]["kl"]["kl_seq"] for n in policies if "kl" in models.get(n, {})}
    figs = [
        (plot_win_rates(models, policies, baseline, plots / "win_rate.png"),
         f"Judge win rate of each policy against {baseline}: wins, ties and losses, both presentation orders", True),
        (plot_reward_distributions(rewards, baseline, plots / "reward_distribution.png"),
         f"Reward-model scores before ({baseline}) and after ({', '.join(policies)})", False),
        (plot_lengths(lengths, plots / "length_distribution.png"), "Response length (generated tokens)", False),
        (plot_gold_by_split(metrics.get("splits") or {}, plots / "gold_by_split.png"),
         "Gold pass rate per prompt set: in-distribution, held-out phrasings, held-out kinds", False),
        (plot_training_curves(histories, plots / "training_curves.png", final_kl),
         "Reward and KL over training (each policy's log_history.jsonl)", True),
    ]
    names = [baseline, *policies]
    lineage = "".join(f"<tr><td class='l'>{_e(k)}</td><td class='l'><code>{_e(v)}</code></td></tr>"
                      for k, v in inputs.items())
    head = ", ".join(f"{k} <b>{_num(metrics[k])}</b>" for k in ("win_rate", "mean_reward", "kl", "gold_pass_rate")
                     if metrics.get(k) is not None)
    body = (
        f"<h1>Evaluation of run <code>{_e(run)}</code></h1>"
        f"<p class='sub'>{_e(', '.join(policies))} vs baseline {_e(baseline)} on {metrics['prompts']} prompts from "
        f"<code>{_e(metrics['prompts_source'])}</code>; judge <code>{_e(metrics.get('judge') or 'none')}</code></p>"
        f"<p>{_e(metrics['policy'])}: {head}</p>"
        f"<h2>Summary</h2>{_model_table(models, names, baseline)}"
        f"{_splits_section(metrics)}"
        f"<h2>Plots</h2><div class='grid'>{''.join(_figure(p, c, w) for p, c, w in figs)}</div>"
        f"<h2>Samples</h2>{_samples_table(samples, names, shown)}"
        f"<h2>Inputs</h2><table class='kv'>{lineage}</table>"
    )
    path = out_dir / "report.html"
    path.write_text(_page(f"eval {run}", body), encoding="utf-8")
    return path


# -- `align report RUN`: every stage of a run on one page ---------------------------------------------


def plot_lineage(stages: dict[str, dict], path: Path) -> Path:
    """Boxes for the run's stages, placed by depth, arrows from each input to the stage that read it."""
    plt = _plt()
    depth: dict[str, int] = {}

    def d(s, seen=()):
        if s not in depth:
            ins = [i for i in stages[s].get("inputs", {}) if i in stages and i not in seen]
            depth[s] = 1 + max((d(i, seen + (s,)) for i in ins), default=-1)
        return depth[s]

    for s in stages:
        d(s)
    cols: dict[int, list[str]] = {}
    for s in stages:
        cols.setdefault(depth[s], []).append(s)
    pos = {s: (x, -i + (len(col) - 1) / 2) for x, col in cols.items() for i, s in enumerate(col)}
    fig, ax = plt.subplots(figsize=(1.9 * (len(cols) + 0.5), 1.1 + 0.8 * max(len(c) for c in cols.values())))
    for s, m in stages.items():
        for i in m.get("inputs", {}):
            if i in pos:
                # Edges that skip a column bend, so they do not run through the boxes in between.
                rad = 0.25 if pos[s][0] - pos[i][0] > 1 else 0.0
                ax.annotate("", xy=pos[s], xytext=pos[i],
                            arrowprops=dict(arrowstyle="-|>", color="#666", shrinkA=22, shrinkB=22,
                                            connectionstyle=f"arc3,rad={rad}"))
    for s, (x, y) in pos.items():
        ok = stages[s].get("status") == "complete"
        ax.text(x, y, s, ha="center", va="center", fontsize=11,
                bbox=dict(boxstyle="round,pad=0.4", fc="#E8F0FA" if ok else "#FBE3E3", ec="#4C72B0" if ok else "#C44E52"))
    ax.set_xlim(-0.6, max(cols) + 0.6)
    ys = [y for _, y in pos.values()]
    ax.set_ylim(min(ys) - 0.6, max(ys) + 0.6)
    ax.axis("off")
    return _save(fig, path)


def plot_stage_curves(stage: str, rows: list[dict], path: Path) -> Path | None:
    keys = [k for k in CURVE_KEYS if _series(rows, k)[0]]
    if not keys:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        xs, ys = _series(rows, key)
        ax.plot(xs, ys, marker="." if len(xs) < 30 else None, color=COLORS[0])
        ax.set_title(f"{stage}: {key}", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    return _save(fig, path)


def key_figures(stage: str, metrics: dict, limit: int = 14) -> list[tuple[str, object]]:
    """The numbers worth a glance: headline metrics first, then other top-level scalars. An eval's, per policy
    against its baseline (its top-level figures are the first policy's alone), as `align status` shows them."""
    if stage == "eval" and metrics.get("models"):
        from alignment.status import eval_figures

        return [tuple(line.rstrip(";").split(": ", 1)) for line in eval_figures(metrics)][:limit]
    flat = flatten(metrics)
    first = ["win_rate", "mean_reward", "kl", "gold_pass_rate", "eval_loss", "eval_loss_before", "perplexity",
             "eval_accuracy", "eval_accuracy_before", "heldout_phrasings_accuracy", "eval_mean_margin", "eval_ece", "eval_length_corr",
             "gate_passed", "eval/rewards/accuracies", "eval/rewards/margins", "eval/kl_seq", "train_loss",
             "steps", "train_seconds", "tokens_per_s", "trainable_params", "parameters", "peak_rss_mb"]
    out = [(k, flat[k]) for k in first if k in flat]
    out += [(k, v) for k, v in flat.items() if "/" not in k and k not in dict(out) and not isinstance(v, str)]
    return out[:limit]


def build_run_report(root: Path, run: str, out: Path | None = None) -> Path:
    """One page for a whole run: lineage graph, then every stage's status, inputs, key figures and curves."""
    from alignment.artifacts import ArtifactStore
    from alignment.errors import AlignError
    from alignment.outputs import check_output, write_text

    store = ArtifactStore(root)
    run_dir = store.run_dir(run)
    stages = _published_stages(store, run)
    if not stages:
        raise AlignError(f"run '{run}' has no published stage under {store.root} "
                         f"(expected {run_dir}/<stage>/manifest.json)")
    # Never into a published artifact or over a file of another kind; a re-run replaces its own page.
    out = check_output(out or run_dir / "report.html", "--out", suffixes=(".html",), force_flag=None)
    plots = out.parent / f".{out.stem}_plots"
    parts = [f"<h1>Run <code>{_e(run)}</code></h1><p class='sub'>{_e(run_dir.resolve())}</p>",
             "<h2>Lineage</h2>", _figure(plot_lineage(stages, plots / "lineage.png"),
                                         "Each arrow: an artifact read by the next stage (manifest inputs)"),
             _summary_table(stages, run_dir)]
    parts += [_stage_section(s, m, run_dir, plots) for s, m in stages.items()]
    write_text(out, "--out", _page(f"run {run}", "".join(parts)))
    # The page is self-contained; the PNGs drawn for it were only intermediates.
    for p in plots.glob("*.png"):
        p.unlink()
    if plots.is_dir() and not any(plots.iterdir()):
        plots.rmdir()
    return out


def _published_stages(store, run: str) -> dict[str, dict]:
    """Each published stage's manifest (as a dict). A stage that does not verify (the
    check `align status` makes: sizes, and hashes through the cache) is `broken`, with its first problem, and
    nothing of it but its manifest is read; a stage folder resolving outside the root is refused."""
    from alignment.artifacts import first_problem
    from alignment.manifest import MANIFEST
    from alignment.runner import STAGES

    stages = {}
    for s in STAGES:
        folder = store.stage_dir(run, s)
        if not (folder / MANIFEST).is_file():
            continue
        manifest, _, problems = store.check_published(folder)
        stages[s] = manifest.model_dump(mode="json") if manifest else {"config_hash": "", "metrics": {}}
        if problems:
            stages[s].update(status="broken", problem=first_problem(problems))
    return stages


def _summary_table(stages: dict[str, dict], run_dir: Path) -> str:
    from alignment.manifest import Manifest
    from alignment.status import changed_inputs

    summary = ["<tr><th class='l'>stage</th><th class='l'>status</th><th class='l'>parent</th>"
               "<th class='l'>finished</th><th class='l'>config</th><th class='l'>base model</th>"
               "<th class='l'>inputs</th></tr>"]
    for s, m in stages.items():
        parent = (m.get("lineage") or {}).get("parent_stage") or ", ".join(m.get("inputs", {})) or "–"
        bm = (m.get("base_model") or {}).get("name", "–")
        # An input re-run since this stage read it: the stage was built on an older version (re-run it to refresh).
        ok = m.get("inputs") and "problem" not in m  # a broken stage's manifest may not even parse
        stale = changed_inputs(Manifest.model_validate(m), run_dir / s) if ok else []
        fresh = (f"<span class='bad'>stale: {_e(', '.join(stale))} changed since</span>" if stale
                 else "<span class='ok'>up to date</span>" if m.get("inputs") else "–")
        status = f"<span class='bad'>broken: {_e(m['problem'])}</span>" if "problem" in m else _e(m["status"])
        summary.append(f"<tr><td class='l'><b>{_e(s)}</b></td><td class='l'>{status}</td>"
                       f"<td class='l'>{_e(parent)}</td><td class='l'>{_e(m.get('finished_at', ''))}</td>"
                       f"<td class='l'><code>{_e(m['config_hash'][:12])}</code></td><td class='l'>{_e(bm)}</td>"
                       f"<td class='l'>{fresh}</td></tr>")
    return f"<table>{''.join(summary)}</table>"


def _stage_section(s: str, m: dict, run_dir: Path, plots: Path) -> str:
    """A stage's inputs, key figures and training curves (the eval stage's plots too); a broken stage's problem."""
    if "problem" in m:
        return f"<h2>{_e(s)}</h2><p class='bad'>broken: {_e(m['problem'])}</p>"
    figs = "".join(f"<tr><td class='l'>{_e(k)}</td><td>{_num(v, 4)}</td></tr>" for k, v in key_figures(s, m["metrics"]))
    ins = ", ".join(f"{k} <code>{_e(v['manifest_sha256'][:12])}</code>" for k, v in m.get("inputs", {}).items())
    rows = read_jsonl(run_dir / s / "log_history.jsonl")
    parts = [f"<h2>{_e(s)}</h2><p class='sub'>inputs: {ins or 'none'}; "
             f"{len(m.get('outputs', []))} output files; git {_e((m.get('git_commit') or '–')[:12])}</p>"
             f"<div class='grid'><table class='kv'>{figs}</table>",
             _figure(plot_stage_curves(s, rows, plots / f"{s}_curves.png"), f"{s}: training curves"), "</div>"]
    if s == "eval":
        evald = run_dir / s / "plots"
        parts.append("<div class='grid'>" + "".join(_figure(p, p.stem.replace('_', ' '))
                                                    for p in sorted(evald.glob("*.png"))) + "</div>")
        parts.append(f"<p>Full evaluation report: <code>{_e(run_dir / s / 'report.html')}</code></p>")
    return "".join(parts)
