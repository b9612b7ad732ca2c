"""ebslab's classifier as a Hugging Face model: encoder -> `cls` token or `mean` over real tokens -> dropout ->
linear. Copied by `ebslab export` into the export folder as modeling_ebslab.py and loaded from there with
`trust_remote_code=True`, so it imports only torch and transformers, never ebslab.

Why remote code: no stock `...ForSequenceClassification` head is this head. BERT's adds the pooler
(dense + tanh) before the linear layer, RoBERTa's a dense + tanh layer, ModernBERT's (even with
`classifier_pooling`) a dense + activation + norm layer; none reduces to dropout + linear on the raw pooled vector.

config.json is the encoder's own config (model_type bert / roberta / modernbert ...) plus:
  ebslab_pooling       "cls" or "mean"
  ebslab_head_dropout  dropout before the linear layer (inactive in eval mode)
  ebslab_model_inputs  the inputs the encoder was trained with (RoBERTa never sees token_type_ids)
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput


class EbslabForSequenceClassification(PreTrainedModel):
    config_class = PretrainedConfig
    base_model_prefix = "encoder"
    supports_gradient_checkpointing = False
    # attention is the encoder's own (eager or SDPA, as its class supports); the head adds none
    _supports_sdpa = True

    def __init__(self, config: PretrainedConfig):
        super().__init__(config)
        try:  # BERT-like encoders build a pooler that this head never uses
            self.encoder = AutoModel.from_config(config, add_pooling_layer=False)
        except TypeError:
            self.encoder = AutoModel.from_config(config)
        self.pooling = getattr(config, "ebslab_pooling", "cls")
        self.model_inputs = tuple(getattr(config, "ebslab_model_inputs", ("input_ids", "attention_mask")))
        self.dropout = nn.Dropout(getattr(config, "ebslab_head_dropout", 0.0))
        self.head = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # every weight comes from model.safetensors; a fresh model (from_config) gets the encoder's own init
        if hasattr(self, "encoder") and module is not self and hasattr(self.encoder, "_init_weights"):
            self.encoder._init_weights(module)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                return_dict: bool | None = None, **kwargs) -> SequenceClassifierOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        extra = {}
        if "token_type_ids" in self.model_inputs:
            extra["token_type_ids"] = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        if self.pooling == "mean":
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        else:
            pooled = hidden[:, 0]
        logits = self.head(self.dropout(pooled))
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits.float(), labels.view(-1))
        return SequenceClassifierOutput(loss=loss, logits=logits)
