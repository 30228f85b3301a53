"""BoolQ rows (docs/METHOD.md §8.5): ``question``, ``passage``, ``answer`` (bool)."""
from __future__ import annotations

from spielbench.lm_eval_tasks.common import field


def boolq_doc(row: dict) -> dict:
    """BoolQ row -> ``{passage, question, label}`` with label 1 for True (the choices are no/yes).

    Raises:
        RowError: a missing or mistyped field (``answer`` must be a JSON bool).
    """
    return {
        "passage": field(row, "passage", "str"),
        "question": field(row, "question", "str"),
        "label": int(field(row, "answer", "bool")),
    }
