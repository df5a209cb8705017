"""Loaded by DVC's Hydra composition (`dvc exp run`, .dvc/config hydra.plugins_path = stages): Hydra
imports every module of the `hydra_plugins` namespace, and this one registers the resolver that
derives params.yaml's `finetune_runs` (twilbert.config.runs), as `twilbert compose` does."""

from twilbert.config.runs import register_resolver

register_resolver()
