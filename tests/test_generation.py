"""alignment.generation, hf backend: padding, EOS cut and mask rule, row order, seeds, batching, engines."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

from alignment import generation as G
from alignment.generation import GenerationSpec, build_engine, cut_at_eos, generate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _tiny_lm import PROMPTS, build  # noqa: E402

GREEDY = GenerationSpec(max_new_tokens=12, autocast="off", batch_size=64)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    model, tok = build(tmp_path_factory.mktemp("tiny-lm"))
    return model, tok


def own_ids(tok, prompt):
    return list(tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])


def test_cut_at_eos_keeps_eos_and_pads_after_it():
    tok = type("Tok", (), {"pad_token_id": 0, "eos_token_id": 2,
                           "batch_decode": lambda self, ids, skip_special_tokens: [str(r) for r in ids.tolist()]})()
    ids, mask, has_eos, texts, reasons = cut_at_eos(tok, torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 9, 9, 9]]))
    assert ids.tolist() == [[5, 2, 0, 0], [5, 6, 7, 8], [2, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert has_eos.tolist() == [True, False, True] and reasons == ["stop", "length", "stop"]
    assert texts[0] == "[5, 0, 0, 0]"  # the EOS itself is not decoded into the text


def test_left_padded_queries_and_the_tokenizer_is_not_touched(lm):
    model, tok = lm
    tok.padding_side, tok.truncation_side = "right", "right"
    before = (tok.padding_side, tok.truncation_side, tok.pad_token_id, tok.eos_token_id)
    ro = generate(model, tok, PROMPTS, GREEDY)
    assert (tok.padding_side, tok.truncation_side, tok.pad_token_id, tok.eos_token_id) == before
    width = ro.query_ids.shape[1]
    for r, p in enumerate(PROMPTS):
        ids = own_ids(tok, p)
        assert ro.query_ids[r, width - len(ids):].tolist() == ids  # right-aligned: the response starts at `width`
        assert ro.query_mask[r].tolist() == [0] * (width - len(ids)) + [1] * len(ids)
    assert ro.prompts == PROMPTS and len(ro.texts) == len(PROMPTS) == len(ro.finish_reasons)
    # Truncation keeps the end of a prompt: the generation prompt must survive.
    cut = generate(model, tok, PROMPTS[1:2], GenerationSpec(max_new_tokens=2, max_prompt_length=5, autocast="off"))
    assert cut.query_ids[0].tolist() == own_ids(tok, PROMPTS[1])[-5:]


def test_responses_are_cut_after_the_first_eos(lm):
    model, tok = lm
    free = generate(model, tok, PROMPTS, GREEDY)
    assert not free.has_eos.any()  # random weights never pick the real EOS in 12 tokens
    # Make the token row 0 produces at step 3 the EOS (first occurrence, not at step 0): greedy choices are
    # the same, so every row now stops at that token's first occurrence.
    row0 = free.response_ids[0].tolist()
    j = next(i for i in range(1, len(row0)) if row0[i] not in row0[:i])
    stop_tok = copy.deepcopy(tok)
    stop_tok.eos_token = stop_tok.convert_ids_to_tokens(row0[j])
    ro = generate(model, stop_tok, PROMPTS, GREEDY)
    for r in range(len(PROMPTS)):
        full = free.response_ids[r].tolist()
        n = full.index(row0[j]) + 1 if row0[j] in full else len(full)
        assert ro.response_mask[r].tolist()[:n] == [1] * n and not any(ro.response_mask[r].tolist()[n:])
        assert ro.response_ids[r, :n].tolist() == full[:n]
        assert set(ro.response_ids[r, n:].tolist()) <= {stop_tok.pad_token_id}
        assert ro.has_eos[r].item() == (row0[j] in full)
        assert ro.finish_reasons[r] == ("stop" if row0[j] in full else "length")
        assert ro.token_lists[r] == full[:n]  # the padding after the EOS dropped
    assert ro.lengths[0] == j + 1


def test_num_return_sequences_rows_are_prompt_major(lm):
    model, tok = lm
    one = generate(model, tok, PROMPTS, GREEDY)
    three = generate(model, tok, PROMPTS, GREEDY.model_copy(update={"num_return_sequences": 3}))
    assert three.prompts == [p for p in PROMPTS for _ in range(3)]
    assert three.grouped(3) == [[t] * 3 for t in one.texts]
    for r in range(len(three.texts)):
        assert torch.equal(three.response_ids[r], one.response_ids[r // 3])


def test_sampling_is_reproducible_for_a_seed(lm):
    model, tok = lm
    spec = GenerationSpec(max_new_tokens=10, do_sample=True, temperature=1.0, num_return_sequences=2, batch_size=2,
                          autocast="off")
    a, b = (generate(model, tok, PROMPTS, spec, seed=7) for _ in range(2))
    c = generate(model, tok, PROMPTS, spec, seed=8)
    assert torch.equal(a.response_ids, b.response_ids) and a.texts == b.texts
    assert not torch.equal(a.response_ids, c.response_ids)
    assert len(set(a.texts)) > 1  # sampled, not greedy


def test_greedy_rows_decode_greedily_and_leave_the_other_rows_alone(lm):
    """GRPO's greedy member: the flagged rows are the greedy answers, every other row samples what it samples
    without the flags (each row's stream draws either way)."""
    model, tok = lm
    spec = GenerationSpec(max_new_tokens=10, do_sample=True, temperature=1.0, num_return_sequences=2, batch_size=2,
                          autocast="off")
    plain = generate(model, tok, PROMPTS, spec, seed=7)
    mixed = generate(model, tok, PROMPTS, spec, seed=7, greedy_rows=[0, 2, 5])
    greedy = generate(model, tok, PROMPTS, GREEDY.model_copy(update={"max_new_tokens": 10}))
    for row in range(len(plain.texts)):
        want = greedy.texts[row // 2] if row in (0, 2, 5) else plain.texts[row]
        assert mixed.texts[row] == want, row
    assert plain.texts[0] != greedy.texts[0] or plain.texts[2] != greedy.texts[1]  # the flags changed something
    with pytest.raises(ValueError, match="greedy_rows"):
        generate(model, tok, PROMPTS, GREEDY, greedy_rows=[0])


def test_greedy_output_does_not_depend_on_the_batch_size(lm):
    model, tok = lm
    outs = [generate(model, tok, PROMPTS, GREEDY.model_copy(update={"batch_size": b})) for b in (1, 2, 64)]
    for o in outs[1:]:
        assert torch.equal(o.response_ids, outs[0].response_ids) and o.texts == outs[0].texts
    # ... and rows come back in prompt order whatever the length-sorted batching did
    alone = generate(model, tok, PROMPTS[3:4], GREEDY)
    assert torch.equal(alone.response_ids[0], outs[2].response_ids[3])


def test_batches_go_longest_first_and_respect_memory():
    spec = GenerationSpec(batch_size=3)
    assert G._batches([3, 10, 5, 7], spec, 1, lambda w: None) == [[1, 3, 2], [0]]
    # 4 rows fit, k = 2 rows per prompt: 2 prompts per batch
    assert G._batches([3, 10, 5, 7], spec, 2, lambda w: 4) == [[1, 3], [2, 0]]
    # not even one prompt's rows fit: still one prompt per batch (generate tries; OOM names itself)
    assert G._batches([3, 10], spec, 4, lambda w: 1) == [[1], [0]]


def test_kv_cache_size_from_the_config(lm):
    model, _ = lm
    # 2 layers x (keys + values) x 1 kv head x 32 dims x 4 bytes (fp32)
    assert G.kv_bytes_per_token(model) == 2 * 2 * 1 * 32 * 4
    assert G.kv_bytes_per_token(model, torch.bfloat16) == 2 * 2 * 1 * 32 * 2


def test_autocast_is_bf16_only_for_fp32_weights_on_fast_hardware(lm, monkeypatch):
    from alignment import hardware

    model, _ = lm
    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: True)
    assert G.resolve_autocast(model, GenerationSpec()) is torch.bfloat16
    assert G.resolve_autocast(model, GenerationSpec(autocast="off")) is None
    assert G.resolve_autocast(model, GenerationSpec(), None) is None  # an explicit None wins
    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: False)
    assert G.resolve_autocast(model, GenerationSpec()) is None


