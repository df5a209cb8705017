import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from twilbert.config import ConfigError, compose, load_config

REPO = Path(__file__).resolve().parents[1]


def test_committed_params_equal_the_composition_of_conf():
    committed = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    assert committed == compose([], REPO / "conf")


@pytest.mark.parametrize("preset", ["tiny", "base", "large", "xlarge", "xxlarge"])
def test_every_model_preset_composes_and_validates(preset):
    cfg = load_config(compose([f"model={preset}"], REPO / "conf"))
    assert cfg.model.name == preset


def test_readme_table_presets_have_the_documented_sizes():
    sizes = {p: load_config(compose([f"model={p}"], REPO / "conf")).model for p in ("base", "large", "xlarge", "xxlarge")}
    assert [(m.n_encoders, m.n_heads) for m in sizes.values()] == [(6, 6), (10, 10), (12, 12), (16, 16)]
    for m in sizes.values():
        assert (m.embedding_size, m.hidden_size, m.cross_sharing) == (128, 768, True)
        assert (m.pkm_params.knn, m.pkm_params.memory_size, m.pkm_params.k_dim, m.pkm_params.n_heads) == (32, 256, 512, 4)


def test_hydra_override_reaches_the_config():
    cfg = load_config(compose(["model.n_encoders=4"], REPO / "conf"))
    assert cfg.model.n_encoders == 4


@pytest.mark.reliability
def test_unknown_key_is_rejected_with_its_dotted_name(tiny_raw):
    tiny_raw["model"]["n_encoder"] = 3
    with pytest.raises(ConfigError, match=r"model\.n_encoder\b"):
        load_config(tiny_raw)


@pytest.mark.reliability
def test_wrong_type_is_rejected_with_its_key(tiny_raw):
    tiny_raw["training"]["batch_size"] = "32"
    with pytest.raises(ConfigError, match=r"training\.batch_size must be an integer"):
        load_config(tiny_raw)


@pytest.mark.reliability
@pytest.mark.parametrize(
    "section,key,value,message",
    [
        ("representation", "max_len_test", 999, r"max_len_test .* must be <= representation\.max_len"),
        ("model", "n_heads", 3, r"model\.n_heads \(3\) must divide model\.hidden_size"),
        ("model", "masked_lm", {"budget": 1.5}, r"model\.masked_lm\.budget"),
    ],
)
def test_inconsistent_values_are_rejected_before_any_work(tiny_raw, section, key, value, message):
    if isinstance(value, dict):
        tiny_raw[section][key].update(value)
    else:
        tiny_raw[section][key] = value
    with pytest.raises(ConfigError, match=message):
        load_config(tiny_raw)


@pytest.mark.reliability
def test_knn_larger_than_memory_is_rejected(tiny_raw):
    tiny_raw["model"]["pkm"] = True
    tiny_raw["model"]["pkm_params"].update(knn=64, memory_size=16, in_layers=[0])
    with pytest.raises(ConfigError, match=r"model\.pkm_params\.knn \(64\) must be <= model\.pkm_params\.memory_size"):
        load_config(tiny_raw)


@pytest.mark.reliability
def test_task_class_metric_must_be_a_category(tiny_raw):
    tiny_raw["tasks"]["tass_default"]["task"]["class_metric"] = "HUMOR"
    with pytest.raises(ConfigError, match=r"tasks\.tass_default\.task\.class_metric 'HUMOR'"):
        load_config(tiny_raw)


@pytest.mark.reliability
def test_compare_as_must_name_a_task(tiny_raw):
    tiny_raw["tasks"]["tass_default"]["compare_as"] = "coset17"
    with pytest.raises(ConfigError, match=r"tasks\.tass_default\.compare_as 'coset17' is not a task"):
        load_config(tiny_raw)


def set_dotted(raw: dict, key: str, value) -> None:
    *parents, last = key.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})  # a task's `finetuning:` overrides may be absent
    node[last] = value


