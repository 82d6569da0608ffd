"""The config: one pydantic model per YAML section, `extends` chains and KEY=VALUE overrides.

Every problem of a config (its files, its overrides, its values) is collected and raised as
one `ConfigError`, each message naming its dotted key. `model:` and `objective:` hold a
registry name plus that builder's keyword-only options, validated against its signature.
Registries are reached through `_registries()` on first use, so importing this module
imports neither torch nor the registry packages.
"""

from __future__ import annotations

import copy
import difflib
import functools
import hashlib
import inspect
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, create_model, model_serializer
from pydantic import model_validator
from pydantic_core import PydanticCustomError

from ptft.errors import ConfigError, UserError
from ptft.registry import Registry


def _conflict(keys: tuple[str, ...], message: str) -> PydanticCustomError:
    # The keys ride along in ctx so that the message can name every key involved.
    return PydanticCustomError("conflict", "{message}", {"keys": keys, "message": message})


def _device(value: str) -> str:
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
        raise ValueError("auto, cpu, cuda, cuda:N or mps")  # read as "expected <this>, got <value>"
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class RunSection(_Section):
    """Where the run writes, and its seed."""

    dir: str = "runs/default"
    """Output directory of the run (default: runs/<stem of the config file>)."""
    seed: int = Field(0, ge=0)
    """Global seed: initialisation, batch order, noise, masks and augmentations."""


class DataSection(_Section):
    """The dataset, its validation split and the labelled subset used for finetuning."""

    name: str = "digits"
    """Dataset from the DATASETS registry (`ptft models` lists them)."""
    root: str = "data"
    """Folder holding the dataset's files."""
    download: bool = False
    """Download missing files; otherwise missing files are an error."""
    batch_size: int = Field(128, ge=1)
    """Training batch size (global: split across processes under torchrun)."""
    eval_batch_size: int = Field(1024, ge=1)
    """Batch size of validation and evaluation."""
    val_fraction: float = Field(0.1, gt=0, lt=1)
    """Fraction of the dataset's train split held out for validation."""
    split_seed: int = Field(0, ge=0)
    """Seed of the validation split and the labelled subset (keep it across stages)."""
    label_fraction: float | None = Field(None, gt=0, le=1)
    """Labelled subset: this fraction of the training examples, stratified by class."""
    labels_per_class: int | None = Field(None, ge=1)
    """Labelled subset: this many training examples per class."""

    @model_validator(mode="after")
    def _one_label_budget(self) -> DataSection:
        if self.label_fraction is not None and self.labels_per_class is not None:
            raise _conflict(("label_fraction", "labels_per_class"), "set at most one of the two label budgets")
        return self


class _BuilderSection(_Section):
    name: str
    options: dict[str, Any] = {}
    """The builder's keyword-only options, defaults filled in (flat beside `name` in YAML)."""

    @model_serializer
    def _flat(self) -> dict[str, Any]:
        # Written as the user writes it: options beside the name, not nested.
        return {"name": self.name, **self.options}


class ModelSection(_BuilderSection):
    """The model: a MODELS name plus that builder's keyword-only options."""

    name: str = "mlp_autoencoder"
    """Model from the MODELS registry, or `package.module:builder`."""


class ObjectiveSection(_BuilderSection):
    """The training loss: an OBJECTIVES name plus that builder's keyword-only options."""

    name: str = "auto"
    """Objective from OBJECTIVES; auto: reconstruction for autoencoders, supervised for classifiers."""


class InitSection(_Section):
    """Weights to start from (finetuning)."""

    checkpoint: str | None = None
    """Checkpoint directory, run directory or foreign weights file; null trains from scratch."""
    strict: bool = True
    """Fail unless every encoder key of the model is loaded; false loads what matches and reports the rest."""
    prefix_map: dict[str, str] = {}
    """Renames of foreign key prefixes, e.g. {'backbone.': 'encoder.'}."""
    load_head: bool = False
    """Also load the head's weights when their shapes match (same classes)."""


