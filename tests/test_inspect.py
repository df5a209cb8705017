"""The evaluation application: sample report (masked input, MLM predictions, ROP decision) and metrics."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import REPO, make_tweets
from twilbert.config import VocabConfig, compose, load_config
from twilbert.data.pairs import build_pair_shards, load_shards
from twilbert.data.tokenizer import Tokenizer, train_vocab
from twilbert.reports.inspection import inspect_model, inspect_samples, load_pretraining_model, render_markdown
from twilbert.train.objective import PretrainObjective
from twilbert.train.pretrain import pretrain
from twilbert.train.pretrain_run import resolve_pretrain_run

OVERRIDES = ["model=tiny", "representation.max_len=12", "training.batch_size=16", "training.epochs=1",
             "training.pll_examples=4"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """One epoch of the pretrain stage on a tiny corpus: its model directory and held-out pairs."""
    root = tmp_path_factory.mktemp("inspect")
    train_vocab([t for t, _ in make_tweets(200)], root / "vocab", VocabConfig(vocab_size=100))
    build_pair_shards([(t, None) for t, _ in make_tweets(100, seed=2)], Tokenizer(root / "vocab"), root / "pairs",
                      max_len=12, heldout_fraction=0.2, shard_size=1000, seed=0)
    cfg = load_config(compose(OVERRIDES, REPO / "conf"))
    metrics = pretrain(resolve_pretrain_run(cfg), root / "pairs", root / "vocab", root / "model", root / "checkpoints")
    return dict(cfg=cfg, metrics=metrics, model=root / "model", heldout=root / "pairs" / "heldout")


def test_inspect_metrics_equal_the_pretrain_stage_heldout_metrics(pretrained):
    cfg = pretrained["cfg"]
    _, metrics = inspect_model(pretrained["model"], pretrained["heldout"], 2, cfg.seed, cfg.training.batch_size,
                               cfg.training.pll_examples, torch.device("cpu"))
    for key in ("heldout_mlm_accuracy", "heldout_perplexity", "heldout_rop_accuracy", "heldout_pll"):
        assert metrics[key] == pytest.approx(pretrained["metrics"][key], rel=1e-5), key
    assert metrics["examples"] == len(load_shards(pretrained["heldout"]))


def test_samples_show_every_masked_position_with_truth_and_ranked_predictions(pretrained):
    cfg = pretrained["cfg"]
    model, card = load_pretraining_model(pretrained["model"])
    tokenizer = Tokenizer(pretrained["model"])
    data = load_shards(pretrained["heldout"])
    objective = PretrainObjective(model.cfg.masked_lm, cfg.seed, card.vocab_size, torch.device("cpu"))
    samples = inspect_samples(model, objective, data, tokenizer, 3, cfg.training.batch_size, top_k=4)
    assert len(samples) == 3
    rows = data.take(np.arange(3))  # the first evaluation batch, in order
    for sample, ids, length in zip(samples, rows["input_ids"], rows["length"]):
        assert len(sample.pieces) == length and sample.pieces[0] == "[CLS]"
        assert [m.position for m in sample.predictions] == sample.chosen and sample.chosen
        for m in sample.predictions:
            assert m.truth == tokenizer.decode_ids([ids[m.position]])[0]
            probs = [p for _, p in m.top]
            assert len(probs) == 4 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        assert sample.rop_prediction in (0, 1) and 0.5 <= sample.rop_probability <= 1


def test_markdown_report_has_metrics_masked_input_prediction_table_and_rop_line(pretrained):
    cfg = pretrained["cfg"]
    # four samples: enough masked positions that one is shown as [MASK] (80% of them are)
    report, metrics = inspect_model(pretrained["model"], pretrained["heldout"], 4, cfg.seed,
                                    cfg.training.batch_size, 0, torch.device("cpu"))
    assert "heldout_pll" not in metrics  # pll_examples=0 turns it off
    assert "| MLM accuracy |" in report and "| ROP accuracy |" in report
    assert report.count("## Sample") == 4 and report.count("ROP: ") == 4
    assert "**\\[MASK\\]**" in report  # a masked position, escaped for Markdown and in bold
    assert "| position | input | truth | top predictions | |" in report


def test_markdown_escapes_table_and_emphasis_characters():
    from twilbert.reports.inspection import MaskedPosition, SampleReport

    sample = SampleReport(["[CLS]", "a|b", "*x*", "[SEP]"], [1], [MaskedPosition(1, "[MASK]", "a|b", [("a|b", 0.9)])],
                          1, 0, 0.7)
    report = render_markdown([sample], {"heldout_rop_accuracy": 0.5}, "t")
    assert "a\\|b" in report and "\\*x\\*" in report and "| a|b" not in report
    assert "ROP: swapped (p=0.70); truth: original order ✗" in report


def test_stage_script_writes_the_report_and_metrics(pretrained, tmp_path):
    """The inspect stage script runs as DVC calls it and writes its report and metrics."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    cmd = [sys.executable, "stages/inspect_pretrained.py", "--model", str(pretrained["model"]), "--pairs",
           str(pretrained["heldout"]), "--samples", "1", "--out", str(tmp_path / "inspect.md"),
           "--metrics", str(tmp_path / "inspect.json"), *OVERRIDES]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((tmp_path / "inspect.json").read_text())
    assert metrics["heldout_mlm_accuracy"] == pytest.approx(pretrained["metrics"]["heldout_mlm_accuracy"])
    assert (tmp_path / "inspect.md").read_text().count("## Sample") == 1
