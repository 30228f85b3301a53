"""Data loading, prompt building and scoring for the suite's lm-eval tasks (docs/METHOD.md §8.5).

The task YAMLs in this folder name these functions with ``!function
spielbench.lm_eval_tasks.utils.<name>``: ``custom_dataset`` loaders read the local JSONL files
written by the asset rules (``resources/eval/<task>.jsonl``, one object per line with the source
dataset's own fields) or the user's BBH / TyDiQA files, check every row, and return a
``datasets.DatasetDict`` with a single ``test`` split of normalised documents; ``process_results``
functions score generations.

Every row is checked before lm-eval sees it: a bad file raises
:class:`spielbench.errors.InputError` whose message starts with ``<file>:<line>:`` and says what
was expected. :func:`load_docs` is the same check, callable without lm-eval.

Row formats accepted (``row_format`` names):

- ``arc``: either the ARC dataset's fields (``question``, ``choices: {text: [...], label: [...]}``,
  ``answerKey``) or the OLMES document fields (``choices: [...]``, ``gold: int``, and ``question``
  or ``query`` = ``"Question: ...\\nAnswer:"``).
- ``hellaswag``: ``activity_label``, ``ctx_a``, ``ctx_b``, ``endings`` (4 strings), ``label``.
- ``boolq``: ``question``, ``passage``, ``answer`` (bool).
- ``piqa``: ``goal``, ``sol1``, ``sol2``, ``label`` (0 = ``sol1``).
- ``winogrande``: ``sentence`` (one ``_`` blank), ``option1``, ``option2``, ``answer`` ("1" or "2").
- ``mmlu``: ``question``, ``subject``, ``choices`` (4 strings), ``answer`` (0-3 or "A"-"D").
- ``gsm8k``: ``question``, ``answer`` (solution ending in ``#### <number>``).
- ``humaneval``: ``task_id``, ``prompt``, ``test``, ``entry_point``.
- BBH (user files): ``input``, ``target`` (official ``{"examples": [...]}`` JSON or JSONL rows).
- TyDiQA GoldP (user files): SQuAD-format JSON or JSONL rows with ``id``, ``context``,
  ``question``, ``answers`` (``{"text": [...]}``, a list of strings, or a list of ``{"text": ...}``)
  and optionally ``language`` (else the ``id`` prefix before the first ``-``, as TyDiQA ids are).
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import string
import unicodedata
from collections import Counter
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Callable

from spielbench.errors import InputError

#: Letters of the four MMLU options, in order.
LETTERS = ("A", "B", "C", "D")

#: The marker that rendered YAMLs replace with the absolute evaluation-data folder.
EVAL_DIR_MARKER = "@EVAL_DIR@"


class RowError(ValueError):
    """One row does not have the expected fields; the loader prefixes ``<file>:<line>:``."""


# --------------------------------------------------------------------------------------------
# JSONL reading and field checks
# --------------------------------------------------------------------------------------------

def read_jsonl(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """Read a JSONL file into ``(line_number, object)`` pairs (1-based line numbers, blank lines skipped).

    Raises:
        InputError: the file is missing, a line is not UTF-8 or not valid JSON, a line is not a JSON
            object, or the file holds no rows; the message names the file and line.
    """
    p = Path(path)
    if EVAL_DIR_MARKER in str(p):
        raise InputError(
            f"{p}: the task YAML was not rendered (its data path still holds {EVAL_DIR_MARKER}); "
            "use the include folder written by `python -m spielbench.evaluate --render-tasks DIR`"
        )
    if not p.is_file():
        raise InputError(f"{p}: file not found (expected a JSONL file, one JSON object per line)")
    rows: list[tuple[int, dict]] = []
    with open(p, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InputError(f"{p}:{lineno}: not UTF-8 text ({exc.reason})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(
                    f"{p}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno}); "
                    "expected one JSON object per line"
                ) from None
            if not isinstance(obj, dict):
                raise InputError(f"{p}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            rows.append((lineno, obj))
    if not rows:
        raise InputError(f"{p}: no rows (expected one JSON object per line)")
    return rows


def _get(row: dict, name: str, kind: str) -> Any:
    """Return ``row[name]`` checked against ``kind`` ("str", "int", "bool", "list[str]", "dict")."""
    if name not in row:
        raise RowError(f"missing field '{name}' (expected {kind})")
    value = row[name]
    ok = {
        "str": lambda v: isinstance(v, str),
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "bool": lambda v: isinstance(v, bool),
        "list[str]": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
        "dict": lambda v: isinstance(v, dict),
    }[kind](value)
    if not ok:
        raise RowError(f"field '{name}' should be {kind}, got {json.dumps(value)[:60]}")
    return value


# --------------------------------------------------------------------------------------------
# Row normalisers: source fields -> the fields the YAML templates use
# --------------------------------------------------------------------------------------------

def arc_doc(row: dict) -> dict:
    """ARC row (dataset or OLMES fields) -> ``{id, question, choices: list[str], gold: int}``."""
    if "gold" in row:
        if "question" in row:
            question = _get(row, "question", "str")
        else:
            question = _get(row, "query", "str")
            if question.startswith("Question:"):
                question = question[len("Question:"):]
            if question.rstrip().endswith("Answer:"):
                question = question.rstrip()[: -len("Answer:")]
        choices = _get(row, "choices", "list[str]")
        gold = _get(row, "gold", "int")
    else:
        question = _get(row, "question", "str")
        ch = _get(row, "choices", "dict")
        choices = _get(ch, "text", "list[str]")
        labels = _get(ch, "label", "list[str]")
        key = _get(row, "answerKey", "str")
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


def _hellaswag_clean(text: str) -> str:
    """WikiHow/ActivityNet artefacts out: ``[title]`` becomes a sentence break, other ``[tags]`` go."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[[^\]]*\]", "", text)
    return text.replace("  ", " ")


