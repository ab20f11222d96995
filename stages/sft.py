"""Stage `sft`: supervised fine-tuning of the base model (TRL SFTTrainer; LoRA by default).

Reads `<run>/base/`, trains on chat data (one file, or an instruction mixture of several) with the loss on
completions only, and writes to `model/` either a peft adapter + tokenizer (lora, qlora, ia3, prefix, prompt,
ptuning) or full weights (bitfit, freeze, full); `merge: true` also writes the merged model to `merged/`.
The methods, their families and what later stages can do with them: `alignment/peft_methods.py`.
"""

from __future__ import annotations

import logging

from alignment.config import StageConfig
from alignment.fused_lora import use_kernel
from alignment.hardware import peak_rss_mb, resolve_precision
from alignment.mixture import MAIN_EVAL, realise_mixture, stages_of
from alignment.models import load_tokenizer
from alignment.packing import PackedCollator, isolate_documents, pack_examples, packing_report
from alignment.peft_methods import (BOTTLENECK, METHODS, SOFT_PROMPTS, UNMERGEABLE, describe, load_model, peft_config,
                                    prepare_trainer, save_trained, select_trainable, trl_lm_head_problems)
from alignment.policy import lineage_for
from alignment.schema import PeftSpec, SFTData, TrainSpec
from alignment.training import callbacks, param_counts, perplexity, throughput, train, trainer_args

log = logging.getLogger("align")


def upstream(cfg) -> tuple[str, ...]:
    return ("base",) + stages_of(cfg.data)  # + `generate` when a mixture source reads its data


class Config(StageConfig):
    data: SFTData = SFTData()
    peft: PeftSpec = PeftSpec()
    train: TrainSpec = TrainSpec()
    packing: bool = False
    """Pack several examples per row (Best-Fit-Decreasing), each attending only to itself (block-diagonal mask)."""
    merge: bool = False
    """Also write the adapter merged into the base weights to `merged/` (loads with AutoModelForCausalLM)."""

    def problems(self):
        out = self.data.problems("data") + self.peft.problems("peft") + trl_lm_head_problems(self.peft, "peft", "sft")
        m = self.peft.method
        if self.merge and not METHODS[m].adapter:
            out.append(("merge", f"{m} ({METHODS[m].family}) saves full weights, there is no adapter to merge; "
                                 "set merge: false"))
        if self.merge and m in UNMERGEABLE:
            out.append(("merge", f"{m} {UNMERGEABLE[m]}; set merge: false"))
        if self.packing and m in SOFT_PROMPTS:
            out.append(("packing", f"{m} prepends virtual tokens to every row, so packed documents would share "
                                   "them and the per-document positions are lost; set packing: false"))
        if self.train.gradient_checkpointing and m == "prefix":
            out.append(("train.gradient_checkpointing", "prefix tuning feeds its prefix through the key/value "
                                                        "cache, which gradient checkpointing drops; set it false"))
        return out


def build_trainer(cfg: Config, ctx, base, mix):
    """TRL's SFTTrainer on the base model with the PEFT method's trainable parameters; (trainer, tokenizer, the
    packing mask hook or None)."""
    import datasets
    from trl import SFTConfig, SFTTrainer

    tok = load_tokenizer(base.model_dir)
    model = load_model(cfg.peft, base.model_dir, cfg.precision)
    select_trainable(model, cfg.peft)
    if cfg.train.gradient_checkpointing and (not METHODS[cfg.peft.method].adapter or cfg.peft.method in BOTTLENECK):
        model.enable_input_require_grads()  # frozen embeddings would otherwise cut the checkpointed graph
    mask_hook = isolate_documents(model) if cfg.packing else None
    args = SFTConfig(**trainer_args(cfg.train, out_dir=ctx.checkpoints_dir, seed=cfg.seed, precision=cfg.precision,
                                    report_to=cfg.report_to),
                     max_length=cfg.train.max_length, completion_only_loss=True, packing=False)
    trainer = SFTTrainer(model=model, args=args, processing_class=tok,
                         peft_config=None if cfg.peft.method in BOTTLENECK else
                         peft_config(cfg.peft, "CAUSAL_LM", tokenizer_path=base.model_dir),
                         train_dataset=datasets.Dataset.from_list(mix.train),
                         eval_dataset={g: datasets.Dataset.from_list(rows) for g, rows in mix.eval_groups.items()},
                         data_collator=PackedCollator(tok.pad_token_id) if cfg.packing else None,
                         callbacks=callbacks())
    prepare_trainer(trainer, cfg.peft, cfg.train, ctx.checkpoints_dir)  # LoRA+ optimizer, PiSSA/OLoRA initial adapter
    use_kernel(trainer.model, cfg.peft)
    if cfg.packing:
        # TRL has tokenised and truncated each example exactly as it does unpacked; now pack those.
        trainer.train_dataset = pack_examples(trainer.train_dataset, cfg.train.max_length)
        ctx.metrics.update(packing_report(trainer.train_dataset, cfg.train.max_length))
    return trainer, tok, mask_hook


