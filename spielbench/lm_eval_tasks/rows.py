"""The row formats of the asset files, by name, and the loader of the single-file tasks (docs/METHOD.md §8.5).

A task YAML names its file's format in ``dataset_kwargs.row_format``; :data:`ROW_FORMATS` maps the
name to the normaliser of the task folder that owns it. :func:`load_task` is the ``custom_dataset``
of the multiple-choice template (``_spiel_mc_template_yaml``) and of ``spiel_gsm8k``;
:func:`load_docs` is the same check, callable without lm-eval (the registry's ``check_tasks``).
"""
from __future__ import annotations

import os
from typing import Any, Callable

from spielbench.lm_eval_tasks.arc.utils import arc_doc
from spielbench.lm_eval_tasks.bbh.utils import bbh_doc
from spielbench.lm_eval_tasks.boolq.utils import boolq_doc
from spielbench.lm_eval_tasks.common import as_dataset, read_rows, shuffled
from spielbench.lm_eval_tasks.gsm8k.utils import gsm8k_doc
from spielbench.lm_eval_tasks.hellaswag.utils import hellaswag_doc
from spielbench.lm_eval_tasks.humaneval.utils import humaneval_doc
from spielbench.lm_eval_tasks.mmlu.utils import mmlu_doc
from spielbench.lm_eval_tasks.piqa.utils import piqa_doc
from spielbench.lm_eval_tasks.winogrande.utils import winogrande_doc

#: row_format name -> normaliser (source row -> the fields the task YAML uses).
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
    return read_rows(path, ROW_FORMATS[row_format], row_format)


def load_task(data_file: str, row_format: str, shuffle_seed: int | None = None, **_: Any):
    """``custom_dataset`` for single-file tasks: checked, normalised rows as a ``test`` split.

    Args:
        data_file: absolute path of the JSONL file.
        row_format: a :data:`ROW_FORMATS` name.
        shuffle_seed: if given, rows are shuffled with this seed (the item limit then takes a random subset).
    """
    return as_dataset(shuffled(load_docs(data_file, row_format), shuffle_seed))
