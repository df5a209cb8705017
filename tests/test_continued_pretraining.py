"""Continued pretraining of Hugging Face checkpoints (``training.init_from: hf``) on tiny BERT, RoBERTa
and ALBERT checkpoints built in tests/hf_checkpoints.py: the checkpoint's tokenizer in the vocab and
pairs stages, logits equal to the checkpoint's own forward (positions, token types), the position
limit, tied weights, a lower held-out loss, exact resume after SIGKILL, and an output that
``AutoModelForMaskedLM`` and twilbert's finetune stage read as they are.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import assert_same_weights, killed, make_tweets, ok, run_stage, run_states, write_params
from hf_checkpoints import FAMILIES, make_mlm_checkpoint
from twilbert.config import ConfigError, load_config
from twilbert.data.batch import make_batch, pack_pairs
from twilbert.data.hf_vocab import HFVocab, check_positions, open_vocab, take_hf_vocab, template_from_json
from twilbert.data.pairs import build_pair_shards, load_shards
from twilbert.model.hf_pretraining import HFForPretraining, load_masked_lm
from twilbert.train.pretrain_run import resolve_pretrain_run

MAX_LEN = 12


def continued_overrides(checkpoint: Path, **training) -> list[str]:
    base = {"batch_size": 8, "epochs": 2, "accum_iters": 2, "checkpoint_every": 3, "pll_examples": 2, "device": "cpu",
            "lr": 1e-3, "warmup_steps": 5, "init_from": "hf", "hf_path": str(checkpoint), **training}
    return ["model=tiny", f"representation.max_len={MAX_LEN}", *(f"training.{k}={v}" for k, v in base.items())]


def continued_inputs(root: Path, family: str, tweets: int) -> Path:
    """A tiny ``family`` checkpoint under ``root``, its tokenizer taken as ``root/vocab`` and ``tweets``
    generated tweets it never saw tokenized into ``root/pairs``; returns the checkpoint."""
    checkpoint = make_mlm_checkpoint(root / "checkpoint", family)
    take_hf_vocab(checkpoint, root / "vocab")
    build_pair_shards([(t, None) for t, _ in make_tweets(tweets, seed=11)], open_vocab(root / "vocab"),
                      root / "pairs", max_len=MAX_LEN, heldout_fraction=0.2, shard_size=1000, seed=0)
    return checkpoint


@pytest.fixture(scope="module", params=FAMILIES)
def family_inputs(request, tmp_path_factory):
    """(family, checkpoint, vocab, pairs) of a tiny checkpoint and 60 generated tweets never seen by it."""
    root = tmp_path_factory.mktemp(f"continued-{request.param}")
    checkpoint = continued_inputs(root, request.param, 60)
    return request.param, checkpoint, root / "vocab", root / "pairs"


def hf_batch(tokenizer, a: list[str], b: list[str], segments: bool) -> dict:
    # token types asked for explicitly: transformers 5's ALBERT tokenizer leaves them out by default
    return tokenizer(a, b, padding=True, return_tensors="pt", return_token_type_ids=segments)


# --------------------------------------------------------------------------------------------
# The keys
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    (["training.init_from=hf"], r"training\.hf_path must name a local Hugging Face checkpoint"),
    (["training.init_from=hf", "training.hf_path=ck", "training.path_initial_weights=models/pretrained"],
     r"training\.path_initial_weights continues twilbert's own weights"),
    (["training.rop=false"], r"training\.rop applies to init_from 'hf'; .*model\.rop\.enabled"),
    (["training.init_from=pretrained"], r"training\.init_from"),
])
def test_continued_pretraining_keys_are_checked_on_load(overrides, message):
    from helpers import REPO
    from twilbert.config import compose

    with pytest.raises(ConfigError, match=message):
        load_config(compose(["model=tiny", *overrides], REPO / "conf"))


def test_scratch_is_the_default_and_hf_mode_loads():
    from helpers import REPO
    from twilbert.config import compose

    cfg = load_config(compose(["model=tiny"], REPO / "conf"))
    assert (cfg.training.init_from, cfg.training.hf_path, cfg.training.rop) == ("scratch", None, True)
    cfg = load_config(compose(["model=tiny", "training.init_from=hf", "training.hf_path=ck", "training.rop=false"],
                              REPO / "conf"))
    assert (cfg.training.init_from, cfg.training.hf_path, cfg.training.rop) == ("hf", "ck", False)


# --------------------------------------------------------------------------------------------
# The vocabulary and the shards
# --------------------------------------------------------------------------------------------


def test_the_vocab_holds_the_checkpoints_tokenizer_and_shards_pack_pairs_as_it_does(family_inputs):
    from transformers import AutoTokenizer

    family, checkpoint, vocab_dir, pairs_dir = family_inputs
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    vocab = HFVocab(vocab_dir)
    assert (vocab.vocab_size, vocab.mask_id) == (len(tokenizer), tokenizer.mask_token_id)
    manifest = json.loads((pairs_dir / "manifest.json").read_text())
    assert manifest["dtype"] == "uint16" and manifest["template"] == vocab.template_json
    shards = load_shards(pairs_dir / "train")
    rows = shards.take(np.arange(6))  # example 2k: pair k in its order; 2k+1: swapped
    tokens, index, *_ = shards.arrays(0)
    a = [tokens[s : s + la].tolist() for s, la, _ in index[:3]]
    b = [tokens[s + la : s + la + lb].tolist() for s, la, lb in index[:3]]
    firsts, seconds = [x for pair in zip(a, b) for x in pair], [x for pair in zip(b, a) for x in pair]
    # the packing the logits test checks against the tokenizer's own pair encoding
    expected = pack_pairs(firsts, seconds, MAX_LEN, template_from_json(vocab.template_json))
    for i in range(6):
        ours, theirs = rows["input_ids"][i, : rows["length"][i]], expected["input_ids"][i, : expected["length"][i]]
        assert ours.tolist() == theirs.tolist()
    assert rows["labels"].tolist() == [1, 0] * 3
    assert (rows["input_ids"][:, : rows["length"].min()] != tokenizer.pad_token_id).all()


def test_a_vocabulary_past_65536_ids_makes_int32_shards(tmp_path):
    from twilbert.data.shards import token_dtype

    assert token_dtype(250_002) == np.int32 and token_dtype(31_002) == np.uint16  # XLM-R; BETO


def test_max_len_past_the_checkpoints_positions_is_refused_in_one_line(family_inputs):
    _, _, vocab_dir, _ = family_inputs
    meta = HFVocab(vocab_dir).meta
    check_positions(meta, 30, "ckpt")  # 2 * 30 + 3 (or + 4) <= 64
    with pytest.raises(ConfigError) as err:
        check_positions(meta, 40, "ckpt")
    message = str(err.value)
    assert "\n" not in message and "representation.max_len=40" in message and "<= 30" in message


# --------------------------------------------------------------------------------------------
# Whole-word masking: word starts from the tokenizer's word ids
# --------------------------------------------------------------------------------------------

# words the tiny vocabularies split into several pieces (WordPiece ##, byte-level BPE, Unigram)
SPLIT_TEXTS = ["extraordinariamente bonito jajajaja", "superconcierto buenísimo", "qué maravillosamente"]


def word_lists(special: torch.Tensor, starts: torch.Tensor) -> list[list[int]]:
    """The positions of each word in one row: a marked start and the unmarked pieces after it."""
    words = []
    for t, (sp, st) in enumerate(zip(special.tolist(), starts.tolist())):
        if not sp and (st or not words or special[t - 1]):
            words.append([t])
        elif not sp:
            words[-1].append(t)
    return words


def test_word_starts_are_the_tokenizers_word_ids_and_every_segment_starts_a_word(family_inputs):
    from transformers import AutoTokenizer

    from twilbert.data.batch import batch_of

    family, checkpoint, vocab_dir, pairs_dir = family_inputs
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    vocab = HFVocab(vocab_dir)
    texts = [vocab.preprocess(t) for t in SPLIT_TEXTS + TEXTS_A]
    ids, flat = vocab.encode_words(texts)
    starts = np.split(flat.tolist(), np.cumsum([len(i) for i in ids])[:-1])
    for text, ours, flags in zip(texts, ids, starts):
        theirs = tokenizer(text, add_special_tokens=False)
        word_ids = theirs.word_ids()
        assert ours == theirs["input_ids"]
        assert flags.tolist() == [i == 0 or w != word_ids[i - 1] for i, w in enumerate(word_ids)]
    assert any(not all(f) for f in starts), f"{family}: no word split into pieces"

    manifest = json.loads((pairs_dir / "manifest.json").read_text())
    assert manifest["word_starts"] is True
    shards = load_shards(pairs_dir / "train")
    batch = batch_of(shards, np.arange(len(shards)))
    assert not (batch.word_start & batch.special_mask).any()
    # each segment's first token (right after a special) starts a word, though a SOP cut may split one
    after_special = torch.nn.functional.pad(batch.special_mask[:, :-1], (1, 0), value=True) & ~batch.special_mask
    assert batch.word_start[after_special].all()
    assert (~batch.word_start & ~batch.special_mask).any()  # some word of the corpus has several pieces


def test_word_start_files_are_checksummed_verified_and_the_same_bytes_for_any_workers(family_inputs, tmp_path):
    import shutil

    from twilbert.data.shards import PairsDataError, verify_pairs

    _, _, vocab_dir, _ = family_inputs
    tweets = [t for t, _ in make_tweets(80, seed=5)]
    corpus = [(t, None) if i % 3 else (t, tweets[(i + 1) % 80]) for i, t in enumerate(tweets)]  # replies too
    args = dict(max_len=MAX_LEN, heldout_fraction=0.2, shard_size=30, seed=1)
    one = build_pair_shards(corpus, open_vocab(vocab_dir), tmp_path / "one", workers=1, chunk_rows=64, **args)
    two = build_pair_shards(corpus, open_vocab(vocab_dir), tmp_path / "two", workers=2, chunk_rows=7, **args)
    assert one == two

    def files(d):
        return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}

    assert files(tmp_path / "one") == files(tmp_path / "two")
    words = sorted((tmp_path / "one").rglob("*.words.npy"))
    assert len(words) == 6  # 3 shards in each split
    manifest = json.loads((tmp_path / "one" / "train" / "manifest.json").read_text())
    assert all("words" in entry["sha256"] for entry in manifest["shards"])
    assert verify_pairs(tmp_path / "one", full=True) == 6

    damaged = tmp_path / "damaged"
    shutil.copytree(tmp_path / "one", damaged)
    path = damaged / "train" / "shard-00000.words.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(PairsDataError, match=r"shard-00000\.words\.npy"):
        verify_pairs(damaged)
    path.unlink()
    with pytest.raises(PairsDataError, match=r"shard-00000\.words\.npy: missing"):
        verify_pairs(damaged)


def pieces_batch(vocab: HFVocab):
    """The SPLIT_TEXTS as pairs packed in the checkpoint's template, with their word starts."""
    template = template_from_json(vocab.template_json)
    ids, flat = vocab.encode_words([vocab.preprocess(t) for t in SPLIT_TEXTS])
    starts = np.split(flat, np.cumsum([len(i) for i in ids])[:-1])
    a, b = ids, ids[1:] + ids[:1]
    packed = pack_pairs(a, b, 30, template)
    starts = [s.astype(int).tolist() for s in starts]
    # the template's ids land on specials, where make_batch drops them
    flags = pack_pairs(starts, starts[1:] + starts[:1], 30, template)["input_ids"].astype(bool)
    return make_batch(packed["input_ids"], packed["len_a"], packed["length"], np.ones(len(a), dtype=np.int64),
                      template, word_start=flags)


