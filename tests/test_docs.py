"""What a newcomer reads: `ebslab --help`, the generated config reference, the README's commands."""

from __future__ import annotations

import contextlib
import io
import re
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
    from ebslab.core.config import reference_markdown

    committed = (ROOT / "docs" / "config.md").read_text()
    assert committed == reference_markdown(), (
        "docs/config.md is out of date: run `PYTHONPATH=src python -m ebslab.core.config --reference > docs/config.md`")


def test_every_config_key_has_its_type_default_and_meaning_in_the_reference():
    from ebslab.core.config import VALID_KEYS, default_flat, field_docs, reference_markdown

    docs, text = field_docs(), reference_markdown()
    rows = {line.split("|")[1].strip().strip("`"): line for line in text.splitlines() if line.startswith("| `")}
    assert set(rows) == set(VALID_KEYS)
    for key in VALID_KEYS:
        assert docs[key] and docs[key].replace("|", "\\|") in rows[key]
    # the keys a user found missing from the old hand-written table, with their defaults
    def cells(key: str) -> list[str]:  # key, type, default, as the table shows them (padding aside)
        return [c.strip() for c in rows[key].split("|")[1:4]]

    assert cells("data.min_class_fraction") == ["`data.min_class_fraction`", "float", "`0.01`"]
    assert cells("optim.betas") == ["`optim.betas`", "list of float", "`[0.9, 0.999]`"]
    assert cells("optim.eps") == ["`optim.eps`", "float", "`1.0e-08`"]
    assert cells("train.device") == ["`train.device`", "str", "`auto`"]
    assert cells("batch.micro") == ["`batch.micro`", "int or `auto`", "`16`"]
    assert default_flat()["optim.betas"] == [0.9, 0.999]


def test_a_key_without_a_docstring_is_caught(monkeypatch):
    from ebslab.core import config

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
    from ebslab.loop.callbacks import progress_every, progress_line

    monkeypatch.delenv("EBSLAB_PROGRESS_EVERY", raising=False)
    assert [progress_every(n) for n in (1, 7, 100, 1000, 1001)] == [1, 1, 5, 50, 51]
    monkeypatch.setenv("EBSLAB_PROGRESS_EVERY", "3")
    assert progress_every(1000) == 3
    line = progress_line(50, 100, 600.0, 0, {"train/loss": 0.5, "samples_per_s": 2.0})
    assert line == "train step 50/100 (50%) loss 0.5000 2.0 samples/s, 10m00s elapsed, ~10m00s left"
    # a resumed run extrapolates from the steps of this session only: 20 steps in 60 s, 30 to go
    assert progress_line(70, 100, 60.0, 50, None) == "train step 70/100 (70%), 1m00s elapsed, ~1m30s left"


# ------------------------------------------------------------------------------------------------ figures


@pytest.fixture
def drawn(monkeypatch):
    """Every figure saved through ebslab.analysis.figures.save: {file name: (describe(fig), style_problems(fig))}."""
    from ebslab.analysis import figures

    seen: dict[str, tuple[dict, list[str]]] = {}
    real = figures.save

    def save(fig, path, dpi=figures.DPI):
        fig.set_size_inches(*figures.FIGSIZE)
        seen[Path(path).stem] = (figures.describe(fig), figures.style_problems(fig))
        return real(fig, path, dpi)

    monkeypatch.setattr(figures, "save", save)
    return seen


def _axes(seen, name):
    (ax,) = seen[name][0]["axes"]
    return ax


