"""ebslab predict / export: the run's own test split comes back as its saved predictions, the export folder loads
with transformers alone (fresh process, no ebslab importable) and agrees with predict, the card carries the
metrics, and every bad input is one line, exit 2, nothing written."""

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import hang_after

MODELS = ["tiny-bert", "tiny-roberta", "tiny-modernbert"]
POOLINGS = ["cls", "mean"]
CASES = [(m, p) for m in MODELS for p in POOLINGS]
RUN = ["data.max_length=32", "data.limit=120", "train.epochs=1", "batch.effective=32", "batch.micro=16",
       "optim.lr=1e-3", "eval.batch_size=4", "train.device=cpu"]
TEXTS = ["a wonderful film", "dull and far too long " * 20, "ok", "Ni bueno ni malo.", "I loved it, truly."]


def cli(*args, stdin=None):
    from ebslab.cli import main

    out, err = io.StringIO(), io.StringIO()
    old_stdin = sys.stdin
    if stdin is not None:
        sys.stdin = io.StringIO(stdin)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([str(a) for a in args])
    finally:
        sys.stdin = old_stdin
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One tiny run per (model, pooling), each exported at its best checkpoint: {case: (run_dir, export_dir)}."""
    root = tmp_path_factory.mktemp("runs")
    made = {}
    for model, pooling in CASES:
        name = f"{model}-{pooling}"
        code, out, err = cli("train", f"model.name={model}", f"model.pooling={pooling}", *RUN,
                             f"out.dir={root}", f"out.name={name}")
        assert code == 0, err[-2000:]
        code, _, err = cli("export", root / name, "--out", root / f"{name}-export")
        assert code == 0, err[-2000:]
        made[(model, pooling)] = (root / name, root / f"{name}-export")
    return made


def split_texts(run_dir):
    from ebslab.inputs.data import load_examples, split_indices
    from ebslab.core.runfolder import load_run_config

    cfg, _ = load_run_config(run_dir)
    examples = load_examples(cfg.data, "test")
    _, _, test_idx = split_indices(examples.labels, cfg.data.split, cfg.data.split_seed, cfg.data.limit)
    return [examples.texts[i] for i in test_idx], examples.labels[test_idx]


@pytest.mark.parametrize("case", CASES, ids=[f"{m}-{p}" for m, p in CASES])
def test_predict_on_test_split_reproduces_saved_predictions(runs, case, tmp_path):
    run_dir, _ = runs[case]
    texts, labels = split_texts(run_dir)
    pd.DataFrame({"text": texts, "label": labels}).to_parquet(tmp_path / "test.parquet")
    code, _, err = cli("predict", run_dir, tmp_path / "test.parquet", "--out", tmp_path / "pred.parquet")
    assert code == 0, err
    got = pd.read_parquet(tmp_path / "pred.parquet")
    saved = pd.read_parquet(run_dir / "predictions" / "test_best.parquet").sort_values("index")
    names = json.loads((run_dir / "labels.json").read_text())["names"]
    assert list(got.columns) == ["text", "label", "pred"] + [f"prob_{n}" for n in names]
    assert np.array_equal(saved["label"].to_numpy(), labels)  # the rows line up with the saved split
    pred_id = got["pred"].map({n: i for i, n in enumerate(names)}).to_numpy()
    assert np.array_equal(pred_id, saved["pred"].to_numpy())
    probs = got[[f"prob_{n}" for n in names]].to_numpy()
    np.testing.assert_allclose(probs[np.arange(len(got)), pred_id], saved["prob"].to_numpy(), rtol=0, atol=1e-7)
    for k in range(len(names)):  # every class's probability once the predictions files carry them (contract C1)
        if f"prob_{k}" in saved:
            np.testing.assert_allclose(probs[:, k], saved[f"prob_{k}"].to_numpy(), rtol=0, atol=1e-7)


PIPELINE_CHECK = r"""
import json, sys
sys.modules["ebslab"] = None  # the venv may have ebslab installed: make any import of it fail here
try:
    import ebslab.inputs.models
    raise SystemExit("ebslab is importable: the check would prove nothing")
except ImportError:
    pass
from transformers import AutoModelForSequenceClassification, pipeline
dirs, texts = json.loads(sys.argv[1]), json.loads(sys.argv[2])
out = {}
for d in dirs:
    model = AutoModelForSequenceClassification.from_pretrained(d, trust_remote_code=True)
    clf = pipeline("text-classification", model=d, trust_remote_code=True, device="cpu")
    rows = clf(texts, top_k=None, truncation=True)
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    out[d] = {"class": type(model).__name__,
              "probs": [[{r["label"]: r["score"] for r in row}[name] for name in labels] for row in rows]}
