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

from twilbert.io_utils import save_npz
from twilbert.model.io import TIED_KEY, read_weights, save_weights

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


def test_a_weights_file_has_one_metadata_key_and_reads_back_tied(tmp_path):
    # safetensors keeps metadata in a hash map: with one key its order, and the bytes, cannot vary
    embeddings = torch.arange(12.0).reshape(4, 3)
    state = {"decoder.weight": embeddings, "embeddings.weight": embeddings, "bias": torch.zeros(4)}
    aliases = save_weights(state, tmp_path / "w.safetensors")
    assert aliases == {"embeddings.weight": "decoder.weight"}
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt") as f:
        assert list(f.metadata()) == [TIED_KEY] and sorted(f.keys()) == ["bias", "decoder.weight"]
    loaded = read_weights(tmp_path / "w.safetensors")
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], v) for k, v in state.items())


def test_npz_bytes_do_not_depend_on_the_clock(tmp_path, monkeypatch):
    arrays = {"input_ids": np.arange(12, dtype=np.int32).reshape(3, 4), "labels": np.array([1, 0, 1])}
    save_npz(tmp_path / "now.npz", **arrays)
    monkeypatch.setattr(time, "time", lambda: 2_000_000_000.0)  # 2033: np.savez would stamp this
    save_npz(tmp_path / "later.npz", **arrays)
    assert (tmp_path / "now.npz").read_bytes() == (tmp_path / "later.npz").read_bytes()
    with np.load(tmp_path / "later.npz", allow_pickle=False) as z:
        assert list(z.keys()) == ["input_ids", "labels"]
        assert all(np.array_equal(z[k], v) for k, v in arrays.items())
