"""HellaSwag rows (docs/METHOD.md §8.5): ``activity_label``, ``ctx_a``, ``ctx_b``, ``endings``, ``label``."""
from __future__ import annotations

import re

from spielbench.lm_eval_tasks.common import RowError, field


def _clean(text: str) -> str:
    """WikiHow/ActivityNet artefacts out: ``[title]`` becomes a sentence break, other ``[tags]`` go."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[[^\]]*\]", "", text)
    return text.replace("  ", " ")


def hellaswag_doc(row: dict) -> dict:
    """HellaSwag row -> ``{query, choices, gold}`` (context = activity label + ctx_a + Ctx_b, cleaned).

    Raises:
        RowError: a missing or mistyped field, or a ``label`` (int or digit string) out of range.
    """
    label = field(row, "activity_label", "str")
    ctx_a = field(row, "ctx_a", "str")
    ctx_b = field(row, "ctx_b", "str")
    endings = field(row, "endings", "list[str]")
    raw_gold = row.get("label")
    if isinstance(raw_gold, str) and raw_gold.strip().isdigit():
        gold = int(raw_gold)
    elif isinstance(raw_gold, int) and not isinstance(raw_gold, bool):
        gold = raw_gold
    else:
        raise RowError(f"field 'label' should be an ending index (int or digit string), got {raw_gold!r}")
    if not 0 <= gold < len(endings):
        raise RowError(f"label {gold} out of range for {len(endings)} endings")
    ctx = ctx_a + " " + ctx_b.capitalize()
    return {
        "query": _clean(label + ": " + ctx),
        "choices": [_clean(e) for e in endings],
        "gold": gold,
    }
