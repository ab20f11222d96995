"""PPO checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint folder `checkpoint-<update>/` holds

- `state.safetensors`: the trainable tensors and the optimiser's moments, under namespaced keys
  (`adapter/<name>/<peft key>` or `model/<key>` in full fine-tuning, `value_head/<key>`, `optimizer/<i>/<key>`);
- `trainer_state.json`, written last (the runner's "this checkpoint is complete" marker): the update counter,
  the KL controller, the optimiser's param groups and non-tensor state, the RNG states as lists of numbers,
  the log history and the callbacks' states (the health monitor's).

Reading uses `safetensors.torch.load_file` and `json.loads` only: nothing in the folder can run code (a planted
`*.pt` or `*.pkl` file is never opened; tests/test_ppo_stage.py plants one). Anything unreadable or not fitting
the model is an `ArtifactError` naming the file.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from alignment.errors import ArtifactError

TENSORS = "state.safetensors"
STATE = "trainer_state.json"
FORMAT = 1


def save(folder: Path, tensors: dict, state: dict) -> None:
    """Write one checkpoint; `trainer_state.json` goes last, so a folder without it is incomplete."""
    from safetensors.torch import save_file

    from alignment.artifacts import write_json

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(folder / TENSORS))
    write_json(folder / STATE, {"format": FORMAT, **state})


def load(folder: Path) -> tuple[dict, dict]:
    """(tensors, state) of a checkpoint written by `save`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = json.loads((folder / STATE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ArtifactError(f"{folder / STATE}: unreadable PPO checkpoint state ({e}); delete the checkpoint "
                            "folder to start over") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ArtifactError(f"{folder / STATE}: not a PPO checkpoint of format {FORMAT} (written by another "
                            "version?); delete the checkpoint folder to start over")
    try:
        tensors = load_file(str(folder / TENSORS))
    except (OSError, SafetensorError, ValueError) as e:
        raise ArtifactError(f"{folder / TENSORS}: unreadable PPO checkpoint tensors ({e}); delete the checkpoint "
                            "folder to start over") from None
    return tensors, state


def take(tensors: dict, prefix: str) -> dict:
    """The tensors under `prefix/`, with the prefix removed."""
    return {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + "/")}


def unique_state(module) -> dict:
    """A module's state dict without the second name of tied weights (safetensors refuses shared storage;
    loading the first name restores both, as they are one parameter)."""
    seen, out = set(), {}
    for k, v in module.state_dict().items():
        if v.data_ptr() in seen:
            continue
        seen.add(v.data_ptr())
        out[k] = v
    return out


# -- the optimiser ------------------------------------------------------------------------------------------------


def optimizer_split(optimizer) -> tuple[dict, dict]:
    """(tensors, JSON) of a torch optimiser's state dict."""
    import torch

    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for i, entry in sd["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/{i}/{name}"] = value
            else:
                scalars.setdefault(str(i), {})[name] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_restore(optimizer, tensors: dict, state: dict) -> None:
    entries: dict[int, dict] = {}
    for key, value in take(tensors, "optimizer").items():
        i, name = key.split("/", 1)
        entries.setdefault(int(i), {})[name] = value
    for i, values in state["scalars"].items():
        entries.setdefault(int(i), {}).update(values)
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in state["param_groups"]]
    optimizer.load_state_dict({"state": entries, "param_groups": groups})


# -- random number generators -------------------------------------------------------------------------------------


def rng_state() -> dict:
    """torch's CPU generator and Python's `random`, as JSON lists."""
    import torch

    version, internal, gauss = random.getstate()
    return {"torch": torch.get_rng_state().tolist(), "python": [version, list(internal), gauss]}


def rng_restore(state: dict) -> None:
    import torch

    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def rotate(folder: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints under `folder`."""
    from alignment.artifacts import remove_tree
    from alignment.runner import checkpoint_step

    # Only `checkpoint-<digits>` counts: a folder such as `checkpoint-4.bak` is neither ranked nor removed.
    done = sorted((p for p in folder.glob("checkpoint-*") if checkpoint_step(p) is not None and (p / STATE).is_file()),
                  key=checkpoint_step)
    for old in done[:-keep]:
        remove_tree(old)
