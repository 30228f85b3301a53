"""SpielModel on a tiny LLaMA: wrapping, delegation, save/load, merge/unmerge, disable, gradient
checkpointing, autocast, memory (docs/METHOD.md §2, §6, §7, §11)."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import make_tiny_llama
from spiel.config import SpielConfig
from spiel.layer import SparseDeltaLinear
from spiel.model import SpielModel, get_spiel_model


IDS = torch.tensor([[1, 5, 9, 33, 17, 100, 4, 2], [1, 77, 3, 12, 12, 90, 45, 6]])


def _wrapped(model_kwargs=None, **cfg):
    cfg.setdefault("lora_rank_equivalent", 2)
    return get_spiel_model(make_tiny_llama(0, **(model_kwargs or {})), SpielConfig(**cfg))


def _perturb(model, scale=0.05, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in model.sparse_layers():
            layer.values.copy_(torch.randn(layer.k, generator=gen) * scale)


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_wrap_freezes_base_and_targets_the_projections(capsys):
    base_logits = _logits(make_tiny_llama())
    model = _wrapped()
    layers = model.sparse_layers()
    assert len(layers) == 14 and all(isinstance(m, SparseDeltaLinear) for _, m in layers)
    assert isinstance(model.base_model.lm_head, nn.Linear)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".values") for n in trainable)
    assert model.num_trainable_parameters() == sum(m.k for _, m in layers) == sum(model.spiel_config.num_deltas.values())
    assert model.spiel_config.num_deltas == {n: m.k for n, m in layers}
    torch.testing.assert_close(_logits(model), base_logits, rtol=0, atol=0)  # Δ = 0 at init
    model.print_trainable_parameters()
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"trainable params: {model.num_trainable_parameters():,d} || all params: ")
    # the same seed gives the same index sets; another seed another
    again, other = _wrapped(), _wrapped(seed=1)
    for (_, a), (_, b), (_, c) in zip(layers, again.sparse_layers(), other.sparse_layers()):
        assert torch.equal(a.indices, b.indices) and not torch.equal(a.indices, c.indices)
    with pytest.raises(ValueError, match="target_modules"):
        get_spiel_model(make_tiny_llama(), SpielConfig(density=0.01, target_modules=["c_attn"]))
    with pytest.raises(ValueError, match="already contains"):
        get_spiel_model(model.base_model, SpielConfig(density=0.01))


def test_delegation_for_trainer_generate_and_lm_eval():
    model = _wrapped()
    _perturb(model)
    assert model.config is model.base_model.config and model.device == torch.device("cpu")
    assert model.dtype == torch.float32 and model.get_base_model() is model.base_model
    model.tie_weights()
    model.eval()
    out = model(IDS, labels=IDS)  # positional input_ids, as lm-eval calls it
    assert out.logits.shape == (2, 8, 128) and out.loss is not None
    generated = model.generate(IDS[:1, :4], max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 7)
    with model.disable_adapter():
        base_generated = model.generate(IDS[:1, :4], max_new_tokens=3, do_sample=False)
        assert torch.equal(base_generated, make_tiny_llama().generate(IDS[:1, :4], max_new_tokens=3, do_sample=False))


def test_hf_trainer_trains_the_deltas(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = _wrapped()
    before = {n: m.values.detach().clone() for n, m in model.sparse_layers()}
    data = [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row, "unused": 0} for row in IDS]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                             learning_rate=1e-2, report_to=[], save_strategy="no", logging_strategy="no",
                             use_cpu=True, dataloader_num_workers=0)
    Trainer(model=model, args=args, train_dataset=data).train()
    assert all(not torch.equal(m.values.detach(), before[n]) for n, m in model.sparse_layers())


def test_save_load_identical_logits_and_clear_errors(tmp_path):
    model = _wrapped(delta_dtype="float32")
    _perturb(model)
    expected = _logits(model)
    model.save_pretrained(tmp_path / "adapter")
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"]  # no temporary files left
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["spiel_format_version"] == 2 and saved["num_deltas"] == model.spiel_config.num_deltas
    assert saved["base_model_dtype"] == "float32" and saved["base_model_quantization"] == "none"

    loaded = SpielModel.from_pretrained(make_tiny_llama(), tmp_path / "adapter")
    torch.testing.assert_close(_logits(loaded), expected, rtol=0, atol=0)
    for (_, a), (_, b) in zip(model.sparse_layers(), loaded.sparse_layers()):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.values, b.values)
        assert not b.values.requires_grad
    trainable = SpielModel.from_pretrained(make_tiny_llama(), tmp_path / "adapter", is_trainable=True)
    assert trainable.num_trainable_parameters() == model.num_trainable_parameters()

    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        SpielModel.from_pretrained(make_tiny_llama(), tmp_path / "missing")
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj.*shape \[32, 32\].*\[48, 48\]"):
        SpielModel.from_pretrained(make_tiny_llama(hidden_size=48), tmp_path / "adapter")
    with pytest.raises(ValueError, match="model.layers.2"):
        SpielModel.from_pretrained(make_tiny_llama(num_hidden_layers=3), tmp_path / "adapter")
    (tmp_path / "adapter" / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        SpielModel.from_pretrained(make_tiny_llama(), tmp_path / "adapter")


def test_load_adapter_in_place_and_checks_before_writing(tmp_path):
    from safetensors.torch import load_file, save_file

    source = _wrapped(seed=3)
    _perturb(source)
    source.save_pretrained(tmp_path / "adapter")
    target = _wrapped(seed=4)  # other random indices, zero deltas
    params = [layer.values for _, layer in target.sparse_layers()]
    target.load_adapter(tmp_path / "adapter")
    assert [layer.values for _, layer in target.sparse_layers()] == params  # same Parameter objects
    for (_, a), (_, b) in zip(source.sparse_layers(), target.sparse_layers()):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.values, b.values)
        assert b.values.requires_grad
    torch.testing.assert_close(_logits(target), _logits(source), rtol=0, atol=0)

    fresh = _wrapped(seed=4)
    before = {n: (l.indices.clone(), l.values.detach().clone()) for n, l in fresh.sparse_layers()}
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        fresh.load_adapter(tmp_path / "missing")
    _wrapped(model_kwargs={"hidden_size": 48}).save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj.*\[48, 48\].*\[32, 32\]"):
        fresh.load_adapter(tmp_path / "other")
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    name = fresh.sparse_layers()[-1][0]
    bad = dict(tensors)
    bad[f"{name}.indices"] = bad[f"{name}.indices"].clone()
    bad[f"{name}.indices"][0] = bad[f"{name}.indices"][1]
    (tmp_path / "dup").mkdir()
    save_file(bad, tmp_path / "dup" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=f"{name}.indices.*not distinct"):
        fresh.load_adapter(tmp_path / "dup")
    bad[f"{name}.indices"][0] = 10 ** 6
    save_file(bad, tmp_path / "dup" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=f"{name}.indices.*must be integers in"):
        fresh.load_adapter(tmp_path / "dup")
    del bad[f"{name}.values"]
    save_file(bad, tmp_path / "dup" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=f"missing.*{name}.values"):
        fresh.load_adapter(tmp_path / "dup")
    for n, layer in fresh.sparse_layers():  # nothing was written by the failed loads (the bad layer is last)
        assert torch.equal(layer.indices, before[n][0]) and torch.equal(layer.values, before[n][1])
    fresh.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        fresh.load_adapter(tmp_path / "adapter")


def test_save_load_bf16_deltas(tmp_path):
    model = _wrapped(delta_dtype="bfloat16")
    _perturb(model)
    model.save_pretrained(tmp_path)
    loaded = SpielModel.from_pretrained(make_tiny_llama(), tmp_path)
    for (_, a), (_, b) in zip(model.sparse_layers(), loaded.sparse_layers()):
        assert b.values.dtype == torch.bfloat16 and torch.equal(a.values, b.values)
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=0)


def test_merge_unmerge_exact_and_merge_and_unload():
    model = _wrapped()
    _perturb(model, scale=1e-3)
    weights = {n: m.base_layer.weight.detach().clone() for n, m in model.sparse_layers()}
    unmerged = _logits(model)
    model.merge_adapter()
    assert all(m.merged for _, m in model.sparse_layers())
    torch.testing.assert_close(_logits(model), unmerged, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    for name, layer in model.sparse_layers():
        assert torch.equal(layer.base_layer.weight, weights[name])  # bit-exact
    torch.testing.assert_close(_logits(model), unmerged, rtol=0, atol=0)

    deltas = {n: m.delta_weight() for n, m in model.sparse_layers()}
    plain = model.merge_and_unload()
    assert not any(isinstance(m, SparseDeltaLinear) for m in plain.modules())
    merged_q = plain.get_submodule("model.layers.0.self_attn.q_proj")
    assert type(merged_q) is nn.Linear
    name = "model.layers.0.self_attn.q_proj"
    assert torch.equal(merged_q.weight.detach(), (weights[name].double() + deltas[name].double()).float())
    torch.testing.assert_close(_logits(plain), unmerged, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="merged and unloaded"):
        model(input_ids=IDS)


def test_disable_adapter_gives_base_logits_and_restores_state():
    base_logits = _logits(make_tiny_llama())
    model = _wrapped()
    _perturb(model)
    adapted = _logits(model)
    assert not torch.allclose(adapted, base_logits)
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model), base_logits, rtol=0, atol=0)
    torch.testing.assert_close(_logits(model), adapted, rtol=0, atol=0)
    model.merge_adapter()
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model), base_logits, rtol=0, atol=0)
    assert all(m.merged for _, m in model.sparse_layers())
    torch.testing.assert_close(_logits(model), adapted, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    model.disable_adapter_layers()
    torch.testing.assert_close(_logits(model), base_logits, rtol=0, atol=0)
    model.enable_adapter_layers()
    torch.testing.assert_close(_logits(model), adapted, rtol=0, atol=0)


def _grads(model):
    model.zero_grad(set_to_none=True)
    model(input_ids=IDS, labels=IDS).loss.backward()
    return {n: m.values.grad.clone() for n, m in model.sparse_layers()}


def test_gradient_checkpointing_gives_the_same_grads():
    model = _wrapped()
    _perturb(model)
    model.train()
    plain = _grads(model)
    model.gradient_checkpointing_enable()
    assert model.base_model.is_activation_checkpointing
    checkpointed = _grads(model)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-6, atol=1e-7)
        assert checkpointed[name].abs().sum() > 0


def test_bf16_autocast_runs_and_is_close_to_fp32():
    model = _wrapped()
    _perturb(model)
    loss32 = model(input_ids=IDS, labels=IDS).loss
    grads32 = _grads(model)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16 = model(input_ids=IDS, labels=IDS).loss
    loss16.backward()
    assert abs(loss16.item() - loss32.item()) < 0.05
    for name, layer in model.sparse_layers():
        assert layer.values.grad.dtype == torch.float32
        rel = (layer.values.grad - grads32[name]).norm() / grads32[name].norm()
        assert rel < 0.1, name


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                self.largest = max(self.largest, t.numel())
        return out


def test_no_tensor_of_model_size_in_a_training_step():
    model = _wrapped(model_kwargs={"intermediate_size": 96, "vocab_size": 64})
    _perturb(model)
    total = model.num_total_parameters()
    largest_weight = max(p.numel() for p in model.parameters())
    batch, seq = IDS.shape
    activation_bound = batch * seq * max(96, 64, 32)
    mode = _LargestTensor()
    with mode:
        model(input_ids=IDS % 64, labels=IDS % 64).loss.backward()
    assert mode.largest <= max(largest_weight, activation_bound) < total // 4


def test_qspiel_on_a_4bit_model(tmp_path):
    """qSpIEL (docs/METHOD.md §6): NF4 base via transformers' BitsAndBytesConfig, bf16 compute and deltas; the base
    stays quantised, gradients flow (also checkpointed), save/load reproduces logits, merging is refused."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    make_tiny_llama().save_pretrained(tmp_path / "base")
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)

    def load():
        return AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quant, device_map="cpu")

    model = get_spiel_model(load(), SpielConfig(lora_rank_equivalent=2, delta_dtype="bfloat16"))
    layers = model.sparse_layers()
    assert len(layers) == 14 and all(m.is_4bit for _, m in layers)
    packed = layers[0][1].base_layer.weight.data.clone()
    model.train()
    plain = _grads(model)
    model.gradient_checkpointing_enable()
    checkpointed = _grads(model)
    for name, grad in plain.items():
        assert grad.dtype == torch.bfloat16 and grad.abs().sum() > 0
        torch.testing.assert_close(checkpointed[name], grad, rtol=0, atol=0)
    assert torch.equal(layers[0][1].base_layer.weight.data, packed)
    _perturb(model, scale=0.01)
    model.eval()
    model.save_pretrained(tmp_path / "adapter")
    loaded = SpielModel.from_pretrained(load(), tmp_path / "adapter")
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=0)
    with pytest.raises(ValueError, match="4-bit"):
        model.merge_adapter()
    with pytest.raises(ValueError, match="4-bit"):
        model.merge_and_unload()


def test_corrupt_adapter_file_is_named(tmp_path):
    from conftest import make_tiny_llama

    from spiel.config import SpielConfig as _Cfg
    from spiel.model import SpielModel as _Model, get_spiel_model as _wrap

    _wrap(make_tiny_llama(), _Cfg(lora_rank_equivalent=2)).save_pretrained(tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"xx")
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: not a readable safetensors file"):
        _Model.from_pretrained(make_tiny_llama(), tmp_path)
