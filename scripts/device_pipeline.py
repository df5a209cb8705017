"""The tiny pipeline's training stages on one device, offline: vocab -> pairs -> pretrain -> finetune.

The data stage downloads its corpus from PyPI, and a device machine has no network, so this script
generates a corpus and a 4-class task itself, builds the vocabulary and the pair shards with the
package's own code, then runs ``stages/pretrain.py`` and ``stages/finetune.py`` (the commands of
dvc.yaml) in a work directory whose params.yaml is conf/ composed with ``model=tiny`` and the device
keys. Each stage's log goes to stderr; stdout gets one JSON line: the device, each stage's seconds
and exit code, the metrics.

    python scripts/device_pipeline.py --device cuda --work /tmp/pipeline
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORDS = ("hola que tal estoy muy feliz hoy con mis amigos jajaja no me gusta nada este lunes qué bonito día "
         "gracias por todo odio el tráfico de la ciudad vamos al partido esta noche buenísimo el concierto de "
         "ayer url @usuario #fiesta increíble pésimo servicio").split()
LABELS = {"P": "feliz", "N": "odio", "NEU": "hoy", "NONE": "url"}


def tweets(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = list(LABELS)[i % len(LABELS)]
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 14))]
        words.insert(rng.randint(0, len(words)), LABELS[label])
        out.append((" ".join(words), label))
    return out


def write_task(directory: Path) -> dict:
    directory.mkdir(parents=True, exist_ok=True)
    for name, n, seed in (("train", 96, 1), ("dev", 32, 2), ("test", 32, 3)):
        rows = ["ID\tTEXT\tCLASS", *(f"{name}-{i}\t{t}\t{y}" for i, (t, y) in enumerate(tweets(n, seed)))]
        (directory / f"{name}.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return {"dataset": {"data_dir": str(directory), "train_file": "train.tsv", "dev_file": "dev.tsv",
                        "test_file": "test.tsv"},
            "task": {"categories": {k: i for i, k in enumerate(LABELS)}, "eval_metric": "f1",
                     "average_metric": "macro"}}


def overrides(device: str, precision: str, epochs: int = 2) -> list[str]:
    """conf/ as the tiny pipeline on ``device`` (tests/test_plain_compose.py: Hydra composes them the same)."""
    return ["model=tiny", "representation.max_len=16", f"training.epochs={epochs}", "training.batch_size=16",
            f"training.device={device}", f"training.precision={precision}", "training.pll_examples=4",
            "training.checkpoint_every=10", f"finetuning.epochs={epochs}", f"finetuning.device={device}",
            f"finetuning.precision={precision}", "finetuning.batch_size=16"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=2, help="of pretraining and of finetuning (the CPU smoke run: 1)")
    args = parser.parse_args()

    from twilbert.cli import dump_params
    from twilbert.config import VocabConfig
    from twilbert.config.plain_compose import compose_plain
    from twilbert.data.pairs import build_pair_shards
    from twilbert.data.tokenizer import Tokenizer, train_vocab

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    summary: dict = {"device": args.device, "precision": args.precision, "stages": {}}
    start = time.perf_counter()
    train_vocab([t for t, _ in tweets(400, 0)], work / "data" / "vocab", VocabConfig(vocab_size=150))
    build_pair_shards([(t, None) for t, _ in tweets(300, 5)], Tokenizer(work / "data" / "vocab"), work / "data" / "pairs",
                      max_len=16, heldout_fraction=0.1, shard_size=1000, seed=0)
    summary["stages"]["vocab+pairs"] = {"seconds": round(time.perf_counter() - start, 1), "rc": 0}

    raw = compose_plain(overrides(args.device, args.precision, args.epochs), REPO / "conf")  # no Hydra there
    raw["tasks"] = {"t": write_task(work / "task")}
    (work / "params.yaml").write_text(dump_params(raw), encoding="utf-8")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}", "CI": "1"}
    commands = {
        "pretrain": ["stages/pretrain.py", "--pairs", "data/pairs", "--vocab", "data/vocab", "--out",
                     "models/pretrained", "--checkpoints", "models/checkpoints/pretrain", "--metrics",
                     "results/pretrain.json"],
        "finetune": ["stages/finetune.py", "--task", "t", "--pretrained", "models/pretrained", "--model-out",
                     "models/finetuned/t", "--metrics-out", "results/tasks/t", "--checkpoints",
                     "models/checkpoints/finetune/t"],
    }
    for name, cmd in commands.items():
        begin = time.perf_counter()
        proc = subprocess.run([sys.executable, str(REPO / cmd[0]), *cmd[1:]], cwd=work, env=env,
                              capture_output=True, text=True)
        # one log for the whole pipeline (device_check.sh brings back few files): each stage's in turn
        print(f"== {name}: exit {proc.returncode}\n{proc.stdout}{proc.stderr}", file=sys.stderr, flush=True)
        summary["stages"][name] = {"seconds": round(time.perf_counter() - begin, 1), "rc": proc.returncode}
        if proc.returncode:
            summary["error"] = f"{name}: exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"
            break
    else:
        pre = json.loads((work / "results" / "pretrain.json").read_text())
        fin = json.loads((work / "results" / "tasks" / "t" / "metrics.json").read_text())
        summary["metrics"] = {"heldout_mlm_accuracy": pre.get("heldout_mlm_accuracy"),
                              "finetune_test_official": fin["test"]["official"]}
    summary["ok"] = "error" not in summary
    print(json.dumps(summary))
    sys.exit(0 if summary["ok"] else 1)


if __name__ == "__main__":
    main()
