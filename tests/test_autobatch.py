"""batch.micro=auto: largest divisor of effective/world_size that fits, EBS kept (simulated memory limits)."""

import os

import pytest
import torch
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ebslab.loop.autobatch import candidates, largest_micro  # noqa: E402
from ebslab.core.errors import UserError  # noqa: E402
from ebslab.core.config import derive, load_config  # noqa: E402


def memory_limit(max_fits, seen=None):
    """A probe that behaves like a device with room for `max_fits` examples."""

    def probe(micro):
        if seen is not None:
            seen.append(micro)
        if micro > max_fits:
            raise torch.OutOfMemoryError(f"CUDA out of memory (simulated: {micro} > {max_fits})")

    return probe


def test_candidates_are_divisors_under_the_cap_largest_first():
    assert candidates(32, 1, 64) == [32, 16, 8, 4, 2, 1]
    assert candidates(48, 2, 16) == [12, 8, 6, 4, 3, 2, 1]
    assert candidates(30, 1, 8) == [6, 5, 3, 2, 1]
    with pytest.raises(UserError):
        candidates(30, 4, 8)


def test_cpu_takes_the_largest_divisor_under_auto_cap():
    cfg = load_config(None, ["batch.effective=48", "batch.micro=auto", "batch.auto_cap=20", "train.device=cpu"])
    assert largest_micro(cfg, 1) == 16
    assert largest_micro(cfg, 2) == 12  # 24 per process


@pytest.mark.parametrize("max_length,tokens,expected", [(128, 2048, 16), (256, 2048, 8), (512, 2048, 4),
                                                         (4096, 2048, 1), (256, 10**6, 16), (100, 1000, 8)])
def test_cpu_keeps_micro_times_max_length_under_auto_cpu_tokens(max_length, tokens, expected, capsys):
    cfg = load_config(None, ["batch.effective=48", "batch.micro=auto", "batch.auto_cap=20", "train.device=cpu",
                             f"data.max_length={max_length}", f"batch.auto_cpu_tokens={tokens}"])
    assert largest_micro(cfg, 1) == expected  # the largest divisor of 48 under min(20, tokens // max_length)
    assert f"batch.auto_cpu_tokens {tokens}" in capsys.readouterr().err


@pytest.mark.parametrize("limit,expected", [(100, 64), (40, 32), (20, 16), (9, 8), (1, 1)])
def test_simulated_memory_limit_backs_off_to_what_fits(limit, expected):
    cfg = load_config(None, ["batch.effective=256", "batch.micro=auto", "batch.auto_cap=64"])
    seen = []
    micro = largest_micro(cfg, 1, probe=memory_limit(limit, seen))
    assert micro == expected
    assert seen[0] == 64 and seen[-1] == expected and seen == sorted(seen, reverse=True)
    d = derive(cfg, 1000, 1, micro)
    assert d.micro * d.accum_steps * d.world_size == 256  # the effective batch is kept


def test_nothing_fits_is_a_user_error_and_other_errors_propagate():
    cfg = load_config(None, ["batch.effective=8", "batch.micro=auto", "data.max_length=512"])
    with pytest.raises(UserError, match="max_length=512"):
        largest_micro(cfg, 1, probe=memory_limit(0))

    def broken(micro):
        raise ValueError("not a memory problem")

    with pytest.raises(ValueError):
        largest_micro(cfg, 1, probe=broken)


def test_train_resolves_auto_and_prints_accum_steps(tmp_path, capsys):
    from ebslab.loop.train import train

    cfg = load_config(None, ["model.name=tiny-bert", "data.max_length=16", "data.limit=60", "train.max_steps=1",
                             "batch.effective=16", "batch.micro=auto", "batch.auto_cap=6", "train.device=cpu",
                             f"out.dir={tmp_path}", "out.name=auto"])
    summary = train(cfg)
    assert summary["steps"] == 1 and summary["micro_steps"] == 4
    derived = yaml.safe_load((tmp_path / "auto" / "config.yaml").read_text())["derived"]
    assert derived["micro"] == 4 and derived["accum_steps"] == 4
    assert "micro 4 x accum_steps 4" in capsys.readouterr().out
