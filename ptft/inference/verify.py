"""An exported file's outputs against PyTorch's, on images of the run's own test split.

Each format is loaded back by its own runtime (ONNX Runtime, torch.jit.load, torch.export.load)
and run on batches of several sizes, a batch of one first, which also checks that the batch
dimension really is dynamic.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ptft.console import note
from ptft.data import build_data
from ptft.errors import DataError
from ptft.inference.target import Target

CHECK_IMAGES = 512  # at most this many test images: enough to catch a wrong op, quick for a ResNet
CHECK_BATCH = 200
ATOL, RTOL = 1e-4, 1e-4  # float32 kernels differ between runtimes by rounding, far below this
RANDOM_SEED = 0


@dataclass
class Check:
    """How far the exported outputs are from PyTorch's, on which images."""

    images: int
    source: str
    runtime: str
    max_abs_diff: float
    within_tolerance: bool
    top1_agreement: float | None  # classifiers: fraction of images with the same predicted class

    def as_dict(self) -> dict:
        return {"images": self.images, "source": self.source, "runtime": self.runtime,
                "max_abs_diff": self.max_abs_diff, "atol": ATOL, "rtol": RTOL,
                "within_tolerance": self.within_tolerance, "top1_agreement": self.top1_agreement}

    def summary(self) -> str:
        agreement = "" if self.top1_agreement is None else f", same class for {self.top1_agreement:.2%}"
        verdict = "within" if self.within_tolerance else "OUTSIDE"
        return (f"max |exported - pytorch| = {self.max_abs_diff:.3g} on {self.images} {self.source} via "
                f"{self.runtime} ({verdict} atol {ATOL:g} + rtol {RTOL:g}{agreement})")


def check_images(target: Target) -> tuple[torch.Tensor, str]:
    """(up to CHECK_IMAGES model inputs, what they are): the run's test split, else seeded noise."""
    try:
        data = build_data(target.cfg.data, "cpu")
    except DataError as exc:
        note(f"export: the run's dataset is not at hand ({exc}); checking on random images instead")
        generator = torch.Generator().manual_seed(RANDOM_SEED)
        return torch.rand(CHECK_IMAGES // 2, *target.prep.input_shape, generator=generator), "random images"
    images = target.prep.to_model_input(data.test.x[:CHECK_IMAGES])
    return images, f"images of the {target.cfg.data.name} test split"


def runner(fmt: str, path: Path) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """(function running the exported file on a float32 batch, the runtime's name)."""
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return (lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0]),
                f"onnxruntime {onnxruntime.__version__}")
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation notice
            module = torch.jit.load(str(path), map_location="cpu")
        return module, "torch.jit.load"
    program = torch.export.load(str(path)).module()
    return program, "torch.export.load"


@torch.inference_mode()
def compare(model: torch.nn.Module, run: Callable, runtime: str, images: torch.Tensor, source: str,
            classifier: bool) -> Check:
    """Run both on `images` (a batch of one, then batches of CHECK_BATCH); measure the difference."""
    batches = [images[:1]] + [images[i:i + CHECK_BATCH] for i in range(1, len(images), CHECK_BATCH)]
    worst, inside, same = 0.0, True, 0
    for x in batches:
        expected, got = model(x).float(), run(x).float()
        if got.shape != expected.shape:
            return Check(len(images), source, runtime, float("inf"), False, None)
        worst = max(worst, (got - expected).abs().max().item())
        inside = inside and torch.allclose(got, expected, atol=ATOL, rtol=RTOL)
        if classifier:
            same += int((got.argmax(1) == expected.argmax(1)).sum())
    agreement = same / len(images) if classifier else None
    return Check(len(images), source, runtime, worst, inside, agreement)
