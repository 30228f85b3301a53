"""SpIEL reselection (docs/METHOD.md §3–§5): the schedule, drop, SpIEL-AG and SpIEL-MA growth checked by
brute force, invariants of the index sets, training progress and exact resume."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import make_tiny_llama
from spiel.config import SpielConfig
from spiel.model import get_spiel_model
from spiel.optim import SM3, SparseAdamW, build_optimizer
from spiel.selection import (
    SpielSelector,
    choose_ag_growth,
    drop_slots,
    phase_open_after,
    reselection_rate,
    reselection_steps,
    top_inactive_scores,
    topk_abs_indices,
)


GA = 2


def _model(algo="ag", seed=0, density=0.05, S=6, gamma=2, zeta=0.5, policy="linear", delta_dtype="float32"):
    cfg = SpielConfig(density=density, selection_algorithm=algo, reselection_steps=S,
                      selection_accumulation_steps=gamma, initial_reselection_rate=zeta,
                      reselection_rate_policy=policy, delta_dtype=delta_dtype, seed=seed)
    return get_spiel_model(make_tiny_llama(seed), cfg)


def _batch(step, micro, batch=2, seq=12):
    gen = torch.Generator().manual_seed(1000 * step + micro)
    return torch.randint(3, 128, (batch, seq), generator=gen)


def _update(model, opt, step, ga=GA):
    """One optimizer update of GA micro-batches (loss / GA, as HF Trainer scales it)."""
    for micro in range(ga):
        x = _batch(step, micro)
        (model(input_ids=x, labels=x).loss / ga).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _train_step(model, opt, sel, step, ga=GA):
    _update(model, opt, step, ga)
    sel.step()


def _break_ties(model, seed=0):
    """Adam moves many entries by exactly ±lr, so |Δ| has ties; tiny distinct offsets make the
    smallest-|Δ| set unique for brute-force comparisons."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in model.sparse_layers():
            layer.values.add_(torch.rand(layer.values.shape, generator=gen) * 1e-5)


def _setup(algo="ag", total=20, lr=1e-2, **kw):
    model = _model(algo, **kw)
    opt = build_optimizer(model, lr=lr)
    sel = SpielSelector(model, opt, total_steps=total, grad_accumulation_steps=GA)
    return model, opt, sel


def _assert_index_invariants(model, expected_k):
    for name, layer in model.sparse_layers():
        idx = layer.indices.long()
        assert layer.k == expected_k[name] == layer.values.numel()
        assert torch.unique(idx).numel() == idx.numel(), name
        assert int(idx.min()) >= 0 and int(idx.max()) < layer.dense_numel, name
        assert layer.indices.dtype == torch.int32


# ------------------------------------------------------------------------------------- schedule
def test_reselection_rate_policies():
    assert reselection_rate(5, 100, 0.2, "linear", 5) == 1.0  # first reselection replaces everything
    assert reselection_rate(25, 100, 0.2, "linear", 5) == pytest.approx(0.15)
    assert reselection_rate(45, 100, 0.2, "linear", 5) == pytest.approx(0.11)
    assert reselection_rate(5, 100, 0.2, "cosine", 5) == pytest.approx(0.2 * (1 + math.cos(math.pi * 0.05)) / 2)
    assert reselection_rate(50, 100, 0.2, "cosine", 5) == pytest.approx(0.1)
    assert reselection_rate(25, 100, 0.2, "none", 5) == 0.0
    with pytest.raises(ValueError, match="reselection_rate_policy"):
        reselection_rate(25, 100, 0.2, "step", 5)
    # The spec's derived example: T = 782 gives 39 reselections, p(25) = 0.194, p(765) = 0.004.
    steps = reselection_steps(782, 20, 5)
    assert steps[:3] == [5, 25, 45] and steps[-1] == 765 and len(steps) == 39
    assert round(reselection_rate(25, 782, 0.2, "linear", 5), 3) == 0.194
    assert round(reselection_rate(765, 782, 0.2, "linear", 5), 3) == 0.004


