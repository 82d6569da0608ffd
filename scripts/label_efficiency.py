#!/usr/bin/env python
"""Label-efficiency study: test accuracy against labels per class, from scratch and after pretraining.

Drives the real CLI, as a user's shell script would: `ptft pretrain` once per pretraining
objective, then for every label budget and seed `ptft finetune` (from that checkpoint, or from
scratch) and `ptft evaluate`. Checkpoint paths come from the last stdout line of pretrain and
finetune, accuracies from evaluate's JSON.

Seeds: pretraining runs once per objective (the config's seed). Seed s of a finetune sets
`run.seed=s` and `data.split_seed=s`, so it draws its own labelled subset and validation split
(the test split is the dataset's own, the same for every run); the spread over seeds is mostly
the luck of which few examples get labels. Pretraining saw every training image without labels,
so no labels leak into it.

Writes OUT/table.md (mean ± std over seeds), OUT/plot.png and OUT/raw.json, and prints the table.

    python scripts/label_efficiency.py --dataset digits
    python scripts/label_efficiency.py --dataset mnist --data-root ../shared/data
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from collections.abc import Iterable
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter, ScalarFormatter

REPO = Path(__file__).resolve().parents[1]
SCRATCH = "scratch"


@dataclass(frozen=True)
class Study:
    """The configs and default budgets of one dataset's study."""

    finetune: str  # one finetune config for every method, so only the starting weights differ
    pretrain: dict[str, str]  # objective -> pretrain config
    budgets: list[int]  # labels per class
    data: list[str] = field(default_factory=list)  # overrides every stage gets


