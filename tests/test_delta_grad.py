"""The two dΔ paths of spiel.delta_grad (sampled SDDMM, dense GEMM + gather) and the rule between them:
both give the dense reference's gradient at η (and at SpIEL-AG candidates) to rounding in fp32 and bf16;
the CPU rule, the forced paths, the accelerator micro-benchmark cache and the CPU thread choice."""
from __future__ import annotations

import time

import pytest
import torch
from torch import nn

import spiel.delta_grad as dg
from spiel.layer import SparseDeltaLinear


def _layer(dtype=torch.float32, out=24, inp=20, k=60, path="auto", seed=0):
    torch.manual_seed(seed)
    layer = SparseDeltaLinear(nn.Linear(inp, out).to(dtype), k, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        layer.values.normal_(0, 0.1)
    layer.delta_grad = path
    return layer


@pytest.mark.parametrize("path", ["sampled", "dense"])
@pytest.mark.parametrize("mode", ["fp32", "bf16", "autocast-bf16"])
@pytest.mark.parametrize("candidates", [False, True], ids=["eta", "eta+candidates"])
def test_paths_match_dense_reference(path, mode, candidates):
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    layer = _layer(dtype, path=path)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 33, 20, generator=gen).to(dtype)
    grad_out = torch.randn(2, 33, 24, generator=gen)
    extra = torch.tensor([0, 7, 100, int(layer.indices[3]), 479])  # one position also in η
    got = []
    if candidates:
        layer.sample_weight_grad(extra, got.append)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast-bf16"):
        y = layer(x)
    y.backward(grad_out.to(y.dtype))
    # reference: the compute-dtype operands, multiplied exactly in fp64
    g_ref = grad_out.to(y.dtype).double().reshape(-1, 24)
    x_ref = x.to(y.dtype).double().reshape(-1, 20)
    dense = (g_ref.t() @ x_ref).reshape(-1)
    tol = dict(rtol=1e-5, atol=1e-5) if layer.values.dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(layer.values.grad.double(), dense[layer.indices.long()], **tol)
    assert layer.values.grad.dtype == layer.values.dtype
    if candidates:
        assert got[0].dtype == torch.float32
        torch.testing.assert_close(got[0].double(), dense[extra], rtol=1e-5, atol=1e-5)


def test_both_paths_agree_to_rounding_on_bf16_operands():
    grads = {}
    for path in ("sampled", "dense"):
        layer = _layer(torch.bfloat16, out=48, inp=40, k=300, path=path)
        x = torch.randn(128, 40, generator=torch.Generator().manual_seed(1)).bfloat16()
        layer(x).float().pow(2).sum().backward()
        grads[path] = layer.values.grad.float()
    torch.testing.assert_close(grads["sampled"], grads["dense"], rtol=1e-5, atol=1e-5)  # fp32 sums of the same bf16 products


def test_cpu_rule_forced_paths_and_bad_value():
    cpu = torch.device("cpu")
    assert dg.choose_path("auto", cpu, torch.float32, (100, 100), 1000, 512, False) == "sampled"
    assert dg.choose_path("auto", cpu, torch.float32, (100, 100), 1250, 512, False) == "sampled"
    assert dg.choose_path("auto", cpu, torch.float32, (100, 100), 1251, 512, False) == "dense"
    assert dg.choose_path("dense", cpu, torch.float32, (100, 100), 10, 512, False) == "dense"
    assert dg.choose_path("sampled", cpu, torch.float32, (100, 100), 9000, 512, False) == "sampled"
    layer = _layer()
    with pytest.raises(ValueError, match="delta_grad must be one of"):
        layer.delta_grad = "sddmm"
    assert layer.delta_grad == "auto"


def test_dense_path_allocates_dense_and_sampled_does_not():
    from test_spiel_fused import _NewAllocations

    for path in ("sampled", "dense"):
        layer = _layer(out=64, inp=48, k=50, path=path)
        x = torch.randn(2, 16, 48, requires_grad=True)
        layer(x).sum().backward()
        with _NewAllocations() as mode:
            layer(x).sum().backward()
        assert (layer.dense_numel in mode.sizes) == (path == "dense")


def test_accelerator_benchmark_caches_the_faster_path():
    dg.clear_decisions()
    calls = {"slow": 0, "fast": 0}

    def slow():
        calls["slow"] += 1
        time.sleep(0.004)
        return torch.tensor([1.0])

    def fast():
        calls["fast"] += 1
        return torch.tensor([2.0])

    key = ("cuda:0", "bfloat16", 8, 8, 16, 64, "eta")
    result = dg._benchmark(key, torch.device("cpu"), {"sampled": slow, "dense": fast})
    assert float(result) == 2.0 and dg._decisions[key] == "dense"
    assert calls == {"slow": 1 + dg._BENCH_REPEATS, "fast": 1 + dg._BENCH_REPEATS}
    assert dg.path_decisions() == {"cuda:0|bfloat16|8|8|16|64|eta": "dense"}
    # a not-yet-measured accelerator key asks for the benchmark (None); a measured one is reused
    cuda = torch.device("cuda", 0)
    assert dg.choose_path("auto", cuda, torch.float32, (8, 8), 16, 64, False) is None
    assert dg.choose_path("auto", cuda, torch.bfloat16, (8, 8), 13, 40, False) == "dense"  # same pow2 buckets
    dg.clear_decisions()
    assert dg.path_decisions() == {}


def test_cpu_thread_choice_follows_the_faster_count(monkeypatch):
    dg.clear_decisions()
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        if torch.get_num_threads() != 2:
            pytest.skip("torch cannot use 2 threads here")
        seen = []

        def run():  # two threads "contended": ten times slower than one
            seen.append(torch.get_num_threads())
            time.sleep(0.002 if seen[-1] == 1 else 0.02)
            return seen[-1]

        monkeypatch.setattr(dg, "_THREAD_RECHECK", 8)
        for _ in range(15):
            dg._cpu_threads_then(("k",), run)
        assert seen[:2] == [1, 2]  # both counts timed first
        assert seen[2:7] == [1] * 5 and seen[7] == 2  # then the faster, with a re-check at the 8th call
        assert seen[8:] == [1] * 7 and torch.get_num_threads() == 2  # the count is restored after each call
    finally:
        torch.set_num_threads(previous)
        dg.clear_decisions()
