"""The suite's task table, the rendering of an lm-eval include folder, and the data check before evaluation.

:data:`TASKS` names every benchmark of the suite (docs/METHOD.md §8.5), the lm-eval task of its
folder here, the data files it reads with their row formats (:data:`.rows.ROW_FORMATS`), its
headline metric and shots. :func:`render_tasks` writes the folder tree of this package's YAMLs with
absolute data paths (plus the generated BBH / TyDiQA tasks) for ``TaskManager(include_path=...)``;
:func:`check_tasks` reads every line of the requested tasks' data before any model is loaded.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spielbench.errors import InputError
from spielbench.lm_eval_tasks.bbh.utils import bbh_docs, discover_bbh
from spielbench.lm_eval_tasks.common import EVAL_DIR_MARKER
from spielbench.lm_eval_tasks.rows import load_docs
from spielbench.lm_eval_tasks.tydiqa.utils import discover_tydiqa, tydiqa_docs

#: The package folder: the task folders, the shared template, the modules the YAMLs name.
TASKS_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class TaskSpec:
    """One benchmark of the suite.

    Attributes:
        name: the name in configs and result JSONs.
        lm_eval_task: the lm-eval task (or group) name in the rendered include folder.
        files: ``(file name under eval_dir, row format)`` pairs the task reads.
        metric: the headline metric.
        shots: few-shot exemplars per prompt (recorded in the result).
        source: ``"bbh"``/``"tydiqa"`` for user-supplied data, else None (asset files).
        executes_code: scoring runs model-written code (needs ``allow_code_execution``).
    """

    name: str
    lm_eval_task: str
    files: tuple[tuple[str, str], ...]
    metric: str
    shots: int
    source: str | None = None
    executes_code: bool = False


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec("mmlu", "spiel_mmlu", (("mmlu_test.jsonl", "mmlu"), ("mmlu_dev.jsonl", "mmlu")), "acc", 5),
        TaskSpec("mmlu_0shot", "spiel_mmlu_0shot", (("mmlu_test.jsonl", "mmlu"),), "acc", 0),
        TaskSpec("gsm8k", "spiel_gsm8k", (("gsm8k_test.jsonl", "gsm8k"),), "exact_match", 8),
        TaskSpec("arc_challenge", "spiel_arc_challenge", (("arc_challenge_test.jsonl", "arc"),), "acc", 0),
        TaskSpec("arc_easy", "spiel_arc_easy", (("arc_easy_test.jsonl", "arc"),), "acc", 0),
        TaskSpec("hellaswag", "spiel_hellaswag", (("hellaswag_val.jsonl", "hellaswag"),), "acc_norm", 0),
        TaskSpec("boolq", "spiel_boolq", (("boolq_val.jsonl", "boolq"),), "acc", 0),
        TaskSpec("piqa", "spiel_piqa", (("piqa_val.jsonl", "piqa"),), "acc", 0),
        TaskSpec("winogrande", "spiel_winogrande", (("winogrande_val.jsonl", "winogrande"),), "acc", 0),
        TaskSpec("humaneval", "spiel_humaneval", (("humaneval_test.jsonl", "humaneval"),), "pass@1", 0,
                 executes_code=True),
        TaskSpec("bbh", "spiel_bbh", (), "exact_match", 3, source="bbh"),
        TaskSpec("tydiqa", "spiel_tydiqa", (), "f1", 1, source="tydiqa"),
    )
}

#: Where BBH / TyDiQA come from when the user gives them (for skip notes).
_SOURCE_HELP = {
    "bbh": "no BBH data given (set evaluation.bbh_path / --bbh-path to a folder of BBH task files "
           "<task>.json, optionally with the official cot-prompts/<task>.txt)",
    "tydiqa": "no TyDiQA GoldP data given (set evaluation.tydiqa_path / --tydiqa-path to the GoldP dev "
              "file, SQuAD JSON or JSONL, or a folder with *dev* and *train* files)",
}


def _yaml_quoted(text: str) -> str:
    """``text`` escaped for the inside of a YAML double-quoted scalar (JSON escapes are valid there)."""
    return json.dumps(text, ensure_ascii=False)[1:-1]


def _safe_task_suffix(name: str) -> str:
    """``name`` as the tail of an lm-eval task name: lower case, runs of other characters as ``_``."""
    return re.sub(r"[^a-z0-9_]+", "_", name.lower()).strip("_") or "task"


def render_tasks(out_dir: str | os.PathLike, eval_dir: str | os.PathLike,
                 bbh_path: str | os.PathLike | None = None,
                 tydiqa_path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Write an lm-eval include folder: the suite's task YAMLs with absolute data paths.

    Every ``*.yaml`` / ``_*_yaml`` file under :data:`TASKS_DIR` is copied to the same place in the
    folder tree under ``out_dir`` (so that relative ``include`` paths resolve) with ``@EVAL_DIR@``
    replaced by the absolute ``eval_dir``. With ``bbh_path``, one task per BBH task file
    (``bbh/spiel_bbh_<task>.yaml``) and the group ``spiel_bbh`` (unweighted mean over tasks) are
    generated next to the BBH template; with ``tydiqa_path``, one task per language
    (``tydiqa/spiel_tydiqa_<language>.yaml``) and the group ``spiel_tydiqa`` (unweighted mean over
    languages).

    Args:
        out_dir: the include folder (created; existing files of the same names are overwritten).
        eval_dir: folder of the asset JSONL files (need not exist for rendering).
        bbh_path: optional BBH folder (see :func:`.bbh.utils.discover_bbh`).
        tydiqa_path: optional TyDiQA GoldP file or folder (see :func:`.tydiqa.utils.discover_tydiqa`).

    Returns:
        ``{"include_path": str, "bbh_tasks": [names], "tydiqa_languages": [names]}``.

    Raises:
        InputError: unusable BBH / TyDiQA paths.
    """
    import yaml

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    eval_abs = _yaml_quoted(str(Path(eval_dir).expanduser().resolve()))
    for src in sorted(TASKS_DIR.rglob("*")):
        if src.is_file() and (src.suffix == ".yaml" or src.name.endswith("_yaml")):
            dest = out / src.relative_to(TASKS_DIR)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(src.read_text(encoding="utf-8").replace(EVAL_DIR_MARKER, eval_abs),
                            encoding="utf-8")
    info: dict[str, Any] = {"include_path": str(out.resolve()), "bbh_tasks": [], "tydiqa_languages": []}

    def write_yaml(folder: str, name: str, cfg: dict) -> None:
        (out / folder / f"{name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")

    def write_group(folder: str, group: str, subtasks: list[str], metrics: list[str]) -> None:
        write_yaml(folder, group, {
            "group": group, "task": subtasks,
            "aggregate_metric_list": [{"metric": m, "aggregation": "mean", "weight_by_size": False}
                                      for m in metrics],
            "metadata": {"version": 1.0}})

    if bbh_path:
        names = []
        for task, files in discover_bbh(bbh_path).items():
            name = f"spiel_bbh_{_safe_task_suffix(task)}"
            write_yaml("bbh", name, {"include": "_spiel_bbh_template_yaml", "task": name,
                                     "dataset_kwargs": {"data_file": files["data_file"], "task": task,
                                                        "prompt_file": files["prompt_file"], "shuffle_seed": 42}})
            names.append(name)
        write_group("bbh", "spiel_bbh", names, ["exact_match"])
        info["bbh_tasks"] = names
    if tydiqa_path:
        found = discover_tydiqa(tydiqa_path)
        names = []
        for lang in found["languages"]:
            name = f"spiel_tydiqa_{_safe_task_suffix(lang)}"
            write_yaml("tydiqa", name, {"include": "_spiel_tydiqa_template_yaml", "task": name,
                                        "dataset_kwargs": {"dev_file": found["dev_file"],
                                                           "train_file": found["train_file"], "language": lang,
                                                           "max_passage_words": 1024, "shuffle_seed": 42}})
            names.append(name)
        write_group("tydiqa", "spiel_tydiqa", names, ["exact_match", "f1"])
        info["tydiqa_languages"] = found["languages"]
    return info


