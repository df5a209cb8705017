"""Expected failures give one `error:` line naming the path and what to do, exit status 2, and no
partial output; bugs keep their traceback. Stages run as DVC runs them (a fresh process)."""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from finetune_data import MAX_LEN, make_pretrained
from helpers import REPO, make_tweets
from twilbert.cli import main as cli_main
from twilbert.errors import user_message
from twilbert.io_utils import atomic_write
from twilbert.pipeline.stage import run

pytestmark = pytest.mark.reliability


def run_stage(script: str, *args: str, cwd: Path, env: dict | None = None, limit_bytes: int | None = None):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}", "CI": "1", **(env or {})}

    def limit_file_size():  # a real write failure (EFBIG) without root or a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run([sys.executable, str(REPO / "stages" / script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600,
                          preexec_fn=limit_file_size if limit_bytes else None)


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines


def leftovers(root: Path) -> list[str]:
    """Temp files or directories a failed write left behind."""
    return [str(p) for p in root.rglob("*") if ".tmp" in p.name or ".publish-" in p.name]


@pytest.fixture
def workdir(tmp_path):
    (tmp_path / "conf").symlink_to(REPO / "conf")
    return tmp_path


def write_task(directory: Path) -> Path:
    directory.mkdir(parents=True)
    rows = make_tweets(60, seed=1)
    for name, part in (("train", rows[:40]), ("dev", rows[40:50]), ("test", rows[50:])):
        lines = "".join(f"{i}\t{text}\t{label}\n" for i, (text, label) in enumerate(part))
        (directory / f"{name}.tsv").write_text("ID\tTEXT\tCLASS\n" + lines, encoding="utf-8")
    return directory


def test_a_pickle_as_the_pretrained_weights_of_finetune_is_one_line(workdir):
    pretrained = make_pretrained(workdir / "pretrained")
    torch.save({"twilbert.x": torch.zeros(2)}, pretrained / "model.safetensors")  # a pickle in disguise
    from twilbert.model.manifest import write_manifest

    write_manifest(pretrained)  # a directory handed over whole: its checksums match, its weights are a pickle
    task = write_task(workdir / "task")
    proc = run_stage("finetune.py", "--task", "tass_default", "--pretrained", "pretrained", "--model-out", "m",
                     "--metrics-out", "r", "--checkpoints", "ck", f"tasks.tass_default.dataset.data_dir={task}",
                     f"representation.max_len={MAX_LEN}", "finetuning.device=cpu", "finetuning.baseline_row=false",
                     "runtime.workers=1",  # one process: the auto-workers path leaves folders (known gap, issue 33)
                     cwd=workdir)
    [line] = error_lines(proc)
    assert "pretrained/model.safetensors" in line and "rerun" in line
    assert not any((workdir / name).exists() for name in ("m", "r", "ck"))


def test_a_missing_input_file_is_one_line_naming_it(workdir):
    proc = run_stage("pairs.py", "--corpus", "nowhere/corpus.jsonl", "--vocab", "nowhere/vocab", "--out", "pairs",
                     "seed=1234", cwd=workdir)
    [line] = error_lines(proc)
    assert "nowhere/" in line
    assert not (workdir / "pairs").exists()


def test_a_failing_write_is_one_line_naming_the_file_and_leaves_no_partial_output(workdir):
    pairs = workdir / "pairs.tsv"
    pairs.write_text("".join(f"{i}\t{a}\t{i + 1}\t{b}\n" for i, ((a, _), (b, _)) in
                             enumerate(zip(make_tweets(300, 1), make_tweets(300, 2)))), encoding="utf-8")
    size = pairs.stat().st_size
    proc = run_stage("data.py", "--out", "out", "data.source=pairs_file", f"data.pairs_file={pairs}",
                     "data.pairs_header=false", cwd=workdir, limit_bytes=size)  # the corpus outgrows the limit
    [line] = error_lines(proc)
    assert "out/pretrain/corpus.jsonl" in line and "file too large" in line
    assert not (workdir / "out" / "pretrain" / "corpus.jsonl").exists() and not leftovers(workdir / "out")


def test_an_unreachable_tracking_store_under_fail_is_one_line_and_evaluate_writes_nothing(workdir):
    for seed in range(3):  # the default finetuning.seeds: 3
        metrics = workdir / "results" / "tasks" / "tass_default" / "runs" / f"s{seed}" / "metrics.json"
        metrics.parent.mkdir(parents=True)
        metrics.write_text(json.dumps({"task": "tass_default", "model": "twilbert", "official_metric": "mf1",
                                       "dev": {"official": 0.5}, "test": {"official": 0.4}}), encoding="utf-8")
        (metrics.parent / "predictions.tsv").write_text("id\tgold\tpred\n0\tP\tN\n", encoding="utf-8")
    broken = workdir / "broken.db"
    broken.write_bytes(b"this is not an SQLite database, not even close" * 100)
    proc = run_stage("evaluate.py", "--tasks-dir", "results/tasks", "--out", "results",
                     "tracking.on_unreachable=fail", cwd=workdir, env={"MLFLOW_TRACKING_URI": f"sqlite:///{broken}"})
    [line] = error_lines(proc)
    assert str(broken) in line and "on_unreachable" in line
    assert sorted(p.name for p in (workdir / "results").iterdir()) == ["tasks"]  # no results.md/csv/metrics.json


