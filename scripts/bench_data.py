#!/usr/bin/env python3
"""How fast does ptft read a folder of your own images? Decode, cache, and an epoch against torchvision.

Two folders, made by this script under a temporary directory (deleted at the end, unless --keep):

  fashion   Fashion-MNIST as 70,000 PNGs in train/<class>/ and test/<class>/, written from the raw
            files in --data-root (torchvision's FashionMNIST(root, download=False))
  rgb       --rgb-images synthetic 224 px RGB JPEGs in train/<class>/ and (a sixth) test/<class>/
            (smooth colour fields plus noise)

and these figures:

  decode    first decode rate (images/s): one process vs a pool on every core (ptft.data.decoding);
            for the JPEG folder also one process with data.decoder pil against simplejpeg (when installed)
  cache     cold load (decode + write the cache) and reload (map the cache) through the imagefolder
            dataset, and build_data as a stage calls it; the cache's size on disk
  epoch     fashion only: one epoch of conv_classifier (batch 128, Adam) through ptft's own loop
            (`ptft pretrain`'s parts: data already decoded, batches by index; one validation and
            one checkpoint at the end included), against torchvision ImageFolder + DataLoader
            (num_workers=2, shuffle) driving the same model for the same number of steps
  gather    rgb only: ms per host batch (MEMORY_BATCH random rows of the mapped cache) read with
            preadv, as data.placement host does, against gathered through the mapping (the baseline)
  memory    rgb only: peak resident memory of `ptft pretrain` (a subprocess each, the cache already
            written) training --memory-steps steps with data.placement host, then device; and a
            pass over every image with placement host against --budget-mib, a budget below the
            cache's size. Peaks are the kernel's high-water mark (VmHWM) and sampled private
            (RssAnon) and file-backed (RssFile) parts, from /proc: pages of the mapped cache are
            file pages, which the kernel drops again under memory pressure; private memory it cannot.

  python scripts/bench_data.py --data-root ../shared/data --channels 8,16 --json bench_data.json
  python scripts/bench_data.py --skip-fashion --json bench_rgb.json    # the rgb folder and memory only

On a machine shared with other jobs wall times mostly measure the others: run it alone for figures
to quote, and read ratios from one run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
BATCH_SIZE = 128
RGB_SIZE = 224


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data",
                        help="folder holding FashionMNIST/raw")
    parser.add_argument("--rgb-images", type=int, default=15000,
                        help="synthetic 224 px JPEGs, 147 KiB each decoded (0: skip)")
    parser.add_argument("--device", default="cpu", help="device of the epoch comparison")
    parser.add_argument("--channels", default="32,64",
                        help="conv_classifier's channels in the epoch comparison (smaller: the data path shows more)")
    parser.add_argument("--skip-epoch", action="store_true", help="leave the epoch comparison out")
    parser.add_argument("--skip-fashion", action="store_true",
                        help="leave the Fashion-MNIST folder out (and the epoch)")
    parser.add_argument("--memory-steps", type=int, default=10,
                        help="training steps of the host vs device memory runs (0: skip the memory figures)")
    parser.add_argument("--budget-mib", type=float, default=1536,
                        help="memory budget of the pass over the whole cache (the default cache is 2.1 GiB; "
                             "the process itself takes about 1 GiB before any cache page: 0.3 GiB of torch's "
                             "shared libraries, 0.3 GiB of its private memory, and the model's activations)")
    parser.add_argument("--keep", type=Path, help="build the folders here and keep them (default: a temp dir)")
    parser.add_argument("--json", help="write every figure here as JSON ('-': stdout)")
    return parser.parse_args(argv)


def note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---- the folders -----------------------------------------------------------------------------------

def build_fashion_folder(data_root: Path, out: Path) -> Path:
    """train/<class>/<n>.png and test/<class>/<n>.png from torchvision's FashionMNIST raw files."""
    from torchvision.datasets import FashionMNIST

    for split, train in (("train", True), ("test", False)):
        dataset = FashionMNIST(str(data_root), train=train, download=False)
        for name in dataset.classes:
            (out / split / name.replace("/", "-")).mkdir(parents=True, exist_ok=True)
        names = [name.replace("/", "-") for name in dataset.classes]
        for i, (image, label) in enumerate(zip(dataset.data.numpy(), dataset.targets.tolist())):
            Image.fromarray(image).save(out / split / names[label] / f"{i:05d}.png")
    return out


