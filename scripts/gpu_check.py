#!/usr/bin/env python3
"""What only an accelerator can prove, in one short run: the checks CPU tests cannot make.

Run it the day a GPU machine is lent (`scripts/gpu_check.sh`); `--dry-run` runs every check on the
CPU with tiny lengths, so the test suite keeps the script from rotting. Each check drives the real
CLI in a fresh process (`python -m ptft ...`) and records its exit code, wall time and figures:

  bench        scripts/bench.py: ptft vs hand loop vs DataLoader vs Lightning, ms/step and ratios
  train        a conv autoencoder and a ResNet-18 classifier at bf16 and fp16, with and without
               train.compile: wall time, steps/s and final val/loss
  resume       N steps unbroken vs N/2 + --resume N/2 on the device (train.deterministic): bitwise?
  deterministic  train.deterministic=true twice: bitwise equal weights on the device too
  placement    data.placement host (pinned batches copied on a side stream, the next one prefetched)
               against device: bitwise equal weights (train.deterministic), and both runs' wall time
  evaluate     evaluate's peak device memory, read in-process (torch.cuda.max_memory_allocated)
  torchrun     a one-process torchrun smoke of pretrain (NCCL when more than one GPU is visible)
  data_epoch   scripts/bench_data.py on Fashion-MNIST written out as 70,000 PNGs: decode rates, and
               one epoch through ptft against ImageFolder + DataLoader(num_workers=2) on the device

Writes `--out DIR/<date>.json` (default results/gpu/) and prints a short table on stderr.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN_MODELS = {
    "conv_ae": ["configs/conv_ae.yaml", "model.channels=[32,64]"],
    "resnet18": ["configs/supervised_pretrain.yaml", "model.name=resnet18_classifier", "data.batch_size=256"],
}
# --dry-run proves the script's plumbing, not the models: the tiny variants keep it to seconds.
DRY_RUN_MODELS = {
    "conv_ae": ["configs/conv_ae.yaml", "model.name=tiny_conv_autoencoder", "model.channels=[4,8]", "model.latent=8"],
    "resnet18": ["configs/supervised_pretrain.yaml", "model.name=tiny_conv_classifier", "model.channels=[4,8]",
                 "model.latent=8"],
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny lengths: proves the script runs")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "gpu", help="folder for <date>.json")
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"), help="holds MNIST/raw")
    parser.add_argument("--steps", type=int, default=300, help="training steps per timed run")
    parser.add_argument("--budget-s", type=float, default=450,
                        help="wall-clock budget: checks that would start after it are recorded as skipped")
    return parser.parse_args(argv)


def ptft(args: list[str], work: Path, timeout: float = 600) -> dict:
    """Run `python -m ptft ARGS` and return exit code, wall seconds, last stdout line and stderr tail."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ptft", *args], capture_output=True, text=True, cwd=work,
                          env=env, timeout=timeout)
    lines = proc.stdout.strip().splitlines()
    return {"rc": proc.returncode, "seconds": round(time.perf_counter() - start, 2),
            "last": lines[-1] if lines else "", "stderr_tail": proc.stderr[-600:] if proc.returncode else ""}


def final_val_loss(run_dir: Path) -> float | None:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        return None
    losses = [r["val/loss"] for r in map(json.loads, metrics.read_text().splitlines()) if "val/loss" in r]
    return losses[-1] if losses else None


def train_checks(ctx: argparse.Namespace, compiled: bool) -> list:
    """One check per model and precision; eager ones run early, compiled ones last (they cost the most)."""
    precisions = ["bf16"] if ctx.dry_run else ["bf16", "fp16"]
    models = DRY_RUN_MODELS if ctx.dry_run else TRAIN_MODELS
    return [lambda work, n=name, b=base, p=precision: check_train(ctx, work, n, b, p, compiled)
            for name, base in models.items() for precision in precisions]


def check_train(ctx: argparse.Namespace, work: Path, name: str, base: list[str], precision: str,
                compiled: bool) -> dict:
    run_dir = work / f"train-{name}-{precision}-{'compile' if compiled else 'eager'}"
    result = ptft(["pretrain", str(REPO / base[0]), *base[1:], *ctx.common,
                   f"train.precision={precision}", f"train.compile={str(compiled).lower()}",
                   f"run.dir={run_dir}", "--overwrite"], work)
    result.update(check="train", model=name, precision=precision, compile=compiled,
                  steps_per_s=round(ctx.steps / result["seconds"], 2) if result["rc"] == 0 else None,
                  val_loss=final_val_loss(run_dir))
    return result


