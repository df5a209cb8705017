"""twilbert: pretrain and finetune BERT-like models for Spanish Twitter as a DVC + MLflow pipeline.

``from twilbert import load_classifier`` is the Python API (see twilbert.inference.classifier); it is imported
on first use, so that ``import twilbert`` (and ``twilbert compose``) does not pay for torch.
"""

__version__ = "0.1.0"

_LAZY = {"load_classifier": "twilbert.inference.classifier", "Classifier": "twilbert.inference.classifier",
         "Prediction": "twilbert.inference.classifier"}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'twilbert' has no attribute {name!r}")
