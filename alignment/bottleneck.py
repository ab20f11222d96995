"""Bottleneck adapters (Houlsby et al., 2019; Pfeiffer et al., 2021): small MLPs inserted into every block.

Each adapter maps a sublayer's output h to h + up(act(down(h))), with down: d -> d / reduction_factor and
up back to d. `up` starts at zero, so a freshly adapted model computes exactly what its base did, and only
the adapters train (the base is frozen).

Placement: `pfeiffer` puts one adapter after each block's feed-forward sublayer; `houlsby` one after the
attention sublayer and one after the feed-forward sublayer (both before the residual addition, as in the
papers). The adapters are child modules of each block (`<block>.bottleneck_attn`, `<block>.bottleneck_mlp`)
applied by forward hooks on the sublayers, so the base's parameter names and code stay untouched.

Why not the `adapters` library: its releases pin transformers 4.x (adapters 1.3.0: transformers ~=4.57.6),
and this project runs transformers 5.

Saved as `bottleneck_config.json` + `adapter_model.safetensors` (only the adapter weights). The non-linearity
between the projections means an adapter cannot be folded into the base weights: `merge` is refused, and a
policy with bottleneck adapters is the last link of a lineage (like the soft prompts).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from alignment.errors import ArtifactError, ConfigError

CONFIG_NAME = "bottleneck_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
MLP_NAMES = ("mlp", "feed_forward", "ffn")
SITES = {"pfeiffer": ("mlp",), "houlsby": ("attn", "mlp")}


@dataclass
class BottleneckConfig:
    placement: str = "pfeiffer"
    reduction_factor: int = 16
    non_linearity: str = "relu"
    hidden_size: int = 0
    blocks: str = ""
    """Dotted name of the block list the adapters were added to (e.g. model.layers)."""


def _make_adapter(hidden: int, cfg: BottleneckConfig):
    import torch
    from torch import nn

    class Bottleneck(nn.Module):
        def __init__(self):
            super().__init__()
            inner = max(1, hidden // cfg.reduction_factor)
            self.down = nn.Linear(hidden, inner)
            self.act = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}[cfg.non_linearity]()
            self.up = nn.Linear(inner, hidden)
            nn.init.zeros_(self.up.weight)  # identity at the start: the adapted model is the base model
            nn.init.zeros_(self.up.bias)

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            # fp32 adapter on a possibly bf16 base (as peft keeps its adapters): compute in the adapter's dtype.
            return h + self.up(self.act(self.down(h.to(self.down.weight.dtype)))).to(h.dtype)

    return Bottleneck()


def _hook(adapter):
    def apply(_module, _inputs, output):
        # Attention modules return (hidden, weights, ...); feed-forward modules return the hidden states.
        if isinstance(output, tuple):
            return (adapter(output[0]),) + tuple(output[1:])
        return adapter(output)

    return apply


def _sublayer(block, names: tuple[str, ...], what: str, where: str):
    for name in names:
        if hasattr(block, name):
            return getattr(block, name)
    raise ConfigError([f"peft.adapter_placement: cannot find the {what} sublayer of {where} "
                       f"(looked for {', '.join(names)}); this architecture is not supported by bottleneck adapters"])


def add_adapters(model, cfg: BottleneckConfig) -> list[str]:
    """Insert adapters into every block, freeze everything else; return the names of the trainable parameters."""
    from alignment.peft_methods import transformer_blocks

    prefix, n_blocks = transformer_blocks(model)
    cfg.blocks, cfg.hidden_size = prefix, model.config.hidden_size
    blocks = model.get_submodule(prefix)
    for p in model.parameters():
        p.requires_grad_(False)
    device = next(model.parameters()).device
    for i, block in enumerate(blocks):
        for site in SITES[cfg.placement]:
            names = ATTENTION_NAMES if site == "attn" else MLP_NAMES
            sub = _sublayer(block, names, "attention" if site == "attn" else "feed-forward", f"{prefix}.{i}")
            adapter = _make_adapter(cfg.hidden_size, cfg).to(device)
            block.add_module(f"bottleneck_{site}", adapter)
            sub.register_forward_hook(_hook(adapter))
    model.bottleneck_config = cfg
    return [n for n, p in model.named_parameters() if ".bottleneck_" in n and p.requires_grad]


def adapter_state(model) -> dict:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if ".bottleneck_" in n}


def save(model, folder: Path) -> None:
    """Only the adapters: their weights (safetensors) and the config that rebuilds them."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state(model), str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    (folder / CONFIG_NAME).write_text(json.dumps(asdict(model.bottleneck_config), indent=2, sort_keys=True))


def is_bottleneck(folder: Path) -> bool:
    return (Path(folder) / CONFIG_NAME).is_file()


def load(model, folder: Path):
    """`model` (the parent's weights) with the saved adapters inserted and loaded; frozen, eval mode."""
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        cfg = BottleneckConfig(**json.loads((folder / CONFIG_NAME).read_text()))
        weights = load_file(str(folder / WEIGHTS_NAME))
    except (OSError, ValueError, TypeError) as e:
        raise ArtifactError(f"{folder}: unreadable bottleneck adapter ({e})") from None
    if cfg.hidden_size != model.config.hidden_size:
        raise ArtifactError(f"{folder}: adapters for hidden size {cfg.hidden_size}, but the model has "
                            f"{model.config.hidden_size}; they belong to another base")
    add_adapters(model, cfg)
    expected = set(adapter_state(model))
    if set(weights) != expected:
        raise ArtifactError(f"{folder}: adapter weights do not match the model "
                            f"({len(set(weights) ^ expected)} names differ, e.g. {sorted(set(weights) ^ expected)[0]})")
    model.load_state_dict(weights, strict=False)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()
