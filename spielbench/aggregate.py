"""Aggregation: the per-run JSON files of a pipeline run -> tables, claims with verdicts, raw copies.

Inputs (docs/DESIGN.md): ``<runs_dir>/<run_id>/metrics.json`` (one per training run, written by
``spielbench.train`` with ``spielbench.measure``), ``<runs_dir>/<target>/eval.json`` (one per evaluated
model, ``target`` = ``base`` or a run id, written by ``spielbench.evaluate``), optionally
``results/benchmark/<size>__<method>.json`` (the efficiency benchmark, ``spielbench.benchmark``), and the
resolved run table of the config (``spielbench.pipeline``).

Outputs (under ``results_dir``):

- ``tables/main.{md,csv,tex}``: rows = base model and one row per run, columns = tasks (+ held-out loss),
  grouped by model and training data, value ± stderr, trainable parameters.
- ``tables/quantized.{md,csv,tex}``: 4-bit runs next to their fp32 counterparts at the same rank.
- ``tables/efficiency.{md,csv,tex}``: step time, tokens/s, peak memory and optimizer-state bytes per
  run and per benchmark (model size, method), with ratios to LoRA at the same rank and to the floor.
- ``claims.md``: each qualitative claim of the paper with the measured numbers, an interval and a
  verdict computed by the rules in :data:`VERDICT_RULES` (also printed in the file).
- ``runs/index.json`` and ``runs/<target>/{metrics,eval}.json``: copies of the raw per-run files, so
  that a reader (and ``analysis/figures.ipynb``) needs nothing but ``results/``.

All numbers come from the input files; no paper number appears anywhere (SPIEL_SPEC.md §9: the paper's
tables are not available; the claims are its qualitative statements). Verdict rules: :data:`VERDICT_RULES`.

Command line::

    python -m spielbench.aggregate --config config/config.yaml            # after a pipeline run
    python -m spielbench.aggregate --from-results results/a results/b --out results/combined
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from spielbench.errors import InputError
from spielbench.fsio import write_text_atomic

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------------

#: Display names, in the row order of the paper's main table; then the ablations, then the 4-bit runs.
METHOD_LABELS = {
    "base": "Base model",
    "lora": "LoRA",
    "ia3": "(IA)3",
    "spiel-ag": "SpIEL-AG",
    "spiel-ma": "SpIEL-MA",
    "full": "Full FT",
    "spiel-static": "SpIEL static mask (ablation)",
    "shira": "SHiRA (ablation)",
    "qlora": "qLoRA",
    "qspiel-ag": "qSpIEL-AG",
    "qspiel-ma": "qSpIEL-MA",
    "floor": "Floor (frozen weights)",
    "spiel-reference": "SpIEL (reference-style layer)",
}
METHOD_ORDER = {m: i for i, m in enumerate(METHOD_LABELS)}

#: 4-bit method -> its fp32 counterpart (quantized table, 4-bit claim).
QUANTIZED_COUNTERPART = {"qlora": "lora", "qspiel-ag": "spiel-ag", "qspiel-ma": "spiel-ma"}

#: Efficiency ratios are taken to this method at the same rank (4-bit methods: to qLoRA).
LORA_REFERENCE = {m: ("qlora" if m.startswith("q") else "lora") for m in METHOD_LABELS}

#: Short task names for column headers.
TASK_LABELS = {
    "mmlu": "MMLU", "mmlu_0shot": "MMLU 0-shot", "gsm8k": "GSM8K", "bbh": "BBH", "tydiqa": "TyDiQA",
    "humaneval": "HumanEval", "arc_easy": "ARC-E", "arc_challenge": "ARC-C", "hellaswag": "HellaSwag",
    "boolq": "BoolQ", "piqa": "PIQA", "winogrande": "WinoGrande",
}

HELDOUT = "heldout_loss"

#: Keys of a run config that do not define the experimental setting (seed groups ignore them).
_NON_SETTING_KEYS = {"run_id", "id", "seed", "model", "train_data", "heldout_data", "device", "save_steps",
                     "resumed_from_step"}
#: Keys of a run config that look like local paths (never copied into results/, see runs/index.json).
_PATH_KEYS = {"model", "train_data", "heldout_data"}

Z95 = statistics.NormalDist().inv_cdf(0.975)


def method_label(method: str) -> str:
    """Display name of a method (the registry name itself when unknown)."""
    return METHOD_LABELS.get(method, method)


def task_label(task: str) -> str:
    """Display name of an evaluation task."""
    return TASK_LABELS.get(task, task)


# ---------------------------------------------------------------------------------------------------
# Records: one per evaluated target (base model or run), parsed from the raw JSON files
# ---------------------------------------------------------------------------------------------------


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


def ratio_stderr(items: list[float], weights: list[float]) -> float | None:
    """Standard error of the ratio mean ``Σ items / Σ weights`` over independent examples (delta method).

    Used for the token-mean held-out loss, where ``items`` are per-example summed losses [nats] and
    ``weights`` their token counts: ``sqrt(n/(n-1) · Σ (y_i − L·t_i)²) / Σ t_i``. None for fewer than 2
    examples or no tokens.
    """
    n, total = len(items), float(sum(weights))
    if n < 2 or total <= 0:
        return None
    mean = sum(items) / total
    ss = sum((y - mean * t) ** 2 for y, t in zip(items, weights))
    return math.sqrt(n / (n - 1) * ss) / total


def paired_stderr(a: Score, b: Score) -> float | None:
    """Standard error of ``a.value − b.value`` when both were measured on the same items, else None.

    Same items: equal ``item_ids`` (or equal counts when neither has ids) and, for ratio means, equal
    ``weights``. Plain means: ``sd(a_i − b_i) / sqrt(n)``; ratio means (held-out loss):
    :func:`ratio_stderr` of the per-example differences.
    """
    if not a.items or not b.items or len(a.items) != len(b.items) or len(a.items) < 2:
        return None
    if (a.item_ids or b.item_ids) and a.item_ids != b.item_ids:
        return None
    diffs = [x - y for x, y in zip(a.items, b.items)]
    if a.weights is not None or b.weights is not None:
        if a.weights != b.weights:
            return None
        return ratio_stderr(diffs, a.weights)
    return statistics.stdev(diffs) / math.sqrt(len(diffs))


@dataclass
class Reselection:
    """One drop/grow event of a SpIEL run (SPIEL_SPEC.md §3).

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

    ``metrics`` and ``evaluation`` keep the raw JSON (copied to results/runs/); the typed fields are
    parsed from them by :func:`parse_metrics` / :func:`parse_eval`. Units: seconds, bytes, tokens.
    """

    target: str
    method: str
    model_name: str
    data_name: str
    config: dict = field(default_factory=dict)
    metrics: dict | None = None
    evaluation: dict | None = None
    # from the config / metrics
    rank: int | None = None
    density: float | None = None
    seed: int | None = None
    learning_rate: float | None = None
    gradient_checkpointing: bool = False
    trainable_params: int | None = None
    steps: int | None = None
    tokens_seen: int | None = None
    wall_time_s: float | None = None
    step_time_mean_s: float | None = None
    step_time_p50_s: float | None = None
    tokens_per_s: float | None = None
    device: str | None = None
    peak_memory_bytes: int | None = None
    peak_memory_kind: str | None = None
    state_bytes: int | None = None
    adapter_bytes: int | None = None
    loss_curve: list[tuple[int, float]] = field(default_factory=list)
    reselections: list[Reselection] = field(default_factory=list)
    # from the evaluation
    scores: dict[str, Score] = field(default_factory=dict)
    heldout: Score | None = None

    @property
    def quantized(self) -> bool:
        """True for the 4-bit (NF4 base) methods."""
        return self.method in QUANTIZED_COUNTERPART

    @property
    def setting(self) -> str:
        """Identifies the experimental setting: the run config minus seed, id and paths.

        Runs that differ only by seed share a setting and are pooled (mean and seed spread).
        """
        if self.target == "base":
            return f"base|{self.model_name}|{self.data_name}"
        source = self.config
        if not source and self.metrics:  # no run config (e.g. a lone metrics.json): what the run recorded
            source = {"method": self.method, "rank": self.rank, "density": self.density,
                      **(self.metrics.get("training") or {})}
        cfg = {k: v for k, v in source.items() if k not in _NON_SETTING_KEYS and not k.startswith("_")}
        return json.dumps({"model_name": self.model_name, "data_name": self.data_name, **cfg},
                          sort_keys=True, default=str)

    def score(self, metric: str) -> Score | None:
        """The score of a task, or the held-out loss for ``metric == "heldout_loss"``."""
        return self.heldout if metric == HELDOUT else self.scores.get(metric)


def read_json(path: str | Path) -> dict:
    """Read a JSON object from ``path``.

    Raises:
        InputError: the file is missing, is not valid JSON, or does not hold an object.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: file does not exist")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise InputError(f"{p}: not valid JSON (line {err.lineno}: {err.msg})") from None
    if not isinstance(data, dict):
        raise InputError(f"{p}: expected a JSON object, got {type(data).__name__}")
    return data


def _dig(d: dict | None, path: str, default=None):
    """``d["a"]["b"]`` for ``path == "a.b"``; ``default`` when any level is missing or None."""
    cur: Any = d
    for part in path.split("."):
        if not isinstance(cur, dict) or cur.get(part) is None:
            return default
        cur = cur[part]
    return cur


