"""GPU paths that can be pinned on a CPU: the attention-mask form, precision resolution, DDP options, device
checks, honest throughput, the host-read count. (`make gpu-check` runs the rest on a GPU.)"""

import json
import time

import pytest
import torch

from conftest import read_jsonl


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-roberta", "tiny-modernbert"])
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_sdpa_mask_form_gives_the_2d_mask_logits(name, pooling):
    from ebslab.core.config import ModelConfig
    from ebslab.inputs.models import build_model, load_tokenizer

    tokenizer = load_tokenizer(name)
    bundle = build_model(ModelConfig(name=name, pooling=pooling, dropout=0, encoder_dropout=0), 2, 1, tokenizer)
    model = bundle.model.eval()
    ids = torch.randint(1000, 2000, (3, 40))
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0
    mask[2, 3:] = 0  # shorter than ModernBERT's tiny sliding window and longer: both layer kinds padded
    converted = model.encoder_mask(mask)
    if name == "tiny-modernbert":
        assert set(converted) == {"full_attention", "sliding_attention"}
        assert converted["sliding_attention"].shape == (3, 1, 40, 40)
    else:
        assert converted.shape == (3, 1, 1, 40) and converted.dtype == torch.bool
    with torch.no_grad():
        fast = model(input_ids=ids, attention_mask=mask)  # the forward converts the mask
        model.encoder_mask = lambda m: m  # the 2-D mask transformers checks on the host
        reference = model(input_ids=ids, attention_mask=mask)
    assert torch.allclose(fast, reference, atol=1e-6), (fast - reference).abs().max()


def test_eager_attention_keeps_the_2d_mask_and_startup_names_the_kernel(train_run, capsys):
    from ebslab.core.config import ModelConfig
    from ebslab.inputs.models import build_model, load_tokenizer

    bundle = build_model(ModelConfig(name="tiny-bert", attn_implementation="eager"), 2, 1, load_tokenizer("tiny-bert"))
    mask = torch.ones(2, 5, dtype=torch.long)
    assert bundle.model.encoder_mask(mask) is mask
    assert bundle.model.encoder.config._attn_implementation == "eager"
    train_run("model.attn_implementation=eager", "train.max_steps=1")
    out = capsys.readouterr().out
    assert "precision fp32 (train.precision=auto), attention eager" in out


def test_bad_attn_implementation_is_a_user_error(train_run, capsys):
    train_run("model.attn_implementation=flash", expect=2)
    assert "model.attn_implementation" in capsys.readouterr().err


def test_precision_auto_is_fp32_on_cpu_and_bf16_refused(monkeypatch):
    from ebslab.loop.backends import resolve_precision
    from ebslab.core.errors import UserError

    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    with pytest.raises(UserError, match="train.precision=bf16 is refused on CPU"):
        resolve_precision("bf16", torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", torch.device("cuda", 0)) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    matmul = []
    monkeypatch.setattr(torch, "set_float32_matmul_precision", matmul.append)
    assert resolve_precision("auto", torch.device("cuda", 0)) == "fp32"
    assert matmul == ["high"]  # fp32 on a GPU: TF32 matmuls
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32" and matmul == ["high"]


def test_encoder_weights_load_in_fp32_from_a_bf16_checkpoint(tmp_path):
    from transformers import AutoModel

    from ebslab.core.config import ModelConfig
    from ebslab.inputs.models import tiny_config, load_encoder

    bf16 = AutoModel.from_config(tiny_config("tiny-bert", 3000), add_pooling_layer=False).to(torch.bfloat16)
    bf16.save_pretrained(tmp_path)
    encoder = load_encoder(ModelConfig(name=str(tmp_path)), 3000)
    assert {p.dtype for p in encoder.parameters()} == {torch.float32}


def test_ddp_options_search_unused_parameters_only_for_a_pooler():
    from transformers import AutoModel

    from ebslab.loop.backends import ddp_options
    from ebslab.core.config import ModelConfig
    from ebslab.inputs.models import EncoderClassifier, tiny_config, build_model, load_tokenizer

    bundle = build_model(ModelConfig(name="tiny-bert"), 2, 1, load_tokenizer("tiny-bert"))
    assert bundle.model.unused_parameter_names() == []
    assert ddp_options(bundle.model) == {"find_unused_parameters": False, "gradient_as_bucket_view": True,
                                         "broadcast_buffers": False}
    with_pooler = EncoderClassifier(AutoModel.from_config(tiny_config("tiny-bert", 3000)), 2, "cls", 0,
                                    ("input_ids", "attention_mask"))
    assert with_pooler.unused_parameter_names() == ["encoder.pooler.dense.weight", "encoder.pooler.dense.bias"]
    assert ddp_options(with_pooler)["find_unused_parameters"] is True


def test_cuda_n_with_several_processes_is_refused_before_any_work(train_run, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    train_run("train.device=cuda:1", expect=2)
    err = capsys.readouterr().err
    assert "train.device=cuda:1 with 2 processes would put every process on one GPU" in err


def test_rng_state_holds_the_current_cuda_device_only(monkeypatch):
    from ebslab.loop import checkpoint as ckpt

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: calls.append("get") or torch.zeros(3, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s: calls.append(("set", s.shape)))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("every device's state was saved"))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda s: pytest.fail("every device's state was set"))
    state = ckpt.rng_state()
    ckpt.set_rng_state(state)
    assert calls == ["get", ("set", (3,))]


