"""Checksummed model directories: ``checksums.json`` lists the sha256 of every file in the directory.

Every writer of a model directory (``save_pretrained``, the pretrain and finetune stages, the
baseline, ``export-hf``) seals it last (``io_utils.publish_dir(checksums=True)`` or
:func:`write_manifest`); every loader calls
:func:`verify_model_dir` first, so a flipped byte in ``model.safetensors`` is refused with one line
naming the file instead of silently giving other probabilities.

The manifest is a DVC output like the files it lists, so it is deterministic: relative POSIX paths,
sorted keys, no timestamps. Subdirectories (``folds/<i>/``, ``baseline/``, ``hf/``) are listed too;
their own ``checksums.json`` are ordinary files of the parent's list.

Users who edit a model's files on purpose pass ``--no-verify`` to the CLI commands, or set
``TWILBERT_NO_VERIFY=1`` for the stages (a run-time switch, not a parameter: it changes no output).
A directory without a manifest (written before checksums existed, or assembled by hand) loads
with a warning.
"""

from __future__ import annotations

import contextvars
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Union

from twilbert.io_utils import CHECKSUMS_NAME, checksummed_files, checksums_text, verify_checksums, write_checksums
from twilbert.model.card import CheckpointError

log = logging.getLogger(__name__)

MANIFEST_NAME = CHECKSUMS_NAME
NO_VERIFY_ENV = "TWILBERT_NO_VERIFY"
PathLike = Union[str, "os.PathLike[str]"]

_verify: contextvars.ContextVar[Optional[bool]] = contextvars.ContextVar("twilbert_verify", default=None)


class ManifestError(CheckpointError):
    """A model directory's files do not match its ``checksums.json``; the message names the file."""


def manifest_text(directory: PathLike) -> str:
    """The manifest content for ``directory`` as it is now: same files, same bytes."""
    return checksums_text(directory)


def write_manifest(directory: PathLike) -> Path:
    """(Re)write ``directory/checksums.json`` atomically; call it after the last file is written."""
    return write_checksums(directory)


@contextmanager
def verification(enabled: bool) -> Iterator[None]:
    """Turn load-time verification on or off within the block (the CLI's ``--no-verify``)."""
    token = _verify.set(enabled)
    try:
        yield
    finally:
        _verify.reset(token)


def verification_enabled(verify: Optional[bool] = None) -> bool:
    """An explicit ``verify`` wins, then :func:`verification`, then ``TWILBERT_NO_VERIFY``; default on."""
    if verify is not None:
        return verify
    if _verify.get() is not None:
        return bool(_verify.get())
    return os.environ.get(NO_VERIFY_ENV, "").strip().lower() not in ("1", "true", "yes", "on")


def verify_model_dir(directory: PathLike, verify: Optional[bool] = None) -> None:
    """Raise ManifestError unless every file ``checksums.json`` lists is present with its sha256.

    No manifest: a warning (an older directory). Files the manifest does not list: a warning (they
    are not verified). ``verify=False`` (or ``--no-verify`` / ``TWILBERT_NO_VERIFY=1``) skips the check.
    """
    directory = Path(directory)
    if not verification_enabled(verify):
        log.info("%s: checksums not verified (verification turned off)", directory)
        return
    path = directory / MANIFEST_NAME
    if not os.path.lexists(path):
        log.warning("%s: no %s, so its files cannot be verified (written by an older twilbert or by hand); "
                    "re-save it to add one", directory, MANIFEST_NAME)
        return
    fix = ("restore the model directory from its source (e.g. `dvc checkout`), or pass --no-verify "
           f"({NO_VERIFY_ENV}=1 for stages) if you changed it on purpose")
    sums = verify_checksums(directory, ManifestError, fix)
    unlisted = [name for name in checksummed_files(directory) if name not in sums]
    if unlisted:
        log.warning("%s: %d file(s) not in %s, not verified: %s", directory, len(unlisted), MANIFEST_NAME,
                    ", ".join(unlisted[:5]))
