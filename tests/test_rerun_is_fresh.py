"""A rerun is a fresh run: for every param a resuming stage reads, a rerun after changing it writes
exactly the bytes that a fresh run with the new value writes (models, metrics, curves).

The keys are not listed by hand: they are every leaf of the config schema (the dataclasses of
``twilbert.config``) under the stage's ``params`` in dvc.yaml, so a new key is walked the day it is
added. Each key gets another valid value (``ALTERNATIVES`` where the generic rule would be invalid or
toothless, e.g. ``epochs`` goes *down*, the direction a checkpoint cannot vouch for); the rerun starts
from a copy of the first run's checkpoint directory, the fresh run from an empty one.

The runs call the stage's library entry in this process, on a micro model and a handful of rows
(one torch thread, as the stages). ``runtime.*`` is applied by the stage process, not by the library
call, so here it only checks that a change of it starts fresh; its effect on the bits is the
numerics tests' (tests/test_numerics.py).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import typing
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

import pytest
import yaml

from finetune_data import make_hf_bert, make_pretrained, write_rows, write_task
from helpers import REPO, make_tweets
from twilbert.config import Config, VocabConfig, load_config
from twilbert.config.plain_compose import compose_plain
from twilbert.data.pairs import build_pair_shards
from twilbert.data.tokenizer import Tokenizer, train_vocab
from twilbert.train.fingerprint import OUTPUT_NEUTRAL_KEYS, config_fingerprint
from twilbert.train.pretrain_run import resolve_pretrain_run

pytestmark = pytest.mark.reliability

TASK = "t"
MAX_LEN = 8

# --------------------------------------------------------------------------------------------
# The keys: every schema leaf under a stage's DVC params
# --------------------------------------------------------------------------------------------


def _dvc_stage_params(stage: str) -> list[str]:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    entry = stages[stage]
    params = entry.get("do", entry)["params"]
    return [p.replace("${item.task}", TASK) for p in params]


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _leaves(cls: type, prefix: str) -> list[tuple[str, Any]]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if _is_dataclass_type(tp):
            out += _leaves(tp, f"{prefix}.{f.name}")
        else:
            out.append((f"{prefix}.{f.name}", tp))
    return out


def _schema_node(dotted: str) -> Any:
    """The schema type at ``dotted`` (``tasks.<name>`` is a TaskConfig)."""
    tp: Any = Config
    parts = dotted.split(".")
    i = 0
    while i < len(parts):
        if tp is Config and parts[i] == "tasks":
            tp, i = typing.get_type_hints(Config)["tasks"].__args__[1], i + 2  # dict[str, TaskConfig]
            continue
        tp = typing.get_type_hints(tp)[parts[i]]
        i += 1
    return tp


def stage_keys(stage: str) -> list[tuple[str, Any]]:
    """(dotted key, schema type) of every leaf under the stage's params in dvc.yaml."""
    keys = []
    for param in _dvc_stage_params(stage):
        tp = _schema_node(param)
        keys += _leaves(tp, param) if _is_dataclass_type(tp) else [(param, tp)]
    return keys


# --------------------------------------------------------------------------------------------
# Another valid value for each key
# --------------------------------------------------------------------------------------------

Alt = Union[dict, Callable[[dict, Path], dict]]  # dotted key -> value, or (raw, inputs) -> that

