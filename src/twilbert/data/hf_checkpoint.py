"""A local Hugging Face checkpoint, checked whole before the pipeline builds anything on it.

One check for the three places a user's checkpoint enters: the vocab stage and pretraining under
``training.init_from: hf`` (a masked-LM), and finetuning under ``finetuning.backbone: hf`` (an encoder).
transformers loads a config that does not fit its weights with a warning and trains the random
weights it made up; a folder without tokenizer files gives a tokenizer of its special tokens alone;
a truncated safetensors file raises a Rust error. Each is refused here in one line that names the
key, the file or the tensor:

- the directory, its ``config.json`` (parsed) and an architecture transformers has the class for;
- the tokenizer files (``tokenizer.json``, or the files of the tokenizer's slow class) and a
  vocabulary beyond the special tokens;
- every safetensors file readable (header and length); pickle weights are never loaded;
- every encoder tensor present, none extra, each of the shape the config builds. Head tensors may be
  missing (they start seeded) or extra (a pretraining checkpoint's NSP/SOP head); the pooler, which
  the classification head never reads, too.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from twilbert.errors import TwilbertError

log = logging.getLogger(__name__)

MASKED_LM, ENCODER = "masked_lm", "encoder"
CONFIG_FILE = "config.json"
WEIGHTS_FILE, WEIGHTS_INDEX = "model.safetensors", "model.safetensors.index.json"
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack")
FULL_TOKENIZER = "tokenizer.json"
UNUSED = "pooler"  # the classification head reads the last hidden states, never the pooler


class HFCheckpointError(TwilbertError, ValueError):
    """A Hugging Face checkpoint the pipeline cannot use as it is; the message names the file or tensor."""


@dataclass
class HFCheckpoint:
    model: Any  # AutoModelForMaskedLM or AutoModel, float32, weights checked
    tokenizer: Any
    config: Any
    info: dict  # from_pretrained's loading info: what of the checkpoint was unused or newly initialised


def load_hf_checkpoint(path: Union[str, Path], key: str, head: str = MASKED_LM) -> HFCheckpoint:
    """The checkpoint at ``path`` (the config key ``key`` names it) as ``head`` wants it, or one line why not."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM
    from transformers.utils import logging as hf_logging

    where = f"{key} {str(path)!r}"
    path = Path(path)
    _check_files(path, where)
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # its load report would be printed above our one line; we judge it ourselves
    hf_logging.disable_progress_bar()
    try:
        try:
            config = AutoConfig.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, KeyError) as err:
            raise HFCheckpointError(f"{where}: {path / CONFIG_FILE} cannot be read as a transformers config "
                                    f"({_first_line(err)})") from None
        auto = AutoModelForMaskedLM if head == MASKED_LM else AutoModel
        _check_architecture(config, auto, head, where)
        tokenizer = _load_tokenizer(path, where)
        try:
            model, info = auto.from_pretrained(path, local_files_only=True, use_safetensors=True, dtype=torch.float32,
                                               output_loading_info=True, ignore_mismatched_sizes=True)
        except (OSError, ValueError, RuntimeError) as err:
            raise HFCheckpointError(f"{where}: {auto.__name__} cannot load it ({_first_line(err)})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    _check_tensors(model, info, where)
    return HFCheckpoint(model, tokenizer, config, info)


def load_hf_config_and_tokenizer(path: Union[str, Path], where: str) -> tuple[Any, Any]:
    """The config and tokenizer of a Hugging Face folder whose weights live elsewhere (a finetuned classifier's
    ``hf/``), with the same refusals as :func:`load_hf_checkpoint` for those two."""
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        raise HFCheckpointError(f"{where}: {path / CONFIG_FILE} is missing")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (UnicodeDecodeError, OSError, ValueError, KeyError) as err:
        raise HFCheckpointError(f"{where}: {path / CONFIG_FILE} cannot be read as a transformers config "
                                f"({_first_line(err)})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    return config, _load_tokenizer(path, where)


def check_hf_checkpoint(path: Union[str, Path], key: str, head: str = MASKED_LM) -> None:
    """:func:`load_hf_checkpoint`'s refusals, for a stage to meet before it opens a run or writes a file."""
    load_hf_checkpoint(path, key, head)


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _check_files(path: Path, where: str) -> None:
    """The directory, its config file, and safetensors weights whose headers and lengths are whole."""
    from safetensors import SafetensorError, safe_open

    if not path.is_dir():
        raise HFCheckpointError(f"{where}: not a directory; point it at a local Hugging Face checkpoint saved with "
                                f"save_pretrained ({CONFIG_FILE}, {WEIGHTS_FILE}, tokenizer files)")
    if not (path / CONFIG_FILE).is_file():
        raise HFCheckpointError(f"{where}: {path / CONFIG_FILE} is missing; not a save_pretrained checkpoint")
    try:
        json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise HFCheckpointError(f"{where}: {path / CONFIG_FILE} is not valid JSON ({err})") from None
    for shard in _weight_files(path, where):
        try:
            with safe_open(str(shard), framework="pt") as fh:
                fh.keys()
        except (SafetensorError, OSError) as err:
            raise HFCheckpointError(f"{where}: {shard} is not a whole safetensors file ({_first_line(err)}); "
                                    "download or save the checkpoint again") from None


def _weight_files(path: Path, where: str) -> list[Path]:
    if (path / WEIGHTS_INDEX).is_file():
        try:
            names = sorted(set(json.loads((path / WEIGHTS_INDEX).read_text(encoding="utf-8"))["weight_map"].values()))
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise HFCheckpointError(f"{where}: {path / WEIGHTS_INDEX} has no readable weight_map ({err})") from None
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise HFCheckpointError(f"{where}: {path / missing[0]} is missing (listed by {WEIGHTS_INDEX})")
        return [path / n for n in names]
    if (path / WEIGHTS_FILE).is_file():
        return [path / WEIGHTS_FILE]
    pickled = [n for n in PICKLE_WEIGHTS if (path / n).is_file()]
    if pickled:
        raise HFCheckpointError(f"{where}: weights only as {pickled[0]}; the pipeline reads safetensors, never a "
                                "pickle: load it once with transformers and save_pretrained it (safetensors)")
    raise HFCheckpointError(f"{where}: {path / WEIGHTS_FILE} is missing")


def _check_architecture(config: Any, auto: Any, head: str, where: str) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING, MODEL_MAPPING

    mapping = MODEL_FOR_MASKED_LM_MAPPING if head == MASKED_LM else MODEL_MAPPING
    if type(config) not in mapping:
        need = ("an encoder with a masked-LM head (BERT, RoBERTa/XLM-R, ALBERT...)" if head == MASKED_LM
                else "an architecture transformers' AutoModel knows")
        raise HFCheckpointError(f"{where}: its {CONFIG_FILE} is a {config.model_type!r} model "
                                f"({type(config).__name__}), which {auto.__name__} does not support; it must be {need}")


def _load_tokenizer(path: Path, where: str) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise HFCheckpointError(f"{where}: no loadable tokenizer ({_first_line(err)})") from None
    # Without its vocabulary files transformers still builds the class, holding the special tokens alone.
    names = dict(getattr(type(tokenizer), "vocab_files_names", None) or {})
    full = names.pop("tokenizer_file", FULL_TOKENIZER)
    if not (path / full).is_file():
        missing = [n for n in names.values() if not (path / n).is_file()]
        if missing or not names:
            also = f", and so {'is' if len(missing) == 1 else 'are'} {', '.join(missing)}" if missing else ""
            raise HFCheckpointError(f"{where}: {path / full} is missing{also}: the checkpoint has no tokenizer files; "
                                    "save its tokenizer into it with save_pretrained")
    specials = set(tokenizer.all_special_ids)
    if len(tokenizer) <= len(specials):
        raise HFCheckpointError(f"{where}: the tokenizer holds only its {len(specials)} special tokens; its "
                                f"vocabulary file ({full}) is empty or damaged")
    return tokenizer


def _encoder_part(model: Any, name: str) -> bool:
    """Whether the checkpoint tensor ``name`` belongs to the encoder (not a head, not the pooler)."""
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and name.startswith(prefix + "."):
        name = name[len(prefix) + 1:]
    elif model.base_model is not model:
        return False  # a head of a *For* class, beside the prefixed encoder
    first = name.split(".", 1)[0]
    return first != UNUSED and first in dict(model.base_model.named_children())


def _check_tensors(model: Any, info: dict, where: str) -> None:
    mismatched = sorted(info.get("mismatched_keys") or (), key=lambda item: item[0])
    if mismatched:
        name, found, wanted = mismatched[0]
        more = f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
        raise HFCheckpointError(f"{where}: tensor {name} has shape {list(found)} in the weights but {list(wanted)} "
                                f"in the model its {CONFIG_FILE} builds{more}; the config does not fit the weights")
    missing = sorted(info.get("missing_keys") or ())
    encoder_missing = [k for k in missing if _in_model_encoder(model, k)]
    if encoder_missing:
        more = f" (and {len(encoder_missing) - 1} more)" if len(encoder_missing) > 1 else ""
        raise HFCheckpointError(f"{where}: tensor {encoder_missing[0]} of the model its {CONFIG_FILE} builds is not "
                                f"in the weights{more}; the config does not fit the weights")
    extra = sorted(k for k in info.get("unexpected_keys") or () if _encoder_part(model, k))
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise HFCheckpointError(f"{where}: tensor {extra[0]} of the weights has no place in the model its "
                                f"{CONFIG_FILE} builds{more}; the config does not fit the weights")
    heads = [k for k in missing if not _in_model_encoder(model, k) and UNUSED not in k.split(".")]
    if heads:
        log.warning("%s: %d head tensor(s) not in the checkpoint start seeded (%s%s)", where, len(heads), heads[0],
                    ", ..." if len(heads) > 1 else "")


def _in_model_encoder(model: Any, name: str) -> bool:
    """Whether the model's own parameter ``name`` is an encoder one (the pooler aside)."""
    prefix = getattr(model, "base_model_prefix", "")
    if model.base_model is not model:
        if not name.startswith(prefix + "."):
            return False
        name = name[len(prefix) + 1:]
    return name.split(".", 1)[0] != UNUSED
