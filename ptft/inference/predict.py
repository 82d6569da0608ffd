"""`ptft predict`: one record per input, in input order.

A classifier gives the predicted class (index, name, probability) and the top-k; an
autoencoder gives its reconstruction's MSE and PSNR (and the picture, with --save-images).
An input that cannot be read is a record with an `error` field; the rest still run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ptft.console import note
from ptft.errors import UserError
from ptft.inference.output import atomic_file, check_out_path, check_record_format, open_records
from ptft.inference.stream import Batch, input_batches, run_batches
from ptft.inference.target import Target, load_target
from ptft.report import MIN_MSE

CLASSIFIER_COLUMNS = ["path", "pred", "pred_name", "prob", "top_k", "true", "error"]
AUTOENCODER_COLUMNS = ["path", "mse", "psnr", "reconstruction", "error"]
DIGITS = 6  # decimals kept of probabilities and errors in records


@dataclass
class PredictOptions:
    """The command's options (see `ptft predict --help`)."""

    top_k: int = 5
    fmt: str = "jsonl"
    batch_size: int = 256
    out: Path | None = None
    split: str | None = None
    strict: bool = False
    save_images: Path | None = None
    workers: int | None = None


def predict(target: str, inputs: list[str], options: PredictOptions) -> int:
    """Write one record per input to stdout (or options.out); summaries go to stderr.

    Returns:
        How many inputs could not be read (their records carry `error`).
    Raises:
        UserError: a bad target, INPUT or option; with options.strict, the first unreadable input.
    """
    check_record_format(options.fmt)
    if options.out is not None:
        check_out_path(options.out)
    loaded = load_target(target, "predict")
    if loaded.kind == "encoder":
        raise UserError(f"predict: {loaded.checkpoint} holds an encoder without a head or decoder "
                        f"(model {loaded.cfg.model.name!r}); use 'ptft embed' for its features")
    if options.save_images is not None and loaded.kind != "autoencoder":
        raise UserError(f"--save-images: only an autoencoder has pictures to save; {loaded.cfg.model.name!r} is a "
                        f"{loaded.kind}")
    total, batches = input_batches(loaded, inputs, split=options.split, batch_size=options.batch_size,
                                   workers=options.workers)
    records = _Classify(loaded, options.top_k) if loaded.kind == "classifier" else _Reconstruct(loaded, options)
    columns = CLASSIFIER_COLUMNS if loaded.kind == "classifier" else AUTOENCODER_COLUMNS
    with open_records(options.out, options.fmt, columns) as writer:
        def handle(batch: Batch) -> None:
            for record in records(batch):
                if options.strict and "error" in record:
                    raise UserError(f"predict: {record['error']} (--strict stops at the first unreadable input)")
                writer.write(record)

        run_batches(batches, total, "predict", handle)
    records.summarize()
    return records.errors


class _Classify:
    """Batches -> class records; counts what the summary line says."""

    def __init__(self, target: Target, top_k: int):
        if top_k < 1:
            raise UserError(f"--top-k: expected an integer >= 1, got {top_k}")
        self.target, self.names = target, target.prep.class_names
        self.k = min(top_k, len(self.names))
        self.done = self.errors = self.labelled = self.correct = 0

    @torch.inference_mode()
    def __call__(self, batch: Batch) -> list[dict]:
        ranked = iter(())
        if len(batch.images):
            x = self.target.prep.to_model_input(batch.images).to(self.target.device)
            probs = torch.softmax(self.target.model(x).float(), dim=1)  # (G, K)
            top_p, top_i = probs.topk(self.k, dim=1)
            ranked = zip(top_p.cpu().tolist(), top_i.cpu().tolist())
        return [self._record(item, error, ranked) for item, error in zip(batch.items, batch.errors)]

    def _record(self, item, error, ranked) -> dict:
        self.done += 1
        if error is not None:
            self.errors += 1
            return {"path": item.path, "error": error} | ({} if item.true is None else {"true": item.true})
        probs, classes = next(ranked)
        ranking = [{"class": c, "name": self.names[c], "prob": round(p, DIGITS)} for p, c in zip(probs, classes)]
        record = {"path": item.path, "pred": classes[0], "pred_name": self.names[classes[0]],
                  "prob": ranking[0]["prob"], "top_k": ranking}
        if item.true is not None:
            record["true"] = item.true
            self.labelled += 1
            self.correct += int(classes[0] == item.true)
        return record

    def summarize(self) -> None:
        note(f"predict: {self.done - self.errors} of {self.done} inputs classified"
             + (f"; {self.errors} could not be read" if self.errors else ""))
        if self.labelled:
            note(f"accuracy {self.correct / self.labelled:.4f} "
                 f"({self.correct}/{self.labelled} inputs with a known class)")


class _Reconstruct:
    """Batches -> reconstruction records (per-image MSE and PSNR, data range 1, as evaluate's)."""

    def __init__(self, target: Target, options: PredictOptions):
        self.target, self.folder = target, options.save_images
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
        self.done = self.errors = 0
        self.mse: list[float] = []
        self.psnr: list[float] = []

    @torch.inference_mode()
    def __call__(self, batch: Batch) -> list[dict]:
        measured = iter(())
        if len(batch.images):
            x = self.target.prep.to_model_input(batch.images).to(self.target.device)
            recon = self.target.model(x).float()  # (G, C, H, W) in [0, 1]
            mse = (x - recon).square().flatten(1).mean(dim=1)  # (G,)
            psnr = 10 * torch.log10(1.0 / mse.clamp(min=MIN_MSE))
            measured = zip(mse.cpu().tolist(), psnr.cpu().tolist(), recon.cpu())
        return [self._record(item, error, measured) for item, error in zip(batch.items, batch.errors)]

    def _record(self, item, error, measured) -> dict:
        self.done += 1
        if error is not None:
            self.errors += 1
            return {"path": item.path, "error": error}
        mse, psnr, recon = next(measured)
        self.mse.append(mse)
        self.psnr.append(psnr)
        record = {"path": item.path, "mse": round(mse, DIGITS + 2), "psnr": round(psnr, 3)}
        if self.folder is not None:
            record["reconstruction"] = str(self._save(recon, item.path))
        return record

    def _save(self, recon: torch.Tensor, source: str) -> Path:
        from PIL import Image

        # Numbered by input position: two inputs may share a file name in different folders.
        path = self.folder / f"{self.done - 1:06d}-{Path(source.replace(':', '-')).stem}.png"
        pixels = recon.mul(255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()  # (H, W, C)
        image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else np.ascontiguousarray(pixels))
        with atomic_file(path, "--save-images") as tmp:
            image.save(tmp, format="PNG")
        return path

    def summarize(self) -> None:
        read = len(self.mse)
        mean = (lambda values: math.fsum(values) / read) if read else (lambda values: float("nan"))
        note(f"predict: {read} of {self.done} inputs reconstructed"
             + (f"; {self.errors} could not be read" if self.errors else "")
             + (f"; mean mse {mean(self.mse):.6f}, mean psnr {mean(self.psnr):.2f} dB" if read else ""))
