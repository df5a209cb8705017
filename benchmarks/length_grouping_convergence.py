"""Does length grouping hurt convergence? Pretraining on the default pipeline's pairs with
``training.length_grouping`` on and off, over several seeds: held-out MLM loss and ROP accuracy after
the same epochs (so the same real tokens: both modes see every example once per epoch).

    python benchmarks/length_grouping_convergence.py --pairs data/pairs --vocab data/vocab
    python benchmarks/length_grouping_convergence.py --pairs data/pairs --vocab data/vocab --seeds 3 \\
        training.epochs=5                   # any further argument is a config override

The config is conf/ composed with the overrides (the default pipeline's: tiny preset, its epochs);
run s uses ``seed + s``. The two modes alternate within each seed. Prints per run the last epoch's
held-out figures, then mean ± sd per mode, the difference of the means against the run-to-run sd,
and one JSON line.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from twilbert.config import load_config
from twilbert.config.plain_compose import compose_plain
from twilbert.train.pretrain import pretrain
from twilbert.train.pretrain_run import resolve_pretrain_run

REPO = Path(__file__).resolve().parents[1]
METRICS = ("heldout_mlm_loss", "heldout_rop_accuracy", "heldout_mlm_accuracy")


def run_once(overrides: list[str], pairs: Path, vocab: Path, work: Path) -> dict[str, float]:
    """One pretraining run; the held-out figures of its last epoch (from its epoch curves)."""
    cfg = load_config(compose_plain(overrides, REPO / "conf"))
    pretrain(resolve_pretrain_run(cfg), pairs, vocab, work / "model", work / "checkpoints", curves_dir=work / "curves")
    with open(work / "curves" / "epochs.csv", newline="") as fh:
        last = list(csv.DictReader(fh))[-1]
    return {k: float(last[k]) for k in METRICS} | {"epochs": int(last["epoch"])}


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=Path, default=REPO / "data" / "pairs")
    parser.add_argument("--vocab", type=Path, default=REPO / "data" / "vocab")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. training.epochs=5")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    base = compose_plain(args.overrides, REPO / "conf")
    print(f"machine: {platform.node()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads; load average "
          f"{os.getloadavg()[0]:.2f}; model={base['model']['name']}, epochs {base['training']['epochs']}, "
          f"batch {base['training']['batch_size']}, pairs {args.pairs}", flush=True)
    runs: dict[str, list[dict]] = {"grouped": [], "random": []}
    with tempfile.TemporaryDirectory(prefix="grouping-convergence-") as tmp:
        for s in range(args.seeds):
            modes = ["grouped", "random"] if s % 2 == 0 else ["random", "grouped"]
            for mode in modes:
                overrides = [*args.overrides, f"seed={base['seed'] + s}", "training.device=cpu",
                             f"training.length_grouping={'true' if mode == 'grouped' else 'false'}"]
                start = time.perf_counter()
                figures = run_once(overrides, args.pairs, args.vocab, Path(tmp) / f"{mode}-{s}")
                figures["seconds"] = time.perf_counter() - start
                runs[mode].append(figures)
                print(f"seed +{s} {mode:7s}: " + ", ".join(f"{k} {figures[k]:.4f}" for k in METRICS)
                      + f" ({figures['seconds']:.0f} s)", flush=True)
    summary = {}
    for metric in METRICS:
        stats = {mode: mean_sd([r[metric] for r in runs[mode]]) for mode in runs}
        noise = max(sd for _, sd in stats.values())
        diff = stats["grouped"][0] - stats["random"][0]
        within = abs(diff) <= 2 * noise
        print(f"{metric}: grouped {stats['grouped'][0]:.4f} ± {stats['grouped'][1]:.4f}, random "
              f"{stats['random'][0]:.4f} ± {stats['random'][1]:.4f}; difference {diff:+.4f} "
              f"({'within' if within else 'OUTSIDE'} 2 run-to-run sd = {2 * noise:.4f})")
        summary[metric] = {"grouped_mean": round(stats["grouped"][0], 4), "grouped_sd": round(stats["grouped"][1], 4),
                           "random_mean": round(stats["random"][0], 4), "random_sd": round(stats["random"][1], 4),
                           "difference": round(diff, 4), "within_noise": within}
    seconds = {mode: round(statistics.median(r["seconds"] for r in runs[mode]), 1) for mode in runs}
    print(json.dumps({**summary, "median_seconds": seconds, "seeds": args.seeds, "host": platform.node(),
                      "load_average_end": round(os.getloadavg()[0], 2)}))


if __name__ == "__main__":
    main()