def check_resume(ctx: argparse.Namespace, work: Path) -> dict:
    config, *model = (DRY_RUN_MODELS if ctx.dry_run else TRAIN_MODELS)["conv_ae"]
    config = str(REPO / config)
    # Deterministic: with cuDNN's nondeterministic kernels the split run differed from the unbroken one by
    # max |diff| 0.2 after 300 steps on an H200 (bitwise equal with train.deterministic=true), so a resume
    # bug could hide in that noise.
    common = [*model, *ctx.common, "schedule.name=constant", "train.deterministic=true"]
    whole = ptft(["pretrain", config, *common, f"run.dir={work / 'whole'}", "--overwrite"], work)
    half = ptft(["pretrain", config, *common, f"train.max_steps={ctx.steps // 2}", f"run.dir={work / 'split'}",
                 "--overwrite"], work)
    rest = ptft(["pretrain", config, *common, f"run.dir={work / 'split'}", "--resume"], work)
    result = {"check": "resume", "rc": max(whole["rc"], half["rc"], rest["rc"]),
              "seconds": round(whole["seconds"] + half["seconds"] + rest["seconds"], 2)}
    if result["rc"] == 0:
        result.update(compare_weights(Path(whole["last"]), Path(rest["last"])))
    return result


def check_deterministic(ctx: argparse.Namespace, work: Path) -> dict:
    """train.deterministic=true twice: on a GPU too the two runs must end bitwise equal."""
    config, *model = (DRY_RUN_MODELS if ctx.dry_run else TRAIN_MODELS)["conv_ae"]
    runs = [ptft(["pretrain", str(REPO / config), *model, *ctx.common, "train.deterministic=true",
                  f"run.dir={work / f'deterministic-{i}'}", "--overwrite"], work) for i in (1, 2)]
    result = {"check": "deterministic", "rc": max(r["rc"] for r in runs),
              "seconds": round(sum(r["seconds"] for r in runs), 2),
              "stderr_tail": next((r["stderr_tail"] for r in runs if r["rc"]), "")}
    if result["rc"] == 0:
        result.update(compare_weights(Path(runs[0]["last"]), Path(runs[1]["last"])))
    return result


def check_placement(ctx: argparse.Namespace, work: Path) -> dict:
    """data.placement host vs device, deterministic: the same batches reach the model, so the same weights."""
    config, *model = (DRY_RUN_MODELS if ctx.dry_run else TRAIN_MODELS)["conv_ae"]
    runs = {placement: ptft(["pretrain", str(REPO / config), *model, *ctx.common, "train.deterministic=true",
                             f"data.placement={placement}", f"run.dir={work / f'placement-{placement}'}",
                             "--overwrite"], work) for placement in ("device", "host")}
    result = {"check": "placement", "rc": max(r["rc"] for r in runs.values()),
              "seconds": round(sum(r["seconds"] for r in runs.values()), 2),
              "device_s": runs["device"]["seconds"], "host_s": runs["host"]["seconds"],
              "stderr_tail": next((r["stderr_tail"] for r in runs.values() if r["rc"]), "")}
    if result["rc"] == 0:
        result.update(compare_weights(Path(runs["device"]["last"]), Path(runs["host"]["last"])))
    return result


def check_data_epoch(ctx: argparse.Namespace, work: Path) -> dict:
    """scripts/bench_data.py's Fashion-MNIST folder: decode, cache and an epoch against torchvision's loader."""
    out = work / "bench_data.json"
    # The dry run: a few hundred synthetic JPEGs, no epoch (it needs the Fashion-MNIST files).
    args = ["--rgb-images", "60", "--skip-fashion", "--memory-steps", "0"] if ctx.dry_run else         ["--data-root", str(Path(ctx.data_root)), "--rgb-images", "0", "--memory-steps", "0", "--channels", "32,64"]
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_data.py"), *args, "--device", ctx.device,
                           "--json", str(out)], capture_output=True, text=True, cwd=REPO, timeout=600)
    result = {"check": "data_epoch", "rc": proc.returncode,
              "stderr_tail": proc.stderr[-600:] if proc.returncode else ""}
    if proc.returncode == 0:
        result["figures"] = json.loads(out.read_text())
    return result


def compare_weights(a_dir: Path, b_dir: Path) -> dict:
    from safetensors.torch import load_file

    a, b = load_file(str(a_dir / "model.safetensors")), load_file(str(b_dir / "model.safetensors"))
    return {"max_abs_diff": max(float((a[k].float() - b[k].float()).abs().max()) for k in a),
            "bitwise_equal": all(bool((a[k] == b[k]).all()) for k in a)}


def check_evaluate_memory(ctx: argparse.Namespace, work: Path) -> dict:
    """Evaluate a trained run in this process, reading the device's peak memory around it."""
    import torch

    from ptft.evaluation import evaluate

    run_dir = work / "whole"
    cuda = torch.cuda.is_available() and not ctx.dry_run
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        metrics = evaluate(str(run_dir), ctx.common_eval)
        rc = 0
    except Exception as exc:  # a failed check is a figure, not the end of the script
        metrics, rc = {"error": f"{type(exc).__name__}: {exc}"[:300]}, 1
    return {"check": "evaluate", "rc": rc, "seconds": round(time.perf_counter() - start, 2),
            "peak_device_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
            "psnr": metrics.get("psnr"), "error": metrics.get("error")}


