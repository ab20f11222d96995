"""Stage `sft`: supervised fine-tuning of the base model (TRL SFTTrainer + peft LoRA).

Reads `<run>/base/`, trains on chat data with the loss on completions only, and writes the
adapter + tokenizer to `model/` (and a merged full model to `merged/` with `merge: true`).
"""

from __future__ import annotations

import logging
import time

from alignment.config import StageConfig
from alignment.hardware import peak_rss_mb, resolve_precision
from alignment.models import load_causal_lm, load_tokenizer
from alignment.policy import lineage_for
from alignment.schema import PeftSpec, SFTData, TrainSpec
from alignment.sft_data import train_eval_examples
from alignment.training import lora_config, param_counts, perplexity, throughput, trainer_args

log = logging.getLogger("align")
UPSTREAM = ("base",)


class Config(StageConfig):
    data: SFTData = SFTData()
    peft: PeftSpec = PeftSpec()
    train: TrainSpec = TrainSpec()
    merge: bool = False
    """Also write the adapter merged into the base weights to `merged/` (loads with AutoModelForCausalLM)."""

    def problems(self):
        out = []
        if not 0 <= self.data.max_bad_fraction < 1:
            out.append(("data.max_bad_fraction", "expected a fraction in [0, 1)"))
        if self.merge and self.peft.method == "full":
            out.append(("merge", "full fine-tuning has no adapter to merge; set merge: false"))
        return out


def run(cfg: Config, ctx) -> None:
    import datasets
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    # -- set up --------------------------------------------------------------------------------
    set_seed(cfg.seed)
    base_dir = ctx.inputs["base"].model_dir
    train_rows, eval_rows = train_eval_examples(cfg.data, cfg.seed)
    log.info("[sft] %d train / %d eval examples; precision %s", len(train_rows), len(eval_rows),
             resolve_precision(cfg.precision))
    tok = load_tokenizer(base_dir)
    model = load_causal_lm(base_dir, cfg.precision)
    args = SFTConfig(**trainer_args(cfg.train, out_dir=ctx.checkpoints_dir, seed=cfg.seed, precision=cfg.precision,
                                    report_to=cfg.report_to),
                     max_length=cfg.train.max_length, completion_only_loss=True, packing=False)
    trainer = SFTTrainer(model=model, args=args, processing_class=tok, peft_config=lora_config(cfg.peft),
                         train_dataset=datasets.Dataset.from_list(train_rows),
                         eval_dataset=datasets.Dataset.from_list(eval_rows))
    ctx.metrics.update(param_counts(trainer.model))

    # -- train ---------------------------------------------------------------------------------
    before = trainer.evaluate()["eval_loss"]
    t0 = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(ctx.resume_from) if ctx.resume_from else None)
    runtime = time.perf_counter() - t0
    after = trainer.evaluate()["eval_loss"]
    log.info("[sft] eval loss %.4f -> %.4f (perplexity %.2f -> %.2f)", before, after, perplexity(before),
             perplexity(after))

    # -- save ----------------------------------------------------------------------------------
    trainer.model.save_pretrained(ctx.out_dir / "model", safe_serialization=True)
    tok.save_pretrained(ctx.out_dir / "model")
    if cfg.merge:
        merged = trainer.model.merge_and_unload()
        merged.save_pretrained(ctx.out_dir / "merged", safe_serialization=True)
        tok.save_pretrained(ctx.out_dir / "merged")
    ctx.lineage = lineage_for(ctx.inputs["base"], adapter=cfg.peft.method != "full")
    ctx.metrics.update({
        "eval_loss_before": before, "eval_loss": after, "perplexity_before": perplexity(before),
        "perplexity": perplexity(after), "train_loss": result.training_loss, "steps": result.global_step,
        "resumed_from_step": int(ctx.resume_from.name.split("-")[-1]) if ctx.resume_from else 0,
        "train_seconds": round(runtime, 2), "peak_rss_mb": round(peak_rss_mb(), 1),
        "train_examples": len(train_rows), "eval_examples": len(eval_rows), **throughput(trainer, runtime),
    })
