"""The `ptft` command: parse, load the config, call one stage, map errors to exit codes.

Exit codes: 0 success; 2 a problem the user can fix (message on stderr, no traceback);
1 an internal error (traceback); 130 interrupted after writing a resumable checkpoint.
stdout carries only the machine-readable result; people's output goes to stderr.
This module imports neither torch nor torchvision at import time: `ptft --help`,
`ptft config` and `ptft models` answer without them.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Optional

import typer

from ptft.errors import TrainingInterrupted, UserError

app = typer.Typer(
    name="ptft",
    help="Pretrain -> finetune -> evaluate for PyTorch. One command per stage, one YAML file each.\n\n"
    "Example: ptft pretrain configs/ae.yaml && ptft finetune configs/finetune.yaml && ptft evaluate runs/finetune",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

OVERRIDES_HELP = "KEY=VALUE overrides by dotted path, value read as YAML (optim.lr=0.01 model.hidden=[256,128])."
ConfigArg = typer.Argument(..., help="YAML config file.", show_default=False)
OverridesArg = typer.Argument(None, help=OVERRIDES_HELP, show_default=False)
ResumeOpt = typer.Option(False, "--resume", help="Continue the run in run.dir from its last checkpoint, exactly.")
OverwriteOpt = typer.Option(False, "--overwrite", help="Replace the run already in run.dir.")
DryRunOpt = typer.Option(False, "--dry-run", help="Validate, build data and model, print config and summary; train nothing.")


def _command(**kwargs):
    """`app.command`, with Ctrl-C mapped to exit 130 instead of click's exit 1."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kw):
            try:
                return fn(*args, **kw)
            except KeyboardInterrupt:
                raise TrainingInterrupted(None) from None

        return app.command(**kwargs)(wrapper)

    return decorate


def _train_command(stage: str, config: Path, overrides: Optional[list[str]], resume: bool, overwrite: bool,
                   dry_run: bool) -> None:
    from ptft.config import load_config

    cfg = load_config(config, overrides or [])
    from ptft import distributed, stages

    handoff = stages.train(cfg, stage, resume=resume, overwrite=overwrite, dry_run=dry_run)
    if handoff is not None and distributed.is_writer():  # under torchrun: one line, from rank 0
        print(handoff, flush=True)


@_command(epilog="Example: CKPT=$(ptft pretrain configs/ae.yaml train.max_steps=500 | tail -n1)")
def pretrain(config: Path = ConfigArg, overrides: Optional[list[str]] = OverridesArg, resume: bool = ResumeOpt,
             overwrite: bool = OverwriteOpt, dry_run: bool = DryRunOpt) -> None:
    """Pretrain a model (autoencoder, self-supervised or supervised); print the checkpoint to start from."""
    _train_command("pretrain", config, overrides, resume, overwrite, dry_run)


@_command(epilog="Example: ptft finetune configs/finetune.yaml init.checkpoint=runs/ae data.labels_per_class=10")
def finetune(config: Path = ConfigArg, overrides: Optional[list[str]] = OverridesArg, resume: bool = ResumeOpt,
             overwrite: bool = OverwriteOpt, dry_run: bool = DryRunOpt) -> None:
    """Finetune a classifier from init.checkpoint on the labelled subset; print the best checkpoint."""
    _train_command("finetune", config, overrides, resume, overwrite, dry_run)