def test_spec_problems_name_the_key():
    bad = GenerationSpec(max_new_tokens=0, do_sample=True, temperature=0.0, top_p=1.5, memory_fraction=0,
                         retire_every=-1)
    keys = [k for k, _ in bad.problems("sampling")]
    assert keys == ["sampling.max_new_tokens", "sampling.retire_every", "sampling.temperature", "sampling.top_p",
                    "sampling.memory_fraction"]
    assert GenerationSpec(do_sample=False, temperature=0.0).problems() == []  # greedy ignores temperature


def test_hf_engine_picks_up_a_new_adapter(lm, tmp_path):
    from peft import LoraConfig, get_peft_model

    model, tok = lm
    base = copy.deepcopy(model)
    peft = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj",
                                                                                              "down_proj"]))
    with build_engine(GREEDY, base, tok) as engine:
        before = engine.generate(PROMPTS)
        assert torch.equal(before.response_ids, generate(model, tok, PROMPTS, GREEDY).response_ids)
        for seed, folder in ((1, tmp_path / "a"), (2, tmp_path / "b")):
            torch.manual_seed(seed)
            with torch.no_grad():  # an "update": new B matrices (peft starts them at zero, a no-op)
                for n, p in peft.named_parameters():
                    if "lora_B" in n:
                        p.normal_(0.0, 0.5)
            peft.save_pretrained(folder)
            engine.load_adapter(folder)
            after = engine.generate(PROMPTS)
            expect = generate(peft, tok, PROMPTS, GREEDY)
            assert torch.equal(after.response_ids, expect.response_ids)
            assert not torch.equal(after.response_ids, before.response_ids)
            before = after


