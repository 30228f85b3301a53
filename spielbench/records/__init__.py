"""Typed result records: the run metrics (``metrics.json``), the evaluation result (``eval.json``) and one
efficiency-benchmark point (``results/benchmark/<size>__<method>.json``), and the aggregation's
``results/runs/index.json``.

Each record is a dataclass whose fields are the JSON keys its readers use; its JSON schema is generated
from the dataclass (:meth:`Record.json_schema`), so the dataclass is the format's one home. Reading
(:meth:`Record.from_json`) validates the object against that schema with ``jsonschema`` and raises one
:class:`~spielbench.errors.InputError` naming the file and the field; keys a record does not model are
kept in ``extra`` and written back by :meth:`Record.to_json`. The three top-level records carry a
``format`` version; files written before the field existed (metrics and benchmark points) read as
version 1.

Units are in the key names (``_s`` seconds, ``_bytes`` bytes); losses are nats per token.
"""
from spielbench.records.base import Record, read_json
from spielbench.records.benchmark import BenchmarkPoint
from spielbench.records.evaluation import EvalResult, HeldoutResult, TaskResult
from spielbench.records.index import IndexEntry, ResultsIndex
from spielbench.records.run import (DIVERGED, Budget, Divergence, LossPoint, Memory, ReselectionEvent, RunMetrics,
                                    TrainingSettings)

#: The record types by the file they describe (for schema export and tests).
RECORDS: dict[str, type[Record]] = {"metrics.json": RunMetrics, "eval.json": EvalResult,
                                    "benchmark": BenchmarkPoint, "runs/index.json": ResultsIndex,
                                    "adapter/diverged.json": Divergence}

__all__ = ["DIVERGED", "RECORDS", "BenchmarkPoint", "Budget", "Divergence", "EvalResult", "HeldoutResult",
           "IndexEntry", "LossPoint", "Memory", "Record", "ReselectionEvent", "ResultsIndex", "RunMetrics",
           "TaskResult", "TrainingSettings", "read_json"]