def test_throughput_counts_the_wait_for_the_device(train_run, monkeypatch):
    """A slow device step shows up as a slow host read: the rate must be samples over that wall time."""
    import ebslab.loop.train as loop

    delay, real = 0.25, loop._to_host
    monkeypatch.setattr(loop, "_to_host", lambda t: time.sleep(delay) or real(t))
    started = time.perf_counter()
    run = train_run("data.limit=130", "train.max_steps=4", "batch.effective=8", "batch.micro=8")
    wall = time.perf_counter() - started
    summary = json.loads((run / "summary.json").read_text())
    steps = [r for r in read_jsonl(run / "metrics.jsonl") if r["event"] == "step"]
    assert len(steps) == 4 and summary["samples"] == 32
    assert 4 * delay <= summary["train_time_s"] < wall  # every read waited; evaluation is not in it
    assert summary["train_samples_per_s"] == pytest.approx(32 / summary["train_time_s"], rel=1e-3)
    assert steps[-1]["samples_per_s"] <= 32 / (4 * delay)


def test_grad_norm_comes_with_the_one_host_read(train_run, monkeypatch):
    import ebslab.loop.train as loop

    reads, real = [], loop._to_host
    monkeypatch.setattr(loop, "_to_host", lambda t: reads.append(1) or real(t))
    run = train_run("train.max_steps=3", "train.log_every_steps=1", "optim.clip_norm=1.0")
    steps = [r for r in read_jsonl(run / "metrics.jsonl") if r["event"] == "step"]
    assert len(reads) == 3 and all(isinstance(r["grad_norm"], float) and r["grad_norm"] > 0 for r in steps)


def test_mfu_uses_the_spec_peak_of_the_named_gpu(monkeypatch):
    from ebslab.tools import bench

    assert bench.spec_peak("NVIDIA H200") == 989e12
    assert bench.spec_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert bench.spec_peak("NVIDIA H100 PCIe") == 756e12
    assert bench.spec_peak("NVIDIA A100-SXM4-80GB") == 312e12
    assert bench.spec_peak("NVIDIA L40S") == 362e12 and bench.spec_peak("NVIDIA L4") == 121e12
    assert bench.spec_peak("Some Future GPU") is None
    monkeypatch.setattr(bench, "device", lambda: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(bench, "matmul_peak", lambda *a, **k: pytest.fail("measured although the GPU is known"))
    assert bench.device_peak(2048) == (989e12, "NVIDIA H100 80GB HBM3 dense bf16 spec peak")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Some Future GPU")
    monkeypatch.setattr(bench, "matmul_peak", lambda *a, **k: 5e14)
    assert bench.device_peak(2048) == (5e14, "measured bf16 2048^2 matmul, best of 8")
    # 6 x 110M params x 100k real tokens/s against the measured 5e14
    assert bench.peak_fraction(6 * 1.1e13, bench.device_peak(2048)[0]) == pytest.approx(6 * 1.1e13 / 5e14)


def test_auto_micro_treats_cublas_alloc_failure_and_missing_headroom_as_out_of_memory(capsys):
    from ebslab.loop import autobatch
    from ebslab.core.config import load_config

    cfg = load_config({"batch": {"effective": 64, "micro": "auto"}, "data": {"max_length": 512}})
    gib = 2 ** 30
    seen = []

    def probe(micro):  # a simulated 80 GiB device, 1.5 GiB per example; 48 fits only without headroom
        seen.append(micro)
        if micro == 64:
            raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")
        autobatch.check_headroom(int(1.5 * gib * micro), 80 * gib)

    assert autobatch.largest_micro(cfg, 1, probe=probe) == 32
    assert seen == [64, 32]  # divisors of 64: 64 (cuBLAS), 32 = 48 GiB < 85% of 80
    autobatch.check_headroom(int(0.85 * 80 * gib), 80 * gib)
    with pytest.raises(autobatch.ProbeOutOfMemory, match="more than 85%"):
        autobatch.check_headroom(int(0.86 * 80 * gib), 80 * gib)
    with pytest.raises(ValueError, match="bad value"):  # any other error is a real one
        autobatch.largest_micro(cfg, 1, probe=lambda m: (_ for _ in ()).throw(ValueError("bad value")))


def test_auto_micro_every_rank_takes_the_smallest(monkeypatch, capsys):
    import torch.distributed as dist

    from ebslab.loop import autobatch
    from ebslab.core.config import load_config

    other_rank = 4  # the peer's GPU had less free memory
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda *a: "gloo")
    monkeypatch.setattr(dist, "all_reduce", lambda t, op: t.clamp_(max=other_rank) if op == dist.ReduceOp.MIN
                        else pytest.fail("not a min"))
    cfg = load_config({"batch": {"effective": 64, "micro": "auto"}, "data": {"max_length": 128}})
    assert autobatch.largest_micro(cfg, 2, probe=lambda m: None) == 4
    assert autobatch.agree_on_smallest(16, 1) == 16  # one process: no collective


