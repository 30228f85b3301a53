"""The task folders as lm-eval loads them: the rendered include folder, every task through TaskManager, file checks."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from spielbench.errors import InputError
from spielbench.lm_eval_tasks.registry import TASKS, TASKS_DIR, render_tasks
from spielbench.lm_eval_tasks import common, rows
from spielbench.lm_eval_tasks.bbh import utils as bbh_utils
from spielbench.lm_eval_tasks.gsm8k import utils as gsm8k_utils
from spielbench.lm_eval_tasks.humaneval import utils as humaneval_utils
from spielbench.lm_eval_tasks.mmlu import utils as mmlu_utils
from spielbench.lm_eval_tasks.tydiqa import utils as tydiqa_utils

#: One row per asset format the shared fixtures do not cover.
_EXTRA_ROWS = {
    "arc_challenge_test.jsonl": [{"id": "c1", "question": "Hard?", "choices": ["no", "yes"], "gold": 1}],
    "hellaswag_val.jsonl": [{"activity_label": "Roof", "ctx_a": "A man sits.", "ctx_b": "he",
                             "endings": ["stands.", "falls.", "waits.", "naps."], "label": "2"}],
    "piqa_val.jsonl": [{"goal": "Open a jar", "sol1": "twist", "sol2": "shout", "label": 0}],
    "winogrande_val.jsonl": [{"sentence": "Ann beat Bo so _ won.", "option1": "Ann", "option2": "Bo",
                              "answer": "1"}],
}


def _user_files(root: Path) -> tuple[Path, Path]:
    """A BBH folder of two tasks (one with an official CoT prompt) and a TyDiQA GoldP dev file of two languages."""
    bbh_dir = root / "BIG-Bench-Hard"
    (bbh_dir / "bbh").mkdir(parents=True)
    (bbh_dir / "cot-prompts").mkdir()
    (bbh_dir / "bbh" / "boolean_expressions.json").write_text(json.dumps({"examples": [{"input": "x", "target": "y"}]}))
    (bbh_dir / "bbh" / "my_task.jsonl").write_text(json.dumps({"input": "a", "target": "b"}) + "\n")
    (bbh_dir / "cot-prompts" / "my_task.txt").write_text("header\n-----\nSolve it.")
    dev = root / "tydiqa-goldp-dev.json"
    qas = [{"id": f"{lang}-{i}", "question": "Which?", "answers": [{"text": "it"}]}
           for lang in ("english", "finnish") for i in range(2)]
    dev.write_text(json.dumps({"data": [{"paragraphs": [{"context": "It is.", "qas": qas}]}]}))
    return bbh_dir, dev


def test_every_task_loads_through_lm_eval_from_the_rendered_tree(tmp_path, monkeypatch, eval_fixture_dir):
    from lm_eval.tasks import TaskManager

    eval_dir = tmp_path / "eval"
    shutil.copytree(eval_fixture_dir, eval_dir)
    for name, rows_ in _EXTRA_ROWS.items():
        (eval_dir / name).write_text("".join(json.dumps(r) + "\n" for r in rows_))
    bbh_dir, dev = _user_files(tmp_path)
    out = tmp_path / "include"
    info = render_tasks(out, eval_dir, bbh_path=bbh_dir, tydiqa_path=dev)
    # the rendered folder keeps the package's tree, so each YAML's relative `include` still resolves
    shipped = {p.relative_to(TASKS_DIR) for p in TASKS_DIR.rglob("*") if p.name.endswith("yaml")}
    rendered = {p.relative_to(out) for p in out.rglob("*") if p.is_file()}
    generated = {Path("bbh/spiel_bbh.yaml"), Path("bbh/spiel_bbh_boolean_expressions.yaml"),
                 Path("bbh/spiel_bbh_my_task.yaml"), Path("tydiqa/spiel_tydiqa.yaml"),
                 Path("tydiqa/spiel_tydiqa_english.yaml"), Path("tydiqa/spiel_tydiqa_finnish.yaml")}
    assert rendered == shipped | generated
    assert Path("arc/spiel_arc_easy.yaml") in shipped and Path("_spiel_mc_template_yaml") in shipped
    assert info["bbh_tasks"] == ["spiel_bbh_boolean_expressions", "spiel_bbh_my_task"]
    assert info["tydiqa_languages"] == ["english", "finnish"]

    monkeypatch.chdir(tmp_path)  # no package tree under the working directory either
    manager = TaskManager(include_path=str(out), include_defaults=False)
    loaded = manager.load([spec.lm_eval_task for spec in TASKS.values()])["tasks"]
    sizes = {name: len(list(task.test_docs())) for name, task in loaded.items()}
    assert sizes == {"spiel_mmlu": 4, "spiel_mmlu_0shot": 4, "spiel_gsm8k": 4, "spiel_arc_challenge": 1,
                     "spiel_arc_easy": 4, "spiel_hellaswag": 1, "spiel_boolq": 4, "spiel_piqa": 1,
                     "spiel_winogrande": 1, "spiel_humaneval": 2, "spiel_bbh_boolean_expressions": 1,
                     "spiel_bbh_my_task": 1, "spiel_tydiqa_english": 2, "spiel_tydiqa_finnish": 2}
    # lm-eval calls the package's own functions (one module per folder), not copies loaded from files
    cfg = {name: task.config for name, task in loaded.items()}
    assert cfg["spiel_piqa"].custom_dataset is rows.load_task
    assert cfg["spiel_mmlu"].custom_dataset is mmlu_utils.load_mmlu
    assert cfg["spiel_gsm8k"].process_results is gsm8k_utils.gsm8k_process_results
    assert cfg["spiel_humaneval"].process_results is humaneval_utils.humaneval_process_results
    assert cfg["spiel_bbh_my_task"].process_results is bbh_utils.bbh_process_results
    assert cfg["spiel_tydiqa_finnish"].process_results is tydiqa_utils.tydiqa_process_results
    hs = next(iter(loaded["spiel_hellaswag"].test_docs()))
    assert hs["query"] == "Roof: A man sits. He" and hs["gold"] == 2
    wg = next(iter(loaded["spiel_winogrande"].test_docs()))
    assert wg["contexts"] == ["Ann beat Bo so Ann", "Ann beat Bo so Bo"] and wg["continuation"] == "won."


def test_user_json_files_name_the_file_and_entry(tmp_path):
    bad = tmp_path / "task.json"
    bad.write_text("{not json")
    with pytest.raises(InputError, match=rf"^{bad}: not a readable JSON file"):
        bbh_utils.bbh_docs(str(bad), "boolean_expressions")
    bad.write_text(json.dumps({"data": []}))
    with pytest.raises(InputError, match=rf"^{bad}: expected a JSON object with an 'examples' list"):
        bbh_utils.bbh_docs(str(bad), "boolean_expressions")
    bad.write_text(json.dumps({"examples": [{"input": "x", "target": "y"}, {"input": "x"}]}))
    with pytest.raises(InputError, match=rf"^{bad}: examples\[1\]: missing field 'target'"):
        bbh_utils.bbh_docs(str(bad), "boolean_expressions")
    with pytest.raises(InputError, match=rf"^{bad}: expected SQuAD-format JSON with a 'data' list"):
        tydiqa_utils.read_tydiqa(bad)
    rows_ = tmp_path / "dev.jsonl"
    rows_.write_text(json.dumps({"id": "english-1", "context": "c", "question": "q", "answers": ["a"]}) + "\n\n"
                     + json.dumps({"id": "nolang", "context": "c", "question": "q", "answers": ["a"]}) + "\n")
    with pytest.raises(InputError, match=rf"^{rows_}:3: no 'language' field .* \(TyDiQA row\)$"):
        tydiqa_utils.read_tydiqa(rows_)
    rows_.write_text(json.dumps({"input": 1, "target": "y"}) + "\n")
    with pytest.raises(InputError, match=rf"^{rows_}:1: field 'input' should be str, got 1 \(bbh row\)$"):
        rows.load_docs(rows_, "bbh")
    with pytest.raises(common.RowError, match="field 'answer' should be bool"):
        common.field({"answer": 1}, "answer", "bool")
