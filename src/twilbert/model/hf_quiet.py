"""transformers' own output, made to read like the project's log.

Loading a checkpoint prints a "Loading weights" bar and a "LOAD REPORT" table of every tensor the
checkpoint has and the model does not (and the reverse); ``save_pretrained`` prints a "Writing model
shards" bar, once per best epoch in continued pretraining. In a log file that is read later, those are
noise that hides the epoch lines. Inside :func:`quiet_transformers` the bars are off and the report
is not printed; :func:`load_summary` gives the one line the project logs instead.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator

# transformers logs the LOAD REPORT as a warning of this logger
REPORT_LOGGER = "transformers.modeling_utils"


def _not_a_load_report(record: logging.LogRecord) -> bool:
    return "LOAD REPORT" not in str(record.msg)


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' progress bars off and its load report unprinted; both restored on exit, so a
    user's own session keeps its settings. At DEBUG (the report logger's or the root's), the report stays."""
    from transformers.utils import logging as hf_logging

    # A filter, not a level: transformers checks that logger's level to decide other warnings.
    report = logging.getLogger(REPORT_LOGGER)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    drop = not report.isEnabledFor(logging.DEBUG)
    if drop:
        report.addFilter(_not_a_load_report)
    try:
        yield
    finally:
        if drop:
            report.removeFilter(_not_a_load_report)
        if bars:
            hf_logging.enable_progress_bar()


def _groups(keys: list[str]) -> str:
    """``cls.predictions.bias, cls.predictions.dense.weight`` -> ``cls.predictions.*``: names a person scans."""
    groups = sorted({".".join(k.split(".")[:2]) + ".*" if k.count(".") > 1 else k for k in keys})
    return ", ".join(groups[:4]) + (f" and {len(groups) - 4} more" if len(groups) > 4 else "")


def load_summary(what: str, model_class: str, info: dict) -> str:
    """One line for ``from_pretrained(..., output_loading_info=True)``'s ``info``: what of the checkpoint
    is left unused (another task's head) and what the model initialised anew."""
    parts = [f"{what}: loaded as {model_class}"]
    if info.get("unexpected_keys"):
        keys = sorted(info["unexpected_keys"])
        parts.append(f"{len(keys)} checkpoint tensors unused ({_groups(keys)})")
    if info.get("missing_keys"):
        keys = sorted(info["missing_keys"])
        parts.append(f"{len(keys)} newly initialised ({_groups(keys)})")
    if info.get("mismatched_keys"):
        parts.append(f"{len(info['mismatched_keys'])} of another shape, initialised anew")
    return "; ".join(parts)
