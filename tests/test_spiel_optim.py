"""SparseAdamW and SM3 against the formulas of docs/METHOD.md §3.3 and §5.1 on hand-computed cases,
state save/load, per-entry reset/seed, and optimizer choice by selection algorithm."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from spiel.layer import SparseDeltaLinear
from spiel.optim import SM3, SparseAdamW, reset_optimizer_entries


def _param(values, dtype=torch.float32):
    return nn.Parameter(torch.tensor(values, dtype=dtype))


def _adamw_reference(delta, grads, ages, m, v, lr, b1, b2, eps, wd):
    """Spec §3.3 step by step in Python floats (float64)."""
    delta, m, v, ages = list(delta), list(m), list(v), list(ages)
    for g_step in grads:
        for i, g in enumerate(g_step):
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            denom = (math.sqrt(v[i]) + eps) * (1 - b1 ** ages[i]) / math.sqrt(1 - b2 ** ages[i])
            delta[i] -= lr * m[i] / denom
            delta[i] += -lr * wd * delta[i]
            ages[i] += 1
    return delta, m, v, ages


def test_sparse_adamw_hand_computed_first_step():
    # β1=0.5, β2=0.75, eps=0: entry 0 (age 1): m=1, v=1, denom=(1)(0.5)/sqrt(0.25)=1,
    # Δ = 1 − 0.1·1 = 0.9, then decoupled decay 0.9 − 0.1·0.5·0.9 = 0.855 (decay BEFORE the Adam
    # step would give 1·0.95 − 0.1 = 0.85).
    p = _param([1.0])
    opt = SparseAdamW([p], lr=0.1, betas=(0.5, 0.75), eps=0.0, weight_decay=0.5)
    p.grad = torch.tensor([2.0])
    opt.step()
    assert p.item() == pytest.approx(0.855, abs=1e-7)
    st = opt.state[p]
    assert st["age"].item() == 2.0 and st["exp_avg"].item() == 1.0 and st["exp_avg_sq"].item() == 1.0
    assert all(t.dtype == torch.float32 for t in st.values())


def test_sparse_adamw_per_entry_ages_match_spec_over_steps():
    p = _param([1.0, -0.5, 0.25, 2.0])
    opt = SparseAdamW([p], lr=0.05, betas=(0.8, 0.9), eps=1e-3, weight_decay=0.3)
    # Entries start at different ages (as after a reselection seeded them).
    opt.seed_entries(p, torch.tensor([1, 2]), torch.tensor([0.3, -0.2]), torch.tensor([0.4, 0.1]),
                     torch.tensor([3.0, 6.0]))
    st = opt.state[p]
    ages0 = st["age"].tolist()
    m0, v0 = st["exp_avg"].tolist(), st["exp_avg_sq"].tolist()
    assert ages0 == [1.0, 3.0, 6.0, 1.0]
    grads = [[0.5, -1.0, 2.0, 0.1], [-0.3, 0.7, 0.2, 0.0], [1.5, 0.1, -0.4, -2.0]]
    for g in grads:
        p.grad = torch.tensor(g)
        opt.step()
    exp_delta, exp_m, exp_v, exp_age = _adamw_reference([1.0, -0.5, 0.25, 2.0], grads, ages0, m0, v0,
                                                        0.05, 0.8, 0.9, 1e-3, 0.3)
    torch.testing.assert_close(p.detach().double(), torch.tensor(exp_delta, dtype=torch.float64), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(st["exp_avg"].double(), torch.tensor(exp_m, dtype=torch.float64), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(st["exp_avg_sq"].double(), torch.tensor(exp_v, dtype=torch.float64), rtol=1e-6, atol=1e-7)
    assert st["age"].tolist() == exp_age


@pytest.mark.parametrize("ages, cap", [
    ([3.0, 6.0], None),  # integral ages: the table lookup path
    ([2.5, 6.0], None),  # a fractional seeded age (samples / GA): that tensor takes the exp path
    ([3.0, 400.0], None),  # past the fp32 saturation age (166 for these betas): clamped lookup
    ([3.0, 400.0], 64),  # a table capped below the saturation age: older entries take the exp path
], ids=["integral", "fractional", "saturated", "capped-table"])
@pytest.mark.parametrize("chunk", [None, 4], ids=["one-chunk", "chunk-per-tensor"])
def test_sparse_adamw_lookup_and_exp_paths_match_spec(monkeypatch, ages, cap, chunk):
    import spiel.optim as optim_module

    if cap is not None:
        monkeypatch.setattr(optim_module, "_MAX_TABLE_AGE", cap)
    if chunk is not None:
        monkeypatch.setattr(optim_module, "_LOOKUP_CHUNK_ENTRIES", chunk)
    betas = (0.8, 0.9)
    start = [0.5, -0.25, 1.0]
    p, q = _param(start), _param(start)  # two tensors in one group: the lookup path is multi-tensor
    opt = SparseAdamW([p, q], lr=0.05, betas=betas, eps=1e-3, weight_decay=0.3)
    opt.seed_entries(p, torch.tensor([0, 2]), torch.tensor([0.3, -0.2]), torch.tensor([0.4, 0.1]), torch.tensor(ages))
    ages0 = opt.state[p]["age"].tolist()
    m0, v0 = opt.state[p]["exp_avg"].tolist(), opt.state[p]["exp_avg_sq"].tolist()
    grads = [[0.5, -1.0, 2.0], [-0.3, 0.7, 0.2], [1.5, 0.1, -0.4]]
    saved = None
    for i, g in enumerate(grads):
        p.grad, q.grad = torch.tensor(g), torch.tensor(g[::-1])
        opt.step()
        if i == 0:  # reload mid-way: the optimizer re-derives which path each tensor needs
            saved = opt.state_dict()
            opt2 = SparseAdamW([p, q], lr=0.05, betas=betas, eps=1e-3, weight_decay=0.3)
            opt2.load_state_dict(saved)
            opt = opt2
    exp_delta, exp_m, exp_v, exp_age = _adamw_reference(start, grads, ages0, m0, v0, 0.05, *betas, 1e-3, 0.3)
    torch.testing.assert_close(p.detach().double(), torch.tensor(exp_delta, dtype=torch.float64), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(opt.state[p]["exp_avg"].double(), torch.tensor(exp_m, dtype=torch.float64),
                               rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(opt.state[p]["exp_avg_sq"].double(), torch.tensor(exp_v, dtype=torch.float64),
                               rtol=1e-6, atol=1e-7)
    assert opt.state[p]["age"].tolist() == exp_age
    q_delta, _, _, q_age = _adamw_reference(start, [g[::-1] for g in grads], [1.0] * 3, [0.0] * 3, [0.0] * 3,
                                            0.05, *betas, 1e-3, 0.3)
    torch.testing.assert_close(q.detach().double(), torch.tensor(q_delta, dtype=torch.float64), rtol=1e-6, atol=1e-7)
    assert opt.state[q]["age"].tolist() == q_age


def test_sparse_adamw_seed_entries_is_unbiased_by_bias_correction():
    p = _param([0.0, 0.0])
    opt = SparseAdamW([p], lr=1.0, betas=(0.9, 0.999))
    mean, mean_sq, age = torch.tensor([0.5, -2.0]), torch.tensor([0.3, 4.5]), 5.0
    opt.seed_entries(p, torch.tensor([0, 1]), mean, mean_sq, age)
    st = opt.state[p]
    torch.testing.assert_close(st["exp_avg"], mean * (1 - 0.9 ** 5))
    torch.testing.assert_close(st["exp_avg_sq"], mean_sq * (1 - 0.999 ** 5))
    # Adam's own bias correction at that age recovers the means (docs/METHOD.md §4.3).
    torch.testing.assert_close(st["exp_avg"] / (1 - 0.9 ** st["age"]), mean)
    torch.testing.assert_close(st["exp_avg_sq"] / (1 - 0.999 ** st["age"]), mean_sq)
    opt.reset_entries(p, torch.tensor([1]))
    assert st["age"].tolist() == [5.0, 1.0] and st["exp_avg"][1] == 0 and st["exp_avg_sq"][1] == 0
    with pytest.raises(ValueError, match="slots has 2 entries"):
        opt.seed_entries(p, torch.tensor([0, 1]), mean[:1], mean_sq, age)
    with pytest.raises(ValueError, match="not managed"):
        opt.reset_entries(_param([1.0]), torch.tensor([0]))


def test_sparse_adamw_zero_betas_give_sign_steps():
    # β1 = β2 = 0: m = g, v = g², no bias correction (1 − 0^age = 1): Δ -= lr·g/|g|.
    p = _param([0.0, 0.0, 0.0])
    opt = SparseAdamW([p], lr=0.1, betas=(0.0, 0.0), eps=0.0)
    p.grad = torch.tensor([3.0, -0.5, 2e-3])
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([-0.1, 0.1, -0.1]))


def test_sparse_adamw_rejects_bad_hyperparameters():
    p = _param([1.0])
    with pytest.raises(ValueError, match="betas"):
        SparseAdamW([p], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="lr"):
        SparseAdamW([p], lr=-1.0)
    with pytest.raises(ValueError, match="weight_decay"):
        SparseAdamW([p], weight_decay=-0.1)


def test_sparse_adamw_bf16_param_keeps_fp32_state_through_save_load():
    torch.manual_seed(0)
    p = nn.Parameter(torch.zeros(64, dtype=torch.bfloat16))
    q = nn.Parameter(torch.zeros(64, dtype=torch.bfloat16))
    opt = SparseAdamW([p], lr=1e-2)
    grads = [torch.randn(64) * 1e-3 for _ in range(5)]
    for g in grads[:3]:
        p.grad = g.to(torch.bfloat16)
        opt.step()
    saved = opt.state_dict()
    with torch.no_grad():
        q.copy_(p)
    opt2 = SparseAdamW([q], lr=1e-2)
    opt2.load_state_dict(saved)
    for key in ("age", "exp_avg", "exp_avg_sq"):
        assert opt2.state[q][key].dtype == torch.float32
        assert torch.equal(opt2.state[q][key], opt.state[p][key])
    for g in grads[3:]:
        p.grad = g.to(torch.bfloat16)
        q.grad = g.to(torch.bfloat16)
        opt.step()
        opt2.step()
    assert torch.equal(p, q)
    assert p.dtype == torch.bfloat16 and bool((p != 0).all())


def _sm3_layer(indices, shape=(2, 3)):
    base = nn.Linear(shape[1], shape[0], bias=False)
    return SparseDeltaLinear(base, indices=torch.tensor(indices))


def test_sm3_min_amax_hand_computed():
    # Active positions (0,0), (0,2), (1,2) of a 2x3 weight.
    layer = _sm3_layer([0, 2, 5])
    opt = SM3([layer.values], sparse_layers=[layer], lr=0.5, eps=0.0, weight_decay=0.2)
    row, col = opt.accumulators(layer.values)
    assert row.shape == (2,) and col.shape == (3,) and row.dtype == col.dtype == torch.float32
    row.copy_(torch.tensor([1.0, 4.0]))
    col.copy_(torch.tensor([10.0, 0.5, 3.0]))
    with torch.no_grad():
        layer.values.copy_(torch.tensor([1.0, 1.0, 1.0]))
    layer.values.grad = torch.tensor([1.0, 2.0, 3.0])
    opt.step()
    # ν = min(row, col) + g²: (0,0): min(1,10)+1 = 2; (0,2): min(1,3)+4 = 5; (1,2): min(4,3)+9 = 12.
    nu = [2.0, 5.0, 12.0]
    # row[0] = max(1, 2, 5) = 5; row[1] = max(4, 12) = 12; col[0] = max(10, 2) = 10 (the old value is
    # kept: "amax" including self); col[1] untouched; col[2] = max(3, 5, 12) = 12.
    assert row.tolist() == [5.0, 12.0]
    assert col.tolist() == [10.0, 0.5, 12.0]
    expected = []
    for g, n in zip([1.0, 2.0, 3.0], nu):
        d = 1.0 - 0.5 * g / math.sqrt(n)
        expected.append(d - 0.5 * 0.2 * d)
    torch.testing.assert_close(layer.values.detach(), torch.tensor(expected), rtol=1e-6, atol=1e-7)
    assert opt.state[layer.values]["step"] == 1


def test_sm3_row_cover_only_and_momentum():
    layer = _sm3_layer([0, 4])  # (0,0) and (1,1)
    opt = SM3([layer.values], sparse_layers=[layer], lr=1.0, eps=0.0, momentum=0.5, row_cover_only=True)
    row, col = opt.accumulators(layer.values)
    layer.values.grad = torch.tensor([3.0, 4.0])
    opt.step()
    # ν = row + g² = [9, 16]; u = g/sqrt(ν) = [1, 1]; with momentum μ=0.5 from a zero buffer: 0.5·u.
    assert row.tolist() == [9.0, 16.0] and col.tolist() == [0.0, 0.0, 0.0]
    torch.testing.assert_close(layer.values.detach(), torch.tensor([-0.5, -0.5]))
    layer.values.grad = torch.tensor([0.0, 3.0])
    opt.step()
    # ν = [9, 25]; raw u = [0, 0.6]; u = 0.5·raw + 0.5·prev = [0.25, 0.55].
    torch.testing.assert_close(layer.values.detach(), torch.tensor([-0.75, -1.05]))
    torch.testing.assert_close(opt.state[layer.values]["momentum_buffer"], torch.tensor([0.25, 0.55]))
    opt.reset_entries(layer.values, torch.tensor([1]))
    torch.testing.assert_close(opt.state[layer.values]["momentum_buffer"], torch.tensor([0.25, 0.0]))
    assert row.tolist() == [9.0, 25.0]  # accumulators are per row/column: never reset


def test_sm3_follows_the_layer_indices_after_replacement():
    layer = _sm3_layer([0, 1])
    opt = SM3([layer.values], sparse_layers=[layer], lr=0.1)
    layer.values.grad = torch.tensor([1.0, 2.0])
    opt.step()
    layer.replace_entries(torch.tensor([1]), torch.tensor([5]))  # slot 1 moves to (1,2)
    layer.values.grad = torch.tensor([0.0, 3.0])
    opt.step()
    row, col = opt.accumulators(layer.values)
    assert row.tolist() == [4.0, 9.0]
    assert col.tolist() == [1.0, 4.0, 9.0]


def test_sm3_state_dict_round_trip_and_errors():
    layer = _sm3_layer([0, 3, 5])
    opt = SM3([layer.values], sparse_layers=[layer], lr=0.1, momentum=0.9)
    layer.values.grad = torch.tensor([1.0, -2.0, 0.5])
    opt.step()
    sd = opt.state_dict()
    opt2 = SM3([layer.values], sparse_layers=[layer], lr=0.1, momentum=0.9)
    opt2.load_state_dict(sd)
    for key in ("row_accumulator", "col_accumulator", "momentum_buffer"):
        assert torch.equal(opt2.state[layer.values][key], opt.state[layer.values][key])
    with pytest.raises(ValueError, match="sparse_layers"):
        SM3([nn.Parameter(torch.zeros(3))], sparse_layers=[layer])
    with pytest.raises(ValueError, match="momentum"):
        SM3([layer.values], sparse_layers=[layer], momentum=1.0)


def test_reset_entries_falls_back_for_plain_torch_optimizers():
    p = nn.Parameter(torch.zeros(4))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.grad = torch.ones(4)
    opt.step()
    reset_optimizer_entries(opt, p, torch.tensor([0, 2]))
    assert opt.state[p]["exp_avg"].tolist()[0] == 0.0 and opt.state[p]["exp_avg"].tolist()[1] != 0.0
    assert opt.state[p]["exp_avg_sq"].tolist()[2] == 0.0