@pytest.mark.parametrize("kind", ["word", "span"])
def test_a_word_split_into_pieces_is_masked_all_or_nothing_within_the_budget(family_inputs, kind):
    from twilbert.config import MaskedLMConfig
    from twilbert.data.masking import mask_tokens
    from twilbert.train.objective import PretrainObjective

    family, _, vocab_dir, _ = family_inputs
    vocab = HFVocab(vocab_dir)
    batch = pieces_batch(vocab)
    cfg = MaskedLMConfig(type=kind, budget=0.15)
    objective = PretrainObjective(cfg, 0, vocab.vocab_size, torch.device("cpu"), mask_id=vocab.mask_id,
                                  n_special=vocab.n_special)
    rows = [word_lists(batch.special_mask[r], batch.word_start[r]) for r in range(len(batch.input_ids))]
    assert any(len(w) > 1 for words in rows for w in words), family
    target = torch.round((~batch.special_mask).sum(1).double() * cfg.budget).long().clamp(min=1)
    whole_pieces = 0
    for step in range(100):
        masked, labels = objective.mask(batch, 0, step)
        chosen = labels != -100
        for r, words in enumerate(rows):
            picked = [w for w in words if chosen[r, w].all()]
            for w in words:
                assert chosen[r, w].all() or not chosen[r, w].any(), (family, step, r, w)
                if chosen[r, w].all() and len(w) > 1:
                    whole_pieces += 1
                    as_mask = masked[r, w] == vocab.mask_id
                    assert as_mask.all() or not as_mask.any()  # one mask/random/keep draw per word (or span)
            assert picked and (chosen[r].sum() <= target[r] or len(picked) == 1)
    assert whole_pieces > 10
    again = objective.mask(batch, 0, 7)
    first = objective.mask(batch, 0, 7)
    assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])
    # without word starts, the same config masks tokens: some word is then cut
    cut = False
    for step in range(100):
        generator = torch.Generator().manual_seed(step)
        _, labels = mask_tokens(batch.input_ids, batch.special_mask, cfg, vocab.vocab_size, vocab.mask_id,
                                vocab.n_special, generator)
        cut |= any(0 < int((labels[r, w] != -100).sum()) < len(w) for r, words in enumerate(rows) for w in words)
    assert cut


