"""`ebslab tune`: the study file's checks, pruning at equal examples, the workers' budget, resume and heartbeat,
confirmation on fresh seeds and the seed-level verdict; a PostgreSQL study shared by two workers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml
from conftest import hang_after, install_fake_train

from ebslab.experiments import sweep_command
from ebslab.experiments import tune
from ebslab.experiments.tune.workers import trial_id
from ebslab.cli import main
from ebslab.core.config import VALID_KEYS

ROOT = Path(__file__).resolve().parents[1]
optuna.logging.set_verbosity(optuna.logging.ERROR)
BASE = {"model.name": "tiny-bert", "data.limit": 64, "train.epochs": 1, "batch.effective": 8, "batch.micro": 8,
        "data.max_length": 32}
STUDY = {"name": "st", "base": BASE, "space": {"optim.lr": {"float": [1.0e-4, 1.0e-2], "log": True}},
         "objective": "val/acc", "trials": 3, "sampler": "random", "confirm": {"top_k": 2, "seeds": [11, 12, 13]}}


def write_study(folder: Path, data: dict, name: str = "study.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def study_with(**changes) -> dict:
    data = json.loads(json.dumps(STUDY))
    data.update(changes)
    return data


# ----------------------------------------------------------------------------------------------------------
# Bad inputs: one line, exit 2, nothing created


BAD = [
    (study_with(space={"optim.lrr": {"float": [1e-5, 1e-3]}}), "unknown config key 'optim.lrr'; did you mean 'optim.lr'"),
    (study_with(space={"optim.lr": {"float": [1e-4, 1e-4]}}), "the range [0.0001, 0.0001] is empty"),
    (study_with(space={"optim.lr_scaling": {"choice": []}}), "choice is an empty list"),
    (study_with(space={"optim.lr": {"float": [1e-3, 1e-5]}}), "lo 0.001 > hi 1e-05"),
    (study_with(space={"model.dropout": {"float": [0.0, 0.5], "log": True}}), "log scale needs lo > 0, got 0.0"),
    (study_with(objective="test/acc"), "objective 'test/acc' is a test metric; nothing is selected on test"),
    (study_with(objective="val/accuracy"), "objective must be val/<metric>"),
    (study_with(space={"train.seed": {"int": [1, 5]}}), "'train.seed' cannot be searched"),
    (study_with(space={"model.dropout": {"float": [0.0, 1.5]}}), "model.dropout must be in [0, 1)"),
    (study_with(pruner="median"), "set eval.every_examples in base"),
    (study_with(confirm={"top_k": 2, "seeds": [1, 2]}), "confirm.seeds include 1, the seed of the search"),
    (study_with(confirm={"top_k": 5, "seeds": [11, 12]}), "confirm.top_k must be an integer in [2, trials=3]"),
    (study_with(sampler="grid"), "the grid sampler needs choice lists; optim.lr is a range"),
    (study_with(prune="median"), "unknown top-level key(s) 'prune'"),
    (study_with(space={"optim.lr_scaling": {"choice": ["sqrt"]}}),
     "the space holds 1 configuration(s), fewer than confirm.top_k=2: nothing to rank"),
]


@pytest.mark.parametrize("data, message", BAD, ids=[m[:30] for _, m in BAD])
def test_bad_study_file_is_one_line_exit_2_nothing_created(tmp_path, capsys, data, message):
    path = write_study(tmp_path, data)
    assert main(["tune", str(path), "--out", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("url", ["postgresql+psycopg2://nobody@127.0.0.1:1/none", "sqlite:////no/such/dir/x.db"])
def test_unreachable_storage_is_one_line_exit_2(tmp_path, capsys, url):
    path = write_study(tmp_path, STUDY)
    assert main(["tune", str(path), "--out", str(tmp_path / "runs"), "--storage", url]) == 2
    err = capsys.readouterr().err
    assert f"storage '{url.replace('nobody@', 'nobody@')}' cannot be reached" in err, err
    assert err.count("\n") == 1
    assert not (tmp_path / "runs").exists()


def test_tune_and_sweep_share_their_run_options_with_their_own_help():
    import argparse

    parsed, helps = [], []
    for mod, first in ((sweep_command, "grid.yaml"), (tune, "study.yaml")):
        parser = argparse.ArgumentParser()
        mod.add_arguments(parser)
        parsed.append(vars(parser.parse_args([first, "--out", "o", "--resume", "--executor", "ray",
                                              "--parallel", "3"])))
        helps.append({a.dest: a.help for a in parser._actions})
    common = ("out", "resume", "executor", "parallel")
    assert [{k: p[k] for k in common} for p in parsed] == [{"out": "o", "resume": True, "executor": "ray",
                                                           "parallel": 3}] * 2
    assert helps[0]["executor"] == helps[1]["executor"]
    assert helps[1]["parallel"] == "trials at once in this worker (default 1)" != helps[0]["parallel"]


def test_a_worker_that_loses_the_race_to_create_optunas_tables_opens_them_once_they_exist(tmp_path, monkeypatch):
    from sqlalchemy.exc import IntegrityError

    real, calls = optuna.storages.RDBStorage, []

    class Racing(real):  # as PostgreSQL answers the second of two workers creating the tables at once
        def __init__(self, url, **kw):
            calls.append(url)
            if len(calls) == 1:
                raise IntegrityError("CREATE TABLE studies", {}, Exception("duplicate key value violates unique "
                                                                          "constraint pg_type_typname_nsp_index"))
            super().__init__(url, **kw)

    monkeypatch.setattr(optuna.storages, "RDBStorage", Racing)
    monkeypatch.setattr(time, "sleep", lambda s: None)
    url = f"sqlite:///{tmp_path / 'r.db'}"
    storage = tune.open_storage(url, heartbeat_s=1)
    assert len(calls) == 2 and storage.get_heartbeat_interval() == 1
    assert optuna.create_study(storage=storage, study_name="r").study_name == "r"


def test_fingerprint_changes_name_the_key():
    old = {"space": {"optim.lr": {"float": [1e-4, 1e-2]}}, "trials": 3}
    new = {"space": {"optim.lr": {"float": [1e-4, 1e-3]}}, "trials": 3}
    assert tune.fingerprint_changes(old, new) == ["space.optim.lr.float: [0.0001, 0.01] -> [0.0001, 0.001]"]
    assert tune.fingerprint_changes(old, old) == []


def test_parse_space_kinds_and_distributions():
    st = tune.parse_study(study_with(space={
        "optim.lr": {"float": ["1e-5", 1e-3], "log": True}, "batch.effective": {"choice": [8, 16]},
        "sched.warmup_ratio": {"float": [0.0, 0.2]}, "train.epochs": {"int": [1, 3]}}))
    d = {p.key: p.distribution() for p in st.space}
    assert d["optim.lr"] == optuna.distributions.FloatDistribution(1e-5, 1e-3, log=True)
    assert d["batch.effective"] == optuna.distributions.CategoricalDistribution([8, 16])
    assert d["train.epochs"] == optuna.distributions.IntDistribution(1, 3)
    assert (st.direction, tune.parse_study(study_with(objective="val/loss")).direction) == ("maximize", "minimize")


# ----------------------------------------------------------------------------------------------------------
# Pruning compares trials at equal examples, never at equal optimizer steps


class FakeTrainer:
    """What PruningCallback reads of the Trainer (C2): state.samples and request_stop."""

    def __init__(self):
        self.state = type("S", (), {"samples": 0})()
        self.stopped: tuple[str, str] | None = None

    def request_stop(self, status: str, message: str) -> None:
        self.stopped = (status, message)


def _feed(cb: tune.PruningCallback, ebs: int, evals: list[tuple[int, float]]) -> FakeTrainer:
    """Evaluations at optimizer steps (each step = ebs examples) with their val acc."""
    trainer = FakeTrainer()
    for step, acc in evals:
        trainer.state.samples = step * ebs
        cb.on_eval(trainer, {"val/acc": acc})
        if trainer.stopped:
            break
    return trainer


def test_pruning_reports_at_examples_so_a_small_ebs_trial_is_not_pruned_against_more_data():
    pruner = optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0)
    study = optuna.create_study(direction="maximize", pruner=pruner)
    # trial 0: EBS 64, evaluated every 640 examples = every 10 steps; it learns: 0.60 at 640, 0.80 at 1280
    t0 = study.ask()
    _feed(tune.PruningCallback(t0, "acc", 640), 64, [(10, 0.60), (20, 0.80)])
    study.tell(t0, 0.80)
    assert t0.number == 0 and study.trials[0].intermediate_values == {640: 0.60, 1280: 0.80}
    # trial 1: EBS 32, also every 640 examples = every 20 steps; at 640 examples it is ahead of trial 0 (0.70)
    t1 = study.ask()
    trainer = _feed(tune.PruningCallback(t1, "acc", 640), 32, [(20, 0.70)])
    assert study.trials[1].intermediate_values == {640: 0.70}
    assert trainer.stopped is None  # compared with trial 0 at 640 examples: 0.70 > 0.60
    # the same trial reported at its optimizer step (20) meets trial 0's step-20 value (0.80, seen at 1280
    # examples, twice the data) and would be pruned: the case the examples axis exists for
    study_steps = optuna.create_study(direction="maximize", pruner=pruner)
    s0 = study_steps.ask()
    s0.report(0.60, 10)
    s0.report(0.80, 20)
    study_steps.tell(s0, 0.80)
    s1 = study_steps.ask()
    s1.report(0.70, 20)
    assert s1.should_prune()


def test_pruned_trial_requests_stop_and_rounded_evaluations_report_the_nominal_point():
    study = optuna.create_study(direction="maximize",
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0))
    t0 = study.ask()
    _feed(tune.PruningCallback(t0, "acc", 100), 48, [(3, 0.8), (5, 0.9)])  # 144 -> 100, 240 -> 200
    study.tell(t0, 0.9)
    assert study.trials[0].intermediate_values == {100: 0.8, 200: 0.9}
    t1 = study.ask()
    trainer = _feed(tune.PruningCallback(t1, "acc", 100, "median"), 48, [(3, 0.5), (5, 0.55)])
    assert trainer.stopped == ("pruned", "pruned by the median pruner at 100 examples (val/acc 0.5000)")
    assert study.trials[1].intermediate_values == {100: 0.5}  # stopped at the first data point


def test_an_evaluation_between_two_data_points_is_not_reported():
    study = optuna.create_study(direction="maximize")
    t = study.ask()
    cb = tune.PruningCallback(t, "acc", 100, reported_examples=100)  # a resumed trial that reported 100 already
    _feed(cb, 48, [(3, 0.7), (4, 0.75), (5, 0.8)])  # 144 (k=1, done), 192 (k=1), 240 (k=2)
    assert study.trials[0].intermediate_values == {200: 0.8}


# ----------------------------------------------------------------------------------------------------------
# The verdict is the report's comparison of the confirmation runs (ebslab.analysis.report, ebslab.analysis.stats)

WINNER_TEST = {11: 0.90, 12: 0.92, 13: 0.91, 14: 0.93}
CASES = {"clear": {11: 0.85, 12: 0.86, 13: 0.86, 14: 0.87},  # 5-6 pt behind on every seed
         "noise": {11: 0.91, 12: 0.90, 13: 0.92, 14: 0.92}}  # -1 to +2 pt around the candidate


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_study_verdict_is_the_report_comparison_of_the_confirmation_runs(tmp_path, case):
    from test_report import make_run

    root = tmp_path / "st"
    for trial, ebs, val, accs in (("trial-0000", 64, 0.90, WINNER_TEST), ("trial-0001", 256, 0.88, CASES[case])):
        for seed, acc in accs.items():  # 100 test predictions per run: the bootstrap interval exists
            make_run(root / "confirm", f"{trial},seed={seed}", ebs=ebs, seed=seed, val_acc=val, test_acc=acc,
                     correct=np.arange(100) < round(100 * acc))
    verdict = tune.confirmation_verdict(root, "acc")
    assert main(["report", str(root / "confirm"), "--out", str(tmp_path / "rep")]) == 0
    [comp] = json.loads((tmp_path / "rep" / "report.json").read_text())["comparisons"]
    assert verdict["comparison"] == comp  # every number: estimate, both intervals, p, p_holm, power
    gap = [WINNER_TEST[s] - CASES[case][s] for s in WINNER_TEST]
    assert -comp["estimate"] == pytest.approx(np.mean(gap)) and comp["n_seeds"] == 4
    assert verdict["runner_up"] == "trial-0001" and verdict["metric"] == "test/acc"
    if case == "clear":
        assert comp["p_holm"] < 0.05 and verdict["winner"] == "trial-0000"
        assert verdict["text"].startswith("winner: trial-0000, better than the runner-up trial-0001 by +5.50 pt on "
                                          "test acc (mean of 4 per-seed differences on fresh seeds, 95% crossed "
                                          f"bootstrap [{-100 * comp['ci'][1]:+.2f}, {-100 * comp['ci'][0]:+.2f}] pt")
    else:
        assert comp["p_holm"] > 0.05 and verdict["winner"] is None
        assert verdict["text"].startswith("indistinguishable: trial-0000 and trial-0001 differ by +0.25 pt on test acc")
    assert [r["config"] for r in verdict["table"]] == ["trial-0000", "trial-0001"]  # ranked on validation


# ----------------------------------------------------------------------------------------------------------
# Workers, budget, resume, confirmation: with a stand-in for `ebslab train` (fast)

FAKE_TRAIN = textwrap.dedent('''
    import json, math, os, shutil, signal, sys, time
    from pathlib import Path
    args = sys.argv[1:]
    if args[0] == "--resume":
        run = Path(args[1])
        kv = json.loads((run / "args.json").read_text())
        mode = "resumed"
    else:
        kv = dict(a.split("=", 1) for a in args if "=" in a)
        run = Path(kv["out.dir"]) / kv["out.name"]
        if run.exists():
            if "--overwrite" not in args:
                sys.exit(2)
            shutil.rmtree(run)
        mode = "new"
        (run / "checkpoints" / "last").mkdir(parents=True)
        for name in LAST_FILES:
            (run / "checkpoints" / "last" / name).write_bytes(b"w")
        (run / "metrics.jsonl").write_text("")
        (run / "args.json").write_text(json.dumps(kv))
    with open(run / "attempts", "a") as f:
        f.write(mode + " " + os.environ.get("EBSLAB_TUNE_TRIAL", "-") + "\\n")
    lr, seed = float(kv["optim.lr"]), int(kv.get("train.seed", 1))
    if mode == "new":  # what the report groups and pairs by (JSON is YAML)
        (run / "config.yaml").write_text(json.dumps({"optim": {"lr": lr}, "train": {"seed": seed}, "batch": {
            "effective": int(kv["batch.effective"]), "micro": int(kv["batch.micro"])}}))
    if run.name == os.environ.get("FAKE_HANG_AT") and mode == "new":  # stopped by the tune: one SIGINT
        got = []
        signal.signal(signal.SIGINT, lambda *_: got.append(1))
        (run / "started").write_text("")
        deadline = time.time() + hang_after(30)
        while not got and time.time() < deadline:
            time.sleep(0.05)
        (run / "summary.json").write_text(json.dumps({"status": "interrupted"}))
        sys.exit(130)
    # a known truth: accuracy peaks at lr 1e-3; seeds add a small config-specific wobble
    acc = 0.9 - 0.1 * abs(math.log10(lr) + 3) + 0.002 * ((seed * 7 + int(-math.log10(lr) * 10)) % 3)
    status = "pruned" if lr > float(os.environ.get("FAKE_PRUNE_ABOVE", "1")) else "completed"
    if lr == float(os.environ.get("FAKE_COLLAPSE_LR", "nan")):  # at the majority rate all along
        status, acc = "collapsed", 0.52
    (run / "summary.json").write_text(json.dumps({"status": status, "val_best": {"acc": acc},
                                                  "test_best": {"acc": acc - 0.01}, "duration_s": 0.1}))
''')


@pytest.fixture
def fake_train(tmp_path, monkeypatch):
    return install_fake_train(tmp_path, monkeypatch, FAKE_TRAIN)


def read_study(root: Path) -> dict:
    return json.loads((root / "study.json").read_text())


def test_study_runs_its_trials_then_the_top_k_on_fresh_seeds_and_names_a_winner(tmp_path, fake_train, capsys,
                                                                                  monkeypatch):
    monkeypatch.setenv("FAKE_PRUNE_ABOVE", "5e-3")
    data = study_with(space={"optim.lr": {"choice": [1.0e-4, 1.0e-3, 1.0e-2]}}, sampler="grid")
    path = write_study(tmp_path, data)
    assert main(["tune", str(path), "--out", str(tmp_path / "runs")]) == 0
    root = tmp_path / "runs" / "st"
    index = read_study(root)
    trials = {t["params"]["optim.lr"]: t for t in index["trials"]}
    assert sorted(trials) == [1e-4, 1e-3, 1e-2]  # the grid, once each
    assert [t["folder"] for t in index["trials"]] == ["trial-0000", "trial-0001", "trial-0002"]
    assert trials[1e-2]["status"] == "pruned" and trials[1e-2]["value"] is None
    assert trials[1e-3]["status"] == "completed" and trials[1e-3]["value"] == pytest.approx(0.9, abs=0.005)
    assert index["best"]["folder"] == trials[1e-3]["folder"]
    # each trial's run got its sampled value, the objective's checkpoint rule, and its Optuna trial number
    for t in index["trials"]:
        args = json.loads((root / t["folder"] / "args.json").read_text())
        assert float(args["optim.lr"]) == t["params"]["optim.lr"] and "train.seed" not in args  # the base's
        if "eval.select_by" in VALID_KEYS:
            assert args["eval.select_by"] == "acc"
        assert (root / t["folder"] / "attempts").read_text() == f"new {t['number']}\n"
    # confirmation: the top 2 (1e-3, then 1e-4) on the fresh seeds, with no Optuna trial in the process
    conf = index["confirm"]
    assert conf["configs"] == [trials[1e-3]["folder"], trials[1e-4]["folder"]]
    assert sorted((r["config"], r["seed"]) for r in conf["runs"]) == sorted(
        (c, s) for c in conf["configs"] for s in (11, 12, 13))
    for r in conf["runs"]:
        args = json.loads((root / r["folder"] / "args.json").read_text())
        assert args["train.seed"] == str(r["seed"]) and r["status"] == "completed"
        assert (root / r["folder"] / "attempts").read_text() == "new -\n"
    verdict = index["verdict"]
    assert verdict["winner"] == trials[1e-3]["folder"] and verdict["runner_up"] == trials[1e-4]["folder"]
    # the report's comparison: the runner-up minus the winner, on test acc (0.01 below val acc in the fake)
    assert verdict["comparison"]["n_seeds"] == 3
    assert verdict["comparison"]["estimate"] == pytest.approx(-0.1, abs=0.005)
    assert verdict["text"].startswith(f"winner: {trials[1e-3]['folder']}")
    out = capsys.readouterr().out
    assert "winner: " in out
    # the Optuna state agrees with the index
    study = optuna.load_study(study_name="st", storage=f"sqlite:///{root / 'study.db'}")
    states = sorted(t.state.name for t in study.trials)
    assert states == ["COMPLETE", "COMPLETE", "PRUNED"]


def test_report_on_a_study_folder_shows_the_verdict_and_the_search_plots(tmp_path, fake_train, capsys):
    path, root = write_study(tmp_path, STUDY), tmp_path / "runs" / "st"
    assert main(["tune", str(path), "--out", str(tmp_path / "runs")]) == 0
    verdict = read_study(root)["verdict"]
    capsys.readouterr()
    assert main(["report", str(root), "--out", str(tmp_path / "rep")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "rep" / "report.md")
    md = (tmp_path / "rep" / "report.md").read_text()
    for name in ("search_history", "param_importances"):
        png = (tmp_path / "rep" / f"{name}.png").read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
        assert f"![{name}]({name}.png)" in md
    assert f"## Verdict\n\n{verdict['text']}\n" in md
    assert verdict["text"].startswith(("winner: ", "indistinguishable: "))
    assert "# Confirmation runs (seed-aware report)" in md  # followed by the report of the 6 confirmation runs
    # the search table: a row per trial, its value as the objective's 4 decimals, '-' where it has none
    index = read_study(root)
    cells = [[c.strip() for c in line.strip("|").split(" | ")] for line in md.split("## Search trials", 1)[1]
             .split("\n\n", 2)[1].splitlines()]
    assert cells[0] == ["trial", "status", index["objective"], "params"]
    assert [row[:3] for row in cells[2:]] == [[t["folder"], t["status"], "-" if t["value"] is None
                                               else f"{t['value']:.4f}"] for t in index["trials"]]
    # the confirmation table: a row per confirmed configuration, with its number of seeds
    confirmed = md.split("Confirmation on fresh seeds", 1)[1].split("\n\n", 2)[1].splitlines()
    assert [[c.strip() for c in line.strip("|").split(" | ")][::2] for line in confirmed[2:]] == \
        [[row["config"], str(row["n"]), f"{row['test_acc']:.4f}"] for row in verdict["table"]]


def test_a_collapsed_trial_is_never_promoted_and_the_verdict_says_there_was_nothing_to_rank(tmp_path, fake_train,
                                                                                                monkeypatch):
    """1e-2 is pruned and 1e-4 collapses (val 0.52, the majority rate): it ranked second of the two that finished,
    and was promoted to the confirmation against 1e-3. Now only 1e-3 is confirmed, and the verdict says why no
    winner can be named."""
    monkeypatch.setenv("FAKE_PRUNE_ABOVE", "5e-3")
    monkeypatch.setenv("FAKE_COLLAPSE_LR", "1e-4")
    data = study_with(space={"optim.lr": {"choice": [1.0e-4, 1.0e-3, 1.0e-2]}}, sampler="grid")
    assert main(["tune", str(write_study(tmp_path, data)), "--out", str(tmp_path / "runs")]) == 0
    index = read_study(tmp_path / "runs" / "st")
    trials = {t["params"]["optim.lr"]: t for t in index["trials"]}
    assert trials[1e-4]["status"] == "collapsed" and trials[1e-4]["value"] == pytest.approx(0.52)
    assert index["confirm"]["configs"] == [trials[1e-3]["folder"]]
    assert {r["config"] for r in index["confirm"]["runs"]} == {trials[1e-3]["folder"]}
    assert index["best"]["folder"] == trials[1e-3]["folder"]
    verdict = index["verdict"]
    assert verdict["winner"] is None
    assert verdict["text"] == (
        "nothing to rank: 1 distinct configuration(s) of the search learned (1 collapsed, 1 completed, 1 pruned), "
        "and a winner needs two; the others collapsed (never left the majority-class rate), were pruned or failed: "
        "raise trials, widen the space, or change the base (lr, epochs) so that runs learn")


def test_nothing_to_rank_names_the_reason():
    from ebslab.experiments.tune.verdict import nothing_to_rank

    def t(lr, status="completed", value=0.8):
        return {"params": {"optim.lr": lr}, "status": status, "value": value}

    assert nothing_to_rank([t(1e-3), t(1e-4)], 3) is None
    assert nothing_to_rank([t(1e-3), t(1e-3), t(1e-3)], 5).endswith(
        "the 3 trial(s) tried 1 distinct configuration: raise trials or widen the space")
    assert nothing_to_rank([t(1e-3), t(1e-3)], 1).endswith("the search space holds 1 configuration: widen it")
    assert nothing_to_rank([t(1e-3), t(1e-4, "collapsed", 0.5)], 2).startswith(
        "nothing to rank: 1 distinct configuration(s) of the search learned (1 collapsed, 1 completed)")


def test_indistinguishable_top_configurations_get_no_winner(tmp_path, fake_train):
    # 1e-4 and 1e-2 are equally far from the peak: the same accuracy up to the seed wobble
    data = study_with(space={"optim.lr": {"choice": [1.0e-4, 1.0e-2]}}, sampler="grid", trials=2,
                      confirm={"top_k": 2, "seeds": [11, 12, 13]})
    assert main(["tune", str(write_study(tmp_path, data)), "--out", str(tmp_path / "runs")]) == 0
    verdict = read_study(tmp_path / "runs" / "st")["verdict"]
    assert verdict["winner"] is None and verdict["text"].startswith("indistinguishable: ")
    assert abs(verdict["comparison"]["estimate"]) < 0.005


def test_stopped_after_two_trials_then_resumed_ends_with_exactly_the_asked_trials(tmp_path, fake_train,
                                                                                monkeypatch, capsys):
    monkeypatch.setenv("FAKE_HANG_AT", "trial-0002")
    path = write_study(tmp_path, study_with(trials=4))
    root = tmp_path / "runs" / "st"

    def stop_when_started():
        deadline = time.time() + hang_after(30)
        while not (root / "trial-0002" / "started").exists() and time.time() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)  # `kill TUNE_PID`; Ctrl-C takes the same path

    threading.Thread(target=stop_when_started, daemon=True).start()
    assert main(["tune", str(path), "--out", str(tmp_path / "runs")]) == 130
    index = read_study(root)
    assert [t["status"] for t in index["trials"]] == ["completed", "completed", "interrupted"]
    params_before = {t["folder"]: t["params"] for t in index["trials"]}
    assert "continue with --resume" in capsys.readouterr().err

    assert main(["tune", str(path), "--out", str(tmp_path / "runs"), "--resume"]) == 0
    index = read_study(root)
    assert [t["folder"] for t in index["trials"]] == [f"trial-{i:04d}" for i in range(4)]
    assert all(t["status"] == "completed" for t in index["trials"])
    for folder, params in params_before.items():  # the interrupted trial continued with its parameters
        assert next(t for t in index["trials"] if t["folder"] == folder)["params"] == params
    lrs = [t["params"]["optim.lr"] for t in index["trials"]]
    assert len(set(lrs)) == 4  # no duplicate from the kill
    # trial-0002 continued from its checkpoint first, as a retry of Optuna trial 2 (its reports kept); then the
    # fourth slot, Optuna trial 4, went to trial-0003; trials 0/1 untouched
    assert (root / "trial-0002" / "attempts").read_text() == "new 2\nresumed 3\n"
    assert (root / "trial-0003" / "attempts").read_text() == "new 4\n"
    assert (root / "trial-0000" / "attempts").read_text() == "new 0\n"
    assert index["trials"][2]["optuna_numbers"] == [2, 3]
    study = optuna.load_study(study_name="st", storage=f"sqlite:///{root / 'study.db'}")
    assert sorted(t.state.name for t in study.trials) == ["COMPLETE"] * 4 + ["FAIL"]
    assert len(index["confirm"]["runs"]) == 6 and index["verdict"] is not None

    # a changed study file is refused on --resume, naming the change; nothing is touched
    before = (root / "study.json").read_bytes()
    write_study(tmp_path, study_with(trials=4, space={"optim.lr": {"float": [1.0e-4, 1.0e-3], "log": True}}))
    capsys.readouterr()
    assert main(["tune", str(path), "--out", str(tmp_path / "runs"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "study 'st' changed since it started (space.optim.lr.float: [0.0001, 0.01] -> [0.0001, 0.001])" in err
    assert err.count("\n") == 1 and (root / "study.json").read_bytes() == before
    # and starting it again without --resume is refused too
    assert main(["tune", str(path), "--out", str(tmp_path / "runs")]) == 2
    assert "add --resume to continue it" in capsys.readouterr().err


SMALL = study_with(space={"optim.lr": {"choice": [1.0e-4, 1.0e-3]}}, sampler="grid", trials=2,
                   confirm={"top_k": 2, "seeds": [11, 12]})


def test_a_study_folder_in_use_by_a_live_tuner_is_refused_and_a_dead_ones_lock_is_taken_over(tmp_path, fake_train,
                                                                                             capsys):
    from ebslab.core.locks import LOCK_NAME, FolderLock

    path, root = write_study(tmp_path, SMALL), tmp_path / "runs" / "st"
    assert main(["tune", str(path), "--out", str(tmp_path / "runs")]) == 0
    capsys.readouterr()
    files = {p: p.read_bytes() for p in (root / "study.json", root / "study.db")}
    with FolderLock(root, "study"):  # a live tuner of this folder (this process)
        held = (root / LOCK_NAME).read_bytes()
        for extra in (["--resume"], []):
            assert main(["tune", str(path), "--out", str(tmp_path / "runs"), *extra]) == 2
            err = capsys.readouterr().err
            assert f"study folder '{root}' is in use by pid {os.getpid()} (" in err, err
            assert err.count("\n") == 1 and "Traceback" not in err
        assert {p: p.read_bytes() for p in files} == files and (root / LOCK_NAME).read_bytes() == held
    # a tuner killed while holding the folder: its lock (naming its pid) is taken over by the next --resume
    code = f"from ebslab.core.locks import FolderLock; import os; FolderLock({str(root)!r}, 'study').acquire(); os._exit(9)"
    dead = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert dead.returncode == 9 and json.loads((root / LOCK_NAME).read_text())["pid"] != os.getpid()
    assert main(["tune", str(path), "--out", str(tmp_path / "runs"), "--resume"]) == 0
    assert read_study(root)["verdict"] is not None and (root / LOCK_NAME).read_text() == ""  # released at the end


def test_workers_on_a_shared_storage_share_the_study_folder_without_a_lock(tmp_path, fake_train):
    from ebslab.core.locks import FolderLock

    path, root = write_study(tmp_path, SMALL), tmp_path / "runs" / "st"
    url = f"sqlite:///{tmp_path / 'shared.db'}"  # stands for a database all the workers reach
    with FolderLock(root, "study"):  # held by another worker, or by anything else: not checked with --storage
        assert main(["tune", str(path), "--out", str(tmp_path / "runs"), "--storage", url]) == 0
    index = read_study(root)
    assert [t["status"] for t in index["trials"]] == ["completed", "completed"] and index["verdict"] is not None
    assert not (root / "study.db").exists()


def test_a_running_trial_of_a_dead_worker_is_failed_and_queued_again(tmp_path):
    storage = tune.open_storage(f"sqlite:///{tmp_path / 'h.db'}", heartbeat_s=1)
    study = optuna.create_study(study_name="h", storage=storage)
    # a worker on this host whose process is gone: found at once
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    t = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    t.set_user_attr("worker", f"{socket.gethostname()}:{dead.pid}")
    t.set_user_attr("folder", "trial-0000")
    storage.record_heartbeat(trial_id(storage, study, t.number))
    assert tune.fail_stale(study, storage) == [0]
    retry = study.trials[1]
    assert (study.trials[0].state.name, retry.state.name) == ("FAIL", "WAITING")
    assert retry.params == t.params and retry.user_attrs["folder"] == "trial-0000"
    assert retry.system_attrs["failed_trial"] == 0
    # a worker on another machine (its pid 1 is alive here, and means nothing): found by Optuna's heartbeat
    # within 4 beats of its last one; beating just after a whole second is the worst case for a database clock
    # in whole seconds (SQLite's), where a grace of 4 s fails the trial only 5 s later
    t2 = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    t2.set_user_attr("worker", "elsewhere:1")
    time.sleep(1.02 - time.time() % 1)
    storage.record_heartbeat(trial_id(storage, study, t2.number))
    assert tune.fail_stale(study, storage) == [] and study.trials[t2.number].state.name == "RUNNING"
    time.sleep(4.5)
    tune.fail_stale(study, storage)
    assert study.trials[t2.number].state.name == "FAIL"
    assert study.trials[-1].state.name == "WAITING" and study.trials[-1].params == t2.params


def test_a_study_whose_base_is_a_config_file_parses_and_fingerprints_the_files_keys(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"model": {"name": "tiny-bert"}, "data": {"limit": 64, "max_length": 32},
                                    "batch": {"effective": 8, "micro": 8}, "train": {"epochs": 1}}))
    st = tune.load_study_file(write_study(tmp_path, study_with(base=str(base))))
    assert st.sweep.base_file == base.resolve()
    assert st.fingerprint["base"] == {"model.name": "tiny-bert", "data.limit": 64, "data.max_length": 32,
                                      "batch.effective": 8, "batch.micro": 8, "train.epochs": 1}


def test_shipped_study_files_are_valid():
    files = sorted((ROOT / "configs" / "tune").glob("*.yaml"))
    assert {f.stem for f in files} >= {"cpu-minilm-tune", "exp2-ebs-gpu"}
    for f in files:
        st = tune.load_study_file(f)
        assert st.objective.startswith("val/") and st.top_k >= 2 and len(st.seeds) >= 2
        assert st.search_seed not in st.seeds
    gpu = tune.load_study_file(ROOT / "configs" / "tune" / "exp2-ebs-gpu.yaml")
    assert {p.key for p in gpu.space} == {"batch.effective", "optim.lr", "optim.lr_scaling"}


@pytest.mark.slow  # a local Ray cluster and 6 real tiny-bert runs; `make test-slow` installs ray
@pytest.mark.timeout(300)
def test_a_study_runs_its_trials_and_confirmation_as_ray_tasks(tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = write_study(tmp_path, study_with(trials=2, confirm={"top_k": 2, "seeds": [11, 12]}))
    # what the Ray tasks return to the tuner: (exit code, start, end) of each run they ran
    results, real_get = [], ray.get
    monkeypatch.setattr(ray, "get", lambda ref, **kw: results.append(real_get(ref, **kw)) or results[-1])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        rc = main(["tune", str(path), "--out", str(tmp_path / "runs"), "--executor", "ray"])
    finally:
        ray.shutdown()
    assert rc == 0
    index = read_study(tmp_path / "runs" / "st")
    assert [t["folder"] for t in index["trials"]] == ["trial-0000", "trial-0001"]
    assert all(t["status"] != "failed" for t in index["trials"]), index["trials"]
    assert sorted(r["folder"] for r in index["confirm"]["runs"]) == [
        f"confirm/trial-{t:04d},seed={s}" for t in (0, 1) for s in (11, 12)]
    for folder in ["trial-0000", "trial-0001"] + [r["folder"] for r in index["confirm"]["runs"]]:
        assert (tmp_path / "runs" / "st" / folder / "summary.json").is_file(), folder
    assert [r[0] for r in results] == [0] * 6  # every run was a Ray task, and none ran locally besides


def test_the_tuners_executor_is_picked_once_by_name(tmp_path, monkeypatch):
    import argparse

    from ebslab.experiments import slurm
    from ebslab.experiments.tune import command

    monkeypatch.setenv("EBSLAB_SLURM_CLUSTER", "local")  # no sbatch needed on this machine
    picked = {}
    for name in ("local", "ray", "slurm"):
        parser = argparse.ArgumentParser()
        tune.add_arguments(parser)
        picked[name] = command.pick_executor(parser.parse_args(["study.yaml", "--executor", name]))(tmp_path)
    assert {n: type(e) for n, e in picked.items()} == {"local": tune.workers.LocalTrials,
                                                       "ray": tune.workers.RayTrials, "slurm": slurm.TuneJobs}
    runner = tune.Runner(picked["local"], 1)
    runner.stop_all()
    assert runner.stopping and picked["local"].stopping  # a run started after Ctrl-C is stopped at once