# Keys whose generic alternative (below) is invalid or would not test anything.
ALTERNATIVES: dict[str, Alt] = {
    # lower: a checkpoint taken at the old end is past the new one
    "training.epochs": {"training.epochs": 1},
    "finetuning.epochs": {"finetuning.epochs": 2},
    "finetuning.patience": {"finetuning.patience": 1},
    "model.name": {"model.name": "other"},
    "model.factorize_embeddings": lambda raw, _: {"model.factorize_embeddings": False,
                                                  "model.embedding_size": raw["model"]["hidden_size"]},
    "model.hidden_size": {"model.hidden_size": 12},  # divisible by n_heads
    "model.n_heads": {"model.n_heads": 1},
    "model.attention_size": {"model.attention_size": 4},
    "model.intermediate_size": {"model.intermediate_size": None},
    "model.hidden_act": {"model.hidden_act": "relu"},
    "model.pkm_params.value_size": {"model.pkm_params.value_size": 2},
    "model.pkm_params.k_dim": {"model.pkm_params.k_dim": 6},
    "model.pkm_params.memory_size": {"model.pkm_params.memory_size": 5},
    "model.pkm_params.in_layers": {"model.pkm_params.in_layers": [0]},
    "model.pkm_params.knn": {"model.pkm_params.knn": 3},
    "model.masked_lm.type": {"model.masked_lm.type": "word"},
    "model.masked_lm.probs.mask": {"model.masked_lm.probs.mask": 0.7, "model.masked_lm.probs.random": 0.2},
    "model.masked_lm.probs.random": {"model.masked_lm.probs.random": 0.0, "model.masked_lm.probs.keep": 0.2},
    "model.masked_lm.probs.keep": {"model.masked_lm.probs.keep": 0.0, "model.masked_lm.probs.mask": 0.9},
    "training.optimizer": {"training.optimizer": "lamb"},
    "training.device": {"training.device": "auto"},
    "training.path_initial_weights": lambda _, inputs: {"training.path_initial_weights": str(inputs / "initial")},
    "training.warmup_steps": {"training.warmup_steps": 3},
    "finetuning.backbone": lambda _, inputs: {"finetuning.backbone": "hf", "finetuning.hf_path": str(inputs / "hf")},
    "finetuning.hf_path": lambda _, inputs: {"finetuning.hf_path": str(inputs / "hf")},
    "finetuning.trainable_layers": {"finetuning.trainable_layers": 1},
    "finetuning.loss": {"finetuning.loss": "macro_f1"},
    "finetuning.optimizer": {"finetuning.optimizer": "lamb"},
    "finetuning.device": {"finetuning.device": "auto"},
    "finetuning.kfold": {"finetuning.kfold": 2},
    "finetuning.kfold_on": {"finetuning.kfold": 2, "finetuning.kfold_on": "train+dev"},
    "finetuning.no_test_protocol": {f"tasks.{TASK}.dataset.test_file": None, "finetuning.no_test_protocol": "dev_as_test"},
    "representation.max_len": {"representation.max_len": MAX_LEN - 2},
    "representation.max_len_test": {"representation.max_len_test": MAX_LEN - 2},
    "preprocess.users": {"preprocess.users": None},
    "preprocess.urls": {"preprocess.urls": None},
    "preprocess.laughter_token": {"preprocess.laughter_token": "jeje"},
    "preprocess.empty_text": {"preprocess.empty_text": "[nada]"},
    "runtime.threads": {"runtime.threads": 2},
    # output-neutral: the rerun continues the first run's checkpoints (the library call runs one process
    # either way; tests/test_worker_invariance.py launches 1, 2 and 4)
    "runtime.workers": {"runtime.workers": 1},
    f"tasks.{TASK}.dataset.data_dir": lambda _, inputs: {f"tasks.{TASK}.dataset.data_dir": str(inputs / "task-copy")},
    f"tasks.{TASK}.dataset.train_file": lambda _, inputs: _renamed(inputs, "train.tsv"),
    f"tasks.{TASK}.dataset.dev_file": {f"tasks.{TASK}.dataset.dev_file": None},
    f"tasks.{TASK}.dataset.test_file": {f"tasks.{TASK}.dataset.test_file": None},
    f"tasks.{TASK}.dataset.id_header": lambda _, inputs: _headers(inputs, "id_header", "IDX"),
    f"tasks.{TASK}.dataset.text_header": lambda _, inputs: _headers(inputs, "text_header", "TEXTO"),
    f"tasks.{TASK}.dataset.class_header": lambda _, inputs: _headers(inputs, "class_header", "CLASE"),
    f"tasks.{TASK}.dataset.aux_header": lambda _, inputs: {f"tasks.{TASK}.dataset.data_dir": str(inputs / "task-aux"),
                                                          f"tasks.{TASK}.dataset.aux_header": "CONTEXT"},
    f"tasks.{TASK}.dataset.delimiter": lambda _, inputs: _headers(inputs, "delimiter", ";"),
    f"tasks.{TASK}.dataset.dev_fraction": {f"tasks.{TASK}.dataset.dev_file": None,
                                          f"tasks.{TASK}.dataset.dev_fraction": 0.3},
    f"tasks.{TASK}.task.regression": lambda _, inputs: {
        f"tasks.{TASK}.dataset.data_dir": str(inputs / "task-regression"), f"tasks.{TASK}.task.regression": True,
        f"tasks.{TASK}.task.categories": {}, f"tasks.{TASK}.task.eval_metric": "pearson"},
    f"tasks.{TASK}.task.multi_label": lambda _, inputs: {
        f"tasks.{TASK}.dataset.data_dir": str(inputs / "task-multi"), f"tasks.{TASK}.task.multi_label": True,
        f"tasks.{TASK}.task.categories": {"alegria": 0, "enfado": 1, "miedo": 2},
        f"tasks.{TASK}.task.eval_metric": "jaccard"},
    f"tasks.{TASK}.task.categories": {f"tasks.{TASK}.task.categories": {"N": 0, "P": 1, "NEU": 2, "NONE": 3}},
    f"tasks.{TASK}.task.class_weights": {f"tasks.{TASK}.task.class_weights": "auto"},
    f"tasks.{TASK}.task.eval_metric": {f"tasks.{TASK}.task.eval_metric": "accuracy"},
    f"tasks.{TASK}.task.average_metric": {f"tasks.{TASK}.task.average_metric": "micro"},
    f"tasks.{TASK}.task.class_metric": {f"tasks.{TASK}.task.average_metric": None,
                                        f"tasks.{TASK}.task.class_metric": "P"},
    f"tasks.{TASK}.task.threshold": {f"tasks.{TASK}.task.threshold": 0.3},
    f"tasks.{TASK}.compare_as": {f"tasks.{TASK}.compare_as": TASK},
}

