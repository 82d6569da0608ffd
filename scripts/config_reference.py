#!/usr/bin/env python3
"""Print the README's config reference (markdown) from the config schema itself.

The README embeds this output between `<!-- config-reference -->` markers, and a test
checks they agree, so the reference cannot drift from the code.
"""

from __future__ import annotations

import sys


def _type_name(annotation) -> str:
    text = getattr(annotation, "__name__", None) if not getattr(annotation, "__args__", None) else None
    text = text or str(annotation).replace("typing.", "")
    return text.replace("NoneType", "null").replace("|", "\\|")


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
            lines.append(f"| `{section}.{key}` | {_type_name(spec.annotation)} | {default} | {spec.description or ''} |")
        if section in ("model", "objective"):
            lines.append(f"| `{section}.<option>` | | | options of the chosen builder: see `ptft models` and below |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(reference())