class FinetuneSection(_Section):
    """What trains during finetuning."""

    mode: Literal["full", "linear_probe"] = "full"
    """full: train all but `freeze`; linear_probe: freeze the encoder, train the head."""
    freeze: list[str] = []
    """Parameter name patterns (fnmatch) to freeze, e.g. 'encoder.*'."""
    unfreeze_at_step: int | None = Field(None, ge=1)
    """Unfreeze everything from this step on (gradual unfreezing)."""
    head_lr: float | None = Field(None, gt=0)
    """Learning rate of the head (default: optim.lr)."""
    layer_decay: float | None = Field(None, gt=0, le=1)
    """Layer-wise lr decay: encoder layer l of L trains at lr * layer_decay ** (L - l)."""

    @model_validator(mode="after")
    def _consistent_freezing(self) -> FinetuneSection:
        if self.mode == "linear_probe" and self.freeze:
            raise _conflict(("mode", "freeze"), "linear_probe already freezes the whole encoder; leave freeze empty")
        if self.unfreeze_at_step is not None and self.mode == "full" and not self.freeze:
            raise _conflict(("unfreeze_at_step", "freeze"),
                            "nothing is frozen to unfreeze (mode full, freeze empty); set freeze or mode linear_probe")
        return self


_Beta = Annotated[float, Field(ge=0, lt=1)]


class OptimSection(_Section):
    """The optimizer."""

    name: str = "adam"
    """Optimizer from the OPTIMIZERS registry: sgd, adam, adamw."""
    lr: float = Field(1e-3, gt=0)
    """Base learning rate (after warmup)."""
    weight_decay: float = Field(0.0, ge=0)
    """Weight decay (L2 for sgd and adam, decoupled for adamw)."""
    momentum: float = Field(0.9, ge=0, lt=1)
    """SGD momentum."""
    nesterov: bool = False
    """SGD: Nesterov momentum."""
    betas: tuple[_Beta, _Beta] = (0.9, 0.999)
    """Adam and AdamW: decay rates of the gradient's first and second moments."""


class ScheduleSection(_Section):
    """The learning-rate schedule, per optimizer step."""

    name: str = "constant"
    """Schedule from the SCHEDULES registry: constant, cosine, step."""
    warmup_steps: int = Field(0, ge=0)
    """Steps of linear warmup from lr / warmup_steps to lr."""
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    """cosine: final lr as a fraction of lr."""
    step_size: int = Field(1000, ge=1)
    """step: steps between decays."""
    gamma: float = Field(0.1, gt=0, le=1)
    """step: factor applied to the lr every step_size steps."""


class TrainSection(_Section):
    """The training loop."""

    epochs: int | None = Field(None, ge=1)
    """Length in passes over the training data (set this or max_steps)."""
    max_steps: int | None = Field(None, ge=1)
    """Length in optimizer steps (set this or epochs)."""
    device: Annotated[str, AfterValidator(_device)] = "auto"
    """auto (cuda, else mps, else cpu), cpu, cuda, cuda:N or mps."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Autocast precision; fp16 also scales the loss."""
    grad_clip: float | None = Field(None, gt=0)
    """Clip the gradients' global norm to this value."""
    accumulate: int = Field(1, ge=1)
    """Batches whose gradients add up to one optimizer step."""
    compile: bool = False
    """Compile the model with torch.compile."""
    eval_every_steps: int | None = Field(None, ge=1)
    """Validate every this many steps (default: once per epoch) and at the end."""
    log_every_steps: int = Field(50, ge=1)
    """Log the training loss every this many steps."""
    early_stopping_patience: int | None = Field(None, ge=1)
    """Stop after this many evaluations without a new best checkpoint.monitor."""

    @model_validator(mode="after")
    def _one_length(self) -> TrainSection:
        if (self.epochs is None) == (self.max_steps is None):
            got = "neither" if self.epochs is None else "both"
            raise _conflict(("epochs", "max_steps"), f"set exactly one of the two; got {got}")
        return self


class CheckpointSection(_Section):
    """When checkpoints are saved and which one is best."""

    every_steps: int | None = Field(None, ge=1)
    """Save every this many steps (default: at every evaluation)."""
    keep_last: int = Field(2, ge=1)
    """Step checkpoints kept besides best."""
    monitor: str = "val/loss"
    """Validation metric that decides the best checkpoint."""
    mode: Literal["min", "max"] = "min"
    """Whether a smaller or a larger monitor value is better."""


