#!/usr/bin/env python3
"""How much faster is a linear probe on precomputed features? Both paths side by side, one backbone.

  (a) features   finetune.mode linear_probe as shipped: the frozen encoder runs once over the
                 labelled subset and val (ptft/features.py), then only the head trains
  (b) per_step   the same run with finetune.precompute_features=false: the encoder runs forward
                 on every training batch and every validation

Data: an image folder written from the embedded digits (RGB, upscaled to --size px), so nothing
is downloaded; the backbone is random-init (weights do not change the cost). Each path is one
`ptft finetune` (ptft.stages.train, in this process) timed by wall clock, data and model building
included; the training loop, its checkpoint writes and the features' computation are timed apart
(a ViT-B checkpoint is 340 MB: writing it can outweigh a probe's steps). The table goes to stderr,
with the ratios and the largest head-weight difference between the paths (augmentation is off in
both, so the heads agree to float tolerance).

Before (b), one training-mode encoder forward of a batch is timed: when (b) would overrun
--budget-s, it is skipped with a note, and only (a) runs.

  python scripts/bench_probe.py --model torchvision:vit_b_16 --size 32 --epochs 3
  python scripts/bench_probe.py --model resnet50_classifier --size 32 --threads 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from ptft.config import config_from_dict
from ptft.data import DATASETS
from ptft.stages import train

CLASSES = 10


def write_image_folder(root: Path, size: int, per_class: int) -> Path:
    """`per_class` digits of each class as size x size RGB PNGs under root/train/<class>/."""
    from PIL import Image

    data = DATASETS.get("digits")(root, False)
    for label in range(CLASSES):
        (root / "train" / str(label)).mkdir(parents=True, exist_ok=True)
        images = data.train_x[data.train_y == label][:per_class]  # (n, 1, 8, 8) uint8
        for index, image in enumerate(images):
            grey = Image.fromarray(image[0].numpy()).resize((size, size), Image.BILINEAR)
            grey.convert("RGB").save(root / "train" / str(label) / f"{index:03d}.png")
    return root


def probe_config(args, folder: Path, run_dir: Path, precompute: bool) -> dict:
    return {
        "run": {"dir": str(run_dir), "seed": 0},
        "data": {"name": "imagefolder", "root": str(folder), "image_size": args.size,
                 "labels_per_class": args.labels_per_class, "batch_size": args.batch_size,
                 "cache_dir": str(run_dir.parent / "cache")},
        "model": {"name": args.model},
        "finetune": {"mode": "linear_probe", "precompute_features": precompute},
        "optim": {"name": "sgd", "lr": 0.01, "momentum": 0.9},
        "train": {"epochs": args.epochs, "device": "cpu"},
    }


@contextlib.contextmanager
def stopwatches(targets: dict[str, tuple[object, str]]):
    """Seconds spent in each wrapped function (module, attribute), summed over calls; unwrapped on exit."""
    spent = dict.fromkeys(targets, 0.0)
    originals = {name: getattr(module, attr) for name, (module, attr) in targets.items()}

    def timed(name, function):
        def call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - start
        return call

    for name, (module, attr) in targets.items():
        setattr(module, attr, timed(name, originals[name]))
    try:
        yield spent
    finally:
        for name, (module, attr) in targets.items():
            setattr(module, attr, originals[name])


def timed_finetune(config: dict) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Seconds of one `ptft finetune` (total, its training loop, the loop's checkpoint writes, the
    features' computation) and the head weights it hands on."""
    import ptft.assembly
    import ptft.engine
    import ptft.stages
    from safetensors.torch import load_file

    targets = {"loop": (ptft.stages, "fit"), "saves": (ptft.engine.ckpt, "save_checkpoint"),
               "features": (ptft.assembly, "probe_features")}
    start = time.perf_counter()
    with stopwatches(targets) as spent:
        checkpoint = train(config_from_dict(config, "bench_probe"), "finetune")
    seconds = {"total": time.perf_counter() - start, **spent}
    weights = load_file(Path(checkpoint) / "model.safetensors")
    return seconds, {key: value for key, value in weights.items() if key.startswith("head.")}