def grouped_losses(by_group: dict, held_before: dict) -> dict:
    """The eval losses of the mixture's extra groups, by source and by held-out category (before and after)."""
    tail = lambda d, prefix: {g.split(":", 1)[1]: v for g, v in d.items() if g.startswith(prefix)}  # noqa: E731
    return {"eval_loss_by_source": tail(by_group, "source:"),
            "eval_loss_by_heldout_category": tail(by_group, "category:"),
            "eval_loss_before_by_heldout_category": tail(held_before, "category:")}


def run(cfg: Config, ctx) -> None:
    from transformers import set_seed

    # -- set up --------------------------------------------------------------------------------
    set_seed(cfg.seed)
    base = ctx.inputs["base"]
    mix = realise_mixture(cfg.data, cfg.seed, ctx.inputs)
    log.info("[sft] %d train examples from %d source(s); eval groups %s; method %s (%s); precision %s",
             len(mix.train), len(mix.report["sources"]), {g: len(r) for g, r in mix.eval_groups.items()},
             cfg.peft.method, METHODS[cfg.peft.method].family, resolve_precision(cfg.precision))
    trainer, tok, mask_hook = build_trainer(cfg, ctx, base, mix)
    ctx.metrics.update(param_counts(trainer.model))
    log.info("[sft] %d of %d parameters train (%.3f%%)", ctx.metrics["trainable_params"],
             ctx.metrics["total_params"], 100 * ctx.metrics["trainable_params"] / ctx.metrics["total_params"])
    groups = [g for g in mix.eval_groups if g != MAIN_EVAL]

    # -- train ---------------------------------------------------------------------------------
    before = trainer.evaluate(MAIN_EVAL)["eval_loss"]
    held_before = {g: trainer.evaluate(g)["eval_loss"] for g in groups if g.startswith("category:")}
    # That evaluation marked the model "prepared" for accelerate, so train() would skip the DDP wrap and, with
    # several processes, every rank would train its own copy (tests/test_multiprocess.py catches it).
    trainer.model._is_accelerate_prepared = False
    trained = train(trainer, ctx)
    result, runtime, cpu_s = trained.result, trained.seconds, trained.cpu_seconds
    after = trainer.evaluate(MAIN_EVAL)["eval_loss"]
    by_group = {g: trainer.evaluate(g)["eval_loss"] for g in groups}
    log.info("[sft] eval loss %.4f -> %.4f (perplexity %.2f -> %.2f)%s", before, after, perplexity(before),
             perplexity(after), "".join(f"; {g} {v:.4f}" for g, v in by_group.items()))

    # -- save ----------------------------------------------------------------------------------
    if mask_hook is not None:
        mask_hook.remove()
    if trainer.is_world_process_zero():  # one writer: with several processes every rank holds the same weights
        save_trained(trainer.model, tok, cfg.peft, ctx.out_dir / "model", base, scratch=ctx.checkpoints_dir)
        if cfg.merge:
            merged = _merged(trainer.model, cfg, base, ctx.out_dir / "model")
            merged.save_pretrained(ctx.out_dir / "merged", safe_serialization=True)
            tok.save_pretrained(ctx.out_dir / "merged")
    ctx.lineage = lineage_for(base, adapter=METHODS[cfg.peft.method].adapter, **describe(cfg.peft))
    ctx.metrics.update({
        "eval_loss_before": before, "eval_loss": after, "perplexity_before": perplexity(before),
        "perplexity": perplexity(after), "train_loss": result.training_loss, "steps": result.global_step,
        "resumed_from_step": int(ctx.resume_from.name.split("-")[-1]) if ctx.resume_from else 0,
        "train_seconds": round(runtime, 2), "train_cpu_seconds": round(cpu_s, 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "train_examples": len(mix.train), "eval_examples": len(mix.eval_groups[MAIN_EVAL]),
        **throughput(trainer, runtime), "method": cfg.peft.method, "mixture": mix.report,
        **(grouped_losses(by_group, held_before) if groups else {}),
    })


def _merged(model, cfg: Config, base, adapter_dir):
    """The adapter folded into full weights. QLoRA's base is 4-bit: merge onto the full-precision base instead."""
    if cfg.peft.method != "qlora":
        return model.merge_and_unload()
    from peft import PeftModel

    from alignment.models import load_causal_lm

    return PeftModel.from_pretrained(load_causal_lm(base.model_dir, cfg.precision), adapter_dir).merge_and_unload()
