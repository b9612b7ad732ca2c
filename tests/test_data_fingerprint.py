"""A run records a fingerprint of its data (files' content, split, columns, label set) in config.yaml, and a
resume on other data is refused in one line naming what changed."""

from __future__ import annotations

import json
import re
import shutil

import pandas as pd
import pytest
import yaml

from ebslab.cli import main
from ebslab.core.config import DataConfig
from ebslab.inputs.data import data_fingerprint, fingerprint_changes

TINY = ["model.name=tiny-bert", "data.max_length=32", "batch.effective=16", "batch.micro=8", "train.epochs=1",
        "optim.lr=1e-3"]


def reviews(n: int, seed: int = 0, labels=("neg", "pos")) -> pd.DataFrame:
    words = ["good", "bad", "film", "plot", "actor", "boring", "great", "awful", "scene", "music"]
    return pd.DataFrame({"text": [f"{words[(i + seed) % 10]} {words[(i * 7 + seed) % 10]} review {i + seed}"
                                  for i in range(n)],
                         "label": [labels[(i + seed) % len(labels)] for i in range(n)]})


def test_the_fingerprint_follows_content_split_columns_and_labels_not_the_location(tmp_path):
    a, b = tmp_path / "a" / "d.csv", tmp_path / "b" / "d.csv"
    for p in (a, b):
        p.parent.mkdir()
        reviews(40).to_csv(p, index=False)
    base, parts = data_fingerprint(DataConfig(path=str(a)), ["neg", "pos"])
    assert re.fullmatch(r"[0-9a-f]{64}", base)
    assert data_fingerprint(DataConfig(path=str(b)), ["neg", "pos"])[0] == base  # moved: the same data
    reviews(40, seed=3).to_csv(b, index=False)  # every text and label replaced, same row count
    other, other_parts = data_fingerprint(DataConfig(path=str(b)), ["neg", "pos"])
    assert other != base and fingerprint_changes(parts, other_parts) == ["content of d.csv"]
    for change in ({"split": [0.7, 0.2, 0.1]}, {"split_seed": 1}, {"limit": 30}, {"text_column": "review"},
                   {"label_column": "y"}):
        digest, changed = data_fingerprint(DataConfig(path=str(a), **change), ["neg", "pos"])
        key = next(iter(change))
        assert digest != base and fingerprint_changes(parts, changed)[0].startswith(f"data.{key} "), change
    digest, changed = data_fingerprint(DataConfig(path=str(a)), ["neg", "neutral", "pos"])
    assert fingerprint_changes(parts, changed) == ["label set ['neg', 'pos'] -> ['neg', 'neutral', 'pos']"]
    shipped = data_fingerprint(DataConfig(), ["0", "1"])
    assert shipped[1]["content"].keys() == {"train.parquet", "test.parquet"}


@pytest.mark.timeout(300)
def test_resume_on_edited_data_is_refused_naming_the_change_and_the_same_data_resumes(tmp_path, capsys):
    data = tmp_path / "d.csv"
    reviews(60).to_csv(data, index=False)
    run = tmp_path / "runs" / "r"
    assert main(["train", *TINY, f"data.path={data}", f"out.dir={tmp_path / 'runs'}", "out.name=r"]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())["derived"]
    assert saved["data_fingerprint"] == data_fingerprint(DataConfig(path=str(data)), ["neg", "pos"])[0]
    (run / "summary.json").unlink()  # as if killed after its last checkpoint
    kept = tmp_path / "kept"
    shutil.copytree(run, kept)
    capsys.readouterr()

    reviews(60, seed=5).to_csv(data, index=False)  # every text and label replaced between kill and resume
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"ebslab: error: cannot resume '{run}': its data changed since it started (content of d.csv); "
                   "restore the data it trained on, or start a new run on the new data"]
    assert not (run / "summary.json").exists()  # left as it was

    reviews(60).to_csv(data, index=False)  # the same data again (a new file, same content)
    assert main(["train", "--resume", str(kept)]) == 0
    assert json.loads((kept / "summary.json").read_text())["status"] in ("completed", "collapsed")