def projected_per_step_seconds(args, config: dict) -> float:
    """Encoder forwards of path (b): every training batch of every epoch, plus each epoch's validation."""
    from ptft.assembly import build_run

    run = build_run(config_from_dict(config, "bench_probe"), torch.device("cpu"), stage="finetune")
    x = run.train_split.x[:args.batch_size].float() / 255
    with torch.no_grad():
        run.model.encoder(x)  # warm-up
        start = time.perf_counter()
        run.model.encoder(x)
        per_batch = time.perf_counter() - start
    batches = len(run.train_split.x) // min(args.batch_size, len(run.train_split.x))
    val_batches = len(run.data.val.x) / args.batch_size
    # A training step also runs the backward of the head only, negligible beside the forward.
    return per_batch * args.epochs * (batches + val_batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="torchvision:vit_b_16")
    parser.add_argument("--size", type=int, default=32, help="image side in px (a ViT needs a multiple of 16)")
    parser.add_argument("--per-class", type=int, default=60, help="images of each class in the folder")
    parser.add_argument("--labels-per-class", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--budget-s", type=float, default=600, help="skip (b) when projected to take longer")
    parser.add_argument("--json", default=None, help="write the figures to FILE ('-' for stdout)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_probe_") as tmp:
        folder = write_image_folder(Path(tmp) / "images", args.size, args.per_class)
        figures = {"model": args.model, "size": args.size, "epochs": args.epochs, "threads": torch.get_num_threads()}
        figures["features"], fast = timed_finetune(probe_config(args, folder, Path(tmp) / "features", True))
        per_step = probe_config(args, folder, Path(tmp) / "per_step", False)
        projected = projected_per_step_seconds(args, per_step)
        if projected > args.budget_s:
            figures["per_step_skipped"] = f"projected {projected:.0f} s > --budget-s {args.budget_s:.0f}"
        else:
            figures["per_step"], slow = timed_finetune(per_step)
            figures["ratio_total"] = figures["per_step"]["total"] / figures["features"]["total"]
            figures["ratio_epoch"] = epoch_seconds(figures["per_step"]) / epoch_seconds(figures["features"])
            figures["head_max_abs_diff"] = max((fast[k] - slow[k]).abs().max().item() for k in fast)
    report(figures)
    if args.json:
        text = json.dumps(figures, indent=2)
        sys.stdout.write(text + "\n") if args.json == "-" else Path(args.json).write_text(text + "\n")


def epoch_seconds(seconds: dict[str, float]) -> float:
    """Seconds of a run's training loop (its steps and validations), checkpoint writes left out."""
    return seconds["loop"] - seconds["saves"]


def report(figures: dict) -> None:
    out, epochs = sys.stderr, figures["epochs"]
    print(f"\nlinear probe of {figures['model']} at {figures['size']} px, {epochs} epochs, "
          f"{figures['threads']} threads", file=out)
    print(f"  {'path':<10} {'total s':>8} {'features s':>11} {'loop s/epoch':>13} {'ckpt writes s':>14}", file=out)
    for path in ("features", "per_step"):
        if path in figures:
            s = figures[path]
            print(f"  {path:<10} {s['total']:8.1f} {s['features']:11.1f} {epoch_seconds(s) / epochs:13.2f} "
                  f"{s['saves']:14.1f}", file=out)
    if "per_step" in figures:
        print(f"  per_step / features: {figures['ratio_total']:.1f}x in total, {figures['ratio_epoch']:.1f}x per epoch "
              f"of the loop; head weights differ by at most {figures['head_max_abs_diff']:.2e}", file=out)
    else:
        print(f"  per_step skipped: {figures['per_step_skipped']}", file=out)


if __name__ == "__main__":
    main()
