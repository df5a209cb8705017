"""The TWilBert model: encoder, product-key memory, heads, model directories, Hugging Face export and
import, finetuned classifiers back in memory, and the TF-IDF baseline model."""

from twilbert.model.card import HeadConfig, ModelCard, read_card
from twilbert.model.encoder import (
    TWilBertAttention,
    TWilBertEmbeddings,
    TWilBertLayer,
    TWilBertModel,
    TWilBertTransformer,
    init_weights,
)
from twilbert.model.heads import (
    ClassificationHead,
    PretrainOutput,
    TWilBertForClassification,
    TWilBertForPretraining,
    TWilBertMLMHead,
    TWilBertROPHead,
    count_parameters,
)
from twilbert.model.hf import ExportError, save_hf, to_hf
from twilbert.model.io import (
    CheckpointError,
    LoadReport,
    load_into,
    load_pretrained_state,
    save_pretrained,
)
from twilbert.model.pkm import ProductKeyMemory

__all__ = [
    "CheckpointError",
    "ClassificationHead",
    "ExportError",
    "HeadConfig",
    "LoadReport",
    "ModelCard",
    "PretrainOutput",
    "ProductKeyMemory",
    "TWilBertAttention",
    "TWilBertEmbeddings",
    "TWilBertForClassification",
    "TWilBertForPretraining",
    "TWilBertLayer",
    "TWilBertMLMHead",
    "TWilBertModel",
    "TWilBertROPHead",
    "TWilBertTransformer",
    "count_parameters",
    "init_weights",
    "load_into",
    "load_pretrained_state",
    "read_card",
    "save_hf",
    "save_pretrained",
    "to_hf",
]
