"""Compare the SFT methods on cost and quality for the same token budget, on the tiny model and on SmolLM2.

    OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 .venv/bin/python bench/sft_methods.py --profile tiny
    OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 .venv/bin/python bench/sft_methods.py --profile smollm2 \
        --lock /tmp/heavy.lock

Every method runs the real `align run sft` in a fresh subprocess (so peak RSS is that method's own) on the same
rows with the same number of optimiser steps and batch size, each at a learning rate typical of the method (a
soft prompt at a LoRA learning rate barely moves). In the same invocation:
- overhead: the stage against plain `trl.SFTTrainer` with the same settings (LoRA, same rows, same SFTConfig
  values), alternating the two `--repeats` times; tokens/s of `trainer.train()` in both, medians;
- precision: the stage's LoRA run in bf16 and in fp32 (CPU).
- gain (`--sections gain`): per method, the task gain (in-distribution eval loss drop) and the forgetting
  (perplexity on general text, data/general/heldout.jsonl, after / before - 1), table + scatter plot.
Writes bench/out/sft_methods_<profile>.json, the plots docs/sft_methods_<profile>[_gain].png and the tables into
docs/sft_methods.md (between the `bench:<profile>` and `bench:<profile>:gain` markers). `--lock FILE` wraps every subprocess in
`flock FILE` so heavy jobs on a shared machine run one at a time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

# label -> (overrides, learning rate). Learning rates: LoRA-family as the SmolLM2 config; (IA)^3 and the soft
# prompts an order of magnitude or more higher, as their papers and peft's examples use; full fine-tuning low.
METHODS = {
    "lora": ([], 5e-4),
    "dora": (["peft.use_dora=true"], 5e-4),
    "rslora": (["peft.use_rslora=true"], 5e-4),
    "ia3": (["peft.method=ia3"], 5e-3),
    "prefix": (["peft.method=prefix"], 1e-2),
    "prompt": (["peft.method=prompt", "peft.prompt_init_text=Answer the question and follow every rule it sets."],
               3e-2),
    "ptuning": (["peft.method=ptuning"], 1e-3),  # at 1e-2 its MLP encoder diverged within 6 steps on SmolLM2
    "bitfit": (["peft.method=bitfit", "peft.add_bias=true"], 1e-3),
    "freeze": (["peft.method=freeze", "peft.last_layers={last_layers}"], 1e-4),
    "full": (["peft.method=full"], 5e-5),
    # Bottleneck adapters: zero-initialised up projections, a higher lr as in Houlsby/Pfeiffer (1e-4..1e-3 on BERT).
    "adapter": (["peft.method=adapter"], 1e-3),
    "adapter-houlsby": (["peft.method=adapter", "peft.adapter_placement=houlsby"], 1e-3),
    "pissa": (["peft.init_lora_weights=pissa"], 5e-4),
    "loraplus": (["peft.loraplus_lr_ratio=16"], 2e-4),  # B learns 16x faster: a lower base lr, as the paper
}
GAIN_METHODS = ("lora", "dora", "ia3", "prompt", "adapter", "adapter-houlsby", "pissa", "loraplus", "bitfit", "freeze",
                "full")
"""The methods of the task gain / forgetting comparison (`--sections gain`)."""
GENERAL_TEXT = "data/general/heldout.jsonl"
"""General text (rows with `text`) whose perplexity measures forgetting; without it, the held-out eval prompts."""
PROFILES = {
    # steps x batch examples, the same rows for every method; eval on the first eval rows.
    # overhead_steps: a longer timed loop for the stage-vs-TRL ratio (the tiny model's 8 steps take ~1 s).
    "tiny": {"config": "configs/tiny/sft.yaml", "steps": 8, "batch": 8, "eval": 16, "last_layers": 1,
             "overhead_steps": 96, "repeats": 8, "precision_repeats": 3},
    "smollm2": {"config": "configs/smollm2/sft.yaml", "steps": 6, "batch": 4, "eval": 16, "last_layers": 3,
                "overhead_steps": 8, "repeats": 4, "precision_repeats": 2},
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", choices=list(PROFILES), default="tiny")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    p.add_argument("--sections", default="methods,overhead,precision,gain",
                   help="methods: cost table; overhead: stage vs plain TRL; precision: bf16 vs fp32; gain: task gain "
                        "vs forgetting (perplexity on general text) per method")
    p.add_argument("--repeats", type=int, help="alternating stage/plain-TRL pairs for the overhead (default: "
                                                "5 tiny, 3 smollm2)")
    p.add_argument("--artifacts", default=str(REPO / "bench" / "out" / "artifacts"))
    p.add_argument("--lock", help="flock this file around every subprocess (shared machines)")
    p.add_argument("--no-doc", action="store_true", help="do not rewrite docs/sft_methods.md")
    p.add_argument("--plain-trl", help=argparse.SUPPRESS)  # internal: JSON settings of one plain TRL run
    a = p.parse_args()
    if a.plain_trl:
        print(json.dumps(plain_trl(json.loads(a.plain_trl))))
        return 0

    prof = PROFILES[a.profile]
    root = Path(a.artifacts)
    out_json = REPO / "bench" / "out" / f"sft_methods_{a.profile}.json"
    results = json.loads(out_json.read_text()) if out_json.exists() else {}
    results["profile"], results["machine"] = a.profile, machine()
    base = build_base(a, root)
    budget = [f"train.max_steps={prof['steps']}", f"train.batch_size={prof['batch']}",
              f"data.max_train_examples={prof['steps'] * prof['batch']}", f"data.max_eval_examples={prof['eval']}",
              "train.save_steps=1000000", f"inputs.base={base}"]
    sections = a.sections.split(",")
    for name, section in (("methods", methods_section), ("overhead", overhead_section),
                          ("precision", precision_section), ("gain", gain_section)):
        if name in sections:
            section(a, root, prof, base, budget, results, lambda: save(out_json, results))
            save(out_json, results)
    if set(sections) & {"methods", "overhead", "precision"}:
        plot(results, REPO / "docs" / f"sft_methods_{a.profile}.png")
        table = markdown(results, a)
        print(table)
        if not a.no_doc:
            write_doc(a.profile, table)
    return 0


def method_overrides(label: str, prof: dict) -> tuple[list[str], float]:
    overrides, lr = METHODS[label]
    return [o.format(**prof) for o in overrides] + [f"train.lr={lr}"], lr


def methods_section(a, root, prof, base, budget, results, keep) -> None:
    """One run per PEFT method at the same steps and rows: the cost table."""
    rows = results.setdefault("methods", {})
    for label in a.methods.split(","):
        overrides, lr = method_overrides(label, prof)
        rows[label] = run_stage(a, root, f"{a.profile}-{label}", budget + overrides)
        rows[label].update(lr=lr, overrides=overrides)
        show(label, rows[label])
        keep()  # a long run keeps every finished row


def overhead_section(a, root, prof, base, budget, results, keep) -> None:
    """The sft stage against plain TRL on the same rows and settings, alternating pairs, medians."""
    ours, plain = [], []
    n = prof["overhead_steps"]
    # Same rows and settings for both; eval (outside the timed loop anyway) cut to 4 rows.
    cut = [f"train.max_steps={n}", f"train.batch_size={prof['batch']}",
           f"data.max_train_examples={n * prof['batch']}", "data.max_eval_examples=4", "train.save_steps=1000000",
           f"inputs.base={base}", "train.lr=5e-4"]
    for i in range(a.repeats or prof["repeats"]):
        ours.append(run_stage(a, root, f"{a.profile}-overhead", cut))
        plain.append(run_plain(a, base, cut))
        print(f"overhead pair {i + 1}: stage {ours[-1]['tokens_per_s']} tok/s "
              f"({ours[-1]['tokens_per_cpu_s']} per CPU-s), plain TRL {plain[-1]['tokens_per_s']} tok/s "
              f"({plain[-1]['tokens_per_cpu_s']} per CPU-s)", flush=True)
    s_tps, p_tps = [r["tokens_per_s"] for r in ours], [r["tokens_per_s"] for r in plain]
    s_cpu, p_cpu = [r["tokens_per_cpu_s"] for r in ours], [r["tokens_per_cpu_s"] for r in plain]
    med = statistics.median
    results["overhead"] = {"steps": n, "stage_tokens_per_s": s_tps, "plain_trl_tokens_per_s": p_tps,
                           "stage_tokens_per_cpu_s": s_cpu, "plain_trl_tokens_per_cpu_s": p_cpu,
                           "ratio_wall": round(med(s_tps) / med(p_tps), 3),
                           "ratio_cpu": round(med(s_cpu) / med(p_cpu), 3),
                           "tokens": sorted({r["train_tokens"] for r in ours + plain})}


def precision_section(a, root, prof, base, budget, results, keep) -> None:
    """bf16 against fp32, alternating runs, medians."""
    runs = {"fp32": [], "bf16": []}
    for _ in range(prof["precision_repeats"]):
        for p_ in runs:
            runs[p_].append(run_stage(a, root, f"{a.profile}-{p_}", budget + ["train.lr=5e-4", f"precision={p_}"]))
    results["precision"] = {p_: {**rs[0], **{k: statistics.median(r[k] for r in rs)
                                             for k in ("tokens_per_s", "tokens_per_cpu_s", "peak_rss_mb")},
                                 "runs": len(rs)} for p_, rs in runs.items()}


def gain_section(a, root, prof, base, budget, results, keep) -> None:
    """Task gain against forgetting (perplexity on general text) per method, with its plot and doc table."""
    texts, source = general_texts()
    results["gain_text"] = {"source": source, "texts": len(texts)}
    results["gain_base_ppl"] = perplexity_of(base, texts)
    rows = results.setdefault("gain", {})
    methods = a.methods.split(",") if a.methods != ",".join(METHODS) else list(GAIN_METHODS)
    for label in methods:
        overrides, lr = method_overrides(label, prof)
        rows[label] = run_stage(a, root, f"{a.profile}-gain-{label}", budget + overrides, texts=texts)
        r = rows[label]
        r.update(lr=lr, task_gain=round(r["eval_loss_before"] - r["eval_loss"], 5),
                 forgetting=round(r["general_ppl"] / results["gain_base_ppl"] - 1, 5))
        print(f"{label:16s} task gain {r['task_gain']:+.4f}  forgetting {100 * r['forgetting']:+.2f}% "
              f"(general ppl {results['gain_base_ppl']:.2f} -> {r['general_ppl']:.2f})", flush=True)
        keep()
    plot_gain(results, REPO / "docs" / f"sft_methods_{a.profile}_gain.png")
    if not a.no_doc:
        write_doc(f"{a.profile}:gain", gain_markdown(results, a))


# -- forgetting -----------------------------------------------------------------------------------------------
def general_texts() -> tuple[list[str], str]:
    path = REPO / GENERAL_TEXT
    if path.is_file():
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return [r["text"] for r in rows], GENERAL_TEXT
    rows = [json.loads(line) for line in (REPO / "data/instruct/eval.jsonl").read_text().splitlines() if line.strip()]
    return [r["messages"][0]["content"] for r in rows], "data/instruct/eval.jsonl (user prompts; no general text yet)"


def perplexity_of(art_path: Path, texts: list[str]) -> float:
    """Token-level perplexity of the artifact's policy on `texts` (fp32, batches of 8, padding masked)."""
    import math

    import torch

    sys.path.insert(0, str(REPO))
    from alignment.artifacts import ArtifactStore
    from alignment.models import load_tokenizer
    from alignment.policy import load_policy

    art = ArtifactStore(art_path.parent.parent).read(art_path)
    model, tok = load_policy(art, "fp32").eval(), load_tokenizer(art.model_dir)
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(texts), 8):
            enc = tok(texts[i:i + 8], return_tensors="pt", padding=True, add_special_tokens=False)
            labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
            # A prompt-tuned policy returns logits for its virtual tokens too: keep those of the text.
            logits = model(**enc).logits[:, -enc["input_ids"].shape[1]:][:, :-1].float()
            target = labels[:, 1:]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                     ignore_index=-100, reduction="sum")
            nll += loss.item()
            count += int((target != -100).sum())
    del model
    return round(math.exp(nll / count), 4)