class Config(BaseModel):
    """A validated, resolved config; build changed copies with `model_copy(update=...)`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    run: RunSection
    data: DataSection
    model: ModelSection
    objective: ObjectiveSection
    init: InitSection
    finetune: FinetuneSection
    optim: OptimSection
    schedule: ScheduleSection
    train: TrainSection
    checkpoint: CheckpointSection


# ---- public entry points ---------------------------------------------------------------------

def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config (with its `extends` bases), apply overrides, validate.

    Args:
        path: the config file; `run.dir` defaults to `runs/<its stem>`.
        overrides: `KEY=VALUE` strings, the value read as YAML, applied in order.
    Returns:
        The validated config, every default filled in.
    Raises:
        ConfigError: every problem of the files, the overrides and the values, together.
    """
    path = Path(path)
    problems: list[_Problem] = []
    raw = _read_with_bases(path, (), problems)
    return _finish(None if problems else raw, overrides, f"runs/{path.stem}", str(path), problems)


def config_from_dict(data: dict, source: str, overrides: Sequence[str] = ()) -> Config:
    """Validate an already loaded config (e.g. RUN_DIR/config.yaml or a checkpoint's meta.json).

    Args:
        data: the sections as a mapping; it is not modified.
        source: where `data` came from, named in error messages.
        overrides: `KEY=VALUE` strings, as for `load_config`.
    Raises:
        ConfigError: every problem of `data` and the overrides, together.
    """
    problems: list[_Problem] = []
    if not isinstance(data, dict):
        problems.append(_Problem((), f"{source}: expected a mapping of config sections, got {_show(data)}"))
    raw = copy.deepcopy(data) if isinstance(data, dict) else None
    return _finish(raw, overrides, "runs/default", source, problems)


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


def parse_override(text: str) -> tuple[list[str], object]:
    """Split `KEY=VALUE` into the key's parts and the value read as YAML.

    `optim.lr=0.01` -> (['optim', 'lr'], 0.01); `init.checkpoint=null` -> (['init', 'checkpoint'], None).

    Raises:
        ConfigError: no `=`, a key that is not a dotted path of identifiers, or an empty or
            unreadable value.
    """
    key, sep, value_text = text.partition("=")
    if not sep or not _OVERRIDE_KEY.fullmatch(key) or not value_text.strip():
        raise ConfigError([f"override {text!r}: {_OVERRIDE_FORM}"])
    try:
        value = yaml.safe_load(value_text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"override {text!r}: the value is not YAML ({getattr(exc, 'problem', exc)}); "
                           f"{_OVERRIDE_FORM}"]) from None
    return key.split("."), value


# ---- reading files ---------------------------------------------------------------------------

_OVERRIDE_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_OVERRIDE_FORM = ("expected KEY=VALUE with KEY a dotted path and VALUE in YAML, "
                  "e.g. optim.lr=0.01 or model.hidden=[256,128]")


@dataclass(frozen=True)
class _Problem:
    keys: tuple[str, ...]  # the dotted keys it is about; empty for problems of a file as a whole
    message: str


@dataclass(frozen=True)
class _Override:
    keys: list[str]
    value: object
    text: str


class _Dumper(yaml.SafeDumper):
    """Block-style sections with flow-style lists: `hidden: [256, 128]`."""


_Dumper.add_representer(list, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data,
                                                                             flow_style=True))


def _read_with_bases(path: Path, chain: tuple[Path, ...], problems: list[_Problem]) -> dict | None:
    """The file's mapping over its `extends` bases (merged first to last), or None on a problem."""
    data = _read_mapping(path, problems)
    if data is None:
        return None
    merged: dict = {}
    for base in _extends_list(path, data.pop("extends", None), problems):
        base_path = path.parent / base
        if any(base_path.resolve() == seen.resolve() for seen in (*chain, path)):
            problems.append(_Problem((), f"extends cycle: {' -> '.join(map(str, (*chain, path, base_path)))}"))
        elif not base_path.exists():
            problems.append(_Problem((), f"{path}: extends {base!r}, but {base_path} does not exist"))
        else:
            merged = _merge_layer(merged, _read_with_bases(base_path, (*chain, path), problems) or {})
    return _merge_layer(merged, data)


