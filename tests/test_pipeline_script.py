"""scripts/pipeline.sh: pretrain -> finetune -> evaluate through the printed checkpoints, then predict a folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from conftest import REPO, tiny_finetune_config, tiny_pretrain_config, write_yaml


def test_pipeline_chains_the_stages_and_ends_with_a_predict_on_a_folder(tmp_path):
    pre = write_yaml(tmp_path / "pre.yaml", tiny_pretrain_config(tmp_path / "ae"))
    ft = write_yaml(tmp_path / "ft.yaml", tiny_finetune_config(tmp_path / "ft", None))
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8), 40 * i, dtype=np.uint8), mode="L").save(photos / f"{i}.png")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PREDICT_INPUT": str(photos)}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "pipeline.sh"), str(pre), str(ft)], capture_output=True,
                          text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    metrics = json.loads(lines[0])
    assert metrics["stage"] == "finetune" and 0.0 <= metrics["accuracy"] <= 1.0
    assert metrics["lineage"][0]["path"].startswith(str(tmp_path / "ae"))  # finetuned from what pretrain printed
    records = [json.loads(line) for line in lines[1:]]
    assert [Path(r["path"]).name for r in records] == ["0.png", "1.png", "2.png"]
    assert all(0 <= r["pred"] < 10 and 0.0 <= r["prob"] <= 1.0 and len(r["top_k"]) == 5 for r in records)
