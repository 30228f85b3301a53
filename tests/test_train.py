"""The training harness: every method end to end, exact kill-and-resume, gradient accumulation, the
run config, bad input (exit 2, nothing written), non-finite loss, and the real model (slow)."""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fixtures_train import tiny_run_config
from transformers import TrainerCallback

from spielbench.errors import InputError
from spielbench.methods import METHODS
from spielbench.runconfig import RunConfig, load_run_config
from spielbench.train import NonFiniteLossError, main, prepare_run, train

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("torch_single_thread")
ALL_METHODS = list(METHODS)


def adapter_tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(adapter_dir.glob("*.safetensors")):
        out.update(load_file(f))
    assert out, f"no safetensors in {adapter_dir}"
    return out


class Killed(Exception):
    """Stands in for a kill: raised from a callback right after an update step."""


class KillAfter(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Killed()


# ------------------------------------------------------------------------------------------ every method


@pytest.mark.parametrize("method", ALL_METHODS)
def test_every_method_trains_writes_adapter_and_metrics_and_lowers_heldout_loss(method, tiny_run_files, tmp_path):
    cfg = tiny_run_config(tiny_run_files, method)
    out = tmp_path / "run"
    m = train(cfg, out, progress=False)
    spec = METHODS[method]

    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["method"] == method and on_disk["steps"] == 8 and on_disk == json.loads(json.dumps(m))
    assert (out / "adapter").is_dir() and m["adapter_bytes"] > 0
    assert json.loads((out / "run_config.json").read_text())["config"] == cfg.to_dict()
    assert m["heldout_loss"] < m["heldout_loss_before"] - 1e-3, (m["heldout_loss_before"], m["heldout_loss"])
    assert m["budget"]["trainable_params"] == m["budget"]["expected_trainable_params"] > 0
    assert [p["step"] for p in m["loss_curve"]] == list(range(1, 9))
    assert m["tokens_seen"] > m["label_tokens_seen"] > 0 and m["tokens_per_s"] > 0
    assert m["step_time_p50_s"] > 0 and m["wall_time_s"] >= m["train_time_s"] > 0
    mem = m["memory"]
    assert mem["peak_rss_bytes"] > 0
    assert mem["trainable_param_bytes"] == 4 * m["budget"]["trainable_params"]  # float32 on CPU
    assert mem["optimizer_state_bytes"] > 0
    n = m["budget"]["trainable_params"]
    assert mem["index_bytes"] == {"spiel": 4 * n, "shira": 8 * n}.get(spec.family, 0)  # int32 flat / int32 row+col
    assert m["packages"]["transformers"] and m["device"]["device"] == "cpu"
    if spec.needs_selector:
        steps = [h["step"] for h in m["selector_history"]]
        assert steps == [2, 6] and m["selector_history"][0]["rate"] == 1.0
    elif spec.family == "spiel":
        assert m["selector_history"] == []  # static mask: no reselection
    else:
        assert m["selector_history"] is None

    # the saved adapter is the trained one: reloading it reproduces the held-out loss
    from spielbench.data import make_collator
    from spielbench.heldout import heldout_loss
    from spielbench.trained import load_trained

    prep = prepare_run(cfg, tmp_path / "unused")
    reloaded, _, _ = load_trained(cfg.model, out / "adapter", method=method)
    again = heldout_loss(reloaded, prep.heldout_dataset, make_collator(prep.tokenizer), batch_size=4)
    assert again["loss"] == pytest.approx(m["heldout_loss"], rel=1e-5, abs=1e-6)


# ------------------------------------------------------------------------------------- kill and resume


@pytest.mark.parametrize("method", ["spiel-ag", "spiel-ma", "lora", "qlora"])
def test_killed_run_resumes_to_the_same_adapter(method, tiny_run_files, tmp_path):
    """Killed after step 5 (checkpoint at 4, inside an open SpIEL selection phase), rerun to the end."""
    cfg = tiny_run_config(tiny_run_files, method, heldout_examples=4)
    whole = train(cfg, tmp_path / "a", progress=False)
    with pytest.raises(Killed):
        train(cfg, tmp_path / "b", progress=False, callbacks=[KillAfter(5)])
    assert not (tmp_path / "b" / "metrics.json").exists()
    assert (tmp_path / "b" / "checkpoints" / "checkpoint-4").is_dir()
    resumed = train(cfg, tmp_path / "b", progress=False)

    assert resumed["training"]["resumed_from_step"] == 4 and resumed["steps"] == 8
    ta, tb = adapter_tensors(tmp_path / "a" / "adapter"), adapter_tensors(tmp_path / "b" / "adapter")
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    assert resumed["loss_curve"] == whole["loss_curve"]
    assert resumed["heldout_loss"] == whole["heldout_loss"]
    assert resumed["heldout_loss_before"] == whole["heldout_loss_before"]
    if METHODS[method].needs_selector:
        assert resumed["selector_history"] == whole["selector_history"]


def test_rerun_of_a_finished_run_trains_again_to_the_same_adapter(tiny_run_files, tmp_path):
    """A forced rerun over a finished run's output (its last checkpoint at max_steps) must not resume
    there: the Trainer would run a step past max_steps."""
    cfg = tiny_run_config(tiny_run_files, "spiel-ag", heldout_examples=2)
    first = train(cfg, tmp_path, progress=False)
    again = train(cfg, tmp_path, progress=False)
    assert again["steps"] == first["steps"] == cfg.max_steps
    assert again["training"]["resumed_from_step"] is None
    assert [p["step"] for p in again["loss_curve"]] == list(range(1, cfg.max_steps + 1))
    assert again["loss_curve"] == first["loss_curve"]
    assert (tmp_path / "checkpoints.stale").is_dir()


def test_resume_refuses_a_different_config(tiny_run_files, tmp_path):
    cfg = tiny_run_config(tiny_run_files, "lora", max_steps=3, save_steps=1, heldout_examples=2)
    with pytest.raises(Killed):
        train(cfg, tmp_path, progress=False, callbacks=[KillAfter(2)])
    changed = tiny_run_config(tiny_run_files, "lora", max_steps=3, save_steps=1, heldout_examples=2,
                              learning_rate=5e-3)
    with pytest.raises(InputError, match=r"learning_rate: .* holds checkpoints of a run with learning_rate=0.01"):
        prepare_run(changed, tmp_path)
    prepare_run(tiny_run_config(tiny_run_files, "lora", max_steps=3, save_steps=1, heldout_examples=2,
                                run_id="renamed"), tmp_path)  # the run id alone may change
    # the pipeline's choice: a changed setting is a new run; the old checkpoints are moved aside
    prep = prepare_run(changed, tmp_path, restart_if_changed=True)
    assert prep.resume_from is None
    assert not (tmp_path / "checkpoints").exists() and any((tmp_path / "checkpoints.stale").iterdir())


# ----------------------------------------------------------------------------------- loss normalisation


class CaptureGrads(TrainerCallback):
    grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        CaptureGrads.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        raise Killed()


def test_gradient_accumulation_equals_one_large_batch(tiny_run_files, tmp_path):
    """k micro-batches of b examples give the gradient of one batch of k*b: the loss is normalised by
    the label tokens of the whole accumulated batch (not averaged per micro-batch)."""
    from spielbench.data import make_collator
    from spielbench.methods import get_method
    from spielbench.train import token_mean_loss

    grads = {}
    for bs, ga in [(4, 1), (2, 2), (1, 4)]:
        cfg = tiny_run_config(tiny_run_files, "full", max_train_examples=4, per_device_train_batch_size=bs,
                              gradient_accumulation_steps=ga, heldout_data=None)
        with pytest.raises(Killed):
            train(cfg, tmp_path / f"{bs}x{ga}", progress=False, callbacks=[CaptureGrads()])
        grads[(bs, ga)] = CaptureGrads.grads

    # reference: the token-mean loss over all 4 examples in one batch, and the per-micro-batch mean
    prep = prepare_run(cfg, tmp_path / "unused")
    feats = [prep.train_dataset[i] for i in range(4)]
    assert len({sum(x != -100 for x in f["labels"]) for f in feats}) > 1  # examples differ in label tokens
    model = get_method("full").build(get_method("full").load_base(cfg.model, "cpu"), cfg)
    coll = make_collator(prep.tokenizer)

    def grad_of(loss_fn):
        model.zero_grad()
        loss_fn().backward()
        return {n: p.grad.detach().clone() for n, p in model.named_parameters()}

    def whole():
        b = coll(feats)
        return token_mean_loss(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]), b["labels"])

    def mean_of_means():
        losses = []
        for part in (feats[:2], feats[2:]):
            b = coll(part)
            losses.append(token_mean_loss(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]),
                                          b["labels"]))
        return sum(losses) / 2

    ref, naive = grad_of(whole), grad_of(mean_of_means)
    name = "model.layers.0.mlp.down_proj.weight"
    assert not torch.allclose(naive[name], ref[name], rtol=1e-3, atol=1e-6)  # the test can tell them apart
    for key, g in grads.items():
        for n in ref:
            assert torch.allclose(g[n], ref[n], rtol=1e-4, atol=1e-7), (key, n)


