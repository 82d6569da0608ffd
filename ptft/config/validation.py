"""Validation of a merged config mapping against the schema and the registries.

`model:` and `objective:` hold a registry name plus that builder's keyword-only options,
validated against its signature. Registries are reached through `load_registries()` on first use,
so importing this module imports neither torch nor the registry packages.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, NamedTuple

from pydantic import BaseModel, ValidationError, create_model

from ptft.config.messages import Problem, explain, show, unknown_key
from ptft.config.schema import BUILDER_SECTIONS, BuilderOptions, Config, ModelSection, ObjectiveSection
from ptft.config.trust import ImportTrust
from ptft.errors import UserError
from ptft.registry import Registry

_NAMED_SECTIONS = {"data": "datasets", "optim": "optimizers", "schedule": "schedules"}
_AUTO_OBJECTIVES = {"autoencoder": "reconstruction", "classifier": "supervised"}


class Registries(NamedTuple):
    models: Registry
    objectives: Registry
    datasets: Registry
    optimizers: Registry
    schedules: Registry


def load_registries() -> Registries:
    # Imported on first use: `import ptft.config` stays light, and tests substitute small registries.
    from ptft.data import DATASETS
    from ptft.models import MODELS
    from ptft.objectives import OBJECTIVES
    from ptft.optim import OPTIMIZERS, SCHEDULES

    return Registries(MODELS, OBJECTIVES, DATASETS, OPTIMIZERS, SCHEDULES)


def validate_config(raw: dict, default_run_dir: str, problems: list[Problem],
                    trust: ImportTrust | None = None) -> Config | None:
    """The config of a merged mapping, or None with its problems (every section's) added to `problems`.

    `trust`: for a config read from a run, which `package.module:builder` names may be imported;
    None for the user's own config, whose names are all theirs.
    """
    registries = load_registries()
    known_sections = list(Config.model_fields)
    problems.extend(unknown_key("", str(key), known_sections) for key in raw if key not in known_sections)
    sections: dict[str, BaseModel | None] = {}
    for name, field in Config.model_fields.items():  # model before objective: "auto" needs the model
        values = _section_values(raw, name, problems)
        if values is None or _refused_import(name, values, registries, trust, problems):
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
    if sections.get("data") is not None:
        _check_image_size(sections["data"], registries.datasets, problems)
    if problems or any(section is None for section in sections.values()):
        return None
    return Config(**sections)


def _refused_import(section: str, values: dict, registries: Registries, trust: ImportTrust | None,
                    problems: list[Problem]) -> bool:
    """Whether the section names a builder to import that `trust` does not allow; checked before any import."""
    registry = {"model": registries.models, "objective": registries.objectives}.get(section)
    name = values.get("name")
    if trust is None or registry is None or not isinstance(name, str) or not registry.is_import_path(name):
        return False
    if trust.allows(name):
        return False
    problems.append(Problem((f"{section}.name",), trust.refusal(name)))
    return True


def _check_image_size(data: BaseModel, datasets: Registry, problems: list[Problem]) -> None:
    """data.image_size only for datasets that resize (registered with image_size=True); data.decode_size
    only beside it, and no smaller."""
    resizes = datasets.meta(data.name).get("image_size")
    if data.decode_size is not None and not resizes:
        problems.append(Problem(("data.decode_size",), f"{data.name} images are not decoded from files; only "
                                                       f"{_resizing(datasets)} keeps them larger (remove it)"))
    elif data.decode_size is not None and data.image_size is None:
        problems.append(Problem(("data.decode_size",), "keeps images larger than data.image_size, which is not set; "
                                                       "set data.image_size (the model's input size) too"))
    elif data.decode_size is not None and data.decode_size < data.image_size:
        problems.append(Problem(("data.decode_size",), f"{data.decode_size} is smaller than data.image_size "
                                                       f"{data.image_size}; set it to at least {data.image_size}"))
    if data.image_size is None or resizes:
        return
    problems.append(Problem(("data.image_size",), f"only {_resizing(datasets)} resizes images; {data.name} images "
                                                  "keep their size (remove data.image_size)"))


def _resizing(datasets: Registry) -> str:
    return " and ".join(name for name in datasets.names() if datasets.meta(name).get("image_size"))


def _section_values(raw: dict, name: str, problems: list[Problem]) -> dict | None:
    values = raw.get(name)
    if values is None:  # absent, or a heading with every key commented out
        return {}
    if not isinstance(values, dict):
        problems.append(Problem((name,), f"expected a mapping of keys, got {show(values)}"))
        return None
    return {str(key): value for key, value in values.items()}  # YAML allows `1: x`; a key is a name


def _check_registered(section: str, values: dict, registry: Registry, problems: list[Problem]) -> None:
    name = values.get("name", Config.model_fields[section].annotation.model_fields["name"].default)
    if isinstance(name, str) and name not in registry:
        problems.append(Problem((f"{section}.name",), registry.unknown_message(name)))


def _validate_section(cls: type[BaseModel], section: str, values: dict, problems: list[Problem]) -> BaseModel | None:
    try:
        return cls.model_validate(values)
    except ValidationError as exc:
        problems.extend(explain(exc, section, cls, values, list(cls.model_fields)))
        return None


def _validate_builder(section: str, values: dict, registry: Registry,
                      problems: list[Problem]) -> ModelSection | ObjectiveSection | None:
    """The section with the builder's options validated and defaults filled in, or None."""
    cls = BUILDER_SECTIONS[section]
    name = values.pop("name", cls.model_fields["name"].default)
    if not isinstance(name, str):
        problems.append(Problem((f"{section}.name",), f"expected a {registry.kind} name, got {show(name)}"))
        return None
    try:
        builder = registry.get(name)
    except UserError as exc:
        problems.append(Problem((f"{section}.name",), str(exc)))
        return None
    options = _builder_options(section, builder, values, problems)
    return None if options is None else cls(name=name, options=options)


def check_builder_options(section: str, builder, values: dict) -> dict:
    """`values` as `builder`'s keyword options, defaults filled in, checked as the config checks them.

    For builders called from Python rather than from a config, so both meet one set of rules:
    the builder's annotations.

    Raises:
        UserError: naming each offending `section.key`, what was expected and the value given.
    """
    problems: list[Problem] = []
    options = _builder_options(section, builder, dict(values), problems)
    if problems:
        raise UserError("; ".join(f"{', '.join(p.keys)}: {p.message}" for p in problems))
    return options


def _builder_options(section: str, builder, values: dict, problems: list[Problem]) -> dict | None:
    options_model = _options_model(builder)
    try:
        return options_model.model_validate(values).model_dump()
    except ValidationError as exc:
        problems.extend(explain(exc, section, options_model, values, ["name", *options_model.model_fields]))
        return None


def _validate_objective(values: dict, model: ModelSection | None, registries: Registries,
                        problems: list[Problem]) -> ObjectiveSection | None:
    if values.get("name", "auto") == "auto":
        if model is None:  # which objective "auto" means depends on a valid model
            return None
        kind = registries.models.meta(model.name).get("kind")
        if kind not in _AUTO_OBJECTIVES:
            known_kind = f"kind {kind!r}" if kind else "no registered kind"
            problems.append(Problem(("objective.name",), (
                f"'auto' cannot choose an objective for model {model.name!r} ({known_kind}); "
                f"set objective.name to one of {', '.join(registries.objectives.names())}")))
            return None
        values["name"] = _AUTO_OBJECTIVES[kind]
    objective = _validate_builder("objective", values, registries.objectives, problems)
    if objective is not None and model is not None:
        _check_model_kind(model.name, objective.name, registries, problems)
    return objective


def _check_model_kind(model_name: str, objective_name: str, registries: Registries, problems: list[Problem]) -> None:
    from ptft.models import decoder_problem, decodes

    if decodes(model_name, objective_name):  # a library backbone gets ptft's decoder, where it has a feature map
        problem = decoder_problem(model_name, objective_name)
        problems.extend([Problem(("objective.name",), problem)] if problem else [])
        return
    kind = registries.models.meta(model_name).get("kind")
    accepted = registries.objectives.meta(objective_name).get("model_kinds")
    if kind and accepted and kind not in accepted:
        problems.append(Problem(("objective.name",), (
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
    return create_model(f"{getattr(builder, '__name__', 'builder')}_options", __base__=BuilderOptions, **fields)

