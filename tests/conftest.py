"""Shared fixtures: small generated corpora and a tiny config (tests make their own data)."""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path

import pytest

from twilbert.config import compose, load_config

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    # `make test` runs one pytest-xdist worker per core: each worker, and the stage processes it
    # starts, get one torch thread, or the workers' thread pools fight over the same cores.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)

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


@pytest.fixture
def tiny_raw() -> dict:
    raw = compose(["model=tiny"], REPO / "conf")
    raw["vocab"]["vocab_size"] = 120
    raw["representation"]["max_len"] = 16
    raw["training"]["epochs"] = 1
    raw["training"]["batch_size"] = 16
    raw["finetuning"]["epochs"] = 2
    return raw


@pytest.fixture
def tiny_cfg(tiny_raw):
    return load_config(tiny_raw)


def free_port() -> int:
    """A loopback port nobody listens on, for a test's own process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_gloo_group(rank: int, world_size: int, port: int):
    """In a spawned test worker: join a CPU process group on ``port`` as torchrun would set it up."""
    import torch

    from twilbert.distributed import init_distributed

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    return init_distributed("cpu")


@pytest.fixture
def in_project(project, monkeypatch):
    """The test file's ``project`` as the working directory, with no tracking or DVC variables leaking in."""
    monkeypatch.chdir(project)
    for var in ("MLFLOW_TRACKING_URI", "RANK", "DVC_EXP_NAME"):
        monkeypatch.delenv(var, raising=False)
    return project