def test_gradient_checkpointing_does_not_change_training(tiny_run_files, tmp_path, capfd):
    base = dict(max_steps=3, save_steps=10, heldout_examples=2)
    a = train(tiny_run_config(tiny_run_files, "spiel-ag", **base), tmp_path / "off", progress=False)
    b = train(tiny_run_config(tiny_run_files, "spiel-ag", gradient_checkpointing=True, **base), tmp_path / "on",
              progress=True)
    bar = capfd.readouterr().err
    assert "3/3" in bar and "step=3" in bar and "loss=" in bar and "tok_s=" in bar  # the progress bar
    assert [x["step"] for x in a["loss_curve"]] == [x["step"] for x in b["loss_curve"]] == [1, 2, 3]
    assert [x["loss"] for x in a["loss_curve"]] == pytest.approx([x["loss"] for x in b["loss_curve"]], rel=1e-5)
    ta, tb = adapter_tensors(tmp_path / "off" / "adapter"), adapter_tensors(tmp_path / "on" / "adapter")
    assert all(torch.allclose(ta[k].float(), tb[k].float(), rtol=1e-4, atol=1e-7) for k in ta)


# ------------------------------------------------------------------------------------------ failures


def test_non_finite_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(tiny_run_files, tmp_path, capfd):
    cfg = tiny_run_config(tiny_run_files, "full", learning_rate=1e30, save_steps=1, heldout_examples=2)
    cfg_file = tmp_path / "run.json"
    cfg_file.write_text(json.dumps(cfg.to_dict()))
    out = tmp_path / "out"
    assert main([str(cfg_file), "--output-dir", str(out), "--no-progress"]) == 1
    err = capfd.readouterr().err
    assert re.search(r"error: training loss is (nan|inf|-inf) at update step 2", err), err
    assert "the last checkpoint kept is" in err and "checkpoint-1" in err
    assert (out / "checkpoints" / "checkpoint-1" / "trainer_state.json").is_file()
    assert not (out / "metrics.json").exists() and not (out / "adapter").exists()
    with pytest.raises(NonFiniteLossError):
        train(cfg, tmp_path / "again", progress=False)


