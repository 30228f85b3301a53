"""The method registry: names, config checks, budgets matched across SpIEL/SHiRA/LoRA, builders, optimizers."""
from __future__ import annotations

import pytest
import torch

from spielbench.errors import InputError
from spielbench.methods import METHODS, get_method
from spielbench.runconfig import RunConfig

ALL = ["spiel-ag", "spiel-ma", "spiel-static", "qspiel-ag", "qspiel-ma", "lora", "qlora", "ia3", "shira", "full"]
FLOAT_METHODS = [m for m in ALL if not m.startswith("q")]


def cfg_for(method, **kw):
    spec = METHODS[method]
    kw.setdefault("rank", 2 if spec.takes_rank else None)
    return RunConfig(method=method, model="m", train_data="t.jsonl", **kw)


def meta_of(model):
    """The same architecture on the meta device (shapes only), as the harness checks budgets."""
    with torch.device("meta"):
        return type(model)(model.config)


def test_registry_names_and_properties():
    assert sorted(METHODS) == sorted(ALL)
    assert {m for m in ALL if METHODS[m].needs_selector} == {"spiel-ag", "spiel-ma", "qspiel-ag", "qspiel-ma"}
    assert {m for m in ALL if METHODS[m].quantized} == {"qspiel-ag", "qspiel-ma", "qlora"}
    assert {m for m in ALL if not METHODS[m].takes_rank} == {"ia3", "full"}
    assert METHODS["spiel-ma"].selection_algorithm == "ma" and METHODS["spiel-static"].reselection_rate_policy == "none"
    with pytest.raises(InputError, match=r"method: unknown method 'dora'; known methods: spiel-ag, .*full"):
        get_method("dora")


@pytest.mark.parametrize("method, kw, message", [
    ("lora", {"rank": None}, r"rank: method 'lora' needs a rank"),
    ("ia3", {"rank": 4}, r"rank: method 'ia3' takes no rank"),
    ("shira", {"density": 0.01}, r"density: only SpIEL methods take a density"),
    ("spiel-ag", {"density": 0.01}, r"rank/density: method 'spiel-ag' takes one budget"),
    ("spiel-ag", {"rank": None}, r"rank: method 'spiel-ag' needs a rank .* or a density"),
    ("lora", {"spiel": {"reselection_steps": 4}}, r"spiel: SpIEL options given to method 'lora'"),
    ("spiel-ag", {"spiel": {"seed": 3}}, r"spiel.seed: set by the run's seed"),
    ("spiel-ag", {"spiel": {"base_model_quantization": "nf4"}},
     r"spiel.base_model_quantization: set by the run's method and model"),
    ("spiel-ag", {"spiel": {"selection_algorithm": "ma"}}, r"spiel.selection_algorithm: set by the run's method"),
    ("spiel-ag", {"spiel": {"reselection_stepz": 4}},
     r"spiel.reselection_stepz: unknown SpIEL option; known: .*reselection_steps"),
    ("spiel-ag", {"spiel": {"reselection_steps": 0}}, r"spiel.reselection_steps: expected an integer >= 1"),
    ("spiel-static", {"spiel": {"reselection_rate_policy": "linear"}},
     r"spiel.reselection_rate_policy: method 'spiel-static' is static"),
])
def test_check_config_rejects_misplaced_budgets_and_options(method, kw, message):
    with pytest.raises(InputError, match=message):
        get_method(method).check_config(cfg_for(method, **kw))


def test_spiel_config_follows_method_budget_and_options():
    c = METHODS["spiel-ma"].spiel_config(cfg_for("spiel-ma", rank=8, seed=7, spiel={"reselection_steps": 10}))
    assert (c.selection_algorithm, c.lora_rank_equivalent, c.seed, c.reselection_steps) == ("ma", 8, 7, 10)
    assert c.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert METHODS["spiel-static"].spiel_config(cfg_for("spiel-static")).reselection_rate_policy == "none"
    d = METHODS["qspiel-ag"].spiel_config(cfg_for("qspiel-ag", rank=None, density=0.01, device="cpu"))
    assert d.density == 0.01 and d.lora_rank_equivalent is None and d.delta_dtype == "float32"


