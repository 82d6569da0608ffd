"""Weights this run did not write: read any state dict, normalise its keys, load what fits.

Finetuning starts from a ptft checkpoint or from a foreign file: a plain torchvision state
dict, a Lightning `.ckpt`, a DDP (`module.`) or torch.compile (`_orig_mod.`) dict, a
`.safetensors` file, a torchvision hub `.pth` or timm `.safetensors` / `.bin` of a
`torchvision:` / `timm:` model. `read_state_dict` reads them without unpickling arbitrary
objects and normalises the names; `match_into` maps a library file's names onto the model's
(the encoder knows its library's classifier), copies what fits and sorts every key into a
`KeyReport`, refusing a load that matched no encoder key (a deliberate handoff, as timm's
`load_pretrained`: a silent no-op load would finetune from scratch without saying so).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ptft.checkpoint import OBJECTIVE_PREFIX, is_ptft_checkpoint, load_safetensors_file, load_torch_file, load_weights
from ptft.errors import CheckpointError

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
# Where training scripts nest the state dict: Lightning's `state_dict`, common hand-made dicts.
NESTED_STATE_KEYS = ("state_dict", "model_state_dict", "model")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP, torch.compile
LIGHTNING_PREFIX = "model."
PTFT_PREFIXES = ("encoder.", "decoder.", "head.", OBJECTIVE_PREFIX)
HEAD_PREFIX = "head."
# Batch norm's step counter, which torchvision's original ImageNet files predate: a model keeps its
# own count when a file lacks it (as torch's loader does), so it is never "missing" and never stops
# a strict load. Only momentum=None batch norm reads it.
BATCH_COUNTER_SUFFIX = "num_batches_tracked"
EXPECTED_SOURCES = "a ptft checkpoint or run directory, or a .safetensors, .pt, .pth, .bin or .ckpt file"
SHOWN_NAMES = 20


def read_state_dict(path: Path | str, *, prefix_map: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint or weights file, with normalised names (see `normalise_keys`).

    Args:
        path: a ptft step directory, pointer or run directory; a `.safetensors` file; a torch
            file (`.pt`, `.pth`, `.bin`, `.ckpt`) holding a state dict directly or under
            `state_dict` / `model_state_dict` / `model`.
        prefix_map: the user's renames, e.g. {"backbone.": "encoder."}.
    Raises:
        CheckpointError: missing, unreadable, unsafe, of another kind, or holding no tensors.
    """
    path = Path(path)
    if is_ptft_checkpoint(path):
        state = load_weights(path)
    elif not path.exists():
        raise CheckpointError(f"weights {path} do not exist (expected {EXPECTED_SOURCES})")
    elif path.suffix.lower() == ".safetensors":
        state = load_safetensors_file(path)
    elif path.suffix.lower() in TORCH_SUFFIXES:
        state = _tensors_of(load_torch_file(path))
    else:
        raise CheckpointError(f"weights {path}: unsupported file type '{path.suffix}' (expected {EXPECTED_SOURCES})")
    if not state:
        raise CheckpointError(f"weights {path} hold no tensors (expected a state dict: name -> tensor, directly or "
                              f"under {', '.join(repr(k) for k in NESTED_STATE_KEYS)})")
    return normalise_keys(state, prefix_map)