def hellaswag_doc(row: dict) -> dict:
    """HellaSwag row -> ``{query, choices, gold}`` (context = activity label + ctx_a + Ctx_b)."""
    label = _get(row, "activity_label", "str")
    ctx_a = _get(row, "ctx_a", "str")
    ctx_b = _get(row, "ctx_b", "str")
    endings = _get(row, "endings", "list[str]")
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
        "query": _hellaswag_clean(label + ": " + ctx),
        "choices": [_hellaswag_clean(e) for e in endings],
        "gold": gold,
    }


def boolq_doc(row: dict) -> dict:
    """BoolQ row -> ``{passage, question, label}`` with label 1 for True (choices are no/yes)."""
    return {
        "passage": _get(row, "passage", "str"),
        "question": _get(row, "question", "str"),
        "label": int(_get(row, "answer", "bool")),
    }


def piqa_doc(row: dict) -> dict:
    """PIQA row -> ``{goal, choices: [sol1, sol2], gold}``."""
    label = _get(row, "label", "int")
    if label not in (0, 1):
        raise RowError(f"field 'label' should be 0 or 1, got {label}")
    return {"goal": _get(row, "goal", "str"), "choices": [_get(row, "sol1", "str"), _get(row, "sol2", "str")],
            "gold": label}


def winogrande_doc(row: dict) -> dict:
    """WinoGrande row -> ``{contexts: [prefix+option1, prefix+option2], continuation, gold}`` (partial scoring).

    The sentence is cut at its ``_`` blank: each option fills the blank to form one context, and the
    rest of the sentence (after the blank, stripped) is the continuation scored after each context.
    """
    sentence = _get(row, "sentence", "str")
    if sentence.count("_") != 1:
        raise RowError(f"field 'sentence' should hold exactly one '_' blank, found {sentence.count('_')}")
    answer = _get(row, "answer", "str")
    if answer not in ("1", "2"):
        raise RowError(f"field 'answer' should be \"1\" or \"2\", got {answer!r}")
    cut = sentence.index("_")
    options = [_get(row, "option1", "str"), _get(row, "option2", "str")]
    return {"contexts": [sentence[:cut] + o for o in options], "continuation": sentence[cut + 1:].strip(),
            "gold": int(answer) - 1}