def build_rgb_folder(out: Path, count: int, classes: int = 10) -> Path:
    """`count` 224 px RGB JPEGs: an upsampled 6x6 colour field per image plus pixel noise (photo-like sizes).

    Every sixth of a class goes to test/: without a test folder imagefolder holds out 20% of train by indexing
    the mapped cache, which copies all of it into private memory and would hide what placement does.
    """
    rng = np.random.default_rng(0)
    for i in range(count):
        field = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((RGB_SIZE, RGB_SIZE),
                                                                                       Image.Resampling.BICUBIC)
        pixels = np.clip(np.asarray(field, dtype=np.int16) + rng.integers(-12, 13, field.size + (3,)), 0, 255)
        # Every sixth image of each class, so both splits stay balanced.
        folder = out / ("test" if i // classes % 6 == 5 else "train") / f"c{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)
    return out


# ---- decode and cache ------------------------------------------------------------------------------

def decode_rates(root: Path, cores: int) -> dict:
    """images/s decoding every file once: in this process, then with a pool on every core."""
    from ptft.data.decoding import DecodeOptions, decode_files

    from ptft.data.images import simplejpeg_installed

    files = sorted(path for path in root.rglob("*") if path.suffix in (".png", ".jpg"))
    jpegs = all(path.suffix == ".jpg" for path in files) and simplejpeg_installed()
    runs = [("one process, PIL", 0, "pil")] if jpegs else []  # the same pixels, PIL's own decoder
    runs += [("one process", 0, "auto"), (f"pool of {cores}", cores, "auto")]
    rates = {}
    for name, workers, decoder in runs:
        started = time.perf_counter()
        decode_files(files, DecodeOptions(decoder=decoder), workers=workers)
        rates[name] = len(files) / (time.perf_counter() - started)
    figures = {"files": len(files), "images_per_s": rates,
               "pool_speedup": rates[f"pool of {cores}"] / rates["one process"]}
    if jpegs:
        figures["simplejpeg_speedup"] = rates["one process"] / rates["one process, PIL"]
    return figures


def cache_figures(root: Path, cache_dir: Path) -> dict:
    """Cold load (decode + write), reload (map) and a stage's build_data over the mapped cache."""
    from ptft.config import config_from_dict
    from ptft.data import DATASETS, build_data

    imagefolder = DATASETS.get("imagefolder")
    shutil.rmtree(cache_dir, ignore_errors=True)  # cold means cold, also with --keep
    started = time.perf_counter()
    imagefolder(root, False, cache_dir=str(cache_dir))
    cold = time.perf_counter() - started
    started = time.perf_counter()
    imagefolder(root, False, cache_dir=str(cache_dir))
    reload = time.perf_counter() - started
    cfg = config_from_dict({"data": {"name": "imagefolder", "root": str(root), "cache_dir": str(cache_dir)},
                            "train": {"epochs": 1}}, "bench_data")
    started = time.perf_counter()
    build_data(cfg.data, "cpu")
    staged = time.perf_counter() - started
    size = sum(path.stat().st_size for path in (cache_dir / "images").glob("*.npy"))
    return {"cold_load_s": cold, "reload_s": reload, "build_data_from_cache_s": staged, "cache_bytes": size}


# ---- one epoch -------------------------------------------------------------------------------------

def epoch_config(root: Path, cache_dir: Path, run_dir: Path, device: str, channels: list[int]):
    from ptft.config import config_from_dict

    shutil.rmtree(run_dir, ignore_errors=True)
    return config_from_dict({
        "run": {"dir": str(run_dir), "seed": 0},
        "data": {"name": "imagefolder", "root": str(root), "cache_dir": str(cache_dir), "batch_size": BATCH_SIZE},
        "model": {"name": "conv_classifier", "channels": channels}, "objective": {"name": "supervised"},
        "optim": {"name": "adam", "lr": 1e-3}, "train": {"epochs": 1, "device": device}}, "bench_data")


def epoch_ptft(cfg, device: torch.device) -> dict:
    """One epoch through ptft's parts and loop, as `ptft pretrain` builds and runs them."""
    from ptft.assembly import build_run, build_tracker, build_train_parts
    from ptft.config import config_hash
    from ptft.engine import fit
    from ptft.meta import CheckpointMeta
    from ptft.runtime import seed_everything

    seed_everything(cfg.run.seed)
    started = time.perf_counter()
    parts, settings = build_train_parts(build_run(cfg, device, stage="pretrain"))
    built = time.perf_counter() - started
    Path(cfg.run.dir).mkdir(parents=True)
    started = time.perf_counter()
    fit(parts, settings, Path(cfg.run.dir), tracker=build_tracker(cfg),
        meta_base=CheckpointMeta(stage="pretrain", config_hash=config_hash(cfg)))
    _sync(device)
    return {"steps": settings.total_steps, "build_s": built, "epoch_s": time.perf_counter() - started}


def grey_loader(path: str) -> Image.Image:
    # ImageFolder's default loader makes RGB; the model takes the folder's one grey channel.
    with Image.open(path) as image:
        return image.convert("L")


def epoch_torchvision(cfg, root: Path, steps: int, device: torch.device) -> dict:
    """`steps` steps of the same model, batch and optimizer over ImageFolder + DataLoader(num_workers=2)."""
    import torch.nn.functional as F
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import ToTensor

    from ptft.models import build_model
    from ptft.runtime import seed_everything

    seed_everything(cfg.run.seed)
    model = build_model(cfg.model, (1, 28, 28), 10).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr)
    dataset = ImageFolder(str(root / "train"), transform=ToTensor(), loader=grey_loader)
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=True, num_workers=2, drop_last=True)
    started = time.perf_counter()
    done = 0
    while done < steps:
        for x, y in loader:
            loss = F.cross_entropy(model(x.to(device, non_blocking=True)), y.to(device, non_blocking=True))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            done += 1
            if done == steps:
                break
    _sync(device)
    return {"steps": steps, "epoch_s": time.perf_counter() - started}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- resident memory -------------------------------------------------------------------------------

