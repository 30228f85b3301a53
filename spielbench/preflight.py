"""Checks of one run against its model without loading weights: device, target modules, budget, sequence length.

One implementation serves both entry points: the training CLI (``spielbench.train.prepare_run``, before it
writes anything) and the workflow at parse time (``spielbench.pipeline.resolve_pipeline``, before any job).
What a run needs from its model here is the model's config (layer shapes, on the ``meta`` device) and its
tokenizer (the chat template's overhead); the weights are never read.

Raises :class:`spielbench.errors.InputError` naming the run-config field (``device``, ``rank``,
``density``, ``spiel.target_modules``, ``max_seq_length``, ``model``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from spielbench.errors import InputError

#: Response tokens (content plus the end-of-turn marker) that must fit after the chat template's prompt
#: of an empty user turn; a shorter ``max_seq_length`` could not train on any example.
MIN_RESPONSE_TOKENS = 8

#: bitsandbytes' NF4 block size; its CPU kernels reshape each row into blocks of this many weights.
NF4_BLOCKSIZE = 64


@dataclass
class ModelInfo:
    """What the checks read from a model: ``meta_model`` (``nn.Module`` on the ``meta`` device, no weights)
    and ``tokenizer`` (with a chat template: the model's own, else the Tülu one), plus where they came from."""

    source: str
    meta_model: Any
    tokenizer: Any


def resolve_device(requested: str) -> str:
    """``"auto"`` → ``"cuda"`` when available else ``"cpu"``; an explicit CUDA request needs CUDA.

    Raises:
        InputError: ``device`` asks for CUDA on a machine without it, or for a CUDA index it does not have.
    """
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(f"device: {requested!r} requested but CUDA is not available (use 'cpu' or 'auto')")
        index = requested.partition(":")[2]
        if index and int(index) >= torch.cuda.device_count():
            raise InputError(f"device: {requested!r} requested but this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    return requested


def meta_model_from_config(model_dir: str | os.PathLike, gguf_file: str | None = None):
    """The model built from its config on the ``meta`` device: layer shapes, no weights.

    Args:
        model_dir: a transformers model folder (``config.json``), or the folder holding ``gguf_file``.
        gguf_file: the name of a ``.gguf`` file in ``model_dir``: its metadata (architecture and shapes)
            is read through transformers' GGUF support, which parses the header only (no tensor is loaded).

    Raises:
        InputError: the config does not describe a causal LM transformers can build.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    where = f"{model_dir}/{gguf_file}" if gguf_file else f"{model_dir}/config.json"
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        config = AutoConfig.from_pretrained(str(model_dir), **kwargs)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"model: {where} does not describe a causal LM transformers can build ({exc})") from None


def load_model_info(model_dir: str | os.PathLike, gguf_file: str | None = None) -> ModelInfo:
    """Read a model's config (:func:`meta_model_from_config`) and tokenizer, never its weights.

    Args:
        model_dir, gguf_file: as :func:`meta_model_from_config`; a ``.gguf``'s tokenizer and chat template
            come from its metadata.

    Raises:
        InputError: the config does not describe a causal LM transformers can build, or no tokenizer.
    """
    from transformers import AutoTokenizer

    from spielbench.data import ensure_chat_template

    meta = meta_model_from_config(model_dir, gguf_file)
    where = f"{model_dir}/{gguf_file}" if gguf_file else str(model_dir)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"model: cannot load a tokenizer from {where} ({exc})") from None
    ensure_chat_template(tokenizer)
    return ModelInfo(source=where, meta_model=meta, tokenizer=tokenizer)


def linear_module_names(meta_model) -> list[str]:
    """The distinct last name components of the model's linear layers (``q_proj``, ..., ``lm_head``), sorted."""
    import torch

    return sorted({name.rsplit(".", 1)[-1] for name, m in meta_model.named_modules()
                   if name and isinstance(m, torch.nn.Linear)})


def check_target_modules(spiel_config, meta_model) -> None:
    """Every entry of ``spiel.target_modules`` must name a linear layer of the model (a regex must match one).

    Raises:
        InputError: ``spiel.target_modules: unknown module(s) [...]; the model's linear layers are ...``,
            or a match that is not a linear layer (``spiel.budget.find_target_modules``'s message).
    """
    from spiel.budget import find_target_modules

    targets = spiel_config.target_modules
    valid = linear_module_names(meta_model)
    if isinstance(targets, (list, tuple)):
        names = {n for n, _ in meta_model.named_modules() if n}
        unknown = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
        if unknown:
            raise InputError(f"spiel.target_modules: unknown module name(s) {unknown}; the model's linear layers "
                             f"are named {', '.join(valid)}")
    try:
        find_target_modules(meta_model, targets)
    except ValueError as exc:
        raise InputError(f"spiel.target_modules: {exc}; the model's linear layers are named "
                         f"{', '.join(valid)}") from None


def template_overhead(tokenizer) -> int:
    """Tokens the chat template spends before a response: an empty user turn rendered with the generation
    prompt (system prompt, role markers), as ``spielbench.data`` encodes it."""
    messages = [{"role": "user", "content": ""}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def check_seq_length(max_seq_length: int, tokenizer) -> None:
    """``max_seq_length`` must leave :data:`MIN_RESPONSE_TOKENS` after the template's overhead.

    Raises:
        InputError: ``max_seq_length: N leaves no room ...`` with the overhead and the minimum.
    """
    overhead = template_overhead(tokenizer)
    if max_seq_length < overhead + MIN_RESPONSE_TOKENS:
        raise InputError(
            f"max_seq_length: {max_seq_length} leaves no room for a response: the chat template alone takes "
            f"{overhead} tokens for an empty user turn; use at least {overhead + MIN_RESPONSE_TOKENS}")


def check_nf4_cpu_shapes(meta_model) -> None:
    """NF4 on CPU needs every quantized layer's ``in_features`` to be a multiple of the block size.

    Raises:
        InputError: naming the first layer that is not.
    """
    from baselines.lora import TARGET_MODULES, targeted_linears

    for name, fin, fout in targeted_linears(meta_model, TARGET_MODULES):
        if fin % NF4_BLOCKSIZE:
            raise InputError(f"model: 4-bit methods on CPU need in_features divisible by {NF4_BLOCKSIZE} "
                             f"(bitsandbytes NF4 blocks); {name} has in_features={fin}")


def check_run_against_model(cfg, spec, info: ModelInfo, device: str | None) -> dict[str, Any]:
    """All model-dependent checks of one run (``spec.check_config(cfg)`` already passed).

    Args:
        cfg: the ``RunConfig``.
        spec: its ``spielbench.methods.MethodSpec``.
        info: from :func:`load_model_info`.
        device: the resolved device, or None when unknown here (a cluster submit host): then the CPU-only
            NF4 shape check runs only for an explicit ``device: cpu``.

    Returns:
        The budget (``MethodSpec.check_budget``): rank, density, trainable and total parameter counts.

    Raises:
        InputError: unknown target modules, a rank/density the layers cannot hold, NF4 shapes on CPU,
            a ``max_seq_length`` shorter than the template's overhead plus a few response tokens.
    """
    if spec.family == "spiel":
        check_target_modules(spec.spiel_config(cfg), info.meta_model)
    budget = spec.check_budget(cfg, info.meta_model)
    if spec.quantized and (device or cfg.device) == "cpu":
        check_nf4_cpu_shapes(info.meta_model)
    check_seq_length(cfg.max_seq_length, info.tokenizer)
    return budget