# -- running --------------------------------------------------------------------------------------------------
def command(a, argv: list[str]) -> list[str]:
    return (["flock", a.lock] if a.lock else []) + argv


def build_base(a, root: Path) -> Path:
    run = f"{a.profile}-base"
    res = subprocess.run(command(a, [PYTHON, "-m", "alignment.cli", "run", "base", "-c",
                                     f"configs/{a.profile}/base.yaml", "--artifacts", str(root), "--run", run]),
                         cwd=REPO, env=ENV, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"base failed:\n{res.stderr[-3000:]}")
    return root / run / "base"


def run_stage(a, root: Path, run: str, overrides: list[str], texts: list[str] | None = None) -> dict:
    prof = PROFILES[a.profile]
    argv = [PYTHON, "-m", "alignment.cli", "run", "sft", "-c", prof["config"], "--artifacts", str(root),
            "--run", run, "--force", *overrides]
    t0 = time.perf_counter()
    res = subprocess.run(command(a, argv), cwd=REPO, env=ENV, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"{shlex.join(argv)} failed:\n{res.stderr[-3000:]}")
    m = json.loads((root / run / "sft" / "metrics.json").read_text())
    extra = {"general_ppl": perplexity_of(root / run / "sft", texts)} if texts is not None else {}
    shutil.rmtree(root / run, ignore_errors=True)  # full-weight artifacts of SmolLM2 are 0.5 GB each
    keys = ("trainable_params", "total_params", "tokens_per_s", "train_tokens", "train_seconds", "train_cpu_seconds",
            "peak_rss_mb", "eval_loss_before", "eval_loss", "steps", "method")
    # wall_s includes any wait for --lock.
    return {**{k: m[k] for k in keys}, **extra, "wall_s": round(wall, 1),
            "tokens_per_cpu_s": round(m["train_tokens"] / m["train_cpu_seconds"], 1)}


