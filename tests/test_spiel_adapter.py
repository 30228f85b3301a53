"""The SpIEL adapter folder (spiel.adapter_io): what peft/transformers say when pointed at it, the base
record and its checks, value checks on load, placeholder refusal, byte-identical saves, wrap-time refusal
of unsupported base layers (docs/METHOD.md §7)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import REPO, make_tiny_llama
from spiel.config import SpielConfig
from spiel.model import SpielModel, get_spiel_model

IDS = torch.tensor([[1, 5, 9, 33, 17, 100, 4, 2]])
ONE_LINER = "spiel.SpielModel.from_pretrained(base_model, adapter_dir)"


def _saved(directory: Path, model=None, seed: int = 3) -> SpielModel:
    model = get_spiel_model(model if model is not None else make_tiny_llama(), SpielConfig(lora_rank_equivalent=2))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in model.sparse_layers():
            layer.values.copy_(torch.randn(layer.k, generator=gen) * 0.05)
    model.save_pretrained(directory)
    return model


def test_peft_and_transformers_loaders_name_spiel_and_the_one_liner(tmp_path):
    from peft import AutoPeftModelForCausalLM, PeftModel

    _saved(tmp_path / "a")
    with pytest.raises(KeyError, match=r"SpIEL adapter \(library 'spiel'\).*SpielModel\.from_pretrained"):
        PeftModel.from_pretrained(make_tiny_llama(), str(tmp_path / "a"))
    with pytest.raises(KeyError, match=r"SpIEL adapter.*SpielModel\.from_pretrained"):
        AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "a"))
    with pytest.raises(KeyError, match=r"SpIEL adapter.*SpielModel\.from_pretrained"):
        make_tiny_llama().load_adapter(str(tmp_path / "a"))
    # ... and the one-liner they name works
    loaded = SpielModel.from_pretrained(make_tiny_llama(), tmp_path / "a")
    assert ONE_LINER in json.loads((tmp_path / "a" / "adapter_config.json").read_text())["peft_type"]
    assert loaded.num_trainable_parameters() == 0 and loaded.inference_mode


def test_the_base_is_recorded_and_a_mismatch_refused(tmp_path):
    bf16 = make_tiny_llama().to(torch.bfloat16)
    _saved(tmp_path / "bf16", bf16)
    config = SpielConfig.from_pretrained(tmp_path / "bf16")
    assert (config.base_model_dtype, config.base_model_quantization) == ("bfloat16", "none")
    upcast = SpielModel.from_pretrained(make_tiny_llama(), tmp_path / "bf16")  # float32 holds the same weights
    assert upcast.spiel_config.base_model_dtype == "bfloat16"  # the record survives a re-save
    with pytest.raises(ValueError, match=r"base_model_dtype: .*bfloat16 base, the model given is float16"):
        SpielModel.from_pretrained(make_tiny_llama().to(torch.float16), tmp_path / "bf16")
    _saved(tmp_path / "fp32")
    with pytest.raises(ValueError, match=r"adapter_config.json: base_model_dtype: .*float32 base.*bfloat16"):
        SpielModel.from_pretrained(make_tiny_llama().to(torch.bfloat16), tmp_path / "fp32")
    assert SpielModel.from_pretrained(make_tiny_llama().to(torch.bfloat16), tmp_path / "fp32", check_base=False)
    # an adapter trained over NF4 is refused on a dense base (the silent case of the issue)
    data = json.loads((tmp_path / "fp32" / "adapter_config.json").read_text())
    (tmp_path / "fp32" / "adapter_config.json").write_text(json.dumps({**data, "base_model_quantization": "nf4"}))
    with pytest.raises(ValueError, match=r"base_model_quantization: .*'nf4' base, the model given is 'none'.*NF4"):
        SpielModel.from_pretrained(make_tiny_llama(), tmp_path / "fp32")


@pytest.mark.parametrize("bad, message", [
    (lambda v: torch.where(torch.arange(v.numel()) == 3, torch.tensor(float("nan")), v), "1 NaN/Inf"),
    (lambda v: torch.full_like(v, float("inf")), "NaN/Inf"),
    (lambda v: (v * 1000).to(torch.int32), "dtype torch.int32, expected a floating-point"),
    (lambda v: v > 0, "dtype torch.bool, expected a floating-point"),
])
def test_bad_values_are_refused_on_every_load_path(tmp_path, bad, message):
    model = _saved(tmp_path / "a")
    name = model.sparse_layers()[1][0]
    path = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors[f"{name}.values"] = bad(tensors[f"{name}.values"])
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"'{name}.values'.*{message}"):
        SpielModel.from_pretrained(make_tiny_llama(), tmp_path / "a")
    before = {k: v.clone() for k, v in model.adapter_state_dict().items()}
    with pytest.raises(ValueError, match=rf"'{name}.values'.*{message}"):
        model.load_adapter(tmp_path / "a")
    assert all(torch.equal(before[k], v) for k, v in model.adapter_state_dict().items())  # nothing written


def test_indices_of_a_float_or_bool_dtype_are_refused(tmp_path):
    model = _saved(tmp_path / "a")
    name = model.sparse_layers()[0][0]
    path = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors[f"{name}.indices"] = tensors[f"{name}.indices"].to(torch.float32)
    save_file(tensors, path)
    with pytest.raises(ValueError, match=rf"'{name}.indices' has dtype torch.float32, expected int32 or int64"):
        SpielModel.from_pretrained(make_tiny_llama(), tmp_path / "a")


def test_placeholder_parameters_are_not_saved(tmp_path):
    model = _saved(tmp_path / "first")
    name, layer = model.sparse_layers()[2]
    layer.values.data = torch.empty(0)  # what DeepSpeed ZeRO-3 leaves in a partitioned parameter
    with pytest.raises(ValueError, match=rf"module '{name}': values holds 0 element.*ZeRO-3.*GatheredParameters"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()
    layer.values = nn.Parameter(torch.empty(layer.k, device="meta"))
    with pytest.raises(ValueError, match=rf"module '{name}': values .*device meta"):
        model.save_pretrained(tmp_path / "first")
    assert SpielModel.from_pretrained(make_tiny_llama(), tmp_path / "first")  # the earlier save is intact


_SAVE_SCRIPT = """
import sys, torch
sys.path.insert(0, sys.argv[2])
import spiel
torch.manual_seed(0)
base = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.Linear(24, 8))
m = spiel.get_spiel_model(base, spiel.SpielConfig(num_tunable_weights=40, target_modules=["0", "1"]))
with torch.no_grad():
    for _, layer in m.sparse_layers():
        layer.values.fill_(0.25)
