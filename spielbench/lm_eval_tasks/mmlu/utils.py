"""MMLU as one task over all subjects, 0- or k-shot with each subject's own dev exemplars (docs/METHOD.md §8.5).

Rows: ``question``, ``subject``, ``choices`` (4 strings), ``answer`` (0-3 or "A"-"D"). The prompt
(subject header, exemplars with their answers, the question) is built per document by
:func:`load_mmlu`, the ``custom_dataset`` of ``spiel_mmlu`` and ``spiel_mmlu_0shot``.
"""
from __future__ import annotations

from typing import Any

from spielbench.errors import InputError
from spielbench.lm_eval_tasks.common import RowError, as_dataset, field, read_rows, shuffled

#: Letters of the four MMLU options, in order.
LETTERS = ("A", "B", "C", "D")


def mmlu_doc(row: dict) -> dict:
    """MMLU row -> ``{subject, question, choices, answer: int}``.

    Raises:
        RowError: a missing or mistyped field, not 4 choices, or an answer outside 0-3 / A-D.
    """
    subject = field(row, "subject", "str")
    question = field(row, "question", "str")
    choices = field(row, "choices", "list[str]")
    if len(choices) != 4:
        raise RowError(f"field 'choices' should hold 4 options, got {len(choices)}")
    ans = row.get("answer")
    if isinstance(ans, int) and not isinstance(ans, bool) and 0 <= ans < 4:
        answer = ans
    elif isinstance(ans, str) and ans.strip() in LETTERS:
        answer = LETTERS.index(ans.strip())
    else:
        raise RowError(f"field 'answer' should be 0-3 or one of A-D, got {ans!r}")
    return {"subject": subject, "question": question, "choices": choices, "answer": answer}


def mmlu_question_block(doc: dict) -> str:
    """``"<question>\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:"`` (docs/METHOD.md §8.5, MMLU)."""
    lines = [doc["question"]] + [f"{letter}. {choice}" for letter, choice in zip(LETTERS, doc["choices"])]
    return "\n".join(lines) + "\nAnswer:"


def mmlu_prompt(doc: dict, exemplars: list[dict]) -> str:
    """The k-shot MMLU prompt of docs/METHOD.md §8.5: subject header, exemplars with answers, the question."""
    subject = doc["subject"].replace("_", " ")
    header = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
    shots = "".join(f"{mmlu_question_block(ex)} {LETTERS[ex['answer']]}\n\n" for ex in exemplars)
    return header + shots + mmlu_question_block(doc)


def load_mmlu(test_file: str, dev_file: str | None = None, num_shots: int = 0,
              shuffle_seed: int | None = None, **_: Any):
    """``custom_dataset`` for MMLU: one task over all subjects, each prompt carrying its subject's exemplars.

    The first ``num_shots`` dev rows of the question's own subject are the exemplars (the standard
    5 per subject). Test rows are shuffled with ``shuffle_seed`` so that an item limit samples
    across subjects rather than taking the first subject's questions.

    Raises:
        InputError: bad rows, or a test subject with fewer than ``num_shots`` dev exemplars.
    """
    test = read_rows(test_file, mmlu_doc, "mmlu")
    by_subject: dict[str, list[dict]] = {}
    if num_shots > 0:
        if not dev_file:
            raise InputError("mmlu: num_shots > 0 needs dev_file (the dev exemplars, mmlu_dev.jsonl)")
        for ex in read_rows(dev_file, mmlu_doc, "mmlu"):
            by_subject.setdefault(ex["subject"], []).append(ex)
    docs = []
    for doc in test:
        shots = by_subject.get(doc["subject"], [])[:num_shots]
        if len(shots) < num_shots:
            raise InputError(
                f"{dev_file}: subject '{doc['subject']}' has {len(shots)} dev exemplars, {num_shots} needed"
            )
        docs.append({**doc, "prompt": mmlu_prompt(doc, shots)})
    return as_dataset(shuffled(docs, shuffle_seed))
