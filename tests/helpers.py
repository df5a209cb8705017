"""Helpers the test files share: generated tweets, tiny model directories shaped like the stages'
outputs, the real stage scripts run in a subprocess, and the acceptance script loaded as a module."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tarfile
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch
from safetensors.torch import load_file

from twilbert.cli import dump_params
from twilbert.config import ModelConfig, RopConfig, TaskConfig, TaskDataset, TaskSpec, VocabConfig
from twilbert.config.plain_compose import compose_plain
from twilbert.config.runs import finetune_runs
from twilbert.data.pairs import build_pair_shards
from twilbert.data.tokenizer import Tokenizer, train_vocab
from twilbert.model import HeadConfig, ModelCard, TWilBertForClassification, TWilBertForPretraining, save_pretrained
from twilbert.numerics import PINNED_BY_LAUNCHER, PORTABLE_ENV
from twilbert.pipeline.stage import KILL_HOOK_ENV

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# Generated tweets and corpora
# --------------------------------------------------------------------------------------------

WORDS = (
    "hola que tal estoy muy feliz hoy con mis amigos jajaja no me gusta nada este lunes "
    "qué bonito día gracias por todo odio el tráfico de la ciudad vamos al partido esta noche "
    "buenísimo el concierto de ayer url @usuario #fiesta 😂 🙏 increíble pésimo servicio"
).split()
LABELS = ("P", "N", "NEU", "NONE")


def make_tweets(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(text, label) pairs whose label leaves a trace in the words, so a model can learn something."""
    rng = random.Random(seed)
    cue = {"P": "feliz", "N": "odio", "NEU": "hoy", "NONE": "url"}
    out = []
    for i in range(n):
        label = LABELS[i % len(LABELS)]
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 14))]
        words.insert(rng.randint(0, len(words)), cue[label])
        out.append((" ".join(words), label))
    return out


def fake_sdist(path, tweets, version="2.0.14"):
    """An sdist-shaped tarball holding only EvoMSA's tweets.json."""
    payload = "\n".join(json.dumps({"text": t, "klass": k, "q_voc_ratio": 0.5}) for t, k in tweets).encode()
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(f"evomsa-{version}/EvoMSA/tests/tweets.json")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------
# Tiny model directories (random weights) shaped like the stages' outputs
# --------------------------------------------------------------------------------------------

CATEGORIES = {"N": 0, "NEU": 1, "NONE": 2, "P": 3}
EMOTIONS = {"anger": 0, "joy": 1, "fear": 2}
LONG = "odio el tráfico de la ciudad " * 200  # ~5,800 characters, far over max_len tokens


def tiny_model_cfg(**overrides) -> ModelConfig:
    fields = dict(embedding_size=8, hidden_size=16, n_encoders=2, n_heads=2, intermediate_size=32,
                  pkm=False, rop=RopConfig(hidden_size=16))
    fields.update(overrides)
    cfg = ModelConfig(**fields)
    cfg.validate()
    return cfg


def build_vocab(directory: Path, n_texts: int = 300, vocab_size: int = 120) -> Path:
    return train_vocab([t for t, _ in make_tweets(n_texts)], directory, VocabConfig(vocab_size=vocab_size))


