"""The baselines of `ebslab bench`: HF Trainer with settings equal to ebslab's, the way its docs teach, and the
naive hand-written loop; each timed by the bench's one step clock (tools.bench_rules)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ebslab.tools.bench_rules import Settings, StepClock, StepData, device


def hf_classifier(name: str, num_labels: int = 2) -> Any:
    """The model the HF way: AutoModelForSequenceClassification (tiny models built from ebslab's configs)."""
    from transformers import AutoModelForSequenceClassification

    from ebslab.inputs.models import TINY_MODELS, tiny_config, load_tokenizer, minilm_path

    if name in TINY_MODELS:
        torch.manual_seed(0)
        config = tiny_config(name, len(load_tokenizer(name)))
        config.num_labels = num_labels
        return AutoModelForSequenceClassification.from_config(config)
    source = minilm_path() if name == "minilm" else name
    return AutoModelForSequenceClassification.from_pretrained(source, num_labels=num_labels)


def trainer_clock(clock: StepClock) -> Any:
    """A TrainerCallback that hands each optimizer step's end to `clock`."""
    from transformers import TrainerCallback

    class Callback(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            clock.step_end()

    return Callback()


def hf_args(s: Settings, out_dir: Path, **extra: Any) -> Any:
    from transformers import TrainingArguments

    gpu = device().type == "cuda"
    kwargs = dict(output_dir=str(out_dir), per_device_train_batch_size=s.micro,
                  gradient_accumulation_steps=s.effective // s.micro, learning_rate=s.lr, weight_decay=0.0,
                  lr_scheduler_type="linear", max_grad_norm=1.0, seed=s.seed, use_cpu=not gpu, bf16=gpu,
                  report_to="none", disable_tqdm=True, dataloader_num_workers=0)
    kwargs.update(extra)
    return TrainingArguments(**kwargs)


def run_trainer(s: Settings, data: StepData, tokenizer: Any, out_dir: Path) -> StepClock:
    """HF Trainer, equal settings, ebslab's windows (sequential sampler over the same ordered examples)."""
    import datasets
    from transformers import DataCollatorWithPadding, Trainer

    ds = datasets.Dataset.from_dict({"input_ids": data.input_ids, "labels": data.labels.tolist()})
    clock = StepClock(s.steps)
    args = hf_args(s, out_dir, max_steps=s.steps, save_strategy="no", eval_strategy="no",
                   logging_strategy="no", train_sampling_strategy="sequential")
    trainer = Trainer(model=hf_classifier(s.model), args=args, train_dataset=ds,
                      data_collator=DataCollatorWithPadding(tokenizer), callbacks=[trainer_clock(clock)])
    trainer.train()
    return clock


def run_naive(s: Settings, data: StepData, tokenizer: Any, max_length: int) -> StepClock:
    """The users' loop: tokenize each micro-batch padded to max_length, default AdamW, mean loss / accum_steps,
    `.item()` after every micro-step."""
    from transformers import get_linear_schedule_with_warmup

    dev = device()
    model = hf_classifier(s.model).to(dev)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr)
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, s.steps)
    accum = s.effective // s.micro
    clock, running = StepClock(s.steps), 0.0
    for k in range(s.steps):
        for j in range(accum):
            lo = k * s.effective + j * s.micro
            enc = tokenizer(data.texts[lo:lo + s.micro], padding="max_length", truncation=True,
                            max_length=max_length, return_tensors="pt")
            labels = torch.tensor(data.labels[lo:lo + s.micro])
            out = model(**{k2: v.to(dev) for k2, v in enc.items()}, labels=labels.to(dev))
            loss = out.loss / accum
            loss.backward()
            running += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        clock.step_end()
    return clock


def experiment_trainer(s: Settings, files: dict[str, str], out_dir: Path, hf_cache: Path) -> dict[str, Any]:
    """HF's text-classification recipe: load_dataset + map(tokenize), Trainer with eval/save per epoch,
    load_best_model_at_end, then evaluate on test."""
    import datasets
    from transformers import AutoTokenizer, DataCollatorWithPadding, Trainer

    from ebslab.inputs.models import tokenizer_source

    ds = datasets.load_dataset("parquet", data_files=files, cache_dir=str(hf_cache))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source(s.model))

    def tokenize(batch: dict) -> dict:
        return tokenizer(batch["text"], truncation=True, max_length=s.experiment_length)

    ds = ds.map(tokenize, batched=True)

    def accuracy(pred: Any) -> dict[str, float]:
        return {"accuracy": float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())}

    args = hf_args(s, out_dir, num_train_epochs=s.experiment_epochs, per_device_eval_batch_size=s.micro,
                   eval_strategy="epoch", save_strategy="epoch", logging_strategy="epoch",
                   load_best_model_at_end=True, metric_for_best_model="validation_accuracy",
                   save_total_limit=1)
    trainer = Trainer(model=hf_classifier(s.model), args=args, train_dataset=ds["train"],
                      eval_dataset={"validation": ds["validation"], "test": ds["test"]},
                      processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer),
                      compute_metrics=accuracy)
    trainer.train()
    metrics = trainer.evaluate(ds["test"], metric_key_prefix="test")
    return {"test_acc": metrics["test_accuracy"]}
