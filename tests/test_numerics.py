"""runtime.portable_numerics: the same bytes on any x86-64 CPU with AVX2.

One machine cannot be two CPU types, but it can run torch's kernels for two instruction sets:
ATEN_CPU_CAPABILITY forced to the host's best, and to avx2 (and to the scalar `default`, which an
AVX2-only host needs for the two runs to differ at all). Under the pinned settings a short pretrain
and finetune must write the same bytes every way; with the pins off the same runs must differ,
or the check could not fail.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from finetune_data import write_task
from helpers import (
    MAX_LEN,
    PRETRAIN,
    REPO,
    finetune_args,
    make_pretrain_inputs,
    ok,
    pretrain_args,
    run_stage,
    write_params,
)
from twilbert.numerics import PINNED_BY_LAUNCHER, PORTABLE_ENV, describe, wanted_env

FINETUNE = {"epochs": 2, "patience": 2, "batch_size": 8, "lr": 1e-2, "device": "cpu", "baseline_row": False}


def host_best_capability() -> str:
    proc = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                          env={k: v for k, v in os.environ.items() if k not in PORTABLE_ENV}, capture_output=True,
                          text=True, check=True)
    return proc.stdout.strip().lower()


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file the runs publish (models and metrics; the logs and MLflow store aside)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and "checkpoints" not in p.parts}


def run_pipeline(root: Path, inputs: Path, capability: str, portable: bool) -> dict[str, str]:
    """A short pretrain, then a finetune from it, each in its own process, the way a CPU with only
    ``capability`` would run them (the user's shell says so; portable numerics must override it)."""
    flag = f"runtime.portable_numerics={str(portable).lower()}"
    env_before = dict(os.environ)
    os.environ.update(ATEN_CPU_CAPABILITY=capability)
    for key in [*PORTABLE_ENV, PINNED_BY_LAUNCHER]:
        if key != "ATEN_CPU_CAPABILITY":
            os.environ.pop(key, None)
    try:
        # paths relative to the stages' folder, as under DVC: a model card names its backbone's folder
        work = root / "work"
        write_params(work, [*PRETRAIN, "training.epochs=1", flag])
        ok(run_stage("pretrain.py", pretrain_args(inputs, Path("pretrain")), work))
        task = write_task(inputs / "task")
        write_params(work, ["model=tiny", f"representation.max_len={MAX_LEN}", flag], tasks={"t": task},
                     finetuning=FINETUNE)
        args = finetune_args(inputs, Path("finetune"))
        args[args.index("--pretrained") + 1] = Path("pretrain") / "model"
        ok(run_stage("finetune.py", args, work))
    finally:
        os.environ.clear()
        os.environ.update(env_before)
    return {f"{stage}/{name}": digest for stage in ("pretrain", "finetune")
            for name, digest in tree_digest(work / stage).items()}


@pytest.fixture(scope="module")
def pretrain_inputs(tmp_path_factory):
    return make_pretrain_inputs(tmp_path_factory.mktemp("numerics-inputs"))


@pytest.mark.slow
def test_pretrain_and_finetune_write_the_same_bytes_whatever_the_cpu_capability(pretrain_inputs, tmp_path):
    best = host_best_capability()
    capabilities = sorted({best, "avx2", "default"})  # default: an ISA difference even on an AVX2-only host
    runs = {cap: run_pipeline(tmp_path / cap, pretrain_inputs, cap, portable=True) for cap in capabilities}
    reference = runs["avx2"]
    assert any(name.endswith(".safetensors") for name in reference) and any("metrics" in n for n in reference)
    for cap, digest in runs.items():
        assert digest == reference, f"ATEN_CPU_CAPABILITY={cap} gave other bytes than avx2: " + \
            ", ".join(k for k in reference if digest.get(k) != reference[k])


@pytest.mark.slow
def test_without_portable_numerics_the_cpu_capability_changes_the_bytes(pretrain_inputs, tmp_path):
    # The control: the runs above are able to tell two instruction sets apart.
    scalar = run_pipeline(tmp_path / "default", pretrain_inputs, "default", portable=False)
    vector = run_pipeline(tmp_path / "avx2", pretrain_inputs, "avx2", portable=False)
    assert scalar.keys() == vector.keys()
    assert any(scalar[k] != vector[k] for k in scalar if k.endswith(".safetensors"))


def test_portable_mode_overrides_the_users_shell_and_turning_it_off_removes_only_the_launchers_pins():
    shell = {"ATEN_CPU_CAPABILITY": "avx512", "MKL_CBWR": "AUTO"}
    assert wanted_env(True, shell) == {**PORTABLE_ENV, PINNED_BY_LAUNCHER: "1"}
    assert wanted_env(True, {**PORTABLE_ENV, PINNED_BY_LAUNCHER: "1"}) == {}
    launched = {**PORTABLE_ENV, PINNED_BY_LAUNCHER: "1"}
    assert wanted_env(False, launched) == {**{k: None for k in PORTABLE_ENV}, PINNED_BY_LAUNCHER: None}
    assert wanted_env(False, shell) == {}  # the user's own values stand when they opt out


def test_a_shell_that_turns_on_libgomps_load_sized_thread_teams_gets_them_pinned_off():
    # OMP_DYNAMIC=TRUE sizes a team by the load average, so a multi-thread run's bytes followed the load
    shell = {**PORTABLE_ENV, PINNED_BY_LAUNCHER: "1", "OMP_DYNAMIC": "TRUE"}
    assert wanted_env(True, shell) == {"OMP_DYNAMIC": "FALSE"}


def test_the_stage_launcher_exports_the_same_pins_as_the_package():
    text = (REPO / "stages" / "py").read_text()
    exported = dict(re.findall(r"(\w+)=(\S+)", text.split("export ", 1)[1].splitlines()[0]))
    assert exported == {**PORTABLE_ENV, PINNED_BY_LAUNCHER: "1"}


def test_a_stage_started_without_the_launcher_restarts_once_under_the_pins(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(
        "import os, torch\n"
        "from twilbert.pipeline.stage import load_stage_config, run\n"
        "def main():\n"
        "    load_stage_config([])\n"
        "    print('capability', torch.backends.cpu.get_cpu_capability(), os.environ.get('MKL_CBWR'),"
        " torch.get_num_threads())\n"
        "run(main)\n")
    write_params(tmp_path, ["model=tiny"])
    env = {k: v for k, v in os.environ.items() if k not in PORTABLE_ENV and k != PINNED_BY_LAUNCHER}
    env["ATEN_CPU_CAPABILITY"] = "default"
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "restarting with" in proc.stderr and proc.stderr.count("restarting with") == 1
    assert proc.stdout.split() == ["capability", "AVX2", "AVX2", "1"]


def test_the_results_header_names_the_pins_and_never_the_host():
    line = describe(True)
    assert "avx2" in line and "MKL CBWR AVX2" in line and "1 thread" in line
    assert host_best_capability().upper() not in line or host_best_capability() == "avx2"


def test_a_caller_of_the_stage_helpers_in_its_own_process_is_never_re_executed(monkeypatch, tmp_path):
    # Only a stage script run as a program restarts under the pins: a test runner that calls
    # `run` (with its own main) and then `load_stage_config` keeps its process.
    import twilbert.pipeline.stage as stage

    monkeypatch.setattr(stage, "_STAGE_PROCESS", False)
    for key in PORTABLE_ENV:
        monkeypatch.setenv(key, "default")
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path, ["model=tiny"])
    def main():
        stage.load_stage_config([])  # would exec over this process if it pinned
        return "ran"

    stage.run(main)
    assert stage._STAGE_PROCESS is False
