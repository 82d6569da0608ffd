"""Writing a resolved config back: YAML that alone reproduces the run, a hash of what it is, a diff of two."""

from __future__ import annotations

import hashlib
import json

import yaml

from ptft.config.schema import Config


def config_to_yaml(cfg: Config) -> str:
    """The resolved config as YAML: sections in schema order, builder options flat beside `name`."""
    return yaml.dump(cfg.model_dump(mode="json"), Dumper=_Dumper, sort_keys=False, allow_unicode=True)


def config_hash(cfg: Config) -> str:
    """sha256 hex of the config's canonical JSON; `run.dir` is left out (where a run lives is not what it is)."""
    data = cfg.model_dump(mode="json", exclude={"run": {"dir"}})
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def config_diff(a: Config, b: Config) -> list[str]:
    """Sorted dotted keys (`section.key`) whose values differ between `a` and `b`."""
    flat_a, flat_b = _flatten(a), _flatten(b)
    missing = object()
    return sorted(key for key in flat_a.keys() | flat_b.keys() if flat_a.get(key, missing) != flat_b.get(key, missing))


class _Dumper(yaml.SafeDumper):
    """Block-style sections with flow-style lists: `hidden: [256, 128]`."""


_Dumper.add_representer(list, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data,
                                                                             flow_style=True))


def _flatten(cfg: Config) -> dict[str, object]:
    return {f"{name}.{key}": value for name, section in cfg.model_dump(mode="json").items()
            for key, value in section.items()}
