"""The aggregation stage and its command line: read every run's files, write the tables, claims and raw
copies into the results folder; or combine several results folders into one set of tables and claims.

Command line::

    python -m spielbench.aggregate --config config/config.yaml            # after a pipeline run
    python -m spielbench.aggregate --from-results results/a results/b --out results/combined
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Iterable

from spielbench.aggregate.claims import claims_markdown, evaluate_claims
from spielbench.aggregate.loading import RunRecord, load_benchmarks, load_records
from spielbench.aggregate.publish import copy_raw, load_results_dir, relativize
from spielbench.aggregate.tables import efficiency_table, main_table, quantized_table, write_table
from spielbench.errors import InputError, exit_status
from spielbench.fsio import write_json_atomic, write_text_atomic
from spielbench.records import BenchmarkPoint

log = logging.getLogger("spielbench.aggregate")


def write_results(records: list[RunRecord], benchmarks: list[BenchmarkPoint], results_dir: str | Path,
                  tasks: list[str] | None = None, context: str = "",
                  margins: dict[str, float] | None = None) -> list[Path]:
    """Write the three tables and claims.md for ``records`` into ``results_dir``; returns the paths.

    ``margins``: the non-inferiority margins (config ``claims.margins``; None: the defaults).
    """
    results_dir = Path(results_dir)
    written = []
    written += write_table(main_table(records, tasks), results_dir / "tables" / "main")
    written += write_table(quantized_table(records, tasks), results_dir / "tables" / "quantized")
    written += write_table(efficiency_table(records, benchmarks), results_dir / "tables" / "efficiency")
    path = results_dir / "claims.md"
    write_text_atomic(path, claims_markdown(evaluate_claims(records, benchmarks, margins, tasks), context, margins))
    written.append(path)
    return written


def aggregate(runs_dir: str | Path, runs: dict[str, dict], results_dir: str | Path, model_name: str,
              data_name: str, tasks: list[str] | None = None, benchmark_files: Iterable[str | Path] = (),
              root: str | Path | None = None, margins: dict[str, float] | None = None) -> list[Path]:
    """The whole aggregation stage: read every run's files, write tables, claims and raw copies.

    Args:
        runs_dir: the pipeline's runs folder (``<runs_dir>/<target>/{metrics,eval}.json``).
        runs: run id -> resolved run config, in config order (``Pipeline.runs``).
        results_dir: where the outputs go (``results/``).
        model_name, data_name: labels of the model and of the training data (config ``model.name`` /
            ``data.name``).
        tasks: the configured evaluation tasks (column order); None = every task found.
        benchmark_files: benchmark JSONs to include (``<size>__<method>.json``); files already in
            ``<results_dir>/benchmark/`` are included as well, and the others are copied there.
        root: folder against which absolute paths in the raw copies are made relative (default: cwd).
        margins: the non-inferiority margins of the claims (config ``claims.margins``; None: defaults).

    Returns:
        Every written path.

    Raises:
        InputError: an input file is missing or malformed; raised before anything is written.
    """
    records = load_records(runs_dir, runs, model_name, data_name)
    bench_paths = {Path(p).resolve(): Path(p) for p in benchmark_files}
    bench_dir = Path(results_dir) / "benchmark"
    if bench_dir.is_dir():
        for p in bench_dir.glob("*.json"):
            bench_paths.setdefault(p.resolve(), p)
    benchmarks = load_benchmarks(bench_paths.values())
    ctx = (f"Model: {model_name}; training data: {data_name}; {len(records) - 1} training runs "
           f"+ the base model; {len(benchmarks)} benchmark points.")
    written = copy_raw(records, results_dir, root, tasks)
    bench_dir.mkdir(parents=True, exist_ok=True)
    for src in bench_paths.values():
        dst = bench_dir / src.name
        if src.resolve() != dst.resolve():  # so that results/ alone (and the notebook) holds every input
            point = BenchmarkPoint.read(src).to_json()
            write_json_atomic(dst, relativize(point, str(Path(root or Path.cwd()).resolve())), default=str)
            written.append(dst)
    written += write_results(records, benchmarks, results_dir, tasks, ctx, margins)
    log.info("aggregate: wrote %d files under %s", len(written), results_dir)
    return written


def _config_from_file(path: str) -> dict:
    """The pipeline config YAML at ``path``. Raises InputError when missing, not YAML, or not a mapping."""
    import yaml

    if not Path(path).is_file():
        raise InputError(f"--config: file {path} does not exist")
    with open(path, encoding="utf-8") as fh:
        try:
            cfg = yaml.safe_load(fh) or {}
        except yaml.YAMLError as err:
            raise InputError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(cfg, dict):
        raise InputError(f"{path}: expected a YAML mapping")
    return cfg


def main(argv: list[str] | None = None) -> int:
    """Command line (see the module docstring). Exit status 0 ok, 2 bad input (the message names the file)."""
    import spielbench.aggregate as package

    ap = argparse.ArgumentParser(prog="python -m spielbench.aggregate", description=package.__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="pipeline config YAML; aggregates its runs_dir into its results_dir")
    src.add_argument("--from-results", nargs="+", metavar="RESULTS_DIR",
                     help="combine the records of several results folders (e.g. one per model × data)")
    ap.add_argument("--out", help="output folder (required with --from-results)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return exit_status(lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    """The body of :func:`main` for parsed ``args`` (an InputError propagates to :func:`exit_status`)."""
    if args.config:
        from spielbench.pipeline import PipelineConfigError, resolve_pipeline

        cfg = _config_from_file(args.config)
        try:
            pipe = resolve_pipeline(cfg)
        except PipelineConfigError as err:
            raise InputError(f"{args.config}: {err}") from None
        aggregate(pipe.runs_dir, pipe.runs, args.out or pipe.results_dir,
                  cfg.get("model", {}).get("name", "model"), cfg.get("data", {}).get("name", "data"),
                  cfg.get("evaluation", {}).get("tasks"),
                  margins=(cfg.get("claims") or {}).get("margins"))
    else:
        if not args.out:
            raise InputError("--out: required with --from-results")
        records, benchmarks, seen = [], [], {}
        for d in args.from_results:
            r, b = load_results_dir(d)
            for rec in r:
                key = (rec.model_name, rec.data_name, rec.target)
                if key in seen:
                    raise InputError(f"{d}: run {rec.target!r} of {rec.model_name} / {rec.data_name} is also in "
                                     f"{seen[key]}; combine results of different model/data pairs")
                seen[key] = d
            records += r
            benchmarks += b
        write_results(records, benchmarks, args.out,
                      context=f"Combined from {len(args.from_results)} results folders.")
    return 0
