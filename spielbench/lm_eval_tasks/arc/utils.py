"""ARC-Easy and ARC-Challenge rows (docs/METHOD.md §8.5): one normaliser for both, as they share a format.

Accepted rows: the ARC dataset's fields (``question``, ``choices: {text: [...], label: [...]}``,
``answerKey``) or the OLMES document fields (``choices: [...]``, ``gold: int``, and ``question`` or
``query`` = ``"Question: ...\\nAnswer:"``).
"""
from __future__ import annotations

from spielbench.lm_eval_tasks.common import RowError, field


def arc_doc(row: dict) -> dict:
    """ARC row (dataset or OLMES fields) -> ``{id, question, choices: list[str], gold: int}``.

    Raises:
        RowError: a missing or mistyped field, an ``answerKey`` not among the labels, fewer than two
            choices, or a gold index out of range.
    """
    if "gold" in row:
        if "question" in row:
            question = field(row, "question", "str")
        else:
            question = field(row, "query", "str")
            if question.startswith("Question:"):
                question = question[len("Question:"):]
            if question.rstrip().endswith("Answer:"):
                question = question.rstrip()[: -len("Answer:")]
        choices = field(row, "choices", "list[str]")
        gold = field(row, "gold", "int")
    else:
        question = field(row, "question", "str")
        ch = field(row, "choices", "dict")
        choices = field(ch, "text", "list[str]")
        labels = field(ch, "label", "list[str]")
        key = field(row, "answerKey", "str")
        if len(labels) != len(choices):
            raise RowError(f"choices.label has {len(labels)} entries but choices.text has {len(choices)}")
        if key not in labels:
            raise RowError(f"answerKey {key!r} is not one of choices.label {labels}")
        gold = labels.index(key)
    if len(choices) < 2:
        raise RowError(f"expected at least 2 choices, got {len(choices)}")
    if not 0 <= gold < len(choices):
        raise RowError(f"gold index {gold} out of range for {len(choices)} choices")
    return {"id": str(row.get("id", "")), "question": question.strip(), "choices": choices, "gold": gold}
