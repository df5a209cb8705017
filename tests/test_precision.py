"""bf16 autocast: asked for on hardware without bf16 instructions, the user is told once."""

import logging

import torch

import twilbert.device as devices


def test_bf16_on_a_device_without_bf16_instructions_warns_once(monkeypatch, caplog):
    devices._warn_emulated_bf16.cache_clear()
    monkeypatch.setattr(devices, "native_bf16", lambda device: False)
    with caplog.at_level(logging.WARNING, logger=devices.log.name):
        for _ in range(3):
            with devices.autocast("bf16", torch.device("cpu")):
                out = torch.ones(2, 2) @ torch.ones(2, 2)
    assert out.dtype == torch.bfloat16
    warnings = [r for r in caplog.records if "no bf16 matrix instructions" in r.getMessage()]
    assert len(warnings) == 1 and "precision=fp32" in warnings[0].getMessage()


def test_bf16_on_a_device_with_bf16_instructions_and_fp32_stay_silent(monkeypatch, caplog):
    devices._warn_emulated_bf16.cache_clear()
    monkeypatch.setattr(devices, "native_bf16", lambda device: True)
    with caplog.at_level(logging.WARNING, logger=devices.log.name):
        with devices.autocast("bf16", torch.device("cpu")):
            pass
    monkeypatch.setattr(devices, "native_bf16", lambda device: False)
    with caplog.at_level(logging.WARNING, logger=devices.log.name):
        with devices.autocast("fp32", torch.device("cpu")):
            out = torch.ones(2, 2) @ torch.ones(2, 2)
    assert out.dtype == torch.float32 and not caplog.records
