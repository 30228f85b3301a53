"""The fused forward of SparseDeltaLinear: the base weight holds ``W0 + Δ`` at η between calls (spiel/layer.py
module docstring). Asserts bit-identity with the unfused path over training steps and index changes, that
every view of the base weight (state_dict, base_weight, disabled, merge, load_state_dict, reference layers)
still sees ``W0``, and that no dense ``[out, in]`` temporary is allocated."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from spiel.layer import SparseDeltaLinear
from spiel.optim import SparseAdamW

from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class _NewAllocations(TorchDispatchMode):
    """Records the numel of every strided tensor an aten op returns in *new* storage (views and in-place
    results share an input's storage and are not allocations)."""

    def __init__(self):
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs or {}))
                  if isinstance(t, torch.Tensor) and t.layout == torch.strided}
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if (isinstance(t, torch.Tensor) and t.layout == torch.strided
                    and t.untyped_storage().data_ptr() not in inputs):
                self.sizes.append(t.numel())
        return out


def _pair(dtype=torch.float32, out=24, inp=20, k=40, seed=0):
    """Two layers over identical copies of one base: fused (default) and unfused."""
    torch.manual_seed(seed)
    base = nn.Linear(inp, out).to(dtype)
    layers = []
    for fuse in (True, False):
        layer = SparseDeltaLinear(copy.deepcopy(base), k, generator=torch.Generator().manual_seed(seed),
                                  delta_dtype=torch.float32)
        layer.fuse_delta = fuse
        layers.append(layer)
    return layers, base.weight.detach().clone()


def _step(layer, opt, x, autocast_dtype=None):
    with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        y = layer(x)
    loss = (y.float() ** 2).mean()
    loss.backward()
    grad_x = x.grad.clone()
    x.grad = None
    opt.step()
    opt.zero_grad()
    return y.detach(), grad_x


@pytest.mark.parametrize("dtype,autocast_dtype", [(torch.float32, None), (torch.float32, torch.bfloat16),
                                                  (torch.bfloat16, None)], ids=["fp32", "fp32-autocast-bf16", "bf16"])
def test_fused_bit_identical_to_unfused_over_steps_and_reselection(dtype, autocast_dtype):
    (fused, plain), w0 = _pair(dtype)
    opts = [SparseAdamW([layer.values], lr=0.05) for layer in (fused, plain)]
    gen = torch.Generator().manual_seed(1)
    for step in range(6):
        x = torch.randn(3, 7, 20, generator=gen).to(dtype)
        results = []
        for layer, opt in zip((fused, plain), opts):
            xi = x.clone().requires_grad_()
            results.append(_step(layer, opt, xi, autocast_dtype))
        assert torch.equal(results[0][0], results[1][0])  # outputs
        assert torch.equal(results[0][1], results[1][1])  # input gradients
        assert torch.equal(fused.values, plain.values)  # same Δ after the optimizer step
        assert fused.fused and not plain.fused
        if step == 2:  # reselection through the API
            for layer in (fused, plain):
                layer.replace_entries(torch.tensor([0, 5]), torch.tensor([3, 200]))
        if step == 4:  # an in-place write to η behind the layer's back
            for layer in (fused, plain):
                with torch.no_grad():
                    layer.indices[7] = 11 if int(layer.indices[7]) != 11 else 12
                    layer.values[7] = 0
    assert torch.equal(fused.base_weight(), w0)  # unfusing restores every touched position exactly
    assert torch.equal(plain.base_layer.weight.detach(), w0)


def test_fused_weight_holds_delta_and_every_view_sees_w0():
    (layer, _), w0 = _pair()
    with torch.no_grad():
        layer.values.normal_()
    x = torch.randn(5, 20)
    y = layer(x)
    expected = (w0.reshape(-1).clone())
    expected[layer.indices.long()] = w0.reshape(-1)[layer.indices.long()] + layer.values.detach()
    assert torch.equal(layer.base_layer.weight.detach().reshape(-1), expected)
    assert layer.fused_cache_bytes() == layer.k * (4 + 4)  # int32 η copy + fp32 W0[η]

    state = layer.state_dict()
    assert torch.equal(state["base_layer.weight"], w0) and not layer.fused
    y2 = layer(x)  # fuses again
    assert torch.equal(y, y2) and layer.fused

    with torch.no_grad():
        layer.disabled = True
        base_only = layer(x)
        layer.disabled = False
    assert torch.equal(base_only, nn.functional.linear(x, w0, layer.bias))

    layer(x)
    layer.merge()
    assert torch.equal(layer.base_layer.weight.detach().reshape(-1), expected)
    assert torch.equal(layer(x), y)
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight.detach(), w0)


