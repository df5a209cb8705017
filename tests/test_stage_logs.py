"""What a stage's log holds, as a person reads it after the run: one line per epoch, the project's own
counts and summaries, and none of transformers' load reports, progress bars or indexing warnings."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest

from finetune_data import write_task
from helpers import finetune_args, ok, run_stage, write_params
from hf_checkpoints import make_mlm_checkpoint

transformers = pytest.importorskip("transformers")

NOISE = ("LOAD REPORT", "Loading weights", "Writing model shards", "Token indices sequence length",
         "indexing errors", "were not sharded")
LONG_TEXT = " ".join(["hola que tal amigo"] * 30)  # ~120 tokens: past the checkpoint's 62 and max_len
N_LONG = 3


def assert_no_noise(log: str) -> None:
    found = [n for n in NOISE if n in log]
    assert not found, f"third-party noise {found} in the log:\n{log[-3000:]}"


def epoch_lines(log: str, epochs: int) -> list[str]:
    return [line for line in log.splitlines() if re.search(rf"twilbert\.train\.loop: .*epoch \d+/{epochs}:", line)]


def lengthen(split: Path, rows: int) -> None:
    """Replace the text of the first ``rows`` rows of a task TSV with a text far past every length."""
    lines = split.read_text(encoding="utf-8").splitlines()
    text = lines[0].split("\t").index("TEXT")
    for k in range(1, rows + 1):
        fields = lines[k].split("\t")
        fields[text] = LONG_TEXT
        lines[k] = "\t".join(fields)
    split.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_a_hf_backbone_finetune_logs_epochs_and_its_own_truncation_count_not_transformers_noise(tmp_path):
    checkpoint = make_mlm_checkpoint(tmp_path / "checkpoint", "roberta")
    config = checkpoint / "tokenizer_config.json"  # as a downloaded checkpoint declares its length
    config.write_text(json.dumps({**json.loads(config.read_text()), "model_max_length": 62}))
    task = write_task(tmp_path / "data")
    lengthen(tmp_path / "data" / "train.tsv", N_LONG)
    work = tmp_path / "work"
    max_len = 40  # the generated tweets fit; only the lengthened rows are cut
    write_params(work, ["model=tiny", f"representation.max_len={max_len}"], tasks={"t": task},
                 finetuning={"backbone": "hf", "hf_path": str(checkpoint), "epochs": 2, "batch_size": 16,
                             "device": "cpu"})
    proc = ok(run_stage("finetune.py", finetune_args(tmp_path, tmp_path / "out"), work))
    log = proc.stdout + proc.stderr
    assert_no_noise(log)
    assert len(epoch_lines(log, 2)) == 2
    assert f"t train.tsv: {N_LONG} of 48 examples cut to {max_len} tokens" in log
    assert "dev.tsv:" not in log and "test.tsv:" not in log  # nothing cut there: nothing said
    # the checkpoint's MLM head left out, in one line of ours
    summary = [line for line in log.splitlines() if "finetuning.hf_path" in line and "loaded as RobertaModel" in line]
    assert len(summary) == 1 and "checkpoint tensors unused (lm_head" in summary[0]


def test_continued_pretraining_logs_one_line_per_epoch_and_no_load_report_or_save_bars(tmp_path):
    from test_continued_pretraining import continued_inputs, continued_overrides

    checkpoint = continued_inputs(tmp_path / "inputs", "bert", 60)
    work = tmp_path / "work"
    write_params(work, continued_overrides(checkpoint, epochs=3))
    out = tmp_path / "out"
    proc = ok(run_stage("pretrain.py", ["--pairs", tmp_path / "inputs" / "pairs", "--vocab", tmp_path / "inputs" / "vocab",
                                        "--out", out / "model", "--checkpoints", out / "checkpoints",
                                        "--metrics", out / "metrics.json"], work))
    log = proc.stdout + proc.stderr
    assert_no_noise(log)
    assert len(epoch_lines(log, 3)) == 3
    assert len([line for line in log.splitlines() if "loaded as BertForMaskedLM" in line]) == 1


def test_quiet_transformers_restores_the_users_bars_and_report(caplog):
    from transformers.utils import logging as hf_logging

    from twilbert.model.hf_quiet import REPORT_LOGGER, quiet_transformers

    hf_logging.enable_progress_bar()
    report = logging.getLogger(REPORT_LOGGER)
    with quiet_transformers():
        assert not hf_logging.is_progress_bar_enabled()
        with caplog.at_level(logging.WARNING):
            report.warning("BertModel LOAD REPORT from: x")
            report.warning("something else")
    assert "LOAD REPORT" not in caplog.text and "something else" in caplog.text
    assert hf_logging.is_progress_bar_enabled() and not report.filters
    with caplog.at_level(logging.WARNING):
        report.warning("BertModel LOAD REPORT from: y")
    assert "LOAD REPORT from: y" in caplog.text


def test_the_truncation_count_names_the_split_and_counts_an_example_once(caplog):
    from twilbert.train.finetune.learners import log_truncated

    with caplog.at_level(logging.INFO):
        assert log_truncated("t", "data/t/dev.tsv", [[1] * 5, [1] * 2, [1] * 3], [[1] * 4, [1] * 2, [1] * 4], 3) == 2
        assert log_truncated("t", "data/t/test.tsv", [[1] * 3], None, 3) == 0
    assert caplog.messages == ["t dev.tsv: 2 of 3 examples cut to 3 tokens"]