def test_diverged_run_is_recorded_evaluated_and_tabulated_as_a_row(tiny_run_files, tmp_path, capfd,
                                                                    eval_fixture_dir):
    from spielbench.aggregate.loading import make_record
    from spielbench.aggregate.tables import main_table
    from spielbench.evaluate import main as evaluate_main
    from spielbench.records import Divergence, EvalResult, RunMetrics

    cfg = tiny_run_config(tiny_run_files, "lora", learning_rate=1e30, save_steps=1, heldout_examples=2,
                          run_id="lora-diverged")
    cfg_file = tmp_path / "run.json"
    cfg_file.write_text(json.dumps(cfg.to_dict()))
    out = tmp_path / "lora-diverged"
    assert main([str(cfg_file), "--output-dir", str(out), "--no-progress", "--record-divergence"]) == 0
    assert "diverged" in capfd.readouterr().err
    m = json.loads((out / "metrics.json").read_text())
    assert m["status"] == "diverged" and m["diverged_at_step"] == 2 and m["steps"] == 1
    assert [p["step"] for p in m["loss_curve"]] == [1] and math.isfinite(m["loss_curve"][0]["loss"])
    assert m["heldout_loss"] is None and m["memory"] is None and m["tokens_per_s"] is None
    assert isinstance(m["heldout_loss_before"], float) and m["budget"]["trainable_params"] > 0
    assert sorted(p.name for p in (out / "adapter").iterdir()) == [Divergence.FILE]  # no tensors
    marker = Divergence.read(out / "adapter" / Divergence.FILE)
    assert marker.step == 2 and "training loss is" in marker.detail
    from spielbench.trained import load_trained

    with pytest.raises(InputError, match="diverged in training"):
        load_trained(cfg.model, out / "adapter", method="lora")

    ev = tmp_path / "eval.json"
    assert evaluate_main(["--run", str(out), "--tasks", "boolq,arc_easy", "--eval-dir", str(eval_fixture_dir),
                          "--output", str(ev)]) == 0
    result = json.loads(ev.read_text())
    assert result["status"] == "diverged" and result["heldout"] is None and result["run_id"] == "lora-diverged"
    assert all(t["skipped"] and "step 2" in t["note"] for t in result["tasks"].values())
    assert list(result["tasks"]) == ["boolq", "arc_easy"]

    rec = make_record("lora-diverged", cfg.to_dict(), "Tiny", "mix", RunMetrics.read(out / "metrics.json"),
                      EvalResult.read(ev))
    assert rec.status == "diverged" and rec.heldout is None
    table = main_table([rec], tasks=["boolq", "arc_easy"])
    assert list(table.display["Run"]) == ["lora-diverged (diverged)"]
    assert table.data["heldout_loss"].isna().all() and table.data["boolq"].isna().all()
    assert any("Diverged in training" in n and "lora-diverged" in n for n in table.notes)
    assert not any("shows —" in n for n in table.notes)  # named once as diverged, not as a skipped task