def test_load_state_dict_and_deepcopy_and_dtype_moves():
    (layer, _), w0 = _pair()
    with torch.no_grad():
        layer.values.normal_()
    x = torch.randn(4, 20)
    y = layer(x)
    saved = layer.state_dict()

    other, _ = _pair(seed=5)[0]  # a different η, Δ and base
    other(x)
    other.load_state_dict(saved)
    assert torch.equal(other(x), y)
    assert torch.equal(other.base_weight(), w0)

    twin = copy.deepcopy(layer)  # copies the fused weight and its cache
    assert torch.equal(twin(x), y)
    assert torch.equal(twin.base_weight(), w0)

    layer(x)
    layer.double()  # the fused weight and the cached W0[η] are converted alike
    y64 = layer(x.double())
    assert torch.allclose(y64, y.double(), atol=1e-6)
    assert torch.equal(layer.base_weight(), w0.double())


def test_inference_mode_then_training():
    (layer, plain), _ = _pair()
    with torch.no_grad():
        layer.values.normal_()
        plain.values.copy_(layer.values)
    x = torch.randn(4, 20)
    with torch.inference_mode():
        y_inf = layer(x)
    y = layer(x.clone().requires_grad_())
    y.sum().backward()
    assert torch.equal(y_inf, y.detach())
    y_plain = plain(x.clone().requires_grad_())
    y_plain.sum().backward()
    assert torch.equal(layer.values.grad, plain.values.grad)


def test_fused_step_allocates_no_dense_weight():
    (layer, _), _ = _pair(out=64, inp=48, k=50)
    x = torch.randn(2, 16, 48, requires_grad=True)
    layer(x).sum().backward()  # takes the fused state
    dense = layer.dense_numel
    with _NewAllocations() as mode:
        layer(x).sum().backward()
    assert dense not in mode.sizes, "a dense [out, in] tensor was allocated in a fused step"
    layer.fuse_delta = False
    with _NewAllocations() as mode:
        layer(x).sum().backward()
    assert mode.sizes.count(dense) >= 2  # the unfused path materialises W0 + Δ in forward and backward


def test_backward_after_unfuse_between_forward_and_backward():
    """A base-only pass (e.g. a reference model via disable) between forward and backward must not change
    the gradient: the backward fuses again before using the weight."""
    (layer, plain), _ = _pair()
    with torch.no_grad():
        layer.values.normal_()
        plain.values.copy_(layer.values)
    x = torch.randn(4, 20)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = layer(xa)
    layer.disabled = True
    with torch.no_grad():
        layer(x)
    layer.disabled = False
    assert not layer.fused
    ya.sum().backward()
    plain(xb).sum().backward()
    assert torch.equal(xa.grad, xb.grad) and torch.equal(layer.values.grad, plain.values.grad)


def test_pickle_round_trip_while_fused():
    import io

    (layer, _), w0 = _pair()
    with torch.no_grad():
        layer.values.normal_()
    x = torch.randn(3, 20)
    y = layer(x)
    buffer = io.BytesIO()
    torch.save(layer, buffer)  # the whole module, fused weight included
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=False)
    assert torch.equal(restored(x), y)
    assert torch.equal(restored.base_weight(), w0)


