"""BIG-Bench Hard from user-supplied files, one lm-eval task per BBH task (docs/METHOD.md §8.5).

Files: the official ``{"examples": [{"input", "target"}, ...]}`` JSON or JSONL rows of ``input``,
``target``; optionally the official ``cot-prompts/<task>.txt``. :func:`discover_bbh` finds them,
:func:`load_bbh` is the ``custom_dataset`` of the generated ``spiel_bbh_<task>`` YAMLs (written by
:func:`spielbench.lm_eval_tasks.registry.render_tasks` next to ``_spiel_bbh_template_yaml``).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from spielbench.errors import InputError
from spielbench.lm_eval_tasks.common import RowError, as_dataset, field, read_json_list, read_rows, shuffled

_BBH_ANSWER = re.compile(r"[tT]he answer is (.*?)\.")


def bbh_doc(row: dict) -> dict:
    """BBH example -> ``{input, target}``.

    Raises:
        RowError: a missing or non-string field.
    """
    return {"input": field(row, "input", "str"), "target": field(row, "target", "str")}


def _read_bbh_examples(path: Path) -> list[dict]:
    """The checked examples of one BBH task file (official JSON or JSONL rows)."""
    if path.suffix == ".jsonl":
        return read_rows(path, bbh_doc, "bbh")
    examples = read_json_list(path, "examples", "a JSON object with an 'examples' list (the BBH task format)")
    docs = []
    for i, row in enumerate(examples):
        try:
            if not isinstance(row, dict):
                raise RowError("expected an object")
            docs.append(bbh_doc(row))
        except RowError as exc:
            raise InputError(f"{path}: examples[{i}]: {exc}") from None
    if not docs:
        raise InputError(f"{path}: 'examples' is empty")
    return docs


def discover_bbh(bbh_path: str | os.PathLike) -> dict[str, dict[str, str | None]]:
    """Find BBH task files in a user folder.

    Layout accepted: ``<dir>/<task>.json`` or ``<dir>/bbh/<task>.json`` (official ``{"examples":
    [...]}``) or ``<task>.jsonl`` rows, and optionally the official ``cot-prompts/<task>.txt``.

    Returns:
        ``{task_name: {"data_file": abs path, "prompt_file": abs path or None}}``, sorted by name.

    Raises:
        InputError: the folder is missing or holds no task files.
    """
    root = Path(bbh_path).expanduser().resolve()
    if not root.is_dir():
        raise InputError(f"evaluation.bbh_path: {root} is not a folder (expected BBH task files <task>.json)")
    data_dir = root / "bbh" if (root / "bbh").is_dir() else root
    files = sorted(p for p in data_dir.iterdir() if p.suffix in (".json", ".jsonl") and p.is_file())
    if not files:
        raise InputError(f"evaluation.bbh_path: {data_dir} holds no <task>.json / <task>.jsonl files")
    prompt_dir = root / "cot-prompts"
    tasks = {}
    for f in files:
        prompt = prompt_dir / f"{f.stem}.txt"
        tasks[f.stem] = {"data_file": str(f), "prompt_file": str(prompt) if prompt.is_file() else None}
    return tasks


def bbh_cot_prompt(task: str, prompt_file: str | None = None) -> str:
    """The 3-shot chain-of-thought prompt of a BBH task.

    From the official ``cot-prompts/<task>.txt`` when given (the text after the ``-----`` line), else
    rebuilt from lm-eval's bundled ``bbh/cot_fewshot/<task>.yaml`` (description + 3 exemplars as
    ``"Q: ...\\nA: Let's think step by step.\\n<reasoning>"``).

    Raises:
        InputError: no prompt for ``task`` in either place.
    """
    if prompt_file:
        text = Path(prompt_file).read_text(encoding="utf-8")
        if "-----" in text:
            text = text.split("-----", 1)[1]
        return text.strip()
    import yaml
    from importlib.resources import files

    path = files("lm_eval") / "tasks" / "bbh" / "cot_fewshot" / f"{task}.yaml"
    if not path.is_file():
        raise InputError(
            f"BBH task '{task}': no cot-prompts/{task}.txt in the BBH folder and lm-eval ships no "
            "3-shot CoT prompt of that name"
        )
    cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    shots = cfg["fewshot_config"]["samples"]
    body = "\n\n".join(f"Q: {s['input']}\nA: Let's think step by step.\n{s['target']}" for s in shots)
    return (cfg.get("description") or "") + body


def bbh_docs(data_file: str, task: str, prompt_file: str | None = None) -> list[dict]:
    """One BBH task's documents ``{input, target, prompt}``; prompt = 3-shot CoT prompt + ``"\\n\\nQ: {input}\\nA:"`` (§8.5).

    Raises:
        InputError: unreadable task file, malformed example, or no prompt for ``task``.
    """
    prefix = bbh_cot_prompt(task, prompt_file)
    return [{**d, "prompt": f"{prefix}\n\nQ: {d['input']}\nA:"} for d in _read_bbh_examples(Path(data_file))]


def load_bbh(data_file: str, task: str, prompt_file: str | None = None,
             shuffle_seed: int | None = None, **_: Any):
    """``custom_dataset`` for one BBH task (:func:`bbh_docs`), shuffled with ``shuffle_seed``."""
    return as_dataset(shuffled(bbh_docs(data_file, task, prompt_file), shuffle_seed))


def bbh_extract(text: str) -> str:
    """The answer in a BBH generation: ``[tT]he answer is (.*?)\\.`` if present, else the whole output (§8.5)."""
    m = _BBH_ANSWER.search(text)
    return (m.group(1) if m else text).strip()


def bbh_process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """Exact match of the extracted answer against ``doc["target"]``."""
    return {"exact_match": float(bbh_extract(results[0]) == doc["target"].strip())}
