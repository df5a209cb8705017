"""A finetuned classifier directory (TWilBert or Hugging Face encoder) back in memory, with its packer.

The model layer sits above ``twilbert.data``: a classifier comes back with the packer that feeds it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

from torch import nn

from twilbert.config import PreprocessConfig
from twilbert.data.packers import HFPacker, TWilBertPacker, hf_max_positions
from twilbert.data.preprocess import Preprocessor
from twilbert.data.tokenizer import Tokenizer
from twilbert.model.backbone import HF_DIR, PathLike, hf_classifier, twilbert_classifier
from twilbert.model.card import ModelCard
from twilbert.model.io import load_into, load_pretrained_state


def hf_packer(backbone: nn.Module, tokenizer: Any, preprocess: Preprocessor) -> HFPacker:
    return HFPacker(tokenizer, preprocess, hf_max_positions(backbone))


def load_classifier_module(directory: PathLike) -> tuple[nn.Module, Union[TWilBertPacker, HFPacker], ModelCard]:
    """(classifier in eval mode, its packer, model card) of a twilbert or hf finetuned model directory."""
    directory = Path(directory)
    card, state = load_pretrained_state(directory)
    head, n_out = card.require("head"), card.n_outputs
    if card.kind == "twilbert":
        model: nn.Module = twilbert_classifier(card, head, n_out)
        packer: Union[TWilBertPacker, HFPacker] = TWilBertPacker(Tokenizer(directory))
    elif card.kind == "hf":
        from transformers import AutoModel

        from twilbert.data.hf_checkpoint import load_hf_config_and_tokenizer

        hf_dir = directory / (card.hf_dir or HF_DIR)
        # A damaged hf/ would otherwise load a tokenizer of the special tokens alone and label every text alike
        config, tokenizer = load_hf_config_and_tokenizer(hf_dir, str(directory))
        encoder = AutoModel.from_config(config)
        model = hf_classifier(encoder, head, n_out)
        packer = HFPacker(tokenizer, Preprocessor(card.preprocess or PreprocessConfig()), card.max_positions)
    else:
        raise ValueError(f"{directory}: backbone {card.kind!r} is not a neural classifier "
                         "(load it with twilbert.model.baseline)")
    load_into(model, state, strict=True)
    return model.eval(), packer, card
