"""DVC stage `baseline` (one instance per task): the TF-IDF + linear row (`tfidf` in the tables), fitted once, since
it is deterministic, on the same splits and preprocessing as the task's finetuning runs."""

import argparse
from pathlib import Path
from typing import Optional

from twilbert.config import ConfigError
from twilbert.pipeline.stage import load_stage_config, parse_args, run
from twilbert.train.finetune.stage_work import baseline_task


def main() -> Optional[str]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--task", required=True, help="a key of `tasks` in params.yaml")
    # The vocabulary, not the pretrained model: the row reads only its preprocessing (the same
    # meta.json the model carries), so retraining the encoder does not rerun it.
    parser.add_argument("--vocab", type=Path, default=Path("data/vocab"),
                        help="the vocabulary whose preprocessing the finetuning runs use")
    parser.add_argument("--model-out", type=Path, required=True)
    parser.add_argument("--metrics-out", type=Path, required=True)
    args, overrides = parse_args(parser)
    cfg, _ = load_stage_config(overrides)
    if args.task not in cfg.tasks:
        raise ConfigError(f"--task {args.task!r} is not in params.yaml tasks (have: {sorted(cfg.tasks)})")
    metrics = baseline_task(cfg, cfg.tasks[args.task], args.vocab, args.model_out, args.metrics_out)
    if metrics is None:
        return f"{args.task}: no separate baseline row -> {args.metrics_out}"
    return (f"{args.task} (the tfidf row, {metrics['model_name']}): dev {metrics['official_metric']} "
            f"{metrics['dev']['official']:.4f}, test {metrics['test']['official']:.4f}")


if __name__ == "__main__":
    run(main)
