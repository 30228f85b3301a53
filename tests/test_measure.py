"""Measurement helpers: atomic JSON, held-out loss, exact trainable-state bytes, step records, provenance."""
from __future__ import annotations

import json
import re

import pytest
import torch

from spielbench import fsio, measure


def test_write_json_atomic_replaces_whole_file_and_keeps_old_on_failure(tmp_path):
    path = tmp_path / "sub" / "m.json"
    fsio.write_json_atomic(path, {"a": 1, "t": torch.tensor(2.5)})
    assert json.loads(path.read_text()) == {"a": 1, "t": 2.5}
    with pytest.raises(TypeError):
        fsio.write_json_atomic(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"a": 1, "t": 2.5}
    assert [p.name for p in path.parent.iterdir()] == ["m.json"]  # no temp file left behind


def test_trainable_state_bytes_counts_params_grads_and_optimizer_state_exactly():
    lin = torch.nn.Linear(4, 3)  # 12 + 3 float32 parameters
    frozen = torch.nn.Linear(5, 5).requires_grad_(False)
    model = torch.nn.Sequential(lin, torch.nn.ReLU(), torch.nn.Linear(3, 5, bias=False), frozen)
    model[2].weight = torch.nn.Parameter(torch.zeros(5, 3))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    n = 12 + 3 + 15
    got = measure.trainable_state_bytes(model, opt)
    assert got["trainable_param_bytes"] == 4 * n
    assert got["gradient_bytes"] == 4 * n
    # AdamW: exp_avg + exp_avg_sq per parameter (fp32) + a 0-d float32 step counter per tensor
    assert got["optimizer_state_bytes"] == 2 * 4 * n + 3 * 4
    assert got["trainable_state_bytes"] == 2 * 4 * n + got["optimizer_state_bytes"]


def test_count_parameters_counts_tied_weights_once(tiny_llama):
    from conftest import make_tiny_llama

    tied = make_tiny_llama(tie_word_embeddings=True)
    untied_total = measure.count_parameters(tiny_llama)
    assert measure.count_parameters(tied) == untied_total - tiny_llama.lm_head.weight.numel()
    tied.model.embed_tokens.weight.requires_grad_(False)
    assert measure.count_parameters(tied, trainable_only=True) == measure.count_parameters(tied) \
        - tied.model.embed_tokens.weight.numel()


def test_step_meter_summary_and_resume_truncation():
    m = measure.StepMeter(step_times_s=[1.0, 3.0, 2.0], step_tokens=[10, 20, 30], step_label_tokens=[1, 2, 3],
                          losses=[(1, 3.0), (2, 2.0), (3, 1.5)], train_time_s=7.0)
    s = m.summary()
    assert s["steps"] == 3 and s["tokens_seen"] == 60 and s["label_tokens_seen"] == 6
    assert s["step_time_mean_s"] == pytest.approx(2.0) and s["step_time_p50_s"] == 2.0
    assert s["tokens_per_s"] == pytest.approx(10.0)
    r = measure.StepMeter()
    r.load_state_dict(json.loads(json.dumps(m.state_dict())), upto_step=2)
    assert r.step_times_s == [1.0, 3.0] and r.losses == [(1, 3.0), (2, 2.0)] and r.train_time_s == 7.0
    assert measure.StepMeter().summary()["tokens_per_s"] is None


def test_peak_memory_and_provenance():
    scope = measure.reset_peak_memory("cpu")
    block = torch.ones(8 * 1024 * 1024, dtype=torch.uint8)  # 8 MiB touched
    mem = measure.peak_memory("cpu", scope)
    assert mem["peak_rss_scope"] == scope and mem["peak_rss_bytes"] > block.numel()
    assert "cuda_max_allocated_bytes" not in mem
    versions = measure.package_versions()
    assert torch.__version__.startswith(versions["torch"]) and versions["python"]
    assert set(measure.RECORDED_PACKAGES) <= set(versions)
    git = measure.git_commit()
    assert git["commit"] is None or re.fullmatch(r"[0-9a-f]{40}", git["commit"])
    assert measure.device_description("cpu")["device"] == "cpu"


def test_dir_size_bytes(tmp_path):
    (tmp_path / "a").write_bytes(b"x" * 10)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b").write_bytes(b"y" * 5)
    assert measure.dir_size_bytes(tmp_path) == 15
    assert measure.dir_size_bytes(tmp_path / "missing") == 0
