"""Loading: every run's metrics.json and eval.json and every benchmark point, read through the typed records
of :mod:`spielbench.records`, into the views the tables, claims and figures use.

A :class:`RunRecord` is one evaluated target (the base model or a training run) with its run config; a
:class:`Score` is one measured number with its standard error and, when the evaluation kept them, its
per-item values. Benchmark points stay :class:`~spielbench.records.BenchmarkPoint` records.
Units: seconds, bytes, tokens; task scores are fractions in [0, 1], losses nats per token.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from spielbench.aggregate.stats import proportion_stderr_floor, ratio_stderr
from spielbench.errors import InputError
from spielbench.methods import is_quantized
from spielbench.records import BenchmarkPoint, EvalResult, HeldoutResult, RunMetrics, TaskResult, read_json

#: The metric name of the held-out loss next to the task names.
HELDOUT = "heldout_loss"
#: Keys of a run config that do not define the experimental setting (seed groups ignore them).
_NON_SETTING_KEYS = {"run_id", "id", "seed", "model", "train_data", "heldout_data", "device", "save_steps",
                     "resumed_from_step"}


@dataclass
class Score:
    """One measured number with its standard error, and optionally its per-item data.

    Attributes:
        value: the metric (task scores as fractions in [0, 1]; held-out loss in nats per token).
        stderr: standard error of ``value`` (None when the producer gave none and it cannot be computed).
        n: number of items behind ``value`` (None when unknown).
        metric: the metric's name (``acc``, ``exact_match``, ``pass@1``, ``loss`` ...).
        note: why there is no value (a skipped task), else None.
        items: per-item values in a fixed order (task: each item's score; held-out loss: each example's
            summed negative log-likelihood in nats), or None. Two scores with the same ``item_ids`` (or,
            without ids, the same number of items) are compared paired, item by item.
        weights: per-item token counts of the held-out loss (``value = Σ items / Σ weights``), or None.
        item_ids: identifiers of the items (lm-eval doc ids), or None.
    """

    value: float | None
    stderr: float | None = None
    n: int | None = None
    metric: str = ""
    note: str | None = None
    items: list[float] | None = None
    weights: list[float] | None = None
    item_ids: list | None = None


@dataclass
class Reselection:
    """One drop/grow event of a SpIEL run (docs/METHOD.md §3).

    Attributes:
        step: optimizer step at which the reselection happened.
        rate: reselection rate p(t) (fraction of each matrix's indices considered for replacement).
        replaced: number of indices actually replaced (over all matrices).
        active: number of active indices (over all matrices), i.e. the number of tunable entries.
        overlap_initial: fraction of the current index set that was in the initial index set.
    """

    step: int
    rate: float | None
    replaced: int | None
    active: int | None
    overlap_initial: float | None

    @property
    def share_replaced(self) -> float | None:
        """Fraction of all active indices replaced at this reselection (None when unknown)."""
        if self.replaced is None or not self.active:
            return None
        return self.replaced / self.active


@dataclass
class RunRecord:
    """Everything the aggregation uses about one evaluated target.

    ``metrics`` and ``evaluation`` are the records read from the target's files (copied to results/runs/);
    the fields below are taken from them by :func:`make_record`. Units: seconds, bytes, tokens.
    """

    target: str
    method: str
    model_name: str
    data_name: str
    config: dict = field(default_factory=dict)
    metrics: RunMetrics | None = None
    evaluation: EvalResult | None = None
    # from the config / metrics
    rank: int | None = None
    density: float | None = None
    seed: int | None = None
    learning_rate: float | None = None
    gradient_checkpointing: bool = False
    trainable_params: int | None = None
    peak_memory_bytes: int | None = None
    peak_memory_kind: str | None = None
    state_bytes: int | None = None
    loss_curve: list[tuple[int, float]] = field(default_factory=list)
    reselections: list[Reselection] = field(default_factory=list)
    # from the evaluation
    scores: dict[str, Score] = field(default_factory=dict)
    heldout: Score | None = None

    def _recorded(self, name: str):
        return None if self.metrics is None else getattr(self.metrics, name)

    steps = property(lambda self: self._recorded("steps"), doc="Optimizer steps trained (None without metrics).")
    tokens_seen = property(lambda self: self._recorded("tokens_seen"), doc="Training tokens seen.")
    wall_time_s = property(lambda self: self._recorded("wall_time_s"), doc="Wall time of the run [s].")
    step_time_mean_s = property(lambda self: self._recorded("step_time_mean_s"), doc="Mean optimizer-step time [s].")
    step_time_p50_s = property(lambda self: self._recorded("step_time_p50_s"), doc="Median optimizer-step time [s].")
    tokens_per_s = property(lambda self: self._recorded("tokens_per_s"), doc="Training throughput [tokens/s].")
    adapter_bytes = property(lambda self: self._recorded("adapter_bytes"), doc="Size of the saved adapter [bytes].")
    device = property(lambda self: None if self.metrics is None else self.metrics.device_name,
                      doc="The device the run trained on (``cpu``, ``cuda:0``).")

    @property
    def status(self) -> str | None:
        """``"diverged"`` for a run that stopped on a non-finite training loss (metrics.json or eval.json says
        so), else None."""
        for rec in (self.metrics, self.evaluation):
            if rec is not None and rec.status is not None:
                return rec.status
        return None

    @property
    def quantized(self) -> bool:
        """True for the 4-bit (NF4 base) methods."""
        return is_quantized(self.method)

    @property
    def setting(self) -> str:
        """Identifies the experimental setting: the run config minus seed, id and paths.

        Runs that differ only by seed share a setting and are pooled (mean and seed spread).
        """
        if self.target == "base":
            return f"base|{self.model_name}|{self.data_name}"
        source = self.config
        if not source and self.metrics is not None and self.metrics.to_json():  # no run config: what the run recorded
            training = self.metrics.training
            source = {"method": self.method, "rank": self.rank, "density": self.density,
                      **(training.to_json() if training is not None else {})}
        cfg = {k: v for k, v in source.items() if k not in _NON_SETTING_KEYS and not k.startswith("_")}
        return json.dumps({"model_name": self.model_name, "data_name": self.data_name, **cfg},
                          sort_keys=True, default=str)

    def score(self, metric: str) -> Score | None:
        """The score of a task, or the held-out loss for ``metric == "heldout_loss"``."""
        return self.heldout if metric == HELDOUT else self.scores.get(metric)


def task_score(task: TaskResult | None, metric: str = "") -> Score:
    """The :class:`Score` of one task of eval.json.

    NaN counts as missing; a skipped task keeps its note. A stderr of exactly 0 for a score in [0, 1] over
    ``n`` items (lm-eval's value when every item is right or wrong) is replaced by
    :func:`~spielbench.aggregate.stats.proportion_stderr_floor`.
    """
    if task is None:
        return Score(None, note="missing")
    value, stderr, n, note = task.value, task.stderr, task.n, None
    if value is None or math.isnan(value):
        value = None
        note = str(task.note or ("skipped" if task.skipped else "no value"))
    if stderr is not None and math.isnan(stderr):
        stderr = None
    if stderr == 0.0 and value is not None and n and 0.0 <= value <= 1.0:
        stderr = proportion_stderr_floor(value, n)
    return Score(value=value, stderr=stderr, n=n, metric=str(task.metric or metric), note=note,
                 items=task.item_scores, item_ids=task.doc_ids)


def heldout_score(held: HeldoutResult | None) -> Score | None:
    """The held-out loss of eval.json as a :class:`Score` (None when the evaluation had none).

    Its standard error is ``stderr`` when given, else :func:`~spielbench.aggregate.stats.ratio_stderr` of
    the per-example lists ``example_nll`` (summed nats) and ``example_tokens``, else None.
    """
    if held is None:
        return None
    items = held.example_nll
    weights = None if held.example_tokens is None else [float(t) for t in held.example_tokens]
    stderr = held.stderr
    if stderr is None and items is not None:
        stderr = ratio_stderr(items, weights)
    loss = held.loss
    return Score(value=None if loss is None or math.isnan(loss) else loss, stderr=stderr, n=held.n_examples,
                 metric="loss", note=None if loss is not None else "no held-out loss", items=items, weights=weights)


def parse_score(raw: dict | None, where: str, metric: str = "") -> Score:
    """:func:`task_score` of a task entry given as a JSON object (validated as :class:`TaskResult`).

    Raises:
        InputError: a field has the wrong type (``where`` names the file and key).
    """
    return task_score(None if raw is None else TaskResult.from_json(raw, where), metric)


def parse_heldout(raw: dict | None, where: str) -> Score | None:
    """:func:`heldout_score` of a ``heldout`` entry given as a JSON object (validated as :class:`HeldoutResult`).

    Raises:
        InputError: a field has the wrong type, or only one per-example list is given / their lengths differ.
    """
    return heldout_score(None if raw is None else HeldoutResult.from_json(raw, where))


def _fill_metrics(rec: RunRecord, m: RunMetrics) -> None:
    """The training fields of ``rec`` from its metrics record; values the run config already gives are kept."""
    rec.metrics = m
    rec.method = rec.method or str(m.method or "")
    budget, training, memory = m.budget, m.training, m.memory
    if rec.rank is None and budget is not None:
        rec.rank = budget.rank
    if rec.density is None and budget is not None:
        rec.density = budget.requested_density
    if rec.seed is None and training is not None:
        rec.seed = training.seed
    if rec.learning_rate is None and training is not None:
        rec.learning_rate = training.learning_rate
    if "gradient_checkpointing" not in rec.config:
        rec.gradient_checkpointing = bool(training is not None and training.gradient_checkpointing)
    rec.trainable_params = None if budget is None else budget.trainable_params
    cuda_peak = None if memory is None else memory.cuda_max_allocated_bytes
    rss_peak = None if memory is None else memory.peak_rss_bytes
    if cuda_peak is not None:
        rec.peak_memory_bytes, rec.peak_memory_kind = cuda_peak, "CUDA max allocated"
    elif rss_peak is not None:
        rec.peak_memory_bytes, rec.peak_memory_kind = rss_peak, "CPU peak RSS"
    rec.state_bytes = None if memory is None else memory.trainable_state_bytes
    rec.loss_curve = [(p.step, p.loss) for p in m.loss_curve or []]
    rec.reselections = [Reselection(step=e.step, rate=e.rate, replaced=e.num_replaced, active=e.num_active,
                                    overlap_initial=e.overlap_initial) for e in m.selector_history or []]
    if rec.heldout is None and m.heldout_loss is not None:  # no eval.json: the trainer's own measurement
        rec.heldout = Score(None if math.isnan(m.heldout_loss) else m.heldout_loss, metric="loss")


def make_record(target: str, config: dict | None, model_name: str, data_name: str,
                metrics: RunMetrics | dict | None, evaluation: EvalResult | dict | None, where: str = "") -> RunRecord:
    """Build a :class:`RunRecord` for ``target`` from its run config and its metrics and evaluation records.

    Args:
        target: ``"base"`` or the run id.
        config: the resolved run config (``spielbench.pipeline.Pipeline.runs[target]``), {} for base.
        model_name, data_name: table labels of the model and the training data.
        metrics, evaluation: the records of metrics.json / eval.json, or their JSON objects (validated
            here), or None.
        where: a prefix naming the source folder in error messages.

    Raises:
        InputError: a JSON object does not match its record's schema, or the run has no method.
    """
    config = dict(config or {})
    if isinstance(metrics, dict):
        metrics = RunMetrics.from_json(metrics, f"{where}metrics.json")
    if isinstance(evaluation, dict):
        evaluation = EvalResult.from_json(evaluation, f"{where}eval.json")
    method = "base" if target == "base" else str(config.get("method") or (metrics and metrics.method) or "")
    rec = RunRecord(target=target, method=method, model_name=model_name, data_name=data_name, config=config,
                    rank=config.get("rank"), density=config.get("density"), seed=config.get("seed"),
                    learning_rate=config.get("learning_rate"),
                    gradient_checkpointing=bool(config.get("gradient_checkpointing", False)))
    if evaluation is not None:
        rec.evaluation = evaluation
        rec.scores = {name: task_score(t) for name, t in evaluation.tasks.items()}
        rec.heldout = heldout_score(evaluation.heldout)
    if metrics is not None:
        _fill_metrics(rec, metrics)
    if not rec.method:
        raise InputError(f"{where}: run {target!r} has no method in its config nor in metrics.json")
    if target == "base":
        rec.trainable_params = 0
    return rec


def load_records(runs_dir: str | Path, runs: dict[str, dict], model_name: str, data_name: str,
                 require_eval: bool = True) -> list[RunRecord]:
    """Read ``<runs_dir>/base/eval.json`` and every run's metrics.json and eval.json.

    Args:
        runs_dir: the pipeline's runs folder.
        runs: run id -> resolved run config (in config order).
        model_name, data_name: labels for the table groups.
        require_eval: when False, a missing eval.json leaves the run without scores (figures of training
            only); when True it is an error.

    Returns:
        The base record first, then one record per run, in config order.

    Raises:
        InputError: a required file is missing or malformed (the message names it); every missing file is
            listed before any is read.
    """
    runs_dir = Path(runs_dir)
    needed = [runs_dir / "base" / "eval.json"] if require_eval else []
    for rid in runs:
        needed.append(runs_dir / rid / "metrics.json")
        if require_eval:
            needed.append(runs_dir / rid / "eval.json")
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        more = f" (and {len(missing) - 8} more)" if len(missing) > 8 else ""
        raise InputError(f"missing run outputs: {', '.join(missing[:8])}{more}: file does not exist; "
                         "run the train/evaluate rules first")
    records = []
    base_eval = runs_dir / "base" / "eval.json"
    if base_eval.exists() or require_eval:
        records.append(make_record("base", {}, model_name, data_name, None, EvalResult.read(base_eval),
                                   f"{runs_dir / 'base'}/"))
    for rid, cfg in runs.items():
        ev = runs_dir / rid / "eval.json"
        evaluation = EvalResult.read(ev) if (require_eval or ev.exists()) else None
        records.append(make_record(rid, cfg, model_name, data_name, RunMetrics.read(runs_dir / rid / "metrics.json"),
                                   evaluation, f"{runs_dir / rid}/"))
    return records


def parse_benchmark(d: dict, name: str) -> BenchmarkPoint:
    """One benchmark JSON object as a :class:`~spielbench.records.BenchmarkPoint` (``source`` = ``name``).

    Raises:
        InputError: ``size``/``method``/``status`` missing, or a field of the wrong type (names ``name``).
    """
    return BenchmarkPoint.from_json(d, name)


def load_benchmarks(paths: Iterable[str | Path]) -> list[BenchmarkPoint]:
    """Read benchmark result files ``<size>__<method>.json`` (sorted by file name; ``source`` = the file name).

    Raises:
        InputError: a file is missing, not JSON, or malformed (the message names it).
    """
    from spielbench.benchmark.table import load_records

    return load_records(sorted(Path(x) for x in paths))
