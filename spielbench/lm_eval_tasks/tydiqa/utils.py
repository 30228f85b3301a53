"""TyDiQA GoldP from a user-supplied file, one lm-eval task per language (docs/METHOD.md §8.5).

Files: SQuAD-format JSON or JSONL rows with ``id``, ``context``, ``question``, ``answers``
(``{"text": [...]}``, a list of strings, or a list of ``{"text": ...}``) and optionally ``language``
(else the ``id`` prefix before the first ``-``, as TyDiQA ids are). :func:`discover_tydiqa` finds
them, :func:`load_tydiqa` is the ``custom_dataset`` of the generated ``spiel_tydiqa_<language>``
YAMLs (written by :func:`spielbench.lm_eval_tasks.registry.render_tasks` next to
``_spiel_tydiqa_template_yaml``); scoring is SQuAD exact match and token F1.
"""
from __future__ import annotations

import os
import re
import string
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Any

from spielbench.errors import InputError
from spielbench.lm_eval_tasks.common import RowError, as_dataset, field, read_json_list, read_rows, shuffled

TYDIQA_INSTRUCTION = "Answer the following question based on the information in the given passage."


def _tydiqa_answers(value: Any) -> list[str]:
    """The answer strings of one question, from any of the accepted ``answers`` shapes."""
    if isinstance(value, dict) and isinstance(value.get("text"), list):
        out = value["text"]
    elif isinstance(value, list):
        out = [a["text"] if isinstance(a, dict) else a for a in value]
    else:
        raise RowError("field 'answers' should be {text: [...]}, a list of strings or a list of {text: ...}")
    if not out or not all(isinstance(a, str) for a in out):
        raise RowError("field 'answers' should hold at least one answer string")
    return out


def _tydiqa_row(row: dict) -> dict:
    """One question -> ``{id, language, context, question, answers}`` (language lower-cased)."""
    rid = str(row.get("id", ""))
    language = row.get("language") or (rid.split("-", 1)[0] if "-" in rid else "")
    if not isinstance(language, str) or not language:
        raise RowError("no 'language' field and the 'id' has no '<language>-' prefix")
    return {
        "id": rid,
        "language": language.lower(),
        "context": field(row, "context", "str"),
        "question": field(row, "question", "str"),
        "answers": _tydiqa_answers(row.get("answers")),
    }


def read_tydiqa(path: str | os.PathLike) -> list[dict]:
    """Read a TyDiQA GoldP file (SQuAD JSON or JSONL rows) into ``{id, language, context, question, answers}``.

    Raises:
        InputError: unreadable file or malformed entry, naming the file and line / entry.
    """
    p = Path(path)
    if p.suffix == ".jsonl":
        return read_rows(p, _tydiqa_row, "TyDiQA")
    data = read_json_list(p, "data", "SQuAD-format JSON with a 'data' list (or a .jsonl file)")
    out = []
    for i, article in enumerate(data):
        for j, para in enumerate(article.get("paragraphs", []) if isinstance(article, dict) else []):
            for k, qa in enumerate(para.get("qas", []) if isinstance(para, dict) else []):
                try:
                    out.append(_tydiqa_row({**qa, "context": para.get("context")}))
                except (RowError, AttributeError, TypeError) as exc:
                    raise InputError(f"{p}: data[{i}].paragraphs[{j}].qas[{k}]: {exc}") from None
    if not out:
        raise InputError(f"{p}: no questions found under data[].paragraphs[].qas[]")
    return out