# --------------------------------------------------------------------------------------------
# The model: HF's own logits, positions and token types
# --------------------------------------------------------------------------------------------

TEXTS_A = ["hola que tal estoy muy feliz hoy", "odio el tráfico", "vamos al partido esta noche con mis amigos"]
TEXTS_B = ["gracias por todo", "qué bonito día de concierto ayer", "no"]


def test_logits_equal_the_checkpoints_own_forward_on_a_padded_pair_batch(family_inputs):
    from transformers import AutoTokenizer

    family, checkpoint, vocab_dir, _ = family_inputs
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    vocab = HFVocab(vocab_dir)
    template = template_from_json(vocab.template_json)
    a = tokenizer(TEXTS_A, add_special_tokens=False)["input_ids"]
    b = tokenizer(TEXTS_B, add_special_tokens=False)["input_ids"]
    assert max(map(len, a + b)) <= 30  # untruncated: the tokenizer below does not truncate
    packed = pack_pairs(a, b, 30, template)
    batch = make_batch(packed["input_ids"], packed["len_a"], packed["length"], np.ones(3, dtype=np.int64), template)
    theirs = hf_batch(tokenizer, TEXTS_A, TEXTS_B, segments=family != "roberta")
    assert batch.padded and torch.equal(batch.input_ids, theirs["input_ids"])  # rows of unequal length, padded

    mlm = load_masked_lm(checkpoint).eval()
    model = HFForPretraining(mlm, rop=True).eval()
    with torch.no_grad():
        ours = model.logits(batch.input_ids, batch.segment_ids, batch.attention_mask)
        reference = mlm(**theirs).logits
    real = batch.attention_mask
    assert torch.equal(ours[real], reference[real])
    if family == "roberta":
        # the traps, shown to matter: positions from 0 instead of padding_idx + 1, or a type-1 segment
        assert not model.use_segments and batch.segment_ids.max() == 1
        with torch.no_grad():
            naive = mlm(**theirs, position_ids=torch.arange(batch.input_ids.shape[1]).expand_as(batch.input_ids))
        assert not torch.allclose(naive.logits[real], reference[real])
        with pytest.raises(IndexError):
            mlm(input_ids=batch.input_ids, attention_mask=batch.attention_mask, token_type_ids=batch.segment_ids)
    else:
        assert model.use_segments and torch.equal(batch.segment_ids, theirs["token_type_ids"])


