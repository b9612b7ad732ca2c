"""Trackers: metrics.jsonl, TensorBoard and W&B (offline) get the same scalar names at the same steps."""

from __future__ import annotations

import glob
import json
import struct
import time
from pathlib import Path

import pytest
from conftest import hang_after

from ebslab.core.errors import UserError
from ebslab.core.runfolder import read_jsonl as read_metrics
from ebslab.loop.tracking import JsonlTracker, TensorBoardTracker, WandbTracker, open_trackers

RECORDS = [
    {"event": "step", "step": 1, "epoch": 0, "micro_step": 4, "train/loss": 0.69, "lr": 5e-5, "grad_norm": 1.5},
    {"event": "step", "step": 2, "epoch": 0, "micro_step": 8, "train/loss": 0.61, "lr": 5e-5, "grad_norm": 1.25},
    {"event": "eval", "step": 2, "epoch": 0, "val/acc": 0.75, "val/loss": 0.5, "test/acc": 0.625},
    {"event": "warning", "step": 2, "kind": "collapsed", "message": "val acc at the majority rate"},
]


def test_track_names_open_their_trackers_and_a_missing_package_is_refused(tmp_path, monkeypatch):
    import importlib.util

    from ebslab.loop.tracking import check_trackers

    opened = open_trackers(["jsonl", "tensorboard"], tmp_path, {"model": {"name": "tiny-bert"}})
    opened.log({"event": "step", "step": 1, "train/loss": 0.5})
    opened.close()
    assert [type(t) for t in opened.trackers] == [JsonlTracker, TensorBoardTracker]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))  # the registered class wrote its file
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(UserError, match=r"^track: wandb needs the wandb package: pip install 'ebslab\[track\]'"):
        check_trackers(["jsonl", "wandb"])


def test_jsonl_tracker_keeps_lines_and_skips_a_torn_one(tmp_path):
    t = JsonlTracker(tmp_path / "metrics.jsonl")
    for r in RECORDS:
        t.log(r)
    t.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"event": "step", "st')  # a run killed mid-write
    assert list(read_metrics(tmp_path / "metrics.jsonl")) == RECORDS


def _tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_scalars_have_metrics_names_and_steps(tmp_path):
    t = TensorBoardTracker(tmp_path, {"model": {"name": "tiny-bert"}})
    for r in RECORDS:
        t.log(r)
    t.close()
    scalars = _tensorboard_scalars(tmp_path / "tensorboard")
    # only numbers; `step` is the x axis, not a scalar; strings (`kind`, `message`) are left out
    assert set(scalars) == {"epoch", "micro_step", "train/loss", "lr", "grad_norm", "val/acc", "val/loss",
                            "test/acc"}
    assert [s for s, _ in scalars["train/loss"]] == [1, 2]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([0.69, 0.61])
    assert scalars["val/acc"] == [(2, 0.75)]
    assert scalars["micro_step"] == [(1, 4.0), (2, 8.0)]


def _parse_wandb_file(data: bytes) -> list:
    """The records of a .wandb file: a LevelDB-style log (32 KiB blocks, 7-byte headers) of protobuf records."""
    from wandb.proto import wandb_internal_pb2 as pb
    assert data[:4] == b":W&B"
    block, pos, buf, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0 and length == 0:
            break
        buf += data[pos:pos + length]
        pos += length
        if kind in (1, 4):  # full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(buf)
            records.append(record)
            buf = b""
    return records


def _wandb_records(run_dir: Path, timeout: float = 20.0) -> list:
    """The records of the offline run in run_dir/wandb, once complete: wandb-core writes the file in its own
    process and may still be writing it for a moment after `finish()` returns."""
    found = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(found) == 1, sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*"))
    deadline = time.time() + hang_after(timeout)
    while True:
        try:
            records = _parse_wandb_file(Path(found[0]).read_bytes())
        except Exception:  # a record caught mid-write
            records = []
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.time() > deadline:
            return records
        time.sleep(0.1)


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)  # W&B stores "train/loss" as a nested key


def test_wandb_offline_run_gets_sweep_env_config_and_numeric_scalars(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_PROJECT", "exp-test")
    monkeypatch.setenv("WANDB_RUN_GROUP", "model.name=tiny-bert,batch.effective=8")
    monkeypatch.setenv("WANDB_NAME", "model.name=tiny-bert,batch.effective=8,train.seed=1")
    monkeypatch.setenv("WANDB_SILENT", "true")
    t = WandbTracker(tmp_path, {"model": {"name": "tiny-bert"}, "batch": {"effective": 8}})
    for r in RECORDS:
        t.log(r)
    t.close()
    records = _wandb_records(tmp_path)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.project, run.run_group, run.display_name) == (
        "exp-test", "model.name=tiny-bert,batch.effective=8", "model.name=tiny-bert,batch.effective=8,train.seed=1")
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert config["model"] == {"name": "tiny-bert"} and config["batch"] == {"effective": 8}
    history = [{_key(i): json.loads(i.value_json) for i in r.history.item if not _key(i).startswith("_")}
               | {"_step": r.history.step.num}
               for r in records if r.WhichOneof("record_type") == "history"]
    # step 2 collects the step line and the eval line (same optimizer step); the warning has no number to log
    assert [h["_step"] for h in history] == [1, 2]
    assert history[0]["train/loss"] == pytest.approx(0.69) and history[0]["lr"] == pytest.approx(5e-5)
    assert history[1]["train/loss"] == pytest.approx(0.61)
    assert history[1]["val/acc"] == pytest.approx(0.75) and history[1]["test/acc"] == pytest.approx(0.625)
    assert all("kind" not in h and "message" not in h and "event" not in h for h in history)


def test_wandb_defaults_without_sweep_env(tmp_path, monkeypatch):
    for k in ("WANDB_PROJECT", "WANDB_RUN_GROUP", "WANDB_NAME", "WANDB_MODE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "my-run"
    run_dir.mkdir()
    t = WandbTracker(run_dir, {})
    t.log({"event": "step", "step": 3, "train/loss": 0.5})
    t.close()
    (run,) = [r.run for r in _wandb_records(run_dir) if r.WhichOneof("record_type") == "run"]
    assert (run.project, run.display_name) == ("ebslab", "my-run")  # offline by default: the file exists at all


def test_a_resumed_run_continues_its_wandb_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    ids = []
    for step in (1, 2):  # the first session, then `--resume` on the same run folder
        t = WandbTracker(tmp_path, {})
        t.log({"event": "step", "step": step, "train/loss": 0.5})
        ids.append(t.run.id)
        t.close()
    assert ids[0] == ids[1] == (tmp_path / "wandb" / "ebslab-run-id").read_text()
    other = tmp_path / "other"
    other.mkdir()
    t = WandbTracker(other, {})
    assert t.run.id != ids[0]  # another run folder is another W&B run
    t.close()


def test_open_trackers_fans_out_to_every_requested_tracker(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    trackers = open_trackers(["jsonl", "tensorboard", "wandb"], tmp_path, {})
    assert [type(t) for t in trackers.trackers] == [JsonlTracker, TensorBoardTracker, WandbTracker]
    trackers.log(RECORDS[0])
    trackers.close()
    assert list(read_metrics(tmp_path / "metrics.jsonl")) == [RECORDS[0]]
    assert _tensorboard_scalars(tmp_path / "tensorboard")["train/loss"][0][0] == 1
    assert glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
