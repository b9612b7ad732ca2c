"""What a newcomer reads: `ebslab --help`, the generated config reference, the README's commands."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest

from ebslab.cli import COMMANDS, build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def _help(*argv: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0
    return out.getvalue()


def test_top_level_help_lists_every_command_with_its_line():
    text = _help()
    subparsers = next(a for a in build_parser()._actions if a.dest == "command")
    names = list(subparsers.choices)
    assert names == ["train"] + [n for n, _, _ in COMMANDS]
    assert {"train", "sweep", "report", "bench", "predict", "export", "tune"} <= set(names)
    flat = " ".join(text.split())  # argparse wraps long help lines
    for name, _, line in COMMANDS:
        assert f"{name} {line}" in flat
    for name in names:  # every command has its own help, with its options
        assert _help(name).startswith(f"usage: ebslab {name}")


# ------------------------------------------------------------------------------------------------ config reference


def test_the_committed_config_reference_is_the_generated_one():
    from ebslab.config import reference_markdown

    committed = (ROOT / "docs" / "config.md").read_text()
    assert committed == reference_markdown(), (
        "docs/config.md is out of date: run `PYTHONPATH=src python -m ebslab.config --reference > docs/config.md`")


def test_every_config_key_has_its_type_default_and_meaning_in_the_reference():
    from ebslab.config import VALID_KEYS, default_flat, field_docs, reference_markdown

    docs, text = field_docs(), reference_markdown()
    rows = {line.split("|")[1].strip().strip("`"): line for line in text.splitlines() if line.startswith("| `")}
    assert set(rows) == set(VALID_KEYS)
    for key in VALID_KEYS:
        assert docs[key] and docs[key].replace("|", "\\|") in rows[key]
    # the keys a user found missing from the old hand-written table, with their defaults
    assert "| `data.min_class_fraction` | float | `0.01` |" in text
    assert "| `optim.betas` | list of float | `[0.9, 0.999]` |" in text
    assert "| `optim.eps` | float | `1.0e-08` |" in text
    assert "| `train.device` | str | `auto` |" in text
    assert "| `batch.micro` | int or `auto` | `16` |" in text
    assert default_flat()["optim.betas"] == [0.9, 0.999]


def test_a_key_without_a_docstring_is_caught(monkeypatch):
    from ebslab import config

    monkeypatch.setattr(config, "field_docs", lambda: {k: "" for k in config.VALID_KEYS})
    with pytest.raises(RuntimeError, match="without a docstring in config.py: model.name"):
        config.reference_markdown()


# ------------------------------------------------------------------------------------------------ long output


def test_a_non_interactive_run_prints_progress_lines_not_carriage_returns(train_run, capsys, monkeypatch):
    """stderr is not a terminal here (captured), as in a sweep's log file or CI: a line every N steps."""
    monkeypatch.setenv("EBSLAB_PROGRESS_EVERY", "2")
    train_run()  # 200 train examples, EBS 32: 7 steps
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("train step ")]
    assert [line.split()[2] for line in lines] == ["2/7", "4/7", "6/7", "7/7"]
    assert lines[0].startswith("train step 2/7 (29%) loss ") and "samples/s" in lines[0] and "left" in lines[0]
    assert "left" not in lines[-1] and lines[-1].startswith("train step 7/7 (100%)")


def test_progress_every_defaults_to_about_twenty_lines(monkeypatch):
    from ebslab.callbacks import progress_every, progress_line

    monkeypatch.delenv("EBSLAB_PROGRESS_EVERY", raising=False)
    assert [progress_every(n) for n in (1, 7, 100, 1000, 1001)] == [1, 1, 5, 50, 51]
    monkeypatch.setenv("EBSLAB_PROGRESS_EVERY", "3")
    assert progress_every(1000) == 3
    line = progress_line(50, 100, 600.0, 0, {"train/loss": 0.5, "samples_per_s": 2.0})
    assert line == "train step 50/100 (50%) loss 0.5000 2.0 samples/s, 10m00s elapsed, ~10m00s left"
    # a resumed run extrapolates from the steps of this session only: 20 steps in 60 s, 30 to go
    assert progress_line(70, 100, 60.0, 50, None) == "train step 70/100 (70%), 1m00s elapsed, ~1m30s left"
