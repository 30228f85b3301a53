"""The public names of the task folders in one namespace, for callers that import them as ``lm_eval_tasks.utils``.

Nothing is defined here: each name lives in the module that owns it (:mod:`.common` for reading
and checking files, :mod:`.rows` for the row-format table, ``<task>/utils.py`` for a task's
normaliser, prompt and scorer). The task YAMLs name those modules directly.
"""
from __future__ import annotations

from spielbench.lm_eval_tasks.arc.utils import arc_doc
from spielbench.lm_eval_tasks.bbh.utils import (bbh_cot_prompt, bbh_doc, bbh_docs, bbh_extract, bbh_process_results,
                                                discover_bbh, load_bbh)
from spielbench.lm_eval_tasks.boolq.utils import boolq_doc
from spielbench.lm_eval_tasks.common import EVAL_DIR_MARKER, RowError, read_jsonl
from spielbench.lm_eval_tasks.gsm8k.utils import gsm8k_cot_exemplars, gsm8k_doc, gsm8k_process_results, last_number
from spielbench.lm_eval_tasks.hellaswag.utils import hellaswag_doc
from spielbench.lm_eval_tasks.humaneval.utils import (CODE_EVAL_ENV, humaneval_doc, humaneval_process_results,
                                                      load_humaneval)
from spielbench.lm_eval_tasks.mmlu.utils import LETTERS, load_mmlu, mmlu_doc, mmlu_prompt, mmlu_question_block
from spielbench.lm_eval_tasks.piqa.utils import piqa_doc
from spielbench.lm_eval_tasks.rows import ROW_FORMATS, load_docs, load_task
from spielbench.lm_eval_tasks.tydiqa.utils import (TYDIQA_INSTRUCTION, discover_tydiqa, load_tydiqa, read_tydiqa,
                                                   squad_scores, tydiqa_block, tydiqa_docs, tydiqa_process_results)
from spielbench.lm_eval_tasks.winogrande.utils import winogrande_doc

__all__ = [
    "CODE_EVAL_ENV", "EVAL_DIR_MARKER", "LETTERS", "ROW_FORMATS", "TYDIQA_INSTRUCTION", "RowError",
    "arc_doc", "bbh_cot_prompt", "bbh_doc", "bbh_docs", "bbh_extract", "bbh_process_results", "boolq_doc",
    "discover_bbh", "discover_tydiqa", "gsm8k_cot_exemplars", "gsm8k_doc", "gsm8k_process_results",
    "hellaswag_doc", "humaneval_doc", "humaneval_process_results", "last_number", "load_bbh", "load_docs",
    "load_humaneval", "load_mmlu", "load_task", "load_tydiqa", "mmlu_doc", "mmlu_prompt", "mmlu_question_block",
    "piqa_doc", "read_jsonl", "read_tydiqa", "squad_scores", "tydiqa_block", "tydiqa_docs",
    "tydiqa_process_results", "winogrande_doc",
]
