"""HumanEval pass@1: model-written code runs in :mod:`spielbench.sandbox`, only on explicit opt-in (docs/METHOD.md §8.5).

Rows: ``task_id``, ``prompt``, ``test``, ``entry_point``.
"""
from __future__ import annotations

import logging
import os
from typing import Any

from spielbench.lm_eval_tasks.common import as_dataset, field, read_rows

#: Environment variable that must be "1" for HumanEval to execute generated code.
CODE_EVAL_ENV = "HF_ALLOW_CODE_EVAL"

#: Sets of missing sandbox protections already warned about (one warning per set and process).
_WARNED_SANDBOX: set[tuple[str, ...]] = set()


def humaneval_doc(row: dict) -> dict:
    """HumanEval row -> ``{task_id, prompt, test, entry_point}``.

    Raises:
        RowError: a missing or non-string field.
    """
    return {
        "task_id": field(row, "task_id", "str"),
        "prompt": field(row, "prompt", "str"),
        "test": field(row, "test", "str"),
        "entry_point": field(row, "entry_point", "str"),
    }


def load_humaneval(data_file: str, timeout_s: float = 3.0, **_: Any):
    """``custom_dataset`` for HumanEval; ``timeout_s`` (seconds per program) is stored on each doc."""
    docs = [{**d, "timeout_s": float(timeout_s)} for d in read_rows(data_file, humaneval_doc, "humaneval")]
    return as_dataset(docs)


def humaneval_process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """pass@1 of one greedy completion: run prompt + completion + the problem's tests in the sandbox.

    The program (``prompt + completion + "\\n" + test + "\\n" + f"check({entry_point})"``, as in
    OpenAI's harness) runs in :func:`spielbench.sandbox.run_program` with a wall-clock timeout of
    ``doc["timeout_s"]`` seconds; it passes when it runs to its end. The first time a protection
    the OS does not allow is missing, a warning names it.

    Raises:
        RuntimeError: ``HF_ALLOW_CODE_EVAL`` is not "1" (the pipeline sets it only when
            ``allow_code_execution`` is true).
    """
    if os.environ.get(CODE_EVAL_ENV) != "1":
        raise RuntimeError(
            "humaneval executes model-written code; it runs only with allow_code_execution=True "
            f"({CODE_EVAL_ENV}=1)"
        )
    from spielbench.sandbox import missing_protections, run_program

    program = f"{doc['prompt']}{results[0]}\n{doc['test']}\ncheck({doc['entry_point']})\n"
    outcome = run_program(program, timeout_s=float(doc["timeout_s"]))
    missing = tuple(missing_protections(outcome.protections))
    if missing and missing not in _WARNED_SANDBOX:
        _WARNED_SANDBOX.add(missing)
        logging.getLogger(__name__).warning(
            "humaneval sandbox: not active on this OS: %s (protections: %s)", ", ".join(missing),
            outcome.protections)
    return {"pass@1": float(outcome.passed)}
