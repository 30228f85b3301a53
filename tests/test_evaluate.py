"""Evaluation with lm-eval, offline: local tasks, scores against hand-computed expectations, adapters.

The fast tests use the scripted tiny LLaMA of ``fixtures_eval`` (its choices and generations are
known by construction); the slow ones use the real SmolLM2-135M-Instruct.
"""
from __future__ import annotations

import copy
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

from spielbench.errors import InputError
from spielbench.evaluate import TASKS, check_tasks, evaluate_model, evaluate_run, main, render_tasks
from spielbench.heldout import heldout_loss_of_file as heldout_loss
from spielbench.trained import adapter_kind, load_trained
from spielbench.lm_eval_tasks import common
from spielbench.lm_eval_tasks.arc import utils as arc_tasks
from spielbench.lm_eval_tasks.bbh import utils as bbh_tasks
from spielbench.lm_eval_tasks.gsm8k import utils as gsm8k_tasks
from spielbench.lm_eval_tasks.hellaswag import utils as hellaswag_tasks
from spielbench.lm_eval_tasks.humaneval import utils as humaneval_tasks
from spielbench.lm_eval_tasks.tydiqa import utils as tydiqa_tasks
from spielbench.lm_eval_tasks.winogrande import utils as winogrande_tasks

REPO = Path(__file__).resolve().parents[1]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def fixture_scores(scripted_llama, eval_tokenizer, eval_fixture_dir):
    """One lm-eval run of the scripted model over every fixture task (per-item records kept)."""
    return evaluate_model(scripted_llama, eval_tokenizer,
                          ["arc_easy", "boolq", "mmlu", "gsm8k", "humaneval", "bbh", "tydiqa"],
                          eval_dir=eval_fixture_dir, allow_code_execution=True, return_samples=True)


# ------------------------------------------------------------------------------- scores vs hand

def test_multiple_choice_scores_match_hand_computation(fixture_scores):
    tasks = fixture_scores["tasks"]
    # the model always prefers " yes": right in 2 of 4 ARC items, in 3 of 4 BoolQ items
    assert tasks["arc_easy"]["value"] == pytest.approx(0.5)
    assert tasks["arc_easy"]["metrics"]["acc_norm"]["value"] == pytest.approx(0.5)
    assert tasks["boolq"]["value"] == pytest.approx(0.75)
    # among " A".." D" it prefers " A": the answer in 2 of 4 MMLU items
    assert tasks["mmlu"]["value"] == pytest.approx(0.5)
    for name in ("arc_easy", "boolq", "mmlu"):
        assert tasks[name]["n"] == 4 and tasks[name]["metric"] == TASKS[name].metric
    # stderr of a mean of 4 Bernoulli outcomes with p=0.5: sqrt(p(1-p)/(n-1))
    assert tasks["arc_easy"]["stderr"] == pytest.approx(math.sqrt(0.25 / 3))
    # per item, in doc order: " yes" is the answer of the 1st and 3rd question
    assert tasks["arc_easy"]["doc_ids"] == [0, 1, 2, 3]
    assert tasks["arc_easy"]["item_scores"] == [1.0, 0.0, 1.0, 0.0]
    assert fixture_scores["lm_eval_version"] == "0.4.13"


def test_mmlu_prompt_uses_the_subjects_own_five_exemplars(fixture_scores):
    records = fixture_scores["samples"]["spiel_mmlu"]
    by_question = {r["doc"]["question"]: r for r in records}
    prompt, continuation = by_question["t3"]["arguments"][0]
    assert prompt.startswith("The following are multiple choice questions (with answers) about virology.\n\n")
    assert "astronomy" not in prompt
    assert [f"virology q{i}\n" in prompt for i in range(5)] == [True] * 5
    assert "virology q4\nA. w\nB. x\nC. y\nD. z\nAnswer: A\n\nt3\nA. a\nB. b\nC. c\nD. d\nAnswer:" in prompt
    assert prompt.endswith("Answer:") and continuation == " A"


def test_gsm8k_eight_shot_prompt_and_last_number_extraction(fixture_scores):
    entry = fixture_scores["tasks"]["gsm8k"]
    # greedy output " The answer is 3, 18." -> last number 18; references 18, 5, 18, 1,018
    assert entry["value"] == pytest.approx(0.5) and entry["n"] == 4
    records = fixture_scores["samples"]["spiel_gsm8k"]
    prompt, gen_kwargs = records[0]["arguments"][0]
    exemplars = gsm8k_tasks.gsm8k_cot_exemplars()
    assert len(exemplars) == 8
    assert prompt.startswith("Answer the following questions.\n\nQuestion: " + exemplars[0]["question"])
    assert prompt.count("Question: ") == 9 and prompt.endswith("Question: How many?\nAnswer:")
    assert f"\nAnswer: {exemplars[7]['target']}\n\n" in prompt
    assert gen_kwargs["until"] == ["\n"] and gen_kwargs["do_sample"] is False
    assert {r["filtered_resps"][0] for r in records} == {" The answer is 3, 18."}
    assert sorted(r["exact_match"] for r in records) == [0.0, 0.0, 1.0, 1.0]


