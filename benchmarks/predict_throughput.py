"""Tweets/s of `twilbert predict`'s path vs a Hugging Face `pipeline('text-classification')` on the same model.

Ours: ``predict_stream`` (preprocessing, SentencePiece, length-bucketed batches, labels and TSV lines
written to memory). Theirs: ``pipeline('text-classification', top_k=None)`` over
``AlbertForSequenceClassification`` (``BertForSequenceClassification`` for an unfactorized, unshared
encoder) holding our encoder's weights (``twilbert.model.hf.to_hf``) and our output layer; its
tokenizer is the one ``twilbert export-hf`` declares (same ids as ours on the same text).

Same texts, same max length, same batch size, one process, the two sides alternating, the median of
``--repeats`` timed runs each. Differences that remain, by design of each side:
- HF's classification head pools [CLS] through its pooler (dense H->H, tanh) where ours averages the
  tokens (``collapse_mode`` avg) or takes [CLS] without a pooler, so the HF pooler keeps its random
  init and the two sides' probabilities differ; the cost differs by one H x H product per text.
- The pipeline gets the raw texts (no tweet normalization), which favours it.

    python benchmarks/predict_throughput.py                       # models/finetuned/tass_default
    python benchmarks/predict_throughput.py --synthetic small     # random weights, H=256, 4 layers
    python benchmarks/predict_throughput.py --model DIR --n 5000 --batch-size 64 --repeats 5 --threads 1
    python benchmarks/predict_throughput.py --synthetic tiny --startup-only   # start-up figures only

Start-up: the wall time of ``twilbert predict --model DIR hola`` (one text, a fresh process: imports,
model loading, one prediction) beside its peers ``python -c pass`` and ``python -c "import torch"``
measured in the same run (medians of ``--startup-repeats``, the three alternating), and which heavy
packages (MLflow, DVC, scikit-learn, transformers...) that process imported: none is expected.

Prints the figures, then one JSON line: {"ours_tweets_s": .., "hf_tweets_s": .., "ratio": .., "startup_s": ..,
"python_s": .., "torch_import_s": ..}.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from twilbert.config import ModelConfig, TaskConfig, TaskSpec, VocabConfig
from twilbert.data.tokenizer import Tokenizer, train_vocab
from twilbert.inference.inputs import Chunk
from twilbert.inference.predict import FinetunedModel, load_finetuned, predict_stream
from twilbert.model import HeadConfig, ModelCard, TWilBertForClassification, save_pretrained
from twilbert.model.card import pretraining_positions
from twilbert.model.hf import hf_config, to_hf, tokenizer_config
from twilbert.model.manifest import write_manifest

log = logging.getLogger("benchmark")

DEFAULT_MODEL = Path("models/finetuned/tass_default")
WORDS = (
    "hola que tal estoy muy feliz hoy con mis amigos no me gusta nada este lunes qué bonito día gracias por "
    "todo odio el tráfico de la ciudad vamos al partido esta noche buenísimo el concierto de ayer increíble "
    "pésimo servicio la verdad es que nunca pensé que esto pasaría en mi vida madre mía"
).split()
EXTRAS = ("@usuario_{}", "https://t.co/{}", "#Fiesta{}", "jajajaja", "😂", "🙏🏽", "holaaaaa", "!!!")
SYNTHETIC = {
    "tiny": dict(embedding_size=32, hidden_size=64, n_encoders=2, n_heads=2, intermediate_size=128),
    "small": dict(embedding_size=128, hidden_size=256, n_encoders=4, n_heads=4, intermediate_size=1024),
    "base": dict(embedding_size=128, hidden_size=768, n_encoders=6, n_heads=6, intermediate_size=3072),
}


def make_texts(n: int, seed: int = 0) -> list[str]:
    """Tweet-like texts of 3 to 45 words with mentions, links, hashtags, laughter and emoji."""
    rng = random.Random(seed)
    texts = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 45))]
        for _ in range(rng.randint(0, 3)):
            words.insert(rng.randint(0, len(words)), rng.choice(EXTRAS).format(i))
        texts.append(" ".join(words))
    return texts


def synthetic_model(directory: Path, size: str, max_len: int) -> Path:
    """A finetuned-model directory with random weights, for sizes the pipeline has not trained."""
    vocab_dir = train_vocab(make_texts(3000, seed=1), directory / "vocab", VocabConfig(vocab_size=2000))
    tokenizer = Tokenizer(vocab_dir)
    cfg = ModelConfig(name=size, pkm=False, **SYNTHETIC[size])
    cfg.validate()
    labels = {"N": 0, "NEU": 1, "NONE": 2, "P": 3}
    torch.manual_seed(0)
    max_positions = pretraining_positions(max_len)
    model = TWilBertForClassification(cfg, tokenizer.vocab_size, max_positions, len(labels))
    task = TaskConfig(name="synthetic", task=TaskSpec(categories=labels))
    out = directory / "model"
    card = ModelCard(cfg, tokenizer.vocab_size, max_positions, head=HeadConfig(), task=task, max_len_test=max_len)
    save_pretrained(out, model, card)
    tokenizer.copy_to(out)
    write_manifest(out)  # sealed as the finetune stage seals its output
    return out


def hf_pipeline(fm: FinetunedModel, model_dir: Path, tmp: Path):
    """``pipeline('text-classification')`` over the HF export of ``fm``'s encoder plus its output layer."""
    import transformers
    from transformers import AutoTokenizer, pipeline

    classifier = fm.members[0].model
    encoder = classifier.twilbert
    cfg, n_labels = encoder.cfg, classifier.classifier.out.out_features
    config = hf_config(cfg, encoder.vocab_size, encoder.max_positions)
    config.num_labels = n_labels
    config.id2label = dict(enumerate(fm.labels))
    config.label2id = {label: i for i, label in enumerate(fm.labels)}
    family = "Albert" if type(config).__name__.startswith("Albert") else "Bert"
    hf = getattr(transformers, f"{family}ForSequenceClassification")(config)
    base = getattr(hf, family.lower())
    exported = to_hf(encoder, cfg, encoder.vocab_size, encoder.max_positions)
    missing, unexpected = base.load_state_dict(exported.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("pooler.") for k in missing), (missing, unexpected)
    head = classifier.classifier
    if not head.hidden:  # our output layer maps H -> C as HF's classifier does
        hf.classifier.load_state_dict(head.out.state_dict())
    else:
        log.warning("our head has %d hidden layers: the HF side keeps its own (random) classifier", len(head.hidden))

    tok_dir = tmp / "hf_tokenizer"
    tok_dir.mkdir()
    (tok_dir / "spiece.model").write_bytes((model_dir / "spm.model").read_bytes())
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(encoder.max_positions)))
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    return pipeline("text-classification", model=hf.eval(), tokenizer=tokenizer, device=-1, top_k=None), tokenizer