def _num(value, where: str, kind=float):
    """``value`` as ``kind`` (None stays None). Raises InputError naming ``where`` when not a number."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{where}: expected a number, got {value!r}")
    if kind is int:
        return int(value)
    return float(value)


def _num_list(value, where: str) -> list[float] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                               for x in value):
        raise InputError(f"{where}: expected a list of numbers")
    return [float(x) for x in value]


def proportion_stderr_floor(value: float, n: int) -> float:
    """Standard error of a proportion measured as exactly 0 or 1 on ``n`` items (binomial, p clipped).

    lm-eval reports ``sqrt(p(1-p)/n) = 0`` when every item is right (or wrong), which would make any
    difference look certain; here p is clipped to ``[0.5/n, 1 − 0.5/n]`` first.
    """
    p = min(max(value, 0.5 / n), 1.0 - 0.5 / n)
    return math.sqrt(p * (1.0 - p) / n)


def parse_score(raw, where: str, metric: str = "") -> Score:
    """A :class:`Score` from a number or a task entry of eval.json.

    A task entry is ``{"metric", "value", "stderr", "n", ...}`` or ``{"skipped": true, "note": str}``
    (``spielbench.evaluate``); optional ``item_scores`` (per-item values) and ``doc_ids`` enable paired
    comparisons. NaN counts as missing. A stderr of exactly 0 for a score in [0, 1] over ``n`` items is
    replaced by :func:`proportion_stderr_floor`.

    Raises:
        InputError: ``raw`` is neither a number nor an object, or a field has the wrong type (``where``
            names the file and key).
    """
    if raw is None:
        return Score(None, note="missing")
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        return Score(None if math.isnan(raw) else float(raw), metric=metric)
    if not isinstance(raw, dict):
        raise InputError(f"{where}: expected a number or an object with 'value', got {raw!r}")
    value = _num(raw.get("value"), f"{where}.value")
    stderr = _num(raw.get("stderr"), f"{where}.stderr")
    n = _num(raw.get("n"), f"{where}.n", int)
    note = None
    if value is None or math.isnan(value):
        value = None
        note = str(raw.get("note") or ("skipped" if raw.get("skipped") else "no value"))
    if stderr is not None and math.isnan(stderr):
        stderr = None
    if stderr == 0.0 and value is not None and n and 0.0 <= value <= 1.0:
        stderr = proportion_stderr_floor(value, n)
    return Score(
        value=value,
        stderr=stderr,
        n=n,
        metric=str(raw.get("metric") or metric),
        note=note,
        items=_num_list(raw.get("item_scores"), f"{where}.item_scores"),
        item_ids=raw.get("doc_ids"),
    )


def parse_heldout(raw, where: str) -> Score | None:
    """The held-out loss of eval.json: ``{"loss", "n_examples", "n_tokens", ...}`` (``spielbench.evaluate``).

    Its standard error is ``stderr`` when given, else computed with :func:`ratio_stderr` from the optional
    per-example lists ``example_nll`` (summed nats per example) and ``example_tokens``; else None.

    Raises:
        InputError: a field has the wrong type, or the per-example lists differ in length.
    """
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise InputError(f"{where}: expected an object with 'loss', got {raw!r}")
    loss = _num(raw.get("loss"), f"{where}.loss")
    items = _num_list(raw.get("example_nll"), f"{where}.example_nll")
    weights = _num_list(raw.get("example_tokens"), f"{where}.example_tokens")
    if (items is None) != (weights is None) or (items is not None and len(items) != len(weights)):
        raise InputError(f"{where}: example_nll and example_tokens must both be given, with equal lengths")
    stderr = _num(raw.get("stderr"), f"{where}.stderr")
    if stderr is None and items is not None:
        stderr = ratio_stderr(items, weights)
    return Score(value=None if loss is None or math.isnan(loss) else loss, stderr=stderr,
                 n=_num(raw.get("n_examples"), f"{where}.n_examples", int), metric="loss",
                 note=None if loss is not None else "no held-out loss", items=items, weights=weights)


def parse_metrics(rec: RunRecord, metrics: dict, where: str) -> None:
    """Fill the training fields of ``rec`` from a metrics.json object (written by ``spielbench.train``).

    Fields read (units in the names): ``method``, ``budget.{rank,requested_density,trainable_params}``,
    ``training.{seed,learning_rate,gradient_checkpointing}``, ``steps``, ``tokens_seen``, ``wall_time_s``,
    ``step_time_mean_s``, ``step_time_p50_s``, ``tokens_per_s``, ``memory.{cuda_max_allocated_bytes,
    peak_rss_bytes,trainable_state_bytes}``, ``adapter_bytes``, ``loss_curve`` ([{step, loss}]),
    ``heldout_loss``, ``device.device`` and ``selector_history`` ([{step, rate, num_replaced, num_active,
    overlap_initial}], SpIEL only). Values the run config already gives (rank, seed, ...) are kept.

    Raises:
        InputError: a field holds a value of the wrong type (``where`` names the file and the field).
    """
    m = metrics
    rec.metrics = m
    rec.method = rec.method or str(m.get("method") or "")
    if rec.rank is None:
        rec.rank = _num(_dig(m, "budget.rank"), f"{where}: budget.rank", int)
    if rec.density is None:
        rec.density = _num(_dig(m, "budget.requested_density"), f"{where}: budget.requested_density")
    if rec.seed is None:
        rec.seed = _num(_dig(m, "training.seed"), f"{where}: training.seed", int)
    if rec.learning_rate is None:
        rec.learning_rate = _num(_dig(m, "training.learning_rate"), f"{where}: training.learning_rate")
    if "gradient_checkpointing" not in rec.config:
        rec.gradient_checkpointing = bool(_dig(m, "training.gradient_checkpointing", False))
    rec.trainable_params = _num(_dig(m, "budget.trainable_params"), f"{where}: budget.trainable_params", int)
    for name, kind in (("steps", int), ("tokens_seen", int), ("wall_time_s", float), ("step_time_mean_s", float),
                       ("step_time_p50_s", float), ("tokens_per_s", float), ("adapter_bytes", int)):
        setattr(rec, name, _num(m.get(name), f"{where}: {name}", kind))
    dev = m.get("device")
    rec.device = dev.get("device") if isinstance(dev, dict) else dev
    cuda_peak = _num(_dig(m, "memory.cuda_max_allocated_bytes"), f"{where}: memory.cuda_max_allocated_bytes", int)
    rss_peak = _num(_dig(m, "memory.peak_rss_bytes"), f"{where}: memory.peak_rss_bytes", int)
    if cuda_peak is not None:
        rec.peak_memory_bytes, rec.peak_memory_kind = cuda_peak, "CUDA max allocated"
    elif rss_peak is not None:
        rec.peak_memory_bytes, rec.peak_memory_kind = rss_peak, "CPU peak RSS"
    rec.state_bytes = _num(_dig(m, "memory.trainable_state_bytes"), f"{where}: memory.trainable_state_bytes", int)
    rec.loss_curve = []
    for i, point in enumerate(m.get("loss_curve") or []):
        if not isinstance(point, dict):
            raise InputError(f"{where}: loss_curve[{i}]: expected {{step, loss}}, got {point!r}")
        rec.loss_curve.append((_num(point.get("step"), f"{where}: loss_curve[{i}].step", int),
                               _num(point.get("loss"), f"{where}: loss_curve[{i}].loss")))
    rec.reselections = []
    for i, ev in enumerate(m.get("selector_history") or []):
        if not isinstance(ev, dict):
            raise InputError(f"{where}: selector_history[{i}]: expected an object, got {ev!r}")
        at = f"{where}: selector_history[{i}]"
        rec.reselections.append(Reselection(
            step=_num(ev.get("step"), f"{at}.step", int),
            rate=_num(ev.get("rate"), f"{at}.rate"),
            replaced=_num(ev.get("num_replaced"), f"{at}.num_replaced", int),
            active=_num(ev.get("num_active"), f"{at}.num_active", int),
            overlap_initial=_num(ev.get("overlap_initial"), f"{at}.overlap_initial"),
        ))
    if rec.heldout is None and m.get(HELDOUT) is not None:  # no eval.json: the trainer's own measurement
        rec.heldout = parse_score(m[HELDOUT], f"{where}: {HELDOUT}", "loss")


def parse_eval(rec: RunRecord, evaluation: dict, where: str) -> None:
    """Fill the task scores and held-out loss of ``rec`` from an eval.json object (``spielbench.evaluate``).

    Reads ``tasks`` ({name: entry}, see :func:`parse_score`) and ``heldout`` (:func:`parse_heldout`).

    Raises:
        InputError: ``tasks`` is not an object, or a score has the wrong type (``where`` names the file).
    """
    rec.evaluation = evaluation
    tasks = evaluation.get("tasks", {})
    if not isinstance(tasks, dict):
        raise InputError(f"{where}: tasks: expected an object task -> score, got {type(tasks).__name__}")
    rec.scores = {name: parse_score(raw, f"{where}: tasks.{name}") for name, raw in tasks.items()}
    rec.heldout = parse_heldout(evaluation.get("heldout"), f"{where}: heldout")


def make_record(target: str, config: dict | None, model_name: str, data_name: str,
                metrics: dict | None, evaluation: dict | None, where: str = "") -> RunRecord:
    """Build a :class:`RunRecord` for ``target`` from its run config and raw JSON objects.

    Args:
        target: ``"base"`` or the run id.
        config: the resolved run config (``spielbench.pipeline.Pipeline.runs[target]``), {} for base.
        model_name, data_name: table labels of the model and the training data.
        metrics, evaluation: raw metrics.json / eval.json objects (either may be None).
        where: a prefix naming the source in error messages.
    """
    config = dict(config or {})
    method = "base" if target == "base" else str(config.get("method") or (metrics or {}).get("method") or "")
    rec = RunRecord(target=target, method=method, model_name=model_name, data_name=data_name, config=config,
                    rank=config.get("rank"), density=config.get("density"), seed=config.get("seed"),
                    learning_rate=config.get("learning_rate"),
                    gradient_checkpointing=bool(config.get("gradient_checkpointing", False)))
    if evaluation is not None:
        parse_eval(rec, evaluation, f"{where}eval.json")
    if metrics is not None:
        parse_metrics(rec, metrics, f"{where}metrics.json")
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
        InputError: a required file is missing or malformed (the message names it).
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
        records.append(make_record("base", {}, model_name, data_name, None, read_json(base_eval),
                                   f"{runs_dir / 'base'}/"))
    for rid, cfg in runs.items():
        ev = runs_dir / rid / "eval.json"
        evaluation = read_json(ev) if (require_eval or ev.exists()) else None
        records.append(make_record(rid, cfg, model_name, data_name, read_json(runs_dir / rid / "metrics.json"),
                                   evaluation, f"{runs_dir / rid}/"))
    return records


@dataclass
class BenchPoint:
    """One (model size, method) point of the efficiency benchmark (``spielbench.benchmark``).

    Attributes (units in the names): ``status`` is "ok", "oom", "unsupported", "error" or "timeout";
    timings and peaks are None unless "ok". ``peak_memory_bytes`` is CUDA max allocated on a GPU, else the
    CPU peak RSS (``peak_memory_kind`` says which); ``state_bytes`` = trainable parameters + gradients +
    optimizer state + SpIEL index buffers; ``model_params`` = parameters of the base model.
    """

    size: str
    method: str
    status: str
    file: str
    detail: str | None = None
    rank: int | None = None
    trainable_params: int | None = None
    model_params: int | None = None
    step_time_mean_s: float | None = None
    step_time_p50_s: float | None = None
    tokens_per_s: float | None = None
    peak_memory_bytes: int | None = None
    peak_memory_kind: str | None = None
    state_bytes: int | None = None

    @property
    def ok(self) -> bool:
        """True when the point completed (timings and peak memory are valid)."""
        return self.status == "ok"


def parse_benchmark(d: dict, name: str) -> BenchPoint:
    """A :class:`BenchPoint` from one benchmark JSON object (its stable fields; ``name`` = file name).

    Raises:
        InputError: ``size``/``method``/``status`` missing, or a field of the wrong type.
    """
    for key in ("size", "method", "status"):
        if not isinstance(d.get(key), str):
            raise InputError(f"{name}: {key}: expected a string, got {d.get(key)!r}")
    cuda = _num(d.get("cuda_max_allocated_bytes"), f"{name}: cuda_max_allocated_bytes", int)
    peak = _num(d.get("peak_memory_bytes"), f"{name}: peak_memory_bytes", int)
    return BenchPoint(
        size=d["size"], method=d["method"], status=d["status"], file=name, detail=d.get("detail"),
        rank=_num(d.get("rank"), f"{name}: rank", int),
        trainable_params=_num(d.get("trainable_params"), f"{name}: trainable_params", int),
        model_params=_num(d.get("n_params_model"), f"{name}: n_params_model", int),
        step_time_mean_s=_num(d.get("step_time_mean_s"), f"{name}: step_time_mean_s"),
        step_time_p50_s=_num(d.get("step_time_p50_s"), f"{name}: step_time_p50_s"),
        tokens_per_s=_num(d.get("tokens_per_s"), f"{name}: tokens_per_s"),
        peak_memory_bytes=peak,
        peak_memory_kind=None if peak is None else ("CUDA max allocated" if cuda is not None else "CPU peak RSS"),
        state_bytes=_num(d.get("adapter_state_bytes"), f"{name}: adapter_state_bytes", int),
    )


def load_benchmarks(paths: Iterable[str | Path]) -> list[BenchPoint]:
    """Read benchmark result files ``<size>__<method>.json`` (sorted by file name).

    Raises:
        InputError: a file is missing, not JSON, or malformed (the message names it).
    """
    return [parse_benchmark(read_json(p), Path(p).name) for p in sorted(Path(x) for x in paths)]


# ---------------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------------


def fmt_score(score: Score | None, percent: bool, digits: int | None = None) -> str:
    """``"53.7 ± 2.9"`` (percent) or ``"2.514 ± 0.031"``; ``"—"`` for a skipped task, ``"n/a"`` if absent.

    The stderr is shown with the same number of decimals as the value.
    """
    if score is None:
        return "n/a"
    if score.value is None:
        return "—"
    scale = 100.0 if percent else 1.0
    d = (1 if percent else 3) if digits is None else digits
    text = f"{score.value * scale:.{d}f}"
    if score.stderr is not None:
        text += f" ± {score.stderr * scale:.{d}f}"
    return text


def fmt_count(n: int | None) -> str:
    """Parameter counts: ``4,884,480``; ``"—"`` when unknown."""
    return "—" if n is None else f"{n:,}"


def fmt_bytes(n: float | None, unit: str = "GiB") -> str:
    """Bytes in GiB or MiB with 2 decimals; ``"—"`` when unknown."""
    if n is None:
        return "—"
    div = {"GiB": 2**30, "MiB": 2**20}[unit]
    return f"{n / div:.2f}"


def fmt_float(x: float | None, digits: int = 2) -> str:
    """A float with ``digits`` decimals; ``"—"`` when unknown."""
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _tex_escape(text: str) -> str:
    repl = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
            "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
    text = "".join(repl.get(c, c) for c in str(text))
    return text.replace("±", r"$\pm$").replace("—", "--").replace("÷", r"$\div$").replace("≥", r"$\geq$")


def _write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    write_text_atomic(path, text)


def write_json(path: str | Path, obj) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    _write_text(Path(path), json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


# ---------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------


@dataclass
class Table:
    """A table in two forms: ``data`` (numbers, for CSV) and ``display`` (formatted strings, for md/tex).

    Both are pandas DataFrames with one row per record, in the same order. ``group_cols`` are the
    display columns that define sections (each section becomes a heading in markdown and a block in
    LaTeX); ``title`` and ``notes`` are printed around the table.
    """

    data: Any
    display: Any
    title: str
    group_cols: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _sorted_records(records: list[RunRecord]) -> list[RunRecord]:
    groups: dict[tuple, int] = {}
    for r in records:
        groups.setdefault((r.model_name, r.data_name), len(groups))
    return sorted(records, key=lambda r: (
        groups[(r.model_name, r.data_name)], r.target != "base", r.quantized,
        METHOD_ORDER.get(r.method, len(METHOD_ORDER)), r.method, r.rank or 0, r.density or 0.0,
        r.seed if r.seed is not None else -1, r.target))


def task_columns(records: list[RunRecord], tasks: list[str] | None = None) -> list[str]:
    """Tasks to tabulate: ``tasks`` (config order) if given, else every task in any record, first-seen order."""
    if tasks:
        return list(tasks)
    seen: list[str] = []
    for r in records:
        for t in r.scores:
            if t not in seen:
                seen.append(t)
    return seen


def _metric_names(records: list[RunRecord], task: str) -> str:
    names = sorted({r.scores[task].metric for r in records if task in r.scores and r.scores[task].metric})
    return "/".join(names)


def _skip_notes(records: list[RunRecord], tasks: list[str]) -> list[str]:
    notes = []
    for t in tasks:
        reasons = sorted({r.scores[t].note for r in records if t in r.scores and r.scores[t].value is None
                          and r.scores[t].note})
        for why in reasons:
            notes.append(f"{task_label(t)} shows — (not evaluated): {why}")
    return notes


def _int_columns(df, cols: list[str]):
    """Give integer columns pandas' nullable Int64 dtype, so CSV shows ``16``, not ``16.0``, next to blanks."""
    for c in cols:
        if c in df.columns:
            df[c] = df[c].astype("Int64")
    return df