def test_the_masked_positions_path_gives_the_full_logits_rows(family_inputs):
    _, checkpoint, vocab_dir, pairs_dir = family_inputs
    from twilbert.data.batch import batch_of

    batch = batch_of(load_shards(pairs_dir / "train"), np.arange(8))
    model = HFForPretraining(load_masked_lm(checkpoint), rop=False).eval()
    labels = torch.full_like(batch.input_ids, -100)
    labels[:, 1] = batch.input_ids[:, 1]
    with torch.no_grad():
        out = model(batch.input_ids, batch.segment_ids, batch.attention_mask, labels)
        full = model.logits(batch.input_ids, batch.segment_ids, batch.attention_mask)
    torch.testing.assert_close(out.mlm_logits, full[:, 1], rtol=1e-5, atol=1e-5)
    assert torch.equal(out.mlm_targets, batch.input_ids[:, 1]) and out.rop_logits is None


# --------------------------------------------------------------------------------------------
# Training: lower held-out loss, the output folder, resume
# --------------------------------------------------------------------------------------------


def heldout_loss_before(cfg, checkpoint: Path, vocab_dir: Path, pairs_dir: Path) -> float:
    from twilbert.train.heldout import evaluate_heldout
    from twilbert.train.objective import PretrainObjective

    vocab = HFVocab(vocab_dir)
    model = HFForPretraining(load_masked_lm(checkpoint), rop=False)
    objective = PretrainObjective(cfg.model.masked_lm, cfg.seed, vocab.vocab_size, torch.device("cpu"),
                                  mask_id=vocab.mask_id, n_special=vocab.n_special)
    return evaluate_heldout(model, objective, load_shards(pairs_dir / "heldout"), 8)["heldout_mlm_loss"]