def check_torchrun(ctx: argparse.Namespace, work: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                           "-m", "ptft", "pretrain", str(REPO / "configs" / "ae.yaml"), *ctx.common,
                           f"run.dir={work / 'torchrun'}", "--overwrite"],
                          capture_output=True, text=True, cwd=work, env=env, timeout=600)
    return {"check": "torchrun", "rc": proc.returncode, "seconds": round(time.perf_counter() - start, 2),
            "stderr_tail": proc.stderr[-600:] if proc.returncode else ""}


def check_bench(ctx: argparse.Namespace, work: Path) -> dict:
    out = work / "bench.json"
    # Lightning joins where it is installed (the GPU image has it); the dry run leaves it out for speed.
    steps = ["--steps", "10", "--warmup", "1", "--block", "5", "--cli-repeats", "0", "--dataset", "digits",
             "--workloads", "mlp_autoencoder", "--skip-lightning"] \
        if ctx.dry_run else ["--steps", "200", "--data-root", ctx.data_root]
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench.py"), *steps, "--device", ctx.device,
                           "--json", str(out)], capture_output=True, text=True, cwd=REPO, timeout=600)
    result = {"check": "bench", "rc": proc.returncode, "stderr_tail": proc.stderr[-600:] if proc.returncode else ""}
    if proc.returncode == 0:
        result["figures"] = json.loads(out.read_text())
    return result


def main(argv=None) -> int:
    ctx = parse_args(argv)
    ctx.device = "cpu" if ctx.dry_run else "cuda"
    ctx.steps = 4 if ctx.dry_run else ctx.steps
    data = ["data.name=digits"] if ctx.dry_run else ["data.name=mnist", f"data.root={ctx.data_root}"]
    ctx.common = [*data, f"train.device={ctx.device}", "train.epochs=null", f"train.max_steps={ctx.steps}",
                  f"train.eval_every_steps={ctx.steps}"]
    ctx.common_eval = [f"train.device={ctx.device}"]
    # Cheapest and most telling first: a lease can end mid-run, and the report is rewritten after
    # every check so what ran is kept.
    checks = [lambda work: check_bench(ctx, work), *train_checks(ctx, compiled=False),
              lambda work: check_resume(ctx, work), lambda work: check_deterministic(ctx, work),
              lambda work: check_placement(ctx, work),
              lambda work: check_evaluate_memory(ctx, work), lambda work: check_torchrun(ctx, work),
              lambda work: check_data_epoch(ctx, work),
              *([] if ctx.dry_run else train_checks(ctx, compiled=True))]
    report = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "dry_run": ctx.dry_run,
              "python": platform.python_version(), "device": device_name(ctx.device), "checks": []}
    ctx.out.mkdir(parents=True, exist_ok=True)
    path = ctx.out / f"{dt.date.today().isoformat()}{'-dry-run' if ctx.dry_run else ''}.json"
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ptft-gpu-check-") as tmp:
        for check in checks:
            if time.perf_counter() - start > ctx.budget_s:
                report["checks"].append({"check": "skipped", "rc": 0, "reason": f"past --budget-s {ctx.budget_s}"})
                continue
            row = run_check(check, Path(tmp))
            report["checks"].append(row)
            print_table([row])
            path.write_text(json.dumps(report, indent=2) + "\n")
    print(path)
    return 0 if all(row["rc"] == 0 for row in report["checks"]) else 1


def run_check(check, work: Path) -> dict:
    try:
        return check(work)
    except subprocess.TimeoutExpired as exc:  # one stuck check must not cost the figures of the others
        return {"check": "timeout", "rc": 124, "error": str(exc)[:300]}


def device_name(device: str) -> str:
    import torch

    if device == "cuda" and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    return f"cpu (torch {torch.__version__})"


def print_table(rows: list[dict]) -> None:
    for row in rows:
        label = " ".join(str(row[k]) for k in ("check", "model", "precision") if k in row)
        if "compile" in row:
            label += " compile" if row["compile"] else " eager"
        figures = {k: v for k, v in row.items()
                   if k in ("seconds", "steps_per_s", "val_loss", "max_abs_diff", "bitwise_equal", "peak_device_mib",
                            "device_s", "host_s")}
        status = "ok" if row["rc"] == 0 else f"FAILED rc={row['rc']} {row.get('stderr_tail') or row.get('error', '')}"
        print(f"{label:<34} {status:<6} {json.dumps(figures)}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