MEMORY_BATCH = 32
MEMORY_CHANNELS = [8, 16]  # small, so the model's own memory does not hide the data's


def memory_config(root: Path, cache_dir: Path, run_dir: Path, placement: str, steps: int | None) -> dict:
    """`ptft pretrain` of a small conv classifier, `steps` steps (None: one epoch), data.placement `placement`."""
    length = {"max_steps": steps} if steps else {"epochs": 1}
    return {"run": {"dir": str(run_dir), "seed": 0},
            "data": {"name": "imagefolder", "root": str(root), "cache_dir": str(cache_dir), "placement": placement,
                     "batch_size": MEMORY_BATCH, "eval_batch_size": MEMORY_BATCH},
            "model": {"name": "conv_classifier", "channels": MEMORY_CHANNELS}, "objective": {"name": "supervised"},
            "optim": {"name": "adam", "lr": 1e-3}, "train": {**length, "device": "cpu"}}


def _status_kib(pid: int) -> dict[str, int]:
    """VmHWM (peak RSS), RssAnon and RssFile of a live process, in KiB ({} once it is gone)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    fields = (line.split() for line in lines if line.startswith(("VmHWM:", "RssAnon:", "RssFile:")))
    return {name.rstrip(":"): int(kib) for name, kib, *_ in fields}


def peak_memory(config: dict, work: Path, name: str) -> dict:
    """Run `ptft pretrain` on `config` in a subprocess; its peak RSS and the peaks of its private and file parts.

    Not getrusage: Linux carries the parent's peak over the child's exec into the child's ru_maxrss,
    and this process has held a whole decoded folder by now. VmHWM is the exec'd image's own.
    """
    import subprocess

    import yaml

    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    shutil.rmtree(config["run"]["dir"], ignore_errors=True)
    with open(work / f"{name}.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "ptft", "pretrain", str(path)], cwd=REPO,
                                stdout=log, stderr=subprocess.STDOUT)
        peaks = {"VmHWM": 0, "RssAnon": 0, "RssFile": 0}
        started = time.perf_counter()
        try:
            while proc.poll() is None:  # VmHWM is a high-water mark: the last sample (20 ms before the exit) holds it
                for field, kib in _status_kib(proc.pid).items():
                    peaks[field] = max(peaks[field], kib)
                time.sleep(0.02)
        except BaseException:  # interrupted: no training run left behind
            proc.kill()
            proc.wait()
            raise
    if proc.returncode != 0:
        raise RuntimeError(f"ptft pretrain {path} exited {proc.returncode}:\n"
                           + (work / f"{name}.log").read_text()[-3000:])
    return {"peak_rss_bytes": peaks["VmHWM"] * 1024, "peak_private_bytes": peaks["RssAnon"] * 1024,
            "peak_file_bytes": peaks["RssFile"] * 1024, "wall_s": time.perf_counter() - started}


def gather_figures(root: Path, cache_dir: Path, batches: int = 100) -> dict:
    """ms per batch of MEMORY_BATCH random rows of the mapped cache: preadv (ptft) vs through the mapping."""
    from ptft.config.schema import DataSection
    from ptft.data import build_data, residency

    data = DataSection(name="imagefolder", root=str(root), cache_dir=str(cache_dir), placement="host")
    x = build_data(data, "cpu", reads=["unlabelled"]).unlabelled.x
    generator = torch.Generator().manual_seed(0)
    picks = [torch.randint(len(x), (MEMORY_BATCH,), generator=generator) for _ in range(batches)]
    ms = {}
    for name, reads in (("preadv", residency.read_rows), ("mapping", lambda *args: False)):
        real, residency.read_rows = residency.read_rows, reads
        try:
            x[picks[0]].read()  # warm-up
            started = time.perf_counter()
            for pick in picks:
                x[pick].read()
            ms[name] = (time.perf_counter() - started) / batches * 1e3
        finally:
            residency.read_rows = real
    return {"batch_size": MEMORY_BATCH, "ms_per_batch": ms, "mapping_over_preadv": ms["mapping"] / ms["preadv"]}


def memory_figures(root: Path, cache_dir: Path, work: Path, steps: int, budget_mib: float,
                   cache_bytes: int) -> dict:
    """Peak memory of `steps` steps with placement host vs device, and of a whole epoch with host under a budget."""
    figures = {"steps": steps, "batch_size": MEMORY_BATCH}
    for placement in ("host", "device"):
        note(f"memory: {steps} steps, data.placement {placement} ...")
        figures[placement] = peak_memory(memory_config(root, cache_dir, work / f"run_{placement}", placement, steps),
                                         work, f"memory_{placement}")
    budget = int(budget_mib * 2**20)
    note(f"memory: one epoch over the whole cache, data.placement host, budget {budget / 2**20:,.0f} MiB ...")
    epoch = peak_memory(memory_config(root, cache_dir, work / "run_budget", "host", None), work, "memory_budget")
    # Both verdicts: RSS also counts the file pages a stage has mapped (torch's shared libraries, and
    # any page of the cache read through its mapping rather than with preadv, ptft.data.residency),
    # which the kernel can take back; private memory is what the run cannot give back.
    figures["budget"] = {**epoch, "budget_bytes": budget, "cache_bytes": cache_bytes,
                         "rss_under_budget": epoch["peak_rss_bytes"] < budget,
                         "private_under_budget": epoch["peak_private_bytes"] < budget}
    return figures


# ---- report ----------------------------------------------------------------------------------------

def format_report(report: dict) -> str:
    lines = [f"ptft data bench: {report['cores']} cores, device {report['device']}, torch {report['torch']}"]
    for name, figures in report["folders"].items():
        decode, cache = figures["decode"], figures["cache"]
        rates = ", ".join(f"{k} {v:,.0f}/s" for k, v in decode["images_per_s"].items())
        lines += [f"{name}: {decode['files']:,} files",
                  f"  first decode       {rates} (pool x{decode['pool_speedup']:.2f}"
                  + (f", simplejpeg x{decode['simplejpeg_speedup']:.2f} PIL" if "simplejpeg_speedup" in decode else "")
                  + ")",
                  f"  cold load          {cache['cold_load_s']:.1f} s (decode + write cache)",
                  f"  reload from cache  {cache['reload_s']:.2f} s "
                  f"(build_data: {cache['build_data_from_cache_s']:.2f} s)",
                  f"  cache size         {cache['cache_bytes'] / 2**20:,.1f} MiB"]
    gather = report.get("gather")
    if gather:
        ms = gather["ms_per_batch"]
        lines += [f"host batches (rgb, {gather['batch_size']} random rows of the mapped cache): preadv "
                  f"{ms['preadv']:.2f} ms, through the mapping {ms['mapping']:.2f} ms "
                  f"(mapping / preadv x{gather['mapping_over_preadv']:.2f})"]
    epoch = report.get("epoch")
    if epoch:
        lines += [f"epoch (fashion, conv_classifier {report['channels']}, batch {BATCH_SIZE}, "
                  f"{epoch['ptft']['steps']} steps):",
                  f"  ptft               {epoch['ptft']['epoch_s']:.1f} s (+ {epoch['ptft']['build_s']:.1f} s "
                  "to build data and model from the cache)",
                  f"  ImageFolder+DL(2)  {epoch['torchvision']['epoch_s']:.1f} s",
                  f"  torchvision / ptft x{epoch['speedup']:.2f}"]
    if report.get("memory"):
        lines += format_memory(report["memory"])
    return "\n".join(lines)


def format_memory(memory: dict) -> list[str]:
    mib = 2**20
    budget = memory["budget"]

    def row(label: str, figures: dict) -> str:
        return (f"  {label:<19}{figures['peak_rss_bytes'] / mib:,.0f} MiB peak RSS (private "
                f"{figures['peak_private_bytes'] / mib:,.0f}, mapped file {figures['peak_file_bytes'] / mib:,.0f})")

    def verdict(key: str) -> str:
        return "under" if budget[key] else "OVER"

    return [f"memory (rgb, `ptft pretrain`, conv_classifier {MEMORY_CHANNELS}, batch {memory['batch_size']}):",
            row(f"{memory['steps']} steps, host", memory["host"]),
            row(f"{memory['steps']} steps, device", memory["device"]),
            row("epoch, host", budget),
            f"  budget             {budget['budget_bytes'] / mib:,.0f} MiB for a "
            f"{budget['cache_bytes'] / mib:,.0f} MiB cache: peak RSS {verdict('rss_under_budget')} it, "
            f"private memory {verdict('private_under_budget')} it"]


def main(argv=None) -> int:
    args = parse_args(argv)
    work = args.keep or Path(tempfile.mkdtemp(prefix="ptft_bench_data_"))
    device = torch.device(args.device)
    report = {"cores": len(os.sched_getaffinity(0)), "device": str(device), "torch": torch.__version__,
              "channels": args.channels, "folders": {}}
    try:
        folders = build_folders(args, work)
        for name, root in folders.items():
            note(f"{name}: decode rates ...")
            decode = decode_rates(root, report["cores"])
            note(f"{name}: cache ...")
            report["folders"][name] = {"decode": decode, "cache": cache_figures(root, work / f"cache_{name}")}
        if "fashion" in folders and not args.skip_epoch:
            note("epoch: ptft, then ImageFolder + DataLoader ...")
            cfg = epoch_config(folders["fashion"], work / "cache_fashion", work / "run", args.device,
                               [int(c) for c in args.channels.split(",")])
            ours = epoch_ptft(cfg, device)
            theirs = epoch_torchvision(cfg, folders["fashion"], ours["steps"], device)
            report["epoch"] = {"ptft": ours, "torchvision": theirs, "speedup": theirs["epoch_s"] / ours["epoch_s"]}
        if "rgb" in folders:
            note("rgb: host batches, preadv against the mapping ...")
            report["gather"] = gather_figures(folders["rgb"], work / "cache_rgb")
        if "rgb" in folders and args.memory_steps:
            report["memory"] = memory_figures(folders["rgb"], work / "cache_rgb", work, args.memory_steps,
                                              args.budget_mib, report["folders"]["rgb"]["cache"]["cache_bytes"])
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    note(format_report(report))
    if args.json:
        text = json.dumps(report, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    return 0


def build_folders(args: argparse.Namespace, work: Path) -> dict[str, Path]:
    """The folders the arguments ask for, written under `work` unless a kept run left them there."""
    folders = {}
    if not args.skip_fashion:
        if not (work / "fashion" / "train").is_dir():
            note("writing Fashion-MNIST as 70,000 PNGs ...")
            build_fashion_folder(args.data_root, work / "fashion")
        folders["fashion"] = work / "fashion"
    if args.rgb_images:
        if not (work / "rgb" / "train").is_dir():
            note(f"writing {args.rgb_images:,} synthetic {RGB_SIZE} px JPEGs ...")
            build_rgb_folder(work / "rgb", args.rgb_images)
        folders["rgb"] = work / "rgb"
    return folders


if __name__ == "__main__":
    sys.exit(main())