def _read_mapping(path: Path, problems: list[_Problem]) -> dict | None:
    def fail(message: str) -> None:
        problems.append(_Problem((), f"{path}{message}"))

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return fail(": no such config file")
    except IsADirectoryError:
        return fail(": is a directory, expected a YAML config file")
    except OSError as exc:
        return fail(f": cannot read the config file ({exc.strerror or exc})")
    except UnicodeDecodeError:
        return fail(": is not UTF-8 text, expected a YAML config file")
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        return fail(f":{mark.line + 1}:{mark.column + 1}: YAML syntax error: {exc.problem or exc.context}")
    except yaml.YAMLError as exc:
        return fail(f": YAML syntax error: {exc}")
    if data is None:
        return fail(": the file is empty; expected a mapping of config sections such as 'train:'")
    if not isinstance(data, dict):
        return fail(f": expected a mapping of config sections at the top level, got {_show(data)}")
    return data


def _extends_list(path: Path, extends: object, problems: list[_Problem]) -> list[str]:
    if extends is None:
        return []
    if isinstance(extends, str):
        return [extends]
    if isinstance(extends, list) and all(isinstance(item, str) for item in extends):
        return extends
    expected = "a file name or a list of file names"
    problems.append(_Problem((), f"{path}: extends: expected {expected}, got {_show(extends)}"))
    return []


def _merge_layer(base: dict, layer: dict) -> dict:
    """`layer` over `base`: mappings merge key by key, other values replace."""
    merged = dict(base)
    for key, value in layer.items():
        old = merged.get(key)
        if isinstance(old, dict) and isinstance(value, dict) and not _renames_builder(key, old, value):
            merged[key] = _merge_layer(old, value)
        else:
            merged[key] = value
    return merged


def _renames_builder(section: object, old: object, new: object) -> bool:
    # Options belong to the builder named beside them: naming another builder starts afresh.
    if section not in _BUILDER_SECTIONS or not isinstance(new, dict) or "name" not in new:
        return False
    if not isinstance(old, dict):
        return True
    return new["name"] != old.get("name", _BUILDER_SECTIONS[section].model_fields["name"].default)


def _finish(raw: dict | None, overrides: Sequence[str], default_run_dir: str, source: str,
            problems: list[_Problem]) -> Config:
    parsed = []
    for text in overrides:
        try:
            keys, value = parse_override(text)
        except ConfigError as exc:
            problems.extend(_Problem((), message) for message in exc.problems)
        else:
            parsed.append(_Override(keys, value, text))
    cfg = None
    if raw is not None:
        _apply_overrides(raw, parsed)
        cfg = _validate(raw, default_run_dir, problems)
    if problems:
        raise ConfigError([_render(problem, parsed) for problem in problems], source=source)
    return cfg


def _apply_overrides(raw: dict, overrides: list[_Override]) -> None:
    for override in overrides:
        section, *rest = override.keys
        if rest == ["name"] and _renames_builder(section, raw.get(section), {"name": override.value}):
            raw[section] = {}
    for override in overrides:
        node = raw
        for key in override.keys[:-1]:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        node[override.keys[-1]] = override.value


def _render(problem: _Problem, overrides: list[_Override]) -> str:
    """`key (from override 'text'): message` when an override set the key, a key above it or inside it."""
    if not problem.keys:
        return problem.message
    origin = ""
    for override in reversed(overrides):
        if any(_nested(key.split("."), override.keys) for key in problem.keys):
            origin = f" (from override {override.text!r})"
            break
    return f"{', '.join(problem.keys)}{origin}: {problem.message}"


def _nested(a: list[str], b: list[str]) -> bool:
    shorter = min(len(a), len(b))
    return a[:shorter] == b[:shorter]


def _flatten(cfg: Config) -> dict[str, object]:
    return {f"{name}.{key}": value for name, section in cfg.model_dump(mode="json").items()
            for key, value in section.items()}


# ---- validation ------------------------------------------------------------------------------

_BUILDER_SECTIONS: dict[str, type[_BuilderSection]] = {"model": ModelSection, "objective": ObjectiveSection}
_NAMED_SECTIONS = {"data": "datasets", "optim": "optimizers", "schedule": "schedules"}
_AUTO_OBJECTIVES = {"autoencoder": "reconstruction", "classifier": "supervised"}