print(json.dumps(out))
"""


def test_pipeline_loads_every_export_offline_in_a_fresh_process_and_matches_predict(runs, tmp_path):
    from ebslab.serving.predict import load_run, predict_texts

    exports = [str(runs[c][1]) for c in CASES]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "hf-modules"), TRANSFORMERS_VERBOSITY="error")
    # run from an empty folder so neither the worktree nor src/ is on sys.path
    proc = subprocess.run([sys.executable, "-c", PIPELINE_CHECK, json.dumps(exports), json.dumps(TEXTS)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=hang_after(60))
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    for case in CASES:
        run_dir, export_dir = runs[case]
        got = loaded[str(export_dir)]
        assert got["class"] == "EbslabForSequenceClassification"
        expected = predict_texts(load_run(run_dir, "best"), TEXTS, progress=False)
        diff = np.abs(np.array(got["probs"]) - expected).max()
        assert diff <= 1e-5, (case, diff)


def test_model_card_carries_metrics_config_and_citation(runs):
    from huggingface_hub import ModelCard

    run_dir, export_dir = runs[("tiny-bert", "mean")]
    summary = json.loads((run_dir / "summary.json").read_text())
    card = ModelCard.load(export_dir / "README.md")
    results = {(r.dataset_split.split(" ")[2], r.metric_type): r.metric_value for r in card.data.eval_results}
    for metric in ("acc", "loss", "ece"):
        assert results[("test", metric)] == pytest.approx(summary["test_best"][metric])
        assert results[("validation", metric)] == pytest.approx(summary["val_best"][metric])
    # the figures are on ebslab's re-split of the pooled data, with their n: never the dataset's official split
    n_test = summary["test_best"]["n"]
    assert {r.dataset_split for r in card.data.eval_results if r.metric_name.startswith("test")} == {
        f"ebslab re-split test (0.8:0.1:0.1 of the dataset's train and test splits pooled, seed 42), n={n_test}"}
    assert f"test n={n_test} examples), not on the dataset's official `test` split" in " ".join(card.text.split())
    assert card.data.datasets == ["stanfordnlp/imdb"]
    assert "effective_batch 32 = micro 16 x accum_steps 2 x world_size 1" in card.text
    assert "seeds: train.seed 1, data.split_seed 42" in card.text
    assert "Learning Word Vectors for Sentiment Analysis" in card.text
    config = json.loads((export_dir / "config.json").read_text())
    assert config["auto_map"]["AutoModelForSequenceClassification"] == \
        "modeling_ebslab.EbslabForSequenceClassification"
    # IMDB names its classes: the pipeline says neg / pos, the card says which label value each is
    assert config["ebslab_pooling"] == "mean" and config["id2label"] == {"0": "neg", "1": "pos"}
    assert "Labels: 0 = `neg` (label value `0`), 1 = `pos` (label value `1`)." in card.text
    assert "https://github.com/)" not in card.text and "auto" not in card.text.split("## Training")[1].split("##")[0]
    assert "precision fp32" in card.text
    assert "ebslab" not in (export_dir / "modeling_ebslab.py").read_text().split('"""', 2)[2].split("class")[0]


def test_export_last_checkpoint_uses_last_metrics(runs, tmp_path):
    from huggingface_hub import ModelCard

    run_dir, _ = runs[("tiny-roberta", "cls")]
    code, _, err = cli("export", run_dir, "--out", tmp_path / "last", "--checkpoint", "last")
    assert code == 0, err
    summary = json.loads((run_dir / "summary.json").read_text())
    card = ModelCard.load(tmp_path / "last" / "README.md")
    results = {(r.dataset_split.split(" ")[2], r.metric_type): r.metric_value for r in card.data.eval_results}
    assert results[("test", "acc")] == pytest.approx(summary["test_last"]["acc"])
    assert "**last** checkpoint" in card.text


def test_predict_reads_text_stdin_jsonl_and_writes_each_format(runs, tmp_path):
    from ebslab.serving.predict import load_run, predict_texts

    run_dir, _ = runs[("tiny-bert", "cls")]
    expected = predict_texts(load_run(run_dir, "best"), TEXTS, progress=False)
    (tmp_path / "in.txt").write_text("\n".join(TEXTS) + "\n")
    pd.DataFrame({"review": TEXTS, "id": range(len(TEXTS))}).to_json(tmp_path / "in.jsonl", orient="records",
                                                                     lines=True)
    code, out, err = cli("predict", run_dir, tmp_path / "in.txt")
    assert code == 0, err
    from_txt = pd.read_csv(io.StringIO(out))
    code, out, err = cli("predict", run_dir, "-", stdin="\n".join(TEXTS))
    from_stdin = pd.read_csv(io.StringIO(out))
    code, _, err = cli("predict", run_dir, tmp_path / "in.jsonl", "--text-column", "review", "--out",
                       tmp_path / "out.jsonl", "train.device=cpu")
    assert code == 0, err
    from_jsonl = pd.read_json(tmp_path / "out.jsonl", lines=True)
    assert list(from_jsonl.columns) == ["review", "id", "pred", "prob_0", "prob_1"]
    assert from_jsonl["id"].tolist() == list(range(len(TEXTS)))
    for table in (from_txt, from_stdin, from_jsonl):
        assert len(table) == len(TEXTS)
        probs = table[["prob_0", "prob_1"]].to_numpy()
        np.testing.assert_allclose(probs, expected, atol=1e-6)
        assert table["pred"].astype(str).tolist() == [str(i) for i in expected.argmax(1)]


