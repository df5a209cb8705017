"""DVC stage `vocab`: a SentencePiece vocabulary trained on the pretraining texts only."""

import argparse
from pathlib import Path

from twilbert.data.corpus import read_pretrain_corpus
from twilbert.data.tokenizer import Tokenizer, train_vocab
from twilbert.stage import load_stage_config, parse_args, run


def main() -> str:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--corpus", type=Path, default=Path("data/pretrain/corpus.jsonl"))
    parser.add_argument("--out", type=Path, default=Path("data/vocab"))
    args, overrides = parse_args(parser)
    cfg, _ = load_stage_config(overrides)
    corpus = read_pretrain_corpus(args.corpus)
    texts = [t for a, b in corpus for t in (a, b) if t is not None]
    out = train_vocab(texts, args.out, cfg.vocab, cfg.preprocess)
    return f"{Tokenizer(out).vocab_size} pieces from {len(texts)} texts -> {out}"


if __name__ == "__main__":
    run(main)