def test_humaneval_pass_at_1_executes_completions(fixture_scores):
    entry = fixture_scores["tasks"]["humaneval"]
    # completion "    return a + b" passes add's tests and fails sub's
    assert entry["metric"] == "pass@1" and entry["value"] == pytest.approx(0.5) and entry["n"] == 2
    outcome = {r["doc"]["task_id"]: (r["filtered_resps"][0], r["pass@1"])
               for r in fixture_scores["samples"]["spiel_humaneval"]}
    assert outcome == {"Test/0": ("    return a + b\n", 1.0), "Test/1": ("    return a + b\n", 0.0)}
    assert os.environ.get(humaneval_tasks.CODE_EVAL_ENV) is None  # the opt-in does not outlive the evaluation


def test_missing_bbh_and_tydiqa_are_skipped_with_a_note(fixture_scores):
    for name in ("bbh", "tydiqa"):
        entry = fixture_scores["tasks"][name]
        assert entry["skipped"] is True and f"{name}_path" in entry["note"]
        assert any(n.startswith(f"{name}: skipped") for n in fixture_scores["notes"])
    assert list(fixture_scores["tasks"]) == ["arc_easy", "boolq", "mmlu", "gsm8k", "humaneval", "bbh", "tydiqa"]


def test_user_bbh_and_tydiqa_files(tmp_path, scripted_llama, eval_tokenizer, eval_fixture_dir):
    bbh = tmp_path / "BIG-Bench-Hard"
    (bbh / "bbh").mkdir(parents=True)
    (bbh / "cot-prompts").mkdir()
    (bbh / "bbh" / "boolean_expressions.json").write_text(json.dumps(
        {"examples": [{"input": "True is", "target": "3, 18"}, {"input": "False is", "target": "False"}]}))
    (bbh / "bbh" / "my_task.json").write_text(json.dumps(
        {"examples": [{"input": f"x{i}", "target": t} for i, t in enumerate(["3, 18", "a", "b", "c"])]}))
    (bbh / "cot-prompts" / "my_task.txt").write_text("canary line\n-----\nSolve it.\n\nQ: x\nA: Let's think. So the answer is y.")
    tydiqa = tmp_path / "tydiqa-goldp-v1.1-dev.json"

    def qa(qid, answer):
        return {"id": qid, "question": "Which?", "answers": [{"text": answer, "answer_start": 0}]}

    tydiqa.write_text(json.dumps({"data": [{"paragraphs": [
        {"context": "Hello world.", "qas": [qa("english-1-1", "The answer is 3, 18."), qa("english-2-1", "18")]},
        {"context": "Hei.", "qas": [qa("finnish-1-1", "nothing"), qa("finnish-2-1", "zero")]},
    ]}]}))
    report = evaluate_model(scripted_llama, eval_tokenizer, "bbh,tydiqa", eval_dir=eval_fixture_dir,
                            bbh_path=bbh, tydiqa_path=tydiqa, return_samples=True)
    bbh_entry = report["tasks"]["bbh"]
    # generation " The answer is 3, 18.\n   return a + b" -> extracted "3, 18": 1 of 2 and 1 of 4
    assert bbh_entry["subtasks"]["spiel_bbh_boolean_expressions"]["value"] == pytest.approx(0.5)
    assert bbh_entry["subtasks"]["spiel_bbh_my_task"]["value"] == pytest.approx(0.25)
    assert bbh_entry["value"] == pytest.approx(0.375)  # mean over tasks, not over items (1/3)
    assert bbh_entry["n"] == 6
    prompts = {r["doc"]["input"]: r["arguments"][0][0] for recs in report["samples"].values() for r in recs
               if "input" in r["doc"]}
    assert prompts["x1"] == "Solve it.\n\nQ: x\nA: Let's think. So the answer is y.\n\nQ: x1\nA:"
    assert prompts["True is"].startswith("Evaluate the result of a random Boolean expression.\n\nQ: not ( ( not not True ) ) is\nA: Let's think step by step.\n")
    ty = report["tasks"]["tydiqa"]
    # prediction "The answer is 3, 18.": EM/F1 1/1 against itself, 0/0.4 against "18", 0/0 in finnish
    assert ty["subtasks"]["spiel_tydiqa_english"]["metrics"]["exact_match"]["value"] == pytest.approx(0.5)
    assert ty["subtasks"]["spiel_tydiqa_english"]["metrics"]["f1"]["value"] == pytest.approx(0.7)
    assert ty["value"] == pytest.approx(0.35) and ty["metrics"]["exact_match"]["value"] == pytest.approx(0.25)
    english = [r for r in report["samples"]["spiel_tydiqa_english"] if r["doc"]["id"] == "english-1-1"][0]
    assert english["arguments"][0][0] == (
        f"{tydiqa_tasks.TYDIQA_INSTRUCTION}\n\nPassage: Hello world.\nQuestion: Which?\nAnswer: 18\n\n"
        "Passage: Hello world.\nQuestion: Which?\nAnswer:")