def mmlu_doc(row: dict) -> dict:
    """MMLU row -> ``{subject, question, choices, answer: int}``."""
    subject = _get(row, "subject", "str")
    question = _get(row, "question", "str")
    choices = _get(row, "choices", "list[str]")
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


def gsm8k_doc(row: dict) -> dict:
    """GSM8K row -> ``{question, solution, target}``; target = the number after ``####`` (commas removed)."""
    question = _get(row, "question", "str")
    solution = _get(row, "answer", "str")
    if "####" not in solution:
        raise RowError("field 'answer' should end with '#### <final number>'")
    target = solution.split("####")[-1].strip().replace(",", "")
    if _as_decimal(target) is None:
        raise RowError(f"final answer after '####' is not a number: {target!r}")
    return {"question": question, "solution": solution, "target": target}


def humaneval_doc(row: dict) -> dict:
    """HumanEval row -> ``{task_id, prompt, test, entry_point}``."""
    return {
        "task_id": _get(row, "task_id", "str"),
        "prompt": _get(row, "prompt", "str"),
        "test": _get(row, "test", "str"),
        "entry_point": _get(row, "entry_point", "str"),
    }


def bbh_doc(row: dict) -> dict:
    """BBH example -> ``{input, target}``."""
    return {"input": _get(row, "input", "str"), "target": _get(row, "target", "str")}


#: row_format name -> normaliser
ROW_FORMATS: dict[str, Callable[[dict], dict]] = {
    "arc": arc_doc,
    "hellaswag": hellaswag_doc,
    "boolq": boolq_doc,
    "piqa": piqa_doc,
    "winogrande": winogrande_doc,
    "mmlu": mmlu_doc,
    "gsm8k": gsm8k_doc,
    "humaneval": humaneval_doc,
    "bbh": bbh_doc,
}


def load_docs(path: str | os.PathLike, row_format: str) -> list[dict]:
    """Read and normalise every row of a JSONL file.

    Args:
        path: the JSONL file.
        row_format: one of :data:`ROW_FORMATS`.

    Returns:
        The normalised documents, in file order.

    Raises:
        InputError: unreadable file or a row without the expected fields (message ``<file>:<line>: ...``).
        KeyError: unknown ``row_format`` (a programming error, not user input).
    """
    normalise = ROW_FORMATS[row_format]
    docs = []
    for lineno, row in read_jsonl(path):
        try:
            docs.append(normalise(row))
        except RowError as exc:
            raise InputError(f"{path}:{lineno}: {exc} ({row_format} row)") from None
    return docs


def _shuffled(docs: list[dict], seed: int | None) -> list[dict]:
    """``docs`` in a seeded random order (``seed=None``: unchanged), so an item limit draws a random subset."""
    if seed is None:
        return docs
    out = list(docs)
    random.Random(int(seed)).shuffle(out)
    return out


def _as_dataset(docs: list[dict]):
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


# --------------------------------------------------------------------------------------------
# custom_dataset loaders (called by lm-eval with metadata + dataset_kwargs as keyword arguments)
# --------------------------------------------------------------------------------------------

def load_task(data_file: str, row_format: str, shuffle_seed: int | None = None, **_: Any):
    """``custom_dataset`` for single-file tasks: checked, normalised rows as a ``test`` split.

    Args:
        data_file: absolute path of the JSONL file.
        row_format: a :data:`ROW_FORMATS` name.
        shuffle_seed: if given, rows are shuffled with this seed (the item limit then takes a random subset).
    """
    return _as_dataset(_shuffled(load_docs(data_file, row_format), shuffle_seed))


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
    test = load_docs(test_file, "mmlu")
    by_subject: dict[str, list[dict]] = {}
    if num_shots > 0:
        if not dev_file:
            raise InputError("mmlu: num_shots > 0 needs dev_file (the dev exemplars, mmlu_dev.jsonl)")
        for ex in load_docs(dev_file, "mmlu"):
            by_subject.setdefault(ex["subject"], []).append(ex)
    docs = []
    for doc in test:
        shots = by_subject.get(doc["subject"], [])[:num_shots]
        if len(shots) < num_shots:
            raise InputError(
                f"{dev_file}: subject '{doc['subject']}' has {len(shots)} dev exemplars, {num_shots} needed"
            )
        docs.append({**doc, "prompt": mmlu_prompt(doc, shots)})
    return _as_dataset(_shuffled(docs, shuffle_seed))


