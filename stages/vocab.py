"""DVC stage `vocab`: a SentencePiece vocabulary trained on the pretraining texts only, or, with
`training.init_from: hf`, the tokenizer of the checkpoint at `training.hf_path`."""

import argparse
from pathlib import Path

from twilbert.data.corpus import iter_corpus_texts
from twilbert.data.hf_vocab import read_meta, take_hf_vocab
from twilbert.data.tokenizer import Tokenizer, train_vocab
from twilbert.pipeline.stage import load_stage_config, parse_args, run


def main() -> str:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--corpus", type=Path, default=Path("data/pretrain/corpus.jsonl"))
    parser.add_argument("--out", type=Path, default=Path("data/vocab"))
    args, overrides = parse_args(parser)
    cfg, _ = load_stage_config(overrides)
    if cfg.training.init_from == "hf":
        out = take_hf_vocab(cfg.training.hf_path, args.out, cfg.preprocess, max_len=cfg.representation.max_len)
        meta = read_meta(out)
        return f"{meta['vocab_size']} ids of the {meta['model_type']} tokenizer of {cfg.training.hf_path} -> {out}"
    # The corpus is streamed: SentencePiece sees a seeded sample of at most vocab.max_sentences texts.
    out = train_vocab(iter_corpus_texts(args.corpus), args.out, cfg.vocab, cfg.preprocess, seed=cfg.seed)
    return f"{Tokenizer(out).vocab_size} pieces ({Tokenizer(out).meta.get('n_training_texts')} texts sampled) -> {out}"


if __name__ == "__main__":
    run(main)