def test_every_report_figure_has_title_case_labels_with_units_and_explained_markers(tmp_path, drawn):
    from test_report import make_run

    from ebslab.analysis import report

    for ebs in (8, 32, 128):
        for seed in (1, 2):
            make_run(tmp_path / "runs", f"e{ebs}s{seed}", ebs=ebs, seed=seed, test_acc=0.8 + 0.01 * seed)
    report.build_report([tmp_path / "runs"], tmp_path / "out")
    for name in ("val_acc", "val_loss", "test_acc_vs_ebs"):
        assert drawn[name][1] == [], (name, drawn[name][1])
    acc, loss, ebs = _axes(drawn, "val_acc"), _axes(drawn, "val_loss"), _axes(drawn, "test_acc_vs_ebs")
    assert acc["title"] == "Validation Accuracy per Epoch" and acc["ylabel"] == "Validation accuracy (fraction correct)"
    assert loss["ylabel"] == "Validation loss (cross-entropy, nats)" and acc["xlabel"].startswith("Epoch")
    assert acc["legend_title"] == "line: mean over seeds; band: ± 1 std; dot: an evaluation"
    assert acc["legend"][0] == "batch.effective=8 (2 seeds)"
    assert ebs["title"] == "Test Accuracy Against Effective Batch Size"
    assert ebs["xlabel"] == "Effective batch size (examples per optimizer step, log scale)"
    # one varying key: no legend entry "all", each marker named; the EBS that ran as plain ticks
    assert ebs["legend"] == ["one seed", "mean of 2 seed(s)"] and "confidence interval" in ebs["legend_title"]
    assert ebs["xticks"] == ["8", "32", "128"]


def test_every_tune_figure_relabels_optunas_and_warns_on_importance_from_few_trials(tmp_path, drawn):
    from ebslab.experiments.tune.verdict import FEW_TRIALS_FOR_IMPORTANCE, _study_plots

    float_lr = ('{"name": "FloatDistribution", "attributes": {"low": 1e-05, "high": 0.0005, "log": true, '
                '"step": null}}')
    ebs = '{"name": "CategoricalDistribution", "attributes": {"choices": [8, 16, 32]}}'
    trials = [("completed", 0.82, 8.1e-5, 8, {"200": 0.7, "400": 0.8}), ("completed", 0.73, 4.5e-4, 16,
              {"200": 0.6, "400": 0.7}), ("pruned", None, 5.3e-5, 32, {"200": 0.55})]
    index = {"direction": "maximize", "objective": "val/acc", "space": {"optim.lr": float_lr, "batch.effective": ebs},
             "trials": [{"folder": f"trial-000{i}", "status": st, "value": v, "params": {"optim.lr": lr,
                         "batch.effective": b}, "intermediate": inter} for i, (st, v, lr, b, inter) in enumerate(trials)]}
    paths = _study_plots(index, tmp_path)
    assert {p.stem for p in paths} == {"search_history", "param_importances", "intermediate_values"}
    for name in ("search_history", "param_importances", "intermediate_values"):
        assert drawn[name][1] == [], (name, drawn[name][1])
    inter, hist = _axes(drawn, "intermediate_values"), _axes(drawn, "search_history")
    assert inter["xlabel"] == "Training examples seen" and "Step" not in inter["xlabel"]
    assert inter["legend"] == ["trial-0000 (completed)", "trial-0001 (completed)", "trial-0002 (pruned)"]
    assert hist["legend"] == ["a completed trial's val/acc (best checkpoint)", "best so far"]
    assert all(float(t.replace("\u2212", "-")).is_integer() for t in hist["xticks"])  # whole trials, not 0.5
    assert 2 < FEW_TRIALS_FOR_IMPORTANCE
    assert drawn["param_importances"][0]["caveat"].startswith("From 2 completed trial(s): a rough ranking")
    assert _axes(drawn, "param_importances")["title"] == "Parameter Importance"


def test_style_problems_catches_what_readers_complained_about():
    from ebslab.analysis import figures

    fig, ax = figures.pyplot().subplots(figsize=(6.5, 4.5))
    ax.plot([6, 60], [1, 2], label="all")
    ax.set_xscale("log")
    ax.set_title("steps vs examples to target")
    ax.set_xlabel("training examples")
    ax.legend()
    problems = figures.style_problems(fig)
    figures.pyplot().close(fig)
    assert any(p.startswith("size (6.5, 4.5)") for p in problems)
    assert "title 'steps vs examples to target' is not in title case" in problems
    assert any(p.startswith("xlabel 'training examples'") for p in problems)
    assert any(p.startswith("ylabel ''") for p in problems)
    assert any(p.startswith("legend entry 'all'") for p in problems)
    assert any("scientific notation" in p for p in problems)


def test_title_case_leaves_names_alone():
    from ebslab.analysis.figures import title_case

    assert title_case("steps vs examples to val/acc 0.8") == "Steps vs Examples to val/acc 0.8"
    assert title_case("gradient noise scale B_simple per EBS") == "Gradient Noise Scale B_simple per EBS"
    assert title_case("a batch.effective=16 run") == "A batch.effective=16 Run"