# --------------------------------------------------------------------------------------------
# GSM8K
# --------------------------------------------------------------------------------------------

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


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _as_decimal(text: str) -> Decimal | None:
    try:
        return Decimal(text)
    except (InvalidOperation, ValueError):
        return None


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


# --------------------------------------------------------------------------------------------
# HumanEval (code execution: explicit opt-in)
# --------------------------------------------------------------------------------------------

#: Environment variable that must be "1" for HumanEval to execute generated code.
CODE_EVAL_ENV = "HF_ALLOW_CODE_EVAL"


def load_humaneval(data_file: str, timeout_s: float = 3.0, **_: Any):
    """``custom_dataset`` for HumanEval; ``timeout_s`` (seconds per program) is stored on each doc."""
    docs = [{**d, "timeout_s": float(timeout_s)} for d in load_docs(data_file, "humaneval")]
    return _as_dataset(docs)


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


_WARNED_SANDBOX: set[tuple[str, ...]] = set()


# --------------------------------------------------------------------------------------------
# BBH (user-supplied)
# --------------------------------------------------------------------------------------------

def _read_bbh_examples(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        return load_docs(path, "bbh")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("examples"), list):
        raise InputError(f"{path}: expected a JSON object with an 'examples' list (the BBH task format)")
    docs = []
    for i, row in enumerate(obj["examples"]):
        try:
            if not isinstance(row, dict):
                raise RowError("expected an object")
            docs.append(bbh_doc(row))
        except RowError as exc:
            raise InputError(f"{path}: examples[{i}]: {exc}") from None
    if not docs:
        raise InputError(f"{path}: 'examples' is empty")
    return docs


def discover_bbh(bbh_path: str | os.PathLike) -> dict[str, dict[str, str | None]]:
    """Find BBH task files in a user folder.

    Layout accepted: ``<dir>/<task>.json`` or ``<dir>/bbh/<task>.json`` (official ``{"examples":
    [...]}``) or ``<task>.jsonl`` rows, and optionally the official ``cot-prompts/<task>.txt``.

    Returns:
        ``{task_name: {"data_file": abs path, "prompt_file": abs path or None}}``, sorted by name.

    Raises:
        InputError: the folder is missing or holds no task files.
    """
    root = Path(bbh_path).expanduser().resolve()
    if not root.is_dir():
        raise InputError(f"evaluation.bbh_path: {root} is not a folder (expected BBH task files <task>.json)")
    data_dir = root / "bbh" if (root / "bbh").is_dir() else root
    files = sorted(p for p in data_dir.iterdir() if p.suffix in (".json", ".jsonl") and p.is_file())
    if not files:
        raise InputError(f"evaluation.bbh_path: {data_dir} holds no <task>.json / <task>.jsonl files")
    prompt_dir = root / "cot-prompts"
    tasks = {}
    for f in files:
        prompt = prompt_dir / f"{f.stem}.txt"
        tasks[f.stem] = {"data_file": str(f), "prompt_file": str(prompt) if prompt.is_file() else None}
    return tasks