def run_plain(a, base: Path, overrides: list[str]) -> dict:
    settings = {"config": PROFILES[a.profile]["config"], "overrides": overrides, "base": str(base)}
    t0 = time.perf_counter()
    res = subprocess.run(command(a, [PYTHON, __file__, "--plain-trl", json.dumps(settings)]), cwd=REPO, env=ENV,
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"plain TRL run failed:\n{res.stderr[-3000:]}")
    return {**json.loads(res.stdout.strip().splitlines()[-1]), "wall_s": round(time.perf_counter() - t0, 1)}


def plain_trl(settings: dict) -> dict:
    """The baseline: `trl.SFTTrainer` + peft LoRA built by hand from the same resolved config values."""
    sys.path.insert(0, str(REPO))
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import SFTConfig, SFTTrainer

    from alignment.config import load_config  # only to read the same YAML + overrides as the stage
    from alignment.hardware import peak_rss_mb, resolve_precision
    from stages.sft import Config

    cfg = load_config(Config, settings["config"], [o for o in settings["overrides"] if not o.startswith("inputs.")])
    t, pe = cfg.train, cfg.peft
    set_seed(cfg.seed)
    bf16 = resolve_precision(cfg.precision) == "bf16"
    rows = []
    with open(cfg.data.train, encoding="utf-8") as f:
        for line in f:
            msgs = json.loads(line)["messages"]
            rows.append({"prompt": msgs[:-1], "completion": msgs[-1:]})
    rows = rows[: cfg.data.max_train_examples]
    tok = AutoTokenizer.from_pretrained(settings["base"] + "/model")
    model = AutoModelForCausalLM.from_pretrained(settings["base"] + "/model",
                                                 dtype=torch.bfloat16 if bf16 else torch.float32)
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(output_dir=out, learning_rate=t.lr, num_train_epochs=t.epochs, max_steps=t.max_steps,
                         per_device_train_batch_size=t.batch_size, gradient_accumulation_steps=t.grad_accum,
                         warmup_steps=t.warmup_ratio, weight_decay=t.weight_decay, lr_scheduler_type=t.lr_scheduler,
                         max_grad_norm=t.max_grad_norm, logging_steps=t.logging_steps, save_strategy="no",
                         eval_strategy="no", seed=cfg.seed, data_seed=cfg.seed, bf16=bf16, use_cpu=True,
                         report_to=[], gradient_checkpointing=t.gradient_checkpointing, dataloader_num_workers=0,
                         include_num_input_tokens_seen="non_padding", optim="adamw_torch",
                         max_length=t.max_length, completion_only_loss=True, packing=False)
        lora = LoraConfig(r=pe.r, lora_alpha=pe.alpha, lora_dropout=pe.dropout,
                          target_modules=pe.target_modules or "all-linear", task_type="CAUSAL_LM")
        trainer = SFTTrainer(model=model, args=args, processing_class=tok,
                             train_dataset=datasets.Dataset.from_list(rows), peft_config=lora)
        t0, cpu0 = time.perf_counter(), time.process_time()
        trainer.train()
        seconds, cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
    tokens = int(trainer.state.num_input_tokens_seen)
    return {"train_tokens": tokens, "train_seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1),
            "train_cpu_seconds": round(cpu_s, 2), "tokens_per_cpu_s": round(tokens / cpu_s, 1),
            "peak_rss_mb": round(peak_rss_mb(), 1)}