def test_heldout_before_false_skips_the_measurement_before_training(tiny_run_files, tmp_path, monkeypatch):
    from spielbench import heldout, train as train_module
    from spielbench.tuning import grid_points

    calls = []
    real = heldout.heldout_loss
    monkeypatch.setattr(heldout, "heldout_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = tiny_run_config(tiny_run_files, "lora", heldout_before=False, heldout_examples=2, max_steps=2)
    m = train_module.train(cfg, tmp_path / "out", progress=False)
    assert calls == [1]  # after training only
    assert m["heldout_loss_before"] is None and isinstance(m["heldout_loss"], float) and m["heldout_tokens"] > 0
    assert not (tmp_path / "out" / "checkpoints" / train_module.HELDOUT_BEFORE_FILE).exists()
    # the tune stage's grid points all train from the same base model: none measures it before training
    points = grid_points({"lora-r2": cfg.to_dict()}, {"lora": [1e-4, 1e-3]}, max_steps=2,
                         validation_file=tiny_run_files["heldout"], validation_examples=2)
    assert [p["heldout_before"] for p in points.values()] == [False, False]
    assert RunConfig(**{k: v for k, v in cfg.to_dict().items()}).heldout_before is False


def _write_cfg(path: Path, files: dict, **fields) -> Path:
    data = {"method": "lora", "model": files["model"], "train_data": files["train"], "rank": 2, "max_steps": 2,
            "max_seq_length": 48}
    data.update(fields)
    path.write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in data.items()) + "\n")
    return path