def bbh_cot_prompt(task: str, prompt_file: str | None = None) -> str:
    """The 3-shot chain-of-thought prompt of a BBH task.

    From the official ``cot-prompts/<task>.txt`` when given (the text after the ``-----`` line), else
    rebuilt from lm-eval's bundled ``bbh/cot_fewshot/<task>.yaml`` (description + 3 exemplars as
    ``"Q: ...\\nA: Let's think step by step.\\n<reasoning>"``).

    Raises:
        InputError: no prompt for ``task`` in either place.
    """
    if prompt_file:
        text = Path(prompt_file).read_text(encoding="utf-8")
        if "-----" in text:
            text = text.split("-----", 1)[1]
        return text.strip()
    import yaml
    from importlib.resources import files

    path = files("lm_eval") / "tasks" / "bbh" / "cot_fewshot" / f"{task}.yaml"
    if not path.is_file():
        raise InputError(
            f"BBH task '{task}': no cot-prompts/{task}.txt in the BBH folder and lm-eval ships no "
            "3-shot CoT prompt of that name"
        )
    cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    shots = cfg["fewshot_config"]["samples"]
    body = "\n\n".join(f"Q: {s['input']}\nA: Let's think step by step.\n{s['target']}" for s in shots)
    return (cfg.get("description") or "") + body


def bbh_docs(data_file: str, task: str, prompt_file: str | None = None) -> list[dict]:
    """One BBH task's documents ``{input, target, prompt}``; prompt = 3-shot CoT prompt + ``"\\n\\nQ: {input}\\nA:"`` (§8.5).

    Raises:
        InputError: unreadable task file, malformed example, or no prompt for ``task``.
    """
    prefix = bbh_cot_prompt(task, prompt_file)
    return [{**d, "prompt": f"{prefix}\n\nQ: {d['input']}\nA:"} for d in _read_bbh_examples(Path(data_file))]


def load_bbh(data_file: str, task: str, prompt_file: str | None = None,
             shuffle_seed: int | None = None, **_: Any):
    """``custom_dataset`` for one BBH task (:func:`bbh_docs`), shuffled with ``shuffle_seed``."""
    return _as_dataset(_shuffled(bbh_docs(data_file, task, prompt_file), shuffle_seed))


_BBH_ANSWER = re.compile(r"[tT]he answer is (.*?)\.")


def bbh_extract(text: str) -> str:
    """The answer in a BBH generation: ``[tT]he answer is (.*?)\\.`` if present, else the whole output (§8.5)."""
    m = _BBH_ANSWER.search(text)
    return (m.group(1) if m else text).strip()


def bbh_process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """Exact match of the extracted answer against ``doc["target"]``."""
    return {"exact_match": float(bbh_extract(results[0]) == doc["target"].strip())}


# --------------------------------------------------------------------------------------------
# TyDiQA GoldP (user-supplied)
# --------------------------------------------------------------------------------------------

TYDIQA_INSTRUCTION = "Answer the following question based on the information in the given passage."


def _tydiqa_answers(value: Any) -> list[str]:
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
    rid = str(row.get("id", ""))
    language = row.get("language") or (rid.split("-", 1)[0] if "-" in rid else "")
    if not isinstance(language, str) or not language:
        raise RowError("no 'language' field and the 'id' has no '<language>-' prefix")
    return {
        "id": rid,
        "language": language.lower(),
        "context": _get(row, "context", "str"),
        "question": _get(row, "question", "str"),
        "answers": _tydiqa_answers(row.get("answers")),
    }


def read_tydiqa(path: str | os.PathLike) -> list[dict]:
    """Read a TyDiQA GoldP file (SQuAD JSON or JSONL rows) into ``{id, language, context, question, answers}``.

    Raises:
        InputError: unreadable file or malformed entry, naming the file and line / entry.
    """
    p = Path(path)
    if p.suffix == ".jsonl":
        out = []
        for lineno, row in read_jsonl(p):
            try:
                out.append(_tydiqa_row(row))
            except RowError as exc:
                raise InputError(f"{p}:{lineno}: {exc} (TyDiQA row)") from None
        return out
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{p}: not a readable JSON file ({exc})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("data"), list):
        raise InputError(f"{p}: expected SQuAD-format JSON with a 'data' list (or a .jsonl file)")
    out = []
    for i, article in enumerate(obj["data"]):
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
    return _as_dataset(_shuffled(tydiqa_docs(dev_file, language, train_file, max_passage_words), shuffle_seed))


def _squad_normalise(text: str) -> str:
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
