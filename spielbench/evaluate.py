"""Evaluate a base model or a trained run with lm-eval, offline, and write one result JSON per run.

The benchmarks are the paper's where they can be had offline (docs/METHOD.md §8.5) plus the
multiple-choice tasks whose data the asset rules ship; each is an lm-eval task in
``spielbench/lm_eval_tasks/`` (one folder per task: its YAML holds the prompt and decoding) reading
``<eval_dir>/<file>.jsonl``. The table of tasks (name, lm-eval task, files, headline metric, shots) is
:data:`spielbench.lm_eval_tasks.registry.TASKS`.

``bbh`` and ``tydiqa`` read user-supplied files (``bbh_path``, ``tydiqa_path``); without them they
are skipped with a note in the result. ``humaneval`` runs only with ``allow_code_execution=True``,
which sets lm-eval's ``confirm_run_unsafe_code`` and ``HF_ALLOW_CODE_EVAL=1`` for the duration of
the evaluation and nothing else. ``HF_HUB_OFFLINE=1`` and ``HF_DATASETS_OFFLINE=1`` are set when
this module is imported. The task YAMLs are rendered into a temporary include folder with absolute
data paths (:func:`render_tasks`), and every data file is checked line by line before any model is
loaded: a bad row raises :class:`~spielbench.errors.InputError` naming the file and line.

The result JSON is an :class:`spielbench.records.EvalResult` (fields and meaning there; its JSON schema:
``python -m spielbench.records eval.json``), written atomically after it is checked against that schema;
the held-out loss in it is :func:`spielbench.heldout.heldout_loss`'s. A run that diverged in training
(its ``adapter/`` holds only ``diverged.json``, see ``spielbench.train --record-divergence``) gets a result
with ``status: "diverged"``, every task skipped with a note and no held-out loss: no model is loaded.

Command line::

    python -m spielbench.evaluate (--run DIR | --base MODEL [--adapter DIR]) --tasks a,b \\
        [--limit N | --limit task=N,task=N] --output FILE [--heldout FILE] [--eval-dir DIR] \\
        [--prompt-format plain|chat] [--dtype float32|bfloat16] ...
    python -m spielbench.evaluate --render-tasks DIR [--eval-dir DIR] [--bbh-path P] [--tydiqa-path P]

The second form writes an lm-eval include folder for ``lm_eval --include_path DIR`` (see
:mod:`spielbench.lm_eval_model` for the ``spiel`` model of the lm-eval command line).
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

from spielbench.errors import InputError, exit_status  # noqa: E402
from spielbench.lm_eval_results import subset_indices, summarise_results, task_limits  # noqa: E402
from spielbench.lm_eval_tasks.registry import (TASKS, TASKS_DIR, TaskSpec, _task_names,  # noqa: E402,F401
                                               check_tasks, render_tasks)
from spielbench.records import EvalResult  # noqa: E402
from spielbench.trained import adapter_kind, load_trained  # noqa: E402

FORMAT = "spielbench-eval/1"
PROMPT_FORMATS = ("plain", "chat")
#: Dtypes of the evaluation's matrix products (``evaluate_run(dtype=...)``, ``--dtype``): bfloat16 under autocast.
EVAL_DTYPES = ("float32", "bfloat16")


# --------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _environment(allow_code_execution: bool) -> Iterator[None]:
    """Offline flags always; ``HF_ALLOW_CODE_EVAL=1`` only when code execution is allowed (restored after)."""
    from spielbench.lm_eval_tasks.humaneval.utils import CODE_EVAL_ENV

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
# Evaluation
# --------------------------------------------------------------------------------------------

def _doc_count(spec: TaskSpec, eval_dir: str | os.PathLike) -> int:
    """Number of documents of a single (non-group) task: the rows of its first data file."""
    from spielbench.lm_eval_tasks.rows import load_docs

    file_name, row_format = spec.files[0]
    return len(load_docs(Path(eval_dir) / file_name, row_format))


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
                summary = summarise_results(results, [TASKS[t] for t in single])
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
                summary = summarise_results(results, [TASKS[t] for t in group])
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


def _divergence_of(adapter_dir: Path):
    """The :class:`spielbench.records.Divergence` marker of a diverged run's ``adapter/``, else None.

    Raises:
        InputError: the marker exists but is not a valid record (names the file).
    """
    from spielbench.records import Divergence

    marker = adapter_dir / Divergence.FILE
    return Divergence.read(marker) if marker.is_file() else None


def _write_diverged(run_dir, run_cfg: dict[str, Any], divergence, tasks, output, **settings) -> dict[str, Any]:
    """Write the result of a run that diverged in training: ``status: "diverged"``, every task skipped with
    a note naming the step, no held-out loss (no model is loaded)."""
    from spielbench.records import DIVERGED

    note = f"the run diverged in training (non-finite loss at update step {divergence.step}); nothing evaluated"
    result = {
        "format": FORMAT,
        "run_id": run_cfg.get("run_id") or Path(run_dir).name,
        "method": run_cfg.get("method"),
        "status": DIVERGED,
        "detail": divergence.detail,
        "base_model": str(run_cfg.get("model")),
        "adapter": None,
        **settings,
        "tasks": {t: {"skipped": True, "note": note} for t in _task_names(tasks)},
        "notes": [note],
        "heldout": None,
    }
    EvalResult.write_checked(result, output, ensure_ascii=False)
    return result


def slow_bf16_note(dtype: str, device_type: str = "cpu") -> str | None:
    """A warning when ``dtype`` "bfloat16" autocast would run on a CPU without fast bf16 matrix products.

    oneDNN (``torch.ops.mkldnn._is_mkldnn_bf16_supported``) has fast bf16 kernels only on CPUs with AVX-512
    or newer (e.g. AMD Zen 4, Intel Sapphire Rapids); elsewhere autocast emulates them. Measured on an AMD
    EPYC Zen 3 (AVX2), one thread next to two other jobs: a [256, 576] x [576, 1536] float32 product took
    0.55 s under bf16 autocast against 0.021 s without (26x); a study evaluation's held-out pass there ran
    over 28 minutes instead of the 2 minutes it took on the budget's machine (README, "The study").

    Returns:
        The warning text (names ``evaluation.dtype`` and what to set), or None: another dtype or device,
        a CPU with fast bf16, or a torch build that cannot tell.
    """
    if dtype != "bfloat16" or device_type != "cpu":
        return None
    import torch

    try:
        fast = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return None
    if fast:
        return None
    return ("evaluation.dtype: bfloat16 on a CPU without fast bf16 matrix products (oneDNN has none here); "
            "autocast emulates them, about 26x slower per product than float32 on an AVX2 CPU; "
            "set evaluation.dtype: float32 (spielbench.evaluate --dtype float32) on this machine")


def _precision(model, info: dict[str, Any], dtype: str):
    """The context the evaluation runs in, and a note: ``dtype`` "bfloat16" runs the matrix products
    under ``torch.autocast`` (weights, norms, softmax and the loss stay float32, as autocast keeps them);
    an NF4 base keeps its own compute dtype (the note says so); "float32" changes nothing."""
    import contextlib

    import torch

    if dtype == "float32":
        return contextlib.nullcontext(), None
    if info["quantized"]:
        return contextlib.nullcontext(), f"dtype: {dtype} autocast not applied, the NF4 base keeps {info['dtype']}"
    device_type = next(model.parameters()).device.type
    slow = slow_bf16_note(dtype, device_type)
    if slow:
        print(f"warning: {slow}", file=sys.stderr)
    return torch.autocast(device_type, dtype=getattr(torch, dtype)), None


def _check_numbers(**values) -> None:
    """Raise InputError naming the option (``--heldout-examples``) of a count below its minimum (the run
    config schema's for ``max_seq_length``) or a seed numpy cannot take; None passes."""
    from spielbench.schema import RUN_SCHEMA, schema_at

    minimum = {"heldout_examples": 1, "batch_size": 1, "seed": 0,
               "max_seq_length": schema_at(RUN_SCHEMA, "/$defs/settings")["properties"]["max_seq_length"]["minimum"]}
    for name, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum[name] or value >= 2**32:
            raise InputError(f"{name} (--{name.replace('_', '-')}): expected an integer >= {minimum[name]}, "
                             f"got {value!r}")


def _checked_device(device: str) -> str:
    """``device`` checked against the run config schema's pattern and against the machine (``cpu`` when
    "auto" finds no CUDA); InputError naming ``--device`` otherwise."""
    import re

    from spielbench.preflight import resolve_device
    from spielbench.schema import RUN_SCHEMA, schema_at

    pattern = schema_at(RUN_SCHEMA, "/$defs/settings")["properties"]["device"]["pattern"]
    if not isinstance(device, str) or not re.fullmatch(pattern, device):
        raise InputError(f"device (--device): expected auto, cpu, cuda or cuda:N, got {device!r}")
    try:
        return resolve_device(device)
    except InputError as exc:
        raise InputError(f"{exc} (--device)") from None


def evaluate_run(run_dir: str | os.PathLike | None = None, *, base: str | os.PathLike | None = None,
                 adapter: str | os.PathLike | None = None, method: str | None = None,
                 tasks: list[str] | str, output: str | os.PathLike, eval_dir: str | os.PathLike = "resources/eval",
                 limit: int | dict[str, int | None] | None = None, heldout: str | os.PathLike | None = None,
                 heldout_examples: int | None = None, max_seq_length: int | None = None,
                 prompt_format: str = "plain", seed: int = 1234, batch_size: int = 4,
                 allow_code_execution: bool = False, bbh_path: str | os.PathLike | None = None,
                 tydiqa_path: str | os.PathLike | None = None, device: str = "cpu",
                 dtype: str = "float32") -> dict[str, Any]:
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
        heldout: optional held-out instruction file (:func:`spielbench.heldout.heldout_loss_of_file`).
        heldout_examples, max_seq_length: held-out loss settings (default: the run's, else all / 512).
        device: "cpu" or "cuda[:i]".
        dtype: "float32" or "bfloat16": the tasks and the held-out loss run their matrix products under
            ``torch.autocast`` in this dtype (recorded as ``autocast``; the weights stay as loaded, recorded
            as ``dtype``); an NF4 base keeps its own compute dtype (a note says so).

    Returns:
        The result dict that was written (module docstring).

    Raises:
        InputError: any bad input, before loading the model.
    """
    t0 = time.perf_counter()
    run_cfg: dict[str, Any] = {}
    divergence = None
    if run_dir is not None:
        if adapter is not None:
            raise InputError("adapter: give either a run folder (its adapter is <run>/adapter) or --adapter, not both")
        run_cfg = read_run_config(run_dir)
        base = base or run_cfg["model"]
        adapter = Path(run_dir) / "adapter"
        if not adapter.is_dir():
            raise InputError(f"run: {adapter} not found (the training run saved no adapter)")
        divergence = _divergence_of(adapter)
    if base is None:
        raise InputError("model: give a run folder (--run) or a base model folder (--base)")
    if not (Path(base) / "config.json").is_file():
        raise InputError(f"model: {base} is not a model folder (no config.json)")
    if adapter is not None and divergence is None:
        adapter_kind(adapter)
    check_tasks(tasks, eval_dir, allow_code_execution=allow_code_execution, bbh_path=bbh_path,
                tydiqa_path=tydiqa_path)
    task_limits(limit, _task_names(tasks))
    if prompt_format not in PROMPT_FORMATS:
        raise InputError(f"prompt_format: expected one of {PROMPT_FORMATS}, got {prompt_format!r}")
    if dtype not in EVAL_DTYPES:
        raise InputError(f"dtype: expected one of {EVAL_DTYPES}, got {dtype!r}")
    _check_numbers(heldout_examples=heldout_examples, max_seq_length=max_seq_length, batch_size=batch_size,
                   seed=seed)
    device = _checked_device(device)
    if heldout is not None:
        from spielbench.formats import load_instruction_examples

        load_instruction_examples(heldout)
    if divergence is not None:
        return _write_diverged(run_dir, run_cfg, divergence, tasks, output, limit=limit, seed=seed,
                               prompt_format=prompt_format, batch_size=batch_size)
    msl = int(max_seq_length or run_cfg.get("max_seq_length") or 512)
    hx = heldout_examples if heldout_examples is not None else run_cfg.get("heldout_examples")

    from spielbench.heldout import heldout_loss_of_file

    model, tokenizer, info = load_trained(base, adapter, method=run_cfg.get("method") or method, device=device)
    precision, precision_note = _precision(model, info, dtype)
    t1 = time.perf_counter()
    with precision:
        report = evaluate_model(model, tokenizer, tasks, eval_dir=eval_dir, limit=limit,
                                prompt_format=prompt_format, seed=seed, batch_size=batch_size,
                                allow_code_execution=allow_code_execution, bbh_path=bbh_path,
                                tydiqa_path=tydiqa_path)
        t2 = time.perf_counter()
        held = (heldout_loss_of_file(model, tokenizer, heldout, max_seq_length=msl, max_examples=hx)
                if heldout else None)
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
        "autocast": None if precision_note or dtype == "float32" else dtype,
        "prompt_format": prompt_format,
        "seed": seed,
        "limit": limit,
        "batch_size": batch_size,
        "lm_eval_version": report["lm_eval_version"],
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "tasks": report["tasks"],
        "notes": report["notes"] + ([precision_note] if precision_note else []),
        "heldout": held,
        "seconds": {"load": round(t1 - t0, 3), "evaluate": round(t2 - t1, 3), "heldout": round(t3 - t2, 3)},
    }
    EvalResult.write_checked(result, output, ensure_ascii=False)
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
    ap.add_argument("--dtype", choices=EVAL_DTYPES, default="float32",
                    help="matrix products of the tasks and the held-out loss under autocast in this dtype")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; ``InputError`` -> ``error: <message>`` on stderr, exit status 2."""
    args = _build_parser().parse_args(argv)
    return exit_status(lambda: _run(args))


def _run(args) -> int:
    """The body of :func:`main` for parsed ``args`` (an InputError propagates to :func:`exit_status`)."""
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
        tydiqa_path=args.tydiqa_path, device=args.device, dtype=args.dtype,
    )
    if result.get("status") == "diverged":
        print(f"{result['run_id']}: {result['notes'][0]}")
        return 0
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