def score_table(records: list[RunRecord], tasks: list[str] | None = None, title: str = "Main results",
                extra: dict[str, tuple] | None = None):
    """Rows = records (sorted: per model/data group, base first, then the paper's method order).

    Columns: Model, Data, Method, Run, Rank, Trainable params, Steps, one column per task (percent,
    value ± stderr), held-out loss (nats/token, value ± stderr), then ``extra`` columns given as
    ``{header: (csv_column, numeric_fn(record), display_fn(record))}``. CSV columns per task: ``<task>``,
    ``<task>_stderr``, ``<task>_n`` (fractions, not percent).
    """
    import pandas as pd

    records = _sorted_records(records)
    tasks = task_columns(records, tasks)
    data_rows, disp_rows = [], []
    for r in records:
        d = {"model": r.model_name, "data": r.data_name,
             "method": r.method, "run": r.target, "rank": r.rank, "density": r.density, "seed": r.seed,
             "learning_rate": r.learning_rate, "trainable_params": r.trainable_params, "steps": r.steps}
        s = {"Model": r.model_name, "Data": r.data_name,
             "Method": method_label(r.method), "Run": r.target,
             "Rank": "—" if r.rank is None else str(r.rank),
             "Trainable params": fmt_count(r.trainable_params),
             "Steps": "—" if r.steps is None else str(r.steps)}
        for t in tasks:
            sc = r.scores.get(t)
            d[t] = None if sc is None else sc.value
            d[f"{t}_stderr"] = None if sc is None else sc.stderr
            d[f"{t}_n"] = None if sc is None else sc.n
            metric = _metric_names(records, t)
            s[f"{task_label(t)} {metric} (%)".replace("  ", " ")] = fmt_score(sc, percent=True)
        d[HELDOUT] = None if r.heldout is None else r.heldout.value
        d[f"{HELDOUT}_stderr"] = None if r.heldout is None else r.heldout.stderr
        d[f"{HELDOUT}_n"] = None if r.heldout is None else r.heldout.n
        s["Held-out loss"] = fmt_score(r.heldout, percent=False)
        for header, (csv_name, num_fn, disp_fn) in (extra or {}).items():
            d[csv_name] = num_fn(r)
            s[header] = disp_fn(r)
        data_rows.append(d)
        disp_rows.append(s)
    data = _int_columns(pd.DataFrame(data_rows), ["rank", "seed", "trainable_params", "steps"]
                        + [f"{t}_n" for t in tasks] + [f"{HELDOUT}_n"])
    display = pd.DataFrame(disp_rows)
    notes = ["Task scores in percent (value ± standard error over the evaluated items, from lm-eval); "
             "held-out loss = mean cross-entropy in nats per target token on the held-out split "
             "(± standard error over examples); lower is better."]
    notes += _skip_notes(records, tasks)
    return Table(data=data, display=display, title=title, group_cols=["Model", "Data"], notes=notes)


