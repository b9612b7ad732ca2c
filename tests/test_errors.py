"""Errors in what the user gave: one line naming the problem and the fix, exit code 2, no traceback, and no run
folder left behind (or, for --resume, the run folder left exactly as it was).

Property-based tests feed random overrides to `load_config` and random small files to `load_table` + `clean`:
a UserError is the only exception that may come out.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import string
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ebslab.cli import main
from ebslab.core.errors import UserError
from ebslab.core.config import VALID_KEYS, DataConfig, load_config
from ebslab.inputs.data import clean, load_table

TINY = ["model.name=tiny-bert", "data.max_length=32", "data.limit=60", "batch.effective=16", "batch.micro=8",
        "train.epochs=1", "optim.lr=1e-3"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model on a busy machine: threads only wait on each other
    yield
    torch.set_num_threads(before)


def refused(capsys, tmp_path: Path, *args: str, match: str, resume: bool = False, config: str | None = None) -> str:
    """Run `ebslab train`; it must exit 2 with one `ebslab: error:` line matching `match`, and create nothing."""
    out = tmp_path / "runs"
    first = [config] if config else []
    argv = ["train", *args] if resume else ["train", *first, *TINY, *args, f"out.dir={out}", "out.name=r"]
    code = main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured.err
    assert "Traceback" not in captured.err
    assert len(lines) == 1 and lines[0].startswith("ebslab: error: "), captured.err
    assert re.search(match, lines[0]), lines[0]
    assert not out.exists(), "a refused run must leave no run folder"
    return lines[0]


def write_csv(path: Path, rows: list[dict]) -> Path:
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def reviews(n: int, labels=(0, 1)) -> list[dict]:
    words = ["good", "bad", "film", "plot", "actor", "boring", "great", "awful", "scene", "music"]
    return [{"text": f"{words[i % 10]} {words[(i * 7) % 10]} review number {i}", "label": labels[i % len(labels)]}
            for i in range(n)]


# ------------------------------------------------------------------------------------------------ data errors


def test_missing_path(capsys, tmp_path):
    refused(capsys, tmp_path, f"data.path={tmp_path / 'nope.csv'}", match=r"does not exist; give a parquet")


def test_folder_without_a_data_file(capsys, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "notes.txt").write_text("text,label\nhi,1\n")
    refused(capsys, tmp_path, f"data.path={folder}", match=r"holds no \.parquet, \.csv or \.jsonl file")


def test_file_of_an_unknown_kind(capsys, tmp_path):
    (tmp_path / "d.txt").write_text("text,label\nhi,1\n")
    refused(capsys, tmp_path, f"data.path={tmp_path / 'd.txt'}", match=r"is not parquet, csv or jsonl")


@pytest.mark.parametrize("role,columns", [("text", ["review", "label"]), ("label", ["text", "y"])])
def test_missing_column_names_the_columns_and_the_key(capsys, tmp_path, role, columns):
    path = write_csv(tmp_path / "d.csv", [dict(zip(columns, r.values())) for r in reviews(20)])
    line = refused(capsys, tmp_path, f"data.path={path}",
                   match=rf"has no {role} column '{role if role == 'text' else 'label'}' \(columns: "
                         rf"{', '.join(columns)}\); set data.{role}_column=<name>")
    assert "columns: " in line


def test_null_and_empty_texts_are_counted_and_located(capsys, tmp_path):
    rows = reviews(40)
    rows[3]["text"], rows[17]["text"], rows[30]["text"] = None, "   ", ""
    path = write_csv(tmp_path / "d.csv", rows)
    refused(capsys, tmp_path, f"data.path={path}",
            match=r"3 row\(s\) have a null or empty text \(first at row 3\).*data\.drop_empty=true")


def test_nan_labels(capsys, tmp_path):
    rows = reviews(40)
    rows[5]["label"] = rows[9]["label"] = float("nan")
    path = write_csv(tmp_path / "d.csv", rows)
    refused(capsys, tmp_path, f"data.path={path}", match=r"2 row\(s\) have no label \(NaN, first at row 5\)")


def test_a_single_class(capsys, tmp_path):
    path = write_csv(tmp_path / "d.csv", reviews(40, labels=(1,)))
    refused(capsys, tmp_path, f"data.path={path}", match=r"holds a single class \('1'\).*at least two")


def test_every_text_empty_with_drop_empty(capsys, tmp_path):
    path = write_csv(tmp_path / "d.csv", [{"text": "", "label": i % 2} for i in range(10)])
    refused(capsys, tmp_path, f"data.path={path}", "data.drop_empty=true",
            match=r"all 10 row\(s\) have a null or empty text; no rows are left")


def test_an_empty_file(capsys, tmp_path):
    (tmp_path / "d.csv").write_bytes(b"")
    refused(capsys, tmp_path, f"data.path={tmp_path / 'd.csv'}", match=r"'.*d\.csv' is empty")


def test_a_header_without_rows(capsys, tmp_path):
    (tmp_path / "d.csv").write_text("text,label\n")
    refused(capsys, tmp_path, f"data.path={tmp_path / 'd.csv'}", match=r"has no rows")


@pytest.mark.parametrize("name,content", [("d.parquet", b"PAR1 this is not parquet at all PAR1"),
                                          ("d.jsonl", b'{"text": "a", "label": 1}\n{"text": \n'),
                                          ("d.csv", b"\xff\xfe\x00\x81\x9f text,label\n")])
def test_a_corrupt_file(capsys, tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    kind = name.split(".")[1]
    refused(capsys, tmp_path, f"data.path={tmp_path / name}", match=rf"could not be read as {kind} .*corrupt")


def test_too_few_examples_for_the_split(capsys, tmp_path):
    refused(capsys, tmp_path, "data.limit=4", match=r"split is empty.*raise data\.limit")


def test_string_labels_map_to_sorted_ids_and_empty_texts_can_be_dropped(capsys, tmp_path):
    rows = reviews(60, labels=("pos", "neg", "meh"))
    rows[2]["text"], rows[11]["text"] = "", None
    path = write_csv(tmp_path / "d.csv", rows)
    out = tmp_path / "runs"
    code = main(["train", *TINY, "data.limit=null", f"data.path={path}", "data.drop_empty=true", f"out.dir={out}",
                 "out.name=s"])
    assert code == 0, capsys.readouterr().err
    assert "dropped 2 empty" in capsys.readouterr().out
    run = out / "s"
    assert json.loads((run / "labels.json").read_text())["names"] == ["meh", "neg", "pos"]
    assert json.loads((run / "summary.json").read_text())["dropped_empty"] == 2
    # ids follow the sorted names: row i of the cleaned table keeps its own label
    ex = clean(pd.read_csv(path), DataConfig(path=str(path), drop_empty=True), "d.csv")
    kept = [r for r in rows if r["text"]]
    assert [ex.label_names[i] for i in ex.labels] == [r["label"] for r in kept]
    assert ex.dropped_empty == 2 and len(ex.texts) == 58
    preds = pd.read_parquet(run / "predictions" / "test_last.parquet")
    assert set(preds["label"]) <= {0, 1, 2} and len(preds["label"].unique()) == 3


# ------------------------------------------------------------------------------------------------ config errors


@pytest.mark.parametrize("args,match", [
    (["train.epochs=abc"], r"config key 'train\.epochs' must be int, got 'abc'"),
    (["train.epoch=2"], r"unknown config key 'train\.epoch'; did you mean 'train\.epochs'\?"),
    (["optimizer.lr=1e-4"], r"unknown config key 'optimizer\.lr'; did you mean 'optim\.lr'\?"),
    (["optim.learning_rate=1e-4"], r"unknown config key 'optim\.learning_rate'; did you mean 'optim\.lr'\?"),
    (["batch.effective=30"], r"batch\.effective=30 is not divisible by batch\.micro x world_size = 8 x 1 = 8; "
                             r"choose batch\.effective as a multiple of 8"),
    (["data.max_length=0"], r"data\.max_length must be > 0"),
    (["data.max_length=-8"], r"data\.max_length must be > 0"),
    (["optim.lr=0"], r"optim\.lr must be > 0"),
    (["optim.lr=-1e-3"], r"optim\.lr must be > 0"),
    (["optim.lr=abc"], r"config key 'optim\.lr' must be float"),
    (["batch.micro=0"], r"batch\.micro must be > 0 or auto"),
    (["optim.lr_scaling=cubic"], r"'optim\.lr_scaling' must be 'none' \| 'linear' \| 'sqrt'"),
])
def test_bad_config_values(capsys, tmp_path, args, match):
    refused(capsys, tmp_path, *args, match=match)


@pytest.mark.parametrize("typed, meant", [
    ("optim.learning_rate", "optim.lr"),            # a synonym: edit distance alone says optim.lr_scaling
    ("learning_rate", "optim.lr"),                  # HF TrainingArguments' name, no section
    ("optim.wd", "optim.weight_decay"),             # initials
    ("optim.lr_scale", "optim.lr_scaling"),         # the longest shared start, not optim.lr
    ("optim.lrr", "optim.lr"),
    ("optim.weight", "optim.weight_decay"),         # a prefix
    ("train.epoch", "train.epochs"),
    ("train.fp16", "train.precision"),
    ("data.max_seq_length", "data.max_length"),
    ("per_device_train_batch_size", "batch.micro"),
    ("batch.size", "batch.effective"),
    ("optimizer.lr", "optim.lr"),                   # a typo in the section
    ("batch.efective", "batch.effective"),          # a typo in the name
])
def test_did_you_mean_matches_meaning_and_prefixes_before_spelling(typed, meant):
    from ebslab.core.config import VALID_KEYS, suggest_key

    assert suggest_key(typed) == meant and meant in VALID_KEYS


def test_a_missing_config_file(capsys, tmp_path):
    refused(capsys, tmp_path, config="nonsense.yaml", match=r"config file 'nonsense\.yaml' does not exist")


@pytest.mark.parametrize("arg", ["train.seed=-1", "data.split_seed=-1", "train.seed=4294967296"])
def test_a_seed_out_of_range(capsys, tmp_path, arg):
    refused(capsys, tmp_path, arg, match=r"seed")


def test_a_config_file_that_is_not_yaml(capsys, tmp_path):
    (tmp_path / "c.yaml").write_text("model: [unclosed\n")
    refused(capsys, tmp_path, config=str(tmp_path / "c.yaml"), match=r"is not valid YAML")


# ------------------------------------------------------------------------------------------------ run folders


@pytest.fixture(scope="module")
def done_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("done")
    assert main(["train", *TINY, "checkpoint.every_steps=1", f"out.dir={out}", "out.name=run"]) == 0
    return out / "run"


def _fingerprint(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def copy_of(done_run, tmp_path) -> Path:
    """The finished run as if killed after its last checkpoint (no summary.json): resumable."""
    run = tmp_path / "copy" / "run"
    shutil.copytree(done_run, run)
    (run / "summary.json").unlink()
    return run


def test_an_existing_run_is_never_overwritten_without_overwrite(capsys, done_run, tmp_path):
    before = _fingerprint(done_run)
    code = main(["train", *TINY, f"out.dir={done_run.parent}", "out.name=run"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert re.fullmatch(r"ebslab: error: run folder '.*run' already holds a run; pass --overwrite to replace it, "
                        r"--resume .* to continue it, or set out.name", err.strip())
    assert _fingerprint(done_run) == before


def test_overwrite_replaces_the_run(capsys, copy_of):
    (copy_of / "stale.txt").write_text("from the old run")
    code = main(["train", *TINY, f"out.dir={copy_of.parent}", "out.name=run", "--overwrite"])
    assert code == 0
    assert not (copy_of / "stale.txt").exists() and (copy_of / "summary.json").exists()


def test_resume_of_a_folder_that_is_not_a_run(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    refused(capsys, tmp_path, "--resume", str(tmp_path / "empty"), resume=True,
            match=r"is not an ebslab run folder")
    refused(capsys, tmp_path, "--resume", str(tmp_path / "missing"), resume=True,
            match=r"is not an ebslab run folder")


def test_resume_takes_no_overrides(capsys, done_run, tmp_path):
    refused(capsys, tmp_path, "--resume", str(done_run), "optim.lr=1", resume=True,
            match=r"--resume RUN_DIR takes no config file or overrides")


def _edit_config(run: Path, section: str, key: str, value) -> None:
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg[section][key] = value
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


@pytest.mark.parametrize("section,key,value,match", [
    ("batch", "effective", 32, r"cannot resume '.*': (steps_per_epoch|accum_steps) was \d+, now \d+"),
    ("optim", "lr", 0.002, r"cannot resume '.*': config\.yaml changed since its checkpoint \(optim\.lr: 0\.001 -> "
                           r"0\.002\); undo the edit"),
    ("model", "name", "tiny-roberta", r"config\.yaml changed since its checkpoint \(model\.name: 'tiny-bert' -> "
                                      r"'tiny-roberta'\)"),
    ("model", "pooling", "oops", r"config key 'model\.pooling' must be 'cls' \| 'mean'"),
])
def test_resume_after_an_incompatible_config_edit(capsys, copy_of, tmp_path, section, key, value, match):
    _edit_config(copy_of, section, key, value)
    before = _fingerprint(copy_of)
    refused(capsys, tmp_path, "--resume", str(copy_of), resume=True, match=match)
    assert _fingerprint(copy_of) == before


def test_resume_when_the_checkpoint_does_not_fit_the_model(capsys, copy_of, tmp_path):
    # a checkpoint from before configs were stored in it: the mismatch shows when the weights are loaded
    (copy_of / "checkpoints" / "last" / "config.json").unlink()
    _edit_config(copy_of, "model", "name", "tiny-roberta")
    before = _fingerprint(copy_of)
    refused(capsys, tmp_path, "--resume", str(copy_of), resume=True,
            match=r"checkpoint does not fit the model/optimizer of config\.yaml")
    assert _fingerprint(copy_of) == before


def test_resume_with_a_harmless_edit_is_allowed(capsys, copy_of):
    _edit_config(copy_of, "eval", "batch_size", 7)
    assert main(["train", "--resume", str(copy_of)]) == 0


def _forget_key_in_checkpoint(run: Path, section: str, key: str) -> None:
    path = run / "checkpoints" / "last" / "config.json"
    saved = json.loads(path.read_text())
    del saved[section][key]
    path.write_text(json.dumps(saved))


def test_resume_of_a_checkpoint_from_before_a_key_existed(capsys, copy_of, tmp_path):
    # ebslab grew `eval.select_by` after this checkpoint was written: at its default it changes nothing
    _forget_key_in_checkpoint(copy_of, "eval", "select_by")
    assert main(["train", "--resume", str(copy_of)]) == 0


def test_resume_of_an_old_checkpoint_with_a_new_key_set_is_refused(capsys, copy_of, tmp_path):
    _forget_key_in_checkpoint(copy_of, "eval", "select_by")
    _edit_config(copy_of, "eval", "select_by", "mcc")
    refused(capsys, tmp_path, "--resume", str(copy_of), resume=True,
            match=r"config\.yaml changed since its checkpoint \(eval\.select_by: None -> 'mcc'\)")


@pytest.mark.parametrize("damage,match", [
    ("no checkpoint", r"has no complete checkpoint to resume from; start it again with --overwrite"),
    ("truncated weights", r"checkpoint last/ is damaged"),
    ("garbage config.yaml", r"is not a valid ebslab config"),
])
def test_resume_of_a_damaged_run(capsys, copy_of, tmp_path, damage, match):
    if damage == "no checkpoint":
        shutil.rmtree(copy_of / "checkpoints" / "last")
    elif damage == "truncated weights":
        weights = copy_of / "checkpoints" / "last" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:5000])
    else:
        (copy_of / "config.yaml").write_text("- just\n- a list\n")
    before = _fingerprint(copy_of)
    refused(capsys, tmp_path, "--resume", str(copy_of), resume=True, match=match)
    assert _fingerprint(copy_of) == before


# ------------------------------------------------------------------------------------------------ properties

SECTIONS = sorted({k.split(".")[0] for k in VALID_KEYS})
VALUES = st.one_of(
    st.sampled_from(["abc", "1", "-1", "0", "1e-4", "1.5", "true", "null", "[1, 2]", "[0.5, 0.5, 0.5]", "{a: 1}",
                     "auto", "[", "]", "nan", ".nan", ".inf", "-.inf", "''", "1e400", "0x10", "!!python/none",
                     "!!binary aGk=", "&a 1", "*a", "- 1", "cls", "mean", "adam", "sqrt", "[jsonl, wandb]", "~",
                     "{", "'", "2**64", "9999999999999999999999", "-0.0", ": :", "@", "`"]),
    st.text(max_size=12),
    st.integers(-10**20, 10**20).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
)
KEYS = st.one_of(st.sampled_from(VALID_KEYS), st.sampled_from(SECTIONS),
                 st.text(alphabet=string.ascii_lowercase + "._", max_size=15))
JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                       lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                     max_size=3), max_leaves=8)
PROPERTY = settings(max_examples=int(os.environ.get("EBSLAB_HYPOTHESIS_EXAMPLES", "150")), deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@PROPERTY
@given(st.lists(st.tuples(KEYS, VALUES), max_size=4))
def test_random_overrides_raise_only_user_errors(pairs):
    try:
        load_config(None, [f"{k}={v}" for k, v in pairs])
    except UserError as e:
        assert str(e) and ("\n" not in str(e) or any("\n" in k + v for k, v in pairs))


@PROPERTY
@given(st.dictionaries(KEYS, st.one_of(JSONISH, st.dictionaries(st.sampled_from(
    [k.split(".", 1)[-1] for k in VALID_KEYS]), JSONISH, max_size=3)), max_size=4))
def test_random_config_mappings_raise_only_user_errors(mapping):
    try:
        load_config(mapping)
    except UserError as e:
        assert str(e)


CELLS = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.integers(), st.floats(),
                  st.text(max_size=10), st.sampled_from(["", " ", "\n", "nan", "NaN", "null", "pos", "neg", "1.0"]))
COLUMNS = st.sampled_from(["text", "label", "other", "Text", "", "label "])


@st.composite
def tables(draw) -> pd.DataFrame:
    columns = draw(st.lists(COLUMNS, min_size=0, max_size=3, unique=True))
    rows = draw(st.lists(st.fixed_dictionaries({c: CELLS for c in columns}), max_size=8))
    return pd.DataFrame(rows, columns=columns)


def _load(path: Path, drop_empty: bool) -> None:
    cfg = DataConfig(path=str(path), drop_empty=drop_empty)
    try:
        ex = clean(load_table(cfg), cfg, str(path))
    except UserError as e:
        assert str(e) and "Traceback" not in str(e)
        return
    # what comes out is usable: at least two classes, one id per text, no empty text
    assert len(ex.label_names) >= 2 and len(ex.texts) == len(ex.labels) >= 2
    assert ex.labels.min() == 0 and ex.labels.max() == len(ex.label_names) - 1
    assert all(t.strip() for t in ex.texts)


@PROPERTY
@given(content=st.binary(max_size=300), suffix=st.sampled_from([".csv", ".jsonl", ".json", ".parquet"]),
       drop_empty=st.booleans())
def test_random_bytes_raise_only_user_errors(content, suffix, drop_empty):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"data{suffix}"
        path.write_bytes(content)
        _load(path, drop_empty)


@PROPERTY
@given(table=tables(), kind=st.sampled_from(["csv", "jsonl", "parquet"]), drop_empty=st.booleans())
def test_random_tables_raise_only_user_errors(table, kind, drop_empty):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"data.{kind}"
        if kind == "csv":
            table.to_csv(path, index=False)
        elif kind == "jsonl":
            table.to_json(path, orient="records", lines=True)
        else:
            try:
                table.to_parquet(path, index=False)
            except Exception:  # pyarrow cannot store a column of mixed types: store it as text
                table.astype(str).to_parquet(path, index=False)
        _load(path, drop_empty)


@PROPERTY
@given(lines=st.lists(st.one_of(JSONISH.map(json.dumps), st.text(max_size=20)), max_size=6),
       drop_empty=st.booleans())
def test_random_jsonl_lines_raise_only_user_errors(lines, drop_empty):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "data.jsonl"
        path.write_text("\n".join(lines))
        _load(path, drop_empty)


def test_float_labels_that_are_whole_numbers_are_class_ids():
    table = pd.DataFrame({"text": ["a", "b", "c", "d"], "label": [0.0, 1.0, 1.0, np.float64(0)]})
    ex = clean(table, DataConfig(), "t")
    assert ex.labels.tolist() == [0, 1, 1, 0] and ex.label_names == ["0", "1"]


@pytest.mark.timeout(7)
def test_hang_timeouts_are_scaled_by_one_factor(request):
    from conftest import TIMEOUT_SCALE, hang_after

    assert request.node.get_closest_marker("timeout").args[0] == 7 * TIMEOUT_SCALE == hang_after(7)


# ----------------------------------------------------------------------------------------------------------
# Labels that look wrong


def _labelled_csv(path: Path, labels: list, header: str = "text,label") -> Path:
    path.write_text(header + "\n" + "".join(f"review {i},{v}\n" for i, v in enumerate(labels)))
    return path


def test_a_class_under_min_class_fraction_is_refused_with_the_threshold_to_lower(tmp_path):
    path = _labelled_csv(tmp_path / "d.csv", ["positive", "negative"] * 150 + ["1"])  # 1 row in 301
    cfg = DataConfig(path=str(path))
    with pytest.raises(UserError) as e:
        clean(load_table(cfg), cfg, "d.csv")
    assert str(e.value) == ("d.csv: label(s) '1' (1 row) hold under data.min_class_fraction=0.01 of the 301 rows, "
                            "a likely typo in column 'label'; fix those rows, or set data.min_class_fraction=0.0017 "
                            "(0 = off) if the class is meant")
    ex = clean(load_table(cfg), DataConfig(path=str(path), min_class_fraction=0.0017), "d.csv")
    assert ex.label_names == ["1", "negative", "positive"]
    # the warning says why a third class appeared: a number among words
    assert ex.warnings == ["d.csv: column 'label' mixes numeric labels ('1') with text labels ('positive', "
                           "'negative'); each distinct value is a class of its own"]
    assert np.bincount(ex.labels).tolist() == [1, 150, 150]


def test_labels_of_one_kind_give_no_warning_and_a_rare_class_at_the_threshold_passes(tmp_path):
    words = clean(load_table(cfg := DataConfig(path=str(_labelled_csv(tmp_path / "w.csv", ["a", "b"] * 50)))),
                  cfg, "w")
    numbers = clean(load_table(cfg := DataConfig(path=str(_labelled_csv(tmp_path / "n.csv", [0] * 99 + [1])))),
                    cfg, "n")
    assert words.warnings == [] and numbers.warnings == []
    assert np.bincount(numbers.labels).tolist() == [99, 1]  # 1 of 100 = 0.01: not under the threshold


def test_a_duplicated_column_name_is_warned_about(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label,label\n" + "".join(f"t{i},{i % 2},0\n" for i in range(20)))
    cfg = DataConfig(path=str(path))
    ex = clean(load_table(cfg), cfg, "d.csv")
    assert ex.warnings == [f"data file '{path}' has the column 'label' 2 times (pandas renamed the later ones to "
                           "NAME.1, NAME.2 ...); rename the columns so each is unique"]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(f'{{"text": "t{i}", "label": 0, "label": {i % 2}}}\n' for i in range(20)))
    assert clean(load_table(c := DataConfig(path=str(jsonl))), c, "j").warnings[0].startswith(
        f"data file '{jsonl}' has the column 'label' 2 times (the last value of a repeated key is the one read)")


def test_load_data_counts_the_classes_of_the_kept_rows(tmp_path):
    from ebslab.inputs.data import load_data
    from ebslab.inputs.models import load_tokenizer

    path = _labelled_csv(tmp_path / "d.csv", ["neg"] * 70 + ["pos"] * 30)
    bundle = load_data(DataConfig(path=str(path), max_length=8), load_tokenizer("tiny-bert"))
    assert bundle.class_counts == [70, 30] and bundle.label_names == ["neg", "pos"]
    bundle = load_data(DataConfig(path=str(path), max_length=8, limit=50), load_tokenizer("tiny-bert"))
    assert sum(bundle.class_counts) == 50


def test_a_run_prints_the_class_counts_and_logs_each_data_warning(tmp_path, train_run, capsys):
    # two rows of '1' among words (2% of the rows, above data.min_class_fraction) and a second 'label' column
    path = tmp_path / "d.csv"
    path.write_text("text,label,label\n" + "".join(f"review {i},{v},x\n" for i, v in
                                                   enumerate(["positive", "negative"] * 49 + ["1", "1"])))
    run = train_run(f"data.path={path}", "data.limit=null", base=TINY)
    out, err = capsys.readouterr()
    assert "\nclasses 1 2, negative 49, positive 49\n" in out
    expected = [f"data file '{path}' has the column 'label' 2 times (pandas renamed the later ones to NAME.1, "
                "NAME.2 ...); rename the columns so each is unique",
                f"data.path '{path}': column 'label' mixes numeric labels ('1') with text labels ('positive', "
                "'negative'); each distinct value is a class of its own"]
    data_lines = [ln for ln in err.splitlines() if ln.startswith("WARNING [data] ")]
    assert [ln.removeprefix("WARNING [data] ") for ln in data_lines] == expected
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["message"] for r in lines if r["event"] == "warning" and r["kind"] == "data"] == expected


# ------------------------------------------------------------------------------------------------ bounded inputs


@pytest.mark.timeout(60)
def test_a_yaml_alias_bomb_under_a_valid_key_is_refused_at_once_in_a_short_line(capsys, tmp_path):
    # 9 levels of 9 aliases: 9**9 = 387 million strings once expanded, from 10 short lines
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    (tmp_path / "bomb.yaml").write_text("\n".join(lines) + "\ntrack: *a8\n")
    line = refused(capsys, tmp_path, config=str(tmp_path / "bomb.yaml"), match=r"expands to more than 100,000 values")
    assert len(line) < 300


def test_a_wrong_type_message_shows_a_shortened_value(capsys, tmp_path):
    line = refused(capsys, tmp_path, "track=[" + ", ".join(f"tracker{i}" for i in range(5000)) + "]",
                   match=r"config key 'track' must be")
    assert "tracker0" in line and "tracker4999" not in line and len(line) < 400


def test_an_oversized_config_file_is_refused(capsys, tmp_path):
    (tmp_path / "big.yaml").write_text("# padding\n" * 200_000 + "train:\n  epochs: 1\n")
    refused(capsys, tmp_path, config=str(tmp_path / "big.yaml"), match=r"over the 1,048,576 a config may have")


@pytest.mark.parametrize("name", ["../escaped", "/tmp/abs", "a/../../b", "bell\x07", "~/home-run", "a\\..\\b", "."])
def test_out_name_stays_inside_out_dir(capsys, tmp_path, name):
    out = tmp_path / "runs" / "inner"
    code = main(["train", *TINY, f"out.dir={out}", f"out.name={name}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "out.name" in err and "must stay inside out.dir" in err, err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "escaped").exists()


def test_text_column_equal_to_label_column_is_refused(capsys, tmp_path):
    refused(capsys, tmp_path, "data.text_column=label", match=r"data\.text_column and data\.label_column are both "
                                                               r"'label'")


@pytest.mark.parametrize("split", ["[8, 1, 1]", "[0.5, 0.2, 0.2]", "[0.8, 0.1, 0.2]"])
def test_split_fractions_that_do_not_sum_to_1_are_refused(capsys, tmp_path, split):
    refused(capsys, tmp_path, f"data.split={split}", match=r"data\.split .* sums to .*, not 1")


def test_thousands_of_rare_classes_are_refused_in_a_short_line(tmp_path):
    path = write_csv(tmp_path / "d.csv", [{"text": f"t {i}", "label": f"class-{i}"} for i in range(10_000)])
    cfg = DataConfig(path=str(path))
    with pytest.raises(UserError) as e:
        clean(load_table(cfg), cfg, "d.csv")
    message = str(e.value)
    assert "'class-0' (1 row)" in message and "and 9995 more" in message and len(message) < 600


# ------------------------------------------------------------------------------------------------ no tracebacks


def _one_line(capsys, code: int, *needles: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and "Traceback" not in err and len(lines) == 1 and lines[0].startswith("ebslab: error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_an_output_folder_that_is_a_file_is_one_line_for_train_sweep_tune_and_report(capsys, tmp_path, done_run):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    _one_line(capsys, main(["train", *TINY, f"out.dir={afile}", "out.name=r"]),
              f"out.dir/out.name '{afile / 'r'}' is not a folder: '{afile}' is a file")
    sweep = tmp_path / "s.yaml"
    sweep.write_text(yaml.safe_dump({"name": "s", "base": {"model.name": "tiny-bert"}, "grid": {"train.seed": [1]}}))
    _one_line(capsys, main(["sweep", str(sweep), "--out", str(afile)]), f"'{afile}' is a file")
    study = Path(__file__).resolve().parents[1] / "configs" / "tune" / "cpu-minilm-tune.yaml"
    _one_line(capsys, main(["tune", str(study), "--out", str(afile)]), f"'{afile}' is a file")
    _one_line(capsys, main(["report", str(done_run), "--out", str(afile)]), f"--out '{afile}' is not a folder")
    assert afile.read_text() == "not a folder" and sorted(p.name for p in tmp_path.iterdir()) == ["afile", "s.yaml"]


def test_a_garbled_study_json_is_one_line(capsys, tmp_path):
    (tmp_path / "study").mkdir()
    (tmp_path / "study" / "study.json").write_text("{garbled")
    _one_line(capsys, main(["report", str(tmp_path / "study")]), "study.json' is damaged (JSONDecodeError",
              "--resume")


@pytest.mark.parametrize("field,value", [("step", "3"), ("best_val", [1, 2]), ("since_eval", {"count": "x"}),
                                         ("ever_above_majority", 1), ("callbacks", None)])
def test_a_trainer_state_of_valid_json_with_wrong_types_is_one_line(capsys, copy_of, tmp_path, field, value):
    path = copy_of / "checkpoints" / "last" / "trainer_state.json"
    state = json.loads(path.read_text())
    state[field] = value
    path.write_text(json.dumps(state))
    before = _fingerprint(copy_of)
    refused(capsys, tmp_path, "--resume", str(copy_of), resume=True,
            match=rf"trainer_state\.json is damaged or from another version of ebslab \({field}")
    assert _fingerprint(copy_of) == before


def test_resume_of_a_finished_run_says_there_is_nothing_to_resume_and_touches_nothing(capsys, done_run, tmp_path):
    before = _fingerprint(done_run)
    status = json.loads((done_run / "summary.json").read_text())["status"]
    line = refused(capsys, tmp_path, "--resume", str(done_run), resume=True, match="there is nothing to resume")
    assert line == (f"ebslab: error: run '{done_run}' already finished (status {status}): there is nothing to "
                    "resume; its results are in summary.json (start it again with `ebslab train ... --overwrite`)")
    assert _fingerprint(done_run) == before


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["sweep", "tune"])
def test_a_sweep_or_study_file_that_is_an_alias_bomb_or_nests_too_deeply_is_one_line(capsys, tmp_path, kind):
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    (tmp_path / "bomb.yaml").write_text("\n".join(lines) + "\nname: s\ngrid: {track: *a8}\n")
    (tmp_path / "deep.yaml").write_text("name: s\ngrid: " + "[" * 5000 + "]" * 5000 + "\n")
    for name, needle in (("bomb.yaml", "expands to more than 100,000 values"), ("deep.yaml", "nests too deeply")):
        code = main([kind, str(tmp_path / name), "--out", str(tmp_path / "runs")])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and needle in err and len(err) < 300, err
    assert not (tmp_path / "runs").exists()