# Keys with no other value this walk can run, each with the reason; the test checks every one is
# walked (a stale entry fails) and that the list stays this short.
NOT_APPLICABLE = {
    "training.compile": "torch.compile needs a C compiler and ~30 s a run on CPU; the key is part of the run's "
                        "identity, so a change starts fresh (test_the_identity_covers_every_key_but_the_listed)",
    "training.init_from": "hf is continued pretraining (train/continued.py), which needs a vocab stage run on a "
                          "Hugging Face tokenizer; the key is part of the identity, as above",
    "training.rop": "read only under training.init_from hf (validation refuses it otherwise); part of the identity",
    "training.hf_path": "read only under training.init_from hf; part of the identity",
    f"tasks.{TASK}.name": "the task's key in params.yaml, not a value one can set",
    f"tasks.{TASK}.finetuning": "a task's overrides resolve into finetuning.<key> before anything reads them: "
                                "those keys are walked",
    f"tasks.{TASK}.task.stance_f1": "needs a stance task's FAVOR/AGAINST categories; part of the identity",
}


def _renamed(inputs: Path, name: str) -> dict:
    return {f"tasks.{TASK}.dataset.data_dir": str(inputs / "task-copy"),
            f"tasks.{TASK}.dataset.train_file": "other-train.tsv"}


def _headers(inputs: Path, key: str, value: str) -> dict:
    return {f"tasks.{TASK}.dataset.data_dir": str(inputs / f"task-{key}"), f"tasks.{TASK}.dataset.{key}": value}


def _literal_choices(tp: Any) -> Optional[tuple]:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return typing.get_args(tp)
    if origin is Union:
        for arg in typing.get_args(tp):
            found = _literal_choices(arg)
            if found:
                return found
    return None


def alternative(key: str, tp: Any, raw: dict, inputs: Path) -> dict:
    """Dotted key -> value: another valid value for ``key`` (with what it must come with)."""
    if key in ALTERNATIVES:
        alt = ALTERNATIVES[key]
        return alt(raw, inputs) if callable(alt) else dict(alt)
    value = _get(raw, key)
    choices = _literal_choices(tp)
    if choices:
        return {key: next(c for c in choices if c != value)}
    if isinstance(value, bool):
        return {key: not value}
    if isinstance(value, int):
        return {key: value + 1}
    if isinstance(value, float):
        return {key: value / 2 if value else 0.1}
    raise AssertionError(f"{key} = {value!r} ({tp}): no generic alternative; add one to ALTERNATIVES")


def _get(raw: dict, dotted: str) -> Any:
    node: Any = raw
    for part in dotted.split("."):
        node = node[part]
    return node


def changed(raw: dict, overrides: dict) -> dict:
    raw = copy.deepcopy(raw)
    for dotted, value in overrides.items():
        *parents, last = dotted.split(".")
        node = raw
        for part in parents:
            node = node[part]
        node[last] = value
    return raw


# --------------------------------------------------------------------------------------------
# The runs: the stage's library entry, and its output files
# --------------------------------------------------------------------------------------------

MICRO_MODEL = ["model=tiny", "model.hidden_size=8", "model.embedding_size=4", "model.intermediate_size=8",
               "model.n_encoders=1", "model.n_heads=2", "model.rop.hidden_size=4", "model.pkm_params.k_dim=4",
               "model.pkm_params.memory_size=4", "model.pkm_params.knn=2", "model.pkm_params.n_heads=1",
               "model.input_dropout=0.1", "model.output_dropout=0.1"]
PRETRAIN = [*MICRO_MODEL, f"representation.max_len={MAX_LEN}", "training.batch_size=4", "training.epochs=2",
            "training.accum_iters=1", "training.checkpoint_every=2", "training.pll_examples=1", "training.device=cpu",
            "training.log_every=1", "training.warmup_steps=2"]