class _Registries(NamedTuple):
    models: Registry
    objectives: Registry
    datasets: Registry
    optimizers: Registry
    schedules: Registry


def _registries() -> _Registries:
    # Imported on first use: `import ptft.config` stays light, and tests substitute small registries.
    from ptft.data import DATASETS
    from ptft.models import MODELS
    from ptft.objectives import OBJECTIVES
    from ptft.optim import OPTIMIZERS, SCHEDULES

    return _Registries(MODELS, OBJECTIVES, DATASETS, OPTIMIZERS, SCHEDULES)


def _validate(raw: dict, default_run_dir: str, problems: list[_Problem]) -> Config | None:
    registries = _registries()
    problems.extend(_unknown("", str(key), list(Config.model_fields)) for key in raw if key not in Config.model_fields)
    sections: dict[str, BaseModel | None] = {}
    for name, field in Config.model_fields.items():  # model before objective: "auto" needs the model
        values = _section_values(raw, name, problems)
        if values is None:
            sections[name] = None
        elif name == "model":
            sections[name] = _validate_builder(name, values, registries.models, problems)
        elif name == "objective":
            sections[name] = _validate_objective(values, sections["model"], registries, problems)
        else:
            if name == "run":
                values.setdefault("dir", default_run_dir)
            if name in _NAMED_SECTIONS:
                _check_registered(name, values, getattr(registries, _NAMED_SECTIONS[name]), problems)
            sections[name] = _validate_section(field.annotation, name, values, problems)
    if problems or any(section is None for section in sections.values()):
        return None
    return Config(**sections)


def _section_values(raw: dict, name: str, problems: list[_Problem]) -> dict | None:
    values = raw.get(name)
    if values is None:  # absent, or a heading with every key commented out
        return {}
    if not isinstance(values, dict):
        problems.append(_Problem((name,), f"expected a mapping of keys, got {_show(values)}"))
        return None
    return {str(key): value for key, value in values.items()}  # YAML allows `1: x`; a key is a name


def _check_registered(section: str, values: dict, registry: Registry, problems: list[_Problem]) -> None:
    name = values.get("name", Config.model_fields[section].annotation.model_fields["name"].default)
    if isinstance(name, str) and name not in registry:
        problems.append(_Problem((f"{section}.name",), registry.unknown_message(name)))


def _validate_section(cls: type[BaseModel], section: str, values: dict, problems: list[_Problem]) -> BaseModel | None:
    try:
        return cls.model_validate(values)
    except ValidationError as exc:
        problems.extend(_explain(exc, section, cls, values, list(cls.model_fields)))
        return None


def _validate_builder(section: str, values: dict, registry: Registry,
                      problems: list[_Problem]) -> _BuilderSection | None:
    """The section with the builder's options validated and defaults filled in, or None."""
    cls = _BUILDER_SECTIONS[section]
    name = values.pop("name", cls.model_fields["name"].default)
    if not isinstance(name, str):
        problems.append(_Problem((f"{section}.name",), f"expected a {registry.kind} name, got {_show(name)}"))
        return None
    try:
        options_model = _options_model(registry.get(name))
    except UserError as exc:
        problems.append(_Problem((f"{section}.name",), str(exc)))
        return None
    try:
        options = options_model.model_validate(values).model_dump()
    except ValidationError as exc:
        problems.extend(_explain(exc, section, options_model, values, ["name", *options_model.model_fields]))
        return None
    return cls(name=name, options=options)


def _validate_objective(values: dict, model: ModelSection | None, registries: _Registries,
                        problems: list[_Problem]) -> ObjectiveSection | None:
    if values.get("name", "auto") == "auto":
        if model is None:  # which objective "auto" means depends on a valid model
            return None
        kind = registries.models.meta(model.name).get("kind")
        if kind not in _AUTO_OBJECTIVES:
            known_kind = f"kind {kind!r}" if kind else "no registered kind"
            problems.append(_Problem(("objective.name",), (
                f"'auto' cannot choose an objective for model {model.name!r} ({known_kind}); "
                f"set objective.name to one of {', '.join(registries.objectives.names())}")))
            return None
        values["name"] = _AUTO_OBJECTIVES[kind]
    objective = _validate_builder("objective", values, registries.objectives, problems)
    if objective is not None and model is not None:
        _check_model_kind(model.name, objective.name, registries, problems)
    return objective