# ------------------------------------------------------------------------------ input checks

def test_corrupt_jsonl_error_names_file_and_line(tmp_path, scripted_llama, eval_tokenizer):
    good = {"id": "a", "question": "Q?", "choices": ["x", "y"], "gold": 0}
    path = tmp_path / "arc_easy_test.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n{not json\n")
    with pytest.raises(InputError, match=rf"^{path}:3: not valid JSON"):
        evaluate_model(scripted_llama, eval_tokenizer, ["arc_easy"], eval_dir=tmp_path)
    path.write_text(json.dumps(good) + "\n" + json.dumps({"id": "b", "question": "Q?", "gold": 1}) + "\n")
    with pytest.raises(InputError, match=rf"^{path}:2: missing field 'choices'"):
        check_tasks(["arc_easy"], tmp_path)
    path.write_text(json.dumps({**good, "gold": 5}) + "\n")
    with pytest.raises(InputError, match=rf"^{path}:1: gold index 5 out of range"):
        check_tasks(["arc_easy"], tmp_path)
    with pytest.raises(InputError, match=r"boolq_val.jsonl: file not found"):
        check_tasks(["boolq"], tmp_path)


def test_task_list_and_code_execution_opt_in(eval_fixture_dir, monkeypatch):
    with pytest.raises(InputError, match="unknown task 'squad'"):
        check_tasks("arc_easy,squad", eval_fixture_dir)
    with pytest.raises(InputError, match="listed twice"):
        check_tasks("boolq,boolq", eval_fixture_dir)
    with pytest.raises(InputError, match="allow_code_execution"):
        check_tasks(["humaneval"], eval_fixture_dir)
    monkeypatch.delenv(humaneval_tasks.CODE_EVAL_ENV, raising=False)
    with pytest.raises(RuntimeError, match="allow_code_execution"):
        humaneval_tasks.humaneval_process_results({"task_id": "T", "prompt": "", "test": "", "entry_point": "f",
                                         "timeout_s": 1.0}, ["pass"])
    assert check_tasks("humaneval, bbh", eval_fixture_dir, allow_code_execution=True) == (
        ["humaneval"], {"bbh": check_tasks("bbh", eval_fixture_dir)[1]["bbh"]})


def test_render_tasks_writes_absolute_paths_lm_eval_can_load(tmp_path, monkeypatch, eval_fixture_dir):
    from lm_eval.tasks import TaskManager

    eval_dir = tmp_path / 'my "eval" data'
    eval_dir.mkdir()
    (eval_dir / "arc_easy_test.jsonl").write_text((eval_fixture_dir / "arc_easy_test.jsonl").read_text())
    out = tmp_path / "include"
    monkeypatch.chdir(tmp_path)
    info = render_tasks(out, Path('my "eval" data'))  # relative on input, absolute in the YAML
    text = (out / "arc" / "spiel_arc_easy.yaml").read_text()
    assert common.EVAL_DIR_MARKER not in text and info["include_path"] == str(out.resolve())
    line = [ln for ln in text.splitlines() if "data_file" in ln][0]
    assert json.loads(line.split(":", 1)[1].strip()) == str(eval_dir.resolve() / "arc_easy_test.jsonl")
    monkeypatch.chdir(REPO)
    task = TaskManager(include_path=str(out), include_defaults=False).load(["spiel_arc_easy"])["tasks"]
    docs = list(next(iter(task.values())).test_docs())
    assert [d["gold"] for d in docs] == [1, 2, 3, 0]
    with pytest.raises(InputError, match="was not rendered"):
        common.read_jsonl(Path(common.EVAL_DIR_MARKER) / "x.jsonl")


