"""Building the benchmark's base model: a random-weight LLaMA of a size, materialised directly on the device
(optionally with NF4 projections), or a real model folder; and the probe of whether NF4 runs there."""
from __future__ import annotations

from typing import Iterable, Optional

from spielbench.benchmark.sizes import ModelSize


_FILL_BLOCK = 1_000_003  # a prime, so the repeated random block does not align with matrix rows


def _fill_random_(tensor, block, std: float = 0.02) -> None:
    """Fill ``tensor`` with ``N(0, std)`` values by tiling a precomputed random block (fast on CPU; the
    values only need to be finite and of realistic scale: weights do not change time or memory)."""
    import torch

    flat = tensor.view(-1)
    n = flat.numel()
    b = block.numel()
    full = (n // b) * b
    with torch.no_grad():
        if full:
            flat[:full].view(-1, b).copy_(block.to(flat.dtype).expand(n // b, b))
        if n > full:
            flat[full:].copy_(block[: n - full].to(flat.dtype))


def _materialise(model, device, block, skip: Iterable = ()) -> None:
    """Move every meta parameter/buffer of ``model`` (except modules in ``skip``) to ``device`` and fill it:
    matrices with random values, vectors (norm weights) with ones; rotary buffers are rebuilt."""
    import torch

    skip_ids = {id(m) for m in skip}
    for module in model.modules():
        if id(module) in skip_ids:
            continue
        direct = list(module._parameters.values()) + list(module._buffers.values())
        if not any(t is not None and t.is_meta for t in direct):
            continue
        module.to_empty(device=device, recurse=False)
        for p in module._parameters.values():
            if p is None:
                continue
            if p.ndim >= 2:
                _fill_random_(p.data, block)
            else:
                with torch.no_grad():
                    p.data.fill_(1.0)
    for name, module in list(model.named_modules()):
        if hasattr(module, "inv_freq") and hasattr(module, "rope_init_fn"):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, type(module)(config=model.config, device=device))


def build_random_model(size: ModelSize, device: str, dtype, quantized: bool = False, seed: int = 0):
    """A ``LlamaForCausalLM`` of ``size`` with random weights, built directly on ``device``.

    The model is created on the ``meta`` device and each module is materialised in place, so the peak
    memory of building is the model itself (plus one fp32 projection for NF4). Float models have all
    parameters in ``dtype``. With ``quantized`` every projection becomes a bitsandbytes ``Linear4bit``
    (NF4, double quantisation, compute dtype ``dtype``) as ``baselines.quant`` loads real models; embeddings,
    norms and ``lm_head`` stay in ``dtype``; ``model.is_loaded_in_4bit`` is set for peft.

    Raises ImportError (bitsandbytes missing) for ``quantized``; torch allocation errors when it does not fit.
    """
    import torch
    from transformers import LlamaForCausalLM

    gen = torch.Generator(device="cpu").manual_seed(seed)
    block = (torch.randn(_FILL_BLOCK, generator=gen) * 0.02).to(device)
    config = size.llama_config()
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to(dtype)
    replaced = []
    if quantized:
        import bitsandbytes as bnb

        for name, module in list(model.named_modules()):
            if not isinstance(module, torch.nn.Linear) or name == "lm_head":
                continue
            weight = torch.empty(module.out_features, module.in_features, dtype=dtype, device=device)
            _fill_random_(weight, block)
            qlayer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                       compute_dtype=dtype, compress_statistics=True, quant_type="nf4",
                                       device="meta")
            qlayer.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True,
                                              quant_type="nf4")
            qlayer = qlayer.to(device)
            del weight
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, qlayer)
            replaced.append(qlayer)
        model.is_loaded_in_4bit = True
    _materialise(model, device, block, skip=replaced)
    if config.tie_word_embeddings:
        model.tie_weights()
    model.train()
    return model


def load_real_model(model_dir: str, device: str, dtype, quantized: bool):
    """A real model folder in ``dtype`` (NF4 through ``baselines.quant.load_nf4_model`` for ``quantized``)."""
    from transformers import AutoModelForCausalLM

    if quantized:
        from baselines.quant import load_nf4_model

        model = load_nf4_model(model_dir, device)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    model.config.use_cache = False
    model.train()
    return model


def probe_4bit(device: str, dtype) -> Optional[str]:
    """None if bitsandbytes runs an NF4 ``Linear4bit`` forward+backward on ``device``, else the reason."""
    try:
        import bitsandbytes as bnb
        import torch

        layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=dtype, quant_type="nf4", device="meta")
        layer.weight = bnb.nn.Params4bit(torch.randn(64, 64, dtype=dtype, device=device) * 0.02,
                                         requires_grad=False, quant_type="nf4")
        layer = layer.to(device)
        x = torch.randn(2, 64, dtype=dtype, device=device, requires_grad=True)
        layer(x).float().sum().backward()
        if x.grad is None:
            return "bitsandbytes Linear4bit gave no input gradient"
        return None
    except Exception as exc:  # any failure means the 4-bit path cannot run here
        return f"bitsandbytes NF4 cannot run on {device}: {type(exc).__name__}: {exc}"
