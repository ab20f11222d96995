"""Typed config: a pydantic schema per stage, a YAML file, and `key.path=value` overrides.

Every problem is collected and reported at once, one line each, naming the file (or the
command-line override) and the key path, e.g.
`configs/tiny/sft.yaml: train.lr: expected a number, got 'fast'`.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from alignment.errors import ConfigError

# Keys never written to logs, manifests or trackers; values are replaced wholesale. Matched as
# whole names or `_`-suffixes, so `openai_api_key` is secret but `max_new_tokens`, `pad_token` are not.
SECRET_NAMES = ("token", "api_key", "apikey", "secret", "password")
SECRET_SUFFIXES = ("_api_key", "_apikey", "_secret", "_password", "hf_token", "access_token", "auth_token",
                   "api_token")


def is_secret_key(key: str) -> bool:
    k = str(key).lower()
    return k in SECRET_NAMES or k.endswith(SECRET_SUFFIXES)


# -- names that become folders ---------------------------------------------------------------------------

SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
"""A run or stage name is exactly one folder under the artifact root: no separators, no `..`, no hidden names."""


def name_problem(value: object) -> str | None:
    """Why `value` cannot name one folder under the artifact root, or None when it can."""
    if isinstance(value, str) and SAFE_NAME.fullmatch(value) and ".." not in value:
        return None
    return ("expected one folder name: letters, digits, '.', '_', '-' (starting with a letter or digit, no '..', "
            "at most 100 characters), so it stays under the artifact root")


# -- secrets by value -----------------------------------------------------------------------------------

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@'\"]+@")
_SECRET_ENV = re.compile(r"(?i)(token|secret|passw(or)?d|api_?key|_key|credentials?)$")
_SECRETS: set[str] = set()


def register_secret(value: object) -> None:
    """Scrub this value from every log line, manifest and dashboard from now on (values under 6 characters would
    scrub common words, and are no secret worth the name)."""
    if isinstance(value, str) and len(value.strip()) >= 6:
        _SECRETS.add(value.strip())


def register_env_secrets(cfg: BaseModel | None = None) -> None:
    """Secrets by value: what any `*_env` config key points at, and every secret-named environment variable."""
    for name, value in os.environ.items():
        if _SECRET_ENV.search(name) and len(value) >= 8:
            register_secret(value)
    for value in _env_fields(cfg) if cfg is not None else ():
        register_secret(os.environ.get(value))


def _env_fields(model: BaseModel):
    for name in type(model).model_fields:
        value = getattr(model, name, None)
        if name.endswith("_env") and isinstance(value, str):
            yield value
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, BaseModel):
                yield from _env_fields(item)


def scrub_text(text: str) -> str:
    """Registered secret values and URL credentials (`http://user:key@host` -> `http://***@host`) replaced."""
    text = URL_USERINFO.sub(r"\1***@", text)
    for secret in sorted(_SECRETS, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, "***")
    return text


def scrub(obj: Any) -> Any:
    """`scrub_text` over every string (keys too) of JSON-like data."""
    if isinstance(obj, str):
        return scrub_text(obj)
    if isinstance(obj, dict):
        return {scrub(k) if isinstance(k, str) else k: scrub(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(scrub(v) for v in obj)
    return obj


class _RedactFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # a malformed record is logging's problem to report, not ours
            return True
        clean = scrub_text(msg)
        if clean != msg:
            record.msg, record.args = clean, None
        return True


_REDACT = REDACT_FILTER = _RedactFilter()


def install_log_redaction() -> None:
    """Scrub secrets from the `align` logger's records and from every root handler (HF, wandb, trl lines)."""
    for target in [logging.getLogger("align"), *logging.getLogger().handlers]:
        if _REDACT not in target.filters:
            target.addFilter(_REDACT)


# -- strict scalars --------------------------------------------------------------------------------------


