"""`ptft report`: one self-contained HTML page (and a PNG of the curves) for one or more runs.

Per run: the lineage chain, the resolved config (with several runs, its diff against the first),
train/val/lr curves from metrics.jsonl, the best step, and evaluate's metrics and pictures. Images
are inlined as base64 data URIs and the CSS sits in the page, so it opens from disk with no server
and travels as one file. Curves are drawn on an Agg `Figure` as `ptft.report` draws: no pyplot,
no global backend change. Everything is read from files; nothing is recomputed.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ptft import checkpoint as ckpt
from ptft.errors import UserError
from ptft.inference.output import atomic_file
from ptft.rundir import RunDir, holds_run

# The splits `ptft evaluate --split` writes, in the order the report shows them.
EVAL_SPLITS = ("test", "val")

# Where a run lives is not what it is (config_hash leaves it out too); every pair of runs differs there.
DIFF_IGNORED_KEYS = frozenset({"run.dir"})
# evaluate's bookkeeping, not results: kept out of the metric tables.
EVAL_FACT_KEYS = frozenset({"step", "num_examples", "probe_train_examples"})
PANELS = (("loss", "loss"), ("validation metrics", "val metric"), ("learning rate", "lr"))


@dataclass
class RunFacts:
    """What one run directory holds, as read from its files."""

    path: Path
    files: RunDir
    config: dict                                 # config.yaml as written ({} when absent)
    records: list[dict]                          # metrics.jsonl, one dict per logged step
    checkpoint: Path | None = None               # best, else last
    meta: dict = field(default_factory=dict)     # that checkpoint's meta.json
    evals: dict[str, dict] = field(default_factory=dict)  # split -> eval/<split>/metrics.json


def write_report(run_dirs: list[Path], out: Path, png: Path | None = None) -> Path:
    """Write the HTML report of `run_dirs` to `out` (and the curves to `png`), each under a temp name.

    Raises:
        UserError: a path is not a run directory, or one of its files cannot be read.
    """
    if not run_dirs:
        raise UserError("report: name at least one RUN_DIR")
    runs = [read_run(Path(p)) for p in run_dirs]
    curves = _png_bytes(curves_figure(runs))
    with atomic_file(out) as tmp:
        tmp.write_text(render_html(runs, curves), encoding="utf-8")
    if png is not None:
        with atomic_file(png, "--png") as tmp:
            tmp.write_bytes(curves)
    return out


def read_run(path: Path) -> RunFacts:
    """The facts of the run in `path`. Raises UserError naming `path` when it holds no run."""
    files = RunDir(path)
    if not path.is_dir() or not holds_run(path):
        raise UserError(f"report: '{path}' is not a run directory (expected {files.config.name} or "
                        f"{files.checkpoints.name}/ inside, as pretrain/finetune write to run.dir)")
    config = _read_yaml(files.config) if files.config.is_file() else {}
    run = RunFacts(path, files, config, _read_records(files.metrics))
    if files.has_checkpoints():
        run.checkpoint = ckpt.resolve_checkpoint(path)
        run.meta = ckpt.read_meta(run.checkpoint)
    for split in EVAL_SPLITS:
        if files.eval_metrics(split).is_file():
            run.evals[split] = _read_json(files.eval_metrics(split))
    return run


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"report: cannot read {path}: {exc}") from None
    return data if isinstance(data, dict) else {}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"report: cannot read {path}: {exc}") from None


def _read_records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    text = path.read_text()
    lines = text.splitlines()
    if lines and not text.endswith("\n"):
        lines.pop()  # a run killed mid-write leaves a partial last line; the resumed run rewrites it
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            raise UserError(f"report: {path}:{number} is not a JSON object: {line[:80]!r}")
        records.append(record)
    return records


# ----------------------------------------------------------------------------- curves

def _panel_of(key: str) -> str | None:
    if key == "lr" or key.startswith("lr/"):
        return "lr"
    if key.startswith(("train/", "val/")) and key.endswith("loss"):
        return "loss"
    return "val metric" if key.startswith("val/") else None


def _series(records: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """metric key -> (steps, values), numbers only, in logged order."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for record in records:
        for key, value in record.items():
            if _panel_of(key) and isinstance(value, (int, float)) and "step" in record:
                steps, values = series.setdefault(key, ([], []))
                steps.append(record["step"])
                values.append(value)
    return series