def run_ours(fm: FinetunedModel, texts: list[str], batch_size: int) -> float:
    sink = io.StringIO()
    start = time.perf_counter()
    predict_stream(fm, [Chunk(list(range(1, len(texts) + 1)), texts, None)], sink, "tsv", batch_size=batch_size)
    elapsed = time.perf_counter() - start
    assert sink.getvalue().count("\n") == len(texts) + 1
    return elapsed


def run_hf(pipe, texts: list[str], batch_size: int, max_length: int) -> float:
    start = time.perf_counter()
    out = pipe(texts, batch_size=batch_size, truncation=True, max_length=max_length)
    elapsed = time.perf_counter() - start
    assert len(out) == len(texts)
    return elapsed


HEAVY = ("mlflow", "dvc", "sklearn", "scipy", "pandas", "transformers", "hydra")
IMPORTED_PROBE = (
    "import sys; from twilbert.cli import main; main(['predict', '--model', sys.argv[1], 'hola']); "
    "print('heavy:', ' '.join(m for m in sys.argv[2:] if m in sys.modules), file=sys.stderr)"
)


def timed_process(argv: list[str]) -> float:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    start = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, env=env)
    return time.perf_counter() - start


def startup_figures(model_dir: Path, repeats: int) -> dict:
    """Medians (s) of `twilbert predict` on one text in a fresh process, and of its peers, alternating."""
    peers = {
        "python_s": [sys.executable, "-c", "pass"],
        "torch_import_s": [sys.executable, "-c", "import torch"],
        "startup_s": [sys.executable, "-m", "twilbert.cli", "predict", "--model", str(model_dir), "hola"],
    }
    for argv in peers.values():  # warm the file cache once
        timed_process(argv)
    times: dict[str, list[float]] = {k: [] for k in peers}
    for r in range(repeats):
        for name in (list(peers) if r % 2 == 0 else list(peers)[::-1]):
            times[name].append(timed_process(peers[name]))
    figures = {k: round(statistics.median(v), 3) for k, v in times.items()}
    done = subprocess.run([sys.executable, "-c", IMPORTED_PROBE, str(model_dir), *HEAVY], check=True,
                          capture_output=True, text=True)
    heavy = [line for line in done.stderr.splitlines() if line.startswith("heavy:")][-1][len("heavy:"):].strip()
    print(f"start-up (medians of {repeats}): `twilbert predict` on 1 text {figures['startup_s']:.2f} s; "
          f"`python -c pass` {figures['python_s']:.2f} s; `python -c 'import torch'` {figures['torch_import_s']:.2f} s")
    print(f"heavy packages the predict process imported: {heavy or 'none'} (checked: {', '.join(HEAVY)})")
    return figures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, help=f"finetuned model directory (default {DEFAULT_MODEL})")
    parser.add_argument("--synthetic", choices=sorted(SYNTHETIC), help="benchmark a random-weight model of this size")
    parser.add_argument("--n", type=int, default=2000, help="tweets per timed run")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    parser.add_argument("--max-len", type=int, default=64, help="tokens per text of a synthetic model")
    parser.add_argument("--startup-repeats", type=int, default=5, help="fresh processes timed per start-up figure")
    parser.add_argument("--startup-only", action="store_true", help="measure the start-up figures only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.repeats < 3:
        parser.error("--repeats must be >= 3 (the median of at least three runs is reported)")

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if args.synthetic:
            model_dir = synthetic_model(tmp, args.synthetic, args.max_len)
        else:
            model_dir = args.model or DEFAULT_MODEL
            if not model_dir.is_dir():
                parser.error(f"{model_dir}: no such model; run `dvc repro`, pass --model DIR or --synthetic SIZE")
        startup = startup_figures(model_dir, args.startup_repeats)
        if args.startup_only:
            print(json.dumps(startup))
            return 0
        fm = load_finetuned(model_dir, "cpu")
        if fm.backbone != "twilbert" or len(fm.members) != 1:
            parser.error(f"{model_dir}: benchmark a single twilbert model "
                         f"(got {fm.backbone}, {len(fm.members)} models)")
        tokenizer = fm.members[0].packer.tokenizer
        pipe, hf_tokenizer = hf_pipeline(fm, model_dir, tmp)
        texts = make_texts(args.n)
        max_length = fm.max_len + 2  # [CLS] text [SEP]

        prepped = [tokenizer.preprocess(t) for t in texts[:500]]
        same = sum(hf_tokenizer(p, verbose=False)["input_ids"] == [3, *ids, 4]
                   for p, ids in zip(prepped, tokenizer.sp.encode(prepped)))
        enc = fm.members[0].model.twilbert.cfg
        print(f"model: {model_dir if not args.synthetic else 'synthetic ' + args.synthetic} (H={enc.hidden_size}, "
              f"L={enc.n_encoders}, E={enc.embedding_size}, heads={enc.n_heads}); HF class: "
              f"{type(pipe.model).__name__}")
        print(f"texts: {len(texts)}, max_length {max_length} tokens, batch size {args.batch_size}, "
              f"torch threads {torch.get_num_threads()}, repeats {args.repeats}")
        print(f"tokenizer agreement on preprocessed text: {same}/{len(prepped)} identical id sequences")

        run_ours(fm, texts[:200], args.batch_size)  # warm-up
        run_hf(pipe, texts[:200], args.batch_size, max_length)
        ours, theirs = [], []
        for r in range(args.repeats):
            sides = [("ours", lambda: run_ours(fm, texts, args.batch_size)),
                     ("hf", lambda: run_hf(pipe, texts, args.batch_size, max_length))]
            for name, run in sides if r % 2 == 0 else sides[::-1]:
                seconds = run()
                (ours if name == "ours" else theirs).append(len(texts) / seconds)
                print(f"  run {r + 1} {name:4s}: {seconds:7.3f} s  {len(texts) / seconds:9.1f} tweets/s")
    ours_s, hf_s = statistics.median(ours), statistics.median(theirs)
    print(f"median: ours {ours_s:.1f} tweets/s, HF pipeline {hf_s:.1f} tweets/s, ratio {ours_s / hf_s:.2f}x")
    ratio = round(ours_s / hf_s, 3)
    print(json.dumps({"ours_tweets_s": round(ours_s, 1), "hf_tweets_s": round(hf_s, 1), "ratio": ratio, **startup}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