@pytest.mark.parametrize("policy", ["linear", "cosine"])
def test_schedule_simulation_steps_rates_and_hooks(policy):
    model = _model("ag", S=20, gamma=5, zeta=0.2, policy=policy)
    opt = build_optimizer(model, lr=1e-3)
    sel = SpielSelector(model, opt, total_steps=100, grad_accumulation_steps=1)
    layers = [layer for _, layer in model.sparse_layers()]
    open_after = [sel.phase_open]
    for _ in range(100):
        sel.step()
        open_after.append(sel.phase_open)
        hooked = [layer.weight_grad_hook is not None for layer in layers]
        assert all(h == sel.phase_open for h in hooked)
    assert [h["step"] for h in sel.history] == [5, 25, 45, 65, 85]
    expected = [reselection_rate(t, 100, 0.2, policy, 5) for t in (5, 25, 45, 65, 85)]
    assert [h["rate"] for h in sel.history] == pytest.approx(expected)
    assert (sel.history[0]["rate"] == 1.0) == (policy == "linear")
    # Windows: open after steps 0-4 (5 updates), then 19-24, 39-44, ... (6 updates, §3 off-by-one).
    want = {t for t in range(0, 5)} | {t for s in (19, 39, 59, 79) for t in range(s, s + 6)}
    assert {t for t, o in enumerate(open_after) if o} == want
    assert [phase_open_after(t, 100, 20, 5) for t in range(101)] == open_after
    assert all(layer.weight_grad_hook is None for layer in layers)  # nothing leaks after the run (§10.2.9)


def test_schedule_skips_phases_that_end_after_total_steps_and_gamma_zero():
    model = _model("ag", S=20, gamma=5)
    sel = SpielSelector(model, build_optimizer(model, lr=1e-3), total_steps=22)
    for _ in range(30):  # run past T as a mis-sized loop would
        sel.step()
        assert not (sel.completed_steps >= 19 and sel.phase_open)
    assert [h["step"] for h in sel.history] == [5]
    assert all(layer.weight_grad_hook is None for _, layer in model.sparse_layers())
    # γ = 0: the first reselection is at t = S with a one-update window; nothing opens at construction.
    model = _model("ag", S=4, gamma=0)
    sel = SpielSelector(model, build_optimizer(model, lr=1e-3), total_steps=12)
    assert not sel.phase_open
    opened = []
    for _ in range(12):
        sel.step()
        opened.append(sel.phase_open)
    assert [h["step"] for h in sel.history] == [4, 8, 12] == reselection_steps(12, 4, 0)
    assert opened == [False, False, True, False] * 3


def test_selector_validates_its_inputs():
    model = _model("ma")
    with pytest.raises(ValueError, match="total_steps"):
        SpielSelector(model, build_optimizer(model, lr=1e-3), total_steps=0)
    with pytest.raises(ValueError, match="grad_accumulation_steps"):
        SpielSelector(model, build_optimizer(model, lr=1e-3), total_steps=5, grad_accumulation_steps=0)
    with pytest.raises(ValueError, match="SM3"):
        SpielSelector(model, build_optimizer(model, lr=1e-3, algorithm="ag"), total_steps=5)
    assert isinstance(build_optimizer(model, lr=1e-3), SM3)
    assert isinstance(build_optimizer(_model("ag"), lr=1e-3), SparseAdamW)


# ------------------------------------------------------------------------------- drop and grow
def test_drop_slots_takes_smallest_magnitudes():
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(50, generator=gen)
    slots = drop_slots(values, 12)
    brute = sorted(range(50), key=lambda i: abs(values[i].item()))[:12]
    assert slots.tolist() == brute
    assert drop_slots(values, 0).numel() == 0
    with pytest.raises(ValueError, match="n must be"):
        drop_slots(values, 51)


def test_choose_ag_growth_discards_kept_and_handles_intersections():
    indices = torch.tensor([10, 11, 12, 13], dtype=torch.int32)
    outgoing = torch.tensor([2, 0])  # slots holding 12 and 10, ascending |Δ|
    candidates = torch.tensor([11, 12, 20, 21, 22], dtype=torch.int32)
    scores = torch.tensor([9.0, 8.0, 1.0, 7.0, 0.5])
    slots, chosen = choose_ag_growth(indices, outgoing, candidates, scores)
    # 11 is kept (discarded); incoming = top-2 of {12, 20, 21, 22} = [12, 21]; 12 is also outgoing so
    # slot 2 keeps it; 21 replaces 10 in slot 0.
    assert slots.tolist() == [0] and candidates[chosen].tolist() == [21]
    # Too few valid candidates: only the smallest-|Δ| outgoing slots are used.
    slots, chosen = choose_ag_growth(indices, torch.tensor([2, 0, 1]), torch.tensor([11, 30]), torch.tensor([5.0, 1.0]))
    assert slots.tolist() == [2] and chosen.tolist() == [1]


