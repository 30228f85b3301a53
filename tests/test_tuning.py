"""Learning-rate selection: grids, grid points, the choice with its edge flag, the results files, one grid
point trained in process (and a diverged one recorded, not raised), and the run seed's two effects."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from spielbench import tuning as T
from spielbench.aggregate.tuning import TUNING_FILES, grid_markdown, write_tuning_results


def test_select_learning_rate_interior_edges_divergence_and_ties():
    s = T.select_learning_rate([(1e-3, 2.1), (3e-4, 2.3), (3e-3, 2.2)])  # unsorted input
    assert s == T.Selection(1e-3, 2.1, None)
    assert T.select_learning_rate([(1e-4, 2.0), (3e-4, 2.1), (1e-3, 2.2)]).at_edge == "low"
    assert T.select_learning_rate([(1e-4, 2.3), (3e-4, 2.2), (1e-3, 2.1)]).at_edge == "high"
    # the largest rate diverged: it is never chosen, but it still bounds the grid (the choice is interior)
    s = T.select_learning_rate([(1e-4, 2.3), (3e-4, 2.1), (1e-3, None), (3e-3, math.nan)])
    assert s == T.Selection(3e-4, 2.1, None)
    assert T.select_learning_rate([(1e-4, 2.0), (3e-4, 2.0), (1e-3, 2.5)]).learning_rate == 1e-4  # tie: smaller
    with pytest.raises(T.TuningError, match="lora-r16: every grid point diverged"):
        T.select_learning_rate([(1e-3, None), (3e-3, None)], "lora-r16")
    with pytest.raises(T.TuningError, match="no grid point"):
        T.select_learning_rate([], "x")


def test_grids_must_give_every_method_the_same_budget():
    assert T.check_grids({"lora": [1e-4, 3e-4, 1e-3], "full": [1e-5, 3e-5, 1e-4]}) == 3
    with pytest.raises(T.TuningError, match="same number of grid points"):
        T.check_grids({"lora": [1e-4, 3e-4, 1e-3], "full": [1e-5, 3e-5, 1e-4, 3e-4]})
    with pytest.raises(T.TuningError, match="tuning.grids.lora: the learning rates must be distinct and increasing"):
        T.check_grids({"lora": [1e-3, 3e-4, 1e-4]})
    with pytest.raises(T.TuningError, match="tuning.grids.full: expected a list of at least 3"):
        T.check_grids({"full": [1e-5, 1e-4]})
    with pytest.raises(T.TuningError, match="positive"):
        T.check_grids({"lora": [0.0, 1e-4, 1e-3]})


def _runs():
    runs = {
        "lora-r16-s1": {"method": "lora", "rank": 16, "seed": 1, "max_steps": 120, "learning_rate": None},
        "lora-r16-s2": {"method": "lora", "rank": 16, "seed": 2, "max_steps": 120, "learning_rate": None},
        "full": {"method": "full", "rank": None, "seed": 42, "max_steps": 120, "learning_rate": None},
        "lora-r4": {"method": "lora", "rank": 4, "seed": 42, "max_steps": 120, "learning_rate": 1e-3},
    }
    return runs


def test_tuned_targets_and_grid_points():
    runs = _runs()
    grids = {"lora": [1e-4, 3e-4, 1e-3], "full": [1e-5, 3e-5, 1e-4]}
    targets = T.tuned_targets(runs, grids)
    assert list(targets) == ["lora-r16", "full"]  # lora-r4 gives its own learning rate; the seeds share a target
    assert targets["lora-r16"]["seed"] == 1
    points = T.grid_points(targets, grids, max_steps=30, validation_file="v.jsonl", validation_examples=90)
    assert list(points) == ["lora-r16-lr0.0001", "lora-r16-lr0.0003", "lora-r16-lr0.001",
                            "full-lr1e-05", "full-lr3e-05", "full-lr0.0001"]
    p = points["full-lr3e-05"]
    assert p["learning_rate"] == 3e-5 and p["max_steps"] == 30 and p["heldout_data"] == "v.jsonl"
    assert p["heldout_examples"] == 90 and p["run_id"] == "full-lr3e-05"
    assert p["_tune"] == {"target": "full", "learning_rate": 3e-5}
    assert runs["full"]["max_steps"] == 120  # the final run's config is not touched
    with pytest.raises(T.TuningError, match="'full' has no learning_rate .* tuning.grids has no grid"):
        T.tuned_targets(runs, {"lora": grids["lora"]})


def _scores():
    def s(target, method, rank, lr, loss, status="ok"):
        return {"format": T.POINT_FORMAT, "point": f"{target}-lr{lr:g}", "target": target, "method": method,
                "rank": rank, "learning_rate": lr, "status": status, "validation_loss": loss}
    return [s("lora-r16", "lora", 16, 1e-3, 2.10), s("lora-r16", "lora", 16, 1e-4, 2.30),
            s("lora-r16", "lora", 16, 3e-4, 2.20),
            s("full", "full", None, 1e-5, 2.05), s("full", "full", None, 3e-5, 2.15),
            s("full", "full", None, 1e-4, None, "diverged")]


def test_results_files_chosen_table_edge_flag_and_figure(tmp_path):
    paths = write_tuning_results(_scores(), tmp_path / "tuning")
    assert [p.name for p in paths] == list(TUNING_FILES) and all(p.is_file() for p in paths)
    chosen = json.loads((tmp_path / "tuning" / "chosen_lr.json").read_text())
    assert chosen["format"] == T.CHOSEN_FORMAT
    assert chosen["targets"]["lora-r16"]["learning_rate"] == 1e-3 and chosen["targets"]["lora-r16"]["at_edge"] == "high"
    assert chosen["targets"]["full"]["learning_rate"] == 1e-5 and chosen["targets"]["full"]["at_edge"] == "low"
    assert [p["learning_rate"] for p in chosen["targets"]["lora-r16"]["grid"]] == [1e-4, 3e-4, 1e-3]
    md = (tmp_path / "tuning" / "lr_grid.md").read_text()
    assert "| LoRA r=16 | 0.0001: 2.3000 | 0.0003: 2.2000 | **0.001: 2.1000** | 0.001 | 2.1000 | **at the high edge** |" in md
    assert "0.0001: DIVERGED" in md and "2 of 2 chosen values at a grid edge" in md
    csv = (tmp_path / "tuning" / "lr_grid.csv").read_text().splitlines()
    assert csv[0] == "target,method,rank,learning_rate,validation_loss,status,chosen,at_edge" and len(csv) == 7
    assert (tmp_path / "tuning" / "lr_grid.png").read_bytes()[:4] == b"\x89PNG"
    # an interior choice is not flagged
    scores = _scores()
    scores[1]["validation_loss"] = 2.0
    scores[0]["validation_loss"] = 2.2
    scores[2]["validation_loss"] = 1.9
    last = grid_markdown(T.choose_all(scores)).splitlines()[-1]
    assert last.startswith("1 of 2 chosen values at a grid edge: ") and "LoRA" not in last


def test_every_point_of_a_target_diverged_writes_nothing(tmp_path):
    scores = [s for s in _scores() if s["target"] == "full"]
    for s in scores:
        s.update(validation_loss=None, status="diverged")
    with pytest.raises(T.TuningError, match="full: every grid point diverged"):
        write_tuning_results(scores, tmp_path / "tuning")
    assert not (tmp_path / "tuning").exists()


def test_apply_chosen():
    chosen = T.choose_all(_scores())
    run = {"method": "lora", "rank": 16, "learning_rate": None, "seed": 2}
    assert T.apply_chosen(run, chosen, tuned=True) == {**run, "learning_rate": 1e-3}
    assert T.apply_chosen(run, chosen, tuned=False) is run
    with pytest.raises(T.TuningError, match="no learning rate for 'lora-r4'"):
        T.apply_chosen({"method": "lora", "rank": 4}, chosen, tuned=True)


def _point_yaml(tmp_path, files, lr, **over):
    from fixtures_train import tiny_run_config

    cfg = tiny_run_config(files, "lora", max_steps=2, learning_rate=lr, run_id=f"lora-r2-lr{lr:g}", **over).to_dict()
    cfg["_tune"] = {"target": "lora-r2", "learning_rate": lr}
    path = tmp_path / f"{lr:g}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_train_point_scores_on_the_validation_file(tmp_path, tiny_run_files, torch_single_thread):
    path = _point_yaml(tmp_path, tiny_run_files, 1e-2)
    score = T.train_point(path, tmp_path / "out", tmp_path / "score.json")
    assert json.loads((tmp_path / "score.json").read_text()) == score
    assert score["status"] == "ok" and score["steps"] == 2 and score["validation_examples"] == 16
    assert score["target"] == "lora-r2" and score["learning_rate"] == 1e-2 and score["rank"] == 2
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert score["validation_loss"] == pytest.approx(metrics["heldout_loss"])


def test_train_point_records_a_diverged_run(tmp_path, tiny_run_files, monkeypatch):
    import spielbench.train as train

    def diverge(prep, progress=True):
        raise train.NonFiniteLossError("loss is nan at step 1")

    monkeypatch.setattr(train, "run_training", diverge)
    score = T.train_point(_point_yaml(tmp_path, tiny_run_files, 10.0), tmp_path / "out", tmp_path / "s.json")
    assert score["status"] == "diverged" and score["validation_loss"] is None and "nan" in score["detail"]
    with pytest.raises(Exception, match="not a tuning grid point"):
        bad = tmp_path / "bad.yaml"
        bad.write_text(yaml.safe_dump({"method": "lora"}))
        T.train_point(bad, tmp_path / "o2", tmp_path / "s2.json")


def test_the_run_seed_changes_initial_indices_adapter_initialisation_and_data_order(tmp_path, tiny_run_files,
                                                                                     torch_single_thread):
    """The final runs' seeds must differ in what they randomise: SpIEL's initial index set, LoRA's
    initialisation, and the order of the training examples (one seed changes all three)."""
    from safetensors.torch import load_file
    from transformers import Trainer

    from fixtures_train import tiny_run_config
    from spielbench.data import make_collator
    from spielbench.train import _training_arguments, prepare_run, run_training

    def trained(method, seed, key):
        # one step: before SpIEL's first reselection (at step γ = 2), so its indices are the initial ones
        cfg = tiny_run_config(tiny_run_files, method, seed=seed, max_steps=1, save_steps=1)
        out = tmp_path / f"{method}-{seed}-{key}"
        run_training(prepare_run(cfg, out), progress=False)
        return load_file(str(out / "adapter" / "adapter_model.safetensors"))

    def same(a, b, part):
        keys = sorted(k for k in a if part in k)
        assert keys
        return all(a[k].shape == b[k].shape and bool((a[k] == b[k]).all()) for k in keys)

    s1, s1b, s2 = trained("spiel-ag", 1, "a"), trained("spiel-ag", 1, "b"), trained("spiel-ag", 2, "a")
    assert same(s1, s1b, "indices") and not same(s1, s2, "indices")
    l1, l1b, l2 = trained("lora", 1, "a"), trained("lora", 1, "b"), trained("lora", 2, "a")
    assert same(l1, l1b, "lora_A") and not same(l1, l2, "lora_A")

    def first_batches(seed):
        prep = prepare_run(tiny_run_config(tiny_run_files, "lora", seed=seed), tmp_path / f"order-{seed}")
        from transformers import AutoModelForCausalLM

        trainer = Trainer(model=AutoModelForCausalLM.from_pretrained(tiny_run_files["model"]),
                          args=_training_arguments(prep), train_dataset=prep.train_dataset,
                          data_collator=make_collator(prep.tokenizer))
        loader = iter(trainer.get_train_dataloader())
        return [next(loader)["input_ids"].tolist() for _ in range(3)]

    assert first_batches(1) == first_batches(1) != first_batches(2)


def _pipeline_config(**over):
    from snakemake.utils import validate

    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "config" / "smoke.yaml").read_text())
    cfg.update(over)
    validate(cfg, str(Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.yaml"))
    return cfg


def test_pipeline_resolves_tuned_runs_and_rejects_what_cannot_be_tuned(tmp_path):
    from spielbench.pipeline import PipelineConfigError, resolve_pipeline

    pipe = resolve_pipeline(_pipeline_config(), check_device=False, check_model=False)
    assert pipe.tuned == {"lora-r2": "lora-r2"} and list(pipe.tune_targets) == ["lora-r2"]
    assert pipe.validation_file == "resources/data/mixture/validation.jsonl"
    assert "learning_rate" not in pipe.runs["lora-r2"] and pipe.runs["full"]["learning_rate"] == 1e-4
    cfg = _pipeline_config()
    cfg["runs"].append({"method": "ia3"})
    with pytest.raises(PipelineConfigError, match=r"runs\[4\].learning_rate: .*no grid for method 'ia3'"):
        resolve_pipeline(cfg, check_device=False, check_model=False)
    cfg = _pipeline_config()
    cfg["tuning"]["grids"]["full"] = [1e-5, 3e-5, 1e-4, 3e-4]
    with pytest.raises(PipelineConfigError, match="same number of grid points"):
        resolve_pipeline(cfg, check_device=False, check_model=False)
    # a local data.train: its split draws a validation set too; with a given data.heldout there is no split,
    # so tuning needs data.validation
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"inputs": f"q{i}", "targets": f"a{i}"}) + "\n" for i in range(40)))
    cfg = _pipeline_config()
    cfg["data"] = {**cfg["data"], "train": str(train)}
    pipe = resolve_pipeline(cfg, check_device=False, check_model=False)
    assert pipe.validation_file == str(Path(pipe.train_file).with_name("validation.jsonl"))
    cfg["data"]["heldout"] = str(train)
    with pytest.raises(PipelineConfigError, match=r"data.validation: runs \['lora-r2'\]"):
        resolve_pipeline(cfg, check_device=False, check_model=False)
    val = tmp_path / "val.jsonl"
    val.write_text(train.read_text())
    cfg["data"]["validation"] = str(val)
    assert resolve_pipeline(cfg, check_device=False, check_model=False).validation_file == str(val)


def test_user_split_draws_a_disjoint_validation_set(tmp_path, chat_tokenizer):
    from spielbench.data import split_user_data

    src = tmp_path / "mine.jsonl"
    src.write_text("".join(json.dumps({"inputs": f"question {i}", "targets": f"answer {i}"}) + "\n"
                           for i in range(100)))
    out = {k: tmp_path / f"{k}.jsonl" for k in ("train", "heldout", "validation")}
    rep = split_user_data(src, chat_tokenizer, 64, out["train"], out["heldout"], tmp_path / "report.json",
                          heldout_examples=10, seed=3, validation_out=out["validation"], validation_examples=9)
    rows = {k: [json.loads(x) for x in p.read_text().splitlines()] for k, p in out.items()}
    lines = {k: {r["origin"]["line"] for r in v} for k, v in rows.items()}
    assert (rep["train"], rep["heldout"], rep["validation"]) == (81, 10, 9)
    assert {k: len(v) for k, v in lines.items()} == {"train": 81, "heldout": 10, "validation": 9}
    assert not lines["validation"] & lines["heldout"] and not lines["validation"] & lines["train"]
    assert len(lines["train"] | lines["heldout"] | lines["validation"]) == 100
    # without a validation file the split is as before
    rep = split_user_data(src, chat_tokenizer, 64, out["train"], out["heldout"], tmp_path / "report.json",
                          heldout_examples=10, seed=3)
    assert (rep["train"], rep["heldout"], rep["validation"]) == (90, 10, 0)


def test_defaults_have_one_value_in_the_schema_and_the_code():
    from spielbench import assets
    from spielbench.aggregate.noninferiority import DEFAULT_MARGINS

    schema = yaml.safe_load((Path(__file__).resolve().parents[1] / "workflow" / "schemas"
                             / "config.schema.yaml").read_text())
    margins = schema["properties"]["claims"]["properties"]["margins"]["properties"]
    assert {k: v["default"] for k, v in margins.items()} == DEFAULT_MARGINS
    assert all(v["default"] == v["maximum"] for v in margins.values())  # the upper bounds
    mixture = schema["properties"]["data"]["properties"]["mixture"]["properties"]
    assert mixture["validation_per_task"]["default"] == assets.DEFAULT_VALIDATION_PER_TASK
    assert mixture["heldout_per_task"]["default"] == assets.DEFAULT_HELDOUT_PER_TASK
