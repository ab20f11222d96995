"""Stage `dpo` on the tiny model: the reference is the SFT model, training moves only the policy,
the artifact's lineage and metrics, resume after SIGKILL, bad data, soft labels."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from alignment.artifacts import ArtifactStore
from alignment.cli import main
from alignment.config import load_config
from alignment.dpo import adapter_disabled, pair_logps, soft_sigmoid_loss
from alignment.manifest import sha256_file
from alignment.policy import load_policy
from alignment.preferences import load_pairs
from stages.dpo import Config, build_trainer
from _device import logits_of, to_model

REPO = Path(__file__).resolve().parents[1]
TINY = "configs/tiny/dpo.yaml"
EVAL = "data/prefs/eval.jsonl"


@pytest.fixture(scope="module")
def tiny(tiny_store):
    root, run = tiny_store
    store = ArtifactStore(root)
    return store.read_stage(run, "base"), store.read_stage(run, "sft")


def cfg_for(*overrides) -> Config:
    return load_config(Config, TINY, list(overrides))


@pytest.mark.parametrize("method", ["lora", "full"])
def test_reference_at_step_0_is_the_sft_model_not_the_base(tiny, tmp_path, method):
    base, sft = tiny
    cfg = cfg_for(f"peft.method={method}")
    pairs = load_pairs(EVAL)[:6]
    trainer, tok = build_trainer(cfg, sft, pairs, tmp_path)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(pairs))])

    # TRL's own reference computation (adapter disabled for LoRA, the frozen copy for full).
    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(trainer.ref_model or trainer.model,
                                                             to_model(batch, trainer.model))
    max_len = cfg.train.max_length
    sft_lp = pair_logps(load_policy(sft, "fp32"), tok, pairs, max_length=max_len)
    base_lp = pair_logps(load_policy(base, "fp32"), tok, pairs, max_length=max_len)
    ref_chosen, ref_rejected = ref_chosen.cpu(), ref_rejected.cpu()  # TRL's, on the model's device
    assert torch.allclose(ref_chosen, sft_lp.chosen, rtol=1e-5, atol=1e-3)
    assert torch.allclose(ref_rejected, sft_lp.rejected, rtol=1e-5, atol=1e-3)
    assert (ref_chosen - base_lp.chosen).abs().max() > 0.1, "SFT and base must differ for this test to mean anything"
    assert not torch.allclose(ref_rejected, base_lp.rejected, atol=1e-2)

    # The per-step path too: at step 0 the policy is the SFT model and its reward against the reference is 0.
    trainer.model.train()
    trainer.compute_loss(trainer.model, batch)
    logged = trainer._metrics["train"]
    assert logged["logps/chosen"][-1] == pytest.approx(sft_lp.chosen.mean().item(), rel=1e-5)
    assert logged["rewards/chosen"][-1] == pytest.approx(0.0, abs=1e-4)
    assert logged["rewards/rejected"][-1] == pytest.approx(0.0, abs=1e-4)


def test_real_steps_change_the_adapter_and_leave_the_reference_alone(tiny, tmp_path):
    _, sft = tiny
    cfg = cfg_for("train.max_steps=3", "train.save_steps=100", "train.lr=1e-2")
    pairs = load_pairs("data/prefs/train.jsonl")[:24]
    trainer, tok = build_trainer(cfg, sft, pairs, tmp_path)
    model = trainer.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    held_out = load_pairs(EVAL)[:8]
    sft_lp = pair_logps(load_policy(sft, "fp32"), tok, held_out)

    trainer.train()

    lora = [n for n in before if "lora_" in n]
    frozen = [n for n in before if "lora_" not in n]
    assert lora and frozen
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if n in lora)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters() if n in frozen)
    with adapter_disabled(model):
        ref_lp = pair_logps(model, tok, held_out)
    policy_lp = pair_logps(model, tok, held_out)
    assert torch.allclose(ref_lp.chosen, sft_lp.chosen, rtol=1e-5, atol=1e-3)  # reference still = SFT
    assert (policy_lp.chosen - sft_lp.chosen).abs().max() > 1e-2  # the policy moved


def test_group_by_length_batches_pairs_of_similar_length_and_trains(tiny, tmp_path):
    """train.args.train_sampling_strategy=group_by_length: HF's sampler infers lengths from an `input_ids` column,
    which TRL's tokenised pairs lack, so it raised at the first batch; now the pairs come in batches of similar
    length (less padding than the seeded random order) and a step trains."""
    _, sft = tiny
    pairs = load_pairs("data/prefs/train.jsonl")[:48]
    widths = {}
    for strategy in ("random", "group_by_length"):
        cfg = cfg_for("train.max_steps=1", "train.save_steps=100", "train.batch_size=4", "train.grad_accum=1",
                      f"train.args={{train_sampling_strategy: {strategy}}}")
        trainer, _ = build_trainer(cfg, sft, pairs, tmp_path / strategy)
        ds = trainer.train_dataset
        length = [len(p) + max(len(c), len(r)) for p, c, r in zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"])]
        order = list(trainer._get_train_sampler(ds))
        assert sorted(order) == list(range(len(ds)))  # every pair once
        batches = [order[i:i + 4] for i in range(0, len(order), 4)]
        widths[strategy] = sum(max(length[j] for j in b) * len(b) for b in batches)
    assert widths["group_by_length"] < 0.95 * widths["random"]
    assert trainer.train().global_step == 1


def test_cli_run_publishes_adapter_lineage_and_metrics(tiny, tmp_path):
    base, sft = tiny
    rc = main(["run", "dpo", "-c", TINY, f"inputs.sft={sft.path}", "--artifacts", str(tmp_path), "--run", "cli",
               "eval.kl_prompts=4", "merge=true"])
    assert rc == 0
    dpo = ArtifactStore(tmp_path).read_stage("cli", "dpo")
    m = dpo.manifest
    assert m.lineage["parent"] == str(sft.path) and m.lineage["adapter"] is True
    prefs = m.lineage["preferences"]
    assert prefs["train"]["sha256"] == sha256_file(REPO / "data/prefs/train.jsonl")
    assert prefs["eval"]["sha256"] == sha256_file(REPO / EVAL) and prefs["eval"]["rows"] == 32
    ev = m.metrics["eval"]
    for key in ("rewards/margins", "rewards/accuracies", "kl_seq", "kl_per_token", "sft/prefers_chosen_sum",
                "dpo/prefers_chosen_sum", "dpo/prefers_chosen_per_token"):
        assert isinstance(ev[key], float), key
    assert ev["kl_seq"] >= 0 and m.metrics["steps"] == 8 and m.metrics["tokens_per_s"] > 0
    assert {"loss", "rewards/margins", "rewards/accuracies"} <= set(m.metrics["train"])
    assert m.base_model == sft.manifest.base_model

    # The adapter reloads as base + SFT + DPO, differs from SFT, and the merged copy is the same model.
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[5, 17, 60, 33, 8]])
    dpo_logits = logits_of(load_policy(dpo, "fp32"), ids)
    assert not torch.allclose(dpo_logits, logits_of(load_policy(sft, "fp32"), ids), atol=1e-4)
    merged = logits_of(AutoModelForCausalLM.from_pretrained(dpo.path / "merged"), ids)
    assert torch.allclose(dpo_logits, merged, atol=1e-5)
    # peft's own record of the adapter's base must not name the raw base folder.
    conf = json.loads((dpo.model_dir / "adapter_config.json").read_text())
    assert str(base.model_dir.resolve()) != conf["base_model_name_or_path"]
    # It names a real folder holding base + SFT merged (tests/test_policy_loading.py loads it with AutoPeft).
    parent = Path(conf["base_model_name_or_path"])
    assert (parent / "config.json").is_file() and sft.manifest_sha256[:16] in parent.name


def test_resume_after_sigkill(tiny, tmp_path):
    _, sft = tiny
    cmd = [sys.executable, "-m", "alignment.cli", "run", "dpo", "-c", TINY, f"inputs.sft={sft.path}",
           "--artifacts", str(tmp_path), "--run", "kill", "train.max_steps=40", "train.save_steps=3",
           "train.logging_steps=1", "eval.kl_prompts=2", "data.max_eval_pairs=4"]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    ckpts = tmp_path / "kill" / "dpo.partial" / "checkpoints"
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not list(ckpts.glob("checkpoint-*/trainer_state.json")):
            assert proc.poll() is None, "the run ended before it wrote a checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 60 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "kill" / "dpo").exists()

    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resuming interrupted run from" in res.stderr
    metrics = ArtifactStore(tmp_path).read_stage("kill", "dpo").manifest.metrics
    assert metrics["resumed_from_step"] >= 3 and metrics["resumed_from_step"] % 3 == 0
    assert metrics["steps"] == 40


def test_bad_pair_exits_2_naming_file_and_row(tiny, tmp_path, capsys):
    _, sft = tiny
    rows = [json.loads(line) for line in (REPO / "data/prefs/train.jsonl").read_text().splitlines()[:3]]
    rows.append({**rows[0], "rejected": rows[0]["chosen"]})
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc = main(["run", "dpo", "-c", TINY, f"inputs.sft={sft.path}", f"data.train={bad}", "--artifacts",
               str(tmp_path / "a"), "--run", "bad"])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"align: error: {bad}: row 4: chosen == rejected" in err

    rc = main(["run", "dpo", "-c", TINY, f"inputs.sft={sft.path}", "data.soft_labels=true", "--artifacts",
               str(tmp_path / "a"), "--run", "bad"])
    assert rc == 2
    assert "data/prefs/train.jsonl: row 1: data.soft_labels is on but the pair has no 'p_chosen'" in \
        capsys.readouterr().err


def test_prompts_that_fill_max_length_are_counted_and_all_of_them_is_one_line(tiny, tmp_path, capsys, caplog):
    from alignment.models import load_tokenizer
    from alignment.preferences import pairs_that_fit

    _, sft = tiny
    tok = load_tokenizer(sft.model_dir)
    pairs = load_pairs("data/prefs/train.jsonl")[:3]
    pairs[1] = {**pairs[1], "prompt": [{"role": "user", "content": "word " * 300}]}
    n = [len(tok.apply_chat_template(p["prompt"], add_generation_prompt=True, tokenize=True)["input_ids"])
         for p in pairs]
    limit = max(n[0], n[2]) + 1  # rows 1 and 3 leave room for a response, row 2 fills the sequence
    assert n[1] >= limit
    with caplog.at_level("WARNING"):
        kept = pairs_that_fit(pairs, tok, limit, "f.jsonl")
    assert [p["row"] for p in kept] == [1, 3]
    assert f"f.jsonl: dropped 1 of 3 pairs whose prompt alone fills train.max_length ({limit} tokens); first: row 2" \
        in caplog.text
    assert pairs_that_fit(pairs, tok, None, "f.jsonl") == pairs
    # Every prompt too long: one line naming the file and the setting, before any model loads (TRL would fail in
    # its sampler with "num_samples=0").
    rc = main(["run", "dpo", "-c", TINY, f"inputs.sft={sft.path}", "train.max_length=8", "--artifacts",
               str(tmp_path / "a"), "--run", "long"])
    assert rc == 2 and not (tmp_path / "a" / "long" / "dpo").exists()
    assert "align: error: data/prefs/train.jsonl: every one of the 64 pairs has a prompt of at least " \
        "train.max_length (8) tokens, leaving no room for a response; raise train.max_length" in capsys.readouterr().err


@pytest.mark.parametrize("precompute", [False, True])
def test_soft_labels_train_on_the_cdpo_loss(tiny, tmp_path, precompute):
    _, sft = tiny
    rows = [json.loads(line) for line in (REPO / "data/prefs/train.jsonl").read_text().splitlines()[:6]]
    soft = tmp_path / "soft.jsonl"
    soft.write_text("".join(json.dumps({**r, "p_chosen": p}) + "\n"
                            for r, p in zip(rows, [1.0, 0.9, 0.75, 0.6, 0.5, 0.2])))
    pairs = load_pairs(str(soft))
    cfg = cfg_for("data.soft_labels=true", f"data.train={soft}", f"dpo.precompute_ref_log_probs={precompute}")
    trainer, tok = build_trainer(cfg, sft, pairs, tmp_path / "ckpt")
    model = trainer.model
    torch.manual_seed(0)
    with torch.no_grad():  # move the policy off the reference so the loss depends on p_chosen
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(pairs))])
    assert batch["p_chosen"].tolist() == pytest.approx([1.0, 0.9, 0.75, 0.6, 0.5, 0.2])

    batch = to_model(batch, model)
    loss = trainer.compute_loss(model, dict(batch))
    policy = pair_logps(model, tok, pairs, max_length=cfg.train.max_length)
    with adapter_disabled(model):
        ref = pair_logps(model, tok, pairs, max_length=cfg.train.max_length)
    delta = (policy.chosen - ref.chosen) - (policy.rejected - ref.rejected)
    assert delta.abs().max() > 0.05
    expected = soft_sigmoid_loss(delta, batch["p_chosen"].to(delta.device), cfg.dpo.beta).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    hard = -torch.nn.functional.logsigmoid(cfg.dpo.beta * delta).mean()
    assert abs(loss.item() - hard.item()) > 1e-3
    loss.backward()  # the soft term carries gradient into the adapter
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_A" in n)