def _one_line_error(result, *needles):
    code, out, err = result
    assert out == ""
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("ebslab: error:"), err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_bad_inputs_are_one_line_exit_2_and_write_nothing(runs, tmp_path):
    import shutil

    run_dir, export_dir = runs[("tiny-bert", "cls")]
    good = tmp_path / "in.csv"
    pd.DataFrame({"review": ["x"], "stars": [1]}).to_csv(good, index=False)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "notrun").mkdir()
    no_best = tmp_path / "no-best"
    shutil.copytree(run_dir, no_best)
    shutil.rmtree(no_best / "checkpoints" / "best")
    out = tmp_path / "out.parquet"

    _one_line_error(cli("predict", tmp_path / "notrun", good), "not an ebslab run folder")
    _one_line_error(cli("predict", no_best, good, "--text-column", "review", "--out", out),
                    "no 'best' checkpoint", "--checkpoint last")
    _one_line_error(cli("predict", run_dir, good, "--out", out), "no text column 'text'", "review, stars",
                    "--text-column")
    _one_line_error(cli("predict", run_dir, tmp_path / "empty.txt", "--out", out), "is empty")
    _one_line_error(cli("predict", run_dir, good, "--out", tmp_path / "out.xlsx"), ".csv, .parquet, .jsonl")
    _one_line_error(cli("predict", run_dir, good, "model.pooling=mean"), "cannot be changed at prediction time")
    _one_line_error(cli("export", tmp_path / "notrun", "--out", tmp_path / "e"), "not an ebslab run folder")
    _one_line_error(cli("export", no_best, "--out", tmp_path / "e"), "no 'best' checkpoint")
    before = (export_dir / "model.safetensors").stat().st_mtime_ns
    _one_line_error(cli("export", run_dir, "--out", export_dir), "already exists", "--overwrite")
    assert (export_dir / "model.safetensors").stat().st_mtime_ns == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt", "in.csv", "no-best", "notrun"]

    code, _, err = cli("export", run_dir, "--out", export_dir, "--overwrite")
    assert code == 0, err
    assert (export_dir / "model.safetensors").stat().st_mtime_ns != before
    assert not any(p.name.startswith(f".{export_dir.name}") for p in export_dir.parent.iterdir())


@pytest.mark.slow  # torch.onnx's exporter takes ~10-30 s per model on a CPU
@pytest.mark.parametrize("model", MODELS)
def test_onnx_export_matches_pytorch(runs, model, tmp_path):
    pytest.importorskip("onnxruntime")
    import onnxruntime

    from ebslab.serving.predict import load_run, predict_texts

    run_dir, _ = runs[(model, "mean")]
    code, _, err = cli("export", run_dir, "--out", tmp_path / "onnx", "--onnx")
    assert code == 0, err
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "onnx")
    inputs = json.loads((tmp_path / "onnx" / "config.json").read_text())["ebslab_model_inputs"]
    session = onnxruntime.InferenceSession(str(tmp_path / "onnx" / "model.onnx"))
    encoded = tokenizer(TEXTS, truncation=True, padding=True, return_tensors="np")
    feed = {k: (encoded[k] if k in encoded else np.zeros_like(encoded["input_ids"])).astype(np.int64) for k in inputs}
    logits = session.run(None, feed)[0]
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    expected = predict_texts(load_run(run_dir, "best"), TEXTS, progress=False)
    assert np.abs(probs - expected).max() <= 1e-4


# ------------------------------------------------------------------------------------------------ publishing safely


