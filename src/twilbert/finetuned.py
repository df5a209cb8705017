"""A finetuned classifier directory (TWilBert or Hugging Face encoder) back in memory, with its packer.

Here models (``twilbert.model``) meet tokenizers (``twilbert.data``), so that neither depends on the other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

from torch import nn

from twilbert.config import ModelConfig, from_dict
from twilbert.data.packers import HFPacker, TWilBertPacker
from twilbert.data.preprocess import PreprocessConfig, Preprocessor
from twilbert.data.tokenizer import Tokenizer
from twilbert.model.backbone import HF_DIR, HFClassifier, PathLike, hf_max_positions
from twilbert.model.heads import TWilBertForClassification
from twilbert.model.io import load_into, load_pretrained_state


def hf_packer(backbone: nn.Module, tokenizer: Any, preprocess: Preprocessor) -> HFPacker:
    return HFPacker(tokenizer, preprocess, hf_max_positions(backbone))


def n_outputs_of(task: dict) -> int:
    spec = task["task"]
    return 1 if spec["regression"] else len(spec["categories"])


def _head_kwargs(config: dict) -> dict:
    head = config["head"]
    return dict(
        collapse_mode=head["collapse_mode"], use_special_tokens=head["use_special_tokens"],
        dropout=head["dropout"], n_hidden=head["n_hidden"],
    )


def load_classifier(directory: PathLike) -> tuple[nn.Module, Union[TWilBertPacker, HFPacker], dict]:
    """(classifier in eval mode, its packer, config.json) of a twilbert or hf finetuned model directory."""
    directory = Path(directory)
    config, state = load_pretrained_state(directory)
    backbone = config.get("backbone", "twilbert")
    n_out = n_outputs_of(config["task"])
    if backbone == "twilbert":
        model_cfg = from_dict(ModelConfig, config["model"], "model")
        model = TWilBertForClassification(
            model_cfg, config["vocab_size"], config["max_positions"], n_out,
            head_hidden_size=config["head"]["hidden_size"], **_head_kwargs(config),
        )
        packer: Union[TWilBertPacker, HFPacker] = TWilBertPacker(Tokenizer(directory))
    elif backbone == "hf":
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        hf_dir = directory / config.get("hf_dir", HF_DIR)
        encoder = AutoModel.from_config(AutoConfig.from_pretrained(hf_dir, local_files_only=True))
        model = HFClassifier(encoder, n_out, head_hidden_size=config["head"]["hidden_size"], **_head_kwargs(config))
        tokenizer = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
        preprocess = Preprocessor(PreprocessConfig.from_dict(config.get("preprocess")))
        packer = HFPacker(tokenizer, preprocess, config.get("max_positions"))
    else:
        raise ValueError(f"{directory}: backbone {backbone!r} is not a neural classifier (load it with twilbert.baseline)")
    load_into(model, state, strict=True)
    return model.eval(), packer, config