def _scalar_kinds(annotation) -> set:
    args = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) \
        else (annotation,)
    return {a for a in args if a in (bool, int, float, type(None))}


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, not silently ignored; no NaN or infinity; no
    true/false where a number belongs or a number where true/false belongs (pydantic would coerce both)."""

    # use_attribute_docstrings: the string under each field is its description (`align config schema STAGE`).
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False,
                              use_attribute_docstrings=True)

    @field_validator("*", mode="before")
    @classmethod
    def _strict_scalars(cls, value: Any, info) -> Any:
        field = cls.model_fields.get(info.field_name)
        kinds = _scalar_kinds(field.annotation) if field is not None else set()
        if isinstance(value, bool) and bool not in kinds and kinds & {int, float}:
            raise PydanticCustomError("strict_number", "expected a number, got {value}",
                                      {"value": str(value).lower()})
        if bool in kinds and not kinds & {int, float} and value is not None and not isinstance(value, bool):
            raise PydanticCustomError("strict_bool", "expected true or false, got {value}", {"value": repr(value)})
        if info.field_name.endswith("_env") and value is not None and not (
                isinstance(value, str) and ENV_NAME.fullmatch(value) and not _looks_like_a_key(value)):
            register_secret(value if isinstance(value, str) else None)
            raise PydanticCustomError("env_name", "expected the NAME of an environment variable (like "
                                      "OPENAI_API_KEY), which holds the secret; the value given is not shown")
        return value


def _looks_like_a_key(value: str) -> bool:
    """An API key pasted where its variable's name belongs: long, mixed case and digits (sk_live_9fA...)."""
    return len(value) >= 20 and any(c.islower() for c in value) and any(c.isdigit() for c in value)


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
    onednn_cache: int | None = Field(default=None, ge=0)
    """Capacity of oneDNN's primitive cache (ONEDNN_PRIMITIVE_CACHE_CAPACITY; oneDNN runs PyTorch's CPU bf16
    matmuls): it keeps a compiled kernel of ~1 MB for each matmul shape it meets, up to 1024 by default, and a
    trainer whose batch widths vary keeps adding them. None: oneDNN's default (or the environment's, which wins
    either way). Set before the stage's first matmul; the results do not depend on it."""
    inputs: dict[str, str] = {}
    """Override where an upstream artifact is read from: {stage: path to an artifact folder}."""
    allow_failed_inputs: bool = False
    """Read an upstream artifact published with status failed_gate (a reward model or judge below its gate's
    thresholds, kept for inspection). Off: such an input stops the stage before anything loads, naming it."""
    @field_validator("run")
    @classmethod
    def _safe_run(cls, value: str) -> str:
        problem = name_problem(value)
        if problem:
            raise PydanticCustomError("unsafe_name", problem)
        return value

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


class _StrictLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (PyYAML silently keeps the last)."""


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            first = seen.get(key)
        except TypeError:
            continue  # an unhashable key: SafeLoader's own error says so
        if first is not None:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first given on line {first})", key_node.start_mark)
        seen[key] = key_node.start_mark.line + 1
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def parse_yaml(text: str):
    """yaml.safe_load, but a duplicate key is an error."""
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)


def yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong and where (line, column)."""
    mark = getattr(e, "problem_mark", None)
    what = getattr(e, "problem", None) or str(e)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{what}".replace("\n", " ")


