#!/usr/bin/env python3
"""How fast is ptft's training loop? The same model on the same data, trained four ways in one run.

  (a) ptft        ptft.engine.fit over the parts `ptft pretrain` builds, at the CLI's cadence: a
                  metrics record every 50 steps, validation and a checkpoint once per epoch
  (b) hand        a minimal PyTorch loop: randperm over a preloaded tensor, index, step
  (c) dataloader  the classic pipeline: torchvision.datasets.MNIST + ToTensor + DataLoader
                  (batch 128, shuffle, num_workers=0)
  (d) lightning   PyTorch Lightning with default Trainer settings, on a DataLoader over a preloaded
                  tensor; skipped when lightning is not installed (pip install -e '.[bench]')

Workloads: the MLP autoencoder of configs/mnist_ae.yaml and the conv classifier of
configs/supervised_pretrain.yaml, on MNIST at batch 128 (digits, with a note, when MNIST is absent).
Each path loads its own data and builds its own model (same builder, same seed) and optimizer.

Fair ratios on a shared machine: after `--warmup` untimed steps, the paths train in alternating
blocks of `--block` steps (ptft, hand, dataloader, ptft, ...), so neighbouring blocks see the same
load. A path's ms/step is the median over its blocks; its ratio to (b) is the median over blocks of
its block time divided by that of the hand-loop block next to it. ptft and Lightning own their loops,
so each drives one pass, calling back as each step starts; between its blocks the other paths run one
block each. Also timed: `ptft --help` and `ptft config configs/ae.yaml` (median wall time of fresh
processes). The table goes to stderr; `--json FILE` gets every figure ('-' for stdout).

  python scripts/bench.py --data-root ../shared/data --steps 200 --json bench.json

On a machine shared with other jobs, wall time mostly measures the others (and two torch threads
on two busy cores spin-wait for each other): `--threads 1 --clock cpu` times the work itself.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench_paths import (PATHS, HandLoop, Interleaver, LoaderLoop, Meter, build_ptft, lightning_available,
                         loader_dataset, run_lightning, run_ptft, train_step, workload_loss, write_report)
from ptft.config import load_config
from ptft.data import DATASETS
from ptft.data.sources import MNIST_FILES
from ptft.models import build_model
from ptft.runtime import resolve_device, seed_everything

REPO = Path(__file__).resolve().parents[1]
BATCH_SIZE = 128
WORKLOADS = {"mlp_autoencoder": "configs/mnist_ae.yaml", "conv_classifier": "configs/supervised_pretrain.yaml"}
CLI_COMMANDS = {"ptft --help": ["--help"], "ptft config configs/ae.yaml": ["config", "configs/ae.yaml"]}
# The goals for a 2-core CPU: (max or min, bound).
TARGETS = {"ptft / hand, per step": ("max", 1.10), "lightning / ptft, per step": ("min", 2.0),
           "dataloader / ptft, per epoch": ("min", 10.0), "ptft --help, s": ("max", 0.3),
           "ptft config configs/ae.yaml, s": ("max", 0.5)}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="timed steps per path and workload")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps before timing")
    parser.add_argument("--block", type=int, default=10, help="steps per timed block")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="time blocks by wall clock, or by this process's CPU time (CPU only; for shared "
                             "machines, with --threads 1)")
    parser.add_argument("--data-root", type=Path, default=Path("data"), help="folder holding MNIST/raw")
    parser.add_argument("--dataset", default="mnist", choices=["mnist", "digits", "synthetic"])
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help=f"subset of {','.join(WORKLOADS)}")
    parser.add_argument("--skip-lightning", action="store_true", help="leave (d) out even when installed")
    parser.add_argument("--cli-repeats", type=int, default=5, help="fresh processes per CLI command (0: none)")
    parser.add_argument("--json", help="write every figure here as JSON ('-': stdout)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.workloads.split(",")) - set(WORKLOADS))
    if unknown:
        parser.error(f"--workloads: unknown {', '.join(unknown)}; choose from {', '.join(WORKLOADS)}")
    if args.clock == "cpu" and args.device.startswith("cuda"):
        parser.error("--clock cpu does not see GPU work; use --clock wall with --device cuda")
    if min(args.steps, args.block, args.threads or 1) < 1 or min(args.warmup, args.cli_repeats) < 0:
        parser.error("--steps, --block and --threads must be >= 1, --warmup and --cli-repeats >= 0")
    return args


def note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def choose_dataset(name: str, root: Path) -> tuple[str, str | None]:
    """The dataset to run, and a note when MNIST was asked for but its files are missing."""
    if name != "mnist" or all((root / "MNIST" / "raw" / f).is_file() for f in MNIST_FILES):
        return name, None
    return "digits", (f"MNIST not found in {root / 'MNIST' / 'raw'}: benchmarking on the 8x8 digits instead "
                      "(--data-root names the folder holding MNIST/raw)")


def workload_config(workload: str, dataset: str, args, run_dir: Path, total_steps: int):
    """The workload's config file at batch 128 on `dataset`, for `total_steps` steps, at CLI cadence."""
    return load_config(REPO / WORKLOADS[workload], [
        f"data.name={dataset}", f"data.root={args.data_root}", "data.download=false", f"data.batch_size={BATCH_SIZE}",
        f"train.device={args.device}", f"run.dir={run_dir}", "train.epochs=null", f"train.max_steps={total_steps}",
        # The defaults: validation and a checkpoint once per epoch, a metrics record every 50 steps.
        "train.eval_every_steps=null", "train.log_every_steps=50", "checkpoint.every_steps=null"])