@pytest.mark.parametrize("fields, overrides, message", [
    ({"method": "dora"}, [], r"method: expected one of lora, .*, got 'dora'$"),
    ({"rank": 40}, [], r"rank: 40 is larger than the layer allows: .*k_proj \(64 -> 32\) admits at most rank 32"),
    ({}, ["method=shira", "rank=22"],
     r"rank: 22 is larger than the layer allows: .*k_proj \(64 -> 32\) admits at most rank 21 for shira"),
    ({"method": "spiel-ag", "rank": 50}, [], r"rank: 50 is larger than the layers allow for spiel-ag"),
    ({"train_data": "missing.jsonl"}, [], r"train_data: file missing.jsonl does not exist"),
    ({}, ["heldout_data=nowhere/h.jsonl"], r"heldout_data: file nowhere/h.jsonl does not exist"),
    ({"max_seq_length": 28}, [], r"train_data: no example of .*train.jsonl has an assistant response token within "
                                 r"max_seq_length=28 \(64 read, 64 dropped\)"),
    ({"lerning_rate": 0.1}, [], r"unknown key 'lerning_rate'; known keys: .*learning_rate"),
    ({}, ["max_steps=0"], r"max_steps: expected an integer >= 1, got 0"),
    ({}, ["seed"], r"--set 'seed': expected key=value"),
    ({"model": "no/such/model"}, [], r"model: no/such/model is not a model folder \(config.json expected\)"),
    # non-finite numbers: rejected by the run config (they used to write run_config.json, then crash)
    ({}, ["learning_rate=.inf"], r"learning_rate: expected a finite number, got inf"),
    ({}, ["weight_decay=.nan"], r"weight_decay: expected a finite number, got nan"),
    ({"method": "spiel-ag"}, ["spiel.initial_reselection_rate=.nan"],
     r"spiel.initial_reselection_rate: expected a finite number, got nan"),
    # the chat template of the tiny model takes 19 tokens for an empty user turn (ChatML, one token per byte)
    ({"max_seq_length": 8}, [], r"max_seq_length: 8 leaves no room for a response: the chat template alone takes "
                                r"19 tokens for an empty user turn; use at least 27"),
    # an unknown target module is named as such (it used to be reported as a rank error)
    ({"method": "spiel-ag"}, ["spiel.target_modules=[q_proj, nope_proj]"],
     r"spiel.target_modules: unknown module name\(s\) \['nope_proj'\]; the model's linear layers are named "
     r"down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj$"),
    ({"method": "spiel-ag"}, ["spiel.target_modules=mlp\\..*_nope"], r"spiel.target_modules: .*matched no module"),
    ({"max_seq_length": 100000}, [], r"max_seq_length: 100000 is longer than the model's context "
                                     r"\(max_position_embeddings = \d+\)"),
])
def test_bad_input_exits_2_with_one_message_and_writes_nothing(fields, overrides, message, tiny_run_files,
                                                               tmp_path, capfd):
    cfg = _write_cfg(tmp_path / "run.yaml", tiny_run_files, **fields)
    out = tmp_path / "out"
    argv = [str(cfg), "--output-dir", str(out)] + [x for o in overrides for x in ("--set", o)]
    assert main(argv) == 2
    err = capfd.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and re.search(message, err), err
    assert not out.exists()


def test_output_dir_that_is_a_file_exits_2(tiny_run_files, tmp_path, capfd):
    cfg = _write_cfg(tmp_path / "run.yaml", tiny_run_files)
    (tmp_path / "afile").write_text("mine\n")
    assert main([str(cfg), "--output-dir", str(tmp_path / "afile")]) == 2
    assert capfd.readouterr().err.strip() == f"error: --output-dir: {tmp_path / 'afile'} exists and is not a folder"
    assert (tmp_path / "afile").read_text() == "mine\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_device_without_cuda_exits_2_and_writes_nothing(tiny_run_files, tmp_path, capfd):
    cfg = _write_cfg(tmp_path / "run.yaml", tiny_run_files, device="cuda")
    assert main([str(cfg), "--output-dir", str(tmp_path / "out")]) == 2
    err = capfd.readouterr().err.strip()
    assert err == "error: device: 'cuda' requested but CUDA is not available (use 'cpu' or 'auto')"
    assert not (tmp_path / "out").exists()