def main_table(records: list[RunRecord], tasks: list[str] | None = None) -> Table:
    """The paper's main-table layout: every record (base + one row per run), grouped by model and data."""
    t = score_table(records, tasks, title="Main results: accuracy and held-out loss per method")
    steps = {r.steps for r in records if r.target != "base"}
    if len(steps) > 1:
        t.notes.append("Runs differ in their number of training steps (Steps column); compare within equal steps.")
    return t


def quantized_table(records: list[RunRecord], tasks: list[str] | None = None) -> Table:
    """4-bit runs (qLoRA, qSpIEL-AG, qSpIEL-MA) and their fp32 counterparts at the same rank and group.

    Extra columns: peak memory (GiB) and step time (s). Empty (zero rows, one note) when no 4-bit run
    is configured.
    """
    quant = [r for r in records if r.quantized]
    keep = list(quant)
    for q in quant:
        base_method = QUANTIZED_COUNTERPART[q.method]
        keep += [r for r in records if r.method == base_method and r.rank == q.rank
                 and (r.model_name, r.data_name) == (q.model_name, q.data_name) and r not in keep]
    extra = {
        "Peak memory (GiB)": ("peak_memory_bytes", lambda r: r.peak_memory_bytes,
                              lambda r: fmt_bytes(r.peak_memory_bytes)),
        "Step time (s)": ("step_time_mean_s", lambda r: r.step_time_mean_s, lambda r: fmt_float(r.step_time_mean_s)),
    }
    t = score_table(keep, tasks, title="4-bit (NF4) training vs fp32 at the same rank", extra=extra)
    if not quant:
        t.notes.insert(0, "No 4-bit run (qlora, qspiel-ag, qspiel-ma) is configured.")
    if len({r.steps for r in keep}) > 1:
        t.notes.append("4-bit runs and fp32 runs differ in their number of training steps (Steps column).")
    return t


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def efficiency_table(records: list[RunRecord], benchmarks: list[BenchPoint] | None = None) -> Table:
    """Training cost per run (from metrics.json) and per benchmark point (from results/benchmark).

    Columns: source ("run"/"benchmark"), model/size, method, rank, trainable params, steps, mean and
    median step time [s], tokens/s, peak memory [GiB] and what it measures (CUDA max allocated or CPU
    peak RSS), trainable + gradient + optimizer-state bytes [MiB], and ratios of step time, peak memory
    and state bytes to LoRA at the same rank (4-bit methods: to qLoRA) and, for benchmark points, to the
    floor (frozen weights, gradient to the inputs only) of the same size.
    """
    import pandas as pd

    rows_d, rows_s = [], []
    runs = [r for r in _sorted_records(records) if r.target != "base"]

    def lora_of(r):
        ref = LORA_REFERENCE.get(r.method, "lora")
        cands = [x for x in runs if x.method == ref and x.rank == r.rank and r.rank is not None
                 and (x.model_name, x.data_name) == (r.model_name, r.data_name)
                 and x.gradient_checkpointing == r.gradient_checkpointing]
        same_seed = [x for x in cands if x.seed == r.seed]
        return (same_seed or cands or [None])[0]

    for r in runs:
        ref = lora_of(r)
        d = {"source": "run", "model": r.model_name, "method": r.method, "run": r.target, "rank": r.rank,
             "trainable_params": r.trainable_params, "steps": r.steps,
             "gradient_checkpointing": r.gradient_checkpointing,
             "step_time_mean_s": r.step_time_mean_s, "step_time_p50_s": r.step_time_p50_s,
             "tokens_per_s": r.tokens_per_s, "peak_memory_bytes": r.peak_memory_bytes,
             "peak_memory_kind": r.peak_memory_kind, "state_bytes": r.state_bytes,
             "step_time_vs_lora": _ratio(r.step_time_mean_s, ref and ref.step_time_mean_s),
             "peak_memory_vs_lora": _ratio(r.peak_memory_bytes, ref and ref.peak_memory_bytes),
             "state_bytes_vs_lora": _ratio(r.state_bytes, ref and ref.state_bytes),
             "step_time_vs_floor": None, "peak_memory_vs_floor": None, "status": "ok"}
        rows_d.append(d)
    bench = benchmarks or []

    def bench_ref(b: BenchPoint, method: str) -> BenchPoint | None:
        return next((x for x in bench if x.size == b.size and x.method == method and x.ok), None)

    for b in bench:
        lref = bench_ref(b, LORA_REFERENCE.get(b.method, "lora"))
        floor = bench_ref(b, "floor")
        rows_d.append({
            "source": "benchmark", "model": b.size, "method": b.method, "run": b.file, "rank": b.rank,
            "trainable_params": b.trainable_params, "steps": None, "gradient_checkpointing": False,
            "step_time_mean_s": b.step_time_mean_s, "step_time_p50_s": b.step_time_p50_s,
            "tokens_per_s": b.tokens_per_s, "peak_memory_bytes": b.peak_memory_bytes,
            "peak_memory_kind": b.peak_memory_kind, "state_bytes": b.state_bytes,
            "step_time_vs_lora": _ratio(b.step_time_mean_s, lref and lref.step_time_mean_s),
            "peak_memory_vs_lora": _ratio(b.peak_memory_bytes, lref and lref.peak_memory_bytes),
            "state_bytes_vs_lora": _ratio(b.state_bytes, lref and lref.state_bytes),
            "step_time_vs_floor": _ratio(b.step_time_mean_s, floor and floor.step_time_mean_s),
            "peak_memory_vs_floor": _ratio(b.peak_memory_bytes, floor and floor.peak_memory_bytes),
            "status": b.status,
        })
    for d in rows_d:
        rows_s.append({
            "Source": "training runs" if d["source"] == "run" else "benchmark", "Model": d["model"],
            "Method": method_label(d["method"]), "Run": d["run"],
            "Rank": "—" if d["rank"] is None else str(d["rank"]),
            "Trainable params": fmt_count(d["trainable_params"]),
            "Step time (s)": fmt_float(d["step_time_mean_s"]) if d["status"] == "ok" else d["status"].upper(),
            "Tokens/s": fmt_float(d["tokens_per_s"], 1),
            "Step p50 (s)": fmt_float(d["step_time_p50_s"]),
            "Peak memory (GiB)": fmt_bytes(d["peak_memory_bytes"]),
            "State (MiB)": fmt_bytes(d["state_bytes"], "MiB"),
            "Step ÷ LoRA": fmt_float(d["step_time_vs_lora"]),
            "Memory ÷ LoRA": fmt_float(d["peak_memory_vs_lora"]),
            "State ÷ LoRA": fmt_float(d["state_bytes_vs_lora"]),
            "Step ÷ floor": fmt_float(d["step_time_vs_floor"]),
            "Memory ÷ floor": fmt_float(d["peak_memory_vs_floor"]),
        })
    cols_d = ["source", "model", "method", "run", "rank", "trainable_params", "steps", "gradient_checkpointing",
              "step_time_mean_s", "step_time_p50_s", "tokens_per_s", "peak_memory_bytes", "peak_memory_kind",
              "state_bytes", "step_time_vs_lora", "peak_memory_vs_lora", "state_bytes_vs_lora",
              "step_time_vs_floor", "peak_memory_vs_floor", "status"]
    data = _int_columns(pd.DataFrame(rows_d, columns=cols_d),
                        ["rank", "trainable_params", "steps", "peak_memory_bytes", "state_bytes"])
    display = pd.DataFrame(rows_s, columns=["Source", "Model", "Method", "Run", "Rank", "Trainable params",
                                            "Step time (s)", "Step p50 (s)", "Tokens/s", "Peak memory (GiB)",
                                            "State (MiB)", "Step ÷ LoRA", "Memory ÷ LoRA", "State ÷ LoRA",
                                            "Step ÷ floor", "Memory ÷ floor"])
    kinds = sorted({d["peak_memory_kind"] for d in rows_d if d["peak_memory_kind"]})
    notes = [
        "Step time: mean wall time of one optimizer step (all its micro-batches), in seconds (benchmark: "
        "weighted by the natural share of SpIEL's selection steps). State: bytes of trainable parameters + "
        "their gradients + optimizer state (benchmark: + SpIEL's index buffers).",
        "Peak memory measures: " + (", ".join(kinds) if kinds else "none recorded") +
        ". CPU peak RSS includes the Python process and the frozen model, so ratios are closer to 1 than "
        "ratios of state bytes.",
        "÷ LoRA: ratio to the LoRA run (4-bit methods: qLoRA) with the same rank, model and data; "
        "÷ floor: ratio to the benchmark's frozen-weight floor of the same size.",
    ]
    if not bench:
        notes.append("No efficiency benchmark results (results/benchmark/*.json) were found; "
                     "only the training runs are listed.")
    if any(d["status"] != "ok" for d in rows_d):
        notes.append("OOM / UNSUPPORTED / ERROR / TIMEOUT: the benchmark point did not complete (no timing or "
                     "peak memory); its JSON file says why (detail).")
    return Table(data=data, display=display, title="Efficiency: step time, throughput and memory",
                 group_cols=["Source", "Model"], notes=notes)


def table_markdown(table: Table) -> str:
    """Markdown: a title, one sub-table per group (heading ``Model · Data``), then the notes."""
    lines = [f"# {table.title}", ""]
    disp = table.display
    if len(disp) == 0:
        lines += ["(no rows)", ""]
    else:
        groups = list(dict.fromkeys(tuple(row) for row in disp[table.group_cols].itertuples(index=False)))
        for g in groups:
            mask = (disp[table.group_cols] == list(g)).all(axis=1)
            sub = disp[mask].drop(columns=table.group_cols)
            lines += [f"## {' · '.join(str(x) for x in g if str(x) not in ('', '—'))}", "",
                      sub.to_markdown(index=False, disable_numparse=True), ""]
    lines += [f"- {n}" for n in table.notes]
    return "\n".join(lines).rstrip() + "\n"


