"""DVC hashes bytes: the same tensors and arrays, saved in two processes, give the same file."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from twilbert.io_utils import save_npz
from twilbert.model.safetensors_writer import save_file

pytestmark = pytest.mark.reliability

REPO = Path(__file__).resolve().parents[1]

# Run in a fresh interpreter per save: the key order of a Rust HashMap (safetensors' metadata)
# changes per process, so one process saving twice would not catch it.
SAVE_SCRIPT = r"""
import random, sys
import numpy as np, torch
from twilbert.config import ModelConfig
from twilbert.model import ModelCard, TWilBertForPretraining, save_pretrained
from twilbert.train.checkpoint import save_training_checkpoint
from twilbert.train.optim import build_optimizer, build_scheduler, param_groups

random.seed(0), np.random.seed(0), torch.manual_seed(0)  # trainer.json holds every RNG state, as training seeds them
cfg = ModelConfig(embedding_size=8, hidden_size=16, n_encoders=2, n_heads=2, intermediate_size=32)
model = TWilBertForPretraining(cfg, 40, 16)  # the MLM decoder is tied to the word embeddings
out = sys.argv[1]
save_pretrained(out + "/model", model, ModelCard(cfg, 40, 16))
opt = build_optimizer("adam", param_groups(model, 1e-3, 0.01), 1e-3, 0.01)
sched = build_scheduler(opt, True, 16, 4)
state = {"epoch": 0, "batch_in_epoch": 3, "optimizer_steps": 3, "micro_steps": 3, "accum_position": 0}
save_training_checkpoint(out + "/ck", model, opt, sched, state, "f" * 64,
                         tensors={"best": {"w": torch.arange(6.0)}})
"""


def sha256_tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_model_directory_and_a_training_checkpoint_saved_in_two_processes_are_byte_identical(tmp_path):
    trees = []
    for i, hash_seed in enumerate(("1", "2", "3")):
        env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "PYTHONHASHSEED": hash_seed}
        subprocess.run([sys.executable, "-c", SAVE_SCRIPT, str(tmp_path / str(i))], env=env, check=True,
                       capture_output=True, timeout=300)
        trees.append(sha256_tree(tmp_path / str(i)))
    assert "model/model.safetensors" in trees[0] and "ck/step-00000003/model.safetensors" in trees[0]
    assert trees[0] == trees[1] == trees[2]


def test_written_files_read_back_with_the_safetensors_library(tmp_path):
    tensors = {
        "b": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "a": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
        "ids": torch.tensor([3, 1, 2], dtype=torch.int64),
        "mask": torch.tensor([True, False]),
        "scalar": torch.tensor(7.0, dtype=torch.float64),
        "empty": torch.zeros(0, 4),
        "strided": torch.arange(12.0).reshape(3, 4).t(),
    }
    save_file(tensors, tmp_path / "t.safetensors", metadata={"z": "1", "format": "pt"})
    loaded = load_file(str(tmp_path / "t.safetensors"))
    assert loaded.keys() == tensors.keys()
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t), name
    with safe_open(str(tmp_path / "t.safetensors"), framework="pt") as f:
        assert f.metadata() == {"z": "1", "format": "pt"}
    header_len = int.from_bytes((tmp_path / "t.safetensors").read_bytes()[:8], "little")
    assert header_len % 8 == 0  # the tensor data starts aligned


def test_metadata_order_does_not_change_the_bytes(tmp_path):
    t = {"w": torch.ones(2)}
    save_file(t, tmp_path / "1.safetensors", metadata={"a": "1", "b": "2", "c": "3"})
    save_file(t, tmp_path / "2.safetensors", metadata={"c": "3", "b": "2", "a": "1"})
    assert (tmp_path / "1.safetensors").read_bytes() == (tmp_path / "2.safetensors").read_bytes()


def test_npz_bytes_do_not_depend_on_the_clock(tmp_path, monkeypatch):
    arrays = {"input_ids": np.arange(12, dtype=np.int32).reshape(3, 4), "labels": np.array([1, 0, 1])}
    save_npz(tmp_path / "now.npz", **arrays)
    monkeypatch.setattr(time, "time", lambda: 2_000_000_000.0)  # 2033: np.savez would stamp this
    save_npz(tmp_path / "later.npz", **arrays)
    assert (tmp_path / "now.npz").read_bytes() == (tmp_path / "later.npz").read_bytes()
    with np.load(tmp_path / "later.npz", allow_pickle=False) as z:
        assert list(z.keys()) == ["input_ids", "labels"]
        assert all(np.array_equal(z[k], v) for k, v in arrays.items())
