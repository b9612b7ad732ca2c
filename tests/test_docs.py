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
