"""io_utils.publish_dir, the one way a directory output is written: a crash in any window leaves the
old complete directory or the new one, the next publish clears what a crash left, and the result holds
exactly the bytes written, under no temporary name."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from twilbert import io_utils
from twilbert.errors import user_message
from twilbert.io_utils import (
    CHECKSUMS_NAME,
    clean_leftovers,
    link_or_copy,
    publish_built,
    publish_dir,
    sha256_file,
)

pytestmark = pytest.mark.reliability

OLD = {"a.txt": b"old a\n", "gone.txt": b"only in the old one\n"}
NEW = {"a.txt": b"new a\n", "sub/b.bin": bytes(range(256)) * 64}
NEWER = {"a.txt": b"newer a\n", "sub/c.bin": b"\x00\x01" * 1000}


def write_tree(root: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)


def read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def without_checksums(tree: dict[str, bytes]) -> dict[str, bytes]:
    return {k: v for k, v in tree.items() if k != CHECKSUMS_NAME}


def published(target: Path, files: dict[str, bytes], checksums: bool = False) -> None:
    with publish_dir(target, checksums=checksums) as staged:
        write_tree(staged, files)


def test_the_published_directory_holds_exactly_the_bytes_written_and_no_temp_name(tmp_path):
    target = tmp_path / "out"
    published(target, OLD)
    published(target, NEW)
    assert read_tree(target) == NEW
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no work folder, no old directory aside
    assert not [p for p in target.rglob("*") if "publish" in p.name or p.name.endswith(".tmp")]


def test_checksums_list_every_file_below_with_its_sha256(tmp_path):
    target = tmp_path / "model"
    published(target, NEW, checksums=True)
    sums = json.loads((target / CHECKSUMS_NAME).read_text())
    assert sums == {name: hashlib.sha256(data).hexdigest() for name, data in NEW.items()}
    assert without_checksums(read_tree(target)) == NEW


def test_the_same_content_publishes_the_same_bytes(tmp_path):
    published(tmp_path / "one", NEW, checksums=True)
    published(tmp_path / "two", NEW, checksums=True)
    published(tmp_path / "two", NEW, checksums=True)  # a republish over itself too
    assert read_tree(tmp_path / "one") == read_tree(tmp_path / "two")


def test_a_failure_inside_the_block_leaves_the_old_directory_and_no_leftovers(tmp_path):
    target = tmp_path / "out"
    published(target, OLD)
    with pytest.raises(RuntimeError, match="half way"):
        with publish_dir(target) as staged:
            write_tree(staged, {"a.txt": b"half"})
            raise RuntimeError("half way")
    assert read_tree(target) == OLD and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_full_disk_at_fsync_names_the_output_and_keeps_the_old_directory(tmp_path, monkeypatch):
    target = tmp_path / "out"
    published(target, OLD)

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as err:
        published(target, NEW)
    assert user_message(err.value).startswith(f"{target}: no space left on the device")
    assert read_tree(target) == OLD and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_without_an_atomic_exchange_a_failed_second_rename_puts_the_old_directory_back(tmp_path, monkeypatch):
    target = tmp_path / "out"
    published(target, OLD)
    real_rename, calls = os.rename, []

    def second_fails(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError(errno.EIO, "I/O error")
        real_rename(src, dst)

    monkeypatch.setattr(io_utils, "_exchange", lambda a, b: False)
    monkeypatch.setattr(os, "rename", second_fails)
    with pytest.raises(OSError):
        published(target, NEW)
    monkeypatch.undo()
    assert read_tree(target) == OLD and [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.skipif(sys.platform != "linux", reason="renameat2 is Linux's")
def test_on_linux_the_old_and_new_directories_swap_in_one_step(tmp_path, monkeypatch):
    real, results = io_utils._exchange, []
    monkeypatch.setattr(io_utils, "_exchange", lambda a, b: results.append(real(a, b)) or results[-1])
    published(tmp_path / "out", OLD)
    published(tmp_path / "out", NEW)
    assert results == [True]  # the first publish had nothing to swap with
    assert read_tree(tmp_path / "out") == NEW


def test_publish_built_moves_a_finished_directory_into_place(tmp_path):
    built = tmp_path / ".out.partial"
    write_tree(built, NEW)
    published(tmp_path / "out", OLD)
    publish_built(built, tmp_path / "out")
    assert read_tree(tmp_path / "out") == NEW and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_link_or_copy_links_where_it_can_and_copies_where_links_are_refused(tmp_path, monkeypatch):
    (tmp_path / "src").write_bytes(b"weights")
    link_or_copy(tmp_path / "src", tmp_path / "linked")
    assert os.path.samefile(tmp_path / "src", tmp_path / "linked")

    def cross_device(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cross_device)
    link_or_copy(tmp_path / "src", tmp_path / "copied")
    assert (tmp_path / "copied").read_bytes() == b"weights"
    assert not os.path.samefile(tmp_path / "src", tmp_path / "copied")


def test_sha256_file_is_the_sha256_of_the_bytes(tmp_path):
    data = os.urandom(3 << 20)
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------------------------
# SIGKILL in every window: a real process, killed where it stands, no clean-up code runs
# --------------------------------------------------------------------------------------------

KILLED = textwrap.dedent("""
    import os, shutil, signal, sys
    from pathlib import Path
    from twilbert import io_utils

    target, window, files = Path(sys.argv[1]), sys.argv[2], eval(sys.argv[3])

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def after(real, when=lambda n: True):
        calls = []
        def wrapped(*args):
            out = real(*args)
            calls.append(args)
            if when(len(calls)):
                die()
            return out
        return wrapped

    if window.startswith("no-exchange"):
        io_utils._exchange = lambda a, b: False
    if window == "checksummed":
        io_utils.fsync_tree = lambda root: die()
    elif window == "fsynced":
        io_utils.fsync_tree = after(io_utils.fsync_tree)
    elif window == "exchanged":
        io_utils._exchange = after(io_utils._exchange)
    elif window == "no-exchange, old aside":
        os.rename = after(os.rename, lambda n: n == 1)
    elif window == "no-exchange, new in place":
        os.rename = after(os.rename, lambda n: n == 2)
    elif window == "swapped":
        shutil.rmtree = lambda *a, **k: die()  # the old directory is about to be deleted

    with io_utils.publish_dir(target, checksums=True) as staged:
        for i, (name, data) in enumerate(files.items()):
            (staged / name).parent.mkdir(parents=True, exist_ok=True)
            (staged / name).write_bytes(data)
            if window == "writing" and i == 0:
                die()
    raise SystemExit("not killed")