def hand_parts(cfg, tensors, device):
    """Model (ptft's builder, the run seed) and optimizer, made as a hand-written script makes them."""
    seed_everything(cfg.run.seed)
    model = build_model(cfg.model, tensors.train_x.shape[1:], tensors.num_classes).to(device)
    optimizer_class = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[cfg.optim.name]
    return model, optimizer_class(model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                  weight_decay=cfg.optim.weight_decay)


def load_tensors(cfg):
    """The whole dataset as CPU tensors, the way each path loads it for itself."""
    return DATASETS.get(cfg.data.name)(Path(cfg.data.root), False)


def prime(cfg, device) -> None:
    """Load the data and take one step once, so one-time library set-up is booked to no path."""
    tensors = load_tensors(cfg)
    model, optimizer = hand_parts(cfg, tensors, device)
    train_step(model, optimizer, workload_loss(cfg.objective.name), tensors.train_x[:2].to(device),
               tensors.train_y[:2].to(device))


def make_steppers(cfg, device, meter: Meter, warmup: int) -> dict:
    """(b) and (c), built and warmed up, their memory booked as setup."""
    loss_fn = workload_loss(cfg.objective.name)

    def hand():
        tensors = load_tensors(cfg)
        return HandLoop(*hand_parts(cfg, tensors, device), loss_fn, tensors.train_x.to(device),
                        tensors.train_y.to(device), BATCH_SIZE)

    def dataloader():
        tensors = load_tensors(cfg)
        return LoaderLoop(*hand_parts(cfg, tensors, device), loss_fn,
                          loader_dataset(cfg.data.name, Path(cfg.data.root), tensors), BATCH_SIZE, device)

    steppers = {}
    for name, make in (("hand", hand), ("dataloader", dataloader)):
        meter.begin_setup(name)
        steppers[name] = make()
        steppers[name].run(warmup)
        meter.end_setup(name)
    return steppers


