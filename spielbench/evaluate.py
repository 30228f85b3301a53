"""Evaluate a base model or a trained run with lm-eval, offline, and write one result JSON per run.

The benchmarks are the paper's where they can be had offline (docs/METHOD.md §8.5) plus the
multiple-choice tasks whose data the asset rules ship; each is an lm-eval task in
``spielbench/lm_eval_tasks/`` reading ``<eval_dir>/<file>.jsonl``:

=============  =========================  ==========================================  ===========
name           lm-eval task               prompt / decoding                            metric
=============  =========================  ==========================================  ===========
mmlu           spiel_mmlu                 5-shot, the subject's dev exemplars          acc
mmlu_0shot     spiel_mmlu_0shot           0-shot                                       acc
gsm8k          spiel_gsm8k                8-shot CoT (lm-eval's exemplars), greedy     exact_match
arc_challenge  spiel_arc_challenge        0-shot, answer-text log-likelihood           acc
arc_easy       spiel_arc_easy             0-shot, answer-text log-likelihood           acc
hellaswag      spiel_hellaswag            0-shot                                       acc_norm
boolq          spiel_boolq                0-shot, " no" / " yes"                       acc
piqa           spiel_piqa                 0-shot                                       acc
winogrande     spiel_winogrande           0-shot, partial scoring                      acc
humaneval      spiel_humaneval            0-shot, greedy; executes code (opt-in)       pass@1
bbh            spiel_bbh (group)          3-shot CoT, user files; mean over tasks      exact_match
tydiqa         spiel_tydiqa (group)       1-shot GoldP, user file; mean over languages f1
=============  =========================  ==========================================  ===========

``bbh`` and ``tydiqa`` read user-supplied files (``bbh_path``, ``tydiqa_path``); without them they
are skipped with a note in the result. ``humaneval`` runs only with ``allow_code_execution=True``,
which sets lm-eval's ``confirm_run_unsafe_code`` and ``HF_ALLOW_CODE_EVAL=1`` for the duration of
the evaluation and nothing else. ``HF_HUB_OFFLINE=1`` and ``HF_DATASETS_OFFLINE=1`` are set when
this module is imported. The task YAMLs are rendered into a temporary include folder with absolute
data paths (:func:`render_tasks`), and every data file is checked line by line before any model is
loaded: a bad row raises :class:`~spielbench.errors.InputError` naming the file and line.

Result JSON (``format: "spielbench-eval/1"``), written atomically::

    {"format", "run_id", "method", "base_model", "adapter", "adapter_application"
       ("none" | "merged" | "unmerged" | "full-model"), "quantized", "dtype",
     "prompt_format" ("plain" | "chat"), "seed", "limit", "batch_size",
     "lm_eval_version", "transformers_version", "torch_version",
     "tasks": {name: {"lm_eval_task", "metric", "value", "stderr", "n", "n_available", "shots", "limit",
                      "subset": {"kind": "all" | "seeded-random" | "first-of-shuffled", "seed", "of"},
                      "metrics": {metric: {"value", "stderr"}}, "doc_ids": [int], "item_scores": [float],
                      "subtasks": {...} (groups only)}
               | {"skipped": true, "note": str}},
     "notes": [str], "heldout": {"loss", "n_examples", "n_tokens", "file", "max_seq_length",
                                 "example_nll": [float], "example_tokens": [int]} | null,
     "seconds": {"load", "evaluate", "heldout"}}

``value`` is a fraction in [0, 1]; ``stderr`` is lm-eval's standard error of the mean (null when
lm-eval reports none); ``n`` is the number of items scored (after ``limit``; per subtask for groups,
summed). ``doc_ids``/``item_scores`` give the headline metric per item (lm-eval doc ids; mean =
``value``) for paired comparisons. ``heldout.loss`` is the token-mean cross-entropy (nats per
response token) of :func:`heldout_loss`; ``example_nll``/``example_tokens`` are each example's
summed NLL (nats) and label-token count (``loss = Σ example_nll / Σ example_tokens``).

Command line::

    python -m spielbench.evaluate (--run DIR | --base MODEL [--adapter DIR]) --tasks a,b \\
        [--limit N | --limit task=N,task=N] --output FILE [--heldout FILE] [--eval-dir DIR] [--prompt-format plain|chat] ...
    python -m spielbench.evaluate --render-tasks DIR [--eval-dir DIR] [--bbh-path P] [--tydiqa-path P]

The second form writes an lm-eval include folder for ``lm_eval --include_path DIR`` (see
:mod:`spielbench.lm_eval_model` for the ``spiel`` model of the lm-eval command line).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

from spielbench.errors import InputError  # noqa: E402
from spielbench.fsio import write_text_atomic  # noqa: E402
from spielbench.lm_eval_tasks.registry import (TASKS, TASKS_DIR, TaskSpec, _task_names,  # noqa: E402,F401
                                               check_tasks, render_tasks)

FORMAT = "spielbench-eval/1"
PROMPT_FORMATS = ("plain", "chat")


# --------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _environment(allow_code_execution: bool) -> Iterator[None]:
    """Offline flags always; ``HF_ALLOW_CODE_EVAL=1`` only when code execution is allowed (restored after)."""
    from spielbench.lm_eval_tasks.utils import CODE_EVAL_ENV

    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", CODE_EVAL_ENV)}
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    if allow_code_execution:
        os.environ[CODE_EVAL_ENV] = "1"
    else:
        os.environ.pop(CODE_EVAL_ENV, None)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# --------------------------------------------------------------------------------------------
# Model loading
# --------------------------------------------------------------------------------------------

def adapter_kind(adapter_dir: str | os.PathLike) -> str:
    """What a saved adapter folder holds: ``"spiel"``, ``"peft"`` or ``"full"`` (a whole model folder).

    Raises:
        InputError: the folder is missing, or holds neither ``adapter_config.json`` nor ``config.json``,
            or its ``adapter_config.json`` is not a JSON object with ``peft_type``.
    """
    d = Path(adapter_dir)
    if not d.is_dir():
        raise InputError(f"adapter: {d} is not a folder (expected a saved adapter or model folder)")
    cfg = d / "adapter_config.json"
    if cfg.is_file():
        try:
            data = json.loads(cfg.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"{cfg}: not valid JSON ({exc})") from None
        from spiel.adapter_io import is_spiel_adapter

        if is_spiel_adapter(d):
            return "spiel"
        if not isinstance(data, dict) or "peft_type" not in data:
            raise InputError(f"{cfg}: expected a JSON object with 'peft_type' or 'spiel_format_version' "
                             "(a peft or SpIEL adapter config)")
        return "peft"
    if (d / "config.json").is_file():
        return "full"
    raise InputError(f"adapter: {d} holds neither adapter_config.json (an adapter) nor config.json (a model)")


def _recorded_quantization(adapter_dir: Path) -> str | None:
    """``base_model_quantization`` recorded in a SpIEL adapter's config (None for a version-1 adapter)."""
    from spiel.config import SpielConfig

    try:
        return SpielConfig.from_pretrained(adapter_dir).base_model_quantization
    except (FileNotFoundError, ValueError) as exc:
        raise InputError(f"adapter: {exc}") from None


