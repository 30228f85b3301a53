"""PIQA rows (docs/METHOD.md §8.5): ``goal``, ``sol1``, ``sol2``, ``label`` (0 = ``sol1``)."""
from __future__ import annotations

from spielbench.lm_eval_tasks.common import RowError, field


def piqa_doc(row: dict) -> dict:
    """PIQA row -> ``{goal, choices: [sol1, sol2], gold}``.

    Raises:
        RowError: a missing or mistyped field, or a ``label`` other than 0 or 1.
    """
    label = field(row, "label", "int")
    if label not in (0, 1):
        raise RowError(f"field 'label' should be 0 or 1, got {label}")
    return {"goal": field(row, "goal", "str"), "choices": [field(row, "sol1", "str"), field(row, "sol2", "str")],
            "gold": label}
