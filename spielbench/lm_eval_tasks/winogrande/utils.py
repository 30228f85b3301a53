"""WinoGrande rows (docs/METHOD.md §8.5): ``sentence`` (one ``_`` blank), ``option1``, ``option2``, ``answer``."""
from __future__ import annotations

from spielbench.lm_eval_tasks.common import RowError, field


def winogrande_doc(row: dict) -> dict:
    """WinoGrande row -> ``{contexts: [prefix+option1, prefix+option2], continuation, gold}`` (partial scoring).

    The sentence is cut at its ``_`` blank: each option fills the blank to form one context, and the
    rest of the sentence (after the blank, stripped) is the continuation scored after each context.

    Raises:
        RowError: a missing or mistyped field, a sentence without exactly one blank, or an
            ``answer`` other than "1" or "2".
    """
    sentence = field(row, "sentence", "str")
    if sentence.count("_") != 1:
        raise RowError(f"field 'sentence' should hold exactly one '_' blank, found {sentence.count('_')}")
    answer = field(row, "answer", "str")
    if answer not in ("1", "2"):
        raise RowError(f"field 'answer' should be \"1\" or \"2\", got {answer!r}")
    cut = sentence.index("_")
    options = [field(row, "option1", "str"), field(row, "option2", "str")]
    return {"contexts": [sentence[:cut] + o for o in options], "continuation": sentence[cut + 1:].strip(),
            "gold": int(answer) - 1}