def test_row_normalisers():
    hs = hellaswag_tasks.hellaswag_doc({"activity_label": "Roof", "ctx_a": "A man [title] sits.", "ctx_b": "he",
                              "endings": ["is [header] up.", "falls."], "label": "1"})
    assert hs == {"query": "Roof: A man. sits. He", "choices": ["is up.", "falls."], "gold": 1}
    wg = winogrande_tasks.winogrande_doc({"sentence": "Ann beat Bo so _ won.", "option1": "Ann", "option2": "Bo",
                               "answer": "1"})
    assert wg == {"contexts": ["Ann beat Bo so Ann", "Ann beat Bo so Bo"], "continuation": "won.", "gold": 0}
    arc = arc_tasks.arc_doc({"question": "Q", "choices": {"text": ["x", "y"], "label": ["A", "B"]}, "answerKey": "B"})
    assert arc["choices"] == ["x", "y"] and arc["gold"] == 1
    assert arc_tasks.arc_doc({"query": "Question: Why?\nAnswer:", "choices": ["a", "b"], "gold": 0})["question"] == "Why?"
    assert gsm8k_tasks.gsm8k_doc({"question": "q", "answer": "x\n#### 1,234"})["target"] == "1234"
    assert gsm8k_tasks.last_number("Costs $1,234.50 then 7 and -3.") == "-3"
    assert gsm8k_tasks.last_number("no digits") is None
    assert gsm8k_tasks.gsm8k_process_results({"target": "18"}, ["so 18.0"]) == {"exact_match": 1.0}
    assert bbh_tasks.bbh_extract("So the answer is (B). Done") == "(B)"
    assert bbh_tasks.bbh_extract(" no marker ") == "no marker"
    assert tydiqa_tasks.squad_scores("The Eiffel tower!", ["eiffel tower"]) == (1.0, 1.0)
    assert tydiqa_tasks.squad_scores("big red tower", ["red tower now"])[1] == pytest.approx(2 / 3)


# ------------------------------------------------------------------------------ adapters, runs

def _spiel_adapter(model, directory: Path, seed: int = 0, density: float = 0.05, scale: float = 0.5,
                   copy_model: bool = True):
    """Wrap ``model`` (or a copy) with SpIEL deltas holding random N(0, scale^2) values, save, return the wrapper."""
    from spiel.config import SpielConfig
    from spiel.model import get_spiel_model

    wrapped = get_spiel_model(copy.deepcopy(model) if copy_model else model, SpielConfig(density=density, seed=seed))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in wrapped.sparse_layers():
            layer.values.copy_(torch.randn(layer.values.shape, generator=gen) * scale)
    wrapped.save_pretrained(directory)
    return wrapped


def test_spiel_and_peft_adapters_merge_to_the_unmerged_logits(tmp_path, scripted_llama, scripted_model_dir):
    from peft import LoraConfig, get_peft_model

    ids = torch.tensor([[3, 10, 8, 19, 25, 30, 7]])
    spiel_dir = tmp_path / "spiel"
    unmerged = _spiel_adapter(scripted_llama, spiel_dir)
    merged, _, info = load_trained(scripted_model_dir, spiel_dir, method="spiel-ag")
    assert adapter_kind(spiel_dir) == "spiel"
    assert info["adapter_application"] == "merged" and not info["quantized"]
    with torch.no_grad():
        ref = unmerged(input_ids=ids).logits
        assert not torch.allclose(ref, scripted_llama(input_ids=ids).logits, atol=1e-3)  # the deltas matter
        torch.testing.assert_close(merged(input_ids=ids).logits, ref, atol=1e-5, rtol=1e-5)

    peft_dir = tmp_path / "lora"
    lora = get_peft_model(copy.deepcopy(scripted_llama), LoraConfig(r=2, target_modules=["q_proj", "up_proj"],
                                                                    init_lora_weights=False))
    lora.save_pretrained(peft_dir)
    merged, _, info = load_trained(scripted_model_dir, peft_dir, method="lora")
    assert adapter_kind(peft_dir) == "peft" and info["adapter_application"] == "merged"
    assert type(merged).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, lora(input_ids=ids).logits, atol=1e-5, rtol=1e-5)

    # a full fine-tuning run saves a whole model folder: it is loaded as the model itself
    full, _, info = load_trained(scripted_model_dir, scripted_model_dir, method="full")
    assert adapter_kind(scripted_model_dir) == "full" and info["adapter_application"] == "full-model"
    with torch.no_grad():
        torch.testing.assert_close(full(input_ids=ids).logits, scripted_llama(input_ids=ids).logits)


