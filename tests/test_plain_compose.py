"""conf/ composed in pure Python (twilbert.config.plain_compose), as a lent GPU machine without Hydra
composes it: equal to Hydra's composition for the overrides the device path uses, and refusing what
it does not cover instead of composing it differently."""

from __future__ import annotations

import importlib.util

import pytest

from helpers import PRETRAIN, REPO
from twilbert.config import ConfigError, compose, load_config
from twilbert.config.plain_compose import compose_plain, parse_value

CONF = REPO / "conf"


def load_script(relative: str, name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def device_path_overrides() -> list[list[str]]:
    """The override lists of scripts/device_check.sh's parts: the benchmark, the device pipeline, the GPU tests."""
    bench = load_script("benchmarks/pretrain_throughput.py", "pretrain_throughput")
    pipeline = load_script("scripts/device_pipeline.py", "device_pipeline")
    return [
        bench.pretraining_overrides(bench.FULL, 32, "bf16", pkm=False, device="cuda"),
        bench.pretraining_overrides(bench.QUICK, 4, "fp32", pkm=True, act="gelu", compiled=True),
        pipeline.overrides("cuda", "bf16"),
        pipeline.overrides("cpu", "fp32"),
        ["model=tiny", "representation.max_len=16", "model.input_dropout=0.0", "model.output_dropout=0.0",
         "training.device=cuda", "model.n_heads=2", "training.log_every=5", "training.precision=bf16"],
        PRETRAIN,
    ]


OTHER_OVERRIDES = [
    [],
    *[[f"model={preset}"] for preset in ("tiny", "base", "large", "xlarge", "xxlarge")],
    ["task@tasks.tass_default=haha18", "+task@tasks.coset17=coset17", "finetuning.epochs=3"],
    ["training.lr=1e-3", "training.warmup_steps=1_000", "data.split=[0.5, 0.25,0.25]", "seed=+7",
     "tracking.uri='sqlite:///x.db'", "data.delimiter=','", "training.device=null", "training.tf32=TRUE"],
    ["+training.extra=a b", "++seed=5", "++new.deep=[1, 'a,b', {x: 1, y: [null, true]}]"],
]


@pytest.mark.parametrize("overrides", device_path_overrides() + OTHER_OVERRIDES, ids=lambda o: " ".join(o)[:60])
def test_plain_composition_equals_hydras(overrides):
    pytest.importorskip("hydra")
    assert compose_plain(overrides, CONF) == compose(overrides, CONF)


def test_the_device_path_overrides_give_a_valid_config():
    for overrides in device_path_overrides():
        load_config(compose_plain(overrides, CONF))


def test_without_overrides_it_composes_the_committed_params_yaml():
    import yaml

    assert compose_plain([], CONF) == yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))


@pytest.mark.parametrize("text,value", [
    ("null", None), ("NULL", None), ("true", True), ("False", False), ("7", 7), ("-3", -3), ("1_000", 1000),
    ("1e-3", 1e-3), ("0.5", 0.5), (".5", 0.5), ("2.", 2.0), ("bf16", "bf16"), ("'007'", "007"), ('"a b"', "a b"),
    ("[4]", [4]), ("[]", []), ("[1, [2, 'x']]", [1, [2, "x"]]), ("{a: 1, b: [true]}", {"a": 1, "b": [True]}),
    ("sqlite:///a.db", "sqlite:///a.db"), ("gelu_new", "gelu_new"),
])
def test_override_values_follow_hydras_grammar(text, value):
    got = parse_value(text)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize("override,message", [
    (["model.nope=1"], "unknown config key(s): model.nope (known: attention_size"),
    (["training.nope.deeper=1"], "unknown config key(s): training.nope.deeper"),
    (["model=huge"], "model=huge: no"),
    (["+seed=3"], "seed is already set"),
    (["seed=1,2"], "sweep"),
    (["~seed"], "need Hydra"),
    (["training.lr=${seed}"], "interpolations"),
    (["task@tasks.other=haha18"], "no task@tasks.other in the defaults list"),
])
def test_what_it_does_not_cover_is_refused_with_the_key_named(override, message):
    with pytest.raises(ConfigError) as err:
        compose_plain(override, CONF)
    assert message in str(err.value)
