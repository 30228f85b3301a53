"""peft habits on a SpielModel: the keyword arguments and methods a peft user reaches for either work as in
peft or are refused with a message naming spiel and the alternative (docs/METHOD.md §7)."""
from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_llama
from spiel.config import SpielConfig
from spiel.model import SpielModel, get_spiel_model
from spiel.optim import build_optimizer

IDS = torch.tensor([[1, 5, 9, 33, 17, 100, 4, 2]])


def _model(seed=1, **cfg):
    cfg.setdefault("lora_rank_equivalent", 2)
    model = get_spiel_model(make_tiny_llama(), SpielConfig(**cfg))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in model.sparse_layers():
            layer.values.copy_(torch.randn(layer.k, generator=gen) * 0.05)
    return model


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_save_pretrained_keywords(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path / "a", safe_serialization=True, selected_adapters=["default"])
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()
    with pytest.raises(ValueError, match=r"safe_serialization=False.*spiel writes safetensors only"):
        model.save_pretrained(tmp_path / "b", safe_serialization=False)
    with pytest.raises(ValueError, match=r"one adapter, 'default'.*SpielModel.from_pretrained"):
        model.save_pretrained(tmp_path / "b", selected_adapters=["other"])
    with pytest.raises(TypeError, match=r"unsupported argument\(s\) \['save_embedding_layers'\].*spiel"):
        model.save_pretrained(tmp_path / "b", save_embedding_layers=True)
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").iterdir())


def test_peft_views_are_spiel_s_not_transformers():
    model = _model()
    assert model.active_adapters == ["default"] and model.active_adapter == "default"  # not a bound method
    assert model.peft_config == {"default": model.spiel_config}
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == sum(layer.k for _, layer in model.sparse_layers()) and total == model.num_total_parameters()


def test_merge_and_unload_safe_merge_and_unload():
    model = _model()
    expected = _logits(model)
    merged = model.merge_and_unload(progressbar=True, safe_merge=True, adapter_names=["default"])
    torch.testing.assert_close(_logits(merged), expected, rtol=1e-5, atol=1e-5)

    bad = _model()
    name, layer = bad.sparse_layers()[3]
    with torch.no_grad():
        layer.values[0] = float("inf")
    before = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match=rf"safe_merge=True\): module '{name}' would hold NaN/Inf after merging; nothing was merged"):
        bad.merge_and_unload(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, before) and not bad._unloaded
    with pytest.raises(ValueError, match="one adapter"):
        bad.merge_and_unload(adapter_names=["other"])

    plain = _model()
    plain.merge_adapter()  # unload() also undoes a merge: the base is exactly as before wrapping
    base = plain.unload()
    assert not any(type(m).__name__ == "SparseDeltaLinear" for m in base.modules())
    torch.testing.assert_close(_logits(base), _logits(make_tiny_llama()), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="unloaded"):
        plain(input_ids=IDS)


def test_training_a_default_loaded_model_says_is_trainable(tmp_path):
    _model().save_pretrained(tmp_path / "a")
    frozen = SpielModel.from_pretrained(make_tiny_llama(), tmp_path / "a")
    with pytest.raises(ValueError, match=r"no trainable sparse deltas.*pass is_trainable=True"):
        build_optimizer(frozen, lr=1e-3)
    trainable = SpielModel.from_pretrained(make_tiny_llama(), tmp_path / "a", is_trainable=True)
    assert build_optimizer(trainable, lr=1e-3) is not None and not trainable.inference_mode
    with pytest.raises(TypeError, match=r"unsupported argument\(s\) \['revision'\]"):
        SpielModel.from_pretrained(make_tiny_llama(), tmp_path / "a", revision="main")
    frozen.load_adapter(tmp_path / "a", adapter_name="default", is_trainable=True)
    assert frozen.num_trainable_parameters() == trainable.num_trainable_parameters()


def test_state_dict_is_the_adapter_and_loads_back():
    model, other = _model(seed=1), _model(seed=2)
    state = model.state_dict()
    assert set(state) == {f"{n}.{p}" for n, _ in model.sparse_layers() for p in ("indices", "values")}
    result = other.load_state_dict(state)
    assert result.missing_keys == [] and result.unexpected_keys == []
    torch.testing.assert_close(_logits(other), _logits(model), rtol=0, atol=0)
    key = next(k for k in state if k.endswith(".values"))
    with pytest.raises(ValueError, match=rf"state_dict: '{key}' holds \d+ NaN/Inf"):
        other.load_state_dict({**state, key: torch.full_like(state[key], float("nan"))})
    with pytest.raises(ValueError, match="missing tensors"):
        other.load_state_dict({k: v for k, v in state.items() if k != key})


def test_optimizer_and_selector_state_of_the_other_algorithm_are_refused():
    from spiel.selection import SpielSelector

    ag, ma = _model(selection_algorithm="ag"), _model(selection_algorithm="ma")
    opt_ag, opt_ma = build_optimizer(ag, lr=1e-3), build_optimizer(ma, lr=1e-3)
    for model, opt in ((ag, opt_ag), (ma, opt_ma)):
        model(input_ids=IDS, labels=IDS).loss.backward()
        opt.step()
    with pytest.raises(ValueError, match=r"saved by SparseAdamW \(SpIEL-AG\).*this optimizer is SM3 \(SpIEL-MA\)"):
        opt_ma.load_state_dict(opt_ag.state_dict())
    with pytest.raises(ValueError, match=r"saved by SM3 \(SpIEL-MA\).*this optimizer is SparseAdamW"):
        opt_ag.load_state_dict(opt_ma.state_dict())
    sel_ag = SpielSelector(ag, opt_ag, total_steps=10)
    sel_ma = SpielSelector(ma, opt_ma, total_steps=10)
    with pytest.raises(ValueError, match=r"saved by a SpIEL-AG run, this selector is SpIEL-MA"):
        sel_ma.load_state_dict(sel_ag.state_dict())
    sel_ag.close(), sel_ma.close()