def test_topk_abs_indices_is_the_exact_top_k_set():
    from spiel.selection import _SAMPLE_SIZE, _sample_positions

    gen = torch.Generator().manual_seed(3)
    n, k = 1 << 17, 6000  # large enough for the sampled-threshold path
    values = torch.randn(n, generator=gen)
    want = set(torch.topk(values.abs(), k).indices.tolist())
    assert set(topk_abs_indices(values.view(256, -1), k).tolist()) == want
    small = values[:5000]  # small tensors: plain torch.topk
    assert set(topk_abs_indices(small, 700).tolist()) == set(torch.topk(small.abs(), 700).indices.tolist())
    assert topk_abs_indices(values, 0).numel() == 0
    # A sample that overestimates the threshold (large values exactly at the sampled positions, more
    # requested than were sampled) falls back to a full top-k.
    skewed = torch.rand(n, generator=gen)
    skewed[_sample_positions(n, "cpu")] += 10.0
    k_big = 2 * _SAMPLE_SIZE
    assert set(topk_abs_indices(skewed, k_big).tolist()) == set(torch.topk(skewed, k_big).indices.tolist())
    # Mostly-zero magnitudes (98% ties at 0) give the exact set; a NaN ranks highest, as in torch.topk.
    sparse = torch.zeros(n)
    sparse[7::50] = torch.rand(sparse[7::50].shape, generator=gen) + 1.0
    sparse[5] = float("nan")
    got = topk_abs_indices(-sparse, 100)
    assert 5 in set(got.tolist())
    assert set(got.tolist()) == set(torch.topk(sparse, 100).indices.tolist())
    with pytest.raises(ValueError, match="k must be"):
        topk_abs_indices(values, n + 1)


@pytest.mark.parametrize("block_elements", [6, 1 << 22])
def test_top_inactive_scores_matches_brute_force(block_elements):
    gen = torch.Generator().manual_seed(1)
    row, col = torch.rand(7, generator=gen), torch.rand(5, generator=gen)
    active = torch.randperm(35, generator=gen)[:12].to(torch.int32)
    pos, scores = top_inactive_scores(row, col, active, 9, block_elements=block_elements)
    dense = torch.outer(row, col).reshape(-1)
    inactive = [i for i in range(35) if i not in set(active.tolist())]
    brute = sorted(inactive, key=lambda i: -dense[i].item())[:9]
    assert pos.tolist() == brute
    torch.testing.assert_close(scores, dense[brute])
    # Fewer inactive positions than requested: all of them, never an active one.
    active = torch.arange(30)
    pos, _ = top_inactive_scores(row, col, active, 9, block_elements=block_elements)
    assert sorted(pos.tolist()) == [30, 31, 32, 33, 34]


class _PhaseSpy:
    """Records, per matrix, what the SpIEL-AG selector receives during a phase: the dense ``dW`` of the
    first backward, the candidates it then asks the layer to sample, each sampled candidate gradient,
    and every backward's ``(x, dY)`` to recompute ``dW`` in fp64."""

    def __init__(self, model):
        self.dense, self.candidates, self.sampled, self.io = {}, {}, {}, {}
        self.handles = []
        for name, layer in model.sparse_layers():
            self._wrap_dense(name, layer)
            self.handles.append(layer.register_forward_hook(self._record_io(name)))

    def _wrap_dense(self, name, layer):
        original = layer.weight_grad_hook

        def dense_spy(dw):
            self.dense.setdefault(name, []).append(dw.detach().clone())
            original(dw)
            inner = layer.grad_sample_hook  # the selector switched the layer to sampled candidates
            if inner is not None:
                self.candidates[name] = layer.grad_sample_indices.clone()

                def sampled_spy(g):
                    self.sampled.setdefault(name, []).append(g.detach().clone())
                    inner(g)

                sampled_spy._spiel_selector = inner._spiel_selector
                layer.grad_sample_hook = sampled_spy

        dense_spy._spiel_selector = original._spiel_selector
        layer.weight_grad_hook = dense_spy

    def _record_io(self, name):
        def hook(module, args, out):
            x = args[0].detach().clone()
            out.register_hook(lambda gy: self.io.setdefault(name, []).append((x, gy.detach().clone())))
        return hook

    def remove(self):
        for handle in self.handles:
            handle.remove()