def read_text_file(path: str | Path, what: str = "config file") -> str:
    """A UTF-8 text file, or one ConfigError line naming it (missing, unreadable, not UTF-8)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError([f"{path}: {what} not found" + (" (it is a folder)" if p.is_dir() else "")])
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError([f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                           "save it as UTF-8"]) from None
    except OSError as e:
        raise ConfigError([f"{path}: cannot read ({e.strerror or e})"]) from None


def load_yaml(path: str | Path) -> dict:
    text = read_text_file(path)
    try:
        data = parse_yaml(text)
    except yaml.YAMLError as e:
        raise ConfigError([f"{path}: not valid YAML: {yaml_problem(e)}"]) from None
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
        if not all(p.strip() for p in parts):
            problems.append(f"override '{key.strip()}': empty part in the key path (expected key.path=value)")
            continue
        try:
            value = parse_yaml(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            # The value is not echoed: it may be a secret typed on the command line.
            problems.append(f"override '{key.strip()}': the value is not valid YAML ({yaml_problem(e)}); "
                            "quote it, e.g. key='text'")
            continue
        node = data
        for i, part in enumerate(parts[:-1]):
            if not isinstance(node, dict) or not isinstance(node.get(part, {}), dict):
                problems.append(f"override '{key.strip()}': {'.'.join(parts[: i + 1])} is not a section")
                break
            node = node.setdefault(part, {})
        else:
            node[parts[-1]] = value
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
    # Numeric bounds first: a stage's own cross-field checks may assume sane values (a division by batch_size).
    problems = bound_problems(cfg) or cfg.problems()
    if problems:
        raise ConfigError([_where(path, key, touched) + msg for key, msg in problems])
    register_env_secrets(cfg)
    return cfg


# -- numeric bounds by key name, for every stage ---------------------------------------------------------
# Checked where pydantic's types cannot say it: a learning rate of -1 or a batch of 0 would otherwise surface
# as a traceback deep in a trainer (`KeyError: 'eval_loss'` for max_length=0).

_POSITIVE = ("lr", "learning_rate", "epochs", "timeout_s")
_AT_LEAST_ONE = ("grad_accum", "max_new_tokens", "max_tokens", "cot_max_tokens", "logging_steps", "save_steps",
                 "shard_size", "judge_batch", "updates", "ppo_epochs", "num_iterations", "concurrency", "hidden_size",
                 "layers", "heads", "vocab_size", "threads", "max_prompts", "top_logprobs")
_NON_NEGATIVE = ("retries", "backoff_s", "weight_decay", "top_k", "few_shot_n", "save_total_limit",
                 "label_smoothing", "max_grad_norm", "last_layers")
_FRACTION = ("warmup_ratio", "dropout")
SEED_MAX = 2**32 - 1


def _bound(name: str, value) -> str | None:
    """The problem with a numeric key's value, judged by its name; None when fine or not a number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if name in _POSITIVE or name.endswith("_lr"):
        return None if value > 0 else f"must be > 0, got {value}"
    if name.endswith(("batch_size", "max_length", "_length")) or name in _AT_LEAST_ONE:
        return None if value >= 1 else f"must be >= 1, got {value}"
    if name == "max_steps":
        return None if value == -1 or value >= 1 else f"must be >= 1 (or -1: run the epochs), got {value}"
    if name == "seed":
        return None if 0 <= value <= SEED_MAX else f"must be in [0, {SEED_MAX}], got {value}"
    if name in _NON_NEGATIVE:
        return None if value >= 0 else f"must be >= 0, got {value}"
    if name in _FRACTION:
        return None if 0 <= value < 1 else f"must be in [0, 1), got {value}"
    return None


def bound_problems(model: BaseModel, prefix: str = "") -> list[tuple[str, str]]:
    """(key path, message) for every numeric key out of its range, through nested sections and lists of them."""
    out = []
    for name in type(model).model_fields:
        value, key = getattr(model, name, None), f"{prefix}{name}"
        if isinstance(value, BaseModel):
            out += bound_problems(value, key + ".")
        elif isinstance(value, (list, tuple)):
            out += [p for i, v in enumerate(value) if isinstance(v, BaseModel)
                    for p in bound_problems(v, f"{key}.{i}.")]
        elif (msg := _bound(name, value)) is not None:
            out.append((key, msg))
    return out


def _loc(err: dict) -> str:
    # pydantic adds union/tagged-union branch names to loc; keep only real keys.
    return ".".join(str(p) for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p.startswith("function-"))))


def _where(path, key: str, touched: set[str]) -> str:
    # An override can make the key (`train.max_steps=2` on a stage with no `train`: the error names `train`).
    mine = any(key == t or key.startswith(t + ".") or t.startswith(key + ".") for t in touched)
    src = f"{path} (command line)" if key and mine else str(path)
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
    if kind in ("strict_number", "strict_bool", "env_name", "unsafe_name"):
        return err["msg"] + ("" if kind in ("env_name", "strict_number", "strict_bool") else f" (got {value!r})")
    if kind == "finite_number":
        return f"expected a finite number, got {value!r}"
    if kind == "value_error":
        return err["msg"].removeprefix("Value error, ")
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
    """The resolved config as plain JSON data, secrets redacted: by key name, by value (what `*_env` variables
    hold), and credentials in URLs."""
    return scrub(redact(cfg.model_dump(mode="json")))


def config_hash(cfg: StageConfig) -> str:
    """Hash of what changes the result: run name, threads, the oneDNN cache, tracking and secrets are left out."""
    data = {k: v for k, v in config_dict(cfg).items() if k not in ("run", "threads", "onednn_cache", "tracking",
                                                                   "report_to", "allow_failed_inputs")}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