def build_finetuned(directory: Path, vocab_dir: Path, kind: str = "single_label", aux_header=None,
                    max_len: int = 16, collapse_mode: str = "avg", seed: int = 0, n_hidden: int = 0,
                    use_special_tokens: bool = True, **model_overrides) -> Path:
    """A finetune-stage-shaped model directory with random weights: single_label, multi_label or regression."""
    spec = {
        "single_label": TaskSpec(categories=dict(CATEGORIES)),
        "multi_label": TaskSpec(categories=dict(EMOTIONS), multi_label=True, threshold=0.5),
        "regression": TaskSpec(regression=True, eval_metric="pearson"),
    }[kind]
    task = TaskConfig(name=f"t_{kind}", dataset=TaskDataset(aux_header=aux_header), task=spec)
    n_out = 1 if spec.regression else len(spec.categories)
    tokenizer = Tokenizer(vocab_dir)
    cfg = tiny_model_cfg(**model_overrides)
    max_positions = 2 * max_len + 3
    torch.manual_seed(seed)
    model = TWilBertForClassification(cfg, tokenizer.vocab_size, max_positions, n_out, collapse_mode,
                                      use_special_tokens, n_hidden=n_hidden, head_hidden_size=32)
    with torch.no_grad():  # weights far from the tiny init, so that texts get clearly different scores
        for p in model.parameters():
            p.add_(torch.randn(p.shape) * 0.3)
    head = HeadConfig(collapse_mode=collapse_mode, use_special_tokens=use_special_tokens, dropout=0.1,
                      n_hidden=n_hidden, hidden_size=32)
    config = ModelCard(cfg, tokenizer.vocab_size, max_positions, head=head, task=task, max_len_test=max_len)
    save_pretrained(directory, model, config)
    tokenizer.copy_to(directory)
    return directory


def copy_model(source: Path, target: Path, without: str = "") -> Path:
    """A copy of a model directory, less the file named ``without``."""
    target.mkdir()
    for f in source.iterdir():
        if f.name != without:
            (target / f.name).write_bytes(f.read_bytes())
    return target


def build_pretrained(directory: Path, vocab_dir: Path, max_len: int = 16, seed: int = 1) -> Path:
    """A pretrain-stage-shaped directory: encoder + MLM + ROP heads, config with max_len."""
    cfg = tiny_model_cfg()
    tokenizer = Tokenizer(vocab_dir)
    torch.manual_seed(seed)
    max_positions = 2 * max_len + 3
    model = TWilBertForPretraining(cfg, tokenizer.vocab_size, max_positions)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape) * 0.3)
    save_pretrained(directory, model, ModelCard.pretrained(cfg, tokenizer.vocab_size, max_len))
    tokenizer.copy_to(directory)
    return directory


def parse_tsv(text: str) -> tuple[list[str], list[list[str]]]:
    lines = text.split("\n")
    assert lines[-1] == ""
    header, *rows = [line.split("\t") for line in lines[:-1]]
    assert all(len(r) == len(header) for r in rows)
    return header, rows


# --------------------------------------------------------------------------------------------
# The real stage scripts in a subprocess, on tiny inputs
# --------------------------------------------------------------------------------------------

MAX_LEN = 12
# 108 training pairs, batch 8: 14 micro-steps an epoch; windows of 2; a checkpoint every 3 micro-steps.
PRETRAIN = ["model=tiny", f"representation.max_len={MAX_LEN}", "training.batch_size=8", "training.epochs=2",
            "training.accum_iters=2", "training.checkpoint_every=3", "training.pll_examples=2",
            "training.device=cpu"]


def make_pretrain_inputs(root: Path) -> Path:
    """A vocabulary and ROP pair shards of 60 generated tweets under ``root``."""
    train_vocab([t for t, _ in make_tweets(200)], root / "vocab", VocabConfig(vocab_size=120))
    build_pair_shards([(t, None) for t, _ in make_tweets(60, seed=1)], Tokenizer(root / "vocab"), root / "pairs",
                      max_len=MAX_LEN, heldout_fraction=0.1, shard_size=1000, seed=0)
    return root


def write_params(workdir: Path, overrides: list[str], tasks: Optional[dict] = None,
                 finetuning: Optional[dict] = None) -> dict:
    """``workdir/params.yaml``: conf/ composed with ``overrides``, as `make params` writes it.

    Composed in pure Python: the GPU tests write params with it on a machine without Hydra.
    """
    raw = compose_plain(overrides, REPO / "conf")
    if tasks is not None:
        raw["tasks"] = tasks
    if finetuning:
        raw["finetuning"].update(finetuning)
    raw["finetune_runs"] = finetune_runs(raw["tasks"], raw["finetuning"]["seeds"])  # as the composition derives it
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "params.yaml").write_text(dump_params(raw), encoding="utf-8")
    return raw