def test_ag_reselection_matches_brute_force_and_seeds_adam_state():
    model, opt, sel = _setup("ag", total=20, S=6, gamma=2, zeta=0.5)
    expected_k = model.num_deltas
    spy = None
    for step in range(1, 8):
        _train_step(model, opt, sel, step)
        if step == 5:
            assert sel.phase_open
            spy = _PhaseSpy(model)
    _update(model, opt, 8)
    spy.remove()
    _break_ties(model)
    before = {n: (l.indices.long().clone(), l.values.detach().clone()) for n, l in model.sparse_layers()}
    state_before = {n: {k: v.clone() for k, v in opt.state[l.values].items()} for n, l in model.sparse_layers()}
    sel.step()
    assert [h["step"] for h in sel.history] == [2, 8]
    assert all(l.weight_grad_hook is None and l.grad_sample_hook is None for _, l in model.sparse_layers())
    p = 0.5 * (1 - 8 / 20)
    assert sel.history[1]["rate"] == pytest.approx(p)
    beta1, beta2 = opt.param_groups[0]["betas"]
    total_changed = 0
    for name, layer in model.sparse_layers():
        idx, vals = before[name]
        k = idx.numel()
        # Spec §4.1: one dense dW per matrix per phase (the first micro-batch of steps 6-8), then only
        # sampled candidate gradients for the other 3·GA − 1 micro-batches.
        assert len(spy.dense[name]) == 1 and len(spy.sampled[name]) == 3 * GA - 1
        first = spy.dense[name][0].reshape(-1)
        cand = spy.candidates[name].long()
        assert set(cand.tolist()) == set(torch.topk(first.abs(), k).indices.tolist())  # top-k |dW|
        # Each sampled value is dW at the candidates, up to the order of fp32 summation.
        for (x, gy), got in zip(spy.io[name][1:], spy.sampled[name]):
            dense64 = (gy.reshape(-1, layer.out_features).double().t() @ x.reshape(-1, layer.in_features).double())
            want = dense64.reshape(-1)[cand]
            torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6 * float(dense64.abs().max()))
        grads = [first[cand]] + spy.sampled[name]
        sums = sum(grads)
        sq = sum(g ** 2 for g in grads)
        n = int(k * p)
        outgoing = sorted(range(k), key=lambda s: abs(vals[s].item()))[:n]
        out_pos = {int(idx[s]) for s in outgoing}
        remaining = set(idx.tolist()) - out_pos
        valid = [i for i in range(k) if int(cand[i]) not in remaining]
        incoming = sorted(valid, key=lambda i: -abs(sums[i].item()))[:n]
        both = {int(cand[i]) for i in incoming} & out_pos
        incoming = [i for i in incoming if int(cand[i]) not in both]
        slots = [s for s in outgoing if int(idx[s]) not in both][: len(incoming)]
        new_idx = layer.indices.long()
        expected = idx.clone()
        expected[slots] = cand[incoming]
        assert torch.equal(new_idx, expected), name
        total_changed += len(slots)
        st = opt.state[layer.values]
        if slots:
            s = torch.tensor(slots)
            assert torch.all(layer.values.detach()[s] == 0)
            age = len(grads) / GA
            assert torch.all(st["age"][s] == age)
            torch.testing.assert_close(st["exp_avg"][s], sums[incoming] / len(grads) * (1 - beta1 ** age))
            torch.testing.assert_close(st["exp_avg_sq"][s], sq[incoming] / len(grads) * (1 - beta2 ** age))
        keep = torch.ones(k, dtype=torch.bool)
        keep[slots] = False
        assert torch.equal(layer.values.detach()[keep], vals[keep])
        for key in ("age", "exp_avg", "exp_avg_sq"):
            assert torch.equal(st[key][keep], state_before[name][key][keep])
    assert total_changed == sel.history[1]["num_replaced"] > 0
    _assert_index_invariants(model, expected_k)


def test_ag_layer_subclass_with_own_forward_keeps_the_dense_hook():
    """A SparseDeltaLinear subclass with its own forward (like a reference-style layer that forms dW in
    every backward) may bypass the sampled path, so the selector keeps gathering from its dense dW."""
    from spiel.layer import SparseDeltaLinear

    class OwnForward(SparseDeltaLinear):
        def forward(self, x):
            return super().forward(x)

    model, opt, sel = _setup("ag", total=20, S=6, gamma=3)
    (name0, first), (name1, second) = model.sparse_layers()[:2]
    first.__class__ = OwnForward
    for step in (1, 2):
        _train_step(model, opt, sel, step)
    assert first.weight_grad_hook is not None and first.grad_sample_hook is None
    assert second.weight_grad_hook is None and second.grad_sample_hook is not None
    assert sel._acc[name0].samples == sel._acc[name1].samples == 2 * GA


