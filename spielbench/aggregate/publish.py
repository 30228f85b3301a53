"""Publishing: the results folder as a self-contained record of a pipeline run, and its HTML pages.

``runs/<target>/{metrics,eval}.json`` are copies of the run files (absolute paths made relative) and
``runs/index.json`` lists each target's method, names and run config (without paths), so that a reader and
``analysis/figures.ipynb`` need nothing but ``results/`` (:func:`load_results_dir` reads it back). The
markdown tables and claims are also rendered to standalone HTML pages for the Snakemake report.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterable

from spielbench.aggregate.loading import RunRecord, load_benchmarks, make_record
from spielbench.aggregate.tables import task_columns
from spielbench.errors import InputError
from spielbench.fsio import write_json_atomic, write_text_atomic
from spielbench.records import BenchmarkPoint, EvalResult, IndexEntry, ResultsIndex, RunMetrics

#: Keys of a run config that look like local paths (never copied into results/, see runs/index.json).
_PATH_KEYS = {"model", "train_data", "heldout_data"}


def relativize(obj, root: str):
    """Replace absolute paths under ``root`` by relative ones, recursively (no machine paths in results/)."""
    if isinstance(obj, dict):
        return {k: relativize(v, root) for k, v in obj.items()}
    if isinstance(obj, list):
        return [relativize(v, root) for v in obj]
    if isinstance(obj, str) and root and obj.startswith(root):
        return os.path.relpath(obj, root)
    return obj


def _public_config(cfg: dict) -> dict:
    """A run config without its path keys and private (``_``) keys, as plain JSON values."""
    out = {k: v for k, v in cfg.items() if k not in _PATH_KEYS and not k.startswith("_")}
    return json.loads(json.dumps(out, default=str))


def copy_raw(records: list[RunRecord], results_dir: str | Path, root: str | Path | None = None,
             tasks: list[str] | None = None) -> list[Path]:
    """Write ``results/runs/<target>/{metrics,eval}.json`` (raw, paths made relative to ``root``) and
    ``results/runs/index.json`` (model and data names, each target's method and run config without paths).

    Returns the written paths. Stale target folders from an earlier config are removed.
    """
    runs = Path(results_dir) / "runs"
    root = str(Path(root or Path.cwd()).resolve())
    written = []
    index = ResultsIndex(tasks=list(tasks) if tasks else task_columns(records))
    for r in records:
        d = runs / r.target
        entry = IndexEntry(target=r.target, method=r.method, model_name=r.model_name, data_name=r.data_name,
                           config=_public_config(r.config))
        for name, obj in (("metrics.json", r.metrics), ("eval.json", r.evaluation)):
            if obj is not None:
                write_json_atomic(d / name, relativize(obj.to_json(), root), default=str)
                written.append(d / name)
                entry.files.append(name)
        index.targets.append(entry)
    keep = {r.target for r in records}
    if runs.is_dir():
        for child in runs.iterdir():
            if child.is_dir() and child.name not in keep:
                shutil.rmtree(child)
    write_json_atomic(runs / "index.json", index.to_json(), default=str)
    written.append(runs / "index.json")
    return written


def results_tasks(results_dir: str | Path) -> list[str]:
    """The configured evaluation tasks recorded in ``<results_dir>/runs/index.json`` (column order)."""
    return ResultsIndex.read(Path(results_dir) / "runs" / "index.json").tasks


def load_results_dir(results_dir: str | Path) -> tuple[list[RunRecord], list[BenchmarkPoint]]:
    """Read back what :func:`aggregate` wrote: the records (from ``runs/``) and the benchmark points.

    This is what ``analysis/figures.ipynb`` uses: nothing outside ``results_dir`` is read.

    Raises:
        InputError: ``runs/index.json`` is missing (the aggregation has not run) or a listed file is.
    """
    results_dir = Path(results_dir)
    index = ResultsIndex.read(results_dir / "runs" / "index.json")
    records = []
    for e in index.targets:
        d = results_dir / "runs" / e.target
        metrics = RunMetrics.read(d / "metrics.json") if "metrics.json" in e.files else None
        evaluation = EvalResult.read(d / "eval.json") if "eval.json" in e.files else None
        records.append(make_record(e.target, e.config, e.model_name, e.data_name, metrics, evaluation, f"{d}/"))
    return records, load_benchmarks((results_dir / "benchmark").glob("*.json"))


#: Paths of the aggregate outputs relative to the results folder (the Snakemake rules declare these).
TABLE_STEMS = ("main", "quantized", "efficiency")
TABLE_FORMATS = ("md", "csv", "tex")
#: The figures ``spielbench.figures.draw_all`` (and analysis/figures.ipynb) write into results/figures/.
FIGURE_FILES = ("budget_sweep.png", "efficiency_runs.png", "scaling_vs_model_size.png", "loss_curves.png",
                "spiel_dynamics.png")


def output_paths(results_dir: str) -> list[str]:
    """The files :func:`aggregate` always writes (besides the per-target raw copies)."""
    outs = [f"{results_dir}/tables/{s}.{f}" for s in TABLE_STEMS for f in TABLE_FORMATS]
    return outs + [f"{results_dir}/claims.md", f"{results_dir}/runs/index.json"]


_HTML_PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;max-width:80em;margin:1em auto;padding:0 1em;line-height:1.4}}
table{{border-collapse:collapse;margin:1em 0;font-size:90%}}th,td{{border:1px solid #ccc;padding:2px 6px}}
th{{background:#f3f3f3}}code{{background:#f6f6f6}}</style></head>
<body>
{body}
</body></html>
"""


def markdown_html(text: str, title: str) -> str:
    """A standalone HTML page from markdown ``text`` (with tables), for the Snakemake report.

    Uses ``markdown_it`` (markdown-it-py, in the locked environment). Raw HTML in ``text`` is escaped.
    """
    import html

    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(text)
    return _HTML_PAGE.format(title=html.escape(title), body=body)


def write_html_pages(pairs: Iterable[tuple[str | Path, str | Path]]) -> list[Path]:
    """Render each markdown file of ``(markdown, html)`` pairs to its HTML page; returns the pages."""
    out = []
    for src, dst in pairs:
        src, dst = Path(src), Path(dst)
        if not src.is_file():
            raise InputError(f"{src}: file does not exist")
        text = src.read_text(encoding="utf-8")
        first = text.splitlines()[0].lstrip("# ").strip() if text else src.stem
        write_text_atomic(dst, markdown_html(text, first))
        out.append(dst)
    return out