def run_stage(script: str, args: list, workdir: Path, kill_at: Optional[int] = None,
              launcher: Optional[list[str]] = None) -> subprocess.CompletedProcess:
    """``python stages/<script> args`` in ``workdir`` (which holds params.yaml), MLflow in a temp store."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workdir.parent / 'mlflow.db'}", "CI": "1"}
    env.pop(KILL_HOOK_ENV, None)
    if "ATEN_CPU_CAPABILITY" not in env:  # as stages/py exports them: no restart (test_numerics tests that path)
        env.update(PORTABLE_ENV, **{PINNED_BY_LAUNCHER: "1"})
    if kill_at is not None:
        env[KILL_HOOK_ENV] = str(kill_at)
    cmd = [*(launcher or [sys.executable]), str(REPO / "stages" / script), *map(str, args)]
    return subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def killed(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    # the stage process itself, or its own workers' launch (runtime.workers auto), which exits 128 + the
    # killed rank's signal
    assert proc.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL), (proc.returncode, proc.stderr[-4000:])
    return proc


def assert_same_weights(a: Path, b: Path) -> None:
    left, right = load_file(str(a)), load_file(str(b))
    assert left.keys() == right.keys()
    for name, tensor in left.items():
        assert torch.equal(tensor, right[name]), f"{name} differs"


def run_states(checkpoints: Path, name: str = "train_state") -> Path:
    """``<checkpoints>/run-<identity>/<name>``: the training checkpoints of the one run there (``train.run_dirs``)."""
    runs = sorted(p for p in Path(checkpoints).glob("run-*") if p.is_dir())
    assert len(runs) == 1, f"{checkpoints}: expected one run folder, found {[p.name for p in runs]}"
    return runs[0] / name


def steps(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("step-"))


def pretrain_args(inputs: Path, out: Path) -> list:
    return ["--pairs", inputs / "pairs", "--vocab", inputs / "vocab", "--out", out / "model",
            "--checkpoints", out / "checkpoints", "--metrics", out / "metrics.json"]


def finetune_args(inputs: Path, out: Path) -> list:
    return ["--task", "t", "--pretrained", inputs / "pretrained", "--model-out", out / "model",
            "--metrics-out", out / "results", "--checkpoints", out / "checkpoints"]


# --------------------------------------------------------------------------------------------
# Processes and scripts
# --------------------------------------------------------------------------------------------


def free_port() -> int:
    """A loopback port nobody listens on, for a test's own process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_gloo_group(rank: int, world_size: int, port: int):
    """In a spawned test worker: join a CPU process group on ``port`` as torchrun would set it up."""
    import torch

    from twilbert.train.distributed import init_distributed

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    return init_distributed("cpu")


def load_acceptance_script() -> ModuleType:
    """scripts/acceptance.py as a module: the acceptance harness lives beside its script, outside the package."""
    spec = importlib.util.spec_from_file_location("acceptance_script", REPO / "scripts" / "acceptance.py")
    script = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = script  # its dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(script)
    return script


# --------------------------------------------------------------------------------------------
# The four-row recipe of docs/continued-pretraining.md, as the page writes it
# --------------------------------------------------------------------------------------------

FOUR_ROW_PAGE = REPO / "docs" / "continued-pretraining.md"


def four_row_recipe_text() -> str:
    """The yaml block under "Did adapting help?" in docs/continued-pretraining.md."""
    text = FOUR_ROW_PAGE.read_text(encoding="utf-8")
    return text.split("## Did adapting help?", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]


def apply_four_row_recipe(conf_dir: Path) -> None:
    """conf_dir/config.yaml with the recipe's defaults and tasks, as a user pastes them in."""
    import yaml

    recipe = yaml.safe_load(four_row_recipe_text())
    path = Path(conf_dir) / "config.yaml"
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    config["defaults"] = recipe["defaults"]
    config["tasks"] = recipe["tasks"]
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")


def alive(pid: int) -> bool:
    """Running, not a zombie waiting for a parent to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"
