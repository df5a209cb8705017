"""Small generated tasks and a tiny pretrained model for the finetuning tests."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Optional

import torch

from helpers import WORDS, make_tweets
from twilbert.config import ModelConfig, VocabConfig, load_config
from twilbert.data.tokenizer import Tokenizer, train_vocab
from twilbert.model import ModelCard, TWilBertForPretraining, save_pretrained
from twilbert.model.manifest import write_manifest

MAX_LEN = 12
EMOTIONS = ("alegria", "enfado", "miedo")
CUES = {"alegria": "feliz", "enfado": "odio", "miedo": "tráfico"}


def tiny_model_config(**overrides) -> ModelConfig:
    fields = dict(name="micro", embedding_size=8, hidden_size=16, n_encoders=2, n_heads=2, intermediate_size=32,
                  input_dropout=0.0, output_dropout=0.0)
    fields.update(overrides)
    cfg = ModelConfig(**fields)
    cfg.validate()
    return cfg


def make_pretrained(directory: Path, **model_overrides) -> Path:
    """A vocabulary and an untrained encoder saved the way the pretrain stage saves them."""
    vocab_dir = directory.parent / f"{directory.name}-vocab"
    texts = [t for t, _ in make_tweets(200, seed=3)]
    train_vocab(texts, vocab_dir, VocabConfig(vocab_size=120))
    tokenizer = Tokenizer(vocab_dir)
    cfg = tiny_model_config(**model_overrides)
    torch.manual_seed(0)
    model = TWilBertForPretraining(cfg, tokenizer.vocab_size, 2 * MAX_LEN + 3)
    save_pretrained(directory, model, ModelCard.pretrained(cfg, tokenizer.vocab_size, MAX_LEN))
    tokenizer.copy_to(directory)
    write_manifest(directory)  # as the pretrain stage seals models/pretrained
    return directory


def write_rows(path: Path, header: list[str], rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join("\t".join(r) for r in [header, *rows]) + "\n", encoding="utf-8")


def single_rows(n: int, seed: int, aux: bool = False) -> list[list[str]]:
    rows = []
    for i, (text, label) in enumerate(make_tweets(n, seed)):
        row = [f"{seed}-{i}", text, label]
        if aux:
            row.insert(2, " ".join(random.Random(seed * 1000 + i).choice(WORDS) for _ in range(4)))
        rows.append(row)
    return rows


def multi_label_rows(n: int, seed: int) -> list[list[str]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        flags = [rng.random() < 0.4 for _ in EMOTIONS]
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 8))]
        words += [CUES[e] for e, on in zip(EMOTIONS, flags) if on]
        rng.shuffle(words)
        rows.append([f"{seed}-{i}", " ".join(words), "|".join("1" if f else "0" for f in flags)])
    return rows


def regression_rows(n: int, seed: int) -> list[list[str]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        k = rng.randint(0, 3)
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 8))] + ["feliz"] * k
        rng.shuffle(words)
        rows.append([f"{seed}-{i}", " ".join(words), f"{k + rng.random() * 0.1:.3f}"])
    return rows


def write_task(directory: Path, kind: str = "single", sizes=(48, 16, 16), aux: bool = False,
               dev: bool = True, test: bool = True) -> dict:
    """Write train/dev/test TSVs of a generated task; return its params entry (``tasks.<name>``)."""
    make = {"single": lambda n, s: single_rows(n, s, aux), "multi": multi_label_rows, "regression": regression_rows}[kind]
    header = ["ID", "TEXT", "CLASS"] if not aux else ["ID", "TEXT", "CONTEXT", "CLASS"]
    for name, n, seed, wanted in (("train", sizes[0], 1, True), ("dev", sizes[1], 2, dev), ("test", sizes[2], 3, test)):
        if wanted:
            write_rows(directory / f"{name}.tsv", header, make(n, seed))
    spec: dict = {"regression": kind == "regression", "multi_label": kind == "multi"}
    if kind == "single":
        spec.update(categories={"P": 0, "N": 1, "NEU": 2, "NONE": 3}, eval_metric="f1", average_metric="macro")
    elif kind == "multi":
        spec.update(categories={e: i for i, e in enumerate(EMOTIONS)}, eval_metric="jaccard")
    else:
        spec.update(eval_metric="pearson")
    return {
        "dataset": {"data_dir": str(directory), "train_file": "train.tsv", "dev_file": "dev.tsv" if dev else None,
                    "test_file": "test.tsv" if test else None, "aux_header": "CONTEXT" if aux else None},
        "task": spec,
    }


def make_config(raw: dict, tasks: dict, **finetuning):
    """The tiny test config with only ``tasks`` and quick finetuning settings."""
    raw = {**raw, "tasks": tasks, "representation": {"max_len": MAX_LEN, "max_len_test": None}}
    raw["finetuning"] = {**raw["finetuning"], "epochs": 2, "batch_size": 16, "patience": 2, "lr": 1e-3,
                         "device": "cpu", "baseline_row": False, **finetuning}
    return load_config(raw)


def first(cfg, name: Optional[str] = None):
    return cfg.tasks[name or next(iter(cfg.tasks))]


# --------------------------------------------------------------------------------------------
# Tiny Hugging Face checkpoints (a WordPiece BERT and a byte-level BPE RoBERTa), built here
# --------------------------------------------------------------------------------------------


def _corpus() -> list[str]:
    return [t for t, _ in make_tweets(200, seed=3)] + [" ".join(WORDS)]


def make_hf_bert(directory: Path) -> Path:
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    backend = Backend(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.train_from_iterator(_corpus(), trainers.WordPieceTrainer(vocab_size=200, special_tokens=specials))
    cls, sep = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    tokenizer = BertTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
                                  cls_token="[CLS]", mask_token="[MASK]")
    config = BertConfig(vocab_size=backend.get_vocab_size(), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def make_hf_roberta(directory: Path) -> Path:
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(_corpus(), trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    backend.post_processor = processors.RobertaProcessing(("</s>", backend.token_to_id("</s>")),
                                                          ("<s>", backend.token_to_id("<s>")))
    tokenizer = RobertaTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                                     cls_token="<s>", pad_token="<pad>", unk_token="<unk>", mask_token="<mask>")
    config = RobertaConfig(vocab_size=backend.get_vocab_size(), hidden_size=16, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=32, max_position_embeddings=64, type_vocab_size=1,
                           pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id,
                           eos_token_id=tokenizer.sep_token_id)
    torch.manual_seed(0)
    RobertaModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def make_finetune_inputs(root: Path) -> tuple[Path, dict]:
    """A tiny pretrained encoder and a generated 4-class task (its ``tasks.<name>`` entry)."""
    return make_pretrained(root / "pretrained"), write_task(root / "task")
