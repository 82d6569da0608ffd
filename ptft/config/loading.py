"""Reading a config: YAML files over their `extends` bases, then KEY=VALUE overrides, then validation.

Every problem of the files, the overrides and the values is collected and raised as one
`ConfigError`; a problem caused by an override names that override.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from ptft.config.messages import Problem, show
from ptft.config.schema import BUILDER_SECTIONS, Config
from ptft.config.trust import ImportTrust
from ptft.config.validation import validate_config
from ptft.errors import ConfigError

_OVERRIDE_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_OVERRIDE_FORM = ("expected KEY=VALUE with KEY a dotted path and VALUE in YAML, "
                  "e.g. optim.lr=0.01 or model.hidden=[256,128]")


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
    problems: list[Problem] = []
    raw = _read_with_bases(path, (), problems)
    return _finish(None if problems else raw, overrides, f"runs/{path.stem}", str(path), problems)


def config_from_dict(data: dict, source: str, overrides: Sequence[str] = (), *,
                     trusted_imports: Collection[str] = ()) -> Config:
    """Validate a config read from a run (e.g. a checkpoint's meta.json), importing none of its code.

    A run directory may come from anyone, so a `package.module:builder` name in `data` is refused
    unless the user named it (in `overrides` or `trusted_imports`) or allowed its module in the
    environment variable PTFT_TRUSTED_IMPORTS (see `ptft.config.trust`).

    Args:
        data: the sections as a mapping; it is not modified.
        source: where `data` came from, named in error messages.
        overrides: `KEY=VALUE` strings, as for `load_config`.
        trusted_imports: import paths the user named elsewhere, e.g. in their own config file.
    Raises:
        ConfigError: every problem of `data` and the overrides, together.
    """
    problems: list[Problem] = []
    if not isinstance(data, dict):
        problems.append(Problem((), f"{source}: expected a mapping of config sections, got {show(data)}"))
    raw = copy.deepcopy(data) if isinstance(data, dict) else None
    return _finish(raw, overrides, "runs/default", source, problems, trusted_imports)


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


# ---- files, extends, overrides -----------------------------------------------------------------

@dataclass(frozen=True)
class _Override:
    keys: list[str]
    value: object
    text: str


def _read_with_bases(path: Path, chain: tuple[Path, ...], problems: list[Problem]) -> dict | None:
    """The file's mapping over its `extends` bases (merged first to last), or None on a problem."""
    data = _read_mapping(path, problems)
    if data is None:
        return None
    merged: dict = {}
    for base in _extends_list(path, data.pop("extends", None), problems):
        base_path = path.parent / base
        if any(base_path.resolve() == seen.resolve() for seen in (*chain, path)):
            problems.append(Problem((), f"extends cycle: {' -> '.join(map(str, (*chain, path, base_path)))}"))
        elif not base_path.exists():
            problems.append(Problem((), f"{path}: extends {base!r}, but {base_path} does not exist"))
        else:
            merged = _merge_layer(merged, _read_with_bases(base_path, (*chain, path), problems) or {})
    return _merge_layer(merged, data)


def _read_mapping(path: Path, problems: list[Problem]) -> dict | None:
    def fail(message: str) -> None:
        problems.append(Problem((), f"{path}{message}"))

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
        return fail(f": expected a mapping of config sections at the top level, got {show(data)}")
    return data


def _extends_list(path: Path, extends: object, problems: list[Problem]) -> list[str]:
    if extends is None:
        return []
    if isinstance(extends, str):
        return [extends]
    if isinstance(extends, list) and all(isinstance(item, str) for item in extends):
        return extends
    expected = "a file name or a list of file names"
    problems.append(Problem((), f"{path}: extends: expected {expected}, got {show(extends)}"))
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
    if section not in BUILDER_SECTIONS or not isinstance(new, dict) or "name" not in new:
        return False
    if not isinstance(old, dict):
        return True
    return new["name"] != old.get("name", BUILDER_SECTIONS[section].model_fields["name"].default)


def _finish(raw: dict | None, overrides: Sequence[str], default_run_dir: str, source: str,
            problems: list[Problem], trusted_imports: Collection[str] | None = None) -> Config:
    """Overrides applied and validated; `trusted_imports` None: the config is the user's own."""
    parsed = []
    for text in overrides:
        try:
            keys, value = parse_override(text)
        except ConfigError as exc:
            problems.extend(Problem((), message) for message in exc.problems)
        else:
            parsed.append(_Override(keys, value, text))
    cfg, notes = None, []
    if raw is not None:
        replaced = _length_from_command_line(raw, parsed)
        notes = ([replaced] if replaced else []) + _apply_overrides(raw, parsed)
        trust = None if trusted_imports is None else ImportTrust(frozenset(trusted_imports) | _named(parsed))
        cfg = validate_config(raw, default_run_dir, problems, trust)
    if problems:
        raise ConfigError([_render(problem, parsed) for problem in problems], source=source)
    if notes:
        from ptft.console import note  # rich, imported only when there is something to say

        for text in notes:
            note(text)
    return cfg


def _named(overrides: list[_Override]) -> frozenset[str]:
    """Builder names given on the command line (`model.name=pkg.mod:fn`): the user's own words."""
    return frozenset(o.value for o in overrides
                     if len(o.keys) == 2 and o.keys[0] in BUILDER_SECTIONS and o.keys[1] == "name"
                     and isinstance(o.value, str))


_LENGTH_KEYS = ("epochs", "max_steps")


def _length_from_command_line(raw: dict, overrides: list[_Override]) -> str | None:
    """`train.max_steps=N` over a file that sets `train.epochs` (or the reverse) drops the file's key.

    That is what people type for a quick try, so the command line wins; both keys in the file,
    or both on the command line, stay a conflict for validation to report. Returns the note to print.
    """
    given = {o.keys[1]: o for o in overrides if len(o.keys) == 2 and o.keys[0] == "train" and o.keys[1] in _LENGTH_KEYS}
    train = raw.get("train")
    if len(given) != 1 or not isinstance(train, dict):
        return None
    key, override = next(iter(given.items()))
    other = _LENGTH_KEYS[1 - _LENGTH_KEYS.index(key)]
    if override.value is None or train.get(other) is None or train.get(key) is not None:
        return None
    dropped = train.pop(other)
    return f"{override.text} from the command line replaces the config's train.{other}: {show(dropped)}"


def _apply_overrides(raw: dict, overrides: list[_Override]) -> list[str]:
    """Applies the overrides to `raw`; returns a note for each builder rename that dropped the config's options."""
    notes = []
    for override in overrides:
        section, *rest = override.keys
        if rest == ["name"] and _renames_builder(section, raw.get(section), {"name": override.value}):
            old = raw.get(section)
            restated = {o.keys[1] for o in overrides if len(o.keys) > 1 and o.keys[0] == section}
            dropped = [key for key in old if key != "name" and key not in restated] if isinstance(old, dict) else []
            if dropped:
                # By design (options belong to the builder named beside them), but easy to miss: a renamed
                # model silently falls back to the new builder's default widths.
                notes.append(f"{override.text} from the command line starts {section} afresh, without the config's "
                             f"{', '.join(f'{section}.{key}' for key in dropped)}; restate any you want to keep")
            raw[section] = {}
    for override in overrides:
        node = raw
        for key in override.keys[:-1]:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        node[override.keys[-1]] = override.value
    return notes


def _render(problem: Problem, overrides: list[_Override]) -> str:
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
