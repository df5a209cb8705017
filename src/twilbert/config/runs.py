"""``finetuning.seeds`` and the finetuning runs it makes: one DVC stage per task and seed.

A finetuned score moves by points between two seeds of the same model, so every task is finetuned
several times and the tables report mean ± sd. ``finetuning.seeds`` is a count N (the seeds 0 … N-1)
or a list of seeds; a run with seed ``s`` trains with the torch/numpy seed ``seed + s`` (head
initialization, data order, dropout), while the task's splits keep ``seed``, so every run is scored
on the same test examples. Seed 0 is the single run of earlier versions.

DVC's ``foreach`` needs the runs spelled out, and a stage may only name a task's data folder through
its own item: ``finetune_runs`` in params.yaml is derived here (task, seed, data folder per run) by an
OmegaConf resolver that both ``twilbert compose`` and DVC's Hydra composition (``stages/hydra_plugins``)
register. Adding a seed adds a stage; the others stay cached.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

from twilbert.config.strict import ConfigError

RESOLVER = "twilbert_finetune_runs"
MAX_SEEDS = 100


def expand_seeds(seeds: Any, where: str = "finetuning.seeds") -> list[int]:
    """The seeds a ``finetuning.seeds`` value stands for: a count N -> [0, …, N-1]; a list as given."""
    if isinstance(seeds, bool):
        raise ConfigError(f"{where} must be a count or a list of seeds, got {seeds!r}")
    if isinstance(seeds, int):
        if not 1 <= seeds <= MAX_SEEDS:
            raise ConfigError(f"{where} must be a count from 1 to {MAX_SEEDS} or a list of seeds, got {seeds}")
        return list(range(seeds))
    if isinstance(seeds, (list, tuple)) and seeds:
        bad = [s for s in seeds if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**31]
        if bad:
            raise ConfigError(f"{where}: seeds are integers in [0, 2**31), got {bad[0]!r}")
        if len(set(seeds)) != len(seeds):
            raise ConfigError(f"{where} lists a seed twice: {list(seeds)}")
        return list(seeds)
    raise ConfigError(f"{where} must be a count (e.g. 3) or a non-empty list of seeds (e.g. [0, 7, 42]), got {seeds!r}")


def run_name(task: str, seed: int) -> str:
    """The key of one run in ``finetune_runs``: DVC names its stage ``finetune@<task>-s<seed>``."""
    return f"{task}-s{seed}"


def finetune_runs(tasks: Mapping[str, Any], seeds: Any) -> dict[str, dict]:
    """One entry per task and seed, in task order then seed order."""
    runs = {}
    for name, task in (tasks or {}).items():
        data_dir = ((task or {}).get("dataset") or {}).get("data_dir")
        for seed in expand_seeds(seeds):
            runs[run_name(name, seed)] = {"task": name, "seed": seed, "data_dir": data_dir}
    return runs


def _resolve(tasks: Any, seeds: Any) -> Any:
    from omegaconf import DictConfig, ListConfig, OmegaConf

    plain = lambda v: OmegaConf.to_container(v, resolve=True) if isinstance(v, (DictConfig, ListConfig)) else v  # noqa: E731
    # a config node, not a dict: DVC resolves in place (OmegaConf.resolve), which takes no plain dict
    return OmegaConf.create(finetune_runs(plain(tasks), plain(seeds)))


def register_resolver(refusal: Optional[Callable[[str], Exception]] = None) -> None:
    """Make ``${twilbert_finetune_runs:${tasks},${finetuning.seeds}}`` resolvable in conf/.

    ``refusal`` turns a bad ``finetuning.seeds`` into the exception the caller reports plainly (DVC's
    Hydra plugin passes one DVC prints as its own one-line error); by default the ConfigError itself.
    """
    from omegaconf import OmegaConf

    def resolve(tasks: Any, seeds: Any) -> Any:
        try:
            return _resolve(tasks, seeds)
        except ConfigError as err:
            if refusal is None:
                raise
            raise refusal(str(err)) from None

    OmegaConf.register_new_resolver(RESOLVER, resolve, replace=True)