def test_a_txt_input_is_one_text_per_newline_only(runs, tmp_path):
    """U+2028, form feeds and record separators inside a line stay in its text (str.splitlines split them)."""
    from ebslab.serving.predict import read_input

    lines = ["first\u2028still the first", "second\x0cwith a form feed", "third\x1e\x1c\x1d\x85end", "fourth"]
    (tmp_path / "in.txt").write_bytes(("\r\n".join(lines[:2]) + "\n" + "\n".join(lines[2:]) + "\n").encode())
    assert read_input(str(tmp_path / "in.txt"), "text")["text"].tolist() == lines
    run_dir, _ = runs[("tiny-bert", "cls")]
    code, out, err = cli("predict", run_dir, tmp_path / "in.txt", "--out", tmp_path / "out.jsonl")
    assert code == 0, err
    assert pd.read_json(tmp_path / "out.jsonl", lines=True)["text"].tolist() == lines  # row i = line i
    code, out, err = cli("predict", run_dir, "-", stdin="\n".join(lines))
    assert code == 0 and len(pd.read_csv(io.StringIO(out))) == len(lines), err


def test_nothing_is_overwritten_without_overwrite_and_nothing_written_into_a_run_folder(runs, tmp_path):
    import hashlib

    run_dir, export_dir = runs[("tiny-bert", "cls")]

    def digest(folder):
        return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}

    before = digest(run_dir)
    texts = tmp_path / "in.csv"
    pd.DataFrame({"text": TEXTS}).to_csv(texts, index=False)
    original = texts.read_bytes()
    existing = tmp_path / "old.csv"
    existing.write_text("keep me\n")
    _one_line_error(cli("predict", run_dir, texts, "--out", existing), "already exists", "--overwrite")
    assert existing.read_text() == "keep me\n"
    for overwrite in ([], ["--overwrite"]):
        _one_line_error(cli("predict", run_dir, texts, "--out", texts, *overwrite), "is the input file")
        for inside in (run_dir / "predictions" / "test_best.parquet", run_dir / "new.csv"):
            _one_line_error(cli("predict", run_dir, texts, "--out", inside, *overwrite),
                            f"is inside the run folder '{run_dir.resolve()}'")
        _one_line_error(cli("export", run_dir, "--out", run_dir / "checkpoints" / "last", *overwrite),
                        "is inside the run folder")
        _one_line_error(cli("export", run_dir, "--out", run_dir, *overwrite), "is inside the run folder")
    assert texts.read_bytes() == original and digest(run_dir) == before  # the run can still resume and report
    code, _, err = cli("predict", run_dir, texts, "--out", existing, "--overwrite")
    assert code == 0 and len(pd.read_csv(existing)) == len(TEXTS), err

    # a folder is an export by its own marker, not by config.json (which a checkpoint also has)
    lookalike = tmp_path / "lookalike"
    lookalike.mkdir()
    (lookalike / "config.json").write_text("{}")
    _one_line_error(cli("export", run_dir, "--out", lookalike, "--overwrite"), "not an ebslab export",
                    "ebslab_export.json")
    assert sorted(p.name for p in lookalike.iterdir()) == ["config.json"]
    assert (export_dir / "ebslab_export.json").is_file()


def test_export_creates_missing_parent_folders_and_says_so(runs, tmp_path):
    from ebslab.cli import build_parser

    run_dir, _ = runs[("tiny-bert", "cls")]
    out = tmp_path / "exports" / "nested" / "demo"
    code, _, err = cli("export", run_dir, "--out", out)
    assert code == 0, err
    assert (out / "ebslab_export.json").is_file()
    help_text = " ".join(build_parser()._subparsers._group_actions[0].choices["export"].format_help().split())
    assert "missing parent folders are created" in help_text


def test_an_export_is_safe_to_publish(runs, tmp_path):
    run_dir, export_dir = runs[("tiny-bert", "cls")]
    old = os.umask(0o022)
    try:
        code, _, err = cli("export", run_dir, "--out", tmp_path / "pub")
    finally:
        os.umask(old)
    assert code == 0, err
    pub = tmp_path / "pub"
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in pub.iterdir()}
    assert modes["model.safetensors"] == "0o644" and set(modes.values()) == {"0o644"}, modes
    # no absolute local path in any file (ebslab_export.json's run, the card's out.dir / data.path / run folder)
    for f in pub.iterdir():
        if f.suffix in (".json", ".md", ".py", ".txt"):
            text = f.read_text()
            for local in (str(run_dir.resolve()), str(run_dir.parent.resolve()), str(tmp_path)):
                assert local not in text, (f.name, local)
    marker = json.loads((pub / "ebslab_export.json").read_text())
    assert marker["run"] == run_dir.name and "run_dir" not in marker
    card = " ".join((pub / "README.md").read_text().split())
    assert "`trust_remote_code=True` is needed" in card
    assert "Loading with it runs this folder's `modeling_ebslab.py` in your Python process" in card
    assert "an export you did not make yourself should be read first" in card
    assert "is not supported for text-classification" in card  # the stock warning, explained
    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    assert "runs the export's `modeling_ebslab.py`" in readme
