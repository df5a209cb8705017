"""twilbert's classification head on a Hugging Face ALBERT/BERT encoder, for heads that HF's own
``*ForSequenceClassification`` (a tanh pooler on [CLS], then one linear layer) cannot compute: the
average over the tokens (``finetuning.collapse_mode: avg``, the default) and gelu hidden layers
(``finetuning.n_hidden > 0``).

`twilbert export-hf` copies this file verbatim into the exported directory as ``modeling_twilbert.py``
and names its classes in ``config.json``'s ``auto_map``, so that
``AutoModelForSequenceClassification.from_pretrained(dir, trust_remote_code=True)`` (or
``pipeline(..., trust_remote_code=True)``) builds it from the directory alone. It therefore imports
torch and transformers only, never twilbert. The head's parameters carry the names of twilbert's
``ClassificationHead`` (``classifier.hidden.<i>``, ``classifier.out``), its settings are
``config.twilbert_head``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AlbertModel, AlbertPreTrainedModel, BertModel, BertPreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

MODULE_NAME = "modeling_twilbert"  # the file's name inside an export


class TWilBertHead(nn.Module):
    """Pool ('avg' over the tokens that count, or 'cls'), n_hidden x (Linear, gelu), Linear.

    ``config.twilbert_head``: ``collapse_mode``, ``use_special_tokens`` (count [CLS]/[SEP] in the
    average), ``special_ids`` (the ids that are [CLS]/[SEP]), ``n_hidden``, ``hidden_size``, ``dropout``.
    """

    def __init__(self, config):
        super().__init__()
        head = config.twilbert_head
        self.collapse_mode = head["collapse_mode"]
        self.use_special_tokens = head["use_special_tokens"]
        self.special_ids = tuple(head["special_ids"])
        self.dropout = nn.Dropout(head["dropout"])
        widths = [config.hidden_size] + [head["hidden_size"]] * head["n_hidden"]
        self.hidden = nn.ModuleList([nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:])])
        self.out = nn.Linear(widths[-1], config.num_labels)

    def forward(self, hidden: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """hidden (B, T, H) -> logits (B, num_labels)."""
        if self.collapse_mode == "cls":
            pooled = hidden[:, 0]
        else:
            keep = attention_mask.bool()  # (B, T)
            if not self.use_special_tokens:
                keep = keep & ~torch.isin(input_ids, torch.tensor(self.special_ids, device=input_ids.device))
            weights = keep.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
            # clamp: a text of only special tokens pools to zeros instead of NaN, as in twilbert
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        h = self.dropout(pooled)
        for layer in self.hidden:
            h = self.dropout(F.gelu(layer(h)))
        return self.out(h)


def _loss(config, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Hugging Face's loss for ``config.problem_type`` (what its own classifiers compute)."""
    if config.problem_type == "regression":
        return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype).view(-1)) if config.num_labels == 1 else \
            F.mse_loss(logits, labels.to(logits.dtype))
    if config.problem_type == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
    return F.cross_entropy(logits.view(-1, config.num_labels), labels.view(-1))


def _classify(model, encoder: nn.Module, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
              token_type_ids: Optional[torch.Tensor], labels: Optional[torch.Tensor], **kwargs) -> SequenceClassifierOutput:
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    kwargs.pop("return_dict", None)  # the encoder's output is read by name below
    out = encoder(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                  return_dict=True, **kwargs)
    logits = model.classifier(out.last_hidden_state, input_ids, attention_mask)
    loss = _loss(model.config, logits, labels) if labels is not None else None
    return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                    attentions=out.attentions)


class TWilBertAlbertForSequenceClassification(AlbertPreTrainedModel):
    """``AlbertModel`` (no pooler) + :class:`TWilBertHead`."""

    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.albert = AlbertModel(config, add_pooling_layer=False)
        self.classifier = TWilBertHead(config)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, **kwargs):
        return _classify(self, self.albert, input_ids, attention_mask, token_type_ids, labels, **kwargs)


class TWilBertBertForSequenceClassification(BertPreTrainedModel):
    """``BertModel`` (no pooler) + :class:`TWilBertHead`."""

    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertModel(config, add_pooling_layer=False)
        self.classifier = TWilBertHead(config)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, **kwargs):
        return _classify(self, self.bert, input_ids, attention_mask, token_type_ids, labels, **kwargs)