def test_a_prompt_samples_the_same_whatever_shares_its_batch(lm):
    """Per-prompt seeds: shards sampled together reproduce what shard-by-shard calls sample (label resume)."""
    model, tok = lm
    spec = GenerationSpec(max_new_tokens=10, do_sample=True, temperature=0.9, top_p=0.95, top_k=50,
                          num_return_sequences=2, autocast="off")
    seeds = [11, 12, 13, 14, 15]
    together = generate(model, tok, PROMPTS, spec, seed=seeds)
    for i in range(len(PROMPTS)):
        alone = generate(model, tok, PROMPTS[i:i + 1], spec, seed=seeds[i:i + 1])
        assert alone.texts == together.texts[2 * i:2 * i + 2]
    # the two samples of a prompt come from different streams, and another seed samples otherwise
    assert any(a != b for a, b in together.grouped(2))
    assert generate(model, tok, PROMPTS, spec, seed=[s + 100 for s in seeds]).texts != together.texts
    with pytest.raises(ValueError, match="2 seeds for 5 prompts"):
        generate(model, tok, PROMPTS, spec, seed=[1, 2])


def test_the_row_sampler_draws_from_the_warped_distribution():
    import math

    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    n = 4000
    scores = p.log().repeat(n, 1)
    spec = GenerationSpec(do_sample=True)
    picks = G.row_sampler(range(n), spec)(None, scores.clone()).argmax(-1)
    freq = torch.bincount(picks, minlength=4).float() / n
    assert torch.allclose(freq, p, atol=0.03)  # 3 sigma of a binomial at n = 4000 is <= 0.024
    # top_k 2 keeps {0.5, 0.3} renormalised: 0.625 / 0.375; temperature 0.5 squares the odds before that
    spec = GenerationSpec(do_sample=True, top_k=2, temperature=0.5)
    freq = torch.bincount(G.row_sampler(range(n), spec)(None, scores.clone()).argmax(-1), minlength=4).float() / n
    w = [0.5 ** 2, 0.3 ** 2]
    assert freq[2:].sum() == 0 and math.isclose(freq[0], w[0] / sum(w), abs_tol=0.03)


