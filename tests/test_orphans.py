"""No orphan writers: a stage dies with the `dvc repro` that started it, and a checkpoint directory
has one writer at a time (a lock file holding its PID)."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO, alive
from twilbert.train.writer_lock import LOCK_FILE, CheckpointLockError, checkpoint_lock

pytestmark = pytest.mark.reliability


def test_a_second_writer_is_refused_with_the_owners_pid(tmp_path):
    with checkpoint_lock(tmp_path / "ck") as lock:
        assert lock.read_text() == f"{os.getpid()}\n"
        with pytest.raises(CheckpointLockError, match=rf"another process \(PID {os.getpid()}\) is writing"):
            with checkpoint_lock(tmp_path / "ck"):
                pass
        assert lock.read_text() == f"{os.getpid()}\n"  # the refused writer changed nothing


def test_a_lock_whose_pid_is_gone_is_taken_over(tmp_path, caplog):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead_pid = int(gone.stdout)
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / LOCK_FILE).write_text(f"{dead_pid}\n")  # left by a SIGKILLed run
    with caplog.at_level(logging.WARNING), checkpoint_lock(tmp_path / "ck") as lock:
        assert lock.read_text() == f"{os.getpid()}\n"
    assert f"PID {dead_pid}, which is gone" in caplog.text


def test_the_lock_is_removed_on_release_so_dvc_hashes_only_the_checkpoints(tmp_path):
    with checkpoint_lock(tmp_path / "ck") as lock:
        (tmp_path / "ck" / "step-00000001").mkdir()
    assert not lock.exists() and [p.name for p in (tmp_path / "ck").iterdir()] == ["step-00000001"]
    with checkpoint_lock(tmp_path / "fresh"):
        pass
    assert not (tmp_path / "fresh").exists()  # a run that wrote nothing leaves nothing


def test_a_pretrain_stage_beside_a_live_writer_refuses_naming_its_pid(tmp_path):
    (tmp_path / "conf").symlink_to(REPO / "conf")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "CI": "1"}
    with checkpoint_lock(tmp_path / "ck"):
        proc = subprocess.run([sys.executable, str(REPO / "stages" / "pretrain.py"), "--checkpoints", "ck",
                               "--pairs", "pairs", "--vocab", "vocab", "--out", "model", "training.device=cpu"],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    [line] = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert f"PID {os.getpid()}" in line and "ck" in line
    assert not (tmp_path / "model").exists()


# --------------------------------------------------------------------------------------------
# SIGKILL of `dvc repro`
# --------------------------------------------------------------------------------------------

SLEEPER = """\
import os, time
from pathlib import Path
from twilbert.pipeline.stage import run

def main():
    Path("stage.pid").write_text(str(os.getpid()))
    time.sleep(600)  # a long training run

run(main)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("cmd", ["python sleeper.py", "python sleeper.py && true"],
                         ids=["shell-execs-the-stage", "shell-stays-between"])
def test_killing_dvc_repro_leaves_no_stage_process(tmp_path, cmd):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "sleeper.py").write_text(SLEEPER)
    (repo / "dvc.yaml").write_text(f"stages:\n  train:\n    cmd: {cmd}\n    deps: [sleeper.py]\n")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "SHELL": shutil.which("bash") or "/bin/sh",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run(["dvc", "init", "-q"], cwd=repo, env=env, check=True)
    dvc = subprocess.Popen(["dvc", "repro"], cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pid = None
    try:
        deadline = time.monotonic() + 240
        while pid is None and time.monotonic() < deadline:
            text = (repo / "stage.pid").read_text() if (repo / "stage.pid").exists() else ""
            pid = int(text) if text else None
            time.sleep(0.2)
        assert pid is not None and alive(pid), "the stage never started"
        time.sleep(1.5)  # the watchdog has found its launcher
        dvc.kill()
        dvc.wait()
        deadline = time.monotonic() + 30
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive(pid), f"stage PID {pid} survived the SIGKILL of dvc repro"
    finally:
        dvc.kill()
        if pid is not None and alive(pid):
            os.kill(pid, signal.SIGKILL)


WORKERS_SLEEPER = """\
import os, time
from pathlib import Path
from twilbert.pipeline.stage import run
from twilbert.pipeline.workers import run_workers, under_torchrun

def main():
    if not under_torchrun():  # the stage's own launch (runtime.workers): two ranks of this script
        raise SystemExit(run_workers(2, 1))
    Path(f"worker-{os.environ['RANK']}.pid").write_text(str(os.getpid()))
    time.sleep(600)  # a long training run

run(main)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_killing_dvc_repro_leaves_no_worker_the_stage_launched(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "sleeper.py").write_text(WORKERS_SLEEPER)
    (repo / "dvc.yaml").write_text("stages:\n  train:\n    cmd: python sleeper.py\n    deps: [sleeper.py]\n")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "SHELL": shutil.which("bash") or "/bin/sh",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run(["dvc", "init", "-q"], cwd=repo, env=env, check=True)
    dvc = subprocess.Popen(["dvc", "repro"], cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 240
        while len(pids) < 2 and time.monotonic() < deadline:
            files = [repo / f"worker-{r}.pid" for r in range(2)]
            texts = [f.read_text() if f.exists() else "" for f in files]
            pids = [int(t) for t in texts if t]
            time.sleep(0.2)
        assert len(pids) == 2 and all(alive(p) for p in pids), "the workers never started"
        time.sleep(1.5)  # the launcher's watchdog has found DVC
        dvc.kill()
        dvc.wait()
        deadline = time.monotonic() + 60
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [p for p in pids if alive(p)], "a worker survived the SIGKILL of dvc repro"
    finally:
        dvc.kill()
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