def _method_of(adapter_dir: Path, method: str | None) -> str | None:
    if method:
        return method
    marker = adapter_dir / "method.json"
    if marker.is_file():
        with contextlib.suppress(OSError, json.JSONDecodeError, AttributeError):
            return json.loads(marker.read_text(encoding="utf-8")).get("method")
    return None


def load_for_eval(base: str | os.PathLike, adapter: str | os.PathLike | None = None, *,
                  method: str | None = None, quantized: bool | None = None,
                  device: str = "cpu") -> tuple[Any, Any, dict[str, Any]]:
    """Load a model ready for evaluation: the base, with the run's adapter applied.

    SpIEL adapters (docs/METHOD.md §7) and peft adapters are merged into a float32 base
    (``SpielModel.from_pretrained(...).merge_and_unload()`` / ``PeftModel.from_pretrained(...)
    .merge_and_unload()``); for 4-bit methods (``qspiel-*``, ``qlora``) the base is loaded in NF4
    (``baselines.quant.load_nf4_model``) and the adapter stays unmerged, as merging into 4-bit weights
    is lossy (the reference passes ``--no_merge_peft`` in 4-bit mode, §8.5). A ``full`` folder is
    loaded as the model itself.

    Args:
        base: local base model folder (``save_pretrained`` layout with a tokenizer).
        adapter: saved adapter folder, or None for the base model.
        method: method name (``spielbench.methods.METHODS``); read from ``<adapter>/method.json`` when
            None. Decides whether the base is 4-bit; without one, a SpIEL adapter's recorded
            ``base_model_quantization`` decides.
        quantized: force (True/False) the 4-bit decision instead of taking it from the method.
        device: "cpu" or "cuda[:i]".

    Returns:
        ``(model, tokenizer, info)``: a transformers ``PreTrainedModel`` in eval mode (for unmerged
        adapters, the base model holding the adapter layers), its tokenizer, and ``{"method",
        "adapter", "adapter_kind", "adapter_application", "quantized", "dtype"}``.

    Raises:
        InputError: missing base folder, unusable adapter folder, unknown method, or a method/``quantized``
            that contradicts the base a SpIEL adapter records.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = Path(base)
    if not (base_dir / "config.json").is_file():
        raise InputError(f"model: {base_dir} is not a model folder (no config.json)")
    kind = adapter_kind(adapter) if adapter is not None else None
    method = _method_of(Path(adapter), method) if adapter is not None else method
    recorded = _recorded_quantization(Path(adapter)) if kind == "spiel" else None
    forced = quantized is not None
    if quantized is None:
        quantized = False
        if method:
            from spielbench.methods import get_method

            quantized = get_method(method).quantized
        elif recorded is not None:
            quantized = recorded != "none"  # the adapter's own record decides (docs/METHOD.md §7)
    if recorded is not None and bool(quantized) != (recorded != "none"):
        asked = f"quantized={quantized}" if forced else f"method {method!r}"
        raise InputError(f"adapter: {Path(adapter) / 'adapter_config.json'} records a base_model_quantization="
                         f"{recorded!r} base, but {asked} asks for {'an NF4' if quantized else 'a dense'} base")
    info: dict[str, Any] = {"method": method, "adapter": str(adapter) if adapter is not None else None,
                            "adapter_kind": kind, "quantized": bool(quantized)}
    tok_dir = Path(adapter) if kind == "full" and (Path(adapter) / "tokenizer_config.json").is_file() else base_dir
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))

    if kind == "full":
        model = AutoModelForCausalLM.from_pretrained(str(adapter), dtype=torch.float32).to(device)
        info.update(adapter_application="full-model", dtype="float32")
    else:
        if quantized:
            from baselines.quant import load_nf4_model, nf4_compute_dtype

            model = load_nf4_model(base_dir, device)
            info["dtype"] = f"nf4/{str(nf4_compute_dtype(device)).replace('torch.', '')}"
        else:
            model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).to(device)
            info["dtype"] = "float32"
        if kind is None:
            info["adapter_application"] = "none"
        elif kind == "spiel":
            from spiel.model import SpielModel

            try:
                wrapped = SpielModel.from_pretrained(model, adapter)
            except (FileNotFoundError, ValueError) as exc:
                raise InputError(f"adapter: {exc}") from None
            if quantized:
                model = wrapped.get_base_model()
                info["adapter_application"] = "unmerged"
            else:
                model = wrapped.merge_and_unload()
                info["adapter_application"] = "merged"
        else:
            from peft import PeftModel

            wrapped = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
            if quantized:
                model = wrapped.get_base_model()
                info["adapter_application"] = "unmerged"
            else:
                model = wrapped.merge_and_unload()
                info["adapter_application"] = "merged"
    model.eval()
    return model, tokenizer, info


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------

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


def summarise_results(results: dict, runnable: list[str]) -> dict[str, dict]:
    """Per suite task: headline metric, value, stderr, n, and all metrics, from lm-eval's results dict.

    With per-item records in ``results["samples"]`` (``log_samples=True``), single tasks also get
    ``doc_ids`` and ``item_scores`` (the headline metric per item; their mean is ``value``), for
    paired comparisons between runs evaluated on the same items. Groups (macro averages) get them
    per subtask.
    """
    out = {}
    samples = results.get("samples") or {}
    subtasks_of = results.get("group_subtasks", {})
    for name in runnable:
        spec = TASKS[name]
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


def _doc_count(spec: TaskSpec, eval_dir: str | os.PathLike) -> int:
    """Number of documents of a single (non-group) task: the rows of its first data file."""
    from spielbench.lm_eval_tasks import utils

    file_name, row_format = spec.files[0]
    return len(utils.load_docs(Path(eval_dir) / file_name, row_format))


def evaluate_model(model, tokenizer, tasks: list[str] | str, *, eval_dir: str | os.PathLike,
                   limit: int | dict[str, int | None] | None = None, prompt_format: str = "plain",
                   seed: int = 1234, batch_size: int = 4, allow_code_execution: bool = False,
                   bbh_path: str | os.PathLike | None = None, tydiqa_path: str | os.PathLike | None = None,
                   max_length: int | None = None, return_samples: bool = False) -> dict[str, Any]:
    """Evaluate an in-memory model on suite tasks with lm-eval (``HFLM(pretrained=model)`` + ``simple_evaluate``).

    Args:
        model: a transformers causal LM (``PreTrainedModel``, or a model holding adapter layers).
        tokenizer: its tokenizer.
        tasks: suite task names (:data:`TASKS`), a list or comma-separated string.
        eval_dir: folder of the asset JSONL files.
        limit: items per task (per subtask for the ``bbh``/``tydiqa`` groups): an int for every task,
            or ``{task: int | None}`` (tasks not named: all items); None = all. A limit takes a
            seeded random subset of the items (:func:`subset_indices` with ``seed``, passed to
            lm-eval as ``samples``; the scored doc ids are in the result), never the first N; for the
            groups, whose loaders shuffle rows with a fixed seed, lm-eval's per-subtask limit.
        prompt_format: "plain" (the paper's prompts) or "chat" (lm-eval applies the tokenizer's chat
            template, the whole prompt as one user turn).
        seed: lm-eval's Python/numpy/torch/few-shot seeds, and the seed of the item subsets.
        batch_size: lm-eval batch size (requests per forward pass).
        allow_code_execution: allow tasks that execute model-written code (``humaneval``).
        bbh_path, tydiqa_path: optional user data; tasks without their data are skipped with a note.
        max_length: context length for lm-eval (None: from the model config).
        return_samples: also return lm-eval's per-item records (prompt, response, score) under
            ``"samples"``: ``{lm-eval task name: [record, ...]}``.

    Returns:
        ``{"tasks": {name: entry}, "notes": [str], "lm_eval_version": str}`` (plus ``"samples"``) with
        entries as in the module docstring (skipped tasks: ``{"skipped": True, "note": str}``).

    Raises:
        InputError: bad task list, data file or option (before any evaluation work).
    """
    if prompt_format not in PROMPT_FORMATS:
        raise InputError(f"prompt_format: expected one of {PROMPT_FORMATS}, got {prompt_format!r}")
    runnable, skipped = check_tasks(tasks, eval_dir, allow_code_execution=allow_code_execution,
                                    bbh_path=bbh_path, tydiqa_path=tydiqa_path)
    limits = task_limits(limit, runnable + list(skipped))
    from importlib.metadata import version

    report: dict[str, Any] = {"tasks": {}, "notes": [], "lm_eval_version": version("lm_eval")}
    if prompt_format == "chat" and not getattr(tokenizer, "chat_template", None):
        raise InputError("prompt_format: 'chat' needs a tokenizer with a chat template; this one has none")
    if runnable:
        with _environment(allow_code_execution), tempfile.TemporaryDirectory(prefix="spiel-lm-eval-") as tmp:
            render_tasks(tmp, eval_dir, bbh_path=bbh_path if "bbh" in runnable else None,
                         tydiqa_path=tydiqa_path if "tydiqa" in runnable else None)
            from lm_eval import simple_evaluate
            from lm_eval.models.huggingface import HFLM
            from lm_eval.tasks import TaskManager

            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
            manager = TaskManager(include_path=tmp, include_defaults=False)
            common = dict(task_manager=manager, apply_chat_template=prompt_format == "chat",
                          random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                          fewshot_random_seed=seed, confirm_run_unsafe_code=allow_code_execution, log_samples=True)
            # single tasks: one call, each limited task on a seeded random subset of its items (lm-eval's
            # `samples`; its `limit` would take the first N in file order)
            single = [t for t in runnable if TASKS[t].source is None]
            if single:
                subsets = {t: subset_indices(_doc_count(TASKS[t], eval_dir), limits[t], seed, t) for t in single}
                chosen = {TASKS[t].lm_eval_task: ids for t, ids in subsets.items() if ids is not None}
                results = simple_evaluate(model=lm, tasks=[TASKS[t].lm_eval_task for t in single],
                                          samples=chosen or None, **common)
                summary = summarise_results(results, single)
                for t in single:
                    summary[t]["limit"] = limits[t]
                    summary[t]["subset"] = ({"kind": "seeded-random", "seed": seed, "of": summary[t]["n_available"]}
                                            if subsets[t] is not None else {"kind": "all"})
                report["tasks"].update(summary)
                if return_samples:
                    report.setdefault("samples", {}).update(results.get("samples", {}))
            # groups (user-supplied BBH / TyDiQA): their loaders shuffle the rows with a fixed seed, so
            # lm-eval's per-subtask limit takes a random subset; one call per distinct limit
            groups = [t for t in runnable if TASKS[t].source is not None]
            for value in dict.fromkeys(limits[t] for t in groups):
                group = [t for t in groups if limits[t] == value]
                results = simple_evaluate(model=lm, tasks=[TASKS[t].lm_eval_task for t in group], limit=value,
                                          **common)
                summary = summarise_results(results, group)
                for t in group:
                    summary[t]["limit"] = value
                    summary[t]["subset"] = {"kind": "first-of-shuffled" if value is not None else "all", "seed": None}
                report["tasks"].update(summary)
                if return_samples:
                    report.setdefault("samples", {}).update(results.get("samples", {}))
    for name, note in skipped.items():
        report["tasks"][name] = {"skipped": True, "note": note}
        report["notes"].append(f"{name}: skipped: {note}")
    report["tasks"] = {t: report["tasks"][t] for t in _task_names(tasks)}
    return report


# --------------------------------------------------------------------------------------------
# Held-out loss
# --------------------------------------------------------------------------------------------

def heldout_loss(model, tokenizer, path: str | os.PathLike, *, max_seq_length: int = 512,
                 max_examples: int | None = None, batch_size: int = 8) -> dict[str, Any]:
    """Token-mean cross-entropy on the response tokens of a held-out instruction file.

    Examples are encoded exactly as for training (``spielbench.data.load_instruction_dataset``: the
    chat template, labels on assistant tokens only, truncation to ``max_seq_length``); the loss is
    the sum of the negative log-likelihoods (nats) of all label tokens divided by their number (one
    mean over the whole file, not a mean of per-batch means). Examples are batched by length (longest
    first) so that little compute goes to padding; per-example values come back in file order.

    Args:
        model: causal LM; tokenizer: its fast tokenizer with a chat template.
        path: Alpaca JSON / Tülu JSONL / Flan JSONL file.
        max_seq_length: truncation length in tokens.
        max_examples: use only the first this many examples.
        batch_size: examples per forward pass.

    Returns:
        ``{"loss": float (nats/token), "n_examples": int, "n_tokens": int (label tokens), "file": str,
        "max_seq_length": int, "example_nll": [float] (summed nats per example), "example_tokens": [int]}``.

    Raises:
        InputError: missing or malformed file, or no example with a response token.
    """
    import torch

    from spielbench.data import PaddingCollator, load_instruction_dataset, pad_token_id_of

    data = load_instruction_dataset(path, tokenizer, max_seq_length, max_examples=max_examples,
                                    field_name="heldout_data")
    collate = PaddingCollator(pad_token_id=pad_token_id_of(tokenizer))
    device = next(model.parameters()).device
    # batches of similar length (longest first), so that padding costs little; results in file order
    order = sorted(range(len(data)), key=lambda i: -len(data[i]["input_ids"]))
    example_nll: list[float] = [0.0] * len(data)
    example_tokens: list[int] = [0] * len(data)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = collate([data[i] for i in idx])
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device)).logits.float()
            labels = batch["labels"][:, 1:].to(device)
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].transpose(1, 2), labels, ignore_index=-100, reduction="none")  # [B, L-1]
            for i, v, t in zip(idx, nll.sum(dim=1).tolist(), (labels != -100).sum(dim=1).tolist()):
                example_nll[i], example_tokens[i] = v, int(t)
    model.train(was_training)
    total, count = math.fsum(example_nll), int(sum(example_tokens))
    return {"loss": total / count if count else float("nan"), "n_examples": len(data), "n_tokens": count,
            "file": str(path), "max_seq_length": max_seq_length,
            "example_nll": example_nll, "example_tokens": [int(t) for t in example_tokens]}


# --------------------------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------------------------

def read_run_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """``<run_dir>/run_config.json`` as a dict, checked for ``method`` and ``model``.

    Accepts the file ``spielbench.train`` writes (the run's fields under ``"config"``) and a flat
    mapping of run-config fields.

    Raises:
        InputError: missing/unreadable file, or ``method``/``model`` missing or not strings.
    """
    path = Path(run_dir) / "run_config.json"
    if not path.is_file():
        raise InputError(f"run: {path} not found (expected a training output folder with run_config.json)")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise InputError(f"{path}: expected a JSON object")
    if isinstance(cfg.get("config"), dict):
        # spielbench.train writes {"config": <RunConfig fields>, "resolved": {...}}
        cfg = cfg["config"]
    for key in ("method", "model"):
        if not isinstance(cfg.get(key), str) or not cfg[key]:
            raise InputError(f"{path}: field '{key}' missing or not a string")
    return cfg


def evaluate_run(run_dir: str | os.PathLike | None = None, *, base: str | os.PathLike | None = None,
                 adapter: str | os.PathLike | None = None, method: str | None = None,
                 tasks: list[str] | str, output: str | os.PathLike, eval_dir: str | os.PathLike = "resources/eval",
                 limit: int | dict[str, int | None] | None = None, heldout: str | os.PathLike | None = None,
                 heldout_examples: int | None = None, max_seq_length: int | None = None,
                 prompt_format: str = "plain", seed: int = 1234, batch_size: int = 4,
                 allow_code_execution: bool = False, bbh_path: str | os.PathLike | None = None,
                 tydiqa_path: str | os.PathLike | None = None, device: str = "cpu") -> dict[str, Any]:
    """Evaluate one trained run (or a base model) and write its result JSON atomically.

    With ``run_dir``: the base model and method come from ``<run_dir>/run_config.json`` (``model``,
    ``method``; ``base`` overrides the model path), the adapter is ``<run_dir>/adapter``, and
    ``max_seq_length``/``heldout_examples`` default to the run's. Without it: ``base`` (and
    optionally ``adapter``) are evaluated directly. Everything the user gave is checked (run config,
    tasks, every data line, held-out file) before the model is loaded.

    Args:
        run_dir: training output folder, or None.
        base: base model folder (required without ``run_dir``).
        adapter: adapter folder (without ``run_dir`` only).
        method: the adapter's method (without ``run_dir``; default ``<adapter>/method.json``).
        tasks: suite task names; output: the result JSON path.
        eval_dir, limit, prompt_format, seed, batch_size, allow_code_execution, bbh_path, tydiqa_path:
            as :func:`evaluate_model`.
        heldout: optional held-out instruction file for :func:`heldout_loss`.
        heldout_examples, max_seq_length: held-out loss settings (default: the run's, else all / 512).
        device: "cpu" or "cuda[:i]".

    Returns:
        The result dict that was written (module docstring).

    Raises:
        InputError: any bad input, before loading the model.
    """
    t0 = time.perf_counter()
    run_cfg: dict[str, Any] = {}
    if run_dir is not None:
        if adapter is not None:
            raise InputError("adapter: give either a run folder (its adapter is <run>/adapter) or --adapter, not both")
        run_cfg = read_run_config(run_dir)
        base = base or run_cfg["model"]
        adapter = Path(run_dir) / "adapter"
        if not adapter.is_dir():
            raise InputError(f"run: {adapter} not found (the training run saved no adapter)")
    if base is None:
        raise InputError("model: give a run folder (--run) or a base model folder (--base)")
    if not (Path(base) / "config.json").is_file():
        raise InputError(f"model: {base} is not a model folder (no config.json)")
    if adapter is not None:
        adapter_kind(adapter)
    check_tasks(tasks, eval_dir, allow_code_execution=allow_code_execution, bbh_path=bbh_path,
                tydiqa_path=tydiqa_path)
    task_limits(limit, _task_names(tasks))
    if prompt_format not in PROMPT_FORMATS:
        raise InputError(f"prompt_format: expected one of {PROMPT_FORMATS}, got {prompt_format!r}")
    if heldout is not None:
        from spielbench.formats import load_instruction_examples

        load_instruction_examples(heldout)
    msl = int(max_seq_length or run_cfg.get("max_seq_length") or 512)
    hx = heldout_examples if heldout_examples is not None else run_cfg.get("heldout_examples")

    model, tokenizer, info = load_for_eval(base, adapter, method=run_cfg.get("method") or method, device=device)
    t1 = time.perf_counter()
    report = evaluate_model(model, tokenizer, tasks, eval_dir=eval_dir, limit=limit, prompt_format=prompt_format,
                            seed=seed, batch_size=batch_size, allow_code_execution=allow_code_execution,
                            bbh_path=bbh_path, tydiqa_path=tydiqa_path)
    t2 = time.perf_counter()
    held = heldout_loss(model, tokenizer, heldout, max_seq_length=msl, max_examples=hx) if heldout else None
    t3 = time.perf_counter()

    import torch
    import transformers

    result = {
        "format": FORMAT,
        "run_id": run_cfg.get("run_id") or (Path(run_dir).name if run_dir is not None else "base"),
        "method": info["method"] or ("base" if adapter is None else None),
        "base_model": str(base),
        "adapter": info["adapter"],
        "adapter_application": info["adapter_application"],
        "quantized": info["quantized"],
        "dtype": info["dtype"],
        "prompt_format": prompt_format,
        "seed": seed,
        "limit": limit,
        "batch_size": batch_size,
        "lm_eval_version": report["lm_eval_version"],
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "tasks": report["tasks"],
        "notes": report["notes"],
        "heldout": held,
        "seconds": {"load": round(t1 - t0, 3), "evaluate": round(t2 - t1, 3), "heldout": round(t3 - t2, 3)},
    }
    write_text_atomic(Path(output), json.dumps(result, indent=2, ensure_ascii=False, allow_nan=True) + "\n")
    return result


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def _parse_limit(text: str) -> int | dict[str, int]:
    """``"60"`` -> 60; ``"arc_easy=100,gsm8k=20"`` -> ``{"arc_easy": 100, "gsm8k": 20}``."""
    import argparse

    try:
        if "=" not in text:
            return int(text)
        return {k.strip(): int(v) for k, v in (item.split("=", 1) for item in text.split(",") if item.strip())}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or task=N,task=N, got {text!r}") from None


def _build_parser():
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m spielbench.evaluate",
        description="Evaluate a trained run or a base model with lm-eval, offline, and write one result JSON.")
    ap.add_argument("--run", help="training output folder (run_config.json + adapter/)")
    ap.add_argument("--base", help="base model folder (with --run: overrides the run's model path)")
    ap.add_argument("--adapter", help="without --run: adapter folder (SpIEL, peft, or a full model folder)")
    ap.add_argument("--method", help="without --run: the adapter's method name (decides a 4-bit base); "
                                     "default: <adapter>/method.json")
    ap.add_argument("--render-tasks", metavar="DIR",
                    help="only write an lm-eval include folder with absolute data paths, then exit")
    ap.add_argument("--tasks", default="arc_easy", help=f"comma-separated, from: {', '.join(TASKS)}")
    ap.add_argument("--limit", type=_parse_limit, default=None,
                    help="items per task (per subtask for bbh/tydiqa): N for every task, or task=N,task=N")
    ap.add_argument("--output", help="result JSON path")
    ap.add_argument("--eval-dir", default="resources/eval", help="folder of the evaluation JSONL files")
    ap.add_argument("--heldout", help="held-out instruction file for the held-out loss")
    ap.add_argument("--heldout-examples", type=int, default=None)
    ap.add_argument("--max-seq-length", type=int, default=None)
    ap.add_argument("--prompt-format", choices=PROMPT_FORMATS, default="plain")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--allow-code-execution", action="store_true",
                    help="allow humaneval, which executes model-written code in a subprocess")
    ap.add_argument("--bbh-path")
    ap.add_argument("--tydiqa-path")
    ap.add_argument("--device", default="cpu")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; ``InputError`` -> ``error: <message>`` on stderr, exit status 2."""
    import sys

    args = _build_parser().parse_args(argv)
    try:
        if args.render_tasks:
            info = render_tasks(args.render_tasks, args.eval_dir, args.bbh_path, args.tydiqa_path)
            print(json.dumps(info, indent=2))
            return 0
        if not args.run and not args.base:
            raise InputError("--run / --base: give a training output folder or a base model folder")
        if not args.output:
            raise InputError("--output: the result JSON path is required")
        if args.run and (args.adapter or args.method):
            raise InputError("--adapter/--method: with --run they come from the run (<run>/adapter, run_config.json)")
        result = evaluate_run(
            args.run, base=args.base, adapter=args.adapter, method=args.method, tasks=args.tasks,
            output=args.output, eval_dir=args.eval_dir, limit=args.limit, heldout=args.heldout,
            heldout_examples=args.heldout_examples, max_seq_length=args.max_seq_length,
            prompt_format=args.prompt_format, seed=args.seed, batch_size=args.batch_size,
            allow_code_execution=args.allow_code_execution, bbh_path=args.bbh_path,
            tydiqa_path=args.tydiqa_path, device=args.device,
        )
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name, entry in result["tasks"].items():
        if entry.get("skipped"):
            print(f"{name}: skipped ({entry['note']})")
        else:
            se = f" ± {entry['stderr']:.3f}" if entry.get("stderr") is not None else ""
            print(f"{name}: {entry['metric']} = {entry['value']:.4f}{se} (n={entry['n']})")
    if result["heldout"]:
        print(f"held-out loss: {result['heldout']['loss']:.4f} over {result['heldout']['n_tokens']} tokens")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
