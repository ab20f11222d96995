"""Typed config: a pydantic schema per stage, a YAML file, and `key.path=value` overrides.

Every problem is collected and reported at once, one line each, naming the file (or the
command-line override) and the key path, e.g.
`configs/tiny/sft.yaml: train.lr: expected a number, got 'fast'`.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from alignment.errors import ConfigError

# Keys never written to logs, manifests or trackers; values are replaced wholesale. Matched as
# whole names or `_`-suffixes, so `openai_api_key` is secret but `max_new_tokens`, `pad_token` are not.
SECRET_NAMES = ("token", "api_key", "apikey", "secret", "password")
SECRET_SUFFIXES = ("_api_key", "_apikey", "_secret", "_password", "hf_token", "access_token", "auth_token",
                   "api_token")


def is_secret_key(key: str) -> bool:
    k = str(key).lower()
    return k in SECRET_NAMES or k.endswith(SECRET_SUFFIXES)


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, not silently ignored."""

    # use_attribute_docstrings: the string under each field is its description (`align config schema STAGE`).
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), use_attribute_docstrings=True)


class StageConfig(Section):
    """Keys every stage accepts. Stage schemas subclass this."""

    stage: str
    """Which stage this file configures; `align run STAGE` refuses a file for another stage."""
    run: str = "default"
    """Default run name (the folder under the artifact root); `--run` wins."""
    seed: int = 0
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """auto: bf16 where the hardware runs it fast (CUDA bf16, or a CPU with AVX512-BF16/AMX), else fp32."""
    threads: int | None = None
    """torch CPU threads; None keeps torch's default."""
    inputs: dict[str, str] = {}
    """Override where an upstream artifact is read from: {stage: path to an artifact folder}."""
    tracking: Literal["wandb", "tensorboard", "none"] = Field(
        default_factory=lambda: os.environ.get("ALIGN_TRACKING", "wandb"), validate_default=True)
    """The stage's dashboard (alignment/tracking.py): one wandb run per stage, grouped by run (offline when
    WANDB_API_KEY is unset; `wandb sync` later), tensorboard event files, or none. $ALIGN_TRACKING sets the default."""
    report_to: Literal["none", "wandb", "tensorboard"] | None = None
    """Where HF trainers send their logs. Unset: into the stage's own dashboard run when the runner opened one
    (`tracking`), else nowhere, so a trainer built outside the runner never starts a dashboard run of its own."""
    _report_to_follows_tracking: bool = PrivateAttr(default=False)

    def model_post_init(self, context: Any) -> None:
        self._report_to_follows_tracking = self.report_to is None
        if self.report_to is None:
            self.report_to = "none"  # alignment.tracking.stage_run sets it to `tracking` when it opens the run

    def problems(self) -> list[tuple[str, str]]:
        """Cross-field checks (impossible combinations) as (key path, message)."""
        return []


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError([f"{path}: config file not found"])
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError([f"{path}: not valid YAML: {e}".replace("\n", " ")]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: expected a mapping at the top level, got {type(data).__name__}"])
    return data


def apply_overrides(data: dict, overrides: list[str]) -> tuple[dict, set[str]]:
    """Apply `a.b.c=value` overrides (value parsed as YAML); return the data and the keys set."""
    problems, touched = [], set()
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"override '{item}': expected key.path=value")
            continue
        parts = key.strip().split(".")
        node = data
        for i, part in enumerate(parts[:-1]):
            if not isinstance(node.get(part, {}), dict):
                problems.append(f"override '{item}': {'.'.join(parts[: i + 1])} is not a section")
                break
            node = node.setdefault(part, {})
        else:
            node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
            touched.add(key.strip())
    if problems:
        raise ConfigError(problems)
    return data, touched


def load_config(schema: type[StageConfig], path: str | Path, overrides: list[str] = ()) -> StageConfig:
    """Load, override and validate; raise ConfigError listing every problem."""
    data, touched = apply_overrides(load_yaml(path), list(overrides))
    try:
        cfg = schema.model_validate(data)
    except ValidationError as e:
        raise ConfigError([_where(path, _loc(err), touched) + _message(err, schema) for err in e.errors()]) from None
    problems = cfg.problems()
    if problems:
        raise ConfigError([_where(path, key, touched) + msg for key, msg in problems])
    return cfg


def _loc(err: dict) -> str:
    # pydantic adds union/tagged-union branch names to loc; keep only real keys.
    return ".".join(str(p) for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p.startswith("function-"))))


def _where(path, key: str, touched: set[str]) -> str:
    src = f"{path} (command line)" if any(key == t or key.startswith(t + ".") for t in touched) else str(path)
    return f"{src}: {key}: " if key else f"{src}: "


_EXPECTED = {
    "float": "a number",
    "int": "an integer",
    "bool": "true or false",
    "string": "a string",
    "dict": "a mapping",
    "list": "a list",
}


def _message(err: dict, schema: type[BaseModel]) -> str:
    kind, value = err["type"], err.get("input")
    if kind.startswith("align_"):  # a section's own check already wrote the whole message
        return err["msg"]
    if kind == "extra_forbidden":
        return "unknown key" + _suggest(err["loc"], schema)
    if kind == "missing":
        return "required key is missing"
    if kind == "literal_error":
        return f"expected one of {err['ctx']['expected']}, got {value!r}"
    for prefix, expected in _EXPECTED.items():
        if kind.startswith(prefix):
            return f"expected {expected}, got {value!r}"
    return f"{err['msg']} (got {value!r})"


def _suggest(loc: tuple, schema: type[BaseModel]) -> str:
    """Did-you-mean for unknown keys: walk the schema along loc to find the sibling names."""
    model = schema
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part)
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return ""
        model = ann
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def redact(obj: Any) -> Any:
    """Replace secret-looking values so they never reach logs, manifests or trackers."""
    if isinstance(obj, dict):
        return {k: ("***" if is_secret_key(k) and v else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj


def config_dict(cfg: StageConfig) -> dict:
    """The resolved config as plain JSON data, secrets redacted."""
    return redact(cfg.model_dump(mode="json"))


def config_hash(cfg: StageConfig) -> str:
    """Hash of what changes the result: run name, threads, tracking and secrets are left out."""
    data = {k: v for k, v in config_dict(cfg).items() if k not in ("run", "threads", "tracking", "report_to")}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