def test_target_modules_subset_trains_only_those_layers(tiny_run_files, tmp_path):
    """A valid ``spiel.target_modules`` passes the check and the budget is allocated over those layers only."""
    from spielbench.methods import get_method
    from spielbench.train import prepare_run

    cfg = tiny_run_config(tiny_run_files, "spiel-ag", spiel={"target_modules": ["q_proj", "v_proj"]})
    prep = prepare_run(cfg, tmp_path / "out")
    # LoRA-equivalent budget at rank 2 over q_proj (64 -> 64) and v_proj (64 -> 32) of 2 layers, floored per
    # matrix (short of it by less than the 4 matrices)
    n = 2 * 2 * ((64 + 64) + (64 + 32))
    assert n - 4 < prep.budget["trainable_params"] <= n
    assert get_method("spiel-ag").spiel_config(cfg).target_modules == ["q_proj", "v_proj"]
    assert not (tmp_path / "out").exists()


def test_dropped_and_skipped_examples_are_reported_on_the_console_and_in_metrics(tiny_run_files, tmp_path, capfd):
    """Dropped examples used to be counted only inside metrics.json; now each drop is reported with its file and
    line on the console and in ``metrics.json['dropped_examples']`` (the existing fields stay)."""
    lines = Path(tiny_run_files["train"]).read_text().splitlines()[:16]
    lines[3] = json.dumps({"inputs": "Reverse: nothing", "targets": ""})  # empty response, line 4
    lines[6] = json.dumps({"inputs": "Reverse: x"})  # malformed (no targets), line 7
    train_file = tmp_path / "train.jsonl"
    train_file.write_text("\n".join(lines) + "\n")
    split_report = {"source": "mine.json", "read": 20, "train": 16, "heldout": 2,
                    "dropped": {"count": 2, "by_reason": {"empty response": 2},
                                "first": [{"file": "mine.json", "line": 3, "reason": "empty response"},
                                          {"file": "mine.json", "line": 9, "reason": "empty response"}]}}
    (tmp_path / "report.json").write_text(json.dumps(split_report))
    cfg = _write_cfg(tmp_path / "run.yaml", tiny_run_files, train_data=str(train_file), on_malformed="skip",
                     data_report=str(tmp_path / "report.json"), per_device_train_batch_size=2,
                     gradient_accumulation_steps=1)
    out = tmp_path / "out"
    assert main([str(cfg), "--output-dir", str(out), "--no-progress"]) == 0
    err = capfd.readouterr().err
    assert (f"note: train_data: dropped 2 of 16 examples (empty response: 1, malformed record (skipped): 1); "
            f"first: {train_file}:7 (malformed record (skipped): expected a flan record like the first one "
            f"('inputs', 'targets'), got an object with inputs), {train_file}:4 (empty response)") in err
    assert "note: data split: dropped 2 of 20 examples (empty response: 2); first: mine.json:3" in err
    metrics = json.loads((out / "metrics.json").read_text())
    dropped = metrics["dropped_examples"]
    assert dropped["train"]["read"] == 16 and dropped["train"]["dropped"]["count"] == 2
    assert dropped["before_split"] == split_report and dropped["heldout"] is None
    assert metrics["data"]["train"]["kept"] == 14 and metrics["steps"] == 2  # existing fields kept
    with pytest.raises(InputError, match=r"train.jsonl:7: expected a flan record like the first one"):
        prepare_run(load_run_config(cfg, ["on_malformed=error"]), tmp_path / "strict")


def test_command_line_entry_point_rejects_bad_input_before_loading(tiny_run_files, tmp_path):
    cfg = _write_cfg(tmp_path / "run.yaml", tiny_run_files)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "spielbench.train", str(cfg), "--output-dir", str(out),
                           "--set", "method=nope"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: method: expected one of lora, ")
    assert proc.stderr.strip().splitlines()[-1].endswith(", got 'nope'")
    assert not out.exists()


# ------------------------------------------------------------------------------------------ run config