def _check_model_kind(model_name: str, objective_name: str, registries: _Registries, problems: list[_Problem]) -> None:
    kind = registries.models.meta(model_name).get("kind")
    accepted = registries.objectives.meta(objective_name).get("model_kinds")
    if kind and accepted and kind not in accepted:
        problems.append(_Problem(("objective.name",), (
            f"objective {objective_name!r} trains {' or '.join(accepted)} models, but model.name {model_name!r} "
            f"is a model of kind {kind!r}; choose a matching model.name or objective.name")))


@functools.lru_cache(maxsize=None)
def _options_model(builder) -> type[BaseModel]:
    """A pydantic model of the builder's keyword-only parameters; positional ones are ptft's runtime inputs."""
    parameters = inspect.signature(builder, eval_str=True).parameters.values()
    fields = {
        p.name: (Any if p.annotation is p.empty else p.annotation, ... if p.default is p.empty else p.default)
        for p in parameters if p.kind is p.KEYWORD_ONLY
    }
    config = ConfigDict(extra="forbid", protected_namespaces=())
    return create_model(f"{getattr(builder, '__name__', 'builder')}_options", __config__=config, **fields)


# ---- messages --------------------------------------------------------------------------------

def _explain(exc: ValidationError, section: str, cls: type[BaseModel], values: dict,
             known: list[str]) -> list[_Problem]:
    """One problem per offending key of `section`, in the words of the schema."""
    properties = _schema_properties(cls)
    problems, seen = [], set()
    for error in exc.errors():
        if not error["loc"]:  # a rule across keys, from a model validator
            ctx = error.get("ctx", {})
            keys = tuple(f"{section}.{key}" for key in ctx.get("keys", ())) or (section,)
            problems.append(_Problem(keys, ctx.get("message", error["msg"])))
            continue
        field = str(error["loc"][0])
        if field in seen:
            continue
        seen.add(field)
        if error["type"] == "extra_forbidden":
            problems.append(_unknown(section, field, known))
        elif error["type"] == "missing":
            problems.append(_Problem((f"{section}.{field}",), f"required; expected {_describe(properties[field])}"))
        else:
            expected = error["ctx"]["error"] if error["type"] == "value_error" else _describe(properties[field])
            problems.append(_Problem((f"{section}.{field}",), f"expected {expected}, got {_show(values[field])}"))
    return problems


def _unknown(section: str, key: str, known: list[str]) -> _Problem:
    """`optim.lrr: unknown key; did you mean 'optim.lr'?` (for a top-level section when `section` is empty)."""
    qualify = (lambda name: f"{section}.{name}") if section else (lambda name: name)
    what = "key" if section else "section"
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    if close:
        hint = f"did you mean {' or '.join(repr(qualify(name)) for name in close)}?"
    else:
        hint = f"known {what}s: {', '.join(known)}"
    return _Problem((qualify(key),), f"unknown {what}; {hint}")


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
        return "one of " + ", ".join(_show(v) for v in schema.get("enum", [schema.get("const")]))
    kind = schema.get("type")
    if kind in _NOUNS:
        return _NOUNS[kind][plural] + _bounds(schema)
    lists = "lists" if plural else "a list"
    if kind == "array" and "prefixItems" in schema:
        items = [_describe(item, plural=True) for item in schema["prefixItems"]]
        return f"{lists} of {len(items)} {items[0]}" if len(set(items)) == 1 else f"{lists} of [{', '.join(items)}]"
    if kind == "array":
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


def _show(value: object, limit: int = 80) -> str:
    """A value as the user wrote it in YAML: 'text', 3, null, true, [1, 2], {a: 1}."""
    if isinstance(value, str):
        text = repr(value)
    elif value is None or isinstance(value, bool):
        text = json.dumps(value)
    elif isinstance(value, (list, tuple)):
        text = "[" + ", ".join(_show(item, limit) for item in value) + "]"
    elif isinstance(value, dict):
        text = "{" + ", ".join(f"{key}: {_show(item, limit)}" for key, item in value.items()) + "}"
    else:
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
