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


@pytest.mark.parametrize("how", ["in-place", "through-data-then-refresh"])
def test_indices_written_outside_replace_entries(how):
    """An in-place write to η is seen by its version counter; a write through ``.data`` (which keeps the
    counter) is seen after ``refresh()``, the documented call for that case. Forward and dΔ both follow."""
    (layer, _), w0 = _pair()
    with torch.no_grad():
        layer.values.normal_()
    x = torch.randn(4, 20)
    layer(x)
    new = layer.indices.clone()
    new[:5] = torch.tensor([i for i in range(480) if i not in set(layer.indices.tolist())][:5], dtype=new.dtype)
    if how == "in-place":
        with torch.no_grad():
            layer.indices.copy_(new)
    else:
        layer.indices.data.copy_(new)
        layer.refresh()
    xg = x.clone().requires_grad_()
    y = layer(xg)
    dense = w0 + layer.delta_weight()
    torch.testing.assert_close(y, nn.functional.linear(x, dense, layer.bias), rtol=0, atol=1e-6)
    grad_out = torch.randn(4, 24)
    y.backward(grad_out)
    torch.testing.assert_close(layer.values.grad, (grad_out.t() @ x).reshape(-1)[layer.indices.long()],
                               rtol=1e-5, atol=1e-5)
    assert torch.equal(layer.base_weight(), w0)


def test_base_weight_replaced_or_reloaded_while_fused_is_taken_as_new_base():
    (layer, _), _ = _pair()
    with torch.no_grad():
        layer.values.normal_()
    x = torch.randn(4, 20)
    layer(x)
    w1 = torch.randn(24, 20)
    layer.base_layer.weight = nn.Parameter(w1.clone(), requires_grad=False)  # a new Parameter
    with pytest.warns(RuntimeWarning, match="fusion is turned off"):
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