def test_continued_pretraining_lowers_heldout_loss_and_writes_a_folder_hf_loads_with_the_same_logits(
        family_inputs, tmp_path):
    from transformers import AutoModelForMaskedLM

    from twilbert.model.hf_pretraining import CARD_NAME, ROP_FILE
    from twilbert.train.continued import continued_pretrain

    family, checkpoint, vocab_dir, pairs_dir = family_inputs
    work = tmp_path / "work"
    write_params(work, continued_overrides(checkpoint, epochs=3, lr=3e-3, rop="true"))
    cfg = load_config(work / "params.yaml")
    before = heldout_loss_before(cfg, checkpoint, vocab_dir, pairs_dir)
    out = tmp_path / "pretrained"
    metrics = continued_pretrain(resolve_pretrain_run(cfg), pairs_dir, vocab_dir, out, tmp_path / "checkpoints")
    assert metrics["heldout_mlm_loss"] < before - 0.05, (before, metrics)
    assert "heldout_rop_accuracy" in metrics and "heldout_pll" in metrics

    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", CARD_NAME, ROP_FILE, "checksums.json"} <= names
    loaded = AutoModelForMaskedLM.from_pretrained(out, local_files_only=True).eval()
    if loaded.config.tie_word_embeddings:  # tied after save and load
        assert loaded.get_output_embeddings().weight.data_ptr() == loaded.get_input_embeddings().weight.data_ptr()
    trained = HFForPretraining(load_masked_lm(out), rop=False).eval()
    from twilbert.data.batch import batch_of

    batch = batch_of(load_shards(pairs_dir / "heldout"), np.arange(4))
    with torch.no_grad():
        extra = {"token_type_ids": batch.segment_ids} if trained.use_segments else {}
        theirs = loaded(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long(), **extra).logits
        ours = trained.logits(batch.input_ids, batch.segment_ids, batch.attention_mask)
    assert torch.equal(ours[batch.attention_mask], theirs[batch.attention_mask])
    card = json.loads((out / CARD_NAME).read_text())
    assert card["backbone"] == "hf" and card["epoch"] == metrics["epoch"]


