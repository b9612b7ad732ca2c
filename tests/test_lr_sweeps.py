"""The shipped lr x EBS sweep files: valid, the grid they promise, and an lr grid shared by every EBS."""

from __future__ import annotations

import pytest

from ebslab.experiments import sweep as sw
from ebslab.core.config import load_config
from conftest import ROOT


@pytest.mark.parametrize("name, runs", [("cpu-lr-ebs", 18), ("gpu-lr-ebs", 90)])
def test_the_lr_ebs_sweeps_are_valid_and_vary_lr_and_ebs(name, runs):
    s = sw.load_sweep(ROOT / "configs" / "sweeps" / f"{name}.yaml")
    assert s.name == name and len(sw.validate_sweep(s)) == runs
    assert list(s.grid)[0] == "train.seed"  # seed-major: a study cut short keeps whole replicates
    assert len(s.grid["optim.lr"]) >= 3 and len(s.grid["batch.effective"]) >= 3
    cfg = load_config(None, sw.run_overrides(s, sw.expand_grid(s)[0]))
    assert cfg.optim.lr_scaling == "none" and cfg.eval.every_examples > 0
