"""The `twilbert` command: compose params, and tools around trained models."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional

import yaml

from twilbert.config import ConfigError, compose, load_config

log = logging.getLogger("twilbert")

PARAMS_HEADER = (
    "# Generated from conf/ by `make params` (DVC writes the same under `dvc exp run`).\n"
    "# Edit conf/, not this file.\n"
)


def dump_params(raw: dict) -> str:
    return PARAMS_HEADER + yaml.safe_dump(raw, sort_keys=False, allow_unicode=True, width=120)


def cmd_compose(args: argparse.Namespace) -> int:
    raw = compose(args.overrides, args.conf)
    load_config(raw)  # validate before writing anything
    if args.check:
        target = Path(args.check)
        current = yaml.safe_load(target.read_text(encoding="utf-8")) if target.is_file() else None
        if current != raw:
            print(f"{target} differs from the composition of {args.conf}/; run `make params`", file=sys.stderr)
            return 1
        return 0
    text = dump_params(raw)
    if args.out:
        tmp = Path(args.out).with_suffix(".yaml.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(args.out)
    else:
        sys.stdout.write(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="twilbert", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("compose", help="compose conf/ (with Hydra overrides) into params.yaml")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=base model.n_encoders=4")
    p.add_argument("--conf", default="conf")
    p.add_argument("--out", help="write here (atomically) instead of stdout")
    p.add_argument("--check", metavar="PARAMS", help="exit 1 if PARAMS differs from the composition")
    p.set_defaults(func=cmd_compose)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
