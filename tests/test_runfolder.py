"""ebslab.core.runfolder: the one reader of run folders (its torn-line test is test_report's read_jsonl test)."""
from __future__ import annotations

import json

import pytest
import yaml

from ebslab.core import runfolder
from ebslab.core.errors import UserError


def _run(tmp_path, config: dict | None = None, summary=None, metrics: str = ""):
    run = tmp_path / "run"
    run.mkdir()
    if config is not None:
        (run / "config.yaml").write_text(yaml.safe_dump(config))
    if summary is not None:
        (run / "summary.json").write_text(summary if isinstance(summary, str) else json.dumps(summary))
    (run / "metrics.jsonl").write_text(metrics)
    return run


def test_the_precision_is_what_config_yaml_recorded_and_a_log_beside_the_folder_changes_nothing(tmp_path):
    unrecorded = {"train": {"precision": "auto"}, "derived": {"micro": 16}}
    run = _run(tmp_path, unrecorded)
    (tmp_path / "run.log").write_text("model tiny-bert, device cpu, precision fp32 (train.precision=auto)\n")
    assert runfolder.read_config(run) == unrecorded  # what it asked for (auto), not what a log printed
    (run / "config.yaml").write_text(yaml.safe_dump({**unrecorded, "derived": {"precision": "bf16"}}))
    assert runfolder.read_config(run)["derived"]["precision"] == "bf16"


def test_missing_or_damaged_files_read_as_none_and_strict_reads_raise(tmp_path):
    run = _run(tmp_path, summary="[1, 2]")
    assert runfolder.read_summary(run) is None  # not an object
    assert runfolder.read_config(run) is None
    with pytest.raises(FileNotFoundError):
        runfolder.read_config(run, strict=True)
    (run / "summary.json").write_text('{"status": "compl')
    assert runfolder.read_summary(run) is None
    (run / "config.yaml").write_text("- a list\n")
    assert runfolder.read_config(run) is None and not runfolder.is_run_folder(tmp_path)
    with pytest.raises(UserError, match="not a valid ebslab config"):
        runfolder.load_run_config(run)
    with pytest.raises(UserError, match="no readable labels.json"):
        runfolder.read_labels(run)
    assert runfolder.read_predictions(run) is None


def test_metrics_and_labels_are_read_back(tmp_path):
    run = _run(tmp_path, {"train": {}}, {"status": "completed"},
               metrics='{"event": "step", "step": 1}\n[1]\n\n{"event": "eval", "step": 2}\n')
    assert [r["step"] for r in runfolder.read_metrics(run)] == [1, 2]  # a line that is not an object is skipped
    assert runfolder.read_summary(run) == {"status": "completed"} and runfolder.is_run_folder(run)
    (run / "labels.json").write_text(json.dumps({"names": [0, "pos"]}))
    assert runfolder.read_labels(run) == ["0", "pos"]
