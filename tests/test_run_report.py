"""`ptft report`: one self-contained HTML page of runs (curves, config diff, lineage, comparison)."""

from __future__ import annotations

import base64
import json
import math
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from conftest import tiny_finetune_config, tiny_pretrain_config, write_yaml

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class ReportParser(HTMLParser):
    """Collects the page's images, tables (by class, as rows of cell texts) and lineage lists' text."""

    def __init__(self):
        super().__init__()
        self.images: list[dict] = []
        self.tables: dict[str, list[list[str]]] = {}
        self.chains: list[list[str]] = []  # each lineage list's items, oldest first
        self.links: list[str] = []
        self._table: str | None = None
        self._cell: list[str] | None = None
        self._in_chain = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs)
        elif tag in ("script", "link") or attrs.get("href"):
            self.links.append(tag)
        elif tag == "table":
            self._table = attrs.get("class", "")
            self.tables.setdefault(self._table, [])
        elif tag == "tr" and self._table is not None:
            self.tables[self._table].append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = []
        elif tag == "ul" and attrs.get("class") == "chain":
            self._in_chain = True
            self.chains.append([])
        elif tag == "li" and self._in_chain:
            self.chains[-1].append("")

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[self._table][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = None
        elif tag == "ul":
            self._in_chain = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._in_chain and self.chains[-1]:
            self.chains[-1][-1] += data


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny pretraining run and a finetuning run started from it, the finetuning one evaluated."""
    from ptft.cli import main

    root = tmp_path_factory.mktemp("runs")
    pre_cfg = write_yaml(root / "pre.yaml", tiny_pretrain_config(root / "pre"))
    ft_cfg = write_yaml(root / "ft.yaml", tiny_finetune_config(root / "ft", str(root / "pre")))
    # In this process, once for the module (the `ptft` fixture is per test): training takes seconds.
    for args in (("pretrain", pre_cfg), ("finetune", ft_cfg), ("evaluate", root / "ft")):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(sys, "argv", ["ptft", *map(str, args)])
            try:
                main()
            except SystemExit as exc:
                assert not exc.code, f"ptft {' '.join(map(str, args))} exited {exc.code}"
    return root / "pre", root / "ft"


def _best(run: Path) -> dict:
    return json.loads((run / "checkpoints" / "best" / "meta.json").read_text())


def _report(ptft, tmp_path, *runs: Path) -> ReportParser:
    out = tmp_path / "report.html"
    result = ptft("report", *runs, "--out", out, "--png", tmp_path / "curves.png")
    assert result.code == 0, result.stderr
    assert result.last_line == str(out)
    parser = ReportParser()
    parser.feed(out.read_text(encoding="utf-8"))
    return parser


def test_report_inlines_curves_and_eval_pictures_as_png_data_uris(ptft, tmp_path, two_runs):
    page = _report(ptft, tmp_path, *two_runs)
    sources = [img["src"] for img in page.images]
    # The curves, and the confusion matrix that evaluate wrote for the finetuning run.
    assert [img["class"] for img in page.images] == ["curves", "picture"]
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG_MAGIC)
    assert page.links == []  # self-contained: nothing to fetch, no script
    assert (tmp_path / "curves.png").read_bytes().startswith(PNG_MAGIC)
    assert not list(tmp_path.glob(".*tmp*"))  # written under a temp name, renamed


def test_report_lists_config_keys_that_differ_from_the_first_run(ptft, tmp_path, two_runs):
    page = _report(ptft, tmp_path, *two_runs)
    keys = {row[0]: row[1:] for row in page.tables["config-diff"][1:]}
    assert keys["model.name"] == ['"tiny_mlp_autoencoder"', '"tiny_mlp_classifier"']
    assert keys["init.checkpoint"][1] == json.dumps(str(two_runs[0]))
    assert "run.dir" not in keys  # differs between any two runs, says nothing


def test_report_lineage_names_the_parent_checkpoint(ptft, tmp_path, two_runs):
    pre, ft = two_runs
    page = _report(ptft, tmp_path, pre, ft)
    parent = _best(ft)["parent"]["path"]
    assert parent == str(Path(pre, "checkpoints", f"step-{_best(pre)['step']:08d}"))
    pre_chain, ft_chain = page.chains
    assert pre_chain == [f"pretrain step {_best(pre)['step']}: {parent} (this run)"]  # started from scratch
    this = Path(ft, "checkpoints", f"step-{_best(ft)['step']:08d}")
    assert ft_chain[0].startswith(f"pretrain step {_best(pre)['step']}: {parent} sha256 ")
    assert ft_chain[1] == f"finetune step {_best(ft)['step']}: {this} (this run)"


def test_report_comparison_table_holds_each_runs_best_value_and_eval_metrics(ptft, tmp_path, two_runs):
    page = _report(ptft, tmp_path, *two_runs)
    header, *rows = page.tables["comparison"]
    assert [row[0] for row in rows] == ["pre", "ft"]
    for run, row in zip(two_runs, rows):
        cells = dict(zip(header, row))
        best = _best(run)["best"]
        assert math.isclose(float(cells["best value"]), best["value"], rel_tol=1e-5)
        assert int(cells["best step"]) == best["step"] and cells["monitor"] == "val/loss"
    eval_metrics = json.loads((two_runs[1] / "eval" / "test" / "metrics.json").read_text())
    ft_cells = dict(zip(header, rows[1]))
    assert math.isclose(float(ft_cells["test/accuracy"]), eval_metrics["accuracy"], rel_tol=1e-5)
    assert dict(zip(header, rows[0]))["test/accuracy"] == "—"  # the pretraining run was not evaluated


def test_report_on_a_folder_that_is_not_a_run_exits_2_naming_it(ptft, tmp_path, two_runs):
    stray = tmp_path / "not_a_run"
    stray.mkdir()
    result = ptft("report", two_runs[0], stray, "--out", tmp_path / "report.html")
    assert result.code == 2
    assert str(stray) in result.stderr and "not a run directory" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "report.html").exists()


def test_report_skips_a_partial_last_metrics_line_and_names_a_corrupt_one(ptft, tmp_path, two_runs):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(two_runs[1], run, symlinks=True)
    metrics = run / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 99, "train/lo')  # killed mid-write
    assert ptft("report", run, "--out", tmp_path / "ok.html").code == 0
    metrics.write_text("not json\n" + metrics.read_text())
    result = ptft("report", run, "--out", tmp_path / "bad.html")
    assert result.code == 2 and f"{metrics}:1" in result.stderr