STUDIES = {
    "digits": Study(
        finetune="configs/conv_lpft.yaml",
        pretrain={"reconstruction": "configs/conv_ae.yaml", "denoising": "configs/denoise.yaml",
                  "masked": "configs/masked.yaml", "contrastive": "configs/contrastive.yaml"},
        budgets=[1, 5, 10]),
    "mnist": Study(
        finetune="configs/mnist_lpft.yaml",
        pretrain={"reconstruction": "configs/mnist_conv_ae.yaml", "denoising": "configs/mnist_denoise.yaml",
                  "masked": "configs/mnist_masked.yaml", "contrastive": "configs/mnist_contrastive.yaml"},
        budgets=[1, 10, 100]),
}
METHODS = [SCRATCH, "reconstruction", "denoising", "masked", "contrastive"]
# --quick: a smoke test of the whole pipeline in seconds, numbers meaningless.
QUICK_PRETRAIN = ["train.epochs=null", "train.max_steps=2", "train.eval_every_steps=2"]
QUICK_FINETUNE = ["train.max_steps=2", "train.eval_every_steps=2"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=sorted(STUDIES), default="digits")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS)
    parser.add_argument("--budgets", nargs="+", type=int, help="labels per class (default: the dataset's)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="finetune seeds")
    parser.add_argument("--out", type=Path, help="results folder (default: results/label_efficiency/DATASET)")
    parser.add_argument("--work", type=Path, help="run directories (default: runs/label_efficiency/DATASET)")
    parser.add_argument("--data-root", help="data.root for every stage (files are never downloaded)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="runs at once, one thread each (default: 2, or 1 on a 1-core machine)")
    parser.add_argument("--quick", action="store_true", help="2 steps per stage: a smoke test, not a measurement")
    args = parser.parse_args(argv)
    if args.budgets and min(args.budgets) < 1:
        parser.error(f"--budgets: labels per class must be >= 1, got {args.budgets}")
    if args.jobs < 1:
        parser.error(f"--jobs: expected an integer >= 1, got {args.jobs}")
    args.budgets = sorted(set(args.budgets or STUDIES[args.dataset].budgets))
    args.out = args.out or REPO / "results" / "label_efficiency" / args.dataset
    args.work = args.work or REPO / "runs" / "label_efficiency" / args.dataset
    return args


def run_ptft(args: list[str], log: Path) -> str:
    """Run `python -m ptft ARGS` from the repository root; its stderr goes to `log`; returns stdout.

    Raises:
        SystemExit: the command failed (the message holds the command and the end of its log).
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "ptft", *args]
    # One thread per run unless the caller says otherwise: these models are small, and on a
    # shared 2-core machine one run's two threads were 30x slower per step than one thread.
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with log.open("w") as err:
        proc = subprocess.run(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
    if proc.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-5:])
        raise SystemExit(f"error: `{' '.join(command)}` exited with {proc.returncode}; end of {log}:\n{tail}")
    return proc.stdout


def last_line(stdout: str) -> str:
    lines = stdout.strip().splitlines()
    if not lines:
        raise SystemExit("error: ptft printed no checkpoint path on stdout")
    return lines[-1]


def stage_overrides(args: argparse.Namespace, run_dir: Path, quick: list[str]) -> list[str]:
    """Overrides every stage run gets: its run directory, the data root, and --quick's step counts."""
    overrides = [f"run.dir={run_dir}", *STUDIES[args.dataset].data]
    if args.data_root:
        overrides += [f"data.root={args.data_root}", "data.download=false"]
    return overrides + (quick if args.quick else [])


def pretrain(args: argparse.Namespace, method: str) -> str:
    """Pretrain with `method`'s config once; returns the checkpoint to finetune from."""
    run_dir = args.work / method / "pretrain"
    overrides = stage_overrides(args, run_dir, QUICK_PRETRAIN)
    stdout = run_ptft(["pretrain", STUDIES[args.dataset].pretrain[method], *overrides, "--overwrite"],
                      run_dir.with_suffix(".log"))
    return last_line(stdout)


def finetune_accuracy(args: argparse.Namespace, method: str, init: str | None, budget: int, seed: int) -> float:
    """Finetune on `budget` labels per class with `seed`, evaluate on the test split; returns accuracy."""
    run_dir = args.work / method / f"labels{budget}-seed{seed}"
    overrides = stage_overrides(args, run_dir, QUICK_FINETUNE) + [
        f"init.checkpoint={init or 'null'}", f"data.labels_per_class={budget}",
        f"data.split_seed={seed}", f"run.seed={seed}"]
    log = run_dir.with_suffix(".log")
    best = last_line(run_ptft(["finetune", STUDIES[args.dataset].finetune, *overrides, "--overwrite"], log))
    metrics = json.loads(run_ptft(["evaluate", best, "--split", "test"], log.with_suffix(".eval.log")))
    return metrics["accuracy"]


def run_study(args: argparse.Namespace) -> tuple[list[dict], dict[str, float]]:
    """Every (method, budget, seed) run, `args.jobs` at a time; returns their records and each pretraining's seconds.

    Pretraining runs go first (they take longest); a method's finetunes are queued as soon as
    its checkpoint exists, the from-scratch ones at once.
    """
    records, pretrain_seconds = [], {}
    total = len(args.methods) * len(args.budgets) * len(args.seeds)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        pending = {}

        def queue_finetunes(method: str, init: str | None) -> None:
            for budget in args.budgets:
                for seed in args.seeds:
                    future = pool.submit(timed, finetune_accuracy, args, method, init, budget, seed)
                    pending[future] = (method, budget, seed)

        for method in args.methods:
            if method != SCRATCH:
                pending[pool.submit(timed, pretrain, args, method)] = (method, None, None)
        if SCRATCH in args.methods:
            queue_finetunes(SCRATCH, None)
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    (method, budget, seed), (result, seconds) = pending.pop(future), future.result()
                    if budget is None:
                        pretrain_seconds[method] = seconds
                        note(f"pretrained {method} in {seconds:.0f} s")
                        queue_finetunes(method, result)
                        continue
                    records.append({"method": method, "labels_per_class": budget, "seed": seed,
                                    "accuracy": result, "seconds": seconds})
                    note(f"[{len(records)}/{total}] {method}, {budget} per class, seed {seed}: "
                         f"{100 * result:.1f}% ({seconds:.0f} s)")
        except BaseException:
            pool.shutdown(cancel_futures=True)  # a failed run ends the study; running ones finish
            raise
    order = {method: i for i, method in enumerate(METHODS)}
    records.sort(key=lambda r: (order[r["method"]], r["labels_per_class"], r["seed"]))
    return records, dict(sorted(pretrain_seconds.items(), key=lambda item: order[item[0]]))


def timed(fn, *args):
    """(fn(*args), seconds it took)."""
    start = time.monotonic()
    result = fn(*args)
    return result, round(time.monotonic() - start, 1)


def summarize(records: list[dict]) -> list[tuple[str, int, float, float]]:
    """(method, labels per class, mean accuracy, std accuracy) over seeds, in run order."""
    groups: dict[tuple[str, int], list[float]] = {}
    for record in records:
        groups.setdefault((record["method"], record["labels_per_class"]), []).append(record["accuracy"])
    # Population std: with 3 seeds it describes the spread seen, it does not estimate a variance.
    return [(method, budget, statistics.fmean(accs), statistics.pstdev(accs))
            for (method, budget), accs in groups.items()]


def markdown_table(rows: list[tuple[str, int, float, float]], budgets: list[int], seeds: list[int]) -> str:
    """Methods as rows, labels per class as columns, test accuracy in % as mean ± std over seeds."""
    cells = {(method, budget): f"{100 * mean:.1f} ± {100 * std:.1f}" for method, budget, mean, std in rows}
    methods = list(dict.fromkeys(method for method, *_ in rows))
    seeds_text = f"{len(seeds)} seed{'s' * (len(seeds) != 1)} ({', '.join(map(str, seeds))})"
    lines = [f"Test accuracy (%), mean ± std over {seeds_text}, by labels per class:", "",
             "| method | " + " | ".join(map(str, budgets)) + " |", "|---|" + "---:|" * len(budgets)]
    lines += [f"| {method} | " + " | ".join(cells[method, b] for b in budgets) + " |" for method in methods]
    return "\n".join(lines) + "\n"


def write_results(args: argparse.Namespace, records: list[dict], pretrain_seconds: dict, wall_seconds: float) -> str:
    """table.md, plot.png and raw.json into args.out; returns the table."""
    rows = summarize(records)
    table = markdown_table(rows, args.budgets, args.seeds)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(table)
    save_label_efficiency_plot(rows, args.out / "plot.png", title=f"{args.dataset}: label efficiency")
    raw = {"dataset": args.dataset, "command": " ".join(["python", *sys.argv]), "quick": args.quick,
           "wall_seconds": round(wall_seconds, 1), "pretrain_seconds": pretrain_seconds, "runs": records}
    (args.out / "raw.json").write_text(json.dumps(raw, indent=1) + "\n")
    return table


def note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)



def save_label_efficiency_plot(rows: Iterable[tuple[str, int, float, float]], path: str | Path,
                               title: str = "label efficiency") -> None:
    """Plot accuracy against labels per class (log x axis), one line with error bars per method.

    Args:
        rows: (method, labels_per_class, mean accuracy, std accuracy) tuples, in any order.
    """
    by_method: dict[str, list[tuple[int, float, float]]] = {}
    for method, labels_per_class, mean, std in rows:
        by_method.setdefault(method, []).append((labels_per_class, mean, std))
    fig = Figure(figsize=(6.0, 4.5))
    ax = fig.add_subplot()
    for method, points in by_method.items():
        budgets, means, stds = zip(*sorted(points))
        ax.errorbar(budgets, means, yerr=stds, marker="o", capsize=3, label=method)
    ax.set_xscale("log")
    ax.set_xticks(sorted({budget for points in by_method.values() for budget, _, _ in points}))
    # Label exactly the budgets measured, as plain numbers, not log-axis minor ticks in 10^x form.
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("labels per class")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if by_method:
        ax.legend()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)  # attaches itself to fig: no pyplot, no global backend change
    fig.savefig(path, format="png", dpi=100, bbox_inches="tight")

def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.monotonic()
    records, pretrain_seconds = run_study(args)
    wall = time.monotonic() - start
    table = write_results(args, records, pretrain_seconds, wall)
    note(f"{args.dataset} study done in {wall / 60:.1f} min; results in {args.out}")
    print(table, end="")


if __name__ == "__main__":
    main()
