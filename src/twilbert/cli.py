"""The `twilbert` command: compose params, and tools around trained models (predict, embeddings, export-hf).

The model tools import torch lazily, so `compose` stays quick.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Optional

import yaml

from twilbert.config import ConfigError, compose, load_config, read_yaml
from twilbert.config.strict import flatten

log = logging.getLogger("twilbert")

PARAMS_HEADER = (
    "# Generated from conf/ by `make params` (DVC writes the same under `dvc exp run`).\n"
    "# Edit conf/, not this file.\n"
)


def dump_params(raw: dict) -> str:
    return PARAMS_HEADER + yaml.safe_dump(raw, sort_keys=False, allow_unicode=True, width=120)


def params_changes(old: object, new: object, shown: int = 4) -> str:
    """'model.n_encoders: 4 -> 2, ...': the keys whose values differ, at most ``shown`` of them."""
    a, b = flatten(old or {}), flatten(new or {})
    keys = [k for k in dict.fromkeys([*a, *b]) if a.get(k, "(absent)") != b.get(k, "(absent)")]
    text = ", ".join(f"{k}: {a.get(k, '(absent)')} -> {b.get(k, '(absent)')}" for k in keys[:shown])
    return text + (f" and {len(keys) - shown} more" if len(keys) > shown else "")


def cmd_compose(args: argparse.Namespace) -> int:
    raw = compose(args.overrides, args.conf)
    load_config(raw)  # validate before writing anything
    if args.check:
        target = Path(args.check)
        current = read_yaml(target) if target.is_file() else None
        if current != raw:
            # After `dvc exp run` the workspace holds the experiment's params: say how to go back, in one line.
            print(f"{target} is not the composition of {args.conf}/ ({params_changes(raw, current)}; "
                  f"e.g. after `dvc exp run`). Back to the baseline: `git checkout {target}` or `make params`; "
                  "an experiment comes back with `dvc exp apply NAME` (names: `make compare`); "
                  f"to keep these values, copy them into {args.conf}/.", file=sys.stderr)
            return 1
        return 0
    text = dump_params(raw)
    if args.out:
        old_file = Path(args.out)
        try:
            old = read_yaml(old_file, hint="") if old_file.is_file() else None
        except ConfigError as err:  # `make params` is how a damaged params.yaml is repaired: say it, then replace it
            print(f"{err}: replaced with the composition of {args.conf}/", file=sys.stderr)
            old = None
        if old is not None and old != raw:  # never replace an experiment's params without a word
            print(f"{args.out}: {params_changes(old, raw)} (from {args.conf}/). Values of a DVC experiment "
                  "stay in it: `dvc exp apply NAME` brings them back (names: `make compare`).", file=sys.stderr)
        from twilbert.io_utils import atomic_write

        with atomic_write(args.out) as fh:
            fh.write(text)
    else:
        sys.stdout.write(text)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    # Only the prediction path is imported here (torch, numpy, sentencepiece): no MLflow, DVC or
    # scikit-learn, so that the command starts quickly.
    from twilbert.inference.classifier import load_classifier
    from twilbert.inference.inputs import PredictError, chunked, iter_lines, open_input, text_rows, tsv_rows, with_aux
    from twilbert.io_utils import atomic_write, command_output

    output = command_output(args.output, (args.input, args.aux_input), args.model) if args.output else None
    if args.texts and args.input:
        raise PredictError("give TEXT arguments or --input, not both")
    if not args.texts and not args.input:
        raise PredictError("no input: give TEXT arguments, or --input FILE (- for stdin)")
    if args.column and not args.input:
        raise PredictError("--column reads a TSV file: use it with --input FILE (- for stdin)")
    clf = load_classifier(args.model, args.device, blend=not args.no_blend, batch_size=args.batch_size,
                          precision=args.precision)
    aux_column = None
    if args.aux_input and not clf.aux_header:
        raise PredictError(f"{args.model}: the model takes one text per example; drop --aux-input")
    if clf.aux_header and not args.aux_input:
        if not args.column:
            raise PredictError(
                f"{args.model}: the model was trained with a second text ({clf.aux_header!r}); pass --aux-input FILE "
                f"(one line per input line) or a TSV with a {clf.aux_header!r} column (--input FILE --column NAME)"
            )
        aux_column = clf.aux_header
    with ExitStack() as stack:
        if args.texts:
            name, rows = "arguments", text_rows(args.texts)
        else:
            name = "stdin" if args.input == "-" else args.input
            lines = iter_lines(stack.enter_context(open_input(args.input)), name)
            rows = (tsv_rows(lines, name, args.column, args.id_column, aux_column, allow_empty=True) if args.column
                    else text_rows(lines))
        if args.aux_input:
            aux_lines = iter_lines(stack.enter_context(open_input(args.aux_input)), args.aux_input)
            rows = with_aux(rows, aux_lines, name, args.aux_input)
        out = stack.enter_context(atomic_write(output)) if output else utf8_stdout()
        # An empty input is an empty output (like any Unix filter), not an error.
        n = clf.write(chunked(rows, name, args.chunk_size, allow_empty=True), out, args.format,
                      with_text=not args.no_text, header=not args.no_header)
        out.flush()
    log.info("predict: %d lines -> %s", n, args.output or "stdout")
    return 0


def cmd_embeddings(args: argparse.Namespace) -> int:
    from twilbert.inference.embeddings import write_embeddings
    from twilbert.io_utils import command_output

    output = command_output(args.output, (args.input,), args.model)
    write_embeddings(args.model, args.input, output, args.collapse_mode, args.use_special_tokens,
                     args.column, args.batch_size, args.chunk_size, args.device)
    return 0


def cmd_export_hf(args: argparse.Namespace) -> int:
    from twilbert.io_utils import command_output
    from twilbert.model.hf import export_hf_dir

    hf_class = export_hf_dir(Path(args.model), command_output(args.out, (), args.model, "--out"), args.encoder_only)
    log.info("export-hf: %s -> %s (%s)", args.model, args.out, hf_class)
    if hf_class.startswith("TWilBert"):  # a head HF has no class for: its code travels in the export
        log.info("export-hf: the head is twilbert's own class in %s/modeling_twilbert.py; load the export with "
                 "trust_remote_code=True (see its TOKENIZER.md)", args.out)
    return 0


def cmd_verify_pairs(args: argparse.Namespace) -> int:
    from twilbert.data.shards import verify_pairs

    checked = verify_pairs(Path(args.pairs), full=not args.quick)
    what = "sizes, sampled checksums and sampled rows" if args.quick else "every byte's sha256, every row and token"
    print(f"{args.pairs}: {checked} shards match their manifests ({what})")
    return 0


def utf8_stdout():
    """stdout, made UTF-8 whatever the locale (tweets are full of emoji)."""
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(encoding="utf-8")
    return sys.stdout


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="twilbert", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("compose", help="compose conf/ (with Hydra overrides) into params.yaml")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=base model.n_encoders=4")
    p.add_argument("--conf", default="conf")
    p.add_argument("--out", help="write here (atomically) instead of stdout")
    p.add_argument("--check", metavar="PARAMS", help="exit 1 if PARAMS differs from the composition")
    p.set_defaults(func=cmd_compose)

    p = sub.add_parser(
        "predict", help="label new tweets with a finetuned model",
        description="Label tweets with a finetuned model directory. Every input line gets exactly one output line "
        "(in input order): a blank line, or one preprocessing empties, is labelled as the placeholder text "
        "(preprocess.empty_text, '[vacío]' by default); long texts are truncated to the model's max_len_test. "
        "Input is UTF-8, split on \\n only; lines that are not valid UTF-8 (undecodable bytes become U+FFFD) "
        "and NUL bytes (a binary file) are reported with their line numbers. An empty input gives an empty "
        "output. Output: id, text, the label "
        "(multi-label: the labels over the threshold joined by '|'; regression: the value) and prob_<class> for "
        "every class, as TSV with a header line or as JSON lines. A k-fold model directory averages its folds' "
        "probabilities.",
    )
    p.add_argument("texts", nargs="*", metavar="TEXT", help="texts to label (or use --input)")
    p.add_argument("--model", required=True,
                   help="finetuned model directory (models/finetuned/<task>, or its baseline/)")
    p.add_argument("--input", metavar="FILE", help="one text per line; - reads stdin")
    p.add_argument("--column", metavar="NAME", help="the input is a TSV with a header; label its NAME column")
    p.add_argument("--id-column", metavar="NAME", help="TSV column echoed as the id (default ID when present, "
                   "else the line number)")
    p.add_argument("--aux-input", metavar="FILE", help="second texts (segment B), one per input line, for models "
                   "trained with an aux_header")
    p.add_argument("--output", metavar="FILE", help="write here instead of stdout: a file is replaced atomically "
                   "(through a symlink, its target), a pipe or device (/dev/stdout) written through; the input "
                   "file or a path in the model directory is refused")
    p.add_argument("--format", choices=("tsv", "jsonl"), default="tsv")
    p.add_argument("--no-text", action="store_true", help="do not echo the text")
    p.add_argument("--no-header", action="store_true", help="TSV without its header line")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--chunk-size", type=positive_int, default=10_000, help="lines read and scored at a time")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--no-blend", action="store_true", help="k-fold model: use the selected fold's model only, "
                   "not the average of every fold's")
    add_no_verify(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("embeddings", help="sentence embeddings of a text file to .npy (TWilBert's get_embeddings)")
    p.add_argument("--model", required=True, help="pretrained or finetuned model directory")
    p.add_argument("--input", required=True, metavar="FILE", help="one text per line (row i of the array = line i)")
    p.add_argument("--output", required=True, metavar="X.npy",
                   help="float32 array (lines, hidden_size); a file is replaced atomically, a pipe written through")
    p.add_argument("--column", metavar="NAME", help="the input is a TSV with a header; embed its NAME column")
    p.add_argument("--collapse-mode", choices=("avg", "cls"), help="default: the finetuned head's, else avg")
    p.add_argument("--use-special-tokens", action=argparse.BooleanOptionalAction, default=None,
                   help="count [CLS]/[SEP] in the avg (default: the finetuned head's, else yes)")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--chunk-size", type=positive_int, default=10_000)
    p.add_argument("--device", default="auto")
    add_no_verify(p)
    p.set_defaults(func=cmd_embeddings)

    p = sub.add_parser("export-hf", help="export a model directory to Hugging Face format (transformers needed)")
    p.add_argument("--model", required=True, help="pretrained or finetuned model directory")
    p.add_argument("--out", required=True, help="new (or empty) output directory")
    p.add_argument("--encoder-only", action="store_true", help="finetuned model: export the encoder without "
                   "its classification head (as *Model); without it, a head Hugging Face has no class for (the "
                   "default avg) is exported as twilbert's own class, loaded with trust_remote_code=True")
    add_no_verify(p)
    p.set_defaults(func=cmd_export_hf)

    p = sub.add_parser("verify-pairs", help="check pair shards against their manifests (every byte)",
                       description="Check the pairs stage's output: each shard's sha256, its .npy header and size "
                       "against manifest.json, every index row (pairs one after the other, inside the shard) and "
                       "every token id (below the vocabulary size), in both splits. Exit 2 with one line naming "
                       "the first damaged shard. Pretraining runs the --quick form at every start.")
    p.add_argument("pairs", nargs="?", default="data/pairs", help="pairs directory (default: data/pairs)")
    p.add_argument("--quick", action="store_true", help="sizes, sampled checksums and sampled rows only")
    p.set_defaults(func=cmd_verify_pairs)
    return parser


def add_no_verify(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-verify", action="store_true",
                   help="load the model even if its files differ from its checksums.json (files edited on purpose)")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv: Optional[list[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if argv is None:  # the `twilbert` command itself (never re-execute a caller's own process)
        from twilbert.numerics import pin_cli

        pin_cli()
    try:
        with ExitStack() as stack:
            if getattr(args, "no_verify", False):
                from twilbert.model.manifest import verification

                stack.enter_context(verification(False))
            return args.func(args)
    except BrokenPipeError:  # `twilbert predict ... | head`: the reader left; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        from twilbert.errors import EXIT_INTERRUPTED, interrupted_line

        print(interrupted_line(f"twilbert {args.command}", "no partial output was left; rerun the command"),
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:
        from twilbert.errors import EXIT_USER_ERROR, user_message

        message = user_message(err)  # expected failures: bad model directory or input, full disk...
        if message is None:
            raise  # a bug: keep the traceback
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