def test_ma_reselection_matches_brute_force_and_leaves_sm3_state():
    model, opt, sel = _setup("ma", total=20, S=6, gamma=2, zeta=0.5)
    expected_k = model.num_deltas
    for step in range(1, 8):
        _train_step(model, opt, sel, step)
    _update(model, opt, 8)
    _break_ties(model)
    before = {n: (l.indices.long().clone(), l.values.detach().clone()) for n, l in model.sparse_layers()}
    acc_seen = {n: tuple(a.clone() for a in opt.accumulators(l.values)) for n, l in model.sparse_layers()}
    sel.step()
    assert [h["step"] for h in sel.history] == [2, 8]
    p = 0.5 * (1 - 8 / 20)
    for name, layer in model.sparse_layers():
        idx, vals = before[name]
        k = idx.numel()
        n = int(k * p)
        row, col = acc_seen[name]
        assert all(torch.equal(a, b) for a, b in zip(opt.accumulators(layer.values), acc_seen[name]))
        dense = torch.outer(row, col).reshape(-1)
        active = set(idx.tolist())
        new_idx = layer.indices.long()
        changed = (new_idx != idx).nonzero().squeeze(1)
        outgoing = sorted(range(k), key=lambda s: abs(vals[s].item()))[:n]
        assert sorted(changed.tolist()) == sorted(outgoing)
        grown = new_idx[changed].tolist()
        assert not (set(grown) & active)  # MA never picks an index active before the drop
        inactive_scores = sorted((dense[i].item() for i in range(dense.numel()) if i not in active), reverse=True)
        torch.testing.assert_close(sorted((dense[g].item() for g in grown), reverse=True), inactive_scores[:n])
        assert torch.all(layer.values.detach()[changed] == 0)
    _assert_index_invariants(model, expected_k)


def _train_on_fixed_batch(algo, checkpointing, steps=8):
    model, opt, sel = _setup(algo, total=steps + 1, S=4, gamma=1, zeta=0.3)
    expected_k = model.num_deltas
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    fixed = _batch(0, 0, batch=4)
    with torch.no_grad():
        loss0 = model(input_ids=fixed, labels=fixed).loss.item()
    for step in range(1, steps + 1):
        for micro in range(GA):  # the fixed batch plus one changing batch per update
            x = fixed if micro == 0 else _batch(step, micro, batch=4)
            (model(input_ids=x, labels=x).loss / GA).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sel.step()
        _assert_index_invariants(model, expected_k)
    with torch.no_grad():
        loss1 = model(input_ids=fixed, labels=fixed).loss.item()
    return model, sel, loss0, loss1


@pytest.mark.parametrize("algo", ["ag", "ma"])
def test_training_changes_every_delta_and_lowers_loss(algo):
    results = {}
    for checkpointing in (False, True):
        model, sel, loss0, loss1 = _train_on_fixed_batch(algo, checkpointing)
        assert model.base_model.model.gradient_checkpointing == checkpointing
        assert [h["step"] for h in sel.history] == [1, 5]
        assert all(h["num_replaced"] > 0 for h in sel.history)
        for name, layer in model.sparse_layers():
            assert bool((layer.values.detach() != 0).any()), name  # every delta tensor moved from 0
        assert loss1 < loss0
        results[checkpointing] = _snapshot(model)
    # Gradient checkpointing changes nothing: same indices and (up to fp32 rounding) same deltas.
    for name, (idx, vals) in results[False].items():
        assert torch.equal(results[True][name][0], idx), name
        torch.testing.assert_close(results[True][name][1], vals)


def test_static_policy_never_changes_indices():
    model, opt, sel = _setup("ag", total=8, S=3, gamma=1, policy="none")
    idx0 = {n: l.indices.clone() for n, l in model.sparse_layers()}
    for step in range(1, 9):
        _train_step(model, opt, sel, step)
        assert not sel.phase_open
        assert all(layer.weight_grad_hook is None for _, layer in model.sparse_layers())
    assert sel.history == []
    assert all(torch.equal(l.indices, idx0[n]) for n, l in model.sparse_layers())


