"""Mixture study (OPT-IML, Iyer et al. 2022, section 4): do more trained task categories and the mixing rates
change how well an instruction-tuned model does on categories it never trained on?

    OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python bench/mixtures.py --profile tiny
    OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python bench/mixtures.py --profile smollm2

Held-out kinds: the rows of `data/instruct/eval_heldout_kinds.jsonl` when that file exists (constraint kinds
the training file never has), else the `--heldout` categories of the bundled data, which then never train.
Two sweeps, every run with the same budget (steps x batch examples, the same seed):
- kinds: train on the first k trained kinds (k = 1 .. all), uniform rates;
- rates: all trained kinds in two groups (word-count / keyword kinds vs layout kinds), group weights 1:4 .. 4:1.
Each run is the real `align run sft` (subprocess, LoRA); then its policy answers the held-out-kind prompts
(greedy, through `alignment.generation.generate`) and `alignment.gold` scores them. Also recorded: the SFT
stage's own eval loss on the held-out rows (`eval_loss_by_heldout_category` / `eval_loss_by_source`).
The base model (no SFT) is the k = 0 point. Writes bench/out/mixtures_<profile>.json and
docs/img/mixtures_<profile>.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "ALIGN_TRACKING": "none"}
TRAIN, EVAL, HELDOUT_FILE = "data/instruct/train.jsonl", "data/instruct/eval.jsonl", "data/instruct/eval_heldout_kinds.jsonl"
LENGTH_KINDS = ("max_words", "min_words", "keyword")  # the "content" group of the rates sweep; the rest: layout
PROFILES = {
    "tiny": {"config": "configs/tiny/sft.yaml", "steps": 8, "batch": 8, "lr": 1e-3, "prompts": 20, "new_tokens": 16},
    "smollm2": {"config": "configs/smollm2/sft.yaml", "steps": 24, "batch": 8, "lr": 3e-4, "prompts": 48,
                "new_tokens": 96},
}


def categories(path: str) -> list[str]:
    seen: dict[str, None] = {}
    with open(REPO / path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                seen.setdefault(str(json.loads(line).get("category")), None)
    return list(seen)


def round_robin(prompts: list[dict], n: int) -> list[dict]:
    """The first n prompts taking one of each category in turn (the file may be sorted by kind)."""
    by: dict[str, list[dict]] = {}
    for p in prompts:
        by.setdefault(str(p.get("category")), []).append(p)
    out, i = [], 0
    while len(out) < min(n, len(prompts)):
        for rows in by.values():
            if i < len(rows) and len(out) < n:
                out.append(rows[i])
        i += 1
    return out


def sft_config(prof: dict, sources: list[dict], held_cats: list[str], out: Path) -> Path:
    """The profile's SFT config with `data` replaced by this mixture (written next to the results)."""
    cfg = yaml.safe_load((REPO / prof["config"]).read_text())
    cfg["data"] = {"sources": sources, "held_out_categories": held_cats,
                   "max_train_examples": prof["steps"] * prof["batch"], "max_eval_examples": 32}
    cfg["train"].update(max_steps=prof["steps"], batch_size=prof["batch"], lr=prof["lr"], save_steps=10**6,
                        logging_steps=max(1, prof["steps"] // 4))
    cfg["train"].pop("epochs", None)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


def run_sft(cfg: Path, root: Path, run: str, base: Path) -> Path:
    argv = [sys.executable, "-m", "alignment.cli", "run", "sft", "-c", str(cfg), "--artifacts", str(root),
            "--run", run, "--force", f"inputs.base={base}"]
    res = subprocess.run(argv, cwd=REPO, env=ENV, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{res.stderr[-3000:]}")
    return root / run / "sft"


def gold_rate(model, tok, prompts: list[dict], prof: dict) -> dict:
    """Fraction of held-out prompts whose greedy answer meets every constraint, with a 95% Wilson interval."""
    from alignment import gold
    from alignment.generation import GenerationSpec, generate

    spec = GenerationSpec(max_new_tokens=prof["new_tokens"], batch_size=16)
    texts = generate(model, tok, [p["prompt"] for p in prompts], spec, greedy=True).texts
    ok = [gold.passes(t, p["constraints"]) for t, p in zip(texts, prompts)]
    # The held-out kind's own constraint (a row may also carry trained kinds): the cleanest transfer measure.
    own = [gold.passes(t, [c for c in p["constraints"] if c["type"] == p.get("category")] or p["constraints"])
           for t, p in zip(texts, prompts)]
    n, k = len(ok), sum(ok)
    p, z = k / n, 1.96
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    return {"gold_pass": round(p, 4), "ci95": [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)],
            "n": n, "partial": round(sum(gold.score(t, p_["constraints"]) for t, p_ in zip(texts, prompts)) / n, 4),
            "kind_pass": round(sum(own) / n, 4)}


def evaluate(art_or_base: Path, prompts: list[dict], prof: dict, precision: str) -> dict:
    from alignment.artifacts import ArtifactStore
    from alignment.models import load_tokenizer
    from alignment.policy import load_policy

    art = ArtifactStore(art_or_base.parent.parent).read(art_or_base)
    model = load_policy(art, precision).eval()
    out = gold_rate(model, load_tokenizer(art.model_dir), prompts, prof)
    del model
    return out


def held_out_loss(art: Path) -> float | None:
    m = json.loads((art / "metrics.json").read_text())
    vals = list((m.get("eval_loss_by_heldout_category") or {}).values()) or \
        [v for k, v in (m.get("eval_loss_by_source") or {}).items() if k == "heldout-kinds"]
    return round(sum(vals) / len(vals), 4) if vals else None


def sweep_plan(sweeps: str, ks: str | None, trained: list[str]) -> list[tuple]:
    """(sweep, x, label, mixture sources) per SFT run: the kinds sweep (the first k trained kinds) and the rates
    sweep (content against layout kinds at 1:4, 1:1, 4:1)."""
    plan = []
    if "kinds" in sweeps:
        for k in ([int(x) for x in ks.split(",")] if ks else range(1, len(trained) + 1)):
            plan.append(("kinds", k, f"k{k}", [{"name": c, "train": TRAIN, "eval": EVAL, "categories": [c],
                                                "weight": 1} for c in trained[:k]]))
    if "rates" in sweeps:
        content = [c for c in trained if c in LENGTH_KINDS] or trained[: len(trained) // 2]
        layout = [c for c in trained if c not in content]
        for wc, wl in ((1, 4), (1, 1), (4, 1)):
            plan.append(("rates", round(wc / (wc + wl), 2), f"rate{wc}to{wl}",
                         [{"name": "content", "train": TRAIN, "eval": EVAL, "categories": content, "weight": wc},
                          {"name": "layout", "train": TRAIN, "eval": EVAL, "categories": layout, "weight": wl}]))
    return plan


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", choices=list(PROFILES), default="tiny")
    p.add_argument("--heldout", default="end_with,lowercase", help="held-out categories when there is no "
                                                                   f"{HELDOUT_FILE}")
    p.add_argument("--sweeps", default="kinds,rates")
    p.add_argument("--ks", help="comma-separated k of the kinds sweep (default: 1 .. all trained kinds)")
    p.add_argument("--steps", type=int, help="override the profile's optimiser steps (the same for every run)")
    p.add_argument("--artifacts", default=str(REPO / "bench" / "out" / "mixtures"))
    p.add_argument("--plot-only", action="store_true", help="redraw the plot from bench/out/mixtures_<profile>.json")
    a = p.parse_args()
    if a.plot_only:
        plot(json.loads((REPO / "bench" / "out" / f"mixtures_{a.profile}.json").read_text()),
             REPO / "docs" / "img" / f"mixtures_{a.profile}.png")
        return 0
    prof, root = dict(PROFILES[a.profile]), Path(a.artifacts)
    if a.steps:
        prof["steps"] = a.steps
    from alignment.prompts import load_prompts

    if (REPO / HELDOUT_FILE).is_file():
        held_cats, held_src = [], [{"name": "heldout-kinds", "eval": HELDOUT_FILE, "held_out": True}]
        prompts = round_robin(load_prompts(str(REPO / HELDOUT_FILE)), prof["prompts"])
        trained = categories(TRAIN)
    else:
        held_cats, held_src = a.heldout.split(","), []
        prompts = [x for x in load_prompts(str(REPO / EVAL)) if x.get("category") in held_cats][:prof["prompts"]]
        trained = [c for c in categories(TRAIN) if c not in held_cats]
    base_run = f"{a.profile}-base"
    res = subprocess.run([sys.executable, "-m", "alignment.cli", "run", "base", "-c", f"configs/{a.profile}/base.yaml",
                          "--artifacts", str(root), "--run", base_run], cwd=REPO, env=ENV, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(res.stderr[-3000:])
    base = root / base_run / "base"
    precision = yaml.safe_load((REPO / prof["config"]).read_text()).get("precision", "auto")
    results = {"profile": a.profile, "held_out": held_cats or [HELDOUT_FILE], "trained_kinds": trained,
               "prompts": len(prompts), "budget": f"{prof['steps']} steps x {prof['batch']} examples",
               "date": time.strftime("%Y-%m-%d"), "runs": []}
    results["runs"].append({"sweep": "kinds", "k": 0, "label": "base", **evaluate(base, prompts, prof, precision)})
    print("base", results["runs"][-1], flush=True)
    plan = sweep_plan(a.sweeps, a.ks, trained)
    for sweep, x, label, sources in plan:
        cfg = sft_config(prof, sources + held_src, held_cats, root / "configs" / f"{a.profile}-{label}.yaml")
        t0 = time.perf_counter()
        art = run_sft(cfg, root, f"{a.profile}-{label}", base)
        row = {"sweep": sweep, "k" if sweep == "kinds" else "content_share": x, "label": label,
               "held_out_eval_loss": held_out_loss(art), **evaluate(art, prompts, prof, precision),
               "seconds": round(time.perf_counter() - t0, 1)}
        results["runs"].append(row)
        print(label, row, flush=True)
        save(results, a.profile)
    plot(results, REPO / "docs" / "img" / f"mixtures_{a.profile}.png")
    return 0


def save(results: dict, profile: str) -> None:
    out = REPO / "bench" / "out" / f"mixtures_{profile}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, sweep, key, xlabel in ((axes[0], "kinds", "k", "trained constraint kinds (0: base model)"),
                                   (axes[1], "rates", "content_share", "share of word-count/keyword kinds")):
        runs = [r for r in results["runs"] if r["sweep"] == sweep]
        if not runs:
            ax.text(0.5, 0.5, "not run (pending)", ha="center", va="center", transform=ax.transAxes)
            continue
        xs = [r[key] for r in runs]
        ys = [r["gold_pass"] for r in runs]
        err = [[y - r["ci95"][0] for y, r in zip(ys, runs)], [r["ci95"][1] - y for y, r in zip(ys, runs)]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label="held-out-kind gold pass (95% CI)")
        ax.plot(xs, [r["partial"] for r in runs], marker="s", linestyle="--", label="constraints met (fraction)")
        ax.plot(xs, [r.get("kind_pass", 0) for r in runs], marker="d", linestyle=":", label="held-out kind's own constraint met")
        ax.set_xlabel(xlabel)
        ax.set_ylim(0, 1)
        losses = [(r[key], r.get("held_out_eval_loss")) for r in runs if r.get("held_out_eval_loss") is not None]
        if losses:
            twin = ax.twinx()
            twin.plot([x for x, _ in losses], [v for _, v in losses], color="tab:red", marker="^", alpha=0.6)
            twin.set_ylabel("held-out eval loss", color="tab:red")
        ax.legend(fontsize=7, loc="upper left")
    axes[0].set_title(f"{results['profile']}: more trained kinds")
    axes[1].set_title(f"{results['profile']}: mixing rates (all kinds)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