@_command(epilog="Example: ptft evaluate runs/finetune --split test | jq .accuracy")
def evaluate(
    target: str = typer.Argument(..., help="A config file (its run.dir), a run directory or a checkpoint directory.",
                                 show_default=False),
    overrides: Optional[list[str]] = OverridesArg,
    split: str = typer.Option("test", "--split", help="Which split to evaluate: test or val."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write metrics here instead of RUN_DIR/eval/<split>/."),
) -> None:
    """Evaluate a run or checkpoint; print one JSON object of metrics."""
    if split not in ("test", "val"):
        raise UserError(f"--split: expected 'test' or 'val', got {split!r}")
    from ptft import distributed, evaluation

    metrics = evaluation.evaluate(target, overrides or [], split=split, out=out)
    if distributed.is_writer():
        print(json.dumps(metrics, sort_keys=True), flush=True)


@_command(name="config", epilog="Example: ptft config configs/finetune.yaml optim.lr=0.05")
def config_command(config: Path = ConfigArg, overrides: Optional[list[str]] = OverridesArg) -> None:
    """Validate a config (with overrides) and print the resolved config as YAML."""
    from ptft.config import config_to_yaml, load_config

    sys.stdout.write(config_to_yaml(load_config(config, overrides or [])))


@_command(epilog="Example: ptft models --json | jq '.models | keys'")
def models(as_json: bool = typer.Option(False, "--json", help="Print the listing as one JSON object on stdout.")
           ) -> None:
    """List what the registries hold: models, datasets, objectives, optimizers, schedules (tables on stderr)."""
    from ptft.inspection import print_registries

    print_registries(as_json=as_json)


@_command(epilog="Example: ptft inspect runs/finetune")
def inspect(target: Path = typer.Argument(..., help="A checkpoint directory or a run directory.", show_default=False),
            as_json: bool = typer.Option(False, "--json", help="Print the facts as one JSON object on stdout.")) -> None:
    """Show a checkpoint's step, metrics, config hash, versions and lineage (or a run's checkpoints)."""
    from ptft.inspection import inspect_target

    inspect_target(target, as_json=as_json)


TargetArg = typer.Argument(..., help="A run directory, a checkpoint directory or a config file (its run.dir).",
                           show_default=False)
InputsArg = typer.Argument(None, help="Image files, folders (searched at any depth, sorted), globs, or '-' for "
                           "paths on stdin.", show_default=False)
InputSplitOpt = typer.Option(None, "--split", help="Use the run's own test or val split instead of INPUT.")
BatchSizeOpt = typer.Option(256, "--batch-size", min=1, help="Images per batch (and per decoding chunk).")
WorkersOpt = typer.Option(None, "--workers", min=0, help="Decoding processes; 0 decodes in this one "
                          "[default: one per core but one (at most 8) once the first batch shows decoding is "
                          "slow enough to repay starting them].", show_default=False)


@_command(name="predict", epilog="Example: ptft predict runs/finetune photos/ --top-k 3 > predictions.jsonl")
def predict_command(
    target: str = TargetArg,
    inputs: Optional[list[str]] = InputsArg,
    split: Optional[str] = InputSplitOpt,
    top_k: int = typer.Option(5, "--top-k", min=1, help="Classes listed per input, most probable first."),
    fmt: str = typer.Option("jsonl", "--format", help="Records as jsonl or csv."),
    batch_size: int = BatchSizeOpt,
    out: Optional[Path] = typer.Option(None, "--out", help="Write the records here (complete or absent) instead "
                                       "of stdout."),
    strict: bool = typer.Option(False, "--strict", help="Stop at the first input that cannot be read."),
    save_images: Optional[Path] = typer.Option(None, "--save-images", help="Autoencoder: save each "
                                               "reconstruction as a PNG in this folder."),
    workers: Optional[int] = WorkersOpt,
) -> None:
    """Classify (or reconstruct) each input with a trained model; one record per input, in input order."""
    from ptft.inference.predict import PredictOptions, predict

    failed = predict(target, inputs or [], PredictOptions(top_k=top_k, fmt=fmt, batch_size=batch_size, out=out,
                                                          split=split, strict=strict, save_images=save_images,
                                                          workers=workers))
    if failed:
        raise UserError(f"predict: {failed} input(s) could not be read (see their records' 'error' field)")


@_command(name="embed", epilog="Example: ptft embed runs/ae photos/ --out features.safetensors --dtype float16")
def embed_command(
    target: str = TargetArg,
    inputs: Optional[list[str]] = InputsArg,
    out: Path = typer.Option(..., "--out", help="A .safetensors file (features, labels; paths in its metadata) or "
                             ".npy (features; paths and labels in a .json beside it).", show_default=False),
    split: Optional[str] = InputSplitOpt,
    dtype: str = typer.Option("float32", "--dtype", help="Features as float32 or float16."),
    batch_size: int = BatchSizeOpt,
    workers: Optional[int] = WorkersOpt,
) -> None:
    """Write the encoder's features of each input (pretrained or finetuned checkpoint); print the file."""
    from ptft.inference.embed import embed

    failed = embed(target, inputs or [], out=out, split=split, dtype=dtype, batch_size=batch_size, workers=workers)
    print(out, flush=True)
    if failed:
        raise UserError(f"embed: {failed} input(s) could not be read and have no row (listed under 'errors' "
                        f"in {out})")


@_command(name="export", epilog="Example: ptft export runs/finetune --format onnx --out model.onnx")
def export_command(
    target: str = TargetArg,
    fmt: str = typer.Option(..., "--format", help="onnx, torchscript or pt2 (torch.export).", show_default=False),
    out: Path = typer.Option(..., "--out", help="The exported file; its preprocessing goes to FILE.json.",
                             show_default=False),
) -> None:
    """Export the model with a dynamic batch dimension, check it against PyTorch; print the file."""
    from ptft.inference.export import export

    print(export(target, fmt=fmt, out=out), flush=True)


@_command(name="report", epilog="Example: ptft report runs/ae runs/finetune --out report.html --png curves.png")
def report_command(
    run_dirs: list[Path] = typer.Argument(..., metavar="RUN_DIR...", help="Run directories (run.dir of pretrain/finetune); several "
                                          "runs are overlaid and compared with the first.", show_default=False),
    out: Path = typer.Option(Path("report.html"), "--out", help="The HTML page (self-contained: images inlined)."),
    png: Optional[Path] = typer.Option(None, "--png", help="Also write the curves as a PNG (for terminals)."),
) -> None:
    """Write one HTML page of runs: lineage, config (diffs), curves, best step, evaluation; print the file."""
    from ptft.run_report import write_report

    print(write_report(run_dirs, out=out, png=png), flush=True)


def _report_user_error(exc: UserError) -> int:
    if os.environ.get("PTFT_DEBUG"):
        traceback.print_exc()
    print(f"error: {exc}", file=sys.stderr)
    return 2


def main() -> None:
    """Entry point of the `ptft` console script and `python -m ptft`."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _exit_without_teardown(_run)
    _run()


def _exit_without_teardown(run) -> None:
    """Under torchrun: run, then leave with the exit code at once, skipping interpreter teardown.

    By then the process group is destroyed and every file is written and closed; what teardown
    would still do is destroy C++ objects whose threads (gloo, the rendezvous store) can abort the
    process ("terminate called without an active exception", SIGABRT), seen once under load on
    CI: torchrun then reports exit 1 for a run that finished, and a shell script chaining stages
    stops on a good checkpoint.
    """
    try:
        run()
        code = 0
    except SystemExit as exc:
        if isinstance(exc.code, str):  # what sys.exit("message") would have printed on the way out
            print(exc.code, file=sys.stderr)
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _run() -> None:
    try:
        # Typer's standalone mode handles --help and usage errors (exit 2); our own errors
        # propagate out of it. Ctrl-C inside a command would become click's "Aborted!"
        # (exit 1), so commands turn it into TrainingInterrupted first (see _command).
        app()
    except UserError as exc:
        sys.exit(_report_user_error(exc))
    except TrainingInterrupted as exc:
        where = f" (checkpoint: {exc.checkpoint}); continue with --resume" if exc.checkpoint else ""
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank stops; rank 0 alone says so
            print(f"interrupted{where}", file=sys.stderr)
        sys.exit(130)