def test_gpu_check_refuses_without_cuda_in_one_line(capsys, monkeypatch):
    from ebslab.tools import gpucheck

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpucheck, "run_checks", lambda *a: pytest.fail("checks ran without CUDA"))
    assert gpucheck.main([]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "make gpu-check needs a CUDA GPU" in err


def test_gpu_check_table_and_throughput_verdicts():
    from ebslab.tools.gpucheck import Row, Syncs, table, throughput_row

    done = {"status": "completed", "samples": 1280, "train_samples_per_s": 1000.0}
    syncs = Syncs(steps=40, reads=1, training=1, evaluations=1, in_evaluation=2, in_checkpoint=300)
    honest = throughput_row("bert bf16 L128", done, 1.25, syncs)  # 1280 / 1.25 s = 1024 wall: within 15%
    assert honest.ok and honest.result == ("1000 samples/s logged, 1024 wall, host syncs 303: 1 in 40 steps "
                                           "(0.03/step, 1 reads), 2 per evaluation, 300 in checkpoints")
    assert throughput_row("x", {**done, "train_samples_per_s": 3000.0}, 1.25, None).ok is False  # queue time only
    per_step = Syncs(steps=40, reads=1, training=40)  # a host sync inside every step
    assert throughput_row("x", done, 1.25, per_step).ok is False
    assert throughput_row("x", done, 1.25, Syncs(steps=40, reads=1, training=2)).ok  # + the noise scale's read
    assert throughput_row("x", {**done, "status": "failed"}, 1.25, None).ok is False
    text = table([honest, Row("SIGTERM + resume", "exit 143 then 0, 160 steps", False), Row("m", "3", None)])
    lines = text.splitlines()
    # tabulate pads every column to its widest cell, a header counting two more
    assert lines[0].startswith("| check") and lines[2] == f"| {'bert bf16 L128':<16} | {honest.result} | {'ok':<9} |"
    assert lines[3].endswith(f"| {'FAIL':<9} |") and lines[4].endswith(f"| {'-':<9} |")
    assert lines[-1] == "3 checks, 1 failed"


def test_gpu_check_counts_host_syncs_over_the_whole_run(tmp_path, monkeypatch):
    """On a CPU, every host read of a tensor warns as CUDA's sync debug mode does: the check counts them from the
    fit's start to its summary, evaluations included (it used to stop at the first evaluation), by phase."""
    import warnings

    from conftest import TINY
    from ebslab.tools import gpucheck

    modes = []
    monkeypatch.setattr(gpucheck, "set_sync_debug_mode", modes.append)
    for name in ("tolist", "numpy", "item"):
        real = getattr(torch.Tensor, name)

        def reading(self, *a, _real=real, **k):
            warnings.warn("called a synchronizing CUDA operation", UserWarning)
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, reading)
    overrides = [*TINY, "train.max_steps=6", "train.log_every_steps=3", "train.gns=false", f"out.dir={tmp_path}",
                 "out.name=run"]
    summary, wall, syncs = gpucheck._train_in_process(overrides, count_syncs=True)
    assert summary["status"] in ("completed", "collapsed") and wall > 0
    assert modes == ["warn", 0]
    # reads at steps 3 and 6, one evaluation at step 6 (val and test: one copy of the scores each)
    assert (syncs.steps, syncs.reads, syncs.training, syncs.evaluations, syncs.in_evaluation) == (6, 2, 2, 1, 2)
    assert syncs.ok and syncs.total == syncs.training + syncs.in_evaluation + syncs.in_checkpoint


def test_sync_phase_by_the_stack():
    import sys

    from ebslab.tools.gpucheck import sync_phase

    assert sync_phase(sys._getframe()) == "training"

    def save_last():
        return sync_phase(sys._getframe())

    assert save_last() == "checkpoint"
