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