def curves_figure(runs: list[RunFacts]) -> Figure:
    """Loss, validation-metric and lr panels; one colour per run, train solid, val dashed with dots."""
    all_series = [_series(run.records) for run in runs]
    panels = [(title, kind) for title, kind in PANELS if any(_panel_of(k) == kind for s in all_series for k in s)]
    fig = Figure(figsize=(10, 3.2 * max(len(panels), 1)))
    FigureCanvasAgg(fig)
    if not panels:
        fig.text(0.5, 0.5, "no metrics logged", ha="center", va="center")
        return fig
    axes = fig.subplots(len(panels), 1, squeeze=False, sharex=True)[:, 0]
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for ax, (title, kind) in zip(axes, panels):
        for run, series, color in zip(runs, all_series, colors):
            for key, (steps, values) in series.items():
                if _panel_of(key) == kind:
                    val = key.startswith("val/")
                    ax.plot(steps, values, color=color, linestyle="--" if val else "-", marker="o" if val else None,
                            markersize=3, label=f"{_name(run, runs)} {key}")
            best_step = (run.meta.get("best") or {}).get("step")
            if best_step is not None and kind == "loss":
                ax.axvline(best_step, color=color, linestyle=":", alpha=0.6)
        if kind == "loss" and _spans_decades(ax):
            ax.set_yscale("log")  # a pretraining and a finetuning loss differ by orders of magnitude
        ax.set_title(title, loc="left", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        if kind == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    axes[-1].set_xlabel("step (dotted: best checkpoint)")
    fig.tight_layout()
    return fig


def _spans_decades(ax) -> bool:
    values = [v for line in ax.get_lines() for v in line.get_ydata() if line.get_linestyle() != ":"]
    return bool(values) and min(values) > 0 and max(values) / min(values) > 20


def _png_bytes(fig: Figure, dpi: int = 100) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


# ----------------------------------------------------------------------------- html

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; margin-top: 2em; } h3 { font-size: 1.05em; }
table { border-collapse: collapse; margin: .5em 0; } td, th { border: 1px solid #ddd; padding: 2px 8px; }
th { background: #f4f4f4; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
code, pre { font: 12px ui-monospace, monospace; } pre { background: #f8f8f8; padding: .6em; overflow-x: auto; }
img { max-width: 100%; } .chain { list-style: none; padding-left: 0; } .chain li::before { content: "\\2192  "; }
.muted { color: #777; } .pictures img { max-width: 48%; margin-right: 1%; vertical-align: top; }
"""


def render_html(runs: list[RunFacts], curves_png: bytes) -> str:
    """The whole page: comparison table, curves, then one section per run."""
    title = "ptft report: " + ", ".join(_name(run, runs) for run in runs)
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{_e(title)}</title>",
             f"<style>{CSS}</style></head><body><h1>{_e(title)}</h1>",
             f"<h2>{'Comparison' if len(runs) > 1 else 'Summary'}</h2>", _comparison_table(runs),
             "<h2>Curves</h2>", _img(curves_png, "training curves", "curves")]
    for run in runs:
        parts.append(_run_section(run, runs))
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _run_section(run: RunFacts, runs: list[RunFacts]) -> str:
    first = runs[0]
    parts = [f"<h2 id='{_e(_name(run, runs))}'>{_e(_name(run, runs))} <span class='muted'>({_e(run.path)})"
             f"</span></h2>", "<h3>Lineage</h3>", _lineage(run), "<h3>Best step</h3>", _best(run)]
    if run is not first:
        parts += [f"<h3>Config: differences from {_e(_name(first, runs))}</h3>", _config_diff(first, run)]
    parts += ["<details" + (" open" if run is first else "") + "><summary>Resolved config</summary>",
              f"<pre>{_e(yaml.safe_dump(run.config, sort_keys=False)) if run.config else 'no config.yaml'}</pre>",
              "</details>"]
    for split, metrics in run.evals.items():
        parts += [f"<h3>Evaluation on {_e(split)}</h3>", _key_values(_scalars(metrics)),
                  _pictures(run.files.eval_metrics(split).parent, metrics.get("files") or {})]
    return "\n".join(parts)


def _lineage(run: RunFacts) -> str:
    if run.checkpoint is None:
        return "<p class='muted'>no checkpoint saved</p>"
    chain = [*run.meta.get("lineage", []), {"stage": run.meta.get("stage"), "step": run.meta.get("step"),
                                            "path": str(run.checkpoint), "hash": None}]
    items = [f"<li>{_e(link.get('stage') or '?')} step {_e(link.get('step'))}: <code>{_e(link.get('path'))}</code>"
             + (f" <span class='muted'>sha256 {_e(str(link['hash'])[:12])}</span>" if link.get("hash") else "")
             + ("" if link is not chain[-1] else " <b>(this run)</b>") + "</li>" for link in chain]
    parent = run.meta.get("parent") or {}
    note = (f"<p>started from <code>{_e(parent['path'])}</code></p>" if parent.get("path")
            else "<p class='muted'>started from scratch (no init.checkpoint)</p>")
    return note + "<ul class='chain'>" + "".join(items) + "</ul>"


def _best(run: RunFacts) -> str:
    best = run.meta.get("best") or {}
    if best.get("step") is None:
        return "<p class='muted'>no best checkpoint recorded</p>"
    return (f"<p>{_e(best.get('monitor'))} = <b>{_e(_fmt(best.get('value')))}</b> at step {_e(best['step'])} "
            f"(checkpoint <code>{_e(run.checkpoint)}</code>)</p>")


def _flat_config(config: dict) -> dict[str, object]:
    # One level, `section.key`, as ptft.config.config_diff names keys.
    return {f"{section}.{key}": value for section, values in config.items() if isinstance(values, dict)
            for key, value in values.items()}


def config_differences(first: dict, other: dict) -> list[tuple[str, object, object]]:
    """(dotted key, first run's value, other run's value) for each key that differs, sorted; run.dir left out."""
    a, b, missing = _flat_config(first), _flat_config(other), "(absent)"
    keys = sorted(k for k in a.keys() | b.keys()
                  if k not in DIFF_IGNORED_KEYS and a.get(k, missing) != b.get(k, missing))
    return [(key, a.get(key, missing), b.get(key, missing)) for key in keys]


def _config_diff(first: RunFacts, run: RunFacts) -> str:
    rows = config_differences(first.config, run.config)
    if not rows:
        return "<p class='muted'>none (besides run.dir)</p>"
    body = "".join(f"<tr><td><code>{_e(k)}</code></td><td>{_e(json.dumps(a))}</td><td>{_e(json.dumps(b))}</td></tr>"
                   for k, a, b in rows)
    return f"<table class='config-diff'><tr><th>key</th><th>first run</th><th>this run</th></tr>{body}</table>"


def _scalars(metrics: dict) -> dict[str, object]:
    return {k: v for k, v in sorted(metrics.items()) if isinstance(v, (int, float)) and k not in EVAL_FACT_KEYS}


def _key_values(values: dict[str, object]) -> str:
    rows = "".join(f"<tr><th>{_e(k)}</th><td class='num'>{_e(_fmt(v))}</td></tr>" for k, v in values.items())
    return f"<table>{rows}</table>" if rows else "<p class='muted'>no metrics</p>"


def _pictures(eval_dir: Path, files: dict) -> str:
    parts = []
    for name, recorded in sorted(files.items()):
        # evaluate records absolute paths; a run directory moved since then still has them beside metrics.json.
        path = next((p for p in (Path(recorded), eval_dir / Path(recorded).name) if p.is_file()), None)
        if path is None or path.suffix.lower() != ".png":
            parts.append(f"<p class='muted'>{_e(name)}: {_e(recorded)} not found</p>")
        else:
            parts.append(_img(path.read_bytes(), name, "picture"))
    return f"<div class='pictures'>{''.join(parts)}</div>"


def _comparison_table(runs: list[RunFacts]) -> str:
    eval_columns = sorted({f"{split}/{k}" for run in runs for split, m in run.evals.items() for k in _scalars(m)})
    header = ["run", "stage", "last step", "monitor", "best value", "best step", "final train/loss", *eval_columns]
    rows = []
    for run in runs:
        best = run.meta.get("best") or {}
        train_losses = [r["train/loss"] for r in run.records if isinstance(r.get("train/loss"), (int, float))]
        evals = {f"{split}/{k}": v for split, m in run.evals.items() for k, v in _scalars(m).items()}
        cells = [_name(run, runs), run.meta.get("stage"), run.records[-1].get("step") if run.records else None,
                 best.get("monitor"), best.get("value"), best.get("step"), train_losses[-1] if train_losses else None,
                 *(evals.get(c) for c in eval_columns)]
        rows.append("<tr>" + "".join(f"<td class='num'>{_e(_fmt(c))}</td>" if isinstance(c, (int, float))
                                     else f"<td>{_e(_fmt(c))}</td>" for c in cells) + "</tr>")
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    return f"<table class='comparison'><tr>{head}</tr>{''.join(rows)}</table>"


def _name(run: RunFacts, runs: list[RunFacts]) -> str:
    # The folder name, unless two runs share it; then the path as given.
    names = [r.path.name for r in runs]
    return run.path.name if names.count(run.path.name) == 1 else str(run.path)


def _img(png: bytes, alt: str, css_class: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f"<img class='{css_class}' alt='{_e(alt)}' src='data:image/png;base64,{data}'>"


def _fmt(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _e(value) -> str:
    return html.escape(str(value), quote=True)