def table_latex(table: Table) -> str:
    """A LaTeX ``tabular`` (booktabs) with a bold row per group, then the notes as a comment block."""
    disp = table.display
    cols = [c for c in disp.columns if c not in table.group_cols]
    out = [f"% {table.title}", "% generated by spielbench.aggregate; needs \\usepackage{booktabs}"]
    out += [f"% {n}" for n in table.notes]
    out += ["\\begin{tabular}{" + "l" * len(cols) + "}", "\\toprule",
            " & ".join(_tex_escape(c) for c in cols) + " \\\\", "\\midrule"]
    if len(disp):
        groups = list(dict.fromkeys(tuple(row) for row in disp[table.group_cols].itertuples(index=False)))
        for gi, g in enumerate(groups):
            if gi:
                out.append("\\midrule")
            head = " / ".join(str(x) for x in g if str(x) not in ("", "—"))
            out.append(f"\\multicolumn{{{len(cols)}}}{{l}}{{\\textbf{{{_tex_escape(head)}}}}} \\\\")
            mask = (disp[table.group_cols] == list(g)).all(axis=1)
            for row in disp[mask][cols].itertuples(index=False):
                out.append(" & ".join(_tex_escape(v) for v in row) + " \\\\")
    out += ["\\bottomrule", "\\end{tabular}", ""]
    return "\n".join(out)


def write_table(table: Table, stem: str | Path) -> list[Path]:
    """Write ``<stem>.md``, ``<stem>.csv`` (numbers) and ``<stem>.tex``; returns the paths."""
    stem = Path(stem)
    paths = [stem.with_suffix(".md"), stem.with_suffix(".csv"), stem.with_suffix(".tex")]
    _write_text(paths[0], table_markdown(table))
    _write_text(paths[1], table.data.to_csv(index=False))
    _write_text(paths[2], table_latex(table))
    return paths


# ---------------------------------------------------------------------------------------------------
# Claims
# ---------------------------------------------------------------------------------------------------

REPRODUCED = "reproduced"
NOT_REPRODUCED = "not reproduced"
INCONCLUSIVE = "inconclusive at this scale (difference within noise)"
MIXED = "inconclusive at this scale (mixed: significant differences in both directions)"
NOT_MEASURED = "not measured in this configuration"

#: Step-time ratio (SpIEL / LoRA) up to which run time counts as comparable, and above which it does not.
RUNTIME_COMPARABLE_MAX = 1.25
RUNTIME_NOT_COMPARABLE_MIN = 1.5
#: Relative difference of measured peak memory below which two methods count as equal.
MEMORY_TIE_FRACTION = 0.01
#: Largest spread (max/min) of state bytes per trainable parameter across budgets that still counts
#: as "proportional to the number of tuned parameters".
STATE_PER_PARAM_SPREAD_MAX = 1.05
#: Family-wise error rate of one claim's statistical comparisons (Bonferroni over the claim).
FAMILY_ALPHA = 0.05

VERDICT_RULES = f"""\
How the verdicts are computed (spielbench/aggregate.py; every threshold is a constant there):

1. **Accuracy and held-out loss comparisons** (A vs B on one metric). Each side is a *setting* (a run config
   without its seed); with several seeds, its value is the mean over seeds. The difference d is oriented
   so that d > 0 favours A (for the held-out loss, d = loss(B) − loss(A)). Its standard error s is
   *paired* when both sides are single runs whose eval.json holds per-item results on the same items
   (task `item_scores` with `doc_ids`; held-out `example_nll` with `example_tokens`): the standard error of
   the per-item differences (for the token-mean held-out loss, the ratio-estimator standard error).
   Otherwise s = sqrt(s_A² + s_B²), each side's s being the evaluation standard error (lm-eval's stderr
   over items; over held-out examples), combined as sqrt(mean(se²) + seed_sd²/n_seeds) for several seeds;
   this treats the two evaluations as independent, which is conservative. (lm-eval's stderr of a score of
   exactly 0 or 1 is 0; it is replaced by the binomial standard error at p = 0.5/n or 1 − 0.5/n.)
   With m such comparisons in one claim, a comparison is **significant** when |d| > z·s with
   z = Φ⁻¹(1 − {FAMILY_ALPHA}/(2m)) (Bonferroni: family-wise error {FAMILY_ALPHA:.0%} per claim). The tables
   show d with its plain 95% interval d ± 1.96·s as well. A comparison whose metric has no standard error
   is shown but does not count.
2. **Step-time comparisons** (SpIEL / LoRA, same rank): ratio ≤ {RUNTIME_COMPARABLE_MAX} supports
   "comparable run time"; ratio > {RUNTIME_NOT_COMPARABLE_MIN} contradicts it; in between is undecided.
   (Step times of one configuration vary by about 20% from run to run on a shared 2-core CPU.)
3. **Memory comparisons**: exact byte counts of trainable parameters, gradients and optimizer state decide
   by their sign; measured peak memory differing by less than {MEMORY_TIE_FRACTION:.0%} counts as equal.
   "Scales with tuned parameters": state bytes per trainable parameter must stay within a factor
   {STATE_PER_PARAM_SPREAD_MAX} across budgets; across model sizes (benchmark), the growth of the peak-memory
   overhead over the floor must be closer (in log ratio) to the growth of the trainable parameters than
   to the growth of the model's parameters.
4. **Verdict of a claim** from its counted comparisons: **{REPRODUCED}** when at least one supports it and
   none contradicts it; **{NOT_REPRODUCED}** when at least one contradicts it and none supports it;
   **{MIXED}** when both occur; **{INCONCLUSIVE}** when none is decided either way; **{NOT_MEASURED}** when
   the configuration has no run that tests it.
"""


@dataclass
class Comparison:
    """One piece of evidence for a claim.

    Attributes:
        label: what is compared (e.g. ``SpIEL-AG r=16 vs LoRA r=16``).
        metric: the metric (task name, ``heldout_loss``, ``step time`` ...).
        a, b: the two values (A is the side the claim favours), or None.
        diff: the oriented difference (> 0 favours the claim) or a ratio (``kind == "ratio"``).
        stderr: standard error of ``diff`` (statistical comparisons only).
        outcome: "supports", "contradicts", "undecided" or "not counted".
        kind: "stat" (difference with a standard error), "ratio", "bytes" or "info".
        detail: free text shown in the evidence table (units, seeds, notes).
    """

    label: str
    metric: str
    a: float | None
    b: float | None
    diff: float | None
    stderr: float | None = None
    outcome: str = "not counted"
    kind: str = "stat"
    detail: str = ""
    counted: bool = True
    z_crit: float | None = None


@dataclass
class Claim:
    """A qualitative claim of the paper, its evidence and its verdict."""

    key: str
    statement: str
    source: str
    how: str
    comparisons: list[Comparison] = field(default_factory=list)
    verdict: str = NOT_MEASURED
    reason: str = ""
    notes: list[str] = field(default_factory=list)


@dataclass
class SettingScore:
    """A metric of one setting pooled over its seeds: mean, standard error, seeds (values)."""

    value: float
    stderr: float | None
    values: list[float]


def pool_scores(scores: list[Score]) -> SettingScore | None:
    """Pool one metric over the seeds of a setting (rule 1 of :data:`VERDICT_RULES`).

    value = mean of the values; stderr = sqrt(mean(se_i²) + sd(values)²/k) for k ≥ 2 seeds, se_1 for one
    seed, None when any seed lacks a stderr. Scores without a value are ignored; None when none is left.
    """
    vals = [s for s in scores if s is not None and s.value is not None]
    if not vals:
        return None
    v = [s.value for s in vals]
    mean = sum(v) / len(v)
    if any(s.stderr is None for s in vals):
        se = None
    else:
        item_var = sum(s.stderr ** 2 for s in vals) / len(vals)
        seed_var = statistics.variance(v) / len(v) if len(v) >= 2 else 0.0
        se = math.sqrt(item_var + seed_var)
    return SettingScore(mean, se, v)


def z_critical(m: int, alpha: float = FAMILY_ALPHA) -> float:
    """Two-sided Bonferroni critical z for ``m`` comparisons at family-wise level ``alpha`` (m ≥ 1)."""
    return statistics.NormalDist().inv_cdf(1 - alpha / (2 * max(1, m)))


def stat_outcome(diff: float, stderr: float | None, z: float) -> str:
    """"supports" if diff > z·stderr, "contradicts" if diff < −z·stderr, else "undecided".

    "not counted" when ``stderr`` is None. A zero stderr decides by the sign of ``diff`` (0: undecided).
    """
    if stderr is None:
        return "not counted"
    if diff > z * stderr:
        return "supports"
    if diff < -z * stderr:
        return "contradicts"
    return "undecided"


def decide(comparisons: list[Comparison]) -> tuple[str, str]:
    """The verdict of a claim from its counted comparisons (rule 4 of :data:`VERDICT_RULES`).

    Returns ``(verdict, reason)``, the reason counting supporting / contradicting / undecided comparisons.
    """
    counted = [c for c in comparisons if c.counted and c.outcome != "not counted"]
    if not counted:
        if comparisons:
            n = len(comparisons)
            return NOT_MEASURED, (f"{n} comparison{'s' if n != 1 else ''} shown, none counted: no noise estimate, "
                                  "or evidence that decides nothing on its own (see the notes)")
        return NOT_MEASURED, "no configured run pair tests this claim"
    sup = sum(c.outcome == "supports" for c in counted)
    con = sum(c.outcome == "contradicts" for c in counted)
    und = len(counted) - sup - con
    reason = (f"{sup} supporting, {con} contradicting, {und} undecided of {len(counted)} counted "
              f"comparison{'s' if len(counted) != 1 else ''}")
    if sup and not con:
        return REPRODUCED, reason
    if con and not sup:
        return NOT_REPRODUCED, reason
    if sup and con:
        return MIXED, reason
    return INCONCLUSIVE, reason


