"""Tiny masked-LM checkpoints of three Hugging Face families, built here: no hub, no network.

Each has a tokenizer trained with the ``tokenizers`` library on generated tweets (WordPiece for BERT,
byte-level BPE for RoBERTa, Unigram for ALBERT) and is written with ``save_pretrained``, as a user's
downloaded BETO, RoBERTuito or ALBERT folder would be.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from helpers import WORDS, make_tweets

FAMILIES = ("bert", "roberta", "albert")
HIDDEN = 32


def tokenizer_corpus() -> list[str]:
    return [t for t, _ in make_tweets(300, seed=3)] + [" ".join(WORDS)]


def _bert(corpus):
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    backend = Backend(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.train_from_iterator(corpus, trainers.WordPieceTrainer(vocab_size=300, special_tokens=specials))
    cls, sep = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tokenizer = BertTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
                                  cls_token="[CLS]", mask_token="[MASK]")
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id)
    return tokenizer, BertForMaskedLM(config)


def _roberta(corpus):
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers
    from transformers import RobertaConfig, RobertaForMaskedLM, RobertaTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=500, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    backend.post_processor = processors.RobertaProcessing(("</s>", backend.token_to_id("</s>")),
                                                          ("<s>", backend.token_to_id("<s>")))
    tokenizer = RobertaTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                                     cls_token="<s>", pad_token="<pad>", unk_token="<unk>", mask_token="<mask>")
    # RoBERTuito's shape: positions counted from padding_idx + 1 (here 2), one token type
    config = RobertaConfig(vocab_size=len(tokenizer), hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=66, type_vocab_size=1,
                           pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id,
                           eos_token_id=tokenizer.sep_token_id)
    return tokenizer, RobertaForMaskedLM(config)


def _albert(corpus):
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, normalizers, pre_tokenizers, trainers
    from transformers import AlbertConfig, AlbertForMaskedLM, AlbertTokenizer

    specials = ["<pad>", "<unk>", "[CLS]", "[SEP]", "[MASK]"]
    backend = Backend(models.Unigram())
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.train_from_iterator(corpus, trainers.UnigramTrainer(vocab_size=300, special_tokens=specials,
                                                                unk_token="<unk>"))
    # ALBERT's own tokenizer class around the trained pieces, as a downloaded ALBERT folder holds it
    pieces = [(piece, score) for piece, score in json.loads(backend.to_str())["model"]["vocab"]]
    tokenizer = AlbertTokenizer(vocab=pieces)
    config = AlbertConfig(vocab_size=len(tokenizer), embedding_size=16, hidden_size=HIDDEN, num_hidden_layers=2,
                          num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                          pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id,
                          eos_token_id=tokenizer.sep_token_id)
    return tokenizer, AlbertForMaskedLM(config)


def make_mlm_checkpoint(directory: Path, family: str, seed: int = 0) -> Path:
    """``directory``: a ``save_pretrained`` masked-LM checkpoint of ``family`` with its tokenizer."""
    build = {"bert": _bert, "roberta": _roberta, "albert": _albert}[family]
    torch.manual_seed(seed)
    tokenizer, model = build(tokenizer_corpus())
    directory = Path(directory)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