def test_4bit_runs_are_evaluated_unmerged_on_an_nf4_base(tmp_path, scripted_llama, scripted_model_dir,
                                                        eval_fixture_dir):
    from spiel.layer import SparseDeltaLinear

    from baselines.quant import load_nf4_model

    adapter = tmp_path / "spiel"
    _spiel_adapter(load_nf4_model(scripted_model_dir, "cpu"), adapter, seed=4, copy_model=False)  # a qSpIEL adapter
    model, tok, info = load_trained(scripted_model_dir, adapter, method="qspiel-ag")
    assert info["quantized"] and info["adapter_application"] == "unmerged" and info["dtype"] == "nf4/float32"
    layers = [m for m in model.modules() if isinstance(m, SparseDeltaLinear)]
    assert len(layers) == 7 and all(layer.is_4bit and not layer.merged for layer in layers)
    ids = torch.tensor([[3, 10, 8, 19, 25]])
    with torch.no_grad():
        on = model(input_ids=ids).logits
        for layer in layers:
            layer.disabled = True
        off = model(input_ids=ids).logits
        for layer in layers:
            layer.disabled = False
    assert not torch.allclose(on, off, atol=1e-3)  # the unmerged deltas take part in the forward pass
    report = evaluate_model(model, tok, ["boolq"], eval_dir=eval_fixture_dir, limit=2)
    assert report["tasks"]["boolq"]["n"] == 2
    # the adapter records its NF4 base: without a method it is applied, against a dense method refused
    assert load_trained(scripted_model_dir, adapter)[2]["quantized"]
    with pytest.raises(InputError, match="base_model_quantization='nf4'.*method 'spiel-ag'"):
        load_trained(scripted_model_dir, adapter, method="spiel-ag")
    dense = tmp_path / "dense"
    _spiel_adapter(scripted_llama, dense, seed=4)
    with pytest.raises(InputError, match="base_model_quantization='none'.*quantized=True"):
        load_trained(scripted_model_dir, dense, quantized=True)


def test_item_limit_takes_a_seeded_random_subset_not_the_first_items(scripted_llama, eval_tokenizer,
                                                                     eval_fixture_dir):
    from spielbench.lm_eval_results import subset_indices

    assert subset_indices(10, None, 1, "arc_easy") is None and subset_indices(10, 10, 1, "arc_easy") is None
    picks = {tuple(subset_indices(1000, 20, seed, "arc_easy")) for seed in range(5)}
    assert len(picks) == 5 and all(list(p) == sorted(set(p)) and len(p) == 20 for p in picks)
    assert subset_indices(1000, 20, 3, "arc_easy") == subset_indices(1000, 20, 3, "arc_easy")
    assert subset_indices(1000, 20, 3, "arc_easy") != subset_indices(1000, 20, 3, "boolq")
    assert all(p != tuple(range(20)) for p in picks)
    # the scored doc ids are the subset, and each item's score is its score in the full run
    full = evaluate_model(scripted_llama, eval_tokenizer, ["arc_easy", "boolq"], eval_dir=eval_fixture_dir)
    for seed in (0, 1, 5):
        part = evaluate_model(scripted_llama, eval_tokenizer, ["arc_easy", "boolq"], eval_dir=eval_fixture_dir,
                              limit={"arc_easy": 2}, seed=seed)
        entry = part["tasks"]["arc_easy"]
        assert entry["doc_ids"] == subset_indices(4, 2, seed, "arc_easy") and entry["n"] == 2
        assert entry["subset"] == {"kind": "seeded-random", "seed": seed, "of": 4}
        by_id = dict(zip(full["tasks"]["arc_easy"]["doc_ids"], full["tasks"]["arc_easy"]["item_scores"]))
        assert entry["item_scores"] == [by_id[i] for i in entry["doc_ids"]]
        assert part["tasks"]["boolq"]["subset"] == {"kind": "all"} and part["tasks"]["boolq"]["n"] == 4


def test_chat_prompt_format_wraps_prompts_in_the_template(scripted_llama, eval_tokenizer, eval_fixture_dir):
    report = evaluate_model(scripted_llama, eval_tokenizer, ["boolq"], eval_dir=eval_fixture_dir,
                            prompt_format="chat", return_samples=True)
    first = next(r for r in report["samples"]["spiel_boolq"] if r["doc_id"] == 0)
    prompt, continuation = first["arguments"][0]
    assert prompt == "<user>Hello world.\nQuestion: is it?\nAnswer:\n<assistant>" and continuation == "no"  # lm-eval drops the " " delimiter after a chat turn
    with pytest.raises(InputError, match="prompt_format"):
        evaluate_model(scripted_llama, eval_tokenizer, ["boolq"], eval_dir=eval_fixture_dir, prompt_format="html")