def _settings(records: list[RunRecord]) -> dict[str, list[RunRecord]]:
    out: dict[str, list[RunRecord]] = {}
    for r in records:
        out.setdefault(r.setting, []).append(r)
    return out


def _pick_setting(groups: list[list[RunRecord]]) -> list[RunRecord] | None:
    """Among settings of one method at one budget (e.g. a learning-rate grid), the lowest held-out loss."""
    if not groups:
        return None

    def key(g):
        p = pool_scores([r.heldout for r in g])
        return math.inf if p is None else p.value

    return min(groups, key=key)


def _pair_key(r: RunRecord):
    c = r.config
    return (r.model_name, r.data_name, r.rank, r.density, c.get("max_steps"), c.get("per_device_train_batch_size"),
            c.get("gradient_accumulation_steps"), c.get("max_seq_length"), r.gradient_checkpointing)


def matched_pairs(records: list[RunRecord], method_a: str, method_b: str,
                  same_budget: bool = True) -> list[tuple[list[RunRecord], list[RunRecord]]]:
    """Pairs of settings (lists of seed runs) of ``method_a`` and ``method_b`` trained alike.

    "Alike": same model, data, rank/density, steps, batch, sequence length and gradient checkpointing
    (learning rate, weight decay and method hyper-parameters may differ: each method keeps its own).
    With ``same_budget=False`` the rank/density is not matched (e.g. vs (IA)3 or the base model).
    When one method has several settings per pair key, the one with the lowest held-out loss is used.
    """
    def by_key(method):
        out: dict[tuple, list[list[RunRecord]]] = {}
        for g in _settings([r for r in records if r.method == method and r.target != "base"]).values():
            k = _pair_key(g[0])
            if not same_budget:
                k = k[:2] + k[4:]
            out.setdefault(k, []).append(g)
        return out

    a, b = by_key(method_a), by_key(method_b)
    pairs = []
    for k in a:
        if k in b:
            pairs.append((_pick_setting(a[k]), _pick_setting(b[k])))
    pairs.sort(key=lambda p: (p[0][0].rank or 0, p[0][0].density or 0.0))
    return pairs


def _setting_label(g: list[RunRecord]) -> str:
    r = g[0]
    s = method_label(r.method)
    if r.rank is not None:
        s += f" r={r.rank}"
    elif r.density is not None:
        s += f" d={r.density:.3g}"
    if len(g) > 1:
        s += f" ({len(g)} seeds)"
    return s


def stat_comparisons(label: str, a: list[RunRecord], b: list[RunRecord], metrics: list[str]) -> list[Comparison]:
    """Accuracy / held-out-loss comparisons of setting A vs setting B (z is set later by the claim)."""
    out = []
    for metric in metrics:
        pa = pool_scores([r.score(metric) for r in a])
        pb = pool_scores([r.score(metric) for r in b])
        if pa is None or pb is None:
            continue
        sign = -1.0 if metric == HELDOUT else 1.0
        diff = sign * (pa.value - pb.value)
        se = None if pa.stderr is None or pb.stderr is None else math.hypot(pa.stderr, pb.stderr)
        detail = ""
        if len(a) == 1 and len(b) == 1:
            paired = paired_stderr(a[0].score(metric), b[0].score(metric))
            if paired is not None:
                se = paired
                detail = f"paired over {len(a[0].score(metric).items)} items"
        if len(pa.values) > 1 or len(pb.values) > 1:
            detail = (f"seeds A: {', '.join(f'{v:.4g}' for v in pa.values)}; "
                      f"B: {', '.join(f'{v:.4g}' for v in pb.values)}")
        out.append(Comparison(label=label, metric=metric, a=pa.value, b=pb.value, diff=diff, stderr=se,
                              kind="stat", detail=detail))
    return out


def _finish_stats(claim: Claim) -> None:
    stats = [c for c in claim.comparisons if c.kind == "stat" and c.counted and c.stderr is not None]
    z = z_critical(len(stats))
    for c in claim.comparisons:
        if c.kind != "stat":
            continue
        c.z_crit = z
        c.outcome = stat_outcome(c.diff, c.stderr, z) if c.counted else "not counted"
    claim.verdict, claim.reason = decide(claim.comparisons)


def _eval_metrics(records: list[RunRecord]) -> list[str]:
    tasks = []
    for r in records:
        for t, s in r.scores.items():
            if s.value is not None and t not in tasks:
                tasks.append(t)
    return tasks + [HELDOUT]


def _budget_note(a: list[RunRecord], b: list[RunRecord]) -> str | None:
    na, nb = a[0].trainable_params, b[0].trainable_params
    if na and nb and abs(na - nb) / max(na, nb) > 0.01:
        return (f"{_setting_label(a)} has {na:,} and {_setting_label(b)} {nb:,} trainable parameters "
                f"(not equal within 1%)")
    return None


def claim_better(key: str, statement: str, source: str, records: list[RunRecord], method_a: str,
                 methods_b: list[str], same_budget: bool = True) -> Claim:
    """A "method A ≥ method B" claim on accuracy and held-out loss over every matched pair of settings."""
    metrics = _eval_metrics(records)
    claim = Claim(key, statement, source,
                  how=(f"{method_label(method_a)} vs {', '.join(method_label(m) for m in methods_b)}"
                       + (" at the same rank (equal trainable parameters)" if same_budget else "")
                       + ", trained alike; every task and the held-out loss."))
    for mb in methods_b:
        for a, b in matched_pairs(records, method_a, mb, same_budget):
            claim.comparisons += stat_comparisons(f"{_setting_label(a)} vs {_setting_label(b)}", a, b, metrics)
            note = _budget_note(a, b) if same_budget else None
            if note:
                claim.notes.append(note)
    _finish_stats(claim)
    return claim


def claim_ma_lighter(records: list[RunRecord], benchmarks: list[BenchPoint]) -> Claim:
    """SpIEL-MA needs less memory than SpIEL-AG at the same budget (state bytes; peak memory)."""
    claim = Claim("ma-lighter",
                  statement="SpIEL-MA is lighter in memory than SpIEL-AG at the same number of trainable parameters.",
                  source="the paper's method: SpIEL-MA's SM3 optimizer keeps row and column statistics instead of "
                         "per-entry Adam moments and needs no gradient accumulation for regrowth",
                  how="trainable + gradient + optimizer-state bytes (exact) and measured peak memory, "
                      "SpIEL-MA vs SpIEL-AG at the same rank; benchmark points at the same model size.")
    for ma, ag in matched_pairs(records, "spiel-ma", "spiel-ag") + matched_pairs(records, "qspiel-ma", "qspiel-ag"):
        label = f"{_setting_label(ma)} vs {_setting_label(ag)}"
        sa, sb = ma[0].state_bytes, ag[0].state_bytes
        if sa is not None and sb is not None:
            claim.comparisons.append(Comparison(label, "state bytes", sa, sb, _ratio(sa, sb), kind="bytes",
                                                outcome="supports" if sa < sb else "contradicts",
                                                detail="ratio MA ÷ AG"))
        pa, pb = ma[0].peak_memory_bytes, ag[0].peak_memory_bytes
        if pa is not None and pb is not None:
            claim.comparisons.append(_memory_comparison(label, pa, pb, ma[0].peak_memory_kind))
    claim.comparisons += _bench_memory(benchmarks, "spiel-ma", "spiel-ag")
    claim.verdict, claim.reason = decide(claim.comparisons)
    return claim


def _memory_comparison(label: str, lighter: float, heavier: float, kind: str | None) -> Comparison:
    rel = (heavier - lighter) / max(lighter, heavier)
    outcome = "undecided" if abs(rel) < MEMORY_TIE_FRACTION else ("supports" if rel > 0 else "contradicts")
    return Comparison(label, f"peak memory ({kind or 'measured'})", lighter, heavier, _ratio(lighter, heavier),
                      kind="bytes", outcome=outcome, detail="ratio")


def _bench_pairs(benchmarks: list[BenchPoint], method_a: str, method_b: str):
    """Completed benchmark points of ``method_a`` and ``method_b`` at the same model size."""
    ok = [b for b in benchmarks if b.ok]
    for a in ok:
        if a.method != method_a:
            continue
        for b in ok:
            if b.method == method_b and b.size == a.size:
                yield a, b


def _bench_memory(benchmarks: list[BenchPoint], lighter: str, heavier: str) -> list[Comparison]:
    out = []
    for a, b in _bench_pairs(benchmarks, lighter, heavier):
        if a.peak_memory_bytes is not None and b.peak_memory_bytes is not None:
            out.append(_memory_comparison(f"benchmark {a.size}: {method_label(lighter)} vs {method_label(heavier)}",
                                          a.peak_memory_bytes, b.peak_memory_bytes, a.peak_memory_kind))
        if a.state_bytes is not None and b.state_bytes is not None:
            out.append(Comparison(f"benchmark {a.size}: {method_label(lighter)} vs {method_label(heavier)}",
                                  "state bytes", a.state_bytes, b.state_bytes, _ratio(a.state_bytes, b.state_bytes),
                                  kind="bytes", outcome="supports" if a.state_bytes < b.state_bytes else "contradicts",
                                  detail="ratio MA ÷ AG"))
    return out


def _runtime_outcome(ratio: float) -> str:
    if ratio <= RUNTIME_COMPARABLE_MAX:
        return "supports"
    if ratio > RUNTIME_NOT_COMPARABLE_MIN:
        return "contradicts"
    return "undecided"


