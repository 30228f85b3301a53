"""The SpIEL path on an accelerator, written once over the device: every test runs on CPU now and on CUDA
where a GPU is present (the CUDA parameter skips cleanly without one). benchmarks/cuda_check.py runs this
file on the GPU machine.

Covers (issue: "CUDA tests"): forward, input gradient and dΔ against a dense reference in fp32, bf16 and
fp16 autocast, fused and unfused, both dΔ paths, with gradient checkpointing, across an optimizer step and
a reselection; SpIEL-AG selection on a tiny model (fused bit-identical to unfused on the device); qSpIEL
over an NF4 base (bitsandbytes' kernels for the device); merge/unmerge; save on the device, load on CPU.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from spiel.layer import SparseDeltaLinear
from spiel.optim import SparseAdamW

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]

# mode -> (base weight dtype, autocast dtype or None, tolerance of outputs/gradients against the fp64 reference)
MODES = {
    "fp32": (torch.float32, None, 1e-4),
    "bf16": (torch.bfloat16, None, 3e-2),
    "fp16-autocast": (torch.float32, torch.float16, 3e-3),
}


def _layer(device, weight_dtype, fused, path, out=40, inp=48, k=120, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(inp, out).to(device=device, dtype=weight_dtype)
    layer = SparseDeltaLinear(base, k, generator=torch.Generator().manual_seed(seed))
    layer.fuse_delta = fused
    layer.delta_grad = path
    with torch.no_grad():
        layer.values.normal_(0, 0.05)
    return layer


def _reference(layer, x, grad_out, compute_dtype):
    """y, dx and dW at η from a dense fp64 computation on the compute-dtype operands (W0 + Δ rounded once
    to the compute dtype, as the layer forms it)."""
    w0 = layer.base_weight().detach()
    w = (w0.float().reshape(-1).index_add(0, layer.indices.long(), layer.values.detach().float()))
    w = w.reshape(layer.out_features, layer.in_features).to(compute_dtype).double().requires_grad_()
    xr = x.detach().to(compute_dtype).double().requires_grad_()
    y = F.linear(xr, w, layer.bias.detach().to(compute_dtype).double())
    y.backward(grad_out.to(compute_dtype).double())
    return y.detach(), xr.grad, w.grad.reshape(-1)[layer.indices.long()]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("checkpointed", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("path", ["auto", "dense"])
def test_layer_against_dense_reference_over_step_and_reselection(device, mode, fused, checkpointed, path):
    weight_dtype, autocast_dtype, tol = MODES[mode]
    layer = _layer(device, weight_dtype, fused, path)
    w0 = layer.base_weight().clone()
    opt = SparseAdamW([layer.values], lr=0.02)
    gen = torch.Generator().manual_seed(1)
    compute_dtype = autocast_dtype or weight_dtype
    for step in range(3):
        x = torch.randn(2, 9, 48, generator=gen).to(device=device, dtype=weight_dtype).requires_grad_()
        grad_out = torch.randn(2, 9, 40, generator=gen).to(device)
        with torch.autocast(device, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            y = checkpoint(layer, x, use_reentrant=False) if checkpointed else layer(x)
        assert y.dtype == compute_dtype
        y_ref, dx_ref, dvalues_ref = _reference(layer, x, grad_out, compute_dtype)
        y.backward(grad_out.to(y.dtype))
        torch.testing.assert_close(y.double(), y_ref, rtol=tol, atol=tol)
        torch.testing.assert_close(x.grad.double(), dx_ref, rtol=tol, atol=tol)
        scale = float(dvalues_ref.abs().max())
        torch.testing.assert_close(layer.values.grad.double(), dvalues_ref, rtol=tol, atol=tol * scale)
        assert layer.fused == fused
        opt.step()
        opt.zero_grad()
        if step == 1:  # a reselection: two slots move to positions not in η, Δ = 0 there
            free = torch.ones(layer.dense_numel, dtype=torch.bool)
            free[layer.indices.long().cpu()] = False
            layer.replace_entries(torch.tensor([0, 7]), free.nonzero().reshape(-1)[:2])
    assert torch.equal(layer.base_weight(), w0)


def _tiny_spiel(device, fused, algorithm="ag"):
    import spiel
    from conftest import make_tiny_llama

    model = make_tiny_llama(0).to(device)
    config = spiel.SpielConfig(num_tunable_weights=600, selection_algorithm=algorithm, reselection_steps=4,
                               selection_accumulation_steps=2, initial_reselection_rate=0.5)
    sm = spiel.get_spiel_model(model, config)
    for _, layer in sm.sparse_layers():
        layer.fuse_delta = fused
    return sm


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_ag_selection_with_checkpointing_fused_equals_unfused(device, autocast):
    """Eight updates of SpIEL-AG (two reselections, candidate sampling) with gradient checkpointing: the
    fused and unfused models stay bit-identical on the device, and η really changed."""
    from spiel.optim import build_optimizer
    from spiel.selection import SpielSelector

    runs = []
    for fused in (True, False):
        torch.manual_seed(0)
        sm = _tiny_spiel(device, fused)
        sm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        sm.train()
        opt = build_optimizer(sm, lr=0.01)
        sel = SpielSelector(sm, opt, total_steps=8)
        initial = {name: layer.indices.clone() for name, layer in sm.sparse_layers()}
        gen = torch.Generator().manual_seed(2)
        losses = []
        for _ in range(8):
            ids = torch.randint(3, 128, (2, 12), generator=gen).to(device)
            with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
                loss = sm(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            sel.step()
            losses.append(loss.detach().float().cpu())
        assert len(sel.history) == 2
        changed = sum(int((layer.indices != initial[name]).sum()) for name, layer in sm.sparse_layers())
        assert changed > 0
        runs.append((torch.stack(losses), {n: (l.indices.cpu(), l.values.detach().cpu()) for n, l in sm.sparse_layers()}))
    assert torch.equal(runs[0][0], runs[1][0])
    for name, (indices, values) in runs[0][1].items():
        assert torch.equal(indices, runs[1][1][name][0]) and torch.equal(values, runs[1][1][name][1]), name


@pytest.mark.parametrize("device", DEVICES)
def test_qspiel_over_nf4_base(device):
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    dense = nn.Linear(64, 32)
    q = bnb.nn.Linear4bit(64, 32, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4")
    q.bias = nn.Parameter(dense.bias.data.clone())
    try:
        q = q.to(device)  # quantises with the device's kernels
    except Exception as exc:  # pragma: no cover - depends on the bitsandbytes build
        pytest.skip(f"bitsandbytes cannot quantise on {device}: {exc}")
    layer = SparseDeltaLinear(q, 50, generator=torch.Generator().manual_seed(0))
    assert layer.is_4bit and not layer.fused
    with torch.no_grad():
        layer.values.normal_(0, 0.05)
    packed = q.weight.data.clone()
    w = (layer.base_weight(torch.float64) + layer.delta_weight(torch.float64).to(device)).requires_grad_()
    x = torch.randn(3, 5, 64, device=device, requires_grad=True)
    grad_out = torch.randn(3, 5, 32, device=device)
    y = layer(x)
    y.backward(grad_out)
    xr = x.detach().double().requires_grad_()
    y_ref = F.linear(xr, w, q.bias.double())
    y_ref.backward(grad_out.double())
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.values.grad.double(), w.grad.reshape(-1)[layer.indices.long()], rtol=1e-4,
                               atol=1e-4)
    assert torch.equal(q.weight.data, packed)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_merge_unmerge_on_device(device, dtype):
    layer = _layer(device, dtype, True, "auto")
    w0 = layer.base_weight().clone()
    x = torch.randn(4, 48, device=device, dtype=dtype)
    with torch.no_grad():
        y = layer(x)
        layer.merge()
        y_merged = layer(x)
        layer.unmerge()
        y_again = layer(x)
    assert torch.equal(y, y_merged) and torch.equal(y, y_again)
    assert torch.equal(layer.base_weight(), w0)


@pytest.mark.parametrize("device", DEVICES)
def test_save_on_device_load_on_cpu(device, tmp_path):
    import spiel
    from conftest import make_tiny_llama

    sm = _tiny_spiel(device, True)
    opt = SparseAdamW([p for p in sm.parameters() if p.requires_grad], lr=0.05)
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(4))
    sm(input_ids=ids.to(device), labels=ids.to(device)).loss.backward()
    opt.step()
    with torch.no_grad():
        logits = sm(input_ids=ids.to(device)).logits.cpu()
    sm.save_pretrained(tmp_path / "adapter")
    loaded = spiel.SpielModel.from_pretrained(make_tiny_llama(0), tmp_path / "adapter")
    for (name, a), (_, b) in zip(sm.sparse_layers(), loaded.sparse_layers()):
        assert b.values.device.type == "cpu"
        assert torch.equal(a.indices.cpu(), b.indices) and torch.equal(a.values.detach().cpu(), b.values), name
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, logits, rtol=1e-4, atol=1e-4)