def test_heldout_loss_is_the_token_mean_over_responses(tmp_path, scripted_llama, eval_tokenizer):
    from spielbench.data import load_instruction_dataset

    path = _write_jsonl(tmp_path / "heldout.jsonl", [
        {"inputs": " hello world", "targets": " yes"},
        {"inputs": " Hi", "targets": " hello there yes no"},
    ])
    got = heldout_loss(scripted_llama, eval_tokenizer, path, max_seq_length=64, batch_size=2)
    data = load_instruction_dataset(path, eval_tokenizer, 64)
    # per example, transformers' own shifted loss (mean over its label tokens), weighted by label count
    total, count, per_nll, per_tokens = 0.0, 0, [], []
    with torch.no_grad():
        for f in data.features:
            n = sum(1 for x in f["labels"][1:] if x != -100)
            out = scripted_llama(input_ids=torch.tensor([f["input_ids"]]), labels=torch.tensor([f["labels"]]))
            total += float(out.loss) * n
            count += n
            per_nll.append(float(out.loss) * n)
            per_tokens.append(n)
    assert got["n_examples"] == 2 and got["n_tokens"] == count
    # batched by length (the second example first), reported in file order
    assert per_tokens[0] != per_tokens[1] and got["example_tokens"] == per_tokens
    assert got["example_nll"] == pytest.approx(per_nll, rel=1e-5)
    assert got["loss"] == pytest.approx(total / count, rel=1e-5)
    assert sum(got["example_tokens"]) == count and len(got["example_nll"]) == 2
    assert sum(got["example_nll"]) / count == pytest.approx(got["loss"])
    # the same number as the training harness's own held-out loss
    from spielbench.data import make_collator
    from spielbench.heldout import heldout_loss as dataset_heldout_loss

    assert dataset_heldout_loss(scripted_llama, data, make_collator(eval_tokenizer))["loss"] == pytest.approx(
        got["loss"], rel=1e-6)


def test_evaluate_run_writes_one_json(tmp_path, scripted_llama, scripted_model_dir, eval_fixture_dir):
    run = tmp_path / "runs" / "spiel-ag-r1"
    _spiel_adapter(scripted_llama, run / "adapter", seed=1)
    (run / "run_config.json").write_text(json.dumps({"run_id": "spiel-ag-r1", "method": "spiel-ag",
                                                     "model": str(scripted_model_dir), "max_seq_length": 32}))
    heldout = _write_jsonl(tmp_path / "heldout.jsonl", [{"inputs": " hello", "targets": " yes"}])
    out = tmp_path / "results" / "spiel-ag-r1.json"
    with pytest.raises(InputError, match=r"limit: \['gsm8k'\] are not among"):
        evaluate_run(run, tasks="boolq", output=out, eval_dir=eval_fixture_dir, limit={"gsm8k": 2})
    result = evaluate_run(run, tasks="boolq,arc_easy,tydiqa", output=out, eval_dir=eval_fixture_dir,
                          limit={"boolq": 2, "arc_easy": 3}, heldout=heldout, seed=7)
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(result))
    assert written["format"] == "spielbench-eval/1" and written["run_id"] == "spiel-ag-r1"
    assert written["method"] == "spiel-ag" and written["adapter_application"] == "merged"
    assert written["prompt_format"] == "plain" and written["seed"] == 7
    assert written["limit"] == {"boolq": 2, "arc_easy": 3}
    assert written["tasks"]["arc_easy"]["n"] == 3 and written["tasks"]["arc_easy"]["limit"] == 3
    assert written["lm_eval_version"] == "0.4.13"
    assert written["tasks"]["boolq"]["n"] == 2 and 0.0 <= written["tasks"]["boolq"]["value"] <= 1.0
    assert list(written["tasks"]) == ["boolq", "arc_easy", "tydiqa"]
    assert written["tasks"]["tydiqa"]["skipped"] is True
    assert written["heldout"]["n_examples"] == 1 and written["heldout"]["max_seq_length"] == 32
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temp file left behind


