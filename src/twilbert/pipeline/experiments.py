"""The local ``baseline`` experiment: ``make repro`` keeps its run under that name, ``make baseline``
brings it back, and ``make compare`` measures the other experiments against it.

A row made on another machine (the committed ``main``) mixes the host into every difference, so the
reference is always a run of this machine. Bringing it back is ``dvc exp apply``: params, ``dvc.lock``
and ``results/`` from the experiment's commit, the models from DVC's cache, no training. It writes the
files whatever git's index holds, so DVC's ``autostage`` (on in this project) does not get in its way.

It also overwrites uncommitted edits without a word (DVC keeps them only in its internal
``refs/exps/apply/stash``, which the next apply overwrites), so :func:`restore` refuses while a
tracked file holds content that neither ``HEAD`` nor any experiment keeps (:func:`unkept_changes`);
``make clean`` asks the same of ``results/``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable, Optional

from twilbert.errors import TwilbertError

BASELINE = "baseline"


class ExperimentError(TwilbertError, RuntimeError):
    """DVC could not save or restore an experiment; the message says what to do."""


def _dvc(args: list[str], repo: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, capture_output=True, text=True)


def _last_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in (proc.stderr or proc.stdout or "").strip().splitlines() if line.strip()]
    return lines[-1] if lines else f"exit status {proc.returncode}"


def experiment_names(repo: Path) -> list[str]:
    """The names of this repository's DVC experiments on the current commit."""
    proc = _dvc(["exp", "list", "--name-only"], repo)
    if proc.returncode != 0:
        raise ExperimentError(f"`dvc exp list` failed: {_last_line(proc)}")
    return [line.strip() for line in proc.stdout.splitlines() if line.strip()]


def untracked(repo: Path) -> list[str]:
    """The top-level names of the files git does not track and does not ignore (a first run's
    ``results/``, ``dvc.lock``): ``dvc exp run`` keeps them in an experiment, ``dvc exp save`` only when told."""
    proc = subprocess.run(["git", "ls-files", "--others", "--exclude-standard", "-z"], cwd=repo, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise ExperimentError(f"`git ls-files` failed in {repo}: {_last_line(proc)}")
    return sorted({path.split("/", 1)[0] for path in proc.stdout.split("\0") if path})


def _git(args: list[str], repo: Path, stdin: Optional[str] = None) -> str:
    proc = subprocess.run(["git", *args], cwd=repo, input=stdin, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ExperimentError(f"`git {args[0]}` failed in {repo}: {_last_line(proc)}")
    return proc.stdout


def experiment_commits(repo: Path) -> list[str]:
    """The commits of every DVC experiment, on any base commit: ``refs/exps/<2 hex>/<38 hex>/<name>``.
    DVC's own work refs (``refs/exps/apply/stash``, ``exec/``, ``celery/``...) are no keeping place."""
    refs = _git(["for-each-ref", "--format=%(objectname) %(refname)", "refs/exps/"], repo).splitlines()
    commits = []
    for line in refs:
        sha, _, ref = line.partition(" ")
        parts = ref.split("/")
        if len(parts) == 5 and len(parts[2]) == 2 and all(c in "0123456789abcdef" for c in parts[2] + parts[3]):
            commits.append(sha)
    return commits


def unkept_changes(repo: Path, paths: tuple[str, ...] = ()) -> list[str]:
    """The tracked files (under ``paths``, if given) whose workspace content differs from ``HEAD`` and
    from every experiment's commit: the user's edits, which nothing could bring back once overwritten.

    A workspace left by ``dvc exp run`` is all kept (each file is its experiment's), and a deleted
    file loses nothing, so neither counts.
    """
    changed = [p for p in _git(["diff", "HEAD", "--name-only", "-z", "--no-renames", "--diff-filter=d", "--",
                                *paths], repo).split("\0") if p]
    if not changed:
        return []
    # --stdin-paths and --batch-check read one path a line; a submodule or odd entry counts as unkept
    plain = [p for p in changed if "\n" not in p and (repo / p).is_file()]
    current = dict(zip(plain, _git(["hash-object", "--stdin-paths"], repo, "".join(f"{p}\n" for p in plain)).split()))
    commits = experiment_commits(repo)
    kept: set[tuple[str, str]] = set()
    if commits and plain:
        asked = [(c, p) for c in commits for p in plain]
        answers = _git(["cat-file", "--batch-check=%(objectname)"], repo,
                       "".join(f"{c}:{p}\n" for c, p in asked)).splitlines()
        kept = {(p, blob.strip()) for (_, p), blob in zip(asked, answers)}
    return [p for p in changed if (p, current.get(p)) not in kept]


def refuse_unkept(repo: Path, action: str, paths: tuple[str, ...] = ()) -> None:
    """Raise, naming the files and how to keep them, if ``action`` would overwrite :func:`unkept_changes`."""
    files = unkept_changes(repo, paths)
    if files:
        shown = ", ".join(files[:6]) + (f" and {len(files) - 6} more" if len(files) > 6 else "")
        raise ExperimentError(
            f"{action} would overwrite uncommitted changes that no commit or experiment keeps: {shown}. "
            f"Keep them first (`git commit` them, or `git stash`: they stay in `git stash list`), then rerun {action}")


def save(repo: Path, name: str = BASELINE) -> None:
    """Keep the workspace's run (params, dvc.lock, results, cached models) as experiment ``name``."""
    include = [arg for path in untracked(repo) for arg in ("--include-untracked", path)]
    proc = _dvc(["exp", "save", "--force", "--name", name, *include], repo)
    if proc.returncode != 0:
        raise ExperimentError(f"could not keep the run as experiment {name!r}: {_last_line(proc)}")


def restore(repo: Path, name: str = BASELINE) -> float:
    """Bring experiment ``name`` back into the workspace; returns the seconds it took."""
    start = time.monotonic()
    if name not in experiment_names(repo):
        hint = "run `make repro` first: it keeps its run as `baseline`" if name == BASELINE else \
            "see `make compare` or `dvc exp list` for the names"
        raise ExperimentError(f"no experiment named {name!r} on this commit: {hint}")
    refuse_unkept(repo, "`make baseline`" if name == BASELINE else f"restoring experiment {name!r}")
    proc = _dvc(["exp", "apply", name], repo)
    if proc.returncode != 0:
        raise ExperimentError(f"`dvc exp apply {name}` failed: {_last_line(proc)}")
    return time.monotonic() - start


def main(argv: Optional[Iterable[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m twilbert.pipeline.experiments", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("save", "restore", "guard"),
                        help="guard: exit 2 if the tracked files under PATHS hold edits nothing keeps")
    parser.add_argument("name", nargs="?", default=BASELINE, help="the experiment (guard: the command about to run)")
    parser.add_argument("paths", nargs="*", help="guard: the paths the command overwrites (default: all)")
    parser.add_argument("--repo", type=Path, default=Path("."))
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        if args.action == "save":
            save(args.repo, args.name)
        elif args.action == "guard":
            refuse_unkept(args.repo, f"`{args.name}`", tuple(args.paths))
        else:
            seconds = restore(args.repo, args.name)
            print(f"restored experiment {args.name!r} in {seconds:.1f} s: params.yaml, dvc.lock, results/ and "
                  "its models (from DVC's cache, nothing retrained)")
    except ExperimentError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