# -- reporting ------------------------------------------------------------------------------------------------
def machine() -> dict:
    import torch

    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
            "date": time.strftime("%Y-%m-%d")}


def show(label: str, r: dict) -> None:
    print(f"{label:8s} trainable {r['trainable_params']:>11,}  {r['tokens_per_s']:>8.1f} tok/s  "
          f"peak RSS {r['peak_rss_mb']:>7.0f} MB  eval loss {r['eval_loss_before']:.4f} -> {r['eval_loss']:.4f}",
          flush=True)


def save(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))


def markdown(results: dict, a) -> str:
    from alignment.peft_methods import METHODS as INFO

    prof = PROFILES[a.profile]
    cmd = "OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 .venv/bin/python bench/sft_methods.py --profile " + a.profile
    if a.lock:
        cmd += f" --lock {a.lock}"
    mach = results["machine"]
    lines = [f"Command: `{cmd}`  ",
             f"Measured {mach['date']}: {mach['cpu_count']} CPU cores shared with other jobs, torch {mach['torch']} "
             f"({mach['torch_threads']} threads), avx512_bf16={mach['avx512_bf16']}. Budget per method: "
             f"{prof['steps']} steps x {prof['batch']} examples (the same rows), eval on {prof['eval']} held-out rows. "
             "tokens/s: non-padding input tokens over `trainer.train()` wall time; per CPU-s: over its process CPU "
             "time (steadier when other jobs share the cores).", "",
             "| method | family | lr | trainable params | % of total | train tokens | tokens/s | tokens/CPU-s "
             "| peak RSS MB | eval loss before | eval loss after |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, r in results.get("methods", {}).items():
        fam = INFO[r["method"]].family
        lines.append(f"| {label} | {fam} | {r['lr']:g} | {r['trainable_params']:,} | "
                     f"{100 * r['trainable_params'] / r['total_params']:.3f} | {r['train_tokens']:,} | "
                     f"{r['tokens_per_s']:.0f} | {r['tokens_per_cpu_s']:.0f} | {r['peak_rss_mb']:.0f} | "
                     f"{r['eval_loss_before']:.4f} | "
                     f"{r['eval_loss']:.4f} |")
    if "overhead" in results:
        o = results["overhead"]
        lines += ["", f"**Stage vs plain `trl.SFTTrainer`** (LoRA, same rows and settings, {o['steps']} steps, "
                      f"{len(o['stage_tokens_per_s'])} alternating pairs, tokens per run {o['tokens']}). "
                      f"Tokens per CPU-second of `trainer.train()` (robust to other jobs taking the cores): stage "
                      f"{o['stage_tokens_per_cpu_s']}, plain {o['plain_trl_tokens_per_cpu_s']}: ratio of medians "
                      f"**{o['ratio_cpu']:.3f}** (overhead {100 * (1 - o['ratio_cpu']):.1f}%). Wall-clock tokens/s: "
                      f"stage {o['stage_tokens_per_s']}, plain {o['plain_trl_tokens_per_s']}: ratio of medians "
                      f"{o['ratio_wall']:.3f}."]
    if "precision" in results:
        p32, p16 = results["precision"]["fp32"], results["precision"]["bf16"]
        lines += ["", f"**bf16 vs fp32** (LoRA, this CPU, same budget, medians of {p32.get('runs', 1)} alternating "
                      f"runs each): fp32 {p32['tokens_per_s']:.0f} tokens/s "
                      f"({p32['tokens_per_cpu_s']:.0f} per CPU-s), peak RSS {p32['peak_rss_mb']:.0f} MB, eval loss "
                      f"{p32['eval_loss']:.4f}; bf16 {p16['tokens_per_s']:.0f} tokens/s ({p16['tokens_per_cpu_s']:.0f} "
                      f"per CPU-s), peak RSS {p16['peak_rss_mb']:.0f} MB, eval loss {p16['eval_loss']:.4f}: bf16/fp32 "
                      f"throughput **{p16['tokens_per_cpu_s'] / p32['tokens_per_cpu_s']:.2f}x** per CPU-second "
                      f"({p16['tokens_per_s'] / p32['tokens_per_s']:.2f}x wall)."]
    lines += ["", f"![SFT methods on {a.profile}](sft_methods_{a.profile}.png)"]
    return "\n".join(lines)


def gain_markdown(results: dict, a) -> str:
    from alignment.peft_methods import METHODS as INFO

    prof, g = PROFILES[a.profile], results["gain_text"]
    cmd = ("OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python bench/sft_methods.py --profile "
           f"{a.profile} --sections gain")
    lines = [f"Command: `{cmd}`  ",
             f"Measured {results['machine']['date']}. Same budget as above ({prof['steps']} steps x {prof['batch']} "
             f"examples, the same rows). **Task gain**: in-distribution eval loss before minus after (nats/token, "
             f"held-out rows of the trained kinds). **Forgetting**: perplexity on general text ({g['source']}, "
             f"{g['texts']} texts) relative to the base model's {results['gain_base_ppl']:.2f}: "
             "after / before - 1 (positive: the policy lost some of the base's language modelling).", "",
             "| method | family | lr | trainable params | task gain | general ppl | forgetting |",
             "|---|---|---|---:|---:|---:|---:|"]
    for label, r in results.get("gain", {}).items():
        lines.append(f"| {label} | {INFO[r['method']].family} | {r['lr']:g} | {r['trainable_params']:,} | "
                     f"{r['task_gain']:+.4f} | {r['general_ppl']:.2f} | {100 * r['forgetting']:+.2f}% |")
    lines += ["", f"![task gain vs forgetting on {a.profile}](sft_methods_{a.profile}_gain.png)"]
    return "\n".join(lines)


def plot_gain(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results.get("gain", {})
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for label, r in rows.items():
        ax.scatter(100 * r["forgetting"], r["task_gain"], s=20 + 8 * math.log10(max(10, r["trainable_params"])) ** 2)
        ax.annotate(label, (100 * r["forgetting"], r["task_gain"]), fontsize=8, xytext=(4, 3),
                    textcoords="offset points")
    ax.axvline(0, color="grey", lw=0.5)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("forgetting: general-text perplexity change vs base (%)")
    ax.set_ylabel("task gain: eval loss drop (nats/token)")
    ax.set_title(f"{results['profile']}: task gain vs forgetting (marker size: trainable params)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_doc(profile: str, table: str) -> None:
    doc = REPO / "docs" / "sft_methods.md"
    text = doc.read_text()
    begin, end = f"<!-- bench:{profile}:begin -->", f"<!-- bench:{profile}:end -->"
    if begin not in text or end not in text:
        print(f"{doc}: no {begin} ... {end} block; table not written", file=sys.stderr)
        return
    head, rest = text.split(begin, 1)
    doc.write_text(head + begin + "\n" + table + "\n" + end + rest.split(end, 1)[1])


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results.get("methods", {})
    if not rows:
        return
    labels = list(rows)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    panels = [("trainable_params", "trainable parameters (log)", True),
              ("tokens_per_s", "train tokens / s (dark: wall, light: per CPU-second)", False),
              ("peak_rss_mb", "peak RSS (MB)", False), ("eval_loss", "eval loss (bar: after, dot: before)", False)]
    for ax, (key, title, log) in zip(axes.flat, panels):
        ax.bar(labels, [rows[m][key] for m in labels], color="tab:blue")
        if key == "tokens_per_s":
            ax.bar(labels, [rows[m]["tokens_per_cpu_s"] for m in labels], color="tab:cyan", width=0.4)
        if key == "eval_loss":
            ax.scatter(labels, [rows[m]["eval_loss_before"] for m in labels], color="black", zorder=3, s=12)
            lo = min(min(rows[m]["eval_loss"], rows[m]["eval_loss_before"]) for m in labels)
            hi = max(max(rows[m]["eval_loss"], rows[m]["eval_loss_before"]) for m in labels)
            ax.set_ylim(lo - 0.1 * (hi - lo + 1e-3), hi + 0.1 * (hi - lo + 1e-3))
        ax.set_title(title)
        ax.set_yscale("log" if log else "linear")
        ax.tick_params(axis="x", rotation=45)
    fig.suptitle(f"SFT methods, {results['profile']}: same rows, same steps ({results['machine']['date']})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