def test_nucleus_pick_samples_transformers_top_p_distribution_through_a_topk_head():
    from transformers import TopPLogitsWarper

    torch.manual_seed(0)
    # flat and peaked rows, so some nuclei fit the 4-token head and others need the larger heads (64, then all 300)
    logits = torch.randn(6, 300) * torch.tensor([0.1, 0.5, 1.0, 3.0, 6.0, 12.0]).unsqueeze(1)
    want = torch.softmax(TopPLogitsWarper(0.9)(None, logits.clone()), dim=-1)
    n = 20_000
    u = ((torch.arange(n) + 0.5) / n).repeat(6)  # stratified uniforms: frequencies within 1/n of the target
    picks = G.nucleus_pick(torch.softmax(logits, -1).repeat_interleave(n, 0), u, 0.9, head=4).view(6, n)
    freq = torch.stack([torch.bincount(row, minlength=300) for row in picks]).float() / n
    assert ((freq > 0) == (want > 1.5 / n)).all()  # the nucleus: no token outside it, every token inside it
    assert torch.allclose(freq, want, atol=2 / n)
    # hand-worked: [0.5, 0.3, 0.15, 0.05] at top_p 0.85 keeps 0.5, 0.3 and 0.15 (mass before them 0, 0.5, 0.8)
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    assert [int(G.nucleus_pick(p, torch.tensor([x]), 0.85, head=1)) for x in (0.1, 0.6, 0.99)] == [0, 1, 2]


def test_label_sampling_groups_whole_shards_at_fixed_boundaries():
    from alignment.labeling import sampling_groups

    # 10 prompts in shards of 2, 5 prompts per call: 2 whole shards per call, the last group shorter
    assert sampling_groups(10, 2, 5) == [[(0, 0, 2), (1, 2, 4)], [(2, 4, 6), (3, 6, 8)], [(4, 8, 10)]]
    # a batch smaller than a shard still samples whole shards, one per call
    assert sampling_groups(5, 4, 2) == [[(0, 0, 4)], [(1, 4, 5)]]



def test_frozen_weights_generate_the_same_and_stay_frozen(lm):
    """generate turns requires_grad on for frozen weights while it runs (a CPU slow path, alignment.generation.thaw)
    and freezes exactly those again; no graph is recorded and the output is the unfrozen model's."""
    model, tok = lm
    frozen = copy.deepcopy(model)
    names = [n for n, _ in frozen.named_parameters()]
    for n, p in frozen.named_parameters():
        p.requires_grad_(n == names[0])  # one weight stays trainable, the rest frozen: both kept as they were
    flags = {n: p.requires_grad for n, p in frozen.named_parameters()}
    a, b = generate(model, tok, PROMPTS, GREEDY), generate(frozen, tok, PROMPTS, GREEDY)
    assert torch.equal(a.response_ids, b.response_ids)
    assert {n: p.requires_grad for n, p in frozen.named_parameters()} == flags
    assert all(p.grad is None for p in frozen.parameters())