def claim_runtime(records: list[RunRecord], benchmarks: list[BenchPoint]) -> Claim:
    """SpIEL's step time is comparable to LoRA's at the same budget (rule 2 of :data:`VERDICT_RULES`)."""
    claim = Claim("runtime", statement="SpIEL's run time is comparable to LoRA's.",
                  source="paper abstract (\"comparable in terms of run time\")",
                  how="mean step time of SpIEL-AG and SpIEL-MA ÷ LoRA at the same rank (training runs, and "
                      "benchmark points per model size); 4-bit variants ÷ qLoRA.")
    for ma, mb in (("spiel-ag", "lora"), ("spiel-ma", "lora"), ("qspiel-ag", "qlora"), ("qspiel-ma", "qlora")):
        for a, b in matched_pairs(records, ma, mb):
            ta = [r.step_time_mean_s for r in a if r.step_time_mean_s is not None]
            tb = [r.step_time_mean_s for r in b if r.step_time_mean_s is not None]
            if not ta or not tb:
                continue
            ratio = (sum(ta) / len(ta)) / (sum(tb) / len(tb))
            claim.comparisons.append(Comparison(f"{_setting_label(a)} vs {_setting_label(b)}", "step time (s)",
                                                sum(ta) / len(ta), sum(tb) / len(tb), ratio, kind="ratio",
                                                outcome=_runtime_outcome(ratio), detail="ratio SpIEL ÷ LoRA"))
        for a, b in _bench_pairs(benchmarks, ma, mb):
            sa, sb = a.step_time_mean_s, b.step_time_mean_s
            if sa is None or not sb:
                continue
            claim.comparisons.append(Comparison(
                f"benchmark {a.size}: {method_label(ma)} vs {method_label(mb)}", "step time (s)", sa, sb,
                sa / sb, kind="ratio", outcome=_runtime_outcome(sa / sb), detail="ratio SpIEL ÷ LoRA"))
    claim.verdict, claim.reason = decide(claim.comparisons)
    return claim


def claim_memory_scaling(records: list[RunRecord], benchmarks: list[BenchPoint]) -> Claim:
    """SpIEL's memory overhead scales with the number of tuned parameters, not with the model size."""
    claim = Claim("memory-scaling",
                  statement="SpIEL's memory overhead scales with the number of tuned parameters rather than with "
                            "the model size.",
                  source="a third-party summary of the paper (a hint only: \"memory overhead scales with the number "
                         "of tuned params rather than model size\")",
                  how="(a) training runs: state bytes per trainable parameter across budgets of one method; "
                      "(b) benchmark: growth of peak memory above the floor across model sizes vs growth of "
                      "trainable parameters and of model parameters.")
    for method in ("spiel-ag", "spiel-ma", "qspiel-ag", "qspiel-ma"):
        groups: dict[tuple, list[RunRecord]] = {}
        for r in records:
            if r.method == method and r.state_bytes and r.trainable_params:
                k = (r.model_name, r.data_name, r.gradient_checkpointing)
                if all(x.rank != r.rank or x.density != r.density for x in groups.get(k, [])):
                    groups.setdefault(k, []).append(r)
        for k, rs in groups.items():
            if len(rs) < 2:
                continue
            per = [r.state_bytes / r.trainable_params for r in rs]
            spread = max(per) / min(per)
            budgets = ", ".join(_setting_label([r]) for r in sorted(rs, key=lambda r: r.trainable_params))
            claim.comparisons.append(Comparison(
                f"{method_label(method)} budgets {budgets}", "state bytes per trainable parameter",
                min(per), max(per), spread, kind="ratio",
                outcome="supports" if spread <= STATE_PER_PARAM_SPREAD_MAX else "contradicts",
                detail=f"{min(per):.2f}–{max(per):.2f} B/param (spread max ÷ min)"))
    bench = _bench_scaling(benchmarks)
    if not any(c.counted for c in bench):
        for c in claim.comparisons:
            c.counted, c.outcome = False, "not counted"
        claim.notes.append("The model-size half of the claim needs the efficiency benchmark at two or more model "
                           "sizes (results/benchmark/, with a floor per size); without it the per-budget state bytes "
                           "above are shown but decide nothing.")
    claim.comparisons += bench
    claim.verdict, claim.reason = decide(claim.comparisons)
    return claim


def _bench_scaling(benchmarks: list[BenchPoint]) -> list[Comparison]:
    """Per method, growth of (peak − floor peak) from the smallest to the largest completed model size."""
    out = []
    ok = [b for b in benchmarks if b.ok]
    floors = {b.size: b for b in ok if b.method == "floor"}
    for method in ("spiel-ag", "spiel-ma", "qspiel-ag", "full"):
        pts = []
        for b in ok:
            f = floors.get(b.size)
            if b.method != method or f is None:
                continue
            if None in (b.peak_memory_bytes, f.peak_memory_bytes, b.trainable_params, b.model_params):
                continue
            if b.peak_memory_bytes <= f.peak_memory_bytes or not b.trainable_params:
                continue
            pts.append((b.model_params, b.trainable_params, b.peak_memory_bytes - f.peak_memory_bytes, b.size))
        if len(pts) < 2:
            continue
        pts.sort()
        (p0, n0, o0, s0), (p1, n1, o1, s1) = pts[0], pts[-1]
        g_over, g_n, g_p = o1 / o0, n1 / n0, p1 / p0
        closer_n = abs(math.log(g_over / g_n)) < abs(math.log(g_over / g_p))
        c = Comparison(f"benchmark {method_label(method)} {s0} → {s1}", "peak memory above the floor",
                       o0, o1, g_over, kind="ratio",
                       outcome="supports" if closer_n else "contradicts",
                       detail=f"overhead ×{g_over:.2f}; trainable params ×{g_n:.2f}; model params ×{g_p:.2f}")
        if method == "full":  # full FT tunes every parameter: a reference line, not evidence
            c.counted, c.outcome = False, "not counted"
        out.append(c)
    return out


def _base_for(base: list[RunRecord], run: RunRecord) -> list[RunRecord]:
    """The base-model record(s) of ``run``'s model (the one evaluated with the same data, if several)."""
    same = [b for b in base if b.model_name == run.model_name and b.data_name == run.data_name]
    return same[:1] or [b for b in base if b.model_name == run.model_name][:1]


def claim_quantized(records: list[RunRecord]) -> Claim:
    """SpIEL trains over a 4-bit (NF4) base: qSpIEL improves over the base model."""
    metrics = _eval_metrics(records)
    claim = Claim("4bit", statement="SpIEL works with 4-bit quantized base weights (qSpIEL).",
                  source="paper abstract (\"compatible with both quantization and efficient optimizers\")",
                  how="every qSpIEL-AG/-MA setting vs the base model (counted: fine-tuning must improve on the "
                      "base model); vs qLoRA and vs the fp32 SpIEL run at the same rank (shown, not counted).")
    base = [r for r in records if r.target == "base"]
    for method in ("qspiel-ag", "qspiel-ma"):
        for g in _settings([r for r in records if r.method == method]).values():
            mb = _base_for(base, g[0])
            if mb:
                claim.comparisons += stat_comparisons(f"{_setting_label(g)} vs base model", g, mb, metrics)
        for q, f in matched_pairs(records, method, "qlora") + matched_pairs(
                [r for r in records if r.method in (method, QUANTIZED_COUNTERPART[method])],
                method, QUANTIZED_COUNTERPART[method]):
            for c in stat_comparisons(f"{_setting_label(q)} vs {_setting_label(f)}", q, f, metrics):
                c.counted = False
                claim.comparisons.append(c)
        for q in [r for r in records if r.method == method]:
            f = [r for r in records if r.method == QUANTIZED_COUNTERPART[method] and r.rank == q.rank
                 and r.model_name == q.model_name]
            if f and f[0].steps != q.steps:
                claim.notes.append(f"{q.target} trained {q.steps} steps, {f[0].target} {f[0].steps}: "
                                   "the fp32 comparison is not like for like (not matched, so not shown).")
    _finish_stats(claim)
    return claim


def claim_checkpointing(records: list[RunRecord]) -> Claim:
    """SpIEL trains with activation (gradient) checkpointing: runs with it improve over the base model."""
    metrics = _eval_metrics(records)
    claim = Claim("checkpointing", statement="SpIEL works with activation checkpointing.",
                  source="a third-party summary of the paper (a hint only: \"compatible with 4-bit quantized "
                         "weights and activation checkpointing\")",
                  how="every SpIEL setting trained with gradient_checkpointing: true vs the base model (counted); "
                      "vs the same setting without checkpointing (shown, not counted).")
    base = [r for r in records if r.target == "base"]
    spiel = [r for r in records if r.method in ("spiel-ag", "spiel-ma", "qspiel-ag", "qspiel-ma")]
    for g in _settings([r for r in spiel if r.gradient_checkpointing]).values():
        mb = _base_for(base, g[0])
        if mb:
            claim.comparisons += stat_comparisons(f"{_setting_label(g)} (checkpointing) vs base model", g, mb,
                                                  metrics)
        twin = [r for r in spiel if not r.gradient_checkpointing and r.method == g[0].method
                and r.rank == g[0].rank and r.density == g[0].density and r.model_name == g[0].model_name
                and r.config.get("max_steps") == g[0].config.get("max_steps")]
        if twin:
            for c in stat_comparisons(f"{_setting_label(g)} with vs without checkpointing", g, twin, metrics):
                c.counted = False
                claim.comparisons.append(c)
            pa, pb = g[0].peak_memory_bytes, twin[0].peak_memory_bytes
            if pa is not None and pb is not None:
                c = _memory_comparison(f"{_setting_label(g)} with vs without checkpointing", pa, pb,
                                       g[0].peak_memory_kind)
                c.counted, c.outcome = False, "not counted"
                claim.comparisons.append(c)
    if not any(r.gradient_checkpointing for r in spiel):
        claim.notes.append("No SpIEL run has gradient_checkpointing: true; add one to the config to test this claim, "
                           "e.g. {method: spiel-ag, rank: 16, gradient_checkpointing: true, id: spiel-ag-r16-gc}.")
    _finish_stats(claim)
    return claim


