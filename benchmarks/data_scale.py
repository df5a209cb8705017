"""How the data path scales: the real `data`, `vocab` and `pairs` stages, then pretrain's data loading
plus a few steps of the tiny model, each a separate process, on a synthetic corpus of N tweet pairs.

The corpus looks like tweets: words drawn by a Zipf law (s = 1.1) from ~50k Spanish-like words made of
syllables, 5-40 words per text, @users, URLs, hashtags, laughter and emoji; seeded. It is written as
a TWilBert pair TSV (``ORIG_ID ORIG_TEXT REPLY_ID REPLY_TEXT``) and fed to the stages as a user would:
``data.source=pairs_file data.pairs_file=<tsv>``. Every stage runs from the repository's
``stages/`` with Hydra overrides, outputs under ``--workdir``.

Measured per stage: wall seconds, CPU seconds (the stage and its workers, from ``os.wait4``; on a
shared host the honest figure of what a stage costs), and the peak memory of the stage's process tree: the larger of
the biggest process's own peak (``ru_maxrss``, from ``os.wait4``) and the peak, sampled every 0.2 s,
of the tree's summed PSS (proportional set size: pages shared by forked workers counted once).
The pretrain probe reports its own ``VmHWM`` after opening the shards and running the steps.

The same is run on a 1k-pair corpus first, and, given one size N, on N/4 pairs too (several
``--pairs`` sizes run each). ``pretrain_startup_rss_mb`` is the probe's peak at N pairs minus its
peak at 1k. The 70M projections come from the two largest runs, per stage: the slope between them
(per pair, floored at zero: a flat stage stays flat, noise never projects a shrink) carried from the
larger run to 70M pairs. A fixed start-up cost (imports, the tokenizer) then adds nothing, as it
should; extrapolating from 1k pairs made it grow with the corpus. The `vocab` stage's memory stops
growing once its reservoir sample holds ``vocab.max_sentences`` texts (read from the vocabulary's
``meta.json``, with the corpus's texts per pair; its 40M-character cap may stop SentencePiece's part
earlier): its slope is carried only up to that size, and a
larger run already past it (holding the full sample) is its projection. Time: data + vocab + pairs,
data and pairs by their slopes; vocab as its training (capped like its memory) plus its reading of
the whole corpus to draw the sample, in proportion to the corpus (the stage logs how long the
drawing took: between two runs that slope is lost in the training's noise). The pretrain probe's
peak: its anonymous memory by its slope, plus its file-backed pages (the mapped shards, page cache the
kernel may drop) as in the larger run, plus the epoch permutation's 4 bytes per example, too small
to resolve between two runs. Peak: the largest stage.
``pairs_rss_growth_pct`` is the `pairs` stage's peak growth from the second largest run to the
largest (the issue's target: at most 15% from 250k to 1M). ``bytes_per_token`` is the bytes on disk of
the pairs output over the corpus's tokens (each text counted once, before truncation to max_len).

    python benchmarks/data_scale.py --pairs 1000000            # also runs 250k: the growth and projections
    python benchmarks/data_scale.py --pairs 250000 1000000 --workdir /tmp/scale --keep
    python benchmarks/data_scale.py --quick          # a smoke run on tiny corpora (3k against 1k), under a minute
    python benchmarks/data_scale.py --pairs 250000 --init hf   # pairs tokenized by a Hugging Face checkpoint's tokenizer

Prints one line per stage and ends with one JSON line: pairs, data_rss_mb, vocab_rss_mb,
pairs_rss_mb, pretrain_startup_rss_mb, data_s, vocab_s, pairs_s, pairs_per_s, bytes_per_token,
projected_70m_hours, projected_70m_peak_gb, pairs_rss_growth_pct, growth_from_pairs.

    python benchmarks/data_scale.py --format twitter-v2 --posts 1000000   # posts as researchers hold them:
    # benchmarks/social_scale.py (also twitter-v1, bluesky, parquet, csv), ending with its own JSON line
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TARGET_PAIRS = 70_000_000
BASELINE_PAIRS = 1_000
EMOJI = "😂 ❤️ 😍 🙏 🔥 😭 👏 💪 🙌 😊 🤣 😡 🇲🇽 🇪🇸 👍 😒 🥺 ✨ 💔 🤔".split()
ONSETS = "b c d f g j l m n p r s t v z ch ll qu br cr dr gr pl pr tr bl fl".split() + [""] * 6
VOWELS = "a e i o u a e o á é í ó ú ue ie".split()
CODAS = [""] * 10 + "n s r l d z".split()


# --------------------------------------------------------------------------------------------
# The synthetic corpus
# --------------------------------------------------------------------------------------------


def spanish_like_words(n: int, rng: np.random.Generator) -> list[str]:
    """``n`` distinct words of 1-4 syllables (onset, vowel, coda), e.g. 'trales', 'quiba'."""
    words: dict[str, None] = {}
    while len(words) < n:
        syllables = rng.integers(1, 5, 4096)
        for k in syllables:
            w = "".join(ONSETS[rng.integers(len(ONSETS))] + VOWELS[rng.integers(len(VOWELS))]
                        + CODAS[rng.integers(len(CODAS))] for _ in range(k))
            words.setdefault(w)
            if len(words) == n:
                break
    return list(words)


class TweetGenerator:
    """Tweet-like texts: Zipf-distributed words, 5-40 per text, with Twitter's usual furniture."""

    def __init__(self, seed: int, vocabulary: int = 50_000, zipf_s: float = 1.1):
        self.rng = np.random.default_rng(seed)
        self.words = np.array(spanish_like_words(vocabulary, self.rng), dtype=object)
        ranks = np.arange(1, vocabulary + 1, dtype=np.float64)
        self.cdf = np.cumsum(ranks**-zipf_s)
        self.cdf /= self.cdf[-1]
        self.users = [f"@{w}{self.rng.integers(100)}" for w in self.words[:2000]]

    def texts(self, n: int) -> list[str]:
        rng = self.rng
        lengths = rng.integers(5, 41, n)
        ids = np.searchsorted(self.cdf, rng.random(int(lengths.sum())))
        words = self.words[ids]
        extras = rng.random((n, 5))
        out, at = [], 0
        for i, k in enumerate(lengths):
            parts = list(words[at : at + k])
            at += k
            e = extras[i]
            if e[0] < 0.3:
                parts.insert(0, self.users[int(e[0] * 6000) % len(self.users)])
            if e[1] < 0.15:
                parts.append("https://t.co/" + "".join(rng.choice(list("abcdefghijkmnpqrstuvwxyz0123456789"), 10)))
            if e[2] < 0.25:
                parts.append(EMOJI[int(e[2] * 80) % len(EMOJI)])
            if e[3] < 0.1:
                parts.append("#" + parts[len(parts) // 2].capitalize())
            if e[4] < 0.08:
                parts.insert(len(parts) // 2, "jajaja" if e[4] < 0.05 else "holaaaa")
            out.append(" ".join(parts))
        return out


def write_corpus(path: Path, n_pairs: int, seed: int) -> None:
    """A TWilBert pair TSV of ``n_pairs`` (tweet, reply) rows, written in blocks."""
    gen = TweetGenerator(seed)
    with path.open("w", encoding="utf-8") as fh:
        fh.write("ORIG_ID\tORIG_TEXT\tREPLY_ID\tREPLY_TEXT\n")
        for begin in range(0, n_pairs, 10_000):
            k = min(10_000, n_pairs - begin)
            texts, replies = gen.texts(k), gen.texts(k)
            fh.writelines(f"{begin + i}\t{a}\t{n_pairs + begin + i}\t{b}\n"
                          for i, (a, b) in enumerate(zip(texts, replies)))


# --------------------------------------------------------------------------------------------
# Running a stage as a child process and measuring it
# --------------------------------------------------------------------------------------------


def tree_pss_mb(pid: int) -> float:
    import psutil

    try:
        root = psutil.Process(pid)
        total = 0
        for p in [root, *root.children(recursive=True)]:
            try:
                info = p.memory_full_info()
                total += getattr(info, "pss", info.rss)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return total / 2**20
    except psutil.NoSuchProcess:
        return 0.0


def run_measured(cmd: list[str], log_path: Path) -> dict:
    """Run ``cmd`` in the repository; wall seconds, peak memory (MiB) and its output, or raise."""
    start = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "CI": "1"})
        peak = [0.0]
        done = threading.Event()

        def sample():
            while not done.wait(0.2):
                peak[0] = max(peak[0], tree_pss_mb(proc.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        done.set()
        sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{log_path.read_text()[-3000:]}")
    # CPU seconds of the stage and of its waited-for children (the tokenizer workers): on a loaded
    # host this, not the wall time, says what the stage costs.
    return {"s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "rss_mb": max(usage.ru_maxrss / 1024, peak[0]),
            "maxrss_mb": usage.ru_maxrss / 1024, "output": log_path.read_text()}


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def head_lines(src: Path, dst: Path, n: int) -> Path:
    with src.open(encoding="utf-8") as fh, dst.open("w", encoding="utf-8") as out:
        out.writelines(line for _, line in zip(range(n), fh))
    return dst


def run_pipeline(root: Path, n_pairs: int, seed: int, overrides: list[str], probe_steps: int,
                 vocab_sample: Optional[int] = None) -> dict:
    """Corpus of ``n_pairs``, then the data, vocab, pairs stages and the pretrain probe under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    corpus = root / "corpus.tsv"
    t0 = time.perf_counter()
    write_corpus(corpus, n_pairs, seed)
    print(f"[{n_pairs} pairs] corpus: {corpus.stat().st_size / 2**20:.1f} MiB written in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    py = sys.executable
    common = [f"data.pairs_file={corpus}", "data.source=pairs_file", *overrides]
    data = root / "data"
    vocab_corpus = data / "pretrain" / "corpus.jsonl"
    steps = {
        "data": [py, "stages/data.py", "--out", str(data), *common],
        "vocab": [py, "stages/vocab.py", "--corpus", str(vocab_corpus), "--out",
                  str(data / "vocab"), *common],
        "pairs": [py, "stages/pairs.py", "--corpus", str(data / "pretrain" / "corpus.jsonl"), "--vocab",
                  str(data / "vocab"), "--out", str(data / "pairs"), *common],
        "pretrain": [py, __file__, "--probe", str(data), "--probe-steps", str(probe_steps), *overrides],
    }
    out = {"n_pairs": n_pairs}
    for name, cmd in steps.items():
        if name == "vocab" and vocab_sample and vocab_sample < n_pairs:
            # the vocab stage's own input: the first K pairs of the corpus the data stage wrote
            sample = head_lines(vocab_corpus, root / "vocab-sample.jsonl", vocab_sample)
            cmd[cmd.index(str(vocab_corpus))] = str(sample)
            print(f"[{n_pairs} pairs] vocab trained on the first {vocab_sample} pairs only (--vocab-sample)",
                  flush=True)
        m = run_measured(cmd, root / f"{name}.log")
        out[name] = m
        line = f"[{n_pairs} pairs] {name:8s} {m['s']:8.1f} s ({m['cpu_s']:.1f} CPU s)   peak {m['rss_mb']:8.1f} MiB"
        if name == "pairs":
            manifest = json.loads((data / "pairs" / "manifest.json").read_text())
            out["pairs_bytes"] = du(data / "pairs")
            out["corpus_tokens"] = manifest["corpus_tokens"]
            line += (f"   {n_pairs / m['s']:,.0f} pairs/s ({n_pairs / m['cpu_s']:,.0f} per CPU s)   "
                     f"{out['pairs_bytes'] / 2**20:.1f} MiB on disk = "
                     f"{out['pairs_bytes'] / manifest['corpus_tokens']:.2f} bytes/token "
                     f"({manifest['corpus_tokens']:,} corpus tokens, dtype {manifest['dtype']})")
        if name == "pretrain":
            probe = json.loads(m["output"].strip().splitlines()[-1])
            out["probe"] = probe
            line = (f"[{n_pairs} pairs] pretrain startup + {probe_steps} steps: {m['s']:.1f} s, VmHWM "
                    f"{probe['hwm_mb']:.1f} MiB (VmRSS {probe['rss_mb']:.1f} MiB: anonymous {probe['anon_mb']:.1f}, "
                    f"file-backed {probe['file_mb']:.1f}; {probe['examples']:,} examples)")
        if name == "data":
            out["data_bytes"] = du(data / "pretrain")
        if name == "vocab" and json.loads((data / "vocab" / "meta.json").read_text(encoding="utf-8")).get("kind") == "hf":
            # --init hf: the checkpoint's tokenizer is copied, not trained: no sample, no corpus read
            out.update(vocab_cap_pairs=0, vocab_read_s=0.0, vocab_read_pairs=n_pairs)
        elif name == "vocab":
            meta = json.loads((data / "vocab" / "meta.json").read_text(encoding="utf-8"))
            # the corpus size (in pairs) from which the vocabulary's sample is full and its memory flat
            seen = vocab_sample if vocab_sample and vocab_sample < n_pairs else n_pairs  # pairs the stage read
            out["vocab_cap_pairs"] = meta["vocab"]["max_sentences"] * seen / max(1, meta["n_corpus_texts"])
            drawn = re.search(r"vocab: drew a sample of \d+ of \d+ texts in ([\d.]+) s", m["output"])
            out["vocab_read_s"] = float(drawn.group(1)) if drawn else 0.0  # reading the corpus for the sample
            out["vocab_read_pairs"] = seen
        print(line, flush=True)
    (root / "measured.json").write_text(json.dumps({k: v for k, v in out.items()}, default=str, indent=1))
    return out


# --------------------------------------------------------------------------------------------
# The pretrain probe (a child process): the stage's data loading plus a few steps of the tiny model
# --------------------------------------------------------------------------------------------


def status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def probe(data: Path, steps: int, overrides: list[str]) -> None:
    import torch

    from twilbert.config import compose, load_config
    from twilbert.data.prefetch import prefetch
    from twilbert.data.tokenizer import Tokenizer
    from twilbert.train.distributed import DistContext, iterate_micro_batches
    from twilbert.train.pretrain import PREFETCH_BATCHES, build_pretraining, open_pretrain_data
    from twilbert.train.pretrain_run import resolve_pretrain_run

    torch.set_num_threads(1)
    cfg = load_config(compose(["model=tiny", "training.device=cpu", *overrides], REPO / "conf"))
    if cfg.training.init_from == "hf":  # --init hf: the continued-pretraining stack on the checkpoint
        from twilbert.data.hf_vocab import HFVocab
        from twilbert.train.continued import build_continued

        vocab = HFVocab(data / "vocab")
        train, heldout = open_pretrain_data(data / "pairs", cfg.representation.max_len, vocab.vocab_size)
        model, trainer, objective = build_continued(resolve_pretrain_run(cfg), vocab, torch.device("cpu"))
    else:
        vocab_size = Tokenizer(data / "vocab").vocab_size
        train, heldout = open_pretrain_data(data / "pairs", cfg.representation.max_len, vocab_size)
        model, trainer, objective = build_pretraining(resolve_pretrain_run(cfg), vocab_size, torch.device("cpu"))
    tcfg = cfg.training
    batches = prefetch(iterate_micro_batches(train, tcfg.batch_size, tcfg.micro_batches, cfg.seed, 0, DistContext()),
                       PREFETCH_BATCHES)
    for _, batch in zip(range(steps), batches):
        trainer.train_step(batch, objective)
    batches.close()
    # RssFile: pages of the memory-mapped shards (and libraries) the kernel mapped in: page cache it may
    # drop, not memory the loader holds; RssAnon is what the process itself allocated.
    print(json.dumps({"hwm_mb": status_mb("VmHWM"), "rss_mb": status_mb("VmRSS"), "anon_mb": status_mb("RssAnon"),
                      "file_mb": status_mb("RssFile"), "examples": len(train), "heldout_examples": len(heldout)}))


def hf_checkpoint(directory: Path, seed: int, vocab_size: int = 31_002) -> Path:
    """A checkpoint with BETO's kind of tokenizer (cased WordPiece, ~31k pieces) trained on the synthetic
    tweets, under a tiny ``BertForMaskedLM`` (the probe trains it): what ``--init hf`` tokenizes with."""
    import torch
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    backend = Backend(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=False)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.train_from_iterator(TweetGenerator(seed + 7).texts(50_000),
                                trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials))
    cls, sep = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tokenizer = BertTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
                                  cls_token="[CLS]", mask_token="[MASK]")
    torch.manual_seed(seed)
    BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=512)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def project(small: float, large: float, n_small: int, n_large: int, n: int,
            cap: Optional[float] = None) -> float:
    """The value at ``n`` pairs: the slope between two runs (floored at zero) carried on from the larger.

    ``cap``: the corpus size past which the value does not grow (the vocabulary's full sample): the
    slope is carried only up to it, and a larger run already past it is the projection.
    """
    if cap is not None:
        if n_large >= cap:
            return large
        n = min(n, cap)
    slope = max(0.0, (large - small) / (n_large - n_small))
    return large + slope * max(0, n - n_large)


def figures(base: dict, runs: list[dict]) -> dict:
    """The JSON line: the largest run's figures, projections from the two largest runs."""
    small, run = ([base] + runs)[-2:]
    n, n0 = run["n_pairs"], small["n_pairs"]

    def proj(value, cap=None):
        return project(value(small), value(run), n0, n, TARGET_PAIRS, cap)

    # vocab's time: its training grows only up to the sample's cap; its reading of the whole corpus to
    # draw the sample grows in proportion (a slope the training's noise hides between two runs).
    vocab_s = (proj(lambda r: r["vocab"]["s"] - r["vocab_read_s"], run.get("vocab_cap_pairs"))
               + run["vocab_read_s"] * TARGET_PAIRS / run["vocab_read_pairs"])
    hours = (sum(proj(lambda r, s=s: r[s]["s"]) for s in ("data", "pairs")) + vocab_s) / 3600
    peaks = [proj(lambda r, s=s: r[s]["rss_mb"]) for s in ("data", "pairs")]
    peaks.append(proj(lambda r: r["vocab"]["rss_mb"], run.get("vocab_cap_pairs")))
    # The probe: its own (anonymous) memory by its slope, plus the mapped shards' pages as the larger
    # run had them (page cache, bounded by what a few steps touch: VmHWM's slope over-projected them
    # ~14x), plus the epoch permutation's 4 bytes per example, which two runs this small cannot resolve.
    examples_per_pair = run["probe"]["examples"] / n
    peaks.append(proj(lambda r: r["probe"]["anon_mb"]) + run["probe"]["file_mb"]
                 + 4 * examples_per_pair * max(0, TARGET_PAIRS - n) / 2**20)
    return {
        "pairs": n,
        "data_rss_mb": round(run["data"]["rss_mb"], 1),
        "vocab_rss_mb": round(run["vocab"]["rss_mb"], 1),
        "pairs_rss_mb": round(run["pairs"]["rss_mb"], 1),
        "pretrain_startup_rss_mb": round(run["probe"]["hwm_mb"] - base["probe"]["hwm_mb"], 1),
        "data_s": round(run["data"]["s"], 1),
        "vocab_s": round(run["vocab"]["s"], 1),
        "pairs_s": round(run["pairs"]["s"], 1),
        "pairs_per_s": round(n / run["pairs"]["s"], 1),
        "bytes_per_token": round(run["pairs_bytes"] / run["corpus_tokens"], 3),
        "projected_70m_hours": round(hours, 2),
        "projected_70m_peak_gb": round(max(peaks) / 1024, 2),
        "pairs_rss_growth_pct": round(100 * (run["pairs"]["rss_mb"] / small["pairs"]["rss_mb"] - 1), 1),
        "growth_from_pairs": n0,
    }


def growth_line(small: dict, run: dict) -> str:
    parts = [f"{s} {100 * (run[s]['rss_mb'] / small[s]['rss_mb'] - 1):+.1f}%" for s in ("data", "vocab", "pairs")]
    parts.append(f"pretrain probe {100 * (run['probe']['hwm_mb'] / small['probe']['hwm_mb'] - 1):+.1f}%")
    return f"peak growth from {small['n_pairs']} to {run['n_pairs']} pairs: " + ", ".join(parts)


def host_line() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    load = os.getloadavg()
    return (f"host {platform.node()}, {cpu}, {os.cpu_count()} CPUs, load average {load[0]:.2f} "
            f"{load[1]:.2f} {load[2]:.2f}")


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, nargs="+", default=[250_000],
                        help="pairs of the measured corpus; one size N also runs N/4 (the growth and the "
                        "projections need two sizes), several sizes run each")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 3k pairs against 1k, small vocabulary")
    parser.add_argument("--workdir", type=Path, help="where corpora and outputs go (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep --workdir's outputs")
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--vocab-sample", type=int, help="train the vocabulary on the first K pairs only (for a "
                        "vocab stage that holds its whole input in memory; its figures are then the sample's)")
    parser.add_argument("--probe", type=Path, help=argparse.SUPPRESS)  # internal: the pretrain probe's data dir
    parser.add_argument("--probe-steps", type=int, default=3, help="training steps of the pretrain probe")
    parser.add_argument("--init", choices=("scratch", "hf"), default="scratch",
                        help="hf: the stages in training.init_from hf mode, tokenizing with a Hugging Face "
                             "checkpoint's tokenizer (--hf-path, or a BETO-shaped WordPiece one built here)")
    parser.add_argument("--hf-path", type=Path, help="--init hf: a local checkpoint folder (e.g. BETO's)")
    parser.add_argument("--make-hf-checkpoint", type=Path, help=argparse.SUPPRESS)  # internal: hf_checkpoint's child
    sys.path.insert(0, str(Path(__file__).parent))
    import social_scale  # --format: posts as researchers hold them

    social_scale.add_arguments(parser)
    args, overrides = parser.parse_known_args(argv)
    if args.format:
        social_scale.main(args, overrides)
        return
    if args.make_hf_checkpoint:
        hf_checkpoint(args.make_hf_checkpoint, args.seed)
        return
    if args.probe:
        probe(args.probe, args.probe_steps, overrides)
        return
    sizes = sorted(set(args.pairs))
    if args.quick:
        sizes = [3_000]  # against the 1k baseline alone: a smoke run
        overrides = ["vocab.vocab_size=200", *overrides]
    elif len(sizes) == 1 and sizes[0] // 4 > BASELINE_PAIRS:
        sizes = [sizes[0] // 4, sizes[0]]
    if sizes[0] <= BASELINE_PAIRS:
        parser.error(f"--pairs: every size must exceed the {BASELINE_PAIRS}-pair baseline")
    print(host_line(), flush=True)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="twilbert-scale-"))
    if args.init == "hf":
        checkpoint = args.hf_path
        if checkpoint is None:  # built in a child: a parent grown by torch and transformers would pass its peak
            checkpoint = work / "hf-checkpoint"  # memory on to every stage it starts (ru_maxrss survives exec)
            subprocess.run([sys.executable, __file__, "--make-hf-checkpoint", str(checkpoint), "--seed",
                            str(args.seed)], check=True)
        overrides = ["training.init_from=hf", f"training.hf_path={checkpoint.resolve()}", *overrides]
        print(f"--init hf: tokenizing with the tokenizer of {checkpoint}", flush=True)
    try:
        base = run_pipeline(work / f"n{BASELINE_PAIRS}", BASELINE_PAIRS, args.seed, overrides, args.probe_steps)
        runs = [run_pipeline(work / f"n{n}", n, args.seed + 1, overrides, args.probe_steps, args.vocab_sample)
                for n in sizes]
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    result = figures(base, runs)
    print(growth_line(*([base] + runs)[-2:]), flush=True)
    print(host_line(), flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