def test_rows_that_ended_leave_the_batch_and_every_row_keeps_its_tokens(lm):
    """retire_every: generate in steps, dropping ended rows (and their KV cache) between steps; greedy and seeded
    sampling give exactly what one `generate` call gives, and later forwards really run on fewer rows."""
    model, tok = lm
    sampled = GenerationSpec(max_new_tokens=12, do_sample=True, temperature=1.3, autocast="off")
    for spec, seed in ((GREEDY, None), (sampled, [3, 4, 5, 6, 7])):
        spec = spec.model_copy(update={"retire_every": 0})
        free = generate(model, tok, PROMPTS, spec, seed=seed)
        stop_tok = copy.deepcopy(tok)  # the token row 0 makes at step 2 becomes EOS: rows end at different steps
        stop_tok.eos_token = stop_tok.convert_ids_to_tokens(free.response_ids[0, 2].item())
        one = generate(model, stop_tok, PROMPTS, spec, seed=seed)
        rows_seen = []
        hook = model.register_forward_pre_hook(lambda m, a, kw: rows_seen.append(kw["input_ids"].shape[0]),
                                               with_kwargs=True)
        try:  # the padded prefill: its first forward is the whole batch (the packed one is test_packed_prefill_*)
            steps = generate(model, stop_tok, PROMPTS, spec.model_copy(update={"retire_every": 2, "prefill": "padded"}),
                             seed=seed)
        finally:
            hook.remove()
        assert torch.equal(steps.response_ids, one.response_ids) and steps.texts == one.texts
        assert torch.equal(steps.response_mask, one.response_mask) and steps.finish_reasons == one.finish_reasons
        assert 0 < int(one.has_eos.sum()) < len(PROMPTS)  # some rows ended early, some ran to the limit
        assert rows_seen[0] == len(PROMPTS) and min(rows_seen) == int((~one.has_eos).sum())


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_prefill_generates_what_the_padded_prefill_does(lm, attention):
    """prefill: packed computes each distinct prompt once, without padding, and gives the same tokens (fp32)."""
    model, tok = lm
    model.set_attn_implementation(attention)
    try:
        sampled = GREEDY.model_copy(update={"do_sample": True, "temperature": 1.3, "num_return_sequences": 3})
        for spec, seed in ((GREEDY, None), (sampled, [3, 4, 5, 6, 7])):
            for retire in (0, 4):
                spec = spec.model_copy(update={"retire_every": retire})
                padded = generate(model, tok, PROMPTS, spec.model_copy(update={"prefill": "padded"}), seed=seed)
                shapes = []
                hook = model.register_forward_pre_hook(
                    lambda m, a, kw: shapes.append(tuple(kw["input_ids"].shape)), with_kwargs=True)
                try:
                    packed = generate(model, tok, PROMPTS, spec, seed=seed)
                finally:
                    hook.remove()
                assert torch.equal(packed.response_ids, padded.response_ids) and packed.texts == padded.texts
                assert torch.equal(packed.response_mask, padded.response_mask)
                # the first forward ran the distinct prompts (all but their last token) packed, the rest one column
                real = sum(len(own_ids(tok, p)) - 1 for p in PROMPTS)
                rows, width = shapes[0]
                assert rows < len(PROMPTS) and real <= rows * width < real + 8 * rows
                assert all(w == 1 for _, w in shapes[1:])
    finally:
        model.set_attn_implementation("sdpa")


def test_packed_prefill_cache_is_the_padded_batch_cache(lm):
    """The laid-out cache holds, at every real column, the keys and values the padded forward computes there."""
    from transformers import DynamicCache

    model, tok = lm
    ids, mask = G.left_pad(tok, [own_ids(tok, p) for p in PROMPTS])
    ids, mask = ids.repeat_interleave(2, dim=0), mask.repeat_interleave(2, dim=0)  # copies share one prefill
    with torch.no_grad():
        cache = G.packed_prefill(model, ids, mask)
        ref = DynamicCache()
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=pos[:, :-1], use_cache=True,
              **{G._cache_kwarg(model): ref})
    real = mask[:, :-1].bool()
    for got, want in zip(cache.layers, ref.layers):
        assert got.keys.shape == want.keys.shape
        for a, b in ((got.keys, want.keys), (got.values, want.values)):
            torch.testing.assert_close(a.transpose(1, 2)[real], b.transpose(1, 2)[real])
            assert not a.transpose(1, 2)[~real].any()  # pad columns: zeros (masked)


def test_packed_prefill_steps_aside_when_it_saves_nothing_or_does_not_apply(lm):
    from transformers import MistralConfig, MistralForCausalLM

    model, tok = lm
    one = own_ids(tok, PROMPTS[2])
    ids, mask = G.left_pad(tok, [one])
    assert G.packed_prefill(model, ids, mask) is None  # one prompt, no padding: generate's own prefill
    ids, mask = G.left_pad(tok, [one, one])
    assert G.packed_prefill(model, ids, mask) is not None  # two copies: one prefill
    # a sliding-window model's cache is not a plain one: its own prefill
    config = MistralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, sliding_window=4)
    assert G.packed_prefill(MistralForCausalLM(config), ids, mask) is None


def _lora(model, targets, seed=0):
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    torch.manual_seed(seed)
    with torch.no_grad():  # a trained-looking adapter (peft starts B at zero: merging would be a no-op)
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.5)
    return peft


def _base_weights(peft):
    return {n: p.detach().clone() for n, p in peft.named_parameters(remove_duplicate=False) if "lora_" not in n}


