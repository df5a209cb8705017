"""Continued-pretraining step throughput (``pretrain_throughput.py --init hf``): the pretrain stage's
step on a Hugging Face checkpoint against a Hugging Face ``Trainer``/``run_mlm``-style step, on the
same model and the same masked batch.

- The checkpoint: ``BertForMaskedLM`` of BETO's shape (V=31002, H=768, L=12, A=12, I=3072, 512
  positions), random weights, written with ``save_pretrained`` to a temp folder, as the stage reads it.
- ours: ``train.continued.build_continued`` (what the stage calls) loads it with
  ``AutoModelForMaskedLM``, wraps it in ``HFForPretraining`` (MLM head on the masked positions only,
  the decoder inside the fused loss) with the optimizer, schedule and ``Trainer`` of the stage; a step
  is ``trainer.train_step(batch, objective)``: dynamic masks, forward, backward, clipping, AdamW.
  ``training.rop`` is false here (run_mlm trains MLM only).
- HF: the same checkpoint loaded a second time; a step is what ``Trainer`` does for ``run_mlm``:
  ``model(**inputs, labels=labels).loss`` (logits over the vocabulary at every position), backward,
  ``clip_grad_norm_(1.0)``, ``torch.optim.AdamW(fused=True)`` (Trainer's default with torch >= 2.8),
  ``zero_grad``. Inputs and labels are our objective's masks of the same batch, on the device once.

Rows are full-length ``[CLS] a [SEP] b [SEP]`` pairs of ``2 * max_len + 3`` tokens. Each ratio is the
median of per-round ratios over alternating rounds (``pretrain_throughput.compare``).
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch

BERT_BASE = dict(vocab=31002, hidden_size=768, n_heads=12, n_encoders=12, intermediate_size=3072, max_len=64,
                 positions=512)
# --quick: the tests' tiny checkpoint (tests/hf_checkpoints.py), with tweet-pair rows of 2 * 32 + 3 tokens: the
# "time per million tweets on this CPU" of docs/continued-pretraining.md "How long it takes"
QUICK = dict(vocab=1000, hidden_size=32, n_heads=2, n_encoders=2, intermediate_size=64, max_len=32, positions=128)


def write_checkpoint(directory: Path, sizes: dict) -> Path:
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    config = BertConfig(vocab_size=sizes["vocab"], hidden_size=sizes["hidden_size"],
                        num_hidden_layers=sizes["n_encoders"], num_attention_heads=sizes["n_heads"],
                        intermediate_size=sizes["intermediate_size"], max_position_embeddings=sizes["positions"],
                        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    BertForMaskedLM(config).save_pretrained(directory)
    return directory


def continued_config(checkpoint: Path, sizes: dict, batch: int, precision: str, device: str):
    from pretrain_throughput import REPO, compose_plain

    from twilbert.config import load_config

    overrides = [f"representation.max_len={sizes['max_len']}", f"training.batch_size={batch}",
                 f"training.precision={precision}", f"training.device={device}", "training.init_from=hf",
                 f"training.hf_path={checkpoint}", "training.rop=false", "training.optimizer=adam"]
    return load_config(compose_plain(overrides, REPO / "conf"))


def ours_step(cfg, vocab, batch):
    from twilbert.train.continued import build_continued
    from twilbert.train.pretrain_run import resolve_pretrain_run

    _, trainer, objective = build_continued(resolve_pretrain_run(cfg), vocab, torch.device(cfg.training.device))
    return lambda: trainer.train_step(batch, objective)


def hf_step(cfg, vocab, batch):
    """A Trainer/run_mlm-style step of the checkpoint itself on the same masked batch."""
    from pretrain_throughput import hf_trainer_step
    from transformers import AutoModelForMaskedLM

    from twilbert.train.objective import PretrainObjective

    device = torch.device(cfg.training.device)
    model = AutoModelForMaskedLM.from_pretrained(cfg.training.hf_path, dtype=torch.float32).to(device).train()
    masked, labels = PretrainObjective(cfg.model.masked_lm, cfg.seed, vocab.vocab_size, torch.device("cpu"),
                                       mask_id=vocab.mask_id, n_special=vocab.n_special).mask(batch, 0, 0)
    inputs = {k: v.to(device) for k, v in dict(input_ids=masked, attention_mask=batch.attention_mask.long(),
                                                 token_type_ids=batch.segment_ids, labels=labels).items()}
    step = hf_trainer_step(model, cfg)
    return lambda: step(inputs)


def run(args) -> None:
    """``pretrain_throughput.py --init hf``: fp32, and bf16 where the device has bf16 matrix units."""
    import pretrain_throughput as bench

    from twilbert.device import native_bf16

    sizes = QUICK if args.quick else BERT_BASE
    device = torch.device(args.device)
    bench.DEVICE = device
    seq = 2 * sizes["max_len"] + 3
    tokens = args.batch * seq
    batch = bench.random_batch(sizes["vocab"], args.batch, sizes["max_len"])
    vocab = SimpleNamespace(vocab_size=sizes["vocab"], mask_id=4, n_special=5)  # BETO's [MASK] is in its first ids
    where = (f"GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads")
    print(f"machine: {platform.node()}: {where}, torch {torch.__version__}; load average {os.getloadavg()[0]:.2f}")
    print(f"continued pretraining of BertForMaskedLM: V={sizes['vocab']} H={sizes['hidden_size']} "
          f"L={sizes['n_encoders']} A={sizes['n_heads']} I={sizes['intermediate_size']} T={seq} B={args.batch}; "
          f"{args.steps} steps x {args.rounds} rounds", flush=True)
    precisions = ["fp32"] + (["bf16"] if args.bf16 == "on" or (args.bf16 == "auto" and native_bf16(device)) else [])
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = write_checkpoint(Path(tmp) / "bert-base", sizes)
        for precision in precisions:
            cfg = continued_config(checkpoint, sizes, args.batch, precision, args.device)
            results[precision] = bench.compare(precision, ours_step(cfg, vocab, batch), hf_step(cfg, vocab, batch),
                                               tokens, args.steps, args.rounds, warmup=args.warmup)
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")

    def figure(precision, name, digits=1):
        return round(results[precision][name], digits) if precision in results else None

    if "fp32" in results:  # a tweet is one pair: two examples (in order, swapped) an epoch, each one row
        hours = 2e6 * seq / results["fp32"]["ours"] / 3600
        print(f"ours fp32: {hours:.2f} h per epoch over a million tweets (full rows of {seq} tokens: an upper bound)")
    print(json.dumps({"init": "hf", "model": "BertForMaskedLM " + ("quick" if args.quick else "base"),
                      "hf_fp32_tok_s": figure("fp32", "hf"),
                      "ours_fp32_tok_s": figure("fp32", "ours"), "ratio_fp32": figure("fp32", "ratio", 3),
                      "hf_bf16_tok_s": figure("bf16", "hf"), "ours_bf16_tok_s": figure("bf16", "ours"),
                      "ratio_bf16": figure("bf16", "ratio", 3), "device": args.device, "device_name": where,
                      "host": platform.node(), "batch": args.batch, "quick": args.quick,
                      "load_average_end": round(os.getloadavg()[0], 2)}))
