"""SparseDeltaLinear: forward/backward numerics (fp64 gradcheck, bf16 autocast, 4-bit base),
the sampled gradient path, caches, merge/unmerge and index replacement (docs/METHOD.md §2, §6, §7, §11)."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

from spiel.layer import SparseDeltaLinear, random_indices, sparse_delta_linear


class _LargestTensors(TorchDispatchMode):
    """Records the numel of every tensor an aten op returns."""

    def __init__(self):
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:  # a sparse tensor's numel is its dense shape
                self.sizes.append(t.numel())
        return out


def _layer(out=6, inp=5, k=9, dtype=torch.float64, bias=True, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(inp, out, bias=bias).to(dtype)
    layer = SparseDeltaLinear(base, k, generator=torch.Generator().manual_seed(seed), delta_dtype=dtype)
    with torch.no_grad():
        layer.values.normal_()
    return layer


def _dense_reference(layer, x):
    weight = layer.base_weight(torch.float64) + layer.delta_weight(torch.float64)
    y = x.double() @ weight.t()
    if layer.bias is not None:
        y = y + layer.bias.double()
    return y


def test_random_indices_distinct_sorted_seeded():
    for numel, k in [(30, 9), (30, 29), (10_000, 37), (10_000, 9_000)]:
        a = random_indices(numel, k, torch.Generator().manual_seed(3))
        b = random_indices(numel, k, torch.Generator().manual_seed(3))
        assert torch.equal(a, b)
        assert a.numel() == k and torch.unique(a).numel() == k
        assert torch.equal(a, a.sort().values)
        assert 0 <= int(a.min()) and int(a.max()) < numel
    with pytest.raises(ValueError, match="k must be"):
        random_indices(10, 11)


def test_random_indices_roughly_uniform():
    counts = torch.zeros(20)
    gen = torch.Generator().manual_seed(0)
    for _ in range(400):
        counts[random_indices(20, 3, gen)] += 1
    # each position expected 400 * 3 / 20 = 60 times
    assert counts.min() > 30 and counts.max() < 95


def test_init_state_and_contract_attributes():
    layer = _layer(k=9, dtype=torch.float32)
    assert layer.in_features == 5 and layer.out_features == 6 and layer.k == 9
    assert layer.indices.dtype == torch.int32
    assert torch.unique(layer.indices).numel() == 9
    fresh = SparseDeltaLinear(nn.Linear(5, 6), 9)
    assert torch.count_nonzero(fresh.values) == 0 and fresh.values.requires_grad
    assert not any(p.requires_grad for p in fresh.base_layer.parameters())
    assert [n for n, p in fresh.named_parameters() if p.requires_grad] == ["values"]
    assert "indices" in fresh.state_dict()
    assert layer.weight_grad_hook is None and not layer.merged and not layer.disabled
    with pytest.raises(ValueError, match="distinct"):
        SparseDeltaLinear(nn.Linear(5, 6), indices=torch.tensor([1, 1]))
    with pytest.raises(ValueError, match=r"\[0, 30\)"):
        SparseDeltaLinear(nn.Linear(5, 6), indices=torch.tensor([30]))
    with pytest.raises(ValueError, match="k must be"):
        SparseDeltaLinear(nn.Linear(5, 6), 31)
    with pytest.raises(TypeError, match="nn.Linear"):
        SparseDeltaLinear(nn.Conv1d(2, 2, 1), 1)


@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_dense_effective_weight(bias):
    layer = _layer(out=7, inp=11, k=20, dtype=torch.float32, bias=bias)
    x = torch.randn(3, 4, 11)
    y = layer(x)
    assert y.shape == (3, 4, 7) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), _dense_reference(layer, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hook", [False, True], ids=["sampled", "dense-hook"])
def test_gradcheck_fp64(hook):
    layer = _layer(out=6, inp=5, k=9)
    seen = []
    if hook:
        layer.weight_grad_hook = seen.append
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    values = layer.values.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, v: sparse_delta_linear(layer, a, v), (x, values))
    assert bool(seen) == hook
    if hook:
        assert seen[0].shape == (6, 5)


@pytest.mark.parametrize("hook", [False, True], ids=["sampled", "dense-hook"])
def test_grad_matches_dense_autograd_reference(hook):
    layer = _layer(out=24, inp=16, k=60, dtype=torch.float32)
    seen = []
    if hook:
        layer.weight_grad_hook = seen.append
    x = torch.randn(5, 7, 16, requires_grad=True)
    grad_out = torch.randn(5, 7, 24)
    layer(x).backward(grad_out)

    w_ref = (layer.base_weight(torch.float64)).clone().requires_grad_()
    x_ref = x.detach().double().requires_grad_()
    y_ref = x_ref @ (w_ref + layer.delta_weight(torch.float64)).t() + layer.bias.double()
    y_ref.backward(grad_out.double())
    dense_dw = w_ref.grad.reshape(-1)
    torch.testing.assert_close(layer.values.grad.double(), dense_dw[layer.indices.long()], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), x_ref.grad, rtol=1e-5, atol=1e-5)
    assert layer.base_layer.weight.grad is None and layer.base_layer.bias.grad is None
    if hook:
        assert seen[0].dtype == torch.float32
        torch.testing.assert_close(seen[0].double(), w_ref.grad, rtol=1e-5, atol=1e-5)


def test_sampled_backward_allocates_no_dense_weight_gradient():
    layer = _layer(out=40, inp=30, k=50, dtype=torch.float32)
    x = torch.randn(8, 30)  # no grad to x: backward only computes dΔ
    y = layer(x)
    mode = _LargestTensors()
    with mode:
        y.sum().backward()
    assert layer.values.grad is not None
    assert max(mode.sizes) < 40 * 30  # no [out, in] temporary in the sampled path

    layer.values.grad = None
    layer.weight_grad_hook = lambda dw: None
    y = layer(x)
    mode = _LargestTensors()
    with mode:
        y.sum().backward()
    assert max(mode.sizes) >= 40 * 30  # the AG selection path does form the dense dW


def test_replace_entries_updates_indices_values_and_gradient_pattern():
    layer = _layer(out=8, inp=6, k=10, dtype=torch.float32)
    x = torch.randn(4, 6)
    layer(x).sum().backward()  # builds the CSR cache
    active = set(layer.indices.tolist())
    new = torch.tensor([i for i in range(48) if i not in active][:3])
    slots = torch.tensor([0, 4, 9])
    kept = layer.values.detach().clone()
    layer.replace_entries(slots, new)
    assert layer.indices[slots].tolist() == new.tolist()
    assert layer.values[slots].abs().sum() == 0 and layer.values.grad[slots].abs().sum() == 0
    others = torch.tensor([i for i in range(10) if i not in slots.tolist()])
    assert torch.equal(layer.values.detach()[others], kept[others])
    layer.values.grad = None
    xg = x.clone().requires_grad_()
    layer(xg).sum().backward()
    full = (torch.ones(4, 8).t() @ x).reshape(-1)
    torch.testing.assert_close(layer.values.grad, full[layer.indices.long()])
    with pytest.raises(ValueError, match="slots"):
        layer.replace_entries(torch.tensor([0, 1]), torch.tensor([3]))
    # an in-place write to the buffer (e.g. load_state_dict) also invalidates the cached pattern
    layer.values.grad = None
    layer.load_state_dict({"indices": torch.arange(10, dtype=torch.int32),
                           "values": layer.values.detach(), "base_layer.weight": layer.base_layer.weight.detach(),
                           "base_layer.bias": layer.base_layer.bias.detach()})
    layer(x).sum().backward()
    torch.testing.assert_close(layer.values.grad, full[:10])


def test_bf16_autocast_close_to_fp32():
    layer = _layer(out=48, inp=64, k=300, dtype=torch.float32)
    with torch.no_grad():
        layer.values.mul_(0.1)
    x = torch.randn(4, 10, 64)
    y = layer(x)
    y.square().sum().backward()
    g32 = layer.values.grad.clone()
    layer.values.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yb = layer(x)
    assert yb.dtype == torch.bfloat16
    yb.float().square().sum().backward()
    assert layer.values.grad.dtype == torch.float32
    assert (yb.float() - y).abs().max() < 0.05 * y.abs().max()
    assert (layer.values.grad - g32).norm() < 0.02 * g32.norm()


def test_bf16_deltas_on_fp32_base():
    base = nn.Linear(16, 12)
    layer = SparseDeltaLinear(base, 20, delta_dtype=torch.bfloat16, generator=torch.Generator().manual_seed(1))
    x = torch.randn(3, 16)
    layer(x).sum().backward()
    assert layer.values.grad.dtype == torch.bfloat16
    torch.testing.assert_close(layer.values.grad.float(), (torch.ones(3, 12).t() @ x).reshape(-1)[layer.indices.long()],
                               rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_same_grads(use_reentrant):
    layer = _layer(out=12, inp=10, k=30, dtype=torch.float32)
    x = torch.randn(3, 5, 10, requires_grad=True)
    (layer(x) ** 2).sum().backward()
    gv, gx = layer.values.grad.clone(), x.grad.clone()
    layer.values.grad = None
    x.grad = None
    (checkpoint(layer, x, use_reentrant=use_reentrant) ** 2).sum().backward()
    torch.testing.assert_close(layer.values.grad, gv, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, gx, rtol=0, atol=0)


def test_merge_unmerge_exact_and_disable():
    layer = _layer(out=9, inp=7, k=25, dtype=torch.float32)
    with torch.no_grad():
        layer.values.mul_(1e-3)  # small deltas: a subtract-based unmerge would not round-trip exactly
    w0 = layer.base_layer.weight.detach().clone()
    x = torch.randn(4, 7)
    y = layer(x).detach()
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), y, rtol=1e-6, atol=1e-6)
    expected = (w0.reshape(-1).double() + layer.delta_weight(torch.float64).reshape(-1)).float()
    assert torch.equal(layer.base_layer.weight.detach().reshape(-1), expected)
    with pytest.raises(RuntimeError, match="unmerge"):
        layer.replace_entries(torch.tensor([0]), torch.tensor([int(layer.indices[1])]))
    layer.unmerge()
    assert not layer.merged
    assert torch.equal(layer.base_layer.weight.detach(), w0)
    layer.disabled = True
    torch.testing.assert_close(layer(x), x @ w0.t() + layer.bias, rtol=0, atol=0)
    layer.disabled = False
    torch.testing.assert_close(layer(x), y, rtol=0, atol=0)


def test_4bit_base_against_dequantized_weight():
    bnb = pytest.importorskip("bitsandbytes")
    from spiel.layer import is_linear4bit

    torch.manual_seed(0)
    dense = nn.Linear(64, 16)
    q = bnb.nn.Linear4bit(64, 16, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4")
    q.bias = nn.Parameter(dense.bias.data.clone())
    q = q.to("cpu")  # quantises
    assert is_linear4bit(q)
    packed = q.weight.data.clone()
    layer = SparseDeltaLinear(q, 40, generator=torch.Generator().manual_seed(0))
    assert layer.is_4bit and layer.dense_numel == 64 * 16 and layer.indices.dtype == torch.int32
    with torch.no_grad():
        layer.values.normal_(0, 0.05)
    w_deq = layer.base_weight()
    assert w_deq.shape == (16, 64) and w_deq.dtype == torch.float32
    assert (w_deq - dense.weight).abs().max() < 0.1  # NF4 of the original weight
    x = torch.randn(2, 5, 64)
    torch.testing.assert_close(layer(x).double(), _dense_reference(layer, x), rtol=1e-5, atol=1e-5)
    # gradients against dense fp64 autograd on the dequantised weight, and a (fast-mode) fp64 gradcheck;
    # bitsandbytes dequantises in ~5-10 ms per call on CPU, so the full gradcheck is left to the dense tests
    xg = x.clone().requires_grad_()
    grad_out = torch.randn(2, 5, 16)
    layer(xg).backward(grad_out)
    w_ref = w_deq.double().clone().requires_grad_()
    x_ref = x.double().requires_grad_()
    (x_ref @ (w_ref + layer.delta_weight(torch.float64)).t() + layer.bias.double()).backward(grad_out.double())
    torch.testing.assert_close(layer.values.grad.double(), w_ref.grad.reshape(-1)[layer.indices.long()],
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xg.grad.double(), x_ref.grad, rtol=1e-5, atol=1e-5)
    values = layer.values.detach().double().requires_grad_()
    xd = torch.randn(1, 2, 64, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, v: sparse_delta_linear(layer, a, v, torch.float64), (xd, values),
                                    fast_mode=True)
    assert torch.equal(q.weight.data, packed)  # the base stays quantised and untouched
    with pytest.raises(ValueError, match="4-bit"):
        layer.merge()


@pytest.mark.parametrize("dense_hook", [False, True], ids=["sampled", "with-dense-hook"])
def test_sample_weight_grad_at_candidates(dense_hook):
    layer = _layer(out=20, inp=12, k=30, dtype=torch.float32)
    layer.delta_grad = "sampled"  # 16% density: "auto" would take the dense path on CPU (spiel/delta_grad.py)
    x = torch.randn(2, 3, 12)
    grad_out = torch.randn(2, 3, 20)
    dense = (grad_out.reshape(-1, 20).t().double() @ x.reshape(-1, 12).double()).reshape(-1)
    candidates = torch.cat([layer.indices[:5].long(), torch.tensor([0, 239, 100])])  # overlaps η
    got = []
    layer.sample_weight_grad(candidates, got.append)
    if dense_hook:
        layer.weight_grad_hook = lambda dw: None
    mode = _LargestTensors()
    y = layer(x)
    with mode:
        y.backward(grad_out)
    assert len(got) == 1 and got[0].dtype == torch.float32 and got[0].shape == (8,)
    torch.testing.assert_close(got[0].double(), dense[candidates], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.values.grad.double(), dense[layer.indices.long()], rtol=1e-5, atol=1e-5)
    assert (max(mode.sizes) >= 240) == dense_hook
    if not dense_hook:  # the SDDMM ran once per distinct position (5+ candidates are active already)
        distinct = torch.unique(torch.cat([layer.indices.long(), candidates])).numel()
        assert layer._csr_cache[2].numel() == distinct < layer.k + candidates.numel()
    # new candidates (a new tensor) are honoured; clearing stops the calls
    layer.values.grad = None
    layer.sample_weight_grad(torch.tensor([5, 6]), got.append)
    layer(x).backward(grad_out)
    torch.testing.assert_close(got[1].double(), dense[[5, 6]], rtol=1e-5, atol=1e-5)
    layer.sample_weight_grad(None, None)
    layer.weight_grad_hook = None
    layer.values.grad = None
    layer(x).backward(grad_out)
    assert len(got) == 2
    torch.testing.assert_close(layer.values.grad.double(), dense[layer.indices.long()], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="both"):
        layer.sample_weight_grad(torch.tensor([1]), None)
    with pytest.raises(ValueError, match=r"\[0, 240\)"):
        layer.sample_weight_grad(torch.tensor([240]), got.append)


def test_sampled_grad_chunked_over_tokens(monkeypatch):
    import spiel.delta_grad as delta_grad_module

    monkeypatch.setattr(delta_grad_module, "_CPU_CHUNK_ELEMENTS", 1)  # 64-token chunks
    assert delta_grad_module._token_chunk(150, 16, 24) == 64
    layer = _layer(out=24, inp=16, k=70, dtype=torch.float32)
    x = torch.randn(150, 16)
    grad_out = torch.randn(150, 24)
    got = []
    layer.sample_weight_grad(torch.tensor([3, 200, 383]), got.append)
    layer(x).backward(grad_out)
    dense = (grad_out.double().t() @ x.double()).reshape(-1)
    torch.testing.assert_close(layer.values.grad.double(), dense[layer.indices.long()], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[0].double(), dense[[3, 200, 383]], rtol=1e-5, atol=1e-5)


def test_dense_hook_can_switch_to_sampled_candidates():
    """The AG pattern: the first backward of a phase gives the dense dW, the hook picks candidates and
    switches the layer to sampled candidate gradients for the rest of the phase (docs/METHOD.md §4.1)."""
    layer = _layer(out=10, inp=8, k=12, dtype=torch.float32)
    sums = {}

    def first(dense_grad):
        cand = torch.topk(dense_grad.abs().reshape(-1), 12).indices
        sums["cand"], sums["sum"] = cand, dense_grad.reshape(-1)[cand].clone()
        layer.weight_grad_hook = None
        layer.sample_weight_grad(cand, lambda g: sums["sum"].add_(g))

    layer.weight_grad_hook = first
    xs = [torch.randn(6, 8) for _ in range(3)]
    for x in xs:
        layer(x).square().sum().backward()
    total = torch.zeros(80, dtype=torch.float64)
    for x in xs:
        w = (layer.base_weight(torch.float64) + layer.delta_weight(torch.float64)).requires_grad_()
        (x.double() @ w.t() + layer.bias.double()).square().sum().backward()
        total += w.grad.reshape(-1)
    torch.testing.assert_close(sums["sum"].double(), total[sums["cand"]], rtol=1e-5, atol=1e-5)
