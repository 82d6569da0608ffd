#!/usr/bin/env python3
"""How fast is `ptft predict`? Fashion-MNIST's 10,000 test images as PNG files, classified five ways.

  (a) ptft predict     the CLI in a fresh process, end to end (imports, decoding, model, records)
  (a') predict, lib    the same through ptft.inference.predict in this process (torch already imported),
                       deciding itself whether to decode in a pool, and again forced to 2 decoding processes
  (b) loop             a plain single-process loop: PIL open -> numpy -> tensor, model per batch of 256
  (c) dataloader       the same decoding in a Dataset under DataLoader(batch_size=256, num_workers=2)

and the exported model: ONNX Runtime against PyTorch eager, median latency at batch 1 and 256.

The model is a conv_classifier finetuned here for `--steps` steps on Fashion-MNIST (from
../shared/data, never downloaded); the PNG files and the run live in a temporary folder. All
ratios come from this one run: the paths run `--repeats` times in turn (a, a', b, c, a, ...) and
each reports its median, so neighbouring runs see the same load; on a machine shared with other
jobs the absolute times measure the others too, so read the ratios. The table goes to stderr;
`--json FILE` gets every figure. torch is imported inside functions: ptft's decoding workers are
spawned and re-import this script, as they re-import ptft's own light CLI module.

  python scripts/bench_predict.py --data-root ../shared/data --json bench_predict.json
  python scripts/bench_predict.py --threads 1     # on a busy machine: no threads spin-waiting on each other
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BATCH = 256
LATENCY_REPEATS = {1: 300, 256: 30}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data",
                        help="folder holding FashionMNIST/raw")
    parser.add_argument("--steps", type=int, default=300, help="finetuning steps of the benchmarked model")
    parser.add_argument("--limit", type=int, default=10_000, help="test images to write and classify")
    parser.add_argument("--threads", type=int, help="CPU threads of torch and ONNX Runtime, here and in the CLI's "
                        "process (default: their own choice); 1 on a machine shared with other jobs")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each path, in turn; medians are reported")
    parser.add_argument("--json", help="write every figure here as JSON ('-': stdout)")
    return parser.parse_args(argv)


def train_model(root: Path, data_root: Path, steps: int) -> Path:
    """A conv classifier finetuned from scratch on Fashion-MNIST, on the CPU; its run directory."""
    from ptft.config import config_from_dict
    from ptft.stages import train

    run = root / "run"
    cfg = {"run": {"dir": str(run), "seed": 0},
           "data": {"name": "fashion_mnist", "root": str(data_root), "batch_size": 128},
           "model": {"name": "conv_classifier", "channels": [16, 32], "latent": 64},
           "optim": {"name": "adam", "lr": 0.002},
           "train": {"max_steps": steps, "eval_every_steps": steps, "log_every_steps": 50, "device": "cpu"}}
    train(config_from_dict(cfg, "bench_predict"), "finetune")
    return run


def write_pngs(folder: Path, data_root: Path, limit: int) -> tuple[list[Path], np.ndarray]:
    """The test split as grey PNG files (flat: Fashion-MNIST's class names hold '/'); (paths, labels)."""
    from PIL import Image
    from torchvision.datasets import FashionMNIST

    test = FashionMNIST(str(data_root), train=False, download=False)
    folder.mkdir(parents=True)
    paths = []
    for i, pixels in enumerate(test.data[:limit].numpy()):
        paths.append(folder / f"{i:05d}.png")
        Image.fromarray(pixels, "L").save(paths[-1])
    return paths, test.targets[:limit].numpy()


def load_pixels(path: Path):
    """What the baselines do per image: PIL open -> (1, 28, 28) float tensor in [0, 1]."""
    import torch
    from PIL import Image

    with Image.open(path) as image:
        return torch.from_numpy(np.asarray(image.convert("L"), dtype=np.float32) / 255).unsqueeze(0)


class PngDataset:
    """A map-style dataset of PNG paths (what DataLoader needs: __len__ and __getitem__)."""

    def __init__(self, paths: list[Path]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        return load_pixels(self.paths[index])


@dataclass
class Job:
    """What every path gets: the run, its PNG folder and files, the loaded model, a scratch folder."""

    run: Path
    folder: Path
    paths: list[Path]
    model: object  # torch.nn.Module
    scratch: Path
    threads: int | None


def cli_predict(job: Job) -> np.ndarray:
    out = job.scratch / "cli.jsonl"
    env = {**os.environ, **({"OMP_NUM_THREADS": str(job.threads)} if job.threads else {})}
    subprocess.run([sys.executable, "-m", "ptft", "predict", str(job.run), str(job.folder), "--out", str(out)],
                   check=True, cwd=REPO, env=env, stderr=subprocess.DEVNULL)
    return np.array([json.loads(line)["pred"] for line in out.read_text().splitlines()])


def library_predict(job: Job, workers: int | None = None) -> np.ndarray:
    from ptft.inference.predict import PredictOptions, predict

    out = job.scratch / "library.jsonl"
    predict(str(job.run), [str(job.folder)], PredictOptions(out=out, workers=workers))
    return np.array([json.loads(line)["pred"] for line in out.read_text().splitlines()])


def library_predict_pool(job: Job) -> np.ndarray:
    return library_predict(job, workers=2)


def plain_loop(job: Job) -> np.ndarray:
    import torch

    preds = []
    with torch.inference_mode():
        for start in range(0, len(job.paths), BATCH):
            x = torch.stack([load_pixels(p) for p in job.paths[start:start + BATCH]])  # (B, 1, 28, 28)
            preds.append(job.model(x).argmax(1))
    return torch.cat(preds).numpy()


def dataloader_loop(job: Job) -> np.ndarray:
    import torch

    loader = torch.utils.data.DataLoader(PngDataset(job.paths), batch_size=BATCH, num_workers=2)
    with torch.inference_mode():
        return torch.cat([job.model(x).argmax(1) for x in loader]).numpy()


PATHS = {"ptft predict (CLI)": cli_predict, "ptft predict (library)": library_predict,
         "predict, --workers 2": library_predict_pool, "plain loop": plain_loop,
         "DataLoader(num_workers=2)": dataloader_loop}
BASELINE = "ptft predict (library)"


def latency(fn, x, repeats: int) -> float:
    """Median seconds of `fn(x)` after 3 untimed calls."""
    for _ in range(3):
        fn(x)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def onnx_against_eager(job: Job) -> dict:
    """Median latency of the model in PyTorch eager and of its `ptft export` ONNX file in ONNX Runtime."""
    import onnxruntime
    import torch

    from ptft.inference.export import export

    path = export(str(job.run), fmt="onnx", out=job.scratch / "model.onnx")
    options = onnxruntime.SessionOptions()
    if job.threads:
        options.intra_op_num_threads = job.threads
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    figures = {}
    for batch, repeats in LATENCY_REPEATS.items():
        x = torch.rand(batch, 1, 28, 28)
        with torch.inference_mode():
            eager = latency(job.model, x, repeats)
        ort = latency(lambda t: session.run(None, {"images": t.numpy()}), x, repeats)
        figures[f"batch {batch}"] = {"eager_ms": eager * 1e3, "onnxruntime_ms": ort * 1e3,
                                     "eager / onnxruntime": eager / ort}
    return figures


def main(argv=None) -> dict:
    import torch

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="ptft-bench-predict-") as tmp:
        root = Path(tmp)
        run = train_model(root, args.data_root, args.steps)
        started = time.perf_counter()
        paths, labels = write_pngs(root / "images", args.data_root, args.limit)
        write_s = time.perf_counter() - started
        from ptft.inference.target import load_target

        job = Job(run, root / "images", paths, load_target(str(run), "bench", device="cpu").model, root,
                  args.threads)
        runs, preds = {name: [] for name in PATHS}, {}
        for _ in range(args.repeats):  # in turn, so that each path sees the same load from other jobs
            for name, path in PATHS.items():
                started = time.perf_counter()
                preds[name] = path(job)
                runs[name].append(time.perf_counter() - started)
        seconds = {name: statistics.median(times) for name, times in runs.items()}
        figures = {
            "images": len(paths), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "write_pngs_s": write_s, "repeats": args.repeats, "seconds": seconds, "all_seconds": runs,
            "images_per_s": {name: len(paths) / s for name, s in seconds.items()},
            f"ratio to {BASELINE}": {name: s / seconds[BASELINE] for name, s in seconds.items()},
            "accuracy": {name: float((p == labels).mean()) for name, p in preds.items()},
            "same_predictions": all(np.array_equal(p, preds["plain loop"]) for p in preds.values()),
            "onnx": onnx_against_eager(job),
        }
    print_table(figures)
    if args.json:
        text = json.dumps(figures, indent=2) + "\n"
        if args.json == "-":
            sys.stdout.write(text)
        else:
            Path(args.json).write_text(text)
    return figures


def print_table(figures: dict) -> None:
    lines = [f"{figures['images']} Fashion-MNIST PNGs, {figures['cpu_count']} CPU cores, "
             f"{figures['torch_threads']} torch threads, median of {figures['repeats']} runs each "
             f"(writing the PNGs took {figures['write_pngs_s']:.1f} s)"]
    ratios = figures[f"ratio to {BASELINE}"]
    for name, seconds in figures["seconds"].items():
        lines.append(f"  {name:<26} {seconds:7.2f} s {figures['images_per_s'][name]:8.0f} images/s "
                     f"{ratios[name]:6.2f}x  accuracy {figures['accuracy'][name]:.4f}")
    lines.append(f"  same predictions on every path: {figures['same_predictions']}")
    for batch, row in figures["onnx"].items():
        lines.append(f"  {batch:<9} eager {row['eager_ms']:8.3f} ms  onnxruntime {row['onnxruntime_ms']:8.3f} ms  "
                     f"eager / onnxruntime {row['eager / onnxruntime']:.2f}x")
    print("\n".join(lines), file=sys.stderr)


if __name__ == "__main__":
    main()
