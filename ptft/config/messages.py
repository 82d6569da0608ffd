"""Messages of config problems: each names its dotted key, what the schema expects and the value given."""

from __future__ import annotations

import difflib
import functools
import json
from dataclasses import dataclass

from pydantic import BaseModel, ValidationError


@dataclass(frozen=True)
class Problem:
    keys: tuple[str, ...]  # the dotted keys it is about; empty for problems of a file as a whole
    message: str


def explain(exc: ValidationError, section: str, cls: type[BaseModel], values: dict,
            known: list[str]) -> list[Problem]:
    """One problem per offending key of `section`, in the words of the schema."""
    properties = _schema_properties(cls)
    problems, seen = [], set()
    for error in exc.errors():
        if not error["loc"]:  # a rule across keys, from a model validator
            ctx = error.get("ctx", {})
            keys = tuple(f"{section}.{key}" for key in ctx.get("keys", ())) or (section,)
            problems.append(Problem(keys, ctx.get("message", error["msg"])))
            continue
        field = str(error["loc"][0])
        if field in seen:
            continue
        seen.add(field)
        if error["type"] == "extra_forbidden":
            problems.append(unknown_key(section, field, known))
        elif error["type"] == "missing":
            problems.append(Problem((f"{section}.{field}",), f"required; expected {_describe(properties[field])}"))
        else:
            expected = error["ctx"]["error"] if error["type"] == "value_error" else _describe(properties[field])
            problems.append(Problem((f"{section}.{field}",), f"expected {expected}, got {show(values[field])}"))
    return problems


def unknown_key(section: str, key: str, known: list[str]) -> Problem:
    """`optim.lrr: unknown key; did you mean 'optim.lr'?` (for a top-level section when `section` is empty)."""
    qualify = (lambda name: f"{section}.{name}") if section else (lambda name: name)
    what = "key" if section else "section"
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    if close:
        hint = f"did you mean {' or '.join(repr(qualify(name)) for name in close)}?"
    else:
        hint = f"known {what}s: {', '.join(known)}"
    return Problem((qualify(key),), f"unknown {what}; {hint}")


@functools.lru_cache(maxsize=None)
def _schema_properties(cls: type[BaseModel]) -> dict[str, dict]:
    return cls.model_json_schema()["properties"]


_NOUNS = {"integer": ("an integer", "integers"), "number": ("a number", "numbers"), "string": ("a string", "strings"),
          "boolean": ("true or false", "booleans"), "null": ("null", "nulls")}


def _describe(schema: dict, plural: bool = False) -> str:
    """What a JSON schema accepts, in words: `a number > 0`, `a list of 2 numbers in [0, 1)`."""
    if "anyOf" in schema:
        return " or ".join(_describe(option, plural) for option in schema["anyOf"])
    if "enum" in schema or "const" in schema:
        return "one of " + ", ".join(show(v) for v in schema.get("enum", [schema.get("const")]))
    kind = schema.get("type")
    if kind in _NOUNS:
        return _NOUNS[kind][plural] + _bounds(schema)
    lists = "lists" if plural else "a list"
    if kind == "array" and "prefixItems" in schema:
        items = [_describe(item, plural=True) for item in schema["prefixItems"]]
        return f"{lists} of {len(items)} {items[0]}" if len(set(items)) == 1 else f"{lists} of [{', '.join(items)}]"
    if kind == "array":
        non_empty = "non-empty " if schema.get("minItems") == 1 else ""
        lists = f"{non_empty}lists" if plural else f"a {non_empty}list"
        return f"{lists} of {_describe(schema.get('items', {}), plural=True)}"
    if kind == "object":
        values = _describe(schema.get("additionalProperties", {}), plural=True)
        return f"{'mappings' if plural else 'a mapping'} of names to {values}"
    return "values" if plural else "a value"


def _bounds(schema: dict) -> str:
    low = ("[", schema["minimum"]) if "minimum" in schema else ("(", schema.get("exclusiveMinimum"))
    high = ("]", schema["maximum"]) if "maximum" in schema else (")", schema.get("exclusiveMaximum"))
    if low[1] is not None and high[1] is not None:
        return f" in {low[0]}{low[1]}, {high[1]}{high[0]}"
    if low[1] is not None:
        return f" {'>=' if low[0] == '[' else '>'} {low[1]}"
    if high[1] is not None:
        return f" {'<=' if high[0] == ']' else '<'} {high[1]}"
    return ""


def show(value: object, limit: int = 80) -> str:
    """A value as the user wrote it in YAML: 'text', 3, null, true, [1, 2], {a: 1}."""
    if isinstance(value, str):
        text = repr(value)
    elif value is None or isinstance(value, bool):
        text = json.dumps(value)
    elif isinstance(value, (list, tuple)):
        text = "[" + ", ".join(show(item, limit) for item in value) + "]"
    elif isinstance(value, dict):
        text = "{" + ", ".join(f"{key}: {show(item, limit)}" for key, item in value.items()) + "}"
    else:
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
