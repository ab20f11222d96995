"""Packing several SFT examples into one row without letting them attend to each other.

Resetting `position_ids` per document is not enough here: with sdpa or eager attention transformers builds a plain
causal mask over the whole row, so a document attends to the ones packed before it (logits differ by up to ~1.2
on the tiny model), and flex_attention does not run on CPU. So each packed row gets a block-diagonal causal 4D mask:
token i attends to token j only when both belong to the same document and j <= i. The collator keeps the ordinary
2D padding mask in the batch (Trainer and TRL count tokens with it) and reset position ids; a forward pre-hook on
the transformer backbone turns the pair into the 4D mask just before the model builds its own, which it then uses
as given. `tests/test_packing.py` shows the per-example loss of a packed batch equals the unpacked one.

`pack_sequences` packs a left-padded batch for one forward pass (PPO's training passes, generation's prefill).
"""

from __future__ import annotations

from dataclasses import dataclass

from alignment.errors import ConfigError

SUPPORTED_ATTENTION = ("sdpa", "eager")


def pack_examples(dataset, max_length: int):
    """Tokenised examples (input_ids, labels) -> rows of at most max_length tokens, Best-Fit-Decreasing
    (TRL's packer), each row listing its documents' lengths in `seq_lengths`."""
    from trl.data_utils import pack_dataset

    return pack_dataset(dataset.select_columns(["input_ids", "labels"]), max_length, strategy="bfd")


@dataclass
class PackedCollator:
    """Rows of one or more documents -> input_ids, labels, 2D padding mask and per-document position ids.

    A row without `seq_lengths` is one document, so unpacked eval batches go through the same path.
    """

    pad_token_id: int

    def __call__(self, examples: list[dict]) -> dict:
        import torch

        width = max(len(e["input_ids"]) for e in examples)
        shape = (len(examples), width)
        input_ids = torch.full(shape, self.pad_token_id, dtype=torch.long)
        labels = torch.full(shape, -100, dtype=torch.long)
        attention_mask = torch.zeros(shape, dtype=torch.long)
        # Padding gets position 0: each pad token is then a one-token document that attends only to itself
        # (a query row with nothing to attend to gives NaN under sdpa).
        position_ids = torch.zeros(shape, dtype=torch.long)
        for b, e in enumerate(examples):
            n = len(e["input_ids"])
            input_ids[b, :n] = torch.as_tensor(e["input_ids"])
            labels[b, :n] = torch.as_tensor(e["labels"])
            attention_mask[b, :n] = 1
            start = 0
            for length in e.get("seq_lengths") or [n]:
                position_ids[b, start:start + length] = torch.arange(length)
                # The first token of a document would be predicted from the previous document's last token.
                labels[b, start] = -100
                start += length
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
                "position_ids": position_ids}


def block_diagonal_mask(position_ids, attention_mask, *, additive_dtype=None):
    """(batch, 1, L, L) mask: same document (a new one starts where position_ids is 0), causal, real keys.

    Boolean (True: attend) for sdpa; with additive_dtype, 0 / dtype-min floats for eager attention.
    """
    import torch

    length = position_ids.shape[-1]
    doc = (position_ids == 0).cumsum(-1)
    same_doc = doc[:, :, None] == doc[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    diagonal = torch.eye(length, dtype=torch.bool, device=position_ids.device)
    real_key = attention_mask.bool()[:, None, :] | diagonal
    mask = (same_doc & causal & real_key)[:, None]
    if additive_dtype is None:
        return mask
    zero = torch.zeros((), dtype=additive_dtype, device=mask.device)
    return torch.where(mask, zero, torch.finfo(additive_dtype).min)


def pack_sequences(ids, attn, rows: int, multiple: int, pad: int):
    """Pack the sequences of a batch (row i: the tokens of `ids[i]` where `attn[i]` is 1) into `rows` rows without
    padding between them, longest first into the shortest row; each row ends with a filler sequence of `pad` tokens
    up to the common width (a multiple of `multiple`). Returns (packed ids, position ids counted from 0 in each
    sequence, index): `index[i, t]` is the flat position (row * width + column) of token t of row i in the packed
    batch, or rows * width where `attn[i, t]` is 0."""
    import torch

    lengths = attn.sum(-1).tolist()
    fill, members = [0] * rows, [[] for _ in range(rows)]
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = min(range(rows), key=fill.__getitem__)
        members[r].append(i)
        fill[r] += lengths[i]
    width = max(max(fill), 1)
    width += -width % multiple
    packed = ids.new_full((rows, width), pad)
    pos = torch.zeros_like(packed)
    index = torch.full(ids.shape, rows * width, dtype=torch.long, device=ids.device)
    for r, seqs in enumerate(members):
        at = 0
        for i in seqs:
            cols = attn[i].nonzero().squeeze(-1)
            n = len(cols)
            packed[r, at: at + n] = ids[i, cols]
            pos[r, at: at + n] = torch.arange(n, device=ids.device)
            index[i, cols] = r * width + at + torch.arange(n, device=ids.device)
            at += n
        pos[r, at:] = torch.arange(width - at, device=ids.device)  # the filler: a sequence of its own
    return packed, pos, index


def _backbone(model):
    """The module whose forward builds the attention mask (LlamaModel inside LlamaForCausalLM)."""
    inner = getattr(model, getattr(model, "base_model_prefix", ""), None)
    return inner if inner is not None and inner is not model else model


def isolate_documents(model):
    """Make `model` attend within documents when a batch carries position_ids; returns the hook handle."""
    backbone = _backbone(model)
    impl = getattr(backbone.config, "_attn_implementation", None) or "eager"
    if impl not in SUPPORTED_ATTENTION:
        raise ConfigError([f"packing: isolating packed documents is implemented for {'/'.join(SUPPORTED_ATTENTION)} "
                           f"attention, not '{impl}'; set packing: false"])
    dtype = backbone.get_input_embeddings().weight.dtype

    def pre_hook(module, args, kwargs):
        pos, mask = kwargs.get("position_ids"), kwargs.get("attention_mask")
        # Only training/eval batches from PackedCollator: generation passes a cache, custom 4D masks stay as given.
        if pos is None or mask is None or mask.ndim != 2 or kwargs.get("past_key_values") is not None:
            return None
        kwargs["attention_mask"] = block_diagonal_mask(pos, mask,
                                                       additive_dtype=dtype if impl == "eager" else None)
        return args, kwargs

    return backbone.register_forward_pre_hook(pre_hook, with_kwargs=True)


def packing_report(packed, max_length: int) -> dict:
    """How full the packed rows are (1.0: no padding at all)."""
    lengths = [sum(x) for x in packed["seq_lengths"]]
    docs = sum(len(x) for x in packed["seq_lengths"])
    return {"packed_rows": len(lengths), "packed_documents": docs,
            "packed_fill": round(sum(lengths) / (len(lengths) * max_length), 3) if lengths else 0.0}
