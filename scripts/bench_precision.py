#!/usr/bin/env python3
"""What bf16 autocast buys: the same FixMatch finetune in fp32 and in bf16, side by side in one run.

The run is configs/ssl_finetune.yaml from scratch (FixMatch: 32 labelled images and 3 times as many
unlabelled ones per step, each unlabelled image through a weak and a strong view), with every layer
training from the first step, for `--steps` steps, built and trained in this process as `ptft
finetune` does (ptft.assembly, ptft.engine.fit). Only `fit` is timed, not loading the data.

Fair on a shared machine: `--rounds` rounds each train both precisions back to back, the order
alternating between rounds (fp32/bf16, bf16/fp32, ...), so each pair sees the same load; the
speed-up is the median over rounds of fp32 seconds / bf16 seconds. Each run's last validation
accuracy is printed beside its time, so a speed-up that cost accuracy shows. The table goes to
stderr; `--json FILE` gets every figure ('-' for stdout).

  python scripts/bench_precision.py --data-root ../shared/data --steps 500 --rounds 2 --threads 1 --clock cpu

bf16 is fast where the hardware has it (GPUs of compute capability >= 8.0; CPUs with AVX512-BF16
or AMX); elsewhere it is emulated, and this bench shows by how much it is slower.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from bench_paths import alternating_rounds, machine_settings, timed_fit, write_report
from ptft.config import load_config
from ptft.runtime import resolve_device

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/ssl_finetune.yaml"
PRECISIONS = ("fp32", "bf16")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=500, help="training steps per run (one validation at the end)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each precision, alternating")
    parser.add_argument("--dataset", default="mnist", help="data.name (digits for a quick look)")
    parser.add_argument("--data-root", type=Path, default=Path("data"), help="folder holding MNIST/raw")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall clock, or this process's CPU time (CPU only; for shared machines, with --threads 1)")
    parser.add_argument("--json", help="write every figure here as JSON ('-': stdout)")
    args = parser.parse_args(argv)
    if min(args.steps, args.rounds, args.threads or 1) < 1:
        parser.error("--steps, --rounds and --threads must be >= 1")
    if args.clock == "cpu" and args.device != "cpu":
        parser.error("--clock cpu does not see GPU work; use --clock wall with a GPU")
    return args


def finetune_config(args, precision: str, run_dir: Path):
    overrides = [f"data.name={args.dataset}", f"data.root={args.data_root}", "data.download=false",
                 f"train.device={args.device}", f"run.dir={run_dir}", "init.checkpoint=null",
                 "finetune.mode=full", "finetune.unfreeze_at_step=null", f"train.max_steps={args.steps}",
                 f"train.eval_every_steps={args.steps}", f"train.precision={precision}"]
    return load_config(REPO / CONFIG, overrides)


def time_finetune(args, precision: str, round_: int, device: torch.device, run_dir: Path) -> dict:
    """One finetune: seconds of `fit` and the validation accuracy it ended with."""
    print(f"round {round_}: finetuning in {precision} ...", file=sys.stderr, flush=True)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    seconds, _, _ = timed_fit(finetune_config(args, precision, run_dir), "finetune", device, clock, run_dir)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val_acc = next(r["val/acc"] for r in reversed(records) if "val/acc" in r)
    return {"seconds": round(seconds, 3), "ms_per_step": round(1000 * seconds / args.steps, 2),
            "val_acc": round(val_acc, 4)}


def summarize(runs: list[dict]) -> dict:
    """Median seconds per precision and the paired speed-up (fp32 / bf16 within a round)."""
    by_round: dict[int, dict[str, float]] = {}
    for run in runs:
        by_round.setdefault(run["round"], {})[run["precision"]] = run["seconds"]
    speedups = [pair["fp32"] / pair["bf16"] for pair in by_round.values()]
    medians = {f"{p}_s": round(statistics.median(r["seconds"] for r in runs if r["precision"] == p), 3)
               for p in PRECISIONS}
    return {**medians, "speedup": round(statistics.median(speedups), 3)}


def format_report(report: dict) -> str:
    s, summary = report["settings"], report["summary"]
    lines = [f"{CONFIG} (FixMatch from scratch) on {s['dataset']}: {s['steps']} steps, {s['device']}, "
             f"{s['threads']} threads, {s['clock']} clock, {s['rounds']} round(s)",
             f"  {'round':<7}{'precision':<11}{'seconds':>9}{'ms/step':>9}{'val acc':>9}"]
    lines += [f"  {r['round']:<7}{r['precision']:<11}{r['seconds']:>9.2f}{r['ms_per_step']:>9.1f}{r['val_acc']:>9.4f}"
              for r in report["runs"]]
    lines.append(f"  median: fp32 {summary['fp32_s']:.2f} s, bf16 {summary['bf16_s']:.2f} s; "
                 f"bf16 speed-up {summary['speedup']:.2f}x (paired rounds)")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = alternating_rounds(PRECISIONS, args.rounds, "ptft-bench-precision-", key="precision",
                              run_one=lambda precision, round_, run_dir: time_finetune(args, precision, round_, device,
                                                                                     run_dir))
    report = {"command": " ".join(["scripts/bench_precision.py", *(argv if argv is not None else sys.argv[1:])]),
              "settings": {"config": CONFIG, "dataset": args.dataset, "steps": args.steps, "rounds": args.rounds,
                           **machine_settings(device, args.clock)},
              "runs": runs, "summary": summarize(runs)}
    print(format_report(report), file=sys.stderr, flush=True)
    write_report(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
