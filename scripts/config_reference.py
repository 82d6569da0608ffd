#!/usr/bin/env python3
"""Print the README's config reference (markdown) from the config schema itself.

The README embeds this output between `<!-- config-reference -->` markers, and a test
checks they agree, so the reference cannot drift from the code.
"""

from __future__ import annotations

import sys
import types
import typing


def _type_name(annotation) -> str:
    return _plain_type(annotation).replace("|", "\\|")


def _plain_type(annotation) -> str:
    """`int | None`, `tuple[float, float]`: the type as users read it; ranges (Annotated) are left out."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _plain_type(args[0])
    if origin is typing.Literal:
        return f"Literal[{', '.join(map(repr, args))}]"
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_plain_type(arg) for arg in args)
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_plain_type(arg) for arg in args)}]"
    return "None" if annotation is type(None) else getattr(annotation, "__name__", str(annotation))


def reference() -> str:
    from ptft.config import Config

    lines = []
    for section, field in Config.model_fields.items():
        cls = field.annotation
        lines += [f"**`{section}`** — {(cls.__doc__ or '').strip().splitlines()[0]}", "",
                  "| key | type | default | meaning |", "|---|---|---|---|"]
        for key, spec in cls.model_fields.items():
            if key == "options":  # the builder's own keys, shown as `<option>` below
                continue
            default = "required" if spec.is_required() else f"`{spec.default!r}`".replace("|", "\\|")
            lines.append(f"| `{section}.{key}` | {_type_name(spec.annotation)} | {default} | {' '.join((spec.description or '').split())} |")
        if section in ("model", "objective"):
            lines.append(f"| `{section}.<option>` | | | options of the chosen builder: see `ptft models` and below |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(reference())