@pytest.mark.parametrize("method", FLOAT_METHODS)
def test_expected_budget_equals_the_built_models_trainable_count(method, tiny_llama):
    from spielbench.measure import count_parameters

    spec = METHODS[method]
    cfg = cfg_for(method, rank=3 if spec.takes_rank else None)
    budget = spec.check_budget(cfg, meta_of(tiny_llama))
    total = count_parameters(tiny_llama)
    model = spec.build(tiny_llama, cfg)
    assert count_parameters(model, trainable_only=True) == budget["trainable_params"]
    assert budget["total_params"] == total and budget["density"] == budget["trainable_params"] / total
    opt = spec.build_optimizer(model, cfg, 1e-3)
    n_opt = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_opt == budget["trainable_params"]
    expected_opt = {"spiel-ag": "SparseAdamW", "spiel-static": "SparseAdamW", "spiel-ma": "SM3"}.get(method, "AdamW")
    assert type(opt).__name__ == expected_opt


def test_budgets_match_lora_at_the_same_rank_on_the_tiny_model(tiny_llama):
    """LoRA and SHiRA are equal layer by layer; SpIEL's proportional floor allocation may fall short by
    less than one entry per targeted matrix (exact on SmolLM2, see the real-model test)."""
    meta = meta_of(tiny_llama)
    for r in (1, 3):
        counts = {m: METHODS[m].check_budget(cfg_for(m, rank=r), meta)["trainable_params"]
                  for m in ("lora", "shira", "spiel-ag")}
        assert counts["shira"] == counts["lora"] == r * 2 * (64 + 48 + 48 + 64 + 3 * 96)
        assert 0 <= counts["lora"] - counts["spiel-ag"] < 14


def test_budgets_equal_exactly_on_smollm2(real_model_dir):
    from spielbench.train import _meta_model

    meta = _meta_model(real_model_dir)
    for r in (1, 8, 64):
        counts = {m: METHODS[m].check_budget(cfg_for(m, rank=r), meta)["trainable_params"]
                  for m in ("lora", "qlora", "shira", "spiel-ag", "spiel-ma", "qspiel-ag", "spiel-static")}
        assert set(counts.values()) == {r * 30 * (1152 + 768 + 768 + 1152 + 3 * 2112)}, counts


@pytest.mark.parametrize("method, rank, message", [
    ("lora", 33,
     r"rank: 33 is larger than the layer allows: model.layers.0.self_attn.q_proj \(32 -> 32\) admits at most rank 32"),
    ("shira", 11, r"rank: 11 is larger than the layer allows: .*k_proj \(32 -> 16\) admits at most rank 10 for shira"),
    ("spiel-ag", 19, r"rank: 19 is larger than the layers allow for spiel-ag: budget of .* exceeds"),
])
def test_rank_larger_than_the_layer_allows(method, rank, message, tiny_llama):
    meta = meta_of(tiny_llama)
    with pytest.raises(InputError, match=message):
        METHODS[method].check_budget(cfg_for(method, rank=rank), meta)
    # the largest admissible rank passes
    ok = {"lora": 16, "shira": 10, "spiel-ag": 18}[method]
    assert METHODS[method].check_budget(cfg_for(method, rank=ok), meta)["trainable_params"] > 0


def test_spiel_density_budget(tiny_llama):
    meta = meta_of(tiny_llama)
    b = METHODS["spiel-ag"].check_budget(cfg_for("spiel-ag", rank=None, density=0.05), meta)
    assert b["requested_density"] == 0.05 and b["rank"] is None
    assert int(b["total_params"] * 0.05) - 14 < b["trainable_params"] <= int(b["total_params"] * 0.05)
    with pytest.raises(InputError, match=r"density: 0.9 is larger than the layers allow"):
        METHODS["spiel-ag"].check_budget(cfg_for("spiel-ag", rank=None, density=0.9), meta)


def test_ia3_budget_and_targets(tiny_llama):
    from spielbench.measure import count_parameters

    model = METHODS["ia3"].build(tiny_llama, cfg_for("ia3"))
    # attention: one scale per output (32+16+16+32); feed-forward: one per input (32+32+64), 2 layers
    assert count_parameters(model, trainable_only=True) == 2 * (32 + 16 + 16 + 32 + 32 + 32 + 64)
    names = {n.split(".")[-3] for n, p in model.named_parameters() if p.requires_grad}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