def evaluate_claims(records: list[RunRecord], benchmarks: list[BenchPoint] | None = None) -> list[Claim]:
    """All claims of the paper checked by this suite, in the order of ``results/claims.md``."""
    benchmarks = benchmarks or []
    return [
        claim_better("ag-vs-lora",
                     "SpIEL-AG performs at least as well as LoRA at an equal number of trainable parameters.",
                     "paper abstract (\"often superior to popular parameter-efficient fine-tuning methods like "
                     "LoRA\")", records, "spiel-ag", ["lora"]),
        claim_better("ag-vs-ma", "SpIEL-AG performs at least as well as SpIEL-MA.",
                     "the paper's method: SpIEL-MA approximates SpIEL-AG's accumulated gradients to save memory",
                     records, "spiel-ag", ["spiel-ma"]),
        claim_ma_lighter(records, benchmarks),
        claim_runtime(records, benchmarks),
        claim_memory_scaling(records, benchmarks),
        claim_quantized(records),
        claim_checkpointing(records),
        claim_better("regrowth", "Regrowth (dynamic index reselection) beats a static sparse mask of the same size.",
                     "the paper's method: indices are dropped and regrown during training (tested here against fixed "
                     "masks of the same size)", records, "spiel-ag", ["spiel-static", "shira"]),
    ]


def _fmt_value(metric: str, x: float | None, kind: str) -> str:
    if x is None:
        return "—"
    if kind == "bytes" or "bytes" in metric and "per" not in metric or "memory" in metric:
        return f"{x / 2**20:,.1f} MiB"
    if metric == HELDOUT:
        return f"{x:.4f}"
    if kind == "stat":
        return f"{100 * x:.1f}%"
    return f"{x:.3g}"


def claims_markdown(claims: list[Claim], context: str = "") -> str:
    """The text of ``results/claims.md``: a summary table, then per claim its evidence and verdict."""
    lines = ["# The paper's claims, checked on this run", ""]
    if context:
        lines += [context, ""]
    lines += ["No number from the paper is used: its result tables were not available to this suite; each claim "
              "is a qualitative statement of the paper, tested on the runs configured here.", "",
              "| # | claim | verdict | evidence |", "|---|---|---|---|"]
    for i, c in enumerate(claims, 1):
        lines.append(f"| {i} | {c.statement} | **{c.verdict}** | {c.reason} |")
    lines += ["", VERDICT_RULES]
    for i, c in enumerate(claims, 1):
        lines += [f"## {i}. {c.statement}", "", f"- Source: {c.source}", f"- Test: {c.how}",
                  f"- **Verdict: {c.verdict}**: {c.reason}", ""]
        stats = [x for x in c.comparisons if x.kind == "stat"]
        if stats:
            z = stats[0].z_crit
            lines += [f"Accuracy (percentage points) and held-out loss (nats/token); d > 0 favours the claim; "
                      f"significance threshold |d| > {z:.2f}·s." if z else "", "",
                      "| comparison | metric | A | B | d | 95% CI | d/s | outcome | note |",
                      "|---|---|---|---|---|---|---|---|---|"]
            for x in stats:
                scale = 1.0 if x.metric == HELDOUT else 100.0
                dig = 4 if x.metric == HELDOUT else 1
                ci = ("—" if x.stderr is None else
                      f"[{scale * (x.diff - Z95 * x.stderr):+.{dig}f}, {scale * (x.diff + Z95 * x.stderr):+.{dig}f}]")
                zs = "—" if not x.stderr else f"{x.diff / x.stderr:+.2f}"
                metric = "held-out loss" if x.metric == HELDOUT else task_label(x.metric)
                out = x.outcome + ("" if x.counted else " (shown only)")
                lines.append(f"| {x.label} | {metric} | {scale * x.a:.{dig}f} | {scale * x.b:.{dig}f} | "
                             f"{scale * x.diff:+.{dig}f} | {ci} | {zs} | {out} | {x.detail} |")
            lines.append("")
        other = [x for x in c.comparisons if x.kind != "stat"]
        if other:
            lines += ["| comparison | measure | A | B | ratio | outcome | note |", "|---|---|---|---|---|---|---|"]
            for x in other:
                out = x.outcome + ("" if x.counted else " (shown only)")
                lines.append(f"| {x.label} | {x.metric} | {_fmt_value(x.metric, x.a, x.kind)} | "
                             f"{_fmt_value(x.metric, x.b, x.kind)} | {fmt_float(x.diff, 3)} | {out} | {x.detail} |")
            lines.append("")
        if not c.comparisons:
            lines += ["No configured run tests this claim.", ""]
        lines += [f"- Note: {n}" for n in dict.fromkeys(c.notes)]
        if c.notes:
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------------------------------------------
# Raw copies and the results folder
# ---------------------------------------------------------------------------------------------------


def _relativize(obj, root: str):
    """Replace absolute paths under ``root`` by relative ones, recursively (no machine paths in results/)."""
    if isinstance(obj, dict):
        return {k: _relativize(v, root) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_relativize(v, root) for v in obj]
    if isinstance(obj, str) and root and obj.startswith(root):
        return os.path.relpath(obj, root)
    return obj


def _public_config(cfg: dict) -> dict:
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
    index = {"tasks": list(tasks) if tasks else task_columns(records), "targets": []}
    for r in records:
        d = runs / r.target
        entry = {"target": r.target, "method": r.method, "model_name": r.model_name, "data_name": r.data_name,
                 "config": _public_config(r.config), "files": []}
        for name, obj in (("metrics.json", r.metrics), ("eval.json", r.evaluation)):
            if obj is not None:
                write_json(d / name, _relativize(obj, root))
                written.append(d / name)
                entry["files"].append(name)
        index["targets"].append(entry)
    keep = {r.target for r in records}
    if runs.is_dir():
        for child in runs.iterdir():
            if child.is_dir() and child.name not in keep:
                shutil.rmtree(child)
    write_json(runs / "index.json", index)
    written.append(runs / "index.json")
    return written


def results_tasks(results_dir: str | Path) -> list[str]:
    """The configured evaluation tasks recorded in ``<results_dir>/runs/index.json`` (column order)."""
    return list(read_json(Path(results_dir) / "runs" / "index.json").get("tasks", []))


def load_results_dir(results_dir: str | Path) -> tuple[list[RunRecord], list[BenchPoint]]:
    """Read back what :func:`aggregate` wrote: the records (from ``runs/``) and the benchmark points.

    This is what ``analysis/figures.ipynb`` uses: nothing outside ``results_dir`` is read.

    Raises:
        InputError: ``runs/index.json`` is missing (the aggregation has not run) or a listed file is.
    """
    results_dir = Path(results_dir)
    index = read_json(results_dir / "runs" / "index.json")
    records = []
    for e in index.get("targets", []):
        d = results_dir / "runs" / e["target"]
        metrics = read_json(d / "metrics.json") if "metrics.json" in e.get("files", []) else None
        evaluation = read_json(d / "eval.json") if "eval.json" in e.get("files", []) else None
        records.append(make_record(e["target"], e.get("config", {}), e["model_name"], e["data_name"], metrics,
                                   evaluation, f"{d}/"))
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
        _write_text(dst, markdown_html(text, first))
        out.append(dst)
    return out


def write_results(records: list[RunRecord], benchmarks: list[BenchPoint], results_dir: str | Path,
                  tasks: list[str] | None = None, context: str = "") -> list[Path]:
    """Write the three tables and claims.md for ``records`` into ``results_dir``; returns the paths."""
    results_dir = Path(results_dir)
    written = []
    written += write_table(main_table(records, tasks), results_dir / "tables" / "main")
    written += write_table(quantized_table(records, tasks), results_dir / "tables" / "quantized")
    written += write_table(efficiency_table(records, benchmarks), results_dir / "tables" / "efficiency")
    path = results_dir / "claims.md"
    _write_text(path, claims_markdown(evaluate_claims(records, benchmarks), context))
    written.append(path)
    return written


def aggregate(runs_dir: str | Path, runs: dict[str, dict], results_dir: str | Path, model_name: str,
              data_name: str, tasks: list[str] | None = None, benchmark_files: Iterable[str | Path] = (),
              root: str | Path | None = None) -> list[Path]:
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
            write_json(dst, _relativize(read_json(src), str(Path(root or Path.cwd()).resolve())))
            written.append(dst)
    written += write_results(records, benchmarks, results_dir, tasks, ctx)
    log.info("aggregate: wrote %d files under %s", len(written), results_dir)
    return written


def _config_from_file(path: str) -> dict:
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
    """Command line (see the module docstring). Exit status 0 ok, 2 bad input."""
    ap = argparse.ArgumentParser(prog="python -m spielbench.aggregate", description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="pipeline config YAML; aggregates its runs_dir into its results_dir")
    src.add_argument("--from-results", nargs="+", metavar="RESULTS_DIR",
                     help="combine the records of several results folders (e.g. one per model × data)")
    ap.add_argument("--out", help="output folder (required with --from-results)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.config:
            from spielbench.pipeline import PipelineConfigError, resolve_pipeline

            cfg = _config_from_file(args.config)
            try:
                pipe = resolve_pipeline(cfg)
            except PipelineConfigError as err:
                raise InputError(f"{args.config}: {err}") from None
            aggregate(pipe.runs_dir, pipe.runs, args.out or pipe.results_dir,
                      cfg.get("model", {}).get("name", "model"), cfg.get("data", {}).get("name", "data"),
                      cfg.get("evaluation", {}).get("tasks"))
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
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
