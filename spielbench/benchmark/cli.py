"""``python -m spielbench.benchmark``: ``run`` (every pair, then the tables), ``one`` (one pair, for the
pipeline), ``table`` (tables from JSONs), ``profile`` (a ``torch.profiler`` summary of one pair),
``sizes`` (list the sizes), and the internal ``worker``."""
from __future__ import annotations

import argparse
import json
from dataclasses import fields, replace
from pathlib import Path
from typing import Optional

from spielbench.benchmark.options import BenchmarkOptions
from spielbench.benchmark.runner import run_one, run_sweep, summary_line
from spielbench.benchmark.sizes import SIZES
from spielbench.benchmark.table import load_records, write_tables
from spielbench.records import BenchmarkPoint
from spielbench.benchmark.worker import run_worker
from spielbench.errors import exit_status


def _options_from_args(args: argparse.Namespace) -> BenchmarkOptions:
    data = {f.name: getattr(args, f.name) for f in fields(BenchmarkOptions) if getattr(args, f.name, None) is not None}
    if getattr(args, "no_predict_oom", False):
        data["predict_oom"] = False
    return BenchmarkOptions.from_dict(data)


def _add_options(p: argparse.ArgumentParser) -> None:
    d = BenchmarkOptions()
    p.add_argument("--rank", type=int, help=f"LoRA rank / equal SpIEL budget (default {d.rank})")
    p.add_argument("--batch-size", dest="batch_size", type=int, help=f"sequences per step (default {d.batch_size})")
    p.add_argument("--seq-len", dest="seq_len", type=int, help=f"tokens per sequence (default {d.seq_len})")
    p.add_argument("--warmup-steps", dest="warmup_steps", type=int, help=f"untimed steps (default {d.warmup_steps})")
    p.add_argument("--steps", type=int, help=f"timed steps (default {d.steps}; raised to cover every step kind: "
                                             "SpIEL-AG 6 when γ >= 3, MA 3)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="compute dtype (default float32)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--threads", type=int, help="torch CPU threads per worker (default: torch's)")
    p.add_argument("--reselection-steps", dest="reselection_steps", type=int, help="natural S (default 20)")
    p.add_argument("--selection-accumulation-steps", dest="selection_accumulation_steps", type=int,
                   help="natural γ (default 5)")
    p.add_argument("--initial-reselection-rate", dest="initial_reselection_rate", type=float, help="ζ (default 0.2)")
    p.add_argument("--seed", type=int)
    p.add_argument("--timeout-s", dest="timeout_s", type=float, help="per-worker limit [s] (default 3600)")
    p.add_argument("--memory-limit-bytes", dest="memory_limit_bytes", type=int,
                   help="treat this as the available memory and cap each worker to it")
    p.add_argument("--no-predict-oom", dest="no_predict_oom", action="store_true",
                   help="always try, even when the estimate exceeds the available memory")
    p.add_argument("--model-dir", dest="model_dir", help="benchmark a real model folder (size is then a label)")
    p.add_argument("--gradient-checkpointing", dest="gradient_checkpointing", action="store_true", default=None,
                   help="recompute activations in the backward (non-reentrant checkpointing)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m spielbench.benchmark", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="every (size, method) pair, one fresh process each, then the tables")
    p.add_argument("--sizes", nargs="+", required=True)
    p.add_argument("--methods", nargs="+", required=True)
    p.add_argument("--out-dir", default="results/benchmark", help="per-pair JSONs (default results/benchmark)")
    p.add_argument("--table", default="results/tables/efficiency_benchmark",
                   help="table path without suffix (.md and .csv are written); 'none' to skip")
    p.add_argument("--log", help="append worker output to this file")
    _add_options(p)
    p = sub.add_parser("one", help="one (size, method) pair in a fresh process")
    p.add_argument("--size", required=True)
    p.add_argument("--method", required=True)
    p.add_argument("--output", required=True, help="the JSON to write")
    p.add_argument("--log")
    _add_options(p)
    p = sub.add_parser("table", help="write the tables from benchmark JSONs")
    p.add_argument("inputs", nargs="+")
    p.add_argument("--md", required=True)
    p.add_argument("--csv", required=True)
    p = sub.add_parser("profile", help="torch.profiler summary of one pair's timed steps (fresh process)")
    p.add_argument("--size", required=True)
    p.add_argument("--method", required=True)
    p.add_argument("--output", required=True, help="profile summary text file")
    p.add_argument("--json", help="also keep the (profiled, so inflated) record here")
    _add_options(p)
    sub.add_parser("sizes", help="list the sizes and their parameter counts")
    p = sub.add_parser("worker", help=argparse.SUPPRESS)
    p.add_argument("--size", required=True)
    p.add_argument("--method", required=True)
    p.add_argument("--options", required=True)
    p.add_argument("--result", required=True)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    """Command-line entry point; returns the exit status (2 on bad input, before any work)."""
    args = _parser().parse_args(argv)
    return exit_status(lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    """The body of :func:`main` for parsed ``args``; returns the exit status (InputError propagates)."""
    if args.command == "worker":
        options = BenchmarkOptions.from_dict(json.loads(args.options))
        record = run_worker(args.size, args.method, options)
        BenchmarkPoint.write_checked(record, args.result)
        return 0
    if args.command == "sizes":
        for s in SIZES.values():
            print(f"{s.name:>14}  {s.num_parameters():>15,d} params  LoRA r16 {s.lora_parameters(16):>12,d}  "
                  f"{s.description}")
        return 0
    if args.command == "table":
        records = load_records(args.inputs)
        write_tables(records, args.md, args.csv)
        print(Path(args.md).read_text())
        return 0
    options = _options_from_args(args)
    if args.command == "run":
        table = None if args.table == "none" else args.table
        run_sweep(args.sizes, args.methods, options, args.out_dir, table, log=args.log)
        if table is not None:
            print(Path(f"{table}.md").read_text())
        return 0
    if args.command == "one":
        record = run_one(args.size, args.method, options, args.output, log=args.log)
        print(summary_line(record))
        return 0 if record["status"] in ("ok", "oom", "unsupported") else 1
    if args.command == "profile":
        options = replace(options, profile_out=str(Path(args.output).resolve()))
        out_json = args.json or str(Path(args.output).with_suffix(".json"))
        record = run_one(args.size, args.method, options, out_json)
        print(summary_line(record))
        if record["status"] == "ok":
            print(Path(args.output).read_text())
        return 0 if record["status"] == "ok" else 1
    return 0