# --------------------------------------------------------------- no registration, ownership, wrappers
def test_parameter_names_and_state_dict_keys_unchanged_by_forward():
    """The fused state is a plain attribute: a wrapped model's parameters, buffers and state_dict keys are the
    same before and after forward/backward/step, and no parameter is counted twice (tie detection)."""
    import spiel
    from conftest import make_tiny_llama

    model = spiel.get_spiel_model(make_tiny_llama(0), spiel.SpielConfig(num_tunable_weights=400))

    def names():
        return ([n for n, _ in model.named_parameters(remove_duplicate=False)],
                [n for n, _ in model.named_buffers(remove_duplicate=False)], list(model.state_dict()))

    before = names()
    opt = SparseAdamW([p for p in model.parameters() if p.requires_grad], lr=0.01)
    ids = torch.randint(0, 128, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    model(input_ids=ids)
    assert all(layer.fused for _, layer in model.sparse_layers())
    assert names() == before
    assert len({id(p) for p in model.parameters()}) == len(before[0])


class _SubclassedWeight(torch.Tensor):
    """A stand-in for a tensor-subclass weight (DTensor, a quantised tensor): fusion must not write into it."""


@pytest.mark.parametrize("kind", ["subclass", "view-into-flat-buffer", "zero3-placeholder-attr"])
def test_fusion_off_for_weights_it_cannot_own(kind):
    torch.manual_seed(0)
    base = nn.Linear(20, 24)
    w0 = base.weight.detach().clone()
    if kind == "subclass":
        base.weight = nn.Parameter(w0.clone().as_subclass(_SubclassedWeight), requires_grad=False)
        assert type(base.weight) is not nn.Parameter
    elif kind == "view-into-flat-buffer":  # as FSDP's flat parameter holds every weight of a unit
        flat = torch.cat([w0.reshape(-1), torch.zeros(7)])
        base.weight = nn.Parameter(flat[:480].view(24, 20), requires_grad=False)
    else:
        base.weight.ds_id = 3  # a DeepSpeed ZeRO-3 partitioned parameter carries ds_id
    snapshot = base.weight.detach().clone()
    layer = SparseDeltaLinear(base, 40, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer.values.normal_()
    x = torch.randn(4, 20, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert not layer.fused
    assert torch.equal(base.weight.detach().as_subclass(torch.Tensor), snapshot.as_subclass(torch.Tensor))
    torch.testing.assert_close(y.as_subclass(torch.Tensor),
                               nn.functional.linear(x.detach(), w0 + layer.delta_weight(), base.bias.detach()),
                               rtol=0, atol=1e-6)


def test_get_spiel_model_marks_unownable_weights_unfused():
    import spiel
    from conftest import make_tiny_llama

    model = make_tiny_llama(0)
    model.model.layers[0].self_attn.q_proj.weight.ds_id = 1
    sm = spiel.get_spiel_model(model, spiel.SpielConfig(num_tunable_weights=400))
    layers = dict(sm.sparse_layers())
    assert layers["model.layers.0.self_attn.q_proj"].fuse_delta is False
    assert layers["model.layers.0.self_attn.k_proj"].fuse_delta is True


def test_weight_swapped_between_calls_turns_fusion_off():
    """A wrapper that hands the layer a new Parameter per call (FSDP's unshard/reshard): the layer notices
    once, turns fusion off for itself and never writes into the swapped-out weights."""
    (layer, _), w0 = _pair()
    with torch.no_grad():
        layer.values.normal_()
    x = torch.randn(4, 20)
    first = layer.base_layer.weight
    layer(x)
    layer.base_layer.weight = nn.Parameter(w0.clone(), requires_grad=False)  # "reshard, unshard"
    with pytest.warns(RuntimeWarning, match="fusion is turned off"):
        y = layer(x)
    assert layer.fuse_delta is False and not layer.fused
    torch.testing.assert_close(y, nn.functional.linear(x, w0 + layer.delta_weight(), layer.bias), rtol=0, atol=1e-6)
    assert torch.equal(layer.base_layer.weight.detach(), w0)
    assert not torch.equal(first.detach(), w0)  # the swapped-out weight kept what was written; nobody reads it


def test_fully_shard_single_rank_matches_unwrapped():
    """FSDP2 (``fully_shard``) over a one-rank gloo group on CPU: outputs and dΔ equal the unwrapped layer's
    over two steps, and the sharded parameter keeps W0 (fusion writes only into FSDP's unsharded copy)."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("torch.distributed unavailable or already initialised in this process")
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
    except ImportError as exc:
        pytest.skip(f"fully_shard unavailable: {exc}")
    (layer, plain), w0 = _pair()
    with torch.no_grad():
        layer.values.copy_(torch.linspace(-1, 1, layer.k))
        plain.values.copy_(layer.values)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        outer = nn.Sequential(layer)
        fully_shard(outer, mesh=init_device_mesh("cpu", (1,)))
        for step in range(2):
            x = torch.randn(3, 20, generator=torch.Generator().manual_seed(step))
            xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
            ya, yb = outer(xa), plain(xb)
            ya.sum().backward()
            yb.sum().backward()
            assert torch.equal(ya, yb) and torch.equal(xa.grad, xb.grad)
            assert torch.equal(layer.values.grad.full_tensor(), plain.values.grad)
            layer.values.grad = plain.values.grad = None
        sharded = layer.base_layer.weight
        assert torch.equal(sharded.full_tensor() if hasattr(sharded, "full_tensor") else sharded.detach(), w0)
        outer.state_dict()  # sees the sharded DTensor: nothing to restore there, fusion stays on
        assert layer.fuse_delta is True
    finally:
        dist.destroy_process_group()


def test_data_parallel_replica_carries_the_fused_state():
    """``nn.DataParallel`` replicas (``_replicate_for_data_parallel`` plus copies of the parameters, as
    ``replicate`` broadcasts them) hold a copy of the fused weight: the replica computes with W0 + Δ once."""
    (layer, plain), w0 = _pair()
    with torch.no_grad():
        layer.values.normal_()
        plain.values.copy_(layer.values)
    x = torch.randn(4, 20)
    layer(x)  # fused
    replica = layer._replicate_for_data_parallel()
    replica.base_layer = layer.base_layer._replicate_for_data_parallel()
    replica.base_layer._parameters = {name: p.detach().clone() for name, p in layer.base_layer._parameters.items()}
    replica._parameters = {"values": layer.values.detach().clone()}
    assert torch.equal(replica(x), plain(x))
    assert layer.fuse_delta  # the master is untouched
    assert torch.equal(layer(x), plain(x)) and torch.equal(layer.base_weight(), w0)


def _compile_or_skip(fn, backend):
    try:
        compiled = torch.compile(fn, backend=backend)
    except Exception as exc:  # pragma: no cover - depends on the machine
        pytest.skip(f"torch.compile({backend}) unavailable: {exc}")
    return compiled


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_matches_eager(backend):
    """A compiled tiny model of two SpIEL layers: loss, input gradient and dΔ equal eager over two optimizer
    steps, the fused state survives, and W0 comes back intact (the layer's autograd function may run as a
    graph break)."""
    def make():
        torch.manual_seed(0)
        return nn.Sequential(SparseDeltaLinear(nn.Linear(20, 32), 60, generator=torch.Generator().manual_seed(1)),
                             nn.GELU(),
                             SparseDeltaLinear(nn.Linear(32, 8), 30, generator=torch.Generator().manual_seed(2)))

    models = [make(), make()]
    w0 = [layer.base_weight().clone() for layer in (models[0][0], models[0][2])]
    opts = [SparseAdamW([p for p in m.parameters() if p.requires_grad], lr=0.05) for m in models]
    eager = models[0]
    compiled = _compile_or_skip(models[1], backend)
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        x = torch.randn(4, 5, 20, generator=gen)
        grads = []
        for model, module, opt in zip((eager, compiled), models, opts):
            xi = x.clone().requires_grad_()
            try:
                loss = (model(xi) ** 2).mean()
            except Exception as exc:
                if model is compiled and ("compiler" in str(exc).lower() or "cpp" in str(exc).lower()):
                    pytest.skip(f"torch.compile({backend}) cannot run here (no working C++ toolchain?): {exc}")
                raise
            loss.backward()
            grads.append((loss.detach(), xi.grad, [m.values.grad.clone() for m in (module[0], module[2])]))
            opt.step()
            opt.zero_grad()
        torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-5, atol=1e-7)
        for a, b in zip(grads[0][2], grads[1][2]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    layers = (models[1][0], models[1][2])
    assert all(layer.fused for layer in layers)
    for layer, base in zip(layers, w0):
        assert torch.equal(layer.base_weight(), base)


def test_load_adapter_while_fused_matches_a_fresh_load(tmp_path):
    """load_adapter writes η and Δ in place while the layers are fused: the next forward restores the old
    positions and fuses the loaded ones (same logits as loading onto a fresh model, base back to W0)."""
    import spiel
    from conftest import make_tiny_llama

    cfg = spiel.SpielConfig(num_tunable_weights=400, seed=1)
    donor = spiel.get_spiel_model(make_tiny_llama(0), cfg)
    with torch.no_grad():
        for _, layer in donor.sparse_layers():
            layer.values.normal_(0, 0.05)
    donor.save_pretrained(tmp_path / "adapter")
    ids = torch.randint(3, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    live = spiel.get_spiel_model(make_tiny_llama(0), cfg.replace(seed=2))  # other η
    w0 = {name: layer.base_weight().clone() for name, layer in live.sparse_layers()}
    with torch.no_grad():
        for _, layer in live.sparse_layers():
            layer.values.normal_(0, 0.05)
        live(input_ids=ids)
    assert all(layer.fused for _, layer in live.sparse_layers())
    live.load_adapter(tmp_path / "adapter")
    fresh = spiel.SpielModel.from_pretrained(make_tiny_llama(0), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(live(input_ids=ids).logits, fresh(input_ids=ids).logits)
    for name, layer in live.sparse_layers():
        assert torch.equal(layer.base_weight(), w0[name]), name