FINETUNE = {"epochs": 3, "patience": 2, "batch_size": 8, "pred_batch_size": 8, "lr": 1e-2, "device": "cpu",
            "baseline_row": False, "checkpoint_every": 2, "hidden_size": 4, "warmup_steps": 2}


def run_pretrain(raw: dict, inputs: Path, out: Path) -> None:
    from twilbert.train.pretrain import pretrain

    cfg = load_config(raw)  # the pair shards are built for one max_len (the pairs stage's param)
    metrics = pretrain(resolve_pretrain_run(cfg), inputs / f"pairs-{cfg.representation.max_len}", inputs / "vocab", out / "model",
                       out / "ck", curves_dir=out / "curves")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")


def run_finetune(raw: dict, inputs: Path, out: Path) -> None:
    from twilbert.train.finetune.resolved import resolve_finetune_run
    from twilbert.train.finetune.stage_work import finetune_run

    cfg = load_config(raw)
    run = resolve_finetune_run(cfg, cfg.tasks[TASK], inputs / "pretrained", run_seed=1)
    finetune_run(run, out / "model", out / "results", checkpoint_dir=out / "ck", baseline_row=False)


def outputs(out: Path) -> dict[str, bytes]:
    """Every file the run wrote but its training checkpoints, by relative path."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.relative_to(out).parts[0] != "ck"}


def assert_rerun_is_fresh(run: Callable, raw: dict, key: str, tp: Any, inputs: Path, first: Path,
                          tmp: Path) -> None:
    new = changed(raw, alternative(key, tp, raw, inputs))
    load_config(new)  # the alternative is valid
    rerun, fresh = tmp / "rerun", tmp / "fresh"
    shutil.copytree(first / "ck", rerun / "ck")
    run(new, inputs, rerun)
    run(new, inputs, fresh)
    got, want = outputs(rerun), outputs(fresh)
    assert sorted(got) == sorted(want), f"{key}: the rerun wrote other files than a fresh run"
    differ = [name for name in want if got[name] != want[name]]
    assert not differ, f"{key}: after the change, the rerun's {differ} differ from a fresh run's"


# --------------------------------------------------------------------------------------------
# Inputs and first runs
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pretrain_inputs(tmp_path_factory) -> tuple[dict, Path, Path]:
    root = tmp_path_factory.mktemp("rerun-pretrain")
    train_vocab([t for t, _ in make_tweets(100)], root / "vocab", VocabConfig(vocab_size=60))
    for max_len in (MAX_LEN, MAX_LEN - 2):  # representation.max_len's alternative needs its own pairs
        build_pair_shards([(t, None) for t, _ in make_tweets(24, seed=1)], Tokenizer(root / "vocab"),
                          root / f"pairs-{max_len}", max_len=max_len, heldout_fraction=0.2, shard_size=1000, seed=0)
    raw = compose_plain(PRETRAIN, REPO / "conf")
    run_pretrain(raw, root, root / "first")
    shutil.copytree(root / "first" / "model", root / "initial")  # training.path_initial_weights' alternative
    return raw, root, root / "first"


def _write_task_variants(root: Path) -> dict:
    entry = write_task(root / "task", sizes=(24, 8, 8))
    shutil.copytree(root / "task", root / "task-copy")
    shutil.copy(root / "task" / "train.tsv", root / "task-copy" / "other-train.tsv")
    write_task(root / "task-aux", sizes=(24, 8, 8), aux=True)
    write_task(root / "task-regression", kind="regression", sizes=(24, 8, 8))
    write_task(root / "task-multi", kind="multi", sizes=(24, 8, 8))
    renamed = {"id_header": ("ID", "IDX"), "text_header": ("TEXT", "TEXTO"), "class_header": ("CLASS", "CLASE")}
    for key, (old, new) in renamed.items():
        for name in ("train", "dev", "test"):
            header, *rows = [line.split("\t") for line in (root / "task" / f"{name}.tsv").read_text().splitlines()]
            write_rows(root / f"task-{key}" / f"{name}.tsv", [new if h == old else h for h in header], rows)
    for name in ("train", "dev", "test"):
        text = (root / "task" / f"{name}.tsv").read_text()
        assert ";" not in text
        (root / "task-delimiter").mkdir(exist_ok=True)
        (root / "task-delimiter" / f"{name}.tsv").write_text(text.replace("\t", ";"))
    return entry


@pytest.fixture(scope="module")
def finetune_inputs(tmp_path_factory) -> tuple[dict, Path, Path]:
    root = tmp_path_factory.mktemp("rerun-finetune")
    make_pretrained(root / "pretrained")
    make_hf_bert(root / "hf")
    entry = _write_task_variants(root)
    raw = compose_plain(["model=tiny", f"representation.max_len={MAX_LEN}"], REPO / "conf")
    raw["tasks"] = {TASK: entry}
    raw["finetuning"].update(FINETUNE)
    raw = load_config_roundtrip(raw)
    run_finetune(raw, root, root / "first")
    return raw, root, root / "first"


def load_config_roundtrip(raw: dict) -> dict:
    """``raw`` with every schema default filled in, as params.yaml holds the whole composition."""
    from twilbert.config import to_dict

    cfg = load_config(raw)
    out = copy.deepcopy(raw)
    out["tasks"] = {name: {k: v for k, v in to_dict(task).items() if k != "name"} for name, task in cfg.tasks.items()}
    return out


# --------------------------------------------------------------------------------------------
# The walk
# --------------------------------------------------------------------------------------------

PRETRAIN_KEYS = stage_keys("pretrain")
FINETUNE_KEYS = stage_keys("finetune")


def _walked(keys: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    return [(k, tp) for k, tp in keys if k not in NOT_APPLICABLE]


def test_the_walk_covers_every_key_of_both_stages_and_says_how_many():
    pretrain_keys = {k for k, _ in PRETRAIN_KEYS}
    finetune_keys = {k for k, _ in FINETUNE_KEYS}
    # a new schema key lands here by itself: these counts move with the schema, on purpose
    print(f"rerun-is-fresh walk: {len(_walked(PRETRAIN_KEYS))} pretraining keys and {len(_walked(FINETUNE_KEYS))} "
          f"finetuning keys walked; {len(NOT_APPLICABLE)} listed as not applicable")
    assert len(_walked(PRETRAIN_KEYS)) >= 55 and len(_walked(FINETUNE_KEYS)) >= 50
    stale = sorted(set(NOT_APPLICABLE) - pretrain_keys - finetune_keys)
    assert not stale, f"NOT_APPLICABLE names keys no stage reads: {stale}"
    assert all(len(reason) > 30 for reason in NOT_APPLICABLE.values())
    assert len(NOT_APPLICABLE) <= 8
    unused = sorted(set(ALTERNATIVES) - pretrain_keys - finetune_keys)
    assert not unused, f"ALTERNATIVES names keys no stage reads: {unused}"


def test_keys_left_out_of_the_identity_are_few_and_each_has_a_reason():
    assert set(OUTPUT_NEUTRAL_KEYS) == {"tracking", "training.checkpoint_every", "finetuning.checkpoint_every",
                                        "finetuning.baseline_model", "finetuning.baseline_c",
                                        "finetuning.baseline_row", "runtime.workers"}
    assert all(len(reason) > 20 for reason in OUTPUT_NEUTRAL_KEYS.values())


def test_a_run_keeps_its_identity_on_any_worker_count_but_not_on_another_thread_count():
    from twilbert.train.pretrain import FINGERPRINT_KEYS

    def identity(*overrides: str) -> str:
        run = resolve_pretrain_run(load_config(compose_plain([*PRETRAIN, *overrides], REPO / "conf")))
        return config_fingerprint(run.params(), include=FINGERPRINT_KEYS)

    # null (auto: min(cores, K), so it follows the core count), 1, 2 and 3 workers are one run
    assert len({identity(), *(identity(f"runtime.workers={n}") for n in (1, 2, 3))}) == 1
    assert identity("runtime.threads=2") != identity()


@pytest.mark.parametrize("key,tp", _walked(PRETRAIN_KEYS), ids=[k for k, _ in _walked(PRETRAIN_KEYS)])
def test_a_pretraining_rerun_after_changing_a_key_writes_the_bytes_of_a_fresh_run(key, tp, pretrain_inputs,
                                                                                  tmp_path):
    raw, inputs, first = pretrain_inputs
    assert_rerun_is_fresh(run_pretrain, raw, key, tp, inputs, first, tmp_path)


@pytest.mark.parametrize("key,tp", _walked(FINETUNE_KEYS), ids=[k for k, _ in _walked(FINETUNE_KEYS)])
def test_a_finetuning_rerun_after_changing_a_key_writes_the_bytes_of_a_fresh_run(key, tp, finetune_inputs,
                                                                                 tmp_path):
    raw, inputs, first = finetune_inputs
    assert_rerun_is_fresh(run_finetune, raw, key, tp, inputs, first, tmp_path)
