"""SpielConfig validation and serialisation; parameter counting, targeting and budget allocation
(docs/METHOD.md §1, §2.1, §2.2)."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from conftest import make_tiny_llama
from spiel.budget import (allocate, compute_num_deltas, count_parameters, find_target_modules,
                          lora_equivalent_budget, resolve_budget)
from spiel.config import SpielConfig


PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("kwargs, field", [
    ({}, "density/num_tunable_weights/lora_rank_equivalent"),
    ({"density": 0.1, "num_tunable_weights": 10}, "density/num_tunable_weights/lora_rank_equivalent"),
    ({"density": 0.0}, "density"),
    ({"density": 1.5}, "density"),
    ({"density": float("nan")}, "density"),
    ({"num_tunable_weights": 0}, "num_tunable_weights"),
    ({"num_tunable_weights": 2.5}, "num_tunable_weights"),
    ({"lora_rank_equivalent": 0}, "lora_rank_equivalent"),
    ({"lora_rank_equivalent": True}, "lora_rank_equivalent"),
    ({"density": 0.1, "selection_algorithm": "magnitude"}, "selection_algorithm"),
    ({"density": 0.1, "reselection_steps": 0}, "reselection_steps"),
    ({"density": 0.1, "reselection_steps": 5, "selection_accumulation_steps": 5}, "selection_accumulation_steps"),
    ({"density": 0.1, "selection_accumulation_steps": -1}, "selection_accumulation_steps"),
    ({"density": 0.1, "initial_reselection_rate": 1.2}, "initial_reselection_rate"),
    ({"density": 0.1, "reselection_rate_policy": "step"}, "reselection_rate_policy"),
    ({"density": 0.1, "delta_dtype": "float64"}, "delta_dtype"),
    ({"density": 0.1, "target_modules": []}, "target_modules"),
    ({"density": 0.1, "target_modules": "q_proj("}, "target_modules"),
    ({"density": 0.1, "target_modules": 3}, "target_modules"),
    ({"density": 0.1, "seed": "0"}, "seed"),
    ({"num_deltas": {"a": 0}}, "num_deltas"),
])
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field.replace("/", ".")):
        SpielConfig(**kwargs)


def test_config_defaults_aliases_and_round_trip(tmp_path):
    cfg = SpielConfig(density=0.01)
    assert (cfg.selection_algorithm, cfg.reselection_steps, cfg.selection_accumulation_steps) == ("ag", 20, 5)
    assert (cfg.initial_reselection_rate, cfg.reselection_rate_policy, cfg.delta_dtype) == (0.2, "linear", "float32")
    assert SpielConfig(density=0.01, selection_algorithm="rigl").selection_algorithm == "ag"
    assert SpielConfig(density=0.01, selection_algorithm="SM3").selection_algorithm == "ma"
    assert SpielConfig(density=0.01, reselection_rate_policy="none").static_mask
    assert SpielConfig(density=0.01, delta_dtype="bfloat16").torch_delta_dtype == torch.bfloat16
    assert SpielConfig(num_deltas={"a": 3}).num_deltas == {"a": 3}  # loading: num_deltas alone is a budget

    full = SpielConfig(lora_rank_equivalent=4, target_modules=["q_proj", "v_proj"], selection_algorithm="ma",
                       num_deltas={"m.q_proj": 5}, base_model_name_or_path="x/y", seed=7)
    data = full.to_dict()
    assert data["spiel_format_version"] == 2 and data["num_deltas"] == {"m.q_proj": 5}
    assert "spiel" in data["peft_type"] and "from_pretrained" in data["peft_type"]  # a message, not a peft type
    assert SpielConfig.from_dict(json.loads(json.dumps(data))) == full
    with pytest.raises(ValueError, match="peft_type"):
        SpielConfig.from_dict({**data, "peft_type": "LORA"})
    legacy = {k: v for k, v in data.items() if k not in ("spiel_format_version", "base_model_dtype",
                                                          "base_model_quantization")}
    assert SpielConfig.from_dict({**legacy, "peft_type": "SPIEL"}) == full  # version-1 files still load
    with pytest.raises(ValueError, match="not a SpIEL adapter"):
        SpielConfig.from_dict({**legacy, "peft_type": "LORA"})
    with pytest.raises(ValueError, match="spiel_format_version.*newer"):
        SpielConfig.from_dict({**data, "spiel_format_version": 3})
    with pytest.raises(ValueError, match="unknown field"):
        SpielConfig.from_dict({**data, "lora_alpha": 16})

    (tmp_path / "adapter_config.json").write_text(full.to_json_string())
    assert SpielConfig.from_pretrained(tmp_path) == full
    (tmp_path / "adapter_config.json").write_text("{\n  broken")
    with pytest.raises(ValueError, match="adapter_config.json: invalid JSON at line 2"):
        SpielConfig.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        SpielConfig.from_pretrained(tmp_path / "nowhere")


# ------------------------------------------------------------------------------------------ budget
def test_find_target_modules_default_and_explicit():
    model = make_tiny_llama()
    names = [n for n, _ in find_target_modules(model)]
    assert len(names) == 7 * 2
    assert {n.rsplit(".", 1)[1] for n in names} == set(PROJECTIONS)
    assert all(n.startswith("model.layers.") for n in names) and "lm_head" not in names
    assert [n for n, _ in find_target_modules(model, PROJECTIONS)] == names
    qv = [n for n, _ in find_target_modules(model, ["q_proj", "v_proj"])]
    assert qv == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    assert [n for n, _ in find_target_modules(model, r".*\.0\.mlp\..*_proj")] == \
        [f"model.layers.0.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    with pytest.raises(ValueError, match=r"target_modules=\['query'\] matched no module"):
        find_target_modules(model, ["query"])
    with pytest.raises(ValueError, match="self_attn.*LlamaAttention"):
        find_target_modules(model, ["self_attn"])


def test_count_parameters_dense_and_4bit():
    model = make_tiny_llama()
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())
    bnb = pytest.importorskip("bitsandbytes")
    dense = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 8, bias=False))
    quant = nn.Sequential(bnb.nn.Linear4bit(64, 32, quant_type="nf4"), bnb.nn.Linear4bit(32, 8, bias=False,
                                                                                         quant_type="nf4"))
    quant.load_state_dict(dense.state_dict())
    quant = quant.to("cpu")
    assert quant[0].weight.dtype == torch.uint8 and quant[0].weight.numel() < 64 * 32  # packed storage
    assert count_parameters(quant) == count_parameters(dense) == 64 * 32 + 32 + 32 * 8


def test_lora_equivalent_budget_equals_peft_lora_count():
    peft = pytest.importorskip("peft")
    model = make_tiny_llama()
    modules = find_target_modules(model)
    for rank in (1, 4):
        lora = peft.get_peft_model(make_tiny_llama(), peft.LoraConfig(r=rank, target_modules=PROJECTIONS))
        trainable, _ = lora.get_nb_trainable_parameters()
        assert lora_equivalent_budget(modules, rank) == trainable
    # by hand: hidden 32, kv 2 heads x 8 = 16, ffn 64, 2 layers
    per_layer = (32 + 32) * 2 + (32 + 16) * 2 + (32 + 64) * 3
    assert lora_equivalent_budget(modules, 3) == 3 * 2 * per_layer


def test_allocate_hand_computed_and_errors():
    assert allocate(100, {"a": 300, "b": 100}) == {"a": 75, "b": 25}
    assert allocate(10, {"a": 10, "b": 20, "c": 40}) == {"a": 1, "b": 2, "c": 5}  # floor(10*n/70)
    with pytest.raises(ValueError, match="'small'.*k = 0"):
        allocate(5, {"big": 1000, "small": 10})
    with pytest.raises(ValueError, match="'a' k = 20 > its 10"):
        allocate(40, {"a": 10, "b": 10})
    # docs/METHOD.md §2.2 table: LLaMA-2-7B at r=8 (N = 8 * 2,498,560)
    h, f, layers = 4096, 11008, 32
    sizes = {}
    for i in range(layers):
        sizes.update({f"{i}.q": h * h, f"{i}.k": h * h, f"{i}.v": h * h, f"{i}.o": h * h,
                      f"{i}.gate": h * f, f"{i}.up": h * f, f"{i}.down": h * f})
    k = allocate(8 * 2_498_560, sizes)
    assert k["0.q"] == 51_783 and k["31.gate"] == 139_168 and k["5.down"] == 139_168


@pytest.mark.parametrize("budget", [{"density": 0.05}, {"num_tunable_weights": 3000}, {"lora_rank_equivalent": 2}])
def test_compute_num_deltas_follows_spec_formula(budget):
    model = make_tiny_llama()
    config = SpielConfig(**budget)
    modules = find_target_modules(model)
    total = resolve_budget(model, config, modules)
    expected_total = {"density": int(count_parameters(model) * 0.05), "num_tunable_weights": 3000,
                      "lora_rank_equivalent": lora_equivalent_budget(modules, 2)}[next(iter(budget))]
    assert total == expected_total
    numels = {n: m.weight.numel() for n, m in modules}
    num_deltas = compute_num_deltas(model, config)
    assert num_deltas == {n: total * s // sum(numels.values()) for n, s in numels.items()}
    assert 0 <= total - sum(num_deltas.values()) < len(numels)


def test_budget_larger_than_targets_names_module():
    with pytest.raises(ValueError, match="model.layers.0.self_attn.q_proj"):
        compute_num_deltas(make_tiny_llama(), SpielConfig(density=1.0))


@pytest.mark.slow
def test_real_smollm2_lora_r16_budget(real_model):
    """On SmolLM2-135M the LoRA-r16 equivalent is the 4,884,480 trainable parameters peft LoRA r16 has on
    the 7 projections, and the per-matrix allocation uses all of it (the model is not modified)."""
    modules = find_target_modules(real_model)
    assert len(modules) == 7 * real_model.config.num_hidden_layers
    assert lora_equivalent_budget(modules, 16) == 4_884_480
    num_deltas = compute_num_deltas(real_model, SpielConfig(lora_rank_equivalent=16))
    assert sum(num_deltas.values()) == 4_884_480
    assert num_deltas["model.layers.0.self_attn.q_proj"] == 15_264
    assert num_deltas["model.layers.29.mlp.down_proj"] == 40_704
    density = compute_num_deltas(real_model, SpielConfig(density=0.01))
    assert sum(density.values()) <= int(count_parameters(real_model) * 0.01)