def test_ag_accumulates_in_fp32_under_bf16_autocast():
    model, opt, sel = _setup("ag", total=20, S=6, gamma=3, delta_dtype="bfloat16")
    for step in range(1, 3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            for micro in range(GA):
                x = _batch(step, micro)
                (model(input_ids=x, labels=x).loss / GA).backward()
        opt.step()
        opt.zero_grad()
        sel.step()
    for name, _ in model.sparse_layers():
        acc = sel._acc[name]
        assert acc.grad_sum.dtype == acc.grad_sq_sum.dtype == torch.float32
        assert acc.samples == 2 * GA


def test_reselect_refuses_merged_layers():
    model, opt, sel = _setup("ma", total=20)
    model.merge_adapter()
    with pytest.raises(RuntimeError, match="merged"):
        sel.reselect(0.5)


# ------------------------------------------------------------------------------------- resume
def _snapshot(model):
    return {n: (l.indices.clone(), l.values.detach().clone()) for n, l in model.sparse_layers()}


def test_resume_mid_phase_from_state_dicts_equals_uninterrupted(tmp_path):
    ref_model, ref_opt, ref_sel = _setup("ag", total=10, S=6, gamma=2)
    for step in range(1, 11):
        _train_step(ref_model, ref_opt, ref_sel, step)
    reference = _snapshot(ref_model)

    model, opt, sel = _setup("ag", total=10, S=6, gamma=2)
    for step in range(1, 8):  # stop after step 7: a phase is open with accumulated gradients
        _train_step(model, opt, sel, step)
    assert sel.phase_open and sel._acc
    path = tmp_path / "ckpt.pt"
    torch.save({"adapter": model.adapter_state_dict(), "opt": opt.state_dict(), "sel": sel.state_dict()}, path)
    ckpt = torch.load(path, weights_only=True)

    model2 = _model("ag", S=6, gamma=2)
    with torch.no_grad():
        for name, layer in model2.sparse_layers():
            layer.indices.copy_(ckpt["adapter"][f"{name}.indices"])
            layer.values.copy_(ckpt["adapter"][f"{name}.values"])
    opt2 = build_optimizer(model2, lr=1e-2)
    opt2.load_state_dict(ckpt["opt"])
    sel2 = SpielSelector(model2, opt2, total_steps=10, grad_accumulation_steps=GA)
    sel2.load_state_dict(ckpt["sel"])
    assert sel2.completed_steps == 7 and sel2.phase_open
    for name, layer in model2.sparse_layers():  # candidates restored: sampled, no dense dW needed
        assert layer.weight_grad_hook is None and layer.grad_sample_hook is not None
        assert torch.equal(layer.grad_sample_indices, ckpt["sel"]["accumulators"][name]["candidates"])
    for step in range(8, 11):
        _train_step(model2, opt2, sel2, step)
    resumed = _snapshot(model2)
    for name in reference:
        assert torch.equal(resumed[name][0], reference[name][0]), name
        assert torch.equal(resumed[name][1], reference[name][1]), name
    assert sel2.history == ref_sel.history and [h["step"] for h in ref_sel.history] == [2, 8]


def test_resume_state_with_closed_phase_and_from_step_count():
    model, opt, sel = _setup("ag", total=12, S=6, gamma=2)
    for step in range(1, 4):
        _train_step(model, opt, sel, step)
    state = sel.state_dict()
    assert not state["phase_open"] and state["accumulators"] == {}
    sel.close()
    sel2 = SpielSelector(model, opt, total_steps=12, grad_accumulation_steps=GA)
    assert sel2.phase_open  # construction opens the reference's first phase ...
    sel2.load_state_dict(state)
    assert not sel2.phase_open  # ... and loading a closed-phase state removes it (§10.10)
    assert all(l.weight_grad_hook is None for _, l in model.sparse_layers())
    assert [h["step"] for h in sel2.history] == [2]
    sel2.close()
    # Without a saved state, only the schedule decides: closed after step 3, open after step 6.
    assert not SpielSelector(model, opt, total_steps=12, completed_steps=3).phase_open
    sel3 = SpielSelector(model, opt, total_steps=12, completed_steps=6)
    assert sel3.phase_open and all(l.weight_grad_hook is not None for _, l in model.sparse_layers())
    with pytest.raises(ValueError, match="version"):
        sel3.load_state_dict({"completed_steps": 3})
    bad = dict(state, accumulators={"model.nope": {}})
    with pytest.raises(ValueError, match="model.nope"):
        sel3.load_state_dict(bad)


def _brute_top_inactive(row, col, active, n):
    dense = torch.outer(row.float(), col.float()).reshape(-1)
    taken = set(active.tolist())
    inactive = [i for i in range(dense.numel()) if i not in taken]
    best = sorted(inactive, key=lambda i: (-dense[i].item(), i))[:n]  # ties: lower position first
    return best, dense[best]


@pytest.mark.parametrize("case", ["random", "ties", "zero-rows", "tiny-n", "all-inactive"])
def test_top_inactive_scores_threshold_and_blockwise_paths_agree_with_brute_force(case):
    from spiel import selection as sel

    gen = torch.Generator().manual_seed(7)
    out_f, in_f, k, n = 23, 31, 90, 60
    row, col = torch.rand(out_f, generator=gen), torch.rand(in_f, generator=gen)
    if case == "ties":  # quantised accumulators: many equal products
        row, col = torch.randint(1, 4, (out_f,), generator=gen).float(), torch.randint(1, 4, (in_f,), generator=gen).float()
    if case == "zero-rows":
        row[::3] = 0.0
    if case == "tiny-n":
        n = 1
    active = torch.randperm(out_f * in_f, generator=gen)[:k].to(torch.int32)
    if case == "all-inactive":
        n = out_f * in_f - k + 5
    want_pos, want_scores = _brute_top_inactive(row, col, active, n)
    active_sorted = active.long().sort().values
    got = sel.top_inactive_scores(row, col, active, n)
    blockwise = sel._top_inactive_blockwise(row, col, active_sorted, n, block_elements=40)
    for pos, scores in (got, blockwise):
        assert pos.tolist() == want_pos
        assert torch.equal(scores, want_scores)
    fast = sel._top_inactive_by_threshold(row, col, active_sorted, n)
    if case in ("random", "tiny-n", "zero-rows"):
        assert fast is not None  # the threshold path is the one taken for positive accumulators
        assert fast[0].tolist() == want_pos


def test_top_inactive_scores_threshold_path_at_model_shape():
    """A SmolLM2-1.7B MLP shape (8192 x 2048), LoRA-r16 budget, 10% regrown: same positions as scoring
    every position (blockwise), and the threshold path is taken."""
    from spiel import selection as sel

    gen = torch.Generator().manual_seed(3)
    out_f, in_f = 8192, 2048
    k = 16 * (out_f + in_f)
    row = torch.rand(out_f, generator=gen) ** 4  # skewed, as squared-gradient sums are
    col = torch.rand(in_f, generator=gen) ** 4
    from spiel.layer import random_indices

    active = random_indices(out_f * in_f, k, gen).to(torch.int32)
    n = k // 10
    active_sorted = active.long().sort().values
    fast = sel._top_inactive_by_threshold(row, col, active_sorted, n)
    assert fast is not None
    slow = sel._top_inactive_blockwise(row, col, active_sorted, n, block_elements=1 << 22)
    assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1])
    assert not torch.isin(fast[0], active_sorted).any()


@pytest.mark.parametrize("case", ["underflow", "overflow", "nan"])
def test_top_inactive_scores_fp32_ties_and_nan(case):
    """Scores are fp32 products: where they underflow to 0 or overflow to inf, ties go to the lower position
    (the threshold path steps aside); a NaN accumulator only loses its own positions."""
    if case == "underflow":
        row, col = torch.tensor([1e-30, 2e-30, 3e-30]), torch.tensor([1e-20, 3e-20, 2e-20, 4e-20])
    elif case == "overflow":
        row, col = torch.tensor([1e20, 3e20]), torch.tensor([1e19, 2e19, 3e19])
    else:
        row, col = torch.tensor([float("nan"), 1.0, 2.0]), torch.tensor([1.0, 2.0])
    active = torch.tensor([], dtype=torch.int64)
    pos, scores = top_inactive_scores(row, col, active, 2)
    if case == "nan":
        assert pos.tolist() == [5, 3] and scores.tolist() == [4.0, 2.0]  # 2.0 at 3 and 4: the lower wins
    else:
        want, want_scores = _brute_top_inactive(row, col, active, 2)
        assert pos.tolist() == want and torch.equal(scores, want_scores)
