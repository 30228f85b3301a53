"""GSM8K, 8-shot chain of thought with lm-eval's own exemplars, scored on the last number (docs/METHOD.md §8.5).

Rows: ``question``, ``answer`` (a solution ending in ``#### <number>``).
"""
from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from spielbench.lm_eval_tasks.common import RowError, field

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _as_decimal(text: str) -> Decimal | None:
    """``text`` as a Decimal, or None when it is not a number."""
    try:
        return Decimal(text)
    except (InvalidOperation, ValueError):
        return None


def gsm8k_doc(row: dict) -> dict:
    """GSM8K row -> ``{question, solution, target}``; target = the number after ``####`` (commas removed).

    Raises:
        RowError: a missing or mistyped field, no ``####`` marker, or no number after it.
    """
    question = field(row, "question", "str")
    solution = field(row, "answer", "str")
    if "####" not in solution:
        raise RowError("field 'answer' should end with '#### <final number>'")
    target = solution.split("####")[-1].strip().replace(",", "")
    if _as_decimal(target) is None:
        raise RowError(f"final answer after '####' is not a number: {target!r}")
    return {"question": question, "solution": solution, "target": target}


def gsm8k_cot_exemplars() -> list[dict]:
    """The 8 chain-of-thought exemplars of lm-eval's own ``gsm8k-cot`` task, read from the installed package.

    Returns:
        ``[{"question": str, "target": str}, ...]`` (8 items, the harness's order).

    Raises:
        RuntimeError: the installed lm-eval no longer ships them where expected.
    """
    import yaml
    from importlib.resources import files

    path = files("lm_eval") / "tasks" / "gsm8k" / "gsm8k-cot.yaml"
    cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    samples = (cfg.get("fewshot_config") or {}).get("samples")
    if not isinstance(samples, list) or not samples:
        raise RuntimeError(f"{path}: no fewshot_config.samples (lm-eval layout changed)")
    return [{"question": s["question"], "target": s["target"]} for s in samples]


def last_number(text: str) -> str | None:
    """The last number in ``text`` after removing commas (docs/METHOD.md §8.5, GSM8K), or None."""
    found = _NUMBER.findall(text.replace(",", ""))
    return found[-1] if found else None


def gsm8k_process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """Exact match of the last number of the generation against the reference (compared as decimals)."""
    pred = last_number(results[0])
    gold = _as_decimal(doc["target"])
    value = pred is not None and gold is not None and _as_decimal(pred) == gold
    return {"exact_match": float(value)}
