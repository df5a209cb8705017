"""The `data` stage: the embedded default corpus (EvoMSA's TASS tweets) or the user's pair corpus.

Outputs
- ``<out>/default/{train,dev,test}.tsv``: the default task (``ID TEXT CLASS``), seeded stratified split.
- ``<out>/pretrain/corpus.jsonl``: the pretraining texts, one ``{"a": text, "b": reply|null}`` per line.
  For the default only the *train* split's texts are used, so the vocabulary and pretraining never
  see dev/test tweets.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from sklearn.model_selection import train_test_split

from twilbert.config import DataConfig
from twilbert.data.formats import read_pairs, write_table
from twilbert.io_utils import atomic_write

log = logging.getLogger(__name__)

EVOMSA_MEMBER = "EvoMSA/tests/tweets.json"


class DataStageError(RuntimeError):
    """The data stage cannot produce its outputs; the message says what to do."""


@dataclass
class LabelledTweet:
    id: str
    text: str
    label: str


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "twilbert"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_evomsa_sdist(cfg: DataConfig, cache: Optional[Path] = None) -> Path:
    """The EvoMSA sdist from the package registry (cached), checked against its sha256."""
    cache = Path(cache or cache_dir())
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / f"evomsa-{cfg.evomsa_version}.tar.gz"
    if target.is_file() and sha256_of(target) == cfg.evomsa_sha256:
        return target
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        # --no-build-isolation: otherwise pip builds EvoMSA's build dependencies just to read metadata.
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
            "--no-build-isolation", f"evomsa=={cfg.evomsa_version}", "-d", tmp, "--quiet",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        found = list(Path(tmp).glob("*.tar.gz"))
        if proc.returncode != 0 or not found:
            raise DataStageError(
                f"could not download evomsa=={cfg.evomsa_version} from the package registry "
                f"(pip said: {proc.stderr.strip()[-400:] or 'nothing'}).\n"
                "Offline? Place the sdist at "
                f"{target}, or use your own data: set data.source=pairs_file and data.pairs_file=<your "
                "pairs TSV>, and point tasks.<name>.dataset.data_dir at your task files (see README)."
            )
        digest = sha256_of(found[0])
        if digest != cfg.evomsa_sha256:
            raise DataStageError(
                f"{found[0].name}: sha256 {digest} does not match data.evomsa_sha256 {cfg.evomsa_sha256}"
            )
        os.replace(found[0], target)
    return target


def read_evomsa_tweets(sdist: Path, version: str) -> list[LabelledTweet]:
    """Extract only ``tweets.json`` from the sdist; tabs/newlines inside tweets become spaces."""
    member = f"evomsa-{version}/{EVOMSA_MEMBER}"
    with tarfile.open(sdist, "r:gz") as tar:
        try:
            raw = tar.extractfile(member)
        except KeyError:
            raise DataStageError(f"{sdist}: has no member {member}") from None
        lines = raw.read().decode("utf-8").splitlines()
    tweets = []
    for lineno, line in enumerate(lines, 1):
        where = f"{sdist}!{EVOMSA_MEMBER}:{lineno}"
        try:
            row = json.loads(line)
            text, label = row["text"], row["klass"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise DataStageError(f"{where}: not a JSON object with 'text' and 'klass' ({err})") from None
        # TSV cells cannot hold tabs or newlines; whitespace is all they are in a tweet.
        text = " ".join(str(text).split())
        if not text:
            raise DataStageError(f"{where}: empty text")
        tweets.append(LabelledTweet(f"evomsa-{lineno:04d}", text, str(label)))
    return tweets


def stratified_split(
    tweets: list[LabelledTweet], fractions: list[float], seed: int
) -> tuple[list[LabelledTweet], list[LabelledTweet], list[LabelledTweet]]:
    """Seeded train/dev/test split that keeps each label's share."""
    train_frac, dev_frac, test_frac = fractions
    labels = [t.label for t in tweets]
    train, rest = train_test_split(tweets, train_size=train_frac, stratify=labels, random_state=seed)
    rest_labels = [t.label for t in rest]
    dev, test = train_test_split(
        rest, test_size=test_frac / (dev_frac + test_frac), stratify=rest_labels, random_state=seed
    )
    return train, dev, test


def write_task_split(path: Path, tweets: list[LabelledTweet]) -> None:
    write_table(path, ["ID", "TEXT", "CLASS"], [[t.id, t.text, t.label] for t in tweets])


def write_pretrain_corpus(path: Path, pairs: list[tuple[str, Optional[str]]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as fh:
        for a, b in pairs:
            fh.write(json.dumps({"a": a, "b": b}, ensure_ascii=False) + "\n")


def iter_pretrain_corpus(path: Path) -> Iterator[tuple[str, Optional[str]]]:
    """The corpus's (text, reply or None) rows, streamed: memory does not grow with the corpus."""
    with Path(path).open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            try:
                row = json.loads(line)
                pair = (row["a"], row["b"])
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise DataStageError(f"{path}:{lineno}: not a pretraining corpus row ({err})") from None
            yield pair


def read_pretrain_corpus(path: Path) -> list[tuple[str, Optional[str]]]:
    return list(iter_pretrain_corpus(path))


def run_data_stage(cfg: DataConfig, seed: int, out: Path) -> dict:
    """Write the default task split and the pretraining corpus under ``out``; return a summary."""
    out = Path(out)
    summary: dict = {"source": cfg.source}
    if cfg.source == "evomsa":
        tweets = read_evomsa_tweets(fetch_evomsa_sdist(cfg), cfg.evomsa_version)
        train, dev, test = stratified_split(tweets, cfg.split, seed)
        (out / "default").mkdir(parents=True, exist_ok=True)
        for name, part in (("train", train), ("dev", dev), ("test", test)):
            write_task_split(out / "default" / f"{name}.tsv", part)
            summary[f"default_{name}"] = len(part)
        corpus: list[tuple[str, Optional[str]]] = [(t.text, None) for t in train]
    else:
        pairs = read_pairs(
            Path(cfg.pairs_file),
            header=cfg.pairs_header,
            delimiter=cfg.delimiter,
            orig_text_header=cfg.orig_text_header,
            reply_text_header=cfg.reply_text_header,
        )
        corpus = list(zip(pairs.orig_texts, pairs.reply_texts))
        # DVC needs the declared output to exist even when the default task is not used.
        (out / "default").mkdir(parents=True, exist_ok=True)
        (out / "default" / "README.txt").write_text(
            "data.source is pairs_file: the embedded default task is not produced.\n", encoding="utf-8"
        )
    write_pretrain_corpus(out / "pretrain" / "corpus.jsonl", corpus)
    summary["pretrain_texts"] = len(corpus)
    summary["pretrain_pairs_with_reply"] = sum(1 for _, b in corpus if b is not None)
    log.info("data: %s", summary)
    return summary