def _task_names(tasks: list[str] | tuple[str, ...] | str) -> list[str]:
    """Task names from a list or a comma-separated string, stripped, empty entries dropped."""
    names = tasks.split(",") if isinstance(tasks, str) else [str(t) for t in tasks]
    return [t.strip() for t in names if t.strip()]


def check_tasks(tasks: list[str] | tuple[str, ...] | str, eval_dir: str | os.PathLike, *,
                allow_code_execution: bool = False, bbh_path: str | os.PathLike | None = None,
                tydiqa_path: str | os.PathLike | None = None) -> tuple[list[str], dict[str, str]]:
    """Check the requested tasks and every line of their data, before any model is loaded.

    Args:
        tasks: task names (a list, or a comma-separated string).
        eval_dir: folder of the asset JSONL files.
        allow_code_execution: whether tasks that execute model-written code may run.
        bbh_path, tydiqa_path: optional user data for ``bbh`` / ``tydiqa``.

    Returns:
        ``(runnable task names in request order, {skipped task: note})``.

    Raises:
        InputError: unknown or repeated task, ``humaneval`` without ``allow_code_execution``, a
            missing data file, or a malformed row (the message names the file and line).
    """
    names = _task_names(tasks)
    if not names:
        raise InputError("tasks: no task given; known tasks: " + ", ".join(TASKS))
    runnable, skipped = [], {}
    for name in names:
        if name not in TASKS:
            raise InputError(f"tasks: unknown task {name!r}; known tasks: {', '.join(TASKS)}")
        if name in runnable or name in skipped:
            raise InputError(f"tasks: {name!r} is listed twice")
        spec = TASKS[name]
        if spec.executes_code and not allow_code_execution:
            raise InputError(
                f"tasks: {name!r} executes model-written code to score it; enable it explicitly with "
                "evaluation.allow_code_execution: true (command line: --allow-code-execution)"
            )
        if spec.source == "bbh":
            if not bbh_path:
                skipped[name] = _SOURCE_HELP["bbh"]
                continue
            for task, files in discover_bbh(bbh_path).items():
                bbh_docs(files["data_file"], task, files["prompt_file"])
        elif spec.source == "tydiqa":
            if not tydiqa_path:
                skipped[name] = _SOURCE_HELP["tydiqa"]
                continue
            found = discover_tydiqa(tydiqa_path)
            for lang in found["languages"]:
                tydiqa_docs(found["dev_file"], lang, found["train_file"])
        for file_name, row_format in spec.files:
            load_docs(Path(eval_dir) / file_name, row_format)
        runnable.append(name)
    return runnable, skipped
