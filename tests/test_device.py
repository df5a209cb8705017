"""A config's ``device`` setting -> torch device: ``auto`` and a bare ``cuda`` under torchrun."""

import torch

from twilbert.device import pick_device, resolve_device


def test_auto_is_the_cpu_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert pick_device("auto", 3) == torch.device("cpu")


def test_auto_is_the_gpu_when_there_is_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert pick_device("auto", 3) == torch.device("cuda", 3)  # this rank's own GPU


def test_a_named_device_is_kept_and_only_a_bare_cuda_gets_the_local_rank():
    assert resolve_device("cpu") == torch.device("cpu")
    assert pick_device("cuda", 2) == torch.device("cuda", 2)
    assert pick_device("cuda:1", 2) == torch.device("cuda", 1)
    assert pick_device("cpu", 2) == torch.device("cpu")
