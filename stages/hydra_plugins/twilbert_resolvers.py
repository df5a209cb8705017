"""Loaded by DVC's Hydra composition (`dvc exp run`, .dvc/config hydra.plugins_path = stages): Hydra
imports every module of the `hydra_plugins` namespace, and this one registers the resolver that
derives params.yaml's `finetune_runs` (twilbert.config.runs), as `twilbert compose` does.

A bad `finetuning.seeds` (`dvc exp run -S finetuning.seeds=0`) is refused with an exception that is both
an OmegaConf resolution error (OmegaConf passes those through its resolver frame instead of wrapping
them) and a DvcException (DVC prints those as `ERROR: <message>`, not as a crash of its own with a
support link). DVC still exits 255, its code for every error it reports; params.yaml is left as it was.
"""

from dvc.exceptions import DvcException
from omegaconf.errors import InterpolationResolutionError

from twilbert.config.runs import register_resolver


class ParamsRefused(DvcException, InterpolationResolutionError):
    """A config value the composition refuses; the message names the key."""

    def __str__(self) -> str:
        # OmegaConf re-raises it with `full_key: …` and `object_type=…` lines appended: the first line says it all
        return super().__str__().splitlines()[0]


register_resolver(ParamsRefused)