m.save_pretrained(sys.argv[1])
"""


def test_identical_adapters_have_identical_bytes_across_processes(tmp_path):
    digests = set()
    for run in range(3):  # the safetensors metadata order used to vary from process to process
        out = tmp_path / f"run{run}"
        env = dict(os.environ, PYTHONHASHSEED=str(run))
        subprocess.run([sys.executable, "-c", _SAVE_SCRIPT, str(out), str(REPO)],
                       check=True, env=env, capture_output=True, timeout=120)
        digests.add(tuple(hashlib.sha256((out / f).read_bytes()).hexdigest()
                          for f in ("adapter_config.json", "adapter_model.safetensors")))
    assert len(digests) == 1
    header = (tmp_path / "run0" / "adapter_model.safetensors").read_bytes()
    text = header[8:8 + int.from_bytes(header[:8], "little")].decode()
    assert '"__metadata__":{"format":"pt","spiel_shapes":' in text  # sorted keys, every time


def test_unsupported_base_layers_are_refused_at_wrap_time():
    import bitsandbytes as bnb
    from torch.nn.utils import parametrize

    model = make_tiny_llama()
    old = model.model.layers[1].mlp.down_proj
    model.model.layers[1].mlp.down_proj = bnb.nn.Linear8bitLt(old.in_features, old.out_features, bias=False,
                                                              has_fp16_weights=False)
    with pytest.raises(ValueError, match=r"module 'model.layers.1.mlp.down_proj': Linear8bitLt .*Int8Params.*"
                                         r"not supported.*Linear4bit"):
        get_spiel_model(model, SpielConfig(lora_rank_equivalent=2))
    assert not any(type(m).__name__ == "SparseDeltaLinear" for m in model.modules())  # nothing was changed
    assert model.model.embed_tokens.weight.requires_grad  # not frozen either

    class Scale(nn.Module):
        def forward(self, w):
            return 2 * w

    model = make_tiny_llama()
    parametrize.register_parametrization(model.model.layers[0].self_attn.v_proj, "weight", Scale())
    with pytest.raises(ValueError, match=r"module 'model.layers.0.self_attn.v_proj'.*parametrized"):
        get_spiel_model(model, SpielConfig(lora_rank_equivalent=2))


def test_the_record_of_a_4bit_base_is_its_compute_dtype():
    """Over NF4, the small unquantised parameters may be upcast for training (peft's
    prepare_model_for_kbit_training); the record keeps what the 4-bit layers compute in, so a GPU
    qSpIEL adapter (bf16 compute, fp32 embeddings after the upcast) matches a freshly loaded NF4 base."""
    import bitsandbytes as bnb
    from spiel.adapter_io import base_record

    model = make_tiny_llama()  # float32 embeddings, as after the upcast
    layer = bnb.nn.Linear4bit(32, 32, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    assert base_record(model, [("q", layer)]) == {"base_model_dtype": "bfloat16", "base_model_quantization": "nf4"}
    assert base_record(model, [("q", model.model.layers[0].self_attn.q_proj)]) == {
        "base_model_dtype": "float32", "base_model_quantization": "none"}