@pytest.mark.slow
@pytest.mark.parametrize("masking", ["span", "word"])  # word: whole words, from the shards' word starts
def test_continued_pretraining_killed_mid_epoch_resumes_bit_for_bit(tmp_path, masking):
    root = tmp_path / "inputs"
    checkpoint = continued_inputs(root, "roberta", 60)
    work = tmp_path / "work"
    write_params(work, [*continued_overrides(checkpoint), f"model.masked_lm.type={masking}"])

    def args(out: Path) -> list:
        return ["--pairs", root / "pairs", "--vocab", root / "vocab", "--out", out / "model",
                "--checkpoints", out / "checkpoints", "--metrics", out / "metrics.json"]

    reference = tmp_path / "reference"
    ok(run_stage("pretrain.py", args(reference), work))
    out = tmp_path / "interrupted"
    killed(run_stage("pretrain.py", args(out), work, kill_at=10))  # due at 9, saved at the end of the window 9-10
    assert not (out / "model").exists()
    resumed = ok(run_stage("pretrain.py", args(out), work))
    assert "resuming at epoch 1, batch 10" in resumed.stderr
    for name in ("model.safetensors", "rop_head.safetensors"):
        assert_same_weights(reference / "model" / name, out / "model" / name)
    assert json.loads((reference / "metrics.json").read_text()) == json.loads((out / "metrics.json").read_text())
    assert (reference / "model" / "checksums.json").read_bytes() == (out / "model" / "checksums.json").read_bytes()


def test_the_finetune_stage_and_predict_read_the_continued_model_with_no_extra_step(tmp_path):
    from finetune_data import first, make_config, write_task
    from helpers import REPO
    from twilbert.config import compose
    from twilbert.inference.predict import load_finetuned
    from twilbert.train.continued import continued_pretrain
    from twilbert.train.finetune.stage_work import finetune_task

    root = tmp_path / "inputs"
    checkpoint = continued_inputs(root, "roberta", 40)
    work = tmp_path / "work"
    write_params(work, continued_overrides(checkpoint, epochs=1))
    pretrained = tmp_path / "pretrained"
    continued_pretrain(resolve_pretrain_run(load_config(work / "params.yaml")),
                       root / "pairs", root / "vocab", pretrained, tmp_path / "ck")

    raw = compose(["model=tiny"], REPO / "conf")
    cfg = make_config(raw, {"t": write_task(tmp_path / "data")})  # finetuning.backbone: twilbert, the default
    assert cfg.finetuning.backbone == "twilbert"
    metrics = finetune_task(cfg, first(cfg), pretrained, tmp_path / "model", tmp_path / "results")
    assert (metrics["model"], metrics["model_name"]) == ("hf", "pretrained")
    card = json.loads((tmp_path / "model" / "config.json").read_text())
    assert card["backbone"] == "hf"
    finetuned = load_finetuned(tmp_path / "model")
    scores = finetuned.scores(["hola que tal estoy muy feliz hoy", "odio el tráfico"])
    assert scores.shape == (2, 4) and np.allclose(scores.sum(1), 1.0, atol=1e-5)

    from twilbert.reports.inspection import inspect_model

    report, inspected = inspect_model(pretrained, root / "pairs" / "heldout", 2, 0, 8, 2, torch.device("cpu"))
    assert {"heldout_mlm_accuracy", "heldout_pll", "heldout_rop_accuracy", "before_heldout_mlm_accuracy",
            "before_heldout_perplexity", "before_heldout_pll"} <= set(inspected)
    assert "before continued pretraining" in report and "## Sample 2" in report

    # A flipped byte in the continued model is refused before any finetuning, naming the file.
    from twilbert.model.manifest import ManifestError
    from twilbert.train.finetune.resolved import hf_pretrained_backbone

    weights = pretrained / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="model.safetensors: sha256 differs"):
        hf_pretrained_backbone(cfg.finetuning, pretrained)