def discover_tydiqa(tydiqa_path: str | os.PathLike) -> dict[str, Any]:
    """Locate the TyDiQA GoldP evaluation file and, optionally, a train file for the 1-shot exemplars.

    ``tydiqa_path`` is a file (the dev set; exemplars are then taken from it, never the item itself)
    or a folder holding one ``*dev*.json[l]`` and optionally one ``*train*.json[l]``.

    Returns:
        ``{"dev_file": str, "train_file": str | None, "languages": [sorted language names]}``.

    Raises:
        InputError: missing path, ambiguous folder, or a malformed file.
    """
    p = Path(tydiqa_path).expanduser().resolve()
    if p.is_dir():
        def pick(tag: str) -> Path | None:
            found = sorted(f for f in p.iterdir() if tag in f.name and f.suffix in (".json", ".jsonl"))
            if len(found) > 1:
                raise InputError(f"evaluation.tydiqa_path: {p} holds several *{tag}* files: {[f.name for f in found]}")
            return found[0] if found else None

        dev, train = pick("dev"), pick("train")
        if dev is None:
            raise InputError(f"evaluation.tydiqa_path: {p} holds no *dev*.json / *dev*.jsonl file")
    elif p.is_file():
        dev, train = p, None
    else:
        raise InputError(f"evaluation.tydiqa_path: {p} does not exist (expected a TyDiQA GoldP file or folder)")
    languages = sorted({r["language"] for r in read_tydiqa(dev)})
    return {"dev_file": str(dev), "train_file": str(train) if train else None, "languages": languages}


def tydiqa_block(doc: dict, max_passage_words: int) -> str:
    """``"Passage: ..\\nQuestion: ..\\nAnswer:"`` with the passage cut to ``max_passage_words`` words."""
    words = doc["context"].split()
    passage = " ".join(words[:max_passage_words]) if len(words) > max_passage_words else doc["context"]
    return f"Passage: {passage}\nQuestion: {doc['question']}\nAnswer:"


def tydiqa_docs(dev_file: str, language: str, train_file: str | None = None,
                max_passage_words: int = 1024) -> list[dict]:
    """The 1-shot GoldP documents of one language: ``{id, language, context, question, answers, prompt}``.

    The prompt is :data:`TYDIQA_INSTRUCTION`, one exemplar (passage, question, its first answer) and
    the item's passage and question, each passage cut to ``max_passage_words`` words. The exemplar is
    the first train item of the language, or, with no train file, the first other dev item of it.

    Raises:
        InputError: no question in ``language``, or no exemplar available for it.
    """
    dev = [d for d in read_tydiqa(dev_file) if d["language"] == language]
    if not dev:
        raise InputError(f"{dev_file}: no questions in language '{language}'")
    pool = [d for d in read_tydiqa(train_file) if d["language"] == language] if train_file else dev
    docs = []
    for d in dev:
        shot = next((e for e in pool if train_file or e is not d), None)
        if shot is None:
            raise InputError(f"{train_file or dev_file}: no 1-shot exemplar for language '{language}' "
                             "(give a train file, or at least two dev questions per language)")
        prompt = (TYDIQA_INSTRUCTION + "\n\n" + tydiqa_block(shot, max_passage_words) + f" {shot['answers'][0]}\n\n"
                  + tydiqa_block(d, max_passage_words))
        docs.append({**d, "prompt": prompt})
    return docs


def load_tydiqa(dev_file: str, language: str, train_file: str | None = None,
                max_passage_words: int = 1024, shuffle_seed: int | None = None, **_: Any):
    """``custom_dataset`` for one TyDiQA GoldP language (:func:`tydiqa_docs`), shuffled with ``shuffle_seed``."""
    return as_dataset(shuffled(tydiqa_docs(dev_file, language, train_file, max_passage_words), shuffle_seed))


def _squad_normalise(text: str) -> str:
    """SQuAD answer normalisation: lower case, punctuation and articles removed, whitespace collapsed."""
    text = "".join(ch for ch in text.lower()
                   if ch not in string.punctuation and not unicodedata.category(ch).startswith("P"))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def squad_scores(prediction: str, answers: list[str]) -> tuple[float, float]:
    """SQuAD exact match and token F1 of ``prediction`` against the best-matching answer, in [0, 1]."""
    pred = _squad_normalise(prediction)
    em = max(float(pred == _squad_normalise(a)) for a in answers)
    f1 = 0.0
    ptoks = pred.split()
    for a in answers:
        gtoks = _squad_normalise(a).split()
        common = sum((Counter(ptoks) & Counter(gtoks)).values())
        if common:
            prec, rec = common / len(ptoks), common / len(gtoks)
            f1 = max(f1, 2 * prec * rec / (prec + rec))
    return em, f1


def tydiqa_process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """SQuAD exact match and F1 of the generation against ``doc["answers"]``."""
    em, f1 = squad_scores(results[0].strip(), list(doc["answers"]))
    return {"exact_match": em, "f1": f1}