""")

# window -> what the target holds right after the kill
WINDOWS = {
    "writing": "old",
    "checksummed": "old",
    "fsynced": "old",
    "exchanged": "new",
    "swapped": "new",
    "no-exchange, old aside": "old once repaired",  # target absent; the next publish puts the old one back
    "no-exchange, new in place": "new",
}


def kill_publish(target: Path, window: str, files: dict[str, bytes]) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", KILLED, str(target), window, repr(files)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]


@pytest.mark.parametrize("window", WINDOWS)
def test_a_kill_in_any_window_leaves_the_old_or_the_new_directory_and_the_next_publish_clears_it(tmp_path, window):
    target = tmp_path / "out"
    published(target, OLD, checksums=True)
    old = read_tree(target)
    kill_publish(target, window, NEW)

    expected = WINDOWS[window]
    if expected == "old once repaired":
        assert not target.exists()
        clean_leftovers(tmp_path, "out")  # what every publish (and checkpoint save) runs first
        expected = "old"
    now = read_tree(target)
    if expected == "old":
        assert now == old
    else:
        assert without_checksums(now) == NEW
        assert json.loads(now[CHECKSUMS_NAME]) == {k: hashlib.sha256(v).hexdigest() for k, v in NEW.items()}

    published(target, NEWER, checksums=True)
    assert without_checksums(read_tree(target)) == NEWER
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_kill_during_the_first_publish_leaves_nothing_and_the_next_publish_clears_it(tmp_path):
    target = tmp_path / "out"
    kill_publish(target, "writing", NEW)
    assert not target.exists()
    published(target, NEW)
    assert read_tree(target) == NEW and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_leftovers_of_other_outputs_are_not_touched(tmp_path):
    kill_publish(tmp_path / "other", "writing", NEW)
    leftover = [p.name for p in tmp_path.iterdir()]
    published(tmp_path / "out", NEW)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(leftover + ["out"])