def _tensors_of(obj) -> dict[str, torch.Tensor]:
    if not isinstance(obj, dict):
        return {}
    for key in NESTED_STATE_KEYS:
        nested = obj.get(key)
        if isinstance(nested, dict) and any(isinstance(v, torch.Tensor) for v in nested.values()):
            obj = nested
            break
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def normalise_keys(state: dict[str, torch.Tensor], prefix_map: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Rename keys to ptft's: wrapper prefixes off, then Lightning's, torchvision's, the user's.

    In order: strip DDP `module.` and torch.compile `_orig_mod.` (leading, in any order,
    repeated; `_orig_mod.` also inside a name); strip Lightning's leading `model.` when the
    keys then look like ptft's or torchvision's; map a plain torchvision ResNet (`conv1.*`,
    `layer1.*`, `fc.*`) to `encoder.*` and `head.*`; apply `prefix_map`, longest prefix
    first (an empty prefix `""` matches every key).
    """
    state = {_strip_wrappers(k): v for k, v in state.items()}
    state = _strip_lightning(state)
    state = _torchvision_resnet_to_ptft(state)
    return _apply_prefix_map(state, prefix_map or {})


def _strip_wrappers(key: str) -> str:
    key = key.replace("._orig_mod.", ".")  # a child compiled on its own: encoder._orig_mod.x
    while key.startswith(WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def _looks_like_ptft(keys) -> bool:
    return any(k.startswith(PTFT_PREFIXES) for k in keys)


def _looks_like_torchvision_resnet(keys) -> bool:
    return "conv1.weight" in keys and any(k.startswith("layer1.") for k in keys)


def _strip_lightning(state: dict) -> dict:
    inner = {k[len(LIGHTNING_PREFIX):]: v for k, v in state.items() if k.startswith(LIGHTNING_PREFIX)}
    if not (_looks_like_ptft(inner) or _looks_like_torchvision_resnet(inner)):
        return state
    # The LightningModule's other attributes (a loss's weights, metrics) keep their names.
    rest = {k: v for k, v in state.items() if not k.startswith(LIGHTNING_PREFIX)}
    return {**rest, **inner}


def _torchvision_resnet_to_ptft(state: dict) -> dict:
    # ptft's ResNet encoder keeps torchvision's module names (ptft/models/resnet.py).
    if _looks_like_ptft(state) or not _looks_like_torchvision_resnet(state):
        return state
    return {("head." + k[len("fc."):] if k.startswith("fc.") else "encoder." + k): v for k, v in state.items()}


def _apply_prefix_map(state: dict, prefix_map: dict[str, str]) -> dict:
    ordered = sorted(prefix_map.items(), key=lambda item: len(item[0]), reverse=True)

    def rename(key: str) -> str:
        for old, new in ordered:
            if key.startswith(old):
                return new + key[len(old):]
        return key

    return {rename(k): v for k, v in state.items()}


@dataclass
class KeyReport:
    """Where every key went when loading weights into a model; the categories are disjoint."""

    loaded: list[str] = field(default_factory=list)
    # Loaded after changing shape: an RGB stem conv summed over its input channels for grey data, a ViT
    # position embedding resampled to the model's patch grid (the encoder's `adapt_weight`).
    adapted: list[str] = field(default_factory=list)
    skipped_head: list[str] = field(default_factory=list)  # file's head.* kept out; the fresh head stays
    missing: list[str] = field(default_factory=list)  # model keys the file lacks (batch-norm counters aside)
    unexpected: list[str] = field(default_factory=list)  # file keys the model lacks (decoder.*, objective.*)
    # (name, file shape, model shape)
    shape_mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

    CATEGORIES = ("loaded", "adapted", "skipped_head", "missing", "unexpected", "shape_mismatched")

    def counts(self) -> dict[str, int]:
        return {name: len(getattr(self, name)) for name in self.CATEGORIES}

    def as_dict(self) -> dict:
        """JSON-ready: counts and names (shape mismatches with both shapes), for meta.json."""
        data = {name: list(getattr(self, name)) for name in self.CATEGORIES if name != "shape_mismatched"}
        data["shape_mismatched"] = [{"name": n, "file": list(f), "model": list(m)} for n, f, m in self.shape_mismatched]
        return {"counts": self.counts(), **data}

    def rows(self, examples: int = 3) -> list[tuple[str, int, str]]:
        """(category, count, first few names) per category, for a table."""
        rows = []
        for name in self.CATEGORIES:
            if name == "shape_mismatched":
                names = [f"{n} (file {_shape(f)}, model {_shape(m)})" for n, f, m in self.shape_mismatched]
            else:
                names = getattr(self, name)
            shown = ", ".join(names[:examples]) + (", ..." if len(names) > examples else "")
            rows.append((name.replace("_", " "), len(names), shown))
        return rows


def _shape(shape) -> str:
    return "x".join(map(str, shape)) or "scalar"


def _channel_adaptable(file_shape: torch.Size, model_shape: torch.Size) -> bool:
    """A conv weight (out, C>1, kh, kw) going into (out, 1, kh, kw): a colour first conv, grey input."""
    return (len(file_shape) == 4 and len(model_shape) == 4 and model_shape[1] == 1 and file_shape[1] > 1
            and file_shape[0] == model_shape[0] and file_shape[2:] == model_shape[2:])


def match_into(model: torch.nn.Module, state: dict[str, torch.Tensor], *, load_head: bool, strict: bool,
               encoder_prefix: str = "encoder.", source: str | None = None) -> KeyReport:
    """Copy the tensors of `state` that fit into `model` (in place) and report every key.

    `head.*` keys load only with `load_head` and equal shapes; otherwise they are skipped and
    the head keeps its fresh init (another number of classes is not an error). A library file
    (torchvision, timm) for a `LibraryEncoder` is first renamed to the model's keys.

    Args:
        model: the freshly built model; changed only if no error is raised.
        state: normalised weights (`read_state_dict`).
        load_head: also load `head.*` when shapes match.
        strict: every `encoder_prefix` key of the model must be loaded.
        encoder_prefix: the keys that must load for the handoff to count.
        source: where the weights came from, for error messages.
    Returns:
        The KeyReport.
    Raises:
        CheckpointError: no encoder key loaded (the message lists the file's common prefixes),
            or `strict` and some encoder key was not loaded.
    """
    state = _library_to_ptft(model, state, encoder_prefix)
    target = model.state_dict()
    matcher = _KeyMatcher(model, load_head, encoder_prefix)
    report, to_load = matcher.report, matcher.to_load
    # The model's order, not the file's: safetensors stores keys sorted, torch files as saved,
    # and the same weights should give the same report. Unexpected keys keep the file's order.
    depth = {name: i for i, name in enumerate(target)}
    for name in sorted(state, key=lambda key: depth.get(key, len(depth))):
        if name not in target:
            report.unexpected.append(name)
        else:
            matcher.file(name, state[name], target[name].shape)
    report.missing = [name for name in target if name not in state and not name.endswith(BATCH_COUNTER_SUFFIX)]
    hints = _mismatch_hints(model, report.shape_mismatched, encoder_prefix)
    _check_encoder_loaded(report, state, encoder_prefix, strict, source or "weights", hints)
    model.load_state_dict(to_load, strict=False)
    return report


class _KeyMatcher:
    """Files each model key of a file under exactly one of the report's categories; what loads goes to `to_load`."""

    def __init__(self, model: torch.nn.Module, load_head: bool, encoder_prefix: str):
        self.model, self.load_head, self.encoder_prefix = model, load_head, encoder_prefix
        self.report, self.to_load = KeyReport(), {}

    def file(self, name: str, tensor: torch.Tensor, wanted: torch.Size) -> None:
        report = self.report
        if name.startswith(HEAD_PREFIX) and (not self.load_head or tensor.shape != wanted):
            report.skipped_head.append(name)
        elif tensor.shape == wanted:
            self.to_load[name] = tensor
            report.loaded.append(name)
        elif _channel_adaptable(tensor.shape, wanted):
            # (out, C, kh, kw) -> (out, 1, kh, kw): on a grey image copied into C channels the
            # summed filter gives exactly what the colour filter gave.
            self.to_load[name] = tensor.sum(dim=1, keepdim=True)
            report.adapted.append(name)
        elif (adapted := _adapted_by_encoder(self.model, self.encoder_prefix, name, tensor, wanted)) is not None:
            self.to_load[name] = adapted
            report.adapted.append(name)
        else:
            report.shape_mismatched.append((name, tuple(tensor.shape), tuple(wanted)))


def _library_to_ptft(model: torch.nn.Module, state: dict, prefix: str) -> dict:
    """A library file's keys (`features.0.0.weight`, `fc.weight`) as the model's: `encoder.` + key, and
    the library's classifier (the encoder's `library_head`, e.g. `classifier.2.`) as `head.`.

    Only for an encoder that holds a library network (models/backbones.py) and a file more of whose
    keys are that library's names (older ones renamed first) than the model's: a torchvision ViT's
    own keys start with `encoder.` too. Anything else is returned as it is.
    """
    encoder = getattr(model, prefix.rstrip("."), None)
    head = getattr(encoder, "library_head", None)
    if head is None:
        return state
    library = encoder.upgrade_library_keys(state)
    own, ours = encoder.state_dict(), model.state_dict()
    if sum(k in own for k in library) <= sum(k in ours for k in state):
        return state
    return {(HEAD_PREFIX + k[len(head):] if k.startswith(head) else prefix + k): v for k, v in library.items()}


def _adapted_by_encoder(model: torch.nn.Module, prefix: str, name: str, tensor: torch.Tensor,
                        wanted: torch.Size) -> torch.Tensor | None:
    """The encoder's own reshaping of a file's tensor (`adapt_weight`, e.g. a ViT position embedding)."""
    adapt = getattr(getattr(model, prefix.rstrip("."), None), "adapt_weight", None)
    if adapt is None or not name.startswith(prefix):
        return None
    return adapt(name[len(prefix):], tensor, wanted)


def _mismatch_hints(model: torch.nn.Module, mismatched: list, prefix: str) -> list[str]:
    """The encoder's own fixes for shape mismatches, in config terms (ResNet: model.small_input).

    Only the model knows which of its options shape a tensor, so an encoder may define
    `explain_mismatch(name, file_shape, model_shape) -> str | None`, name without `prefix`.
    """
    explain = getattr(getattr(model, prefix.rstrip("."), None), "explain_mismatch", None)
    if explain is None:
        return []
    hints = (explain(n[len(prefix):], f, m) for n, f, m in mismatched if n.startswith(prefix))
    return list(dict.fromkeys(h for h in hints if h))


def _check_encoder_loaded(report: KeyReport, state: dict, prefix: str, strict: bool, source: str,
                          hints: list[str]) -> None:
    if not any(n.startswith(prefix) for n in report.loaded + report.adapted):
        raise CheckpointError(_nothing_loaded_message(report, state, prefix, source))
    if not strict:
        return
    not_loaded = [f"{n} (missing)" for n in report.missing if n.startswith(prefix)]
    not_loaded += [f"{n} (file {_shape(f)}, model {_shape(m)})" for n, f, m in report.shape_mismatched
                   if n.startswith(prefix)]
    if not_loaded:
        more = f", ... ({len(not_loaded) - SHOWN_NAMES} more)" if len(not_loaded) > SHOWN_NAMES else ""
        fix = "; ".join(hints) or "Check that model options match the checkpoint's, map names with init.prefix_map"
        raise CheckpointError(f"{source}: init.strict is true but {len(not_loaded)} {prefix}* key(s) of the model "
                              f"were not loaded: {', '.join(not_loaded[:SHOWN_NAMES])}{more}. {fix}, or set "
                              f"init.strict=false to load only what matches")


def _nothing_loaded_message(report: KeyReport, state: dict, prefix: str, source: str) -> str:
    top = _key_prefixes(state).most_common(5)
    common = ", ".join(f"{p} ({count})" for p, count in top) or "none (no keys)"
    message = f"{source}: no {prefix}* key of the model was loaded; the file's most common key prefixes are {common}"
    mismatched = [(n, f, m) for n, f, m in report.shape_mismatched if n.startswith(prefix)]
    unmatched = [n for n in report.unexpected if n.startswith(prefix)]
    if not mismatched and 2 * len(unmatched) > len(state):
        # Mostly the right prefix already, but no right name: renaming prefixes cannot help.
        wanted = [n for n in report.missing if n.startswith(prefix)]
        return (f"{message}. None of its {len(unmatched)} {prefix}* keys is one of the model's (file: "
                f"{', '.join(unmatched[:2])}, ...; model: {', '.join(wanted[:2])}, ...): they are weights of another "
                f"architecture; set model.name and its options to the ones they were trained with")
    example = top[0][0] if top else "backbone."
    message += (f". Map them onto the model's names with init.prefix_map, e.g. "
                f"init.prefix_map={{{example}: {prefix}}}")
    if mismatched:
        name, file_shape, model_shape = mismatched[0]
        message += (f". {len(mismatched)} {prefix}* key(s) matched by name but not by shape (e.g. {name}: file "
                    f"{_shape(file_shape)}, model {_shape(model_shape)}): build the model with the options the "
                    f"weights were trained with")
    return message


def _key_prefixes(keys) -> Counter:
    """Key prefixes counted one level below what every key shares (`net.backbone.`, not just `net.`).

    A prefix a user can paste into init.prefix_map: a wrapper's name alone would map the whole
    network, head and all, onto the encoder.
    """
    depth = 1
    prefixes = Counter(_prefix(key, depth) for key in keys)
    while len(prefixes) == 1 and all(key.count(".") > depth for key in keys):
        depth += 1
        prefixes = Counter(_prefix(key, depth) for key in keys)
    return prefixes


def _prefix(key: str, depth: int) -> str:
    parts = key.split(".")
    return ".".join(parts[:depth]) + "." if len(parts) > depth else key