def test_two_layers_sharing_one_base_each_see_w0():
    torch.manual_seed(0)
    base = nn.Linear(20, 24)
    w0 = base.weight.detach().clone()
    a = SparseDeltaLinear(base, 30, generator=torch.Generator().manual_seed(1))
    b = SparseDeltaLinear(base, 30, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a.values.normal_()
        b.values.normal_()
    x = torch.randn(4, 20)
    ya, yb = a(x), b(x)  # b's fuse must first restore a's positions
    assert a.fused is False and b.fused
    for layer, y in ((a, ya), (b, yb)):
        dense = w0 + layer.delta_weight()
        torch.testing.assert_close(y, nn.functional.linear(x, dense, base.bias), rtol=0, atol=1e-6)
    assert torch.equal(a.base_weight(), w0)  # releases b as well
    assert not b.fused


# ------------------------------------------------------------------- the base weight touched by others
def test_disabled_forward_with_grad_then_fused_forward_backward_matches_unfused():
    """A base-only pass kept for backward (e.g. a reference output inside the loss) and an adapted pass
    of the same layer: the fused write must not invalidate the base-only pass's saved tensors."""
    results = []
    for layer in _pair()[0]:
        with torch.no_grad():
            layer.values.copy_(torch.linspace(-1, 1, layer.k))
        x = torch.randn(3, 20, generator=torch.Generator().manual_seed(4)).requires_grad_()
        layer.disabled = True
        y0 = layer(x)
        layer.disabled = False
        y1 = layer(x)
        ((y1 - y0) ** 2).sum().backward()
        results.append((y0.detach(), y1.detach(), x.grad, layer.values.grad))
    for got, want in zip(*results):
        assert torch.equal(got, want)


def test_indices_written_through_data_are_detected():
    (layer, _), w0 = _pair()
    with torch.no_grad():
        layer.values.normal_()
    x = torch.randn(4, 20)
    layer(x)
    new = layer.indices.clone()
    new[:5] = torch.tensor([i for i in range(480) if i not in set(layer.indices.tolist())][:5], dtype=new.dtype)
    layer.indices.data.copy_(new)  # .data keeps the version counter
    y = layer(x)
    dense = w0 + layer.delta_weight()
    torch.testing.assert_close(y, nn.functional.linear(x, dense, layer.bias), rtol=0, atol=1e-6)
    assert torch.equal(layer.base_weight(), w0)


def test_base_weight_replaced_or_reloaded_while_fused_is_taken_as_new_base():
    (layer, _), _ = _pair()
    with torch.no_grad():
        layer.values.normal_()
    x = torch.randn(4, 20)
    layer(x)
    w1 = torch.randn(24, 20)
    layer.base_layer.weight = nn.Parameter(w1.clone(), requires_grad=False)  # a new Parameter
    y = layer(x)
    torch.testing.assert_close(y, nn.functional.linear(x, w1 + layer.delta_weight(), layer.bias), rtol=0, atol=1e-6)
    assert torch.equal(layer.base_weight(), w1)
    layer(x)
    w2 = torch.randn(24, 20)
    layer.base_layer.load_state_dict({"weight": w2, "bias": layer.bias.detach().clone()})  # in place, same Parameter
    y = layer(x)
    torch.testing.assert_close(y, nn.functional.linear(x, w2 + layer.delta_weight(), layer.bias), rtol=0, atol=1e-6)
    assert torch.equal(layer.base_weight(), w2)


def test_dtype_round_trip_while_fused_matches_unfused():
    outs = []
    for layer in _pair()[0]:
        with torch.no_grad():
            layer.values.copy_(torch.linspace(-1, 1, layer.k))
        x = torch.randn(4, 20, generator=torch.Generator().manual_seed(2))
        layer(x)
        layer.to(torch.bfloat16)
        layer.to(torch.float32)
        outs.append((layer(x), layer.base_weight().clone()))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_tied_weights_are_not_fused():
    """A targeted lm_head tied to the input embeddings: the embedding lookup must keep reading W0."""
    import spiel
    from conftest import make_tiny_llama

    model = make_tiny_llama(0, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    w0 = model.model.embed_tokens.weight.detach().clone()
    sm = spiel.get_spiel_model(model, spiel.SpielConfig(num_tunable_weights=500, target_modules=["lm_head", "q_proj"]))
    layers = dict(sm.sparse_layers())
    assert layers["lm_head"].fuse_delta is False and layers["model.layers.0.self_attn.q_proj"].fuse_delta is True
    with torch.no_grad():
        layers["lm_head"].values.fill_(1.0)
    ids = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        a, b = sm(input_ids=ids).logits, sm(input_ids=ids).logits
    assert torch.equal(a, b) and torch.equal(model.model.embed_tokens.weight, w0)