# ------------------------------------------------------------------------------------------------ README commands

# The README's shell blocks are run as written, in order, in a fresh folder that holds the checkout's configs/
# and data/ (as a fresh clone does). A block that cannot run offline in seconds on a CPU (MiniLM, the hub, GPUs,
# several processes, clusters, databases) is preceded by a line `<!-- not run: REASON -->`; every other block
# must pass. `ebslab ...` and `.venv/bin/ebslab ...` lines run in this process (no interpreter start-up);
# other lines run in bash.
NOT_RUN = re.compile(r"<!--\s*not run:\s*(\S.*?)\s*-->")


def readme_shell_blocks(text: str) -> list[tuple[int, str | None, str]]:
    """(line number, reason it is not run or None, code) of every ```bash / ```sh block of a markdown text."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        if lines[i].strip() in ("```bash", "```sh", "```shell"):
            prev = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            mark = NOT_RUN.search(prev)
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            blocks.append((i + 1, mark.group(1) if mark else None, "\n".join(lines[i + 1:end])))
            i = end
        i += 1
    return blocks


def test_the_readme_marks_every_shell_block_it_does_not_run_with_a_reason():
    blocks = readme_shell_blocks((ROOT / "README.md").read_text())
    assert len(blocks) >= 5
    runnable = [b for b in blocks if b[1] is None]
    assert runnable, "the README must keep at least one block that the test runs (the quick start)"
    assert readme_shell_blocks("<!-- not run: needs a GPU -->\n```bash\nx\n```\n```sh\ny\n```\n") == [
        (2, "needs a GPU", "x"), (5, None, "y")]


def test_every_runnable_readme_block_works_as_written_on_a_fresh_checkout(tmp_path, monkeypatch, capsys):
    import shlex
    import subprocess

    for name in ("configs", "data"):
        (tmp_path / name).symlink_to(ROOT / name)
    monkeypatch.chdir(tmp_path)
    ran = 0
    for line_no, reason, code in readme_shell_blocks((ROOT / "README.md").read_text()):
        if reason is not None:
            continue
        for line in code.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if not argv:
                continue
            if argv[0] in ("ebslab", ".venv/bin/ebslab"):
                try:
                    rc = main(argv[1:])
                except SystemExit as e:  # --help
                    rc = e.code
                out = capsys.readouterr()
                assert rc == 0, f"README line {line_no}: {line}\n{out.err[-2000:]}"
            else:
                done = subprocess.run(["bash", "-c", line], capture_output=True, text=True)
                assert done.returncode == 0, f"README line {line_no}: {line}\n{done.stderr[-2000:]}"
            ran += 1
    assert ran >= 4


def test_the_file_reference_examples_are_valid_and_the_study_is_the_shipped_one(monkeypatch):
    import yaml

    from ebslab.experiments import sweep as sw
    from ebslab.experiments import tune

    text = (ROOT / "docs" / "files.md").read_text()
    sweep_yaml, study_yaml = re.findall(r"```yaml\n(.*?)```", text, flags=re.S)
    monkeypatch.chdir(ROOT)  # base paths as a user in the checkout writes them
    sweep = sw.parse_sweep(yaml.safe_load(sweep_yaml))
    assert len(sweep.runs()) == 2 * 3 * 2 * 3
    assert yaml.safe_load(study_yaml) == yaml.safe_load((ROOT / "configs/tune/cpu-minilm-tune.yaml").read_text())
    study = tune.load_study_file(ROOT / "configs/tune/cpu-minilm-tune.yaml")
    assert study.top_k == 2 and study.pruner["name"] == "median"


def test_a_command_module_that_fails_to_import_is_an_error_not_a_hidden_command(monkeypatch):
    """A broken command module used to vanish from the CLI ('not available in this installation')."""
    from ebslab import cli

    monkeypatch.setattr(cli, "COMMANDS", (*cli.COMMANDS, ("broken", "ebslab.analysis.no_such_module", "x")))
    with pytest.raises(ModuleNotFoundError, match="ebslab.analysis.no_such_module"):
        cli.build_parser()