def test_evaluate_run_autocasts_to_the_requested_dtype(tmp_path, scripted_model_dir, eval_fixture_dir, monkeypatch,
                                                       capsys):
    heldout = _write_jsonl(tmp_path / "heldout.jsonl", [{"inputs": " hello", "targets": " yes"},
                                                         {"inputs": " Hi there", "targets": " hello there yes"}])
    kw = dict(base=scripted_model_dir, tasks="boolq", eval_dir=eval_fixture_dir, heldout=heldout, max_seq_length=32)
    # a CPU without fast bf16 (e.g. AVX2 only): bf16 autocast still runs, with a warning naming the fix
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    fp32 = evaluate_run(output=tmp_path / "fp32.json", **kw)
    assert "warning:" not in capsys.readouterr().err
    bf16 = evaluate_run(output=tmp_path / "bf16.json", dtype="bfloat16", **kw)
    assert "warning: evaluation.dtype: bfloat16 on a CPU without fast bf16" in capsys.readouterr().err
    assert fp32["dtype"] == bf16["dtype"] == "float32"  # the weights stay float32
    assert fp32["autocast"] is None and bf16["autocast"] == "bfloat16"
    assert json.loads((tmp_path / "bf16.json").read_text())["autocast"] == "bfloat16"
    assert bf16["heldout"]["head"] == "label_rows"
    assert fp32["heldout"]["head"] == "label_rows"
    # the same examples, scored in bfloat16: close to, and not bit-equal with, the float32 numbers
    assert bf16["heldout"]["example_tokens"] == fp32["heldout"]["example_tokens"]
    assert bf16["heldout"]["loss"] == pytest.approx(fp32["heldout"]["loss"], rel=5e-2)
    assert bf16["heldout"]["example_nll"] != fp32["heldout"]["example_nll"]
    with pytest.raises(InputError, match="dtype: expected one of"):
        evaluate_run(output=tmp_path / "x.json", dtype="float16", **kw)
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("fast, dtype, warned", [(False, "bfloat16", True), (True, "bfloat16", False),
                                                 (False, "float32", False)])
def test_pipeline_warns_at_start_of_bf16_evaluation_on_a_cpu_without_fast_bf16(monkeypatch, capsys, fast, dtype,
                                                                                  warned):
    from spielbench.evaluate import slow_bf16_note
    from spielbench.pipeline import check_evaluation

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: fast)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    check_evaluation({"tasks": ["boolq"], "dtype": dtype})
    err = capsys.readouterr().err
    assert (err.startswith("warning: evaluation.dtype: bfloat16") and "set evaluation.dtype: float32" in err) is warned
    check_evaluation({"tasks": ["boolq"], "dtype": dtype}, check_device=False)  # a cluster submit host: no say
    assert capsys.readouterr().err == ""
    assert slow_bf16_note(dtype, "cuda") is None


def test_cli_reports_bad_input_before_loading(tmp_path, capsys, scripted_model_dir, eval_fixture_dir):
    bad = tmp_path / "data"
    bad.mkdir()
    (bad / "boolq_val.jsonl").write_text('{"question": "q", "passage": "p", "answer": "yes"}\n')
    rc = main(["--base", str(scripted_model_dir), "--tasks", "boolq", "--eval-dir", str(bad),
               "--output", str(tmp_path / "out.json")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"error: {bad / 'boolq_val.jsonl'}:1: field 'answer' should be bool")
    assert not (tmp_path / "out.json").exists()
    assert main(["--run", str(tmp_path / "nowhere"), "--output", str(tmp_path / "o.json")]) == 2
    assert "run_config.json not found" in capsys.readouterr().err
    assert main(["--render-tasks", str(tmp_path / "inc"), "--eval-dir", str(eval_fixture_dir)]) == 0
    assert (tmp_path / "inc" / "gsm8k" / "spiel_gsm8k.yaml").is_file()


def test_lm_eval_command_line_with_spiel_model(tmp_path, monkeypatch, scripted_llama, scripted_model_dir,
                                               eval_fixture_dir):
    import spielbench.lm_eval_model as lm_eval_model
    from lm_eval.api.registry import get_model

    adapter = tmp_path / "adapter"
    _spiel_adapter(scripted_llama, adapter, seed=2)
    include = tmp_path / "include"
    render_tasks(include, eval_fixture_dir)
    out = tmp_path / "lm_eval_out"
    monkeypatch.setattr(sys, "argv", [
        "spiel-lm-eval", "--model", "spiel", "--model_args",
        f"pretrained={scripted_model_dir},adapter={adapter},method=spiel-ag",
        "--tasks", "spiel_boolq", "--include_path", str(include), "--samples",
        json.dumps({"spiel_boolq": [0, 2, 3]}), "--output_path", str(out)])
    lm_eval_model.main()
    assert get_model("spiel") is lm_eval_model.SpielLM
    written = json.loads(next(out.rglob("results*.json")).read_text())
    acc = written["results"]["spiel_boolq"]["acc,none"]
    # the same adapter, applied through the library, gives the same score on the same items
    model, tok, _ = load_trained(scripted_model_dir, adapter)
    direct = evaluate_model(model, tok, ["boolq"], eval_dir=eval_fixture_dir)
    scores = dict(zip(direct["tasks"]["boolq"]["doc_ids"], direct["tasks"]["boolq"]["item_scores"]))
    assert acc == pytest.approx((scores[0] + scores[2] + scores[3]) / 3)
    assert written["n-samples"]["spiel_boolq"]["effective"] == 3


# ------------------------------------------------------------------------------ real model

@pytest.mark.slow
def test_real_model_arc_easy_above_chance(real_model, real_tokenizer):
    eval_dir = REPO / "resources" / "eval"
    if not (eval_dir / "arc_easy_test.jsonl").is_file():
        pytest.skip("resources/eval not built")
    base = evaluate_model(real_model, real_tokenizer, ["arc_easy"], eval_dir=eval_dir, limit=100, batch_size=8)
    assert base["tasks"]["arc_easy"]["n"] == 100
    # a seeded random subset of 100 items: chance (0.25, 4 choices) reaches 0.35 with p ~ 1%; the base model
    # scores about 0.5 (16 items were too few: one subset gave 6/16)
    assert base["tasks"]["arc_easy"]["value"] >= 0.35


@pytest.mark.slow
def test_real_model_merged_spiel_adapter_scores_like_unmerged(tmp_path, real_model_dir, real_tokenizer):
    eval_dir = REPO / "resources" / "eval"
    if not (eval_dir / "arc_easy_test.jsonl").is_file():
        pytest.skip("resources/eval not built")
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "adapter"
    fresh = AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32)
    unmerged = _spiel_adapter(fresh, adapter, seed=3, density=0.002, scale=0.02, copy_model=False)
    a = evaluate_model(unmerged.get_base_model(), real_tokenizer, ["arc_easy"], eval_dir=eval_dir, limit=5,
                       batch_size=8, return_samples=True)
    merged, tok, info = load_trained(real_model_dir, adapter, method="spiel-ag")
    assert info["adapter_application"] == "merged"
    ids = real_tokenizer(["Question: Which gas do plants take in?\nAnswer: carbon dioxide"], return_tensors="pt")
    with torch.no_grad():
        ref = unmerged(**ids).logits
        torch.testing.assert_close(merged(**ids).logits, ref, atol=1e-3, rtol=1e-4)
    del unmerged, fresh
    b = evaluate_model(merged, tok, ["arc_easy"], eval_dir=eval_dir, limit=5, batch_size=8, return_samples=True)
    assert a["tasks"]["arc_easy"]["metrics"] == b["tasks"]["arc_easy"]["metrics"]
    lls_a = [ll for r in a["samples"]["spiel_arc_easy"] for ll, _ in r["filtered_resps"]]
    lls_b = [ll for r in b["samples"]["spiel_arc_easy"] for ll, _ in r["filtered_resps"]]
    assert len(lls_a) >= 15 and lls_a == pytest.approx(lls_b, abs=2e-3)


