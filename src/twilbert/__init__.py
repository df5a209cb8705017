"""twilbert: pretrain and finetune BERT-like models for Spanish Twitter as a DVC + MLflow pipeline."""

__version__ = "0.1.0"
