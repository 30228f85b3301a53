"""Formatting shared by the tables and the claims: display names, numbers as text, LaTeX escaping.

Method names come from the registry (:func:`spielbench.methods.method_label`); task names from
:data:`TASK_LABELS` here.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING


if TYPE_CHECKING:
    from spielbench.aggregate.loading import Score

#: Short task names for column headers.
TASK_LABELS = {
    "mmlu": "MMLU", "mmlu_0shot": "MMLU 0-shot", "gsm8k": "GSM8K", "bbh": "BBH", "tydiqa": "TyDiQA",
    "humaneval": "HumanEval", "arc_easy": "ARC-E", "arc_challenge": "ARC-C", "hellaswag": "HellaSwag",
    "boolq": "BoolQ", "piqa": "PIQA", "winogrande": "WinoGrande",
}


def task_label(task: str) -> str:
    """Display name of an evaluation task (the task name itself when it has none)."""
    return TASK_LABELS.get(task, task)


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


def tex_escape(text: str) -> str:
    """``text`` with LaTeX's special characters escaped and ±, —, ÷, ≥ as math or dashes."""
    repl = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
            "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
    text = "".join(repl.get(c, c) for c in str(text))
    return text.replace("±", r"$\pm$").replace("—", "--").replace("÷", r"$\div$").replace("≥", r"$\geq$")