def test_plain_lm_eval_cli_finds_the_spiel_model():
    """The project environment's startup hook (spiel_lm_eval.pth, written by scripts/ensure_env.sh)
    registers `spiel` when lm-eval fills its model registry, so `lm_eval --model spiel` works."""
    import subprocess
    import sys
    import sysconfig
    from pathlib import Path

    pth = Path(sysconfig.get_paths()["purelib"]) / "spiel_lm_eval.pth"
    if not pth.exists():
        pytest.skip("not the project environment (scripts/ensure_env.sh writes spiel_lm_eval.pth)")
    code = "from lm_eval.api.registry import get_model; print(get_model('spiel').__name__, get_model('hf').__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["SpielLM", "HFLM"]


@pytest.mark.parametrize("kw, message", [
    ({"heldout_examples": 0}, r"heldout_examples \(--heldout-examples\): expected an integer >= 1, got 0"),
    ({"max_seq_length": 2}, r"max_seq_length \(--max-seq-length\): expected an integer >= 8, got 2"),
    ({"batch_size": 0}, r"batch_size \(--batch-size\): expected an integer >= 1, got 0"),
    ({"seed": -1}, r"seed \(--seed\): expected an integer >= 0, got -1"),
    ({"device": "tpu"}, r"device \(--device\): expected auto, cpu, cuda or cuda:N, got 'tpu'"),
])
def test_bad_settings_are_refused_before_the_model_loads(tmp_path, scripted_model_dir, eval_fixture_dir, kw, message,
                                                          monkeypatch):
    import spielbench.evaluate as ev

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the settings were checked")

    monkeypatch.setattr(ev, "load_trained", no_load)
    heldout = _write_jsonl(tmp_path / "heldout.jsonl", [{"inputs": " hello", "targets": " yes"}])
    with pytest.raises(InputError, match=message):
        evaluate_run(base=scripted_model_dir, tasks="boolq", eval_dir=eval_fixture_dir, heldout=heldout,
                     output=tmp_path / "r.json", **kw)
    assert not (tmp_path / "r.json").exists()
