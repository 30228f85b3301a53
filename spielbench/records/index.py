"""``results/runs/index.json``: what the aggregation copied into a results folder, so that the folder alone
(``spielbench.aggregate.load_results_dir``, ``analysis/figures.ipynb``) rebuilds every run record.

Written and read only by the aggregation, so it carries no ``format`` version of its own.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from spielbench.records.base import Record


@dataclass(kw_only=True)
class IndexEntry(Record):
    """One evaluated target: its method, table names, run config without paths, and the files copied."""

    target: str
    method: str | None = None
    model_name: str
    data_name: str
    config: dict = field(default_factory=dict)
    files: list[str] = field(default_factory=list)


@dataclass(kw_only=True)
class ResultsIndex(Record):
    """The configured evaluation tasks (table column order) and every target of a results folder."""

    tasks: list[str] = field(default_factory=list)
    targets: list[IndexEntry] = field(default_factory=list)