def test_a_full_disk_is_one_line_naming_what_ran(capsys):
    def main():
        with open("/dev/full", "w") as fh:  # a real ENOSPC from the kernel
            fh.write("x")

    with pytest.raises(SystemExit) as exit_:
        run(main)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: while running ") and "no space left" in err[0]


def test_an_atomic_write_that_fails_names_its_file_and_keeps_the_old_content(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    target.write_text("old")
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left")))
    with pytest.raises(OSError) as err:
        with atomic_write(target) as fh:
            fh.write("new")
    assert user_message(err.value).startswith(f"{target}: no space left on the device")
    assert target.read_text() == "old" and not leftovers(tmp_path)


def test_permission_denied_names_the_path_and_what_to_do(capsys):
    def main():
        raise PermissionError(errno.EACCES, "Permission denied", "/srv/models/pretrained")

    with pytest.raises(SystemExit) as exit_:
        run(main)
    assert exit_.value.code == 2
    assert capsys.readouterr().err == ("error: /srv/models/pretrained: permission denied: give this user access "
                                       "to it, or use another path\n")


def test_a_bug_keeps_its_traceback():
    def main():
        return {}["missing"]

    with pytest.raises(KeyError):
        run(main)
    assert user_message(ZeroDivisionError()) is None and user_message(OSError(errno.EIO, "I/O")) is None


def test_the_cli_reports_a_missing_input_in_one_line(tmp_path, capsys):
    model = make_pretrained(tmp_path / "model")
    code = cli_main(["embeddings", "--model", str(model), "--input", str(tmp_path / "absent.txt"),
                     "--output", str(tmp_path / "x.npy")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and "absent.txt" in err[0]
    assert not (tmp_path / "x.npy").exists()


TRACKED_RUN = """\
import sys
from twilbert.config import TrackingConfig
from twilbert.pipeline.stage import setup_logging
from twilbert.tracking.runs import Tracker

setup_logging()
tracker = Tracker(TrackingConfig(uri=sys.argv[1]), stage="pretrain")
with tracker.start({"model": {"n_encoders": 2}}):
    tracker.log_metrics({"loss": 1.0})
print("trained")
"""


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX permissions")
@pytest.mark.parametrize("read_only", ["file", "directory"])
def test_a_read_only_store_gives_one_warning_line_not_mlflows_traceback(read_only):
    import shutil
    import tempfile

    as_user: list[str] = []
    if os.geteuid() == 0:  # root ignores permissions: run the tracked process as nobody
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv")
        as_user = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
        # A checkout under a private directory (mktemp's 0700) is out of nobody's reach, venv included.
        probe = subprocess.run([*as_user, sys.executable, "-c", "import twilbert"], capture_output=True,
                               env={**os.environ, "PYTHONPATH": str(REPO / "src")}, cwd="/", timeout=120)
        if probe.returncode != 0:
            pytest.skip("running as root in a checkout that user nobody cannot read")
    root = Path(tempfile.mkdtemp(prefix="twilbert-ro-"))
    try:
        root.chmod(0o755)
        store = f"sqlite:///{root / 'mlflow.db'}"
        env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HOME": str(root), "TMPDIR": str(root / "tmp")}
        (root / "tmp").mkdir(mode=0o777)
        (root / "tmp").chmod(0o777)
        subprocess.run([sys.executable, "-c", TRACKED_RUN, store], env=env, check=True, capture_output=True,
                       timeout=300)  # the store exists, with its tables
        (root / "mlflow.db").chmod(0o444 if read_only == "file" else 0o666)
        root.chmod(0o755 if read_only == "file" else 0o555)  # no journal can be created beside it
        proc = subprocess.run([*as_user, sys.executable, "-c", TRACKED_RUN, store], env=env, capture_output=True,
                              text=True, timeout=300, cwd=root / "tmp")
        assert proc.returncode == 0 and proc.stdout.strip() == "trained", proc.stderr[-3000:]
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "WARNING twilbert.tracking.runs" in lines[0], proc.stderr[-3000:]
    finally:
        root.chmod(0o755)
        shutil.rmtree(root, ignore_errors=True)
