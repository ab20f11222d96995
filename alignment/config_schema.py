"""`align config schema STAGE`: every key of a stage's config, with its type, default and docstring.

Read from the pydantic schema itself (field annotations, defaults, and the string under each field, which
`Section` turns into the field's description), so it cannot drift from what the loader accepts."""

from __future__ import annotations

import enum
import json
import types
import typing

from pydantic import BaseModel
from pydantic_core import PydanticUndefined


def _is_model(t) -> bool:
    return isinstance(t, type) and issubclass(t, BaseModel)


def type_name(ann) -> str:
    """A short reader's name: `float`, `int | None`, `one of 'a', 'b'`, `list[str]`, `SFTData`."""
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if ann is type(None):
        return "None"
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(type_name(a) for a in args)}]" if args else name
    if isinstance(ann, type):
        return ann.__name__
    return str(ann).replace("typing.", "")


def _default(field) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    try:
        value = field.get_default(call_default_factory=True)
    except TypeError:  # a factory that needs the validated data
        return "computed"
    if isinstance(value, BaseModel):
        return "(section)"
    if isinstance(value, enum.Enum):
        value = value.value
    return "= " + json.dumps(value, default=str)


def _nested(ann) -> list[tuple[str, type[BaseModel]]]:
    """[(how keys below it are written, a section model)] when a field holds sections (maybe in a list/dict, or
    one of several: a discriminated union lists each)."""
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is typing.Annotated:
        return _nested(args[0])
    if _is_model(ann):
        return [(".", ann)]
    if origin in (typing.Union, types.UnionType):
        return [(".", a) for a in args if _is_model(a)]
    if origin is list and args and _is_model(args[0]):
        return [(".<i>.", args[0])]
    if origin is dict and len(args) == 2 and _is_model(args[1]):
        return [(".<name>.", args[1])]
    return []


def schema_lines(model: type[BaseModel], prefix: str = "") -> list[str]:
    lines = []
    for name, field in model.model_fields.items():
        key = prefix + name
        aliases = [a for a in getattr(field.validation_alias, "choices", ()) if a != name]
        head = f"{key}: {type_name(field.annotation)} {_default(field)}"
        if aliases:
            head += f"  (also: {', '.join(aliases)})"
        lines.append(head)
        for line in (field.description or "").strip().splitlines():
            lines.append("    " + line.strip())
        nested = _nested(field.annotation)
        for sep, sub in nested:
            if len(nested) > 1:
                lines.append(f"{key} as {sub.__name__}:")
            lines += schema_lines(sub, key + sep)
    return lines


def stage_schema(stage: str) -> str:
    from alignment.runner import stage_module

    model = stage_module(stage).Config
    intro = [f"# {stage}: every key of configs/<profile>/{stage}.yaml (override with key.path=value)",
             *(f"# {line.strip()}" for line in (model.__doc__ or "").strip().splitlines() if line.strip())]
    return "\n".join(intro + schema_lines(model)) + "\n"
