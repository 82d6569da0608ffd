#!/usr/bin/env python3
"""What the online k-NN monitor costs: the same pretraining with and without `train.knn_monitor`.

The run is configs/ssl_pretrain.yaml (label-free contrastive pretraining of a conv encoder, a
validation every `train.eval_every_steps`, the config's 250 unless `--eval-every` says otherwise)
for `--steps` steps, built and trained in this process as `ptft pretrain` does (ptft.assembly,
ptft.engine.fit). Without the monitor the checkpoint follows val/loss, as it must.

Fair on a shared machine: `--rounds` rounds each train both variants back to back, the order
alternating between rounds (off/on, on/off, ...), so each pair sees the same load; the ratio is
the median over rounds of on / off. Also timed: every call of the monitor itself, which gives a
second estimate that needs no pairing, on / (on - monitor), the run against itself less the monitor.
Only `fit` is timed (not loading the data). The table goes to stderr; `--json FILE` gets every
figure ('-' for stdout).

  python scripts/bench_knn_monitor.py --data-root ../shared/data --steps 500 --threads 1 --clock cpu

The issue's goal: at most +10% pretraining time at the default frequency on MNIST (`TARGET`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from bench_paths import alternating_rounds, machine_settings, timed_fit, write_report
from ptft.config import load_config
from ptft.runtime import resolve_device

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/ssl_pretrain.yaml"
TARGET = 1.10  # with / without, at most
VARIANTS = {"off": ["train.knn_monitor=false", "checkpoint.monitor=val/loss"],
            "on": ["train.knn_monitor=true", "checkpoint.monitor=val/knn_acc"]}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=500, help="training steps per run")
    parser.add_argument("--eval-every", type=int, help=f"steps between validations (default: {CONFIG}'s)")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each variant, alternating")
    parser.add_argument("--dataset", default="mnist", help="data.name (digits for a quick look)")
    parser.add_argument("--data-root", type=Path, default=Path("data"), help="folder holding MNIST/raw")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall clock, or this process's CPU time (CPU only; for shared machines, with --threads 1)")
    parser.add_argument("--json", help="write every figure here as JSON ('-': stdout)")
    args = parser.parse_args(argv)
    if min(args.steps, args.rounds, *(n for n in (args.threads, args.eval_every) if n is not None)) < 1:
        parser.error("--steps, --rounds, --threads and --eval-every must be >= 1")
    if args.clock == "cpu" and args.device != "cpu":
        parser.error("--clock cpu does not see GPU work; use --clock wall with a GPU")
    return args


def note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class TimedMonitor:
    """The run's KnnMonitor, with the seconds of each call booked (after a device sync)."""

    def __init__(self, monitor, clock, device: torch.device):
        self.monitor, self.clock, self.device, self.seconds = monitor, clock, device, []

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, *args, **kwargs) -> dict[str, float]:
        self._sync()
        start = self.clock()
        metrics = self.monitor(*args, **kwargs)
        self._sync()
        self.seconds.append(self.clock() - start)
        return metrics


def pretrain_config(args, variant: str, run_dir: Path):
    overrides = [f"data.name={args.dataset}", f"data.root={args.data_root}", "data.download=false",
                 f"train.device={args.device}", f"run.dir={run_dir}", "train.epochs=null",
                 f"train.max_steps={args.steps}", *VARIANTS[variant]]
    if args.eval_every:
        overrides.append(f"train.eval_every_steps={args.eval_every}")
    return load_config(REPO / CONFIG, overrides)


def time_pretraining(args, variant: str, device: torch.device, run_dir: Path) -> dict:
    """One pretraining: seconds of `fit`, seconds in the monitor, validations, and the k-NN bank's size."""
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    def time_the_monitor(parts) -> None:
        if parts.knn is not None:
            parts.knn = TimedMonitor(parts.knn, clock, device)

    seconds, parts, settings = timed_fit(pretrain_config(args, variant, run_dir), "pretrain", device, clock, run_dir,
                                         instrument=time_the_monitor)
    calls = parts.knn.seconds if parts.knn is not None else []
    bank = len(parts.knn.monitor.bank.y) if parts.knn is not None else 0
    return {"seconds": round(seconds, 3), "monitor_seconds": round(sum(calls), 3), "validations": len(calls),
            "bank_size": bank, "eval_every_steps": settings.eval_every}


def summarize(runs: list[dict]) -> dict:
    """Medians per variant, the paired ratio, and the ratio the monitor's own time implies."""
    on = [r for r in runs if r["variant"] == "on"]
    off = [r for r in runs if r["variant"] == "off"]
    paired = [a["seconds"] / b["seconds"] for a, b in zip(on, off)]  # same round: same load
    implied = [r["seconds"] / (r["seconds"] - r["monitor_seconds"]) for r in on]
    ratio = statistics.median(paired)

    def median(values) -> float:
        return round(statistics.median(values), 3)

    return {"off_s": median(r["seconds"] for r in off), "on_s": median(r["seconds"] for r in on),
            "monitor_s": median(r["monitor_seconds"] for r in on),
            "monitor_s_per_validation": median(r["monitor_seconds"] / r["validations"] for r in on),
            "ratio": round(ratio, 3), "ratio_from_monitor_time": round(statistics.median(implied), 3),
            "target": TARGET, "met": ratio <= TARGET}


def format_report(report: dict) -> str:
    s, summary = report["settings"], report["summary"]
    lines = [f"{CONFIG} on {s['dataset']}: {s['steps']} steps, validation every {s['eval_every_steps']}, "
             f"k-NN bank {s['bank_size']} examples, {s['device']}, {s['threads']} threads, {s['clock']} clock, "
             f"{s['rounds']} round(s)",
             f"  {'round':<7}{'variant':<9}{'seconds':>10}{'in monitor':>12}"]
    lines += [f"  {r['round']:<7}{r['variant']:<9}{r['seconds']:>10.2f}{r['monitor_seconds']:>12.2f}"
              for r in report["runs"]]
    verdict = "met" if summary["met"] else "NOT met"
    lines += [f"  median: without {summary['off_s']:.2f} s, with {summary['on_s']:.2f} s, in the monitor "
              f"{summary['monitor_s']:.2f} s ({summary['monitor_s_per_validation']:.2f} s per validation)",
              f"  with / without: {summary['ratio']:.3f} (paired rounds), {summary['ratio_from_monitor_time']:.3f} "
              f"(from the monitor's own time); target <= {TARGET}: {verdict}"]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    def run_one(variant: str, round_: int, run_dir: Path) -> dict:
        note(f"round {round_}: pretraining {variant} the k-NN monitor ...")
        return time_pretraining(args, variant, device, run_dir)

    runs = alternating_rounds(("off", "on"), args.rounds, "ptft-bench-knn-", run_one)
    on = next(r for r in runs if r["variant"] == "on")
    report = {"command": " ".join(["scripts/bench_knn_monitor.py", *(argv if argv is not None else sys.argv[1:])]),
              "settings": {"config": CONFIG, "dataset": args.dataset, "steps": args.steps,
                           "eval_every_steps": on["eval_every_steps"], "bank_size": on["bank_size"],
                           "rounds": args.rounds, **machine_settings(device, args.clock)},
              "runs": runs, "summary": summarize(runs)}
    note(format_report(report))
    write_report(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