def bench_workload(workload: str, dataset: str, args, device, meter: Meter, tmp: Path) -> dict:
    """Time every path on one workload: per-path figures and the per-epoch comparison."""
    blocks = -(-args.steps // args.block)
    total_steps = Interleaver.steps_needed(args.warmup, args.block, blocks)
    cfg = workload_config(workload, dataset, args, tmp / workload, total_steps)
    note(f"{workload}: {total_steps} steps per path ...")
    prime(cfg, device)
    steppers = make_steppers(cfg, device, meter, args.warmup)
    ptft_pass = Interleaver("ptft", steppers, meter, args.warmup, args.block, blocks)
    meter.begin_setup("ptft")
    parts, settings = build_ptft(cfg, device)
    tail_s = run_ptft(parts, settings, cfg, ptft_pass)
    times = dict(ptft_pass.times)
    if not lightning_skipped(args):
        light_pass = Interleaver("lightning", {"hand": steppers["hand"]}, meter, args.warmup, args.block, blocks)
        meter.begin_setup("lightning")
        tensors = load_tensors(cfg)
        run_lightning(*hand_parts(cfg, tensors, device), workload_loss(cfg.objective.name), tensors.train_x,
                      tensors.train_y, BATCH_SIZE, device, light_pass, tmp / "lightning")
        times.update(lightning=light_pass.times["lightning"], hand_beside_lightning=light_pass.times["hand"])
    return {"config": WORKLOADS[workload], "model": cfg.model.name, "objective": cfg.objective.name,
            "optimizer": cfg.optim.name, **summarize(times, tail_s, parts.batches.steps_per_epoch, args, meter)}


def lightning_skipped(args) -> str | None:
    """Why (d) is not timed, or None when it is."""
    if args.skip_lightning:
        return "--skip-lightning"
    return None if lightning_available() else "lightning is not installed (pip install -e '.[bench]')"


def summarize(times: dict, tail_s: float, steps_per_epoch: int, args, meter: Meter) -> dict:
    """ms/step, samples/s, ratio to (b) and peak memory per path; then one epoch of (a) against (c)."""
    paths = {}
    for name in PATHS:
        if name not in times:
            paths[name] = {"skipped": lightning_skipped(args)}
            continue
        hand = times["hand_beside_lightning" if name == "lightning" else "hand"]
        ms, hand_ms = (statistics.median(t) / args.block * 1e3 for t in (times[name], hand))
        ratio = statistics.median(t / h for t, h in zip(times[name], hand))
        # What the path adds to the hand loop's step: its framework and data-pipeline cost.
        paths[name] = {"ms_per_step": round(ms, 3), "samples_per_s": round(BATCH_SIZE / ms * 1e3),
                       "ratio_to_hand": round(ratio, 3), "overhead_ms_per_step": round((ratio - 1) * hand_ms, 3),
                       **meter.peaks_mib(name),
                       "block_ms": [round(t * 1e3, 1) for t in times[name]]}
    ptft_ms, loader_ms = paths["ptft"]["ms_per_step"], paths["dataloader"]["ms_per_step"]
    # ptft's epoch ends with validation and a checkpoint: the ptft run's last step, timed with
    # what fit does after it, less one step.
    eval_checkpoint_s = max(0.0, tail_s - ptft_ms / 1e3)
    ptft_s = steps_per_epoch * ptft_ms / 1e3 + eval_checkpoint_s
    loader_s = steps_per_epoch * loader_ms / 1e3
    epoch = {"steps": steps_per_epoch, "ptft_s": round(ptft_s, 3),
             "ptft_eval_checkpoint_s": round(eval_checkpoint_s, 3), "dataloader_s": round(loader_s, 3),
             "dataloader_over_ptft": round(loader_s / ptft_s, 2)}
    return {"paths": paths, "epoch": epoch}


def time_cli(repeats: int, cpu_clock: bool) -> dict[str, float]:
    """Median seconds of fresh `python -m ptft ...` processes per command: wall, or their CPU time."""

    def clock() -> float:
        if not cpu_clock:
            return time.perf_counter()
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return children.ru_utime + children.ru_stime

    timings = {}
    for label, argv in CLI_COMMANDS.items():
        runs = []
        for _ in range(repeats):
            started = clock()
            subprocess.run([sys.executable, "-m", "ptft", *argv], cwd=REPO, check=True, capture_output=True)
            runs.append(clock() - started)
        timings[label] = round(statistics.median(runs), 3)
    return timings


def check_targets(workloads: dict, cli: dict) -> dict:
    """Each goal of the issue with this run's figure (worst over workloads) and whether it is met."""
    paths = [w["paths"] for w in workloads.values()]
    values = {
        "ptft / hand, per step": max(p["ptft"]["ratio_to_hand"] for p in paths),
        "lightning / ptft, per step": min((p["lightning"]["ratio_to_hand"] / p["ptft"]["ratio_to_hand"]
                                           for p in paths if "ratio_to_hand" in p["lightning"]), default=None),
        "dataloader / ptft, per epoch": min(w["epoch"]["dataloader_over_ptft"] for w in workloads.values()),
        "ptft --help, s": cli.get("ptft --help"),
        "ptft config configs/ae.yaml, s": cli.get("ptft config configs/ae.yaml"),
    }
    checked = {}
    for name, (kind, bound) in TARGETS.items():
        value = values[name]
        met = None if value is None else (value <= bound if kind == "max" else value >= bound)
        checked[name] = {"value": None if value is None else round(value, 3), kind: bound, "met": met}
    return checked


def format_workload(name: str, result: dict, header: str) -> list[str]:
    lines = [f"{name} ({result['config']}, {result['objective']}, {result['optimizer']}) {header}",
             f"  {'path':<28}{'ms/step':>9}{'samples/s':>11}{'x hand':>8}{'+ms/step':>10}{'peak RSS MiB':>14}"]
    for key, label in PATHS.items():
        path = result["paths"][key]
        if "skipped" in path:
            lines.append(f"  {label:<28}skipped: {path['skipped']}")
            continue
        rss = "n/a" if path["peak_rss_mib"] is None else f"{path['peak_rss_mib']:.0f}"
        cuda = f"  (CUDA {path['peak_cuda_mib']:.0f} MiB)" if path.get("peak_cuda_mib") is not None else ""
        lines.append(f"  {label:<28}{path['ms_per_step']:>9.2f}{path['samples_per_s']:>11,}"
                     f"{path['ratio_to_hand']:>7.2f}x{path['overhead_ms_per_step']:>+10.2f}{rss:>14}{cuda}")
    epoch = result["epoch"]
    lines.append(f"  epoch of {epoch['steps']} steps: (a) {epoch['ptft_s']:.1f} s (validation + checkpoint "
                 f"{epoch['ptft_eval_checkpoint_s']:.2f} s), (c) {epoch['dataloader_s']:.1f} s: "
                 f"(c) / (a) = {epoch['dataloader_over_ptft']:.1f}x")
    return lines


def format_report(report: dict) -> str:
    s = report["settings"]
    header = (f"on {s['dataset']}, batch {BATCH_SIZE}, {s['device']}, {s['threads']} threads, {s['clock']} clock: "
              f"{s['steps']} timed steps per path in blocks of {s['block']}, after {s['warmup']} warm-up steps")
    lines = [f"note: {n}" for n in report["notes"]]
    for name, result in report["workloads"].items():
        lines += ["", *format_workload(name, result, header)]
    if report["cli"]:
        lines += ["", f"CLI, median {report['settings']['clock']} time of fresh processes:"]
        lines += [f"  {command:<32}{seconds:.3f} s" for command, seconds in report["cli"].items()]
    lines += ["", "targets (worst workload):"]
    for name, target in report["targets"].items():
        kind = "max" if "max" in target else "min"
        verdict = {True: "met", False: "NOT met", None: "not measured"}[target["met"]]
        lines.append(f"  {name:<32}{target['value'] if target['value'] is not None else '-':>8}  "
                     f"({kind} {target[kind]}): {verdict}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dataset, fallback = choose_dataset(args.dataset, args.data_root)
    notes = [fallback] if fallback else []
    if lightning_skipped(args):
        notes.append(f"(d) Lightning skipped: {lightning_skipped(args)}")
    for line in notes:
        note(line)
    cli = time_cli(args.cli_repeats, cpu_clock=args.clock == "cpu") if args.cli_repeats else {}
    meter = Meter(device, cpu_clock=args.clock == "cpu")
    with tempfile.TemporaryDirectory(prefix="ptft-bench-") as tmp:
        workloads = {name: bench_workload(name, dataset, args, device, meter, Path(tmp))
                     for name in args.workloads.split(",")}
    report = {"command": " ".join(["scripts/bench.py", *(argv if argv is not None else sys.argv[1:])]),
              "settings": {"dataset": dataset, "device": str(device), "threads": torch.get_num_threads(),
                           "clock": args.clock, "batch_size": BATCH_SIZE, "steps": args.steps,
                           "warmup": args.warmup, "block": args.block,
                           "torch": torch.__version__, "python": platform.python_version(),
                           "cpu_count": os.cpu_count()},
              "notes": notes, "cli": cli, "workloads": workloads, "targets": check_targets(workloads, cli)}
    note(format_report(report))
    write_report(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