# Each value is refused on load, before any work, with a message naming its key.
INVALID_VALUES = [
    # the 17 an independent probe found accepted (issue 11)
    ("representation.max_len", 100000),
    ("representation.max_len_test", 0),
    ("training.optimizer", "foo"),
    ("finetuning.optimizer", "foo"),
    ("finetuning.loss", "foo"),
    ("training.device", "tpu"),
    ("training.weight_decay", -1),
    ("training.max_grad_norm", -1),
    ("model.intermediate_size", -5),
    ("model.rop.hidden_size", -3),
    ("model.rop.n_hidden", -1),
    ("model.layer_norm_eps", -1),
    ("model.initializer_range", -1),
    ("model.attention_size", -8),
    ("vocab.vocab_size", 100000000),
    ("pairs.heldout_fraction", 1.5),
    ("pairs.shard_size", 0),
    # and what a reading of config.py found unchecked
    ("seed", -1),
    ("seed", 2**32),
    ("model.name", " "),
    ("model.pkm_params.value_lr", 0),
    ("model.pkm_params.value_size", 0),
    ("representation.max_len_test", -4),
    ("vocab.character_coverage", 0),
    ("vocab.character_coverage", 1.5),
    ("pairs.heldout_fraction", -0.1),
    ("training.lr", float("nan")),
    ("training.max_grad_norm", 0),
    ("training.device", "cuda:x"),
    ("training.path_initial_weights", ""),
    ("finetuning.device", "gpu"),
    ("finetuning.weight_decay", -0.1),
    ("finetuning.max_grad_norm", 0),
    ("data.delimiter", ",,"),
    ("data.delimiter", "\n"),
    ("data.evomsa_sha256", "abc"),
    ("data.orig_text_header", ""),
    ("tracking.experiment", ""),
    ("runtime.threads", -2),
    ("training.micro_batches", 0),
    ("training.micro_batches", 10_000),  # more micro-batches than examples in a global batch
    ("finetuning.micro_batches", 0),
    # a task's own finetuning overrides and its dataset/labels
    ("tasks.tass_default.finetuning.optimizer", "foo"),
    ("tasks.tass_default.finetuning.loss", "foo"),
    ("tasks.tass_default.finetuning.loss", "mse"),  # a regression loss on a classification task
    ("tasks.tass_default.finetuning.weight_decay", -1),
    ("tasks.tass_default.finetuning.device", "tpu"),
    ("tasks.tass_default.dataset.dev_fraction", 0),
    ("tasks.tass_default.dataset.delimiter", ""),
    ("tasks.tass_default.dataset.text_header", ""),
    ("tasks.tass_default.task.class_weights", {"NOT_A_LABEL": 1.0}),
    ("tasks.tass_default.task.class_weights", {"P": -1.0}),
    ("tasks.tass_default.task.multi_label", True),  # the task is already regression below
]


@pytest.mark.reliability
@pytest.mark.parametrize("key,value", INVALID_VALUES, ids=[f"{k}={v!r}" for k, v in INVALID_VALUES])
def test_an_invalid_value_is_rejected_with_a_message_naming_its_key(tiny_raw, key, value):
    if key == "tasks.tass_default.task.multi_label":
        tiny_raw["tasks"]["tass_default"]["task"]["regression"] = True
    set_dotted(tiny_raw, key, value)
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(tiny_raw)


@pytest.mark.reliability
def test_any_torch_optimizer_and_every_twilbert_loss_are_accepted(tiny_raw):
    tiny_raw["training"]["optimizer"] = "SGD"
    tiny_raw["finetuning"].update(optimizer="lamb_accumulated", loss="macro_f1")
    cfg = load_config(tiny_raw)
    assert (cfg.training.optimizer, cfg.finetuning.loss) == ("SGD", "macro_f1")


@pytest.mark.reliability
@pytest.mark.parametrize(
    "key,value,message",
    [
        ("max_repeat", 0, r"preprocess\.max_repeat must be >= 1"),
        ("emoji", "emojis", r"preprocess\.emoji must be one of"),
        ("lowercased", True, r"unknown config key\(s\): preprocess\.lowercased"),
    ],
)
def test_the_preprocess_section_is_typed_and_checked_like_the_others(tiny_raw, key, value, message):
    from twilbert.config import PreprocessConfig

    assert isinstance(load_config(tiny_raw).preprocess, PreprocessConfig)
    tiny_raw["preprocess"][key] = value
    with pytest.raises(ConfigError, match=message):
        load_config(tiny_raw)


def test_loading_the_config_imports_none_of_the_code_it_configures():
    # No import circle (the preprocess section was once defined beside the normalization code it drives).
    code = ("import sys; from twilbert.config import load_config; load_config('params.yaml'); "
            "print(sorted(m for m in sys.modules if m.startswith('twilbert.') and not m.startswith('twilbert.config')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['twilbert.errors']"  # the expected failures' base class, below every layer