def test_run_config_file_overrides_and_types(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("method: spiel-ag\nmodel: m\ntrain_data: t.jsonl\nlearning_rate: 1e-4\nrank: 8\n"
                    "spiel:\n  reselection_steps: 10\n")
    cfg = load_run_config(path, ["gradient_checkpointing=true", "spiel.initial_reselection_rate=0.1", "rank=4",
                                 "heldout_data=null"])
    assert cfg.learning_rate == 1e-4 and isinstance(cfg.learning_rate, float)  # YAML 1.1 reads 1e-4 as a string
    assert cfg.gradient_checkpointing is True and cfg.rank == 4 and cfg.heldout_data is None
    assert cfg.spiel == {"reselection_steps": 10, "initial_reselection_rate": 0.1}
    assert RunConfig.from_mapping(cfg.to_dict()) == cfg
    assert (cfg.warmup_ratio, cfg.max_grad_norm, cfg.seed, cfg.save_steps) == (0.03, 0.0, 42, 50)


@pytest.mark.parametrize("text, message", [
    ("method: lora\nmodel: m\n", r"missing required key 'train_data'"),
    ("method: lora\nmodel: m\ntrain_data: t\nrank: two\n", r"rank: expected an integer, got 'two'"),
    ("method: lora\nmodel: m\ntrain_data: t\nwarmup_ratio: 1.5\n", r"warmup_ratio: expected a number in \[0, 1\), got 1.5"),
    ("method: lora\nmodel: m\ntrain_data: t\ngradient_checkpointing: 3\n",
     r"gradient_checkpointing: expected true or false"),
    ("method: lora\nmodel: [m\n", r"r.yaml line \d+: not valid YAML"),
    ("- a\n- b\n", r"expected a mapping of run-config fields, got list"),
    ("method: lora\nmodel: m\ntrain_data: t\ndevice: tpu\n", r"device: expected a string matching .*cpu\|cuda.*, got 'tpu'"),
])
def test_run_config_errors_name_the_field(tmp_path, text, message):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(InputError, match=message):
        load_run_config(path)


def test_missing_run_config_file(tmp_path):
    with pytest.raises(InputError, match=r"run config: file .*none.yaml does not exist"):
        load_run_config(tmp_path / "none.yaml")


# ------------------------------------------------------------------------------------------ real model


@pytest.mark.slow
@pytest.mark.parametrize("method", ["spiel-ag", "qspiel-ma"])
def test_real_smollm2_on_the_mixture(method, real_model_dir, tmp_path, capfd):
    """A few steps of the real SmolLM2-135M on the default mixture: adapter + metrics, LoRA-matched budget.

    SpIEL-AG and the 4-bit SpIEL-MA stand for all methods here (about 20 s each on a loaded 2-core
    machine); every method runs end to end on the tiny model above.
    """
    mixture = REPO / "resources" / "data" / "mixture"
    if not (mixture / "train.jsonl").is_file():
        pytest.skip("the mixture is not built (snakemake assets)")
    cfg = RunConfig(method=method, model=str(real_model_dir), train_data=str(mixture / "train.jsonl"),
                    heldout_data=str(mixture / "heldout.jsonl"), rank=4, max_steps=2, per_device_train_batch_size=2,
                    gradient_accumulation_steps=1, max_seq_length=128, max_train_examples=16, heldout_examples=4,
                    save_steps=1, learning_rate=1e-3, warmup_ratio=0.0, spiel={"reselection_steps": 2,
                    "selection_accumulation_steps": 1} if METHODS[method].family == "spiel" else {})
    m = train(cfg, tmp_path / method, progress=True)
    assert "tok_s=" in capfd.readouterr().err  # the progress bar shows tokens/s
    assert m["steps"] == 2 and (tmp_path / method / "adapter").is_dir()
    assert m["budget"]["trainable_params"] == 4 * 30 * (1152 + 768 + 768 + 1152 + 3 * 2112)
    assert m["heldout_loss"] < m["heldout_loss_before"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["qlora", "spiel-ag"])
def test_cuda_run_reports_cuda_memory(method, tiny_run_files, tmp_path):
    """On CUDA: bf16 base (NF4 with bf16 compute for 4-bit), bf16 autocast, CUDA peak memory in the metrics."""
    m = train(tiny_run_config(tiny_run_files, method, device="cuda", max_steps=2, heldout_examples=4),
              tmp_path / method, progress=False)
    assert m["device"]["device"] == "cuda" and m["steps"] == 2
    assert m["memory"]["cuda_max_reserved_bytes"] >= m["memory"]["cuda_max_allocated_bytes"] > 0
