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

Cross-dataset (`--datasets`): the same two shipped configs on every dataset, nothing but `data.*`
changed: configs/ssl_pretrain.yaml's label-free pretraining (once per objective and dataset) and
configs/ssl_finetune.yaml's finetune, with and without semi-supervised learning from the
unlabelled train split. Rows: scratch, scratch + fixmatch, each pretraining, each pretraining +
fixmatch; columns: dataset x labels per class. `--val-per-class` repeats every finetune with a
validation split of as many labels per class as the budget (`data.val_labels_per_class`), which
is what a user with that budget would really have, next to the generous 10% split
(`--val-per-class only`: that split alone).

    python scripts/label_efficiency.py --datasets digits,mnist,fashion_mnist --data-root ../shared/data

Which pretraining checkpoint a finetune starts from (`--select`, cross-dataset only): the one with
the best `val/knn_acc` (knn, the shipped config's choice), the one with the lowest SSL loss
(loss: `checkpoint.monitor=val/loss`, the k-NN figure still logged), or both side by side, each
row naming its selection, and the table's footnote the step each selection picked.

    python scripts/label_efficiency.py --datasets digits --select both --methods scratch contrastive

Studies run in parts (one dataset or budget at a time) become one table and plot with `--combine`,
which runs nothing: it reads their raw.json files and writes the combined table.md, plot.png and raw.json.

    python scripts/label_efficiency.py --combine results/a/raw.json results/b/raw.json --out results/ab
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
from dataclasses import dataclass, field, replace
from collections.abc import Iterable
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter, ScalarFormatter

REPO = Path(__file__).resolve().parents[1]
SCRATCH = "scratch"
# --select: the pretraining checkpoint a finetune starts from, by the checkpoint.monitor that picked it.
SELECTIONS = {"knn": "val/knn_acc", "loss": "val/loss"}


@dataclass(frozen=True)
class Recipe:
    """One row of the table: which pretraining to start from, and the finetune's own overrides."""

    name: str
    pretrain: str | None  # a key of Study.pretrain; None: from scratch
    finetune: tuple[str, ...] = ()
    select: str | None = None  # a key of SELECTIONS: which pretraining checkpoint; None: the config's own
    tagged: bool = False  # the row names its selection (--select loss or both)

    @property
    def row(self) -> str:
        return f"{self.name} (best {SELECTIONS[self.select]})" if self.tagged and self.select else self.name

    @property
    def folder(self) -> str:
        return selection_folder(self.name, self.select)


def selection_folder(name: str, select: str | None) -> str:
    """A recipe's or pretraining's run folder: the plain name for the default selection (as before
    --select existed), else one per selection (row names hold spaces and slashes)."""
    return name if select in (None, "knn") else f"{name}-best-{select}"


@dataclass(frozen=True)
class Study:
    """The configs and default budgets of one dataset's study."""

    finetune: str  # one finetune config for every method, so only the starting weights differ
    pretrain: dict[str, str]  # objective -> pretrain config
    budgets: list[int]  # labels per class
    data: list[str] = field(default_factory=list)  # overrides every stage gets
    pretrain_overrides: dict[str, list[str]] = field(default_factory=dict)  # objective -> its overrides


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

# The cross-dataset study: one recipe for every dataset, only data.* differs.
CROSS_DATASETS = ["digits", "mnist", "fashion_mnist"]
# Each label-free pretraining: its config and overrides (denoising needs a decoder: its own config's autoencoder).
CROSS_PRETRAININGS = {
    "contrastive": ("configs/ssl_pretrain.yaml", ["objective.name=contrastive", "objective.temperature=0.5"]),
    "vicreg": ("configs/ssl_pretrain.yaml", ["objective.name=vicreg"]),
    "denoising": ("configs/ssl_pretrain_denoising.yaml", []),
}
SEMI = "fixmatch"
VAL_BUDGET_SUFFIX = ", val = budget"  # a row's twin validated on as many labels per class as the budget


def cross_study(dataset: str) -> Study:
    """Each pretraining of CROSS_PRETRAININGS once, configs/ssl_finetune.yaml for every row."""
    return Study(finetune="configs/ssl_finetune.yaml",
                 pretrain={name: config for name, (config, _) in CROSS_PRETRAININGS.items()},
                 pretrain_overrides={name: overrides for name, (_, overrides) in CROSS_PRETRAININGS.items()},
                 budgets=[1, 10, 100], data=[f"data.name={dataset}"])


def cross_recipes() -> list[Recipe]:
    """scratch, scratch+fixmatch, then each pretraining without and with fixmatch."""
    recipes = []
    for pretrain in [None, *CROSS_PRETRAININGS]:
        name = pretrain or SCRATCH
        recipes += [Recipe(name, pretrain, ("finetune.unlabelled=none",)),
                    Recipe(f"{name}+{SEMI}", pretrain, (f"finetune.unlabelled={SEMI}",))]
    return recipes


CROSS_METHODS = [recipe.name for recipe in cross_recipes()]
# --quick: a smoke test of the whole pipeline in seconds, numbers meaningless.
QUICK_PRETRAIN = ["train.epochs=null", "train.max_steps=2", "train.eval_every_steps=2"]
QUICK_FINETUNE = ["train.max_steps=2", "train.eval_every_steps=2"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=sorted(STUDIES), default="digits")
    parser.add_argument("--datasets", help=f"cross-dataset study over these, comma-separated "
                                           f"(e.g. {','.join(CROSS_DATASETS)}): the shipped ssl_* configs everywhere")
    parser.add_argument("--methods", nargs="+", choices=list(dict.fromkeys(METHODS + CROSS_METHODS)),
                        help=f"rows (default: all; --dataset: {', '.join(METHODS)}; --datasets: "
                             f"{', '.join(CROSS_METHODS)})")
    parser.add_argument("--budgets", nargs="+", type=int, help="labels per class (default: the dataset's)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="finetune seeds")
    parser.add_argument("--select", choices=[*SELECTIONS, "both"],
                        help="--datasets: finetune from the pretraining checkpoint with the best val/knn_acc "
                             "(knn, the default), the lowest val/loss (loss), or from each (both: a row apiece)")
    parser.add_argument("--val-per-class", nargs="?", const="also", choices=["also", "only"],
                        help="also (the default when given) or only finetune with a validation split of as many "
                             "labels per class as the budget, instead of 10%% of the train split")
    parser.add_argument("--out", type=Path, help="results folder (default: results/label_efficiency/DATASET "
                                                 "or .../cross_dataset)")
    parser.add_argument("--work", type=Path, help="run directories (default: runs/label_efficiency/DATASET)")
    parser.add_argument("--data-root", help="data.root for every stage (files are never downloaded)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="runs at once, one thread each (default: 2, or 1 on a 1-core machine)")
    parser.add_argument("--quick", action="store_true", help="2 steps per stage: a smoke test, not a measurement")
    parser.add_argument("--combine", nargs="+", type=Path, metavar="RAW_JSON",
                        help="run nothing: write one table and plot of the runs in these studies' raw.json "
                             "files into --out")
    args = parser.parse_args(argv)
    if args.combine:
        if not args.out:
            parser.error("--combine: give --out, the folder for the combined table, plot and raw.json")
        return args
    if args.budgets and min(args.budgets) < 1:
        parser.error(f"--budgets: labels per class must be >= 1, got {args.budgets}")
    if args.jobs < 1:
        parser.error(f"--jobs: expected an integer >= 1, got {args.jobs}")
    _resolve_studies(parser, args)
    return args


def _resolve_studies(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """args.studies (dataset -> Study), args.recipes, budgets and folders, from --dataset or --datasets."""
    args.cross = args.datasets is not None
    name = "cross_dataset" if args.cross else args.dataset
    if args.cross:
        datasets = [d for d in args.datasets.split(",") if d]
        unknown = sorted(set(datasets) - set(CROSS_DATASETS)) or (not datasets and ["(none)"])
        if unknown:
            parser.error(f"--datasets: expected some of {','.join(CROSS_DATASETS)}, got {args.datasets!r}")
        args.studies = {dataset: cross_study(dataset) for dataset in datasets}
        known, args.recipes = CROSS_METHODS, cross_recipes()
    else:
        args.studies = {args.dataset: STUDIES[args.dataset]}
        known, args.recipes = METHODS, [Recipe(m, None if m == SCRATCH else m) for m in METHODS]
    chosen = args.methods or known
    if set(chosen) - set(known):
        parser.error(f"--methods: with {'--datasets' if args.cross else '--dataset'} expected some of "
                     f"{', '.join(known)}, got {' '.join(chosen)}")
    args.recipes = [recipe for recipe in args.recipes if recipe.name in chosen]
    _resolve_selection(parser, args)
    args.budgets = sorted(set(args.budgets or next(iter(args.studies.values())).budgets))
    args.out = args.out or REPO / "results" / "label_efficiency" / name
    args.work = args.work or REPO / "runs" / "label_efficiency" / name


def _resolve_selection(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """args.select, and each pretrained recipe once per selected checkpoint (the two side by side)."""
    if not args.cross:
        if args.select:  # the per-dataset configs keep their own checkpoint.monitor, without the k-NN monitor
            parser.error("--select: only with --datasets, whose configs/ssl_pretrain.yaml logs val/knn_acc")
        return
    args.select = args.select or "knn"
    selects = list(SELECTIONS) if args.select == "both" else [args.select]
    args.recipes = [replace(recipe, select=select, tagged=args.select != "knn") if recipe.pretrain else recipe
                    for recipe in args.recipes for select in (selects if recipe.pretrain else [None])]


def selection_overrides(select: str | None) -> list[str]:
    """A pretraining's overrides for `select`: the k-NN figure is logged either way, so both runs train alike."""
    return [] if select is None else ["train.knn_monitor=true", f"checkpoint.monitor={SELECTIONS[select]}"]


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


@dataclass(frozen=True)
class Finetune:
    """One finetune run of the study: a recipe on a dataset, a label budget, a seed and a validation split."""

    dataset: str
    recipe: Recipe
    budget: int
    seed: int
    val_per_class: bool = False  # validation split of `budget` labels per class instead of 10%

    @property
    def row(self) -> str:
        return self.recipe.row + (VAL_BUDGET_SUFFIX if self.val_per_class else "")


def dataset_work(args: argparse.Namespace, dataset: str) -> Path:
    """The dataset's run folder: args.work itself for a one-dataset study (as it always was)."""
    return args.work / dataset if args.cross else args.work


def stage_overrides(args: argparse.Namespace, dataset: str, run_dir: Path, quick: list[str]) -> list[str]:
    """Overrides every stage run gets: its run directory, the data, and --quick's step counts."""
    overrides = [f"run.dir={run_dir}", *args.studies[dataset].data]
    if args.data_root:
        overrides += [f"data.root={args.data_root}", "data.download=false"]
    return overrides + (quick if args.quick else [])


def pretrain(args: argparse.Namespace, dataset: str, method: str, select: str | None) -> str:
    """Pretrain with `method`'s config once, keeping the checkpoint `select` picks; returns it."""
    study = args.studies[dataset]
    run_dir = dataset_work(args, dataset) / selection_folder(method, select) / "pretrain"
    overrides = [*study.pretrain_overrides.get(method, []), *selection_overrides(select),
                 *stage_overrides(args, dataset, run_dir, QUICK_PRETRAIN)]
    stdout = run_ptft(["pretrain", study.pretrain[method], *overrides, "--overwrite"], run_dir.with_suffix(".log"))
    return last_line(stdout)


def best_of(checkpoint: str) -> dict | None:
    """The checkpoint's meta.json `best`: the monitor that picked it, its step and value (None: not recorded)."""
    return json.loads((REPO / checkpoint / "meta.json").read_text()).get("best")


def finetune_accuracy(args: argparse.Namespace, run: Finetune, init: str | None) -> float:
    """Finetune on `run.budget` labels per class with `run.seed`, evaluate on the test split; returns accuracy."""
    name = f"labels{run.budget}-seed{run.seed}" + (f"-val{run.budget}" if run.val_per_class else "")
    run_dir = dataset_work(args, run.dataset) / run.recipe.folder / name
    overrides = stage_overrides(args, run.dataset, run_dir, QUICK_FINETUNE) + [
        *run.recipe.finetune, f"init.checkpoint={init or 'null'}", f"data.labels_per_class={run.budget}",
        f"data.split_seed={run.seed}", f"run.seed={run.seed}"]
    if run.val_per_class:
        overrides.append(f"data.val_labels_per_class={run.budget}")
    log = run_dir.with_suffix(".log")
    best = last_line(run_ptft(["finetune", args.studies[run.dataset].finetune, *overrides, "--overwrite"], log))
    metrics = json.loads(run_ptft(["evaluate", best, "--split", "test"], log.with_suffix(".eval.log")))
    return metrics["accuracy"]


def finetunes_from(args: argparse.Namespace, dataset: str, pretrain: str | None,
                   select: str | None = None) -> list[Finetune]:
    """Every finetune of `dataset` that starts from `pretrain`'s `select`ed checkpoint (None: from scratch)."""
    variants = {None: [False], "also": [False, True], "only": [True]}[args.val_per_class]
    return [Finetune(dataset, recipe, budget, seed, val) for recipe in args.recipes
            if recipe.pretrain == pretrain and recipe.select == select
            for val in variants for budget in args.budgets for seed in args.seeds]


def run_study(args: argparse.Namespace) -> tuple[list[dict], dict[str, dict]]:
    """Every run, `args.jobs` at a time; returns their records and each pretraining's seconds and
    the checkpoint it handed on (`best_of`), by "dataset/folder" (by folder for one dataset's study).

    Pretraining runs go first (they take longest); a pretraining's finetunes are queued as soon
    as its checkpoint exists, the from-scratch ones at once.
    """
    records, pretrainings = [], {}
    methods = list(dict.fromkeys((r.pretrain, r.select) for r in args.recipes if r.pretrain))
    total = sum(len(finetunes_from(args, d, *p)) for d in args.studies for p in [(None,), *methods])
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        pending = {}

        def queue_finetunes(dataset: str, pretrain: str | None, select: str | None, init: str | None) -> None:
            for run in finetunes_from(args, dataset, pretrain, select):
                pending[pool.submit(timed, finetune_accuracy, args, run, init)] = run

        for dataset in args.studies:
            for method, select in methods:
                pending[pool.submit(timed, pretrain, args, dataset, method, select)] = (dataset, method, select)
        for dataset in args.studies:
            queue_finetunes(dataset, None, None, None)
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    job, (result, seconds) = pending.pop(future), future.result()
                    if isinstance(job, tuple):
                        dataset, method, select = job
                        folder = selection_folder(method, select)
                        key = f"{dataset}/{folder}" if args.cross else folder
                        pretrainings[key] = {"seconds": seconds, "best": best_of(result)}
                        note(f"pretrained {folder} on {dataset} in {seconds:.0f} s")
                        queue_finetunes(dataset, method, select, result)
                        continue
                    records.append({"dataset": job.dataset, "method": job.row, "labels_per_class": job.budget,
                                    "seed": job.seed, "accuracy": result, "seconds": seconds})
                    note(f"[{len(records)}/{total}] {job.dataset}, {job.row}, {job.budget} per class, "
                         f"seed {job.seed}: {100 * result:.1f}% ({seconds:.0f} s)")
        except BaseException:
            pool.shutdown(cancel_futures=True)  # a failed run ends the study; running ones finish
            raise
    return sort_records(args, records), pretrainings


def sort_records(args: argparse.Namespace, records: list[dict]) -> list[dict]:
    """Records by dataset, then row (the recipes' order, each before its val = budget twin), budget, seed."""
    rows = [f"{r.row}{suffix}" for r in args.recipes for suffix in ("", VAL_BUDGET_SUFFIX)]
    datasets = list(args.studies)
    return sorted(records, key=lambda r: (datasets.index(r["dataset"]), rows.index(r["method"]),
                                          r["labels_per_class"], r["seed"]))


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


def _seeds_text(seeds: list[int]) -> str:
    return f"{len(seeds)} seed{'s' * (len(seeds) != 1)} ({', '.join(map(str, seeds))})"


def markdown_table(rows: list[tuple[str, int, float, float]], budgets: list[int], seeds: list[int]) -> str:
    """Methods as rows, labels per class as columns, test accuracy in % as mean ± std over seeds."""
    return cross_table({None: rows}, budgets, seeds)


def cross_table(rows_by_dataset: dict[str | None, list[tuple[str, int, float, float]]], budgets: list[int],
                seeds: list[int], methods: list[str] | None = None) -> str:
    """Methods as rows (`methods`' order, default: as they come), (dataset,) labels per class as columns; a run
    that did not happen is '-'."""
    cells = {(dataset, method, budget): f"{100 * mean:.1f} ± {100 * std:.1f}"
             for dataset, rows in rows_by_dataset.items() for method, budget, mean, std in rows}
    methods = methods or list(dict.fromkeys(method for rows in rows_by_dataset.values() for method, *_ in rows))
    # A budget a dataset was not run at is no column of it (datasets may differ in budgets).
    columns = [(dataset, budget) for dataset in rows_by_dataset for budget in budgets
               if any((dataset, method, budget) in cells for method in methods)]
    header = [str(b) if d is None else f"{d} {b}" for d, b in columns]
    lines = [f"Test accuracy (%), mean ± std over {_seeds_text(seeds)}, by labels per class:", "",
             "| method | " + " | ".join(header) + " |", "|---|" + "---:|" * len(columns)]
    lines += [f"| {method} | " + " | ".join(cells.get((d, method, b), "-") for d, b in columns) + " |"
              for method in methods]
    return "\n".join(lines) + "\n"


def selection_footnote(pretrainings: dict[str, dict]) -> str:
    """Which step each pretraining's selection handed on, and its value there: the same step for
    both selections means the same weights, so their rows can differ only by finetuning noise."""
    lines = [f"- {key}: best {p['best']['monitor']} at step {p['best']['step']} ({p['best']['value']:.4g})"
             for key, p in pretrainings.items() if p["best"]]
    return "\n".join(["", "Pretraining checkpoints finetuned from:", *lines]) + "\n" if lines else ""


def write_results(args: argparse.Namespace, records: list[dict], pretrainings: dict, wall_seconds: float) -> str:
    """table.md, plot.png and raw.json into args.out; returns the table (a footnote on the pretraining
    checkpoints when --select loss or both names them in the rows)."""
    rows_by_dataset = {dataset: summarize([r for r in records if r["dataset"] == dataset]) for dataset in args.studies}
    args.out.mkdir(parents=True, exist_ok=True)
    if args.cross:
        table = cross_table(rows_by_dataset, args.budgets, args.seeds)
        save_cross_plot(rows_by_dataset, args.out / "plot.png")
    else:
        rows = rows_by_dataset[args.dataset]
        table = markdown_table(rows, args.budgets, args.seeds)
        save_label_efficiency_plot(rows, args.out / "plot.png", title=f"{args.dataset}: label efficiency")
    if any(recipe.tagged for recipe in args.recipes):
        table += selection_footnote(pretrainings)
    (args.out / "table.md").write_text(table)
    raw = {"datasets" if args.cross else "dataset": list(args.studies) if args.cross else args.dataset,
           "command": " ".join(["python", *sys.argv]), "quick": args.quick, "wall_seconds": round(wall_seconds, 1),
           "load_average": os.getloadavg(), "select": args.select,
           "pretrain_seconds": {key: p["seconds"] for key, p in pretrainings.items()},
           "pretrain_best": {key: p["best"] for key, p in pretrainings.items()}, "runs": records}
    (args.out / "raw.json").write_text(json.dumps(raw, indent=1) + "\n")
    return table


def note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _draw(ax, rows: Iterable[tuple[str, int, float, float]], title: str) -> None:
    """Accuracy against labels per class (log x axis) on `ax`, one line with error bars per method."""
    by_method: dict[str, list[tuple[int, float, float]]] = {}
    for method, labels_per_class, mean, std in rows:
        by_method.setdefault(method, []).append((labels_per_class, mean, std))
    colours = {}
    for method, points in by_method.items():
        budgets, means, stds = zip(*sorted(points))
        # A val = budget row is dashed, in its recipe's colour.
        base, twin = method.removesuffix(VAL_BUDGET_SUFFIX), method.endswith(VAL_BUDGET_SUFFIX)
        line = ax.errorbar(budgets, means, yerr=stds, marker="o", capsize=3, label=method, color=colours.get(base),
                           linestyle="--" if twin else "-")
        colours.setdefault(base, line.lines[0].get_color())
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
        ax.legend(fontsize="small")


def _save(fig: Figure, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)  # attaches itself to fig: no pyplot, no global backend change
    fig.savefig(path, format="png", dpi=100, bbox_inches="tight")


def save_label_efficiency_plot(rows: Iterable[tuple[str, int, float, float]], path: str | Path,
                               title: str = "label efficiency") -> None:
    """Plot accuracy against labels per class (log x axis), one line with error bars per method.

    Args:
        rows: (method, labels_per_class, mean accuracy, std accuracy) tuples, in any order.
    """
    fig = Figure(figsize=(6.0, 4.5))
    _draw(fig.add_subplot(), rows, title)
    _save(fig, path)


def save_cross_plot(rows_by_dataset: dict[str, list[tuple[str, int, float, float]]], path: str | Path) -> None:
    """One panel per dataset, side by side, as `save_label_efficiency_plot` draws one."""
    fig = Figure(figsize=(5.5 * len(rows_by_dataset), 4.5))
    for index, (dataset, rows) in enumerate(rows_by_dataset.items()):
        _draw(fig.add_subplot(1, len(rows_by_dataset), index + 1), rows, dataset)
    _save(fig, path)


RUN_KEYS = ("dataset", "method", "labels_per_class", "seed", "accuracy")  # what a raw.json run must hold


def read_study_runs(sources: list[Path]) -> list[dict]:
    """The runs recorded in studies' raw.json files, each at most once.

    Raises:
        ValueError: a file that is no study's raw.json, or the same run in two files (both name the file).
    """
    records, seen = [], set()
    for path in sources:
        try:
            runs = json.loads(path.read_text())["runs"]
            cells = [tuple(run[key] for key in RUN_KEYS) for run in runs]  # (dataset, method, budget, seed, acc)
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ValueError(f"--combine: {path} is not a raw.json that label_efficiency.py wrote ({error})") from None
        for cell, run in zip(cells, runs):
            key = cell[:4]
            if key in seen:
                raise ValueError(f"--combine: {path} repeats a run another file holds: {key}")
            seen.add(key)
            records.append(run)
    return records


def _position(name: str, known: list[str]) -> tuple[int, str]:
    """Sort key: names in `known`'s order, any others after them by name."""
    return (known.index(name) if name in known else len(known), name)


def combine_results(sources: list[Path], out: Path) -> str:
    """One table, plot and raw.json in `out` of the runs that several studies recorded (their raw.json files):
    datasets side by side, each with the budgets it was run at, rows in the studies' order.

    Raises:
        ValueError: a file that is no study's raw.json, the same run in two files, or cells over different seeds.
    """
    records = read_study_runs(sources)
    seeds_per_cell = {}
    for run in records:
        seeds_per_cell.setdefault((run["dataset"], run["method"], run["labels_per_class"]), set()).add(run["seed"])
    seed_sets = {tuple(sorted(seeds)) for seeds in seeds_per_cell.values()}
    if len(seed_sets) != 1:
        raise ValueError(f"--combine: the cells are over different seeds {sorted(seed_sets)}; one table states one set")
    datasets = sorted({run["dataset"] for run in records}, key=lambda d: _position(d, CROSS_DATASETS))
    rows = [f"{name}{suffix}" for name in dict.fromkeys(CROSS_METHODS + METHODS)
            for suffix in ("", VAL_BUDGET_SUFFIX)]
    records.sort(key=lambda r: (datasets.index(r["dataset"]), _position(r["method"], rows), r["labels_per_class"],
                                r["seed"]))
    rows_by_dataset = {dataset: summarize([r for r in records if r["dataset"] == dataset]) for dataset in datasets}
    # One order for every dataset's rows: a row only one dataset has still sits beside its recipe.
    methods = sorted({r["method"] for r in records}, key=lambda m: _position(m, rows))
    table = cross_table(rows_by_dataset, sorted({r["labels_per_class"] for r in records}), list(seed_sets.pop()),
                        methods)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table)
    save_cross_plot(rows_by_dataset, out / "plot.png")
    raw = {"datasets": datasets, "command": " ".join(["python", *sys.argv]), "combined": [str(p) for p in sources],
           "runs": records}
    (out / "raw.json").write_text(json.dumps(raw, indent=1) + "\n")
    return table


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.combine:
        try:
            table = combine_results(args.combine, args.out)
        except ValueError as error:
            note(f"error: {error}")
            raise SystemExit(2) from None
        print(table, end="")
        return
    start = time.monotonic()
    records, pretrainings = run_study(args)
    wall = time.monotonic() - start
    table = write_results(args, records, pretrainings, wall)
    note(f"{', '.join(args.studies)} study done in {wall / 60:.1f} min; results in {args.out}")
    print(table, end="")


if __name__ == "__main__":
    main()