def test_merging_in_place_samples_what_the_copy_does_and_puts_the_base_back_bit_for_bit(lm):
    model, tok = lm
    peft = _lora(model, ["q_proj", "v_proj", "down_proj"])
    before, stash = _base_weights(peft), G.WeightStash()
    layers = G._adapted_layers(peft, "default")
    assert layers and stash.fits(peft, layers)
    with G.merged_lora(peft, "default"):  # the copy path
        want = generate(peft, tok, PROMPTS, GREEDY).response_ids
        merged = {n: p.detach().clone() for n, p in peft.named_parameters() if "base_layer" in n}
    for _ in range(2):  # the stash is written at the first merge and read back after each
        ptrs = [m.base_layer.weight.data_ptr() for m in layers]
        with G.merged_lora(peft, "default", stash=stash):
            assert [m.base_layer.weight.data_ptr() for m in layers] == ptrs  # the same tensors, written in place
            assert all(torch.equal(p, merged[n]) for n, p in peft.named_parameters() if "base_layer" in n)
            assert torch.equal(generate(peft, tok, PROMPTS, GREEDY).response_ids, want)
        now = _base_weights(peft)
        assert all(torch.equal(now[n], before[n]) for n in before)
    assert torch.equal(generate(peft, tok, PROMPTS, GREEDY).response_ids, want)  # the adapter is back on ...
    assert not torch.equal(generate(model, tok, PROMPTS, GREEDY).response_ids, want)  # ... and it matters
    with pytest.raises(KeyError), G.merged_lora(peft, "default", stash=stash):  # an error inside still restores
        raise KeyError("boom")
    now = _base_weights(peft)
    assert all(torch.equal(now[n], before[n]) for n in before)


@pytest.mark.parametrize("in_place", [False, True])
def test_the_merged_weights_are_peft_s_base_plus_delta_rounded_once(lm, in_place):
    model, _ = lm
    peft = _lora(copy.deepcopy(model).to(torch.bfloat16), ["q_proj", "v_proj", "down_proj"])
    layers = G._adapted_layers(peft, "default")
    assert len({m.base_layer.weight.shape for m in layers}) < len(layers)  # shapes repeat: the scratch is reused
    want = [(m.base_layer.weight.float() + m.get_delta_weight("default").float()).to(torch.bfloat16) for m in layers]
    with torch.no_grad(), G.merged_lora(peft, "default", stash=G.WeightStash() if in_place else None):
        got = [m.base_layer.weight.detach().clone() for m in layers]
    assert all(g.dtype == torch.bfloat16 for g in got)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert not any(torch.equal(g, m.base_layer.weight) for g, m in zip(got, layers))  # and they were merged


def test_an_adapted_weight_tied_to_another_is_merged_into_a_copy_not_in_place(lm):
    model, tok = lm
    tied = copy.deepcopy(model)
    tied.lm_head.weight = tied.model.embed_tokens.weight  # a tied head, adapted: merging in place would move both
    peft = _lora(tied, ["lm_head", "q_proj"])
    stash = G.WeightStash()
    assert not stash.fits(peft, G._adapted_layers(peft, "default"))
    embeddings = peft.get_input_embeddings().weight.detach().clone()
    with G.merged_lora(peft, "default", stash=stash):
        assert torch.equal(peft.get_input_embeddings().weight, embeddings)
    assert stash._file is None  # nothing was stashed


def test_a_stash_that_cannot_be_written_falls_back_to_copies_with_one_warning(lm, monkeypatch, caplog):
    import tempfile

    model, tok = lm
    peft = _lora(model, ["q_proj"])
    before, stash = _base_weights(peft), G.WeightStash()
    layers = G._adapted_layers(peft, "default")
    ptrs = [m.base_layer.weight.data_ptr() for m in layers]

    tries = []

    def full(*_, **__):
        tries.append(1)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tempfile, "TemporaryFile", full)
    for _ in range(2):
        with caplog.at_level("WARNING", logger="align"), G.merged_lora(peft, "default", stash=stash):
            assert [m.base_layer.weight.data_ptr() for m in layers] != ptrs  # merged into copies
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "No space left on device" in warnings[0] and "not in place" in warnings[0]
    assert len(tries) == 1  # not retried at every merge
    now = _base_weights(peft)
    assert all(torch.equal(now[n], before[n]) for n in before)
