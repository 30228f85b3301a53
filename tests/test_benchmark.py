"""The efficiency benchmark (spielbench.benchmark) and its reference-style SpIEL layer.

Fast tests: the reference layer against a dense fp64 reference and spiel's layer; the schedule weighting;
size shapes; tables; and real fresh-process runs of the ``tiny`` size, including the OOM and timeout
paths. No timing is asserted (timings are measured by the benchmark, never tested).
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from spiel.layer import SparseDeltaLinear
from spielbench import benchmark as B
from spielbench.errors import InputError
from spielbench.reference_layer import ReferenceSparseDeltaLinear, reference_sparse_delta_linear, to_reference_layers

#: The stable fields documented in the module docstring.
DOCUMENTED_FIELDS = ("size", "method", "status", "step_time_mean_s", "step_time_p50_s", "tokens_per_s",
                     "peak_memory_bytes", "peak_rss_bytes", "cuda_max_allocated_bytes", "cuda_max_reserved_bytes",
                     "trainable_params", "adapter_state_bytes", "n_params_model", "device", "batch_size", "seq_len",
                     "steps", "threads", "detail", "oom_kind")


# ------------------------------------------------------------------------------ reference layer
def _pair(out=7, inp=5, k=11, dtype=torch.float64, bias=True):
    torch.manual_seed(0)
    layer = SparseDeltaLinear(nn.Linear(inp, out, bias=bias).to(dtype), k,
                              generator=torch.Generator().manual_seed(1), delta_dtype=dtype)
    with torch.no_grad():
        layer.values.normal_()
    return layer, ReferenceSparseDeltaLinear.from_layer(layer)


def _dense(layer, x, values):
    delta = torch.zeros(layer.dense_numel, dtype=torch.float64).index_put((layer.indices.long(),), values)
    weight = layer.base_weight(torch.float64) + delta.view(layer.out_features, layer.in_features)
    y = x @ weight.t()
    return y if layer.bias is None else y + layer.bias.double()


@pytest.mark.parametrize("bias", [True, False])
def test_reference_layer_forward_and_gradients_match_dense_and_spiel(bias):
    layer, ref = _pair(bias=bias)
    assert torch.equal(ref.indices, layer.indices) and torch.equal(ref.values, layer.values)
    assert ref.base_layer is layer.base_layer
    x = torch.randn(3, 4, layer.in_features, dtype=torch.float64)
    weights = torch.linspace(-1, 1, 3 * 4 * layer.out_features, dtype=torch.float64).view(3, 4, -1)
    dense_values = layer.values.detach().clone().requires_grad_(True)
    runs = {"dense": (lambda xi: _dense(layer, xi, dense_values), dense_values),
            "spiel": (layer, layer.values), "reference": (ref, ref.values)}
    grads = {}
    for name, (fn, values) in runs.items():
        xi = x.clone().requires_grad_(True)
        y = fn(xi)
        (y * weights).sum().backward()
        grads[name] = (y.detach(), xi.grad, values.grad.clone())
    for name in ("spiel", "reference"):
        for got, want in zip(grads[name], grads["dense"]):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    v = ref.values.detach().clone().requires_grad_(True)
    xs = torch.randn(2, layer.in_features, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: reference_sparse_delta_linear(ref, a, b), (xs, v))


def test_reference_layer_hook_gets_dense_weight_gradient_every_backward():
    layer, ref = _pair()
    seen = []
    ref.weight_grad_hook = seen.append
    x = torch.randn(6, layer.in_features, dtype=torch.float64)
    g = torch.randn(6, layer.out_features, dtype=torch.float64)
    ref(x).backward(g)
    assert len(seen) == 1 and seen[0].shape == (layer.out_features, layer.in_features)
    torch.testing.assert_close(seen[0], g.t() @ x)
    torch.testing.assert_close(ref.values.grad, (g.t() @ x).view(-1)[ref.indices.long()])


def test_to_reference_layers_keeps_logits_and_converts_every_layer(tiny_llama):
    import spiel.config
    import spiel.model

    model = spiel.model.get_spiel_model(tiny_llama, spiel.config.SpielConfig(lora_rank_equivalent=2, seed=3))
    with torch.no_grad():
        for _, layer in model.sparse_layers():
            layer.values.normal_(0, 0.1)
    ids = torch.randint(3, 100, (2, 9))
    before = model(input_ids=ids).logits
    n = to_reference_layers(model)
    layers = model.sparse_layers()
    assert n == len(layers) == 14 and all(isinstance(m, ReferenceSparseDeltaLinear) for _, m in layers)
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-5, atol=1e-5)
    assert to_reference_layers(model) == 0
    with pytest.raises(ValueError, match="no SparseDeltaLinear"):
        to_reference_layers(nn.Sequential(nn.Linear(2, 2)))


# ---------------------------------------------------------------------------------- schedule
def test_natural_weights_are_the_reference_schedule_proportions():
    ag = B.natural_weights("ag", 20, 5)
    assert ag == pytest.approx({"after-select": 0.05, "plain": 0.65, "phase-start": 0.05, "phase-first": 0.05,
                                "phase": 0.15, "select": 0.05})
    # hooks are on in 6 of 20 steps (γ + 1), as docs/METHOD.md §3 describes
    assert (ag["phase-start"] + ag["phase-first"] + ag["phase"] + ag["select"]) * 20 == pytest.approx(6)
    assert B.natural_weights("ag", 20, 1) == pytest.approx({"after-select": 0.05, "plain": 0.85,
                                                           "phase-start": 0.05, "select": 0.05})
    assert B.natural_weights("ag", 20, 0) == pytest.approx({"after-select": 0.05, "plain": 0.9, "select": 0.05})
    assert B.natural_weights("ma", 20, 5) == pytest.approx({"after-select": 0.05, "plain": 0.9, "select": 0.05})
    assert B.natural_weights(None, 20, 5) == {"plain": 1.0}
    with pytest.raises(ValueError, match="S >= γ \\+ 2"):
        B.natural_weights("ag", 6, 5)


@pytest.mark.parametrize("steps,warmup,gamma", [(3, 1, 5), (4, 0, 5), (5, 2, 5), (7, 1, 5), (20, 3, 5), (40, 1, 5),
                                                (3, 1, 1), (6, 1, 0), (3, 1, 2), (5, 1, 3)])
def test_driving_schedule_makes_the_window_one_period(steps, warmup, gamma):
    from spiel.selection import phase_open_after

    opts = B.BenchmarkOptions(steps=steps, warmup_steps=warmup, selection_accumulation_steps=gamma)
    for algo in ("ag", "ma"):
        sch = B.driving_schedule(algo, opts)
        n = B.timed_steps(algo, steps, gamma)
        S, g, c0 = sch.driving_period, sch.driving_accumulation, sch.start_step
        assert (c0 + 1) % S == g and c0 + 1 > g  # the entry step reselects, after the p=1 one
        kinds, prev = [], "select"
        for t in range(c0 + 2, c0 + 2 + n):  # the labelling rule of spielbench.benchmark._step
            hooks = algo == "ag" and phase_open_after(t - 1, sch.total_steps, S, g)
            if t % S == g:
                kind = "select"
            elif hooks:
                kind = {"phase-start": "phase-first", "phase-first": "phase", "phase": "phase"}.get(prev, "phase-start")
            else:
                kind = "after-select" if prev == "select" else "plain"
            kinds.append(kind)
            prev = kind
        assert kinds[0] == "after-select" and kinds[-1] == "select" and kinds.count("select") == n // S
        needed = {k for k, w in sch.weights.items() if w > 0}
        assert needed <= set(kinds), (algo, kinds)
        if steps % 20 == 0:  # a natural period: raw proportions equal the weights
            for k, w in sch.weights.items():
                assert kinds.count(k) / n == pytest.approx(w)


def test_weighted_step_stats_hand_computed():
    w = {"after-select": 0.05, "plain": 0.65, "phase-start": 0.05, "phase": 0.2, "select": 0.05}
    out = B.weighted_step_stats([2.0, 1.0, 4.0, 3.0, 3.0, 5.0],
                                ["after-select", "plain", "phase-start", "phase", "phase", "select"], w)
    assert out["mean"] == pytest.approx(0.05 * 2 + 0.65 * 1 + 0.05 * 4 + 0.2 * 3 + 0.05 * 5)
    assert out["kind_mean"] == {"after-select": 2.0, "plain": 1.0, "phase-start": 4.0, "phase": 3.0, "select": 5.0}
    assert out["p50"] == 1.0  # 65% of the weight sits at 1.0
    plain = B.weighted_step_stats([1.0, 4.0, 2.0, 3.0], ["plain"] * 4, {"plain": 1.0})
    assert plain["mean"] == 2.5 and plain["p50"] == 2.5
    with pytest.raises(ValueError, match="no timed step"):
        B.weighted_step_stats([1.0], ["plain"], w)


# ------------------------------------------------------------------------------------- sizes
@pytest.mark.parametrize("name", list(B.SIZES))
def test_size_shapes_and_parameter_counts(name):
    from transformers import LlamaForCausalLM

    size = B.SIZES[name]
    with torch.device("meta"):
        model = LlamaForCausalLM(size.llama_config())
    assert B._count_parameters(model) == size.num_parameters()
    if name == "smollm2-135m":
        assert size.num_parameters() == 134_515_008 and size.lora_parameters(16) == 4_884_480


def test_build_random_model_on_device_is_finite_and_tied():
    size = B.SIZES["tiny"]
    model = B.build_random_model(size, "cpu", torch.float32, seed=0)
    assert B._count_parameters(model) == size.num_parameters()
    assert all(torch.isfinite(p).all() and p.device.type == "cpu" for p in model.parameters())
    assert float(model.model.layers[0].mlp.up_proj.weight.detach().std()) == pytest.approx(0.02, rel=0.05)
    loss = model(input_ids=torch.randint(3, size.vocab_size, (1, 8)), labels=torch.randint(3, 200, (1, 8))).loss
    assert math.isfinite(float(loss.detach()))
    tied = B.ModelSize(**{**size.__dict__, "name": "tied", "tie_word_embeddings": True})
    m2 = B.build_random_model(tied, "cpu", torch.float32)
    assert m2.lm_head.weight is m2.model.embed_tokens.weight


def test_memory_estimate_scales_and_flags_big_models():
    opts = B.BenchmarkOptions()
    small = B.estimate_memory(B.SIZES["smollm2-135m"], "lora", opts)
    full13 = B.estimate_memory(B.SIZES["llama2-13b"], "full", opts)
    assert small["weights"] == B.SIZES["smollm2-135m"].num_parameters() * 4
    assert full13["total"] > 16 * B.SIZES["llama2-13b"].num_parameters()  # fp32 weights + grads + Adam
    q = B.estimate_memory(B.SIZES["llama2-7b"], "qlora", opts)
    assert q["weights"] < B.SIZES["llama2-7b"].num_parameters()  # about half a byte per projection weight


def test_bad_names_and_options_raise_input_error():
    opts = B.BenchmarkOptions()
    with pytest.raises(InputError, match="unknown size 'nope'"):
        B.check_pairs(["nope"], ["lora"], opts)
    with pytest.raises(InputError, match="unknown method 'dora'"):
        B.check_pairs(["tiny"], ["dora"], opts)
    with pytest.raises(InputError, match="rank: 64 exceeds"):
        B.check_pairs(["tiny"], ["lora"], B.BenchmarkOptions(rank=64))
    with pytest.raises(InputError, match="dtype"):
        B.BenchmarkOptions(dtype="float16").validate()
    with pytest.raises(InputError, match="unknown key"):
        B.BenchmarkOptions.from_dict({"stepz": 3})
    assert B.main(["one", "--size", "nope", "--method", "lora", "--output", "x.json"]) == 2


# ------------------------------------------------------------------------------------- tables
def _rec(size, method, step, peak, status="ok", **kw):
    return {"size": size, "method": method, "status": status, "step_time_mean_s": step, "step_time_p50_s": step,
            "tokens_per_s": 256 / step if step else None, "peak_memory_bytes": peak, "trainable_params": 10,
            "adapter_state_bytes": 240, "adapter_state_bytes_per_trainable_param": 24.0, "device": "cpu",
            "threads": 2, "batch_size": 2, "seq_len": 128, "steps": 4, "warmup_steps": 1, "dtype": "float32",
            "rank": 16, "model_source": "random-init", **kw}


def test_tables_have_ratios_to_lora_and_floor(tmp_path):
    recs = [_rec("smollm2-135m", "spiel-ag", 1.9, 3_000), _rec("smollm2-135m", "lora", 2.0, 4_000),
            _rec("smollm2-135m", "floor", 1.6, 2_500),
            _rec("smollm2-1.7b", "full", None, None, status="oom", detail="oom (predicted): needs 30 GiB"),
            _rec("smollm2-1.7b", "lora", 9.0, 9_000), _rec("smollm2-1.7b", "qlora", 12.0, 4_000),
            _rec("smollm2-1.7b", "qspiel-ma", 10.0, 3_000)]
    rows = B.write_tables(recs, tmp_path / "t.md", tmp_path / "t.csv")
    assert [(r["size"], r["method"]) for r in rows] == [
        ("smollm2-135m", "floor"), ("smollm2-135m", "lora"), ("smollm2-135m", "spiel-ag"),
        ("smollm2-1.7b", "lora"), ("smollm2-1.7b", "full"), ("smollm2-1.7b", "qlora"), ("smollm2-1.7b", "qspiel-ma")]
    ag = rows[2]
    assert ag["step_time_vs_lora"] == pytest.approx(0.95) and ag["step_time_vs_floor"] == pytest.approx(1.9 / 1.6)
    assert ag["peak_memory_vs_lora"] == pytest.approx(0.75) and ag["peak_memory_over_floor_bytes"] == 500
    assert rows[3]["step_time_vs_floor"] is None and rows[4]["step_time_vs_lora"] is None
    assert rows[6]["step_time_vs_lora"] == pytest.approx(10 / 12) and rows[6]["peak_memory_vs_lora"] == 0.75
    import csv

    with open(tmp_path / "t.csv") as fh:
        table = list(csv.DictReader(fh))
    assert list(table[0]) == list(B.TABLE_COLUMNS) and len(table) == 7
    md = (tmp_path / "t.md").read_text()
    assert "| smollm2-1.7b | full | oom: oom (predicted): needs 30 GiB |" in md and "0.95×" in md
    with pytest.raises(InputError, match="expected a benchmark record"):
        (tmp_path / "bad.json").write_text("{}")
        B.load_records([tmp_path / "bad.json"])


# ------------------------------------------------------------------- fresh-process runs (tiny)
def _check_fields(rec):
    missing = [f for f in DOCUMENTED_FIELDS if f not in rec]
    assert not missing, missing


def test_tiny_sweep_in_fresh_processes_writes_documented_json(tmp_path):
    opts = B.BenchmarkOptions(rank=4, batch_size=2, seq_len=16, warmup_steps=1, steps=2, threads=1)
    records = B.run_sweep(["tiny"], ["floor", "spiel-ag", "spiel-ma"], opts, tmp_path / "bench",
                          table_stem=tmp_path / "tables" / "efficiency_benchmark", echo=False)
    assert [r["status"] for r in records] == ["ok", "ok", "ok"], [r.get("detail") for r in records]
    for rec in records:
        on_disk = json.loads((tmp_path / "bench" / f"tiny__{rec['method']}.json").read_text())
        assert on_disk == rec
        _check_fields(rec)
        assert rec["worker_exit_code"] == 0 and rec["device"] == "cpu" and rec["threads"] == 1
        assert rec["n_params_model"] == B.SIZES["tiny"].num_parameters()
        assert rec["step_time_mean_s"] > 0 and rec["tokens_per_s"] == pytest.approx(32 / rec["step_time_mean_s"])
        assert rec["peak_memory_bytes"] == rec["peak_rss_bytes"] > 0 and rec["cuda_max_allocated_bytes"] is None
    floor, ag, ma = records
    assert floor["trainable_params"] == 0 and floor["adapter_state_bytes"] == 0 and floor["steps"] == 2
    n = B.SIZES["tiny"].lora_parameters(4)
    for rec in (ag, ma):
        assert rec["trainable_params"] == pytest.approx(n, abs=14)  # floor() per matrix
        assert rec["reselections_timed"] == 1 and rec["step_kinds"][0] == "after-select"
        assert rec["step_kinds"][-1] == "select"
    assert ag["step_kinds"] == ["after-select", "plain", "phase-start", "phase-first", "phase", "select"]
    assert ma["steps"] == 3
    k = ag["trainable_params"]
    # SparseAdamW: Δ 4 + grad 4 + age/m/v 12 + int32 index 4 bytes per entry
    assert ag["adapter_state"] == {"trainable_param_bytes": 4 * k, "gradient_bytes": 4 * k,
                                   "optimizer_state_bytes": 12 * k, "index_bytes": 4 * k,
                                   "fused_cache_bytes": 8 * k, "total": 32 * k}  # fused: η copy + W0[η]
    # SM3: row and column accumulators only (4 bytes per row and column of each matrix)
    rows_cols = 2 * sum(i + o for _, i, o in B.SIZES["tiny"].linear_shapes())
    assert ma["adapter_state"]["optimizer_state_bytes"] >= 4 * rows_cols
    assert ma["adapter_state_bytes"] < ag["adapter_state_bytes"]
    expected = sum(w * ag["kind_mean_s"][kind] for kind, w in ag["schedule"]["weights"].items())
    assert ag["step_time_mean_s"] == pytest.approx(expected)
    md = (tmp_path / "tables" / "efficiency_benchmark.md").read_text()
    assert "| tiny | spiel-ag | ok |" in md


def test_oom_predicted_and_raised_are_recorded(tmp_path):
    opts = B.BenchmarkOptions(memory_limit_bytes=64 * 2**20, threads=1)
    rec = B.run_one("smollm2-135m", "lora", opts, tmp_path / "p.json")
    _check_fields(rec)
    assert rec["status"] == "oom" and rec["oom_kind"] == "predicted"
    assert rec["memory_available_bytes"] == 64 * 2**20 and rec["memory_estimate"]["total"] > 64 * 2**20
    assert "oom (predicted)" in rec["detail"] and rec["step_time_mean_s"] is None
    # the same cap without the prediction: the allocation itself fails inside the worker
    rec = B.run_one("smollm2-135m", "spiel-ag", B.BenchmarkOptions(memory_limit_bytes=64 * 2**20, predict_oom=False,
                                                                   threads=1), tmp_path / "r.json")
    assert rec["status"] == "oom" and rec["oom_kind"] == "raised", rec.get("detail")
    assert json.loads((tmp_path / "r.json").read_text())["status"] == "oom"


def test_timeout_is_recorded_not_raised(tmp_path):
    rec = B.run_one("tiny", "floor", B.BenchmarkOptions(timeout_s=0.05), tmp_path / "t.json")
    assert rec["status"] == "timeout" and "timeout_s=0.05" in rec["detail"]
    _check_fields(rec)


def test_cuda_check_dry_run_writes_every_section(tmp_path):
    """benchmarks/cuda_check.py --dry-run (CPU, tiny shapes): the device tests subset passes, both dΔ paths
    are timed per shape, every method runs with and without checkpointing and the tables carry both LoRAs."""
    import subprocess
    import sys

    out = tmp_path / "cuda"
    proc = subprocess.run([sys.executable, str(B.REPO_ROOT / "benchmarks" / "cuda_check.py"), "--dry-run",
                           "--out", str(out)], cwd=B.REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "cuda_check.json").read_text())
    assert summary["dry_run"] and summary["size"] == "tiny"
    assert summary["tests"]["rc"] == 0 and summary["tests"]["counts"]["passed"] >= 2
    assert summary["tests"]["counts"]["failed"] == 0
    shapes = {(o, i) for _, i, o in B.SIZES["tiny"].linear_shapes()}
    rows = summary["delta_grad"]
    assert {(r["out_features"], r["in_features"]) for r in rows} == shapes and len(rows) == 2 * len(shapes)
    for r in rows:
        assert r["sampled_ms"] > 0 and r["dense_ms"] > 0 and r["auto_choice"] in ("sampled", "dense")
        assert r["k"] == 2 * (r["out_features"] + r["in_features"]) and r["tokens"] == 16
    import importlib.util

    spec = importlib.util.spec_from_file_location("cuda_check", B.REPO_ROOT / "benchmarks" / "cuda_check.py")
    cuda_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cuda_check)
    plain, ckpt = summary["points"]["plain"], summary["points"]["checkpointed"]
    assert [r["method"] for r in plain] == list(cuda_check.METHODS)
    assert [r["method"] for r in ckpt] == list(cuda_check.DRY_RUN_CHECKPOINTED)
    for r in plain + ckpt:
        assert r["status"] == "ok", (r["method"], r.get("detail"))
        assert r["dtype"] == "bfloat16" and r["seq_len"] == 16
    assert all(not r["gradient_checkpointing"] for r in plain) and all(r["gradient_checkpointing"] for r in ckpt)
    ag = next(r for r in plain if r["method"] == "spiel-ag")
    assert set(ag["step_kinds"]) == {"after-select", "plain", "phase-start", "phase-first", "phase", "select"}
    ratio_rows = {r["method"]: r for r in summary["ratios"]["plain"]}
    assert ratio_rows["spiel-ag"]["step_time_vs_lora_dropout0"] is not None
    assert ratio_rows["lora-dropout0"]["step_time_vs_lora_dropout0"] == pytest.approx(1.0)
    assert (out / "steps" / "checkpointed" / "tiny__spiel-ag.json").is_file()
    md = (out / "cuda_check.md").read_text()
    assert "## dΔ paths per layer shape" in md and "## Step time and peak memory, checkpointed" in md
    assert "step/LoRA-d0" in md and str(B.REPO_ROOT) not in md
