"""The config: one pydantic model per YAML section, `extends` chains and KEY=VALUE overrides.

Every problem of a config (its files, its overrides, its values) is collected and raised as
one `ConfigError`, each message naming its dotted key. Importing this package imports
neither torch nor the registry packages.

    schema.py      the sections and `Config` (the README's config reference comes from here)
    loading.py     YAML files, `extends`, overrides: `load_config`, `config_from_dict`
    validation.py  the merged mapping against the schema and the registries' builders
    messages.py    each problem in words: dotted key, what was expected, the value given
    serialize.py   the resolved config as YAML, its hash, the keys two configs differ in
"""

from ptft.config.loading import config_from_dict, load_config, parse_override
from ptft.config.schema import (CheckpointSection, Config, DataSection, FinetuneSection, InitSection, ModelSection,
                                ObjectiveSection, OptimSection, RunSection, ScheduleSection, TrainSection)
from ptft.config.serialize import config_diff, config_hash, config_to_yaml

__all__ = [
    "CheckpointSection", "Config", "DataSection", "FinetuneSection", "InitSection", "ModelSection",
    "ObjectiveSection", "OptimSection", "RunSection", "ScheduleSection", "TrainSection",
    "config_diff", "config_from_dict", "config_hash", "config_to_yaml", "load_config", "parse_override",
]
