"""lm-eval's results as the suite's task entries, and which items a task scores under an item limit.

:func:`summarise_results` turns ``lm_eval.simple_evaluate``'s results dict into the ``tasks`` entries of
``eval.json`` (headline metric, standard error, item counts, per-item scores for paired comparisons);
:func:`task_limits` and :func:`subset_indices` decide the items: a seeded random subset per task, the
same for every model, never the first N of the file.
"""
from __future__ import annotations

import random
from typing import Any

from spielbench.errors import InputError


def _metric_entries(row: dict) -> dict[str, dict[str, float | None]]:
    """lm-eval's ``{"acc,none": v, "acc_stderr,none": s, ...}`` -> ``{"acc": {"value", "stderr"}}``."""
    out: dict[str, dict[str, float | None]] = {}
    for key, value in row.items():
        if "," not in key or "_stderr," in key:
            continue
        metric, _filter = key.split(",", 1)
        stderr = row.get(f"{metric}_stderr,{_filter}")
        out[metric] = {
            "value": float(value) if isinstance(value, (int, float)) else None,
            "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
        }
    return out


def _n_items(results: dict, task: str) -> tuple[int, int]:
    n = results.get("n-samples", {}).get(task, {})
    return int(n.get("effective", 0)), int(n.get("original", 0))


def _item_scores(records: list[dict], metric: str) -> tuple[list[int], list[float]] | None:
    """``(doc_ids, per-item values of metric)`` from lm-eval's per-item records, in doc-id order."""
    pairs = sorted((int(r["doc_id"]), float(r[metric])) for r in records if isinstance(r.get(metric), (int, float)))
    if not pairs or len(pairs) != len(records):
        return None
    return [p[0] for p in pairs], [p[1] for p in pairs]


def summarise_results(results: dict, specs: list) -> dict[str, dict]:
    """Per suite task: headline metric, value, stderr, n, and all metrics, from lm-eval's results dict.

    ``specs`` are the evaluated tasks' ``TaskSpec`` entries (``name``, ``lm_eval_task``, ``metric``,
    ``shots``; :data:`spielbench.evaluate.TASKS`); the result is keyed by their ``name``.

    With per-item records in ``results["samples"]`` (``log_samples=True``), single tasks also get
    ``doc_ids`` and ``item_scores`` (the headline metric per item; their mean is ``value``), for
    paired comparisons between runs evaluated on the same items. Groups (macro averages) get them
    per subtask.
    """
    out = {}
    samples = results.get("samples") or {}
    subtasks_of = results.get("group_subtasks", {})
    for spec in specs:
        name = spec.name
        row = results["results"][spec.lm_eval_task]
        metrics = _metric_entries(row)
        entry: dict[str, Any] = {"lm_eval_task": spec.lm_eval_task, "metric": spec.metric,
                                 "shots": spec.shots}
        head = metrics.get(spec.metric, {"value": None, "stderr": None})
        entry.update(value=head["value"], stderr=head["stderr"])
        subtasks = subtasks_of.get(spec.lm_eval_task)
        if subtasks:
            subs = {}
            for sub in subtasks:
                n, n_all = _n_items(results, sub)
                sub_metrics = _metric_entries(results["results"][sub])
                sub_head = sub_metrics.get(spec.metric, {"value": None, "stderr": None})
                subs[sub] = {"value": sub_head["value"], "stderr": sub_head["stderr"], "n": n,
                             "n_available": n_all, "metrics": sub_metrics}
                items = _item_scores(samples.get(sub, []), spec.metric)
                if items:
                    subs[sub]["doc_ids"], subs[sub]["item_scores"] = items
            entry["n"] = sum(s["n"] for s in subs.values())
            entry["n_available"] = sum(s["n_available"] for s in subs.values())
            entry["subtasks"] = subs
        else:
            entry["n"], entry["n_available"] = _n_items(results, spec.lm_eval_task)
            items = _item_scores(samples.get(spec.lm_eval_task, []), spec.metric)
            if items:
                entry["doc_ids"], entry["item_scores"] = items
        entry["metrics"] = metrics
        out[name] = entry
    return out


def task_limits(limit: int | dict[str, int | None] | None, tasks: list[str]) -> dict[str, int | None]:
    """The item limit of each task from an int (every task), a ``{task: int | None}`` mapping, or None.

    Raises:
        InputError: a limit that is not a positive integer or null, or a mapping naming a task that is
            not among ``tasks``.
    """
    def checked(value: Any, where: str) -> int | None:
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise InputError(f"{where}: expected a positive integer or null, got {value!r}")
        return value

    if isinstance(limit, dict):
        unknown = sorted(set(limit) - set(tasks))
        if unknown:
            raise InputError(f"limit: {unknown} are not among the evaluated tasks {tasks}")
        return {t: checked(limit.get(t), f"limit.{t}") for t in tasks}
    value = checked(limit, "limit")
    return {t: value for t in tasks}


def subset_indices(n_items: int, limit: int | None, seed: int, task: str) -> list[int] | None:
    """The items of a task to score under an item limit: a seeded random subset, never the first N.

    The subset depends only on ``(seed, task, n_items, limit)``, so every model evaluated with the
    same settings is scored on the same items (paired comparisons), and a larger limit does not
    simply extend a smaller one from the top of the file.

    Args:
        n_items: number of items (documents) the task has.
        limit: items to score, or None for all.
        seed: the evaluation seed; task: the suite task name (keys the generator).

    Returns:
        Sorted 0-based item indices (lm-eval doc ids), or None when every item is scored
        (``limit`` is None or at least ``n_items``).
    """
    if limit is None or limit >= n_items:
        return None
    return sorted(random.Random(f"{seed}/{task}").sample(range(n_items), limit))
