"""`ptft export`: the model as an ONNX, TorchScript or torch.export (pt2) file, checked against PyTorch.

The file takes float32 images (N, C, H, W) already preprocessed, with a dynamic batch
dimension. Beside it, `FILE.json` says how to get there from an image file (channels, size
rule, scaling, mean/std), what comes out, the class names, the opset, and how closely the
file's outputs matched PyTorch's. Both files appear only once the check has passed.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import re
import warnings
from pathlib import Path

import torch

import ptft
from ptft.console import note
from ptft.errors import UserError
from ptft.inference.output import atomic_file, check_out_path
from ptft.inference.target import Target, load_target
from ptft.inference.verify import check_images, compare, runner

FORMATS = ("onnx", "torchscript", "pt2")
EXTRA_MODULES = {"onnx": ("onnx", "onnxscript", "onnxruntime")}  # the `ptft[export]` extra
INPUT_NAME = "images"
OUTPUT_NAMES = {"classifier": "logits", "autoencoder": "reconstruction", "encoder": "features"}
# torch.export specialises sizes 0 and 1, so the example batch must be neither to stay dynamic.
EXAMPLE_BATCH = 2
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


def export(target: str, *, fmt: str, out: Path) -> Path:
    """Export `target`'s model to `out` (+ `out`.json), after checking it against PyTorch.

    Returns:
        The written file.
    Raises:
        UserError: an unknown format, the format's extra not installed, a bad target, a model
            the format cannot represent, or outputs outside the tolerance (nothing written).
    """
    if fmt not in FORMATS:
        raise UserError(f"--format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    _require_extra(fmt)
    out = check_out_path(out)
    loaded = load_target(target, "export", device="cpu")
    images, source = check_images(loaded)
    with atomic_file(out) as tmp, atomic_file(out.with_name(out.name + ".json")) as sidecar_tmp:
        opset = _write(fmt, loaded, tmp)
        check = compare(loaded.model, *runner(fmt, tmp), images, source, loaded.kind == "classifier")
        if not check.within_tolerance:
            raise UserError(f"export: the {fmt} file does not reproduce model {loaded.cfg.model.name!r}: "
                            f"{check.summary()}; nothing written")
        sidecar_tmp.write_text(json.dumps(_sidecar(fmt, out, loaded, opset, check.as_dict()), indent=2) + "\n")
    note(f"export: {out} checked against PyTorch: {check.summary()}")
    return out


def _require_extra(fmt: str) -> None:
    for module in EXTRA_MODULES.get(fmt, ()):
        try:
            importlib.import_module(module)
        except ImportError:
            raise UserError(f"export --format {fmt} needs the export extra ({module} is not installed): "
                            f"pip install 'ptft[export]'") from None


def _write(fmt: str, target: Target, path: Path) -> int | None:
    """Write the exported file; the ONNX opset, or None. A model the format cannot hold -> UserError."""
    example = torch.rand(EXAMPLE_BATCH, *target.prep.input_shape, generator=torch.Generator().manual_seed(0))
    batch = ({0: torch.export.Dim("batch", min=1)},)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation notice, on every call
            if fmt == "onnx":
                return _write_onnx(target, example, batch, path)
            if fmt == "torchscript":
                torch.jit.save(torch.jit.trace(target.model, example), str(path))
            else:
                torch.export.save(torch.export.export(target.model, (example,), dynamic_shapes=batch), str(path))
    except Exception as exc:  # each exporter fails in its own types; all mean "cannot represent this model"
        raise UserError(f"export: model {target.cfg.model.name!r} cannot be exported as {fmt}: "
                        f"{_reason(exc)}") from None
    return None


def _write_onnx(target: Target, example: torch.Tensor, batch: tuple, path: Path) -> int:
    import onnx

    # stdout is for machines: the exporter's progress lines must not land there.
    with contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(target.model, (example,), str(path), input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAMES[target.kind]], dynamic_shapes=batch, dynamo=True,
                          external_data=False, verbose=False)
    model = onnx.load(str(path), load_external_data=False)
    return next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))


def _reason(exc: Exception) -> str:
    """The line of an exporter's (long, coloured) message that names what failed."""
    text = ANSI_ESCAPE.sub("", str(exc))
    missing = re.search(r"No ONNX function found for <OpOverload\(op='([^']+)'", text)
    if missing:
        return f"operator {missing.group(1)} has no ONNX equivalent"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else 'no message'}"


def _sidecar(fmt: str, out: Path, target: Target, opset: int | None, check: dict) -> dict:
    with torch.inference_mode():
        output_shape = list(target.model(torch.zeros(1, *target.prep.input_shape)).shape[1:])
    preprocessing = target.prep.describe()
    return {
        "format": fmt, "file": out.name, "opset": opset,
        "input": {"name": INPUT_NAME, "shape": preprocessing.pop("shape"), "dtype": preprocessing.pop("dtype"),
                  "dynamic_axes": {"0": "batch"}},
        "output": {"name": OUTPUT_NAMES[target.kind], "kind": target.kind, "shape": [None, *output_shape]},
        "class_names": preprocessing.pop("class_names"),
        "preprocessing": preprocessing,
        "checkpoint": str(target.checkpoint), "model": target.cfg.model.name,
        "config_hash": target.meta.config_hash,
        "versions": {"ptft": ptft.__version__, "torch": torch.__version__},
        "verification": check,
    }