def test_continued_pretraining_under_bf16_autocast_trains_to_finite_metrics(tmp_path):
    import math

    from twilbert.train.continued import continued_pretrain

    root = tmp_path / "inputs"
    checkpoint = continued_inputs(root, "bert", 30)
    work = tmp_path / "work"
    write_params(work, continued_overrides(checkpoint, epochs=1, precision="bf16", pll_examples=0))
    metrics = continued_pretrain(resolve_pretrain_run(load_config(work / "params.yaml")), root / "pairs", root / "vocab",
                                 tmp_path / "out", tmp_path / "ck")
    assert math.isfinite(metrics["heldout_mlm_loss"]) and math.isfinite(metrics["train_loss"])
    from transformers import AutoModelForMaskedLM

    saved = AutoModelForMaskedLM.from_pretrained(tmp_path / "out", local_files_only=True)
    assert saved.dtype == torch.float32  # autocast leaves the weights in float32


@pytest.mark.slow
@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_torchrun_continues_a_checkpoint_on_two_ranks_and_rank_0_writes_one_folder(tmp_path, family):
    import sys

    root = tmp_path / "inputs"
    checkpoint = continued_inputs(root, family, 40)
    work = tmp_path / "work"
    write_params(work, continued_overrides(checkpoint, epochs=1, batch_size=4))
    out = tmp_path / "out"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]
    proc = ok(run_stage("pretrain.py", ["--pairs", root / "pairs", "--vocab", root / "vocab", "--out", out / "model",
                                        "--checkpoints", out / "checkpoints", "--metrics", out / "metrics.json"],
                        work, launcher=torchrun))
    assert "2 process(es)" in proc.stderr
    from transformers import AutoModelForMaskedLM

    AutoModelForMaskedLM.from_pretrained(out / "model", local_files_only=True)
    trainer = json.loads(sorted(run_states(out / "checkpoints").glob("step-*"))[-1].joinpath("trainer.json")
                         .read_text())
    assert trainer["world_size"] == 2


def test_the_vocab_stage_refuses_a_max_len_past_the_checkpoints_positions_in_one_line(tmp_path):
    checkpoint = make_mlm_checkpoint(tmp_path / "checkpoint", "roberta")  # 64 usable positions
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("", encoding="utf-8")
    work = tmp_path / "work"
    write_params(work, ["model=tiny", "representation.max_len=31", "training.init_from=hf",
                        f"training.hf_path={checkpoint}"])
    proc = run_stage("vocab.py", ["--corpus", corpus, "--out", tmp_path / "vocab"], work)
    assert proc.returncode == 2 and not (tmp_path / "vocab").exists(), proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "representation.max_len=31 gives pairs of 66 tokens, more than the 64 positions" in \
        errors[0] and "representation.max_len <= 30" in errors[0], proc.stderr[-2000:]
