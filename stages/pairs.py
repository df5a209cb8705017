"""DVC stage `pairs`: reply-order prediction pairs, tokenized into memory-mappable shards for pretraining.

Streams the corpus through `pairs.workers` tokenizer processes; rerun after a crash, it resumes
after the last completed shard.
"""

import argparse
from pathlib import Path

from twilbert.data.corpus import iter_pretrain_corpus
from twilbert.data.hf_vocab import check_positions, open_vocab, read_meta
from twilbert.data.pairs import build_pair_shards, resolve_workers
from twilbert.pipeline.stage import load_stage_config, parse_args, run


def main() -> str:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--corpus", type=Path, default=Path("data/pretrain/corpus.jsonl"))
    parser.add_argument("--vocab", type=Path, default=Path("data/vocab"))
    parser.add_argument("--out", type=Path, default=Path("data/pairs"))
    args, overrides = parse_args(parser)
    cfg, _ = load_stage_config(overrides)
    tokenizer = open_vocab(args.vocab)  # twilbert's SentencePiece, or a checkpoint's tokenizer (init_from hf)
    if getattr(tokenizer, "template_json", None) is not None:
        check_positions(read_meta(args.vocab), cfg.representation.max_len, f"the checkpoint of {args.vocab}")
    stat = args.corpus.stat()  # the corpus version a resumed build must match
    summary = build_pair_shards(
        iter_pretrain_corpus(args.corpus), tokenizer, args.out,
        max_len=cfg.representation.max_len, heldout_fraction=cfg.pairs.heldout_fraction,
        shard_size=cfg.pairs.shard_size, seed=cfg.seed, workers=resolve_workers(cfg.pairs.workers),
        source_id=f"{args.corpus.resolve()}:{stat.st_size}:{stat.st_mtime_ns}",
    )
    return f"{summary['pairs']} pairs ({summary.get('train_examples', 0)} train, " \
           f"{summary.get('heldout_examples', 0)} held out) -> {args.out}"


if __name__ == "__main__":
    run(main)
