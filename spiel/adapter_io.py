"""The SpIEL adapter folder: what is written, what is checked when reading, and which bases are accepted
(docs/METHOD.md §7).

A saved adapter is a folder with two files, each written atomically (temporary file + ``os.replace``):

* ``adapter_config.json``: the :class:`~spiel.config.SpielConfig` (with ``num_deltas``, the format
  version and the base it was trained over: ``base_model_dtype``, ``base_model_quantization``);
* ``adapter_model.safetensors``: ``<module>.indices`` (int32/int64 ``[k]``, flat row-major positions in
  the ``[out, in]`` weight) and ``<module>.values`` (the delta dtype, ``[k]``) for every wrapped module,
  with the weight shapes as JSON in the metadata key ``spiel_shapes``. The header is written with
  sorted keys, so identical adapters give identical bytes in any process.

Reading checks everything before the model is touched: names, lengths ``k``, weight shapes, indices
(integers, in range, distinct) and values (floating point, finite). Writing refuses placeholder
parameters (a meta tensor, or fewer elements than ``k``, as under DeepSpeed ZeRO-3 partitioning).
"""
from __future__ import annotations

import contextlib
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from torch import nn

from .config import CONFIG_NAME, SpielConfig

__all__ = [
    "WEIGHTS_NAME",
    "SHAPES_METADATA_KEY",
    "atomic_write_bytes",
    "base_record",
    "check_base",
    "check_tensors",
    "check_wrappable",
    "is_spiel_adapter",
    "read_adapter_tensors",
    "write_adapter",
]

WEIGHTS_NAME = "adapter_model.safetensors"
SHAPES_METADATA_KEY = "spiel_shapes"
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace`` (mode 0644)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o644)  # mkstemp creates 0600; outputs are meant to be readable
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _is_linear4bit(module: nn.Module) -> bool:
    import sys

    bnb = sys.modules.get("bitsandbytes")  # a Linear4bit can only exist once bitsandbytes was imported
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def check_wrappable(name: str, module: nn.Module) -> None:
    """Refuse a target module SpIEL cannot wrap faithfully, before anything is changed.

    Accepted: ``nn.Linear`` whose weight is a plain ``nn.Parameter`` (not parametrized), and bitsandbytes
    ``Linear4bit`` (NF4/FP4). Refused, naming the module: 8-bit ``Linear8bitLt`` (its int8 weight would be
    used as if dense, and a merge would truncate into it), and any weight that is a tensor subclass
    (``DTensor``, ``Int8Params``, ...), whose storage is not the dense ``[out, in]`` matrix.

    Raises:
        ValueError: the module is not supported (message names it, its class and the weight's class).
    """
    if _is_linear4bit(module):
        return
    weight = getattr(module, "weight", None)
    kind = f"{type(module).__name__} with a {type(weight).__name__} weight"
    advice = ("SpIEL wraps nn.Linear with a dense weight or bitsandbytes Linear4bit (NF4/FP4); load the base "
              "unquantised or in 4-bit, or leave this module out of target_modules")
    if type(module).__name__ == "Linear8bitLt" or not isinstance(module, nn.Linear):
        raise ValueError(f"module {name!r}: {kind} is not supported; {advice}")
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(module) or type(weight) is not nn.Parameter:
        raise ValueError(f"module {name!r}: {kind} is not supported (a parametrized or tensor-subclass weight); "
                         f"{advice}")


def base_record(model: nn.Module, modules: Iterable[tuple[str, nn.Module]]) -> dict[str, Optional[str]]:
    """``{"base_model_dtype", "base_model_quantization"}`` of ``model`` and its target ``modules``.

    The quantisation is ``"nf4"``/``"fp4"`` when the targets are bitsandbytes 4-bit layers, else
    ``"none"``. The dtype is, over a 4-bit base, the 4-bit layers' compute dtype (the small unquantised
    parameters may be upcast for training, e.g. by peft's ``prepare_model_for_kbit_training``, and are
    not what the deltas were trained against); otherwise the dtype of the model's floating-point
    weights (its input embeddings when it has them, else its first floating parameter)."""
    quant, dtype = "none", None
    for _, module in modules:
        if _is_linear4bit(module):
            quant = str(getattr(module.weight, "quant_type", "nf4")).lower()
            dtype = getattr(module, "compute_dtype", None)  # what the 4-bit layers compute in
            break
    if dtype in _DTYPE_NAMES:
        return {"base_model_dtype": _DTYPE_NAMES[dtype], "base_model_quantization": quant}
    get_embeddings = getattr(model, "get_input_embeddings", None)
    with contextlib.suppress(Exception):
        dtype = get_embeddings().weight.dtype if callable(get_embeddings) else None
    if dtype not in _DTYPE_NAMES:
        dtype = next((p.dtype for p in model.parameters() if p.dtype in _DTYPE_NAMES), None)
    return {"base_model_dtype": _DTYPE_NAMES.get(dtype), "base_model_quantization": quant}


def check_base(config: SpielConfig, actual: dict[str, Optional[str]], where: str) -> None:
    """Refuse loading an adapter onto a base unlike the one it was trained over.

    ``config`` is the saved adapter's; ``actual`` is :func:`base_record` of the model given. The
    quantisation must be the same; the dtype must be the recorded one or float32 (a bf16/fp16 base upcast
    to float32 holds the same weight values). Unknown records (version-1
    adapters) are not checked.

    Raises:
        ValueError: naming ``where`` (the adapter config file), the recorded and the given base, and the
            way out (load the base as recorded, or ``check_base=False``).
    """
    rec_q, rec_d = config.base_model_quantization, config.base_model_dtype
    act_q, act_d = actual.get("base_model_quantization"), actual.get("base_model_dtype")
    out = "load the base as recorded, or pass check_base=False to load it anyway"
    if rec_q is not None and act_q is not None and rec_q != act_q:
        raise ValueError(f"{where}: base_model_quantization: the adapter was trained over a {rec_q!r} base, the "
                         f"model given is {act_q!r}; {out} (an NF4 base: baselines.quant.load_nf4_model or "
                         "transformers' BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4'))")
    if rec_d is not None and act_d is not None and act_d not in (rec_d, "float32"):
        raise ValueError(f"{where}: base_model_dtype: the adapter was trained over a {rec_d} base, the model given "
                         f"is {act_d}; {out} (float32 is accepted for any base: it holds the same weights)")


def is_spiel_adapter(directory: os.PathLike | str) -> bool:
    """True if ``<directory>/adapter_config.json`` is a SpIEL adapter config (format 2, or version 1's
    ``"peft_type": "SPIEL"``); False for a peft adapter, a missing or unreadable file."""
    path = Path(directory) / CONFIG_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and ("spiel_format_version" in data or data.get("peft_type") == "SPIEL")


def _canonical(payload: bytes) -> bytes:
    """``payload`` (safetensors bytes) with its JSON header re-written with sorted keys (same data)."""
    (size,) = struct.unpack("<Q", payload[:8])
    header = json.loads(payload[8:8 + size])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the format pads the header with spaces to 8-byte alignment
    return struct.pack("<Q", len(text)) + text + payload[8 + size:]


def write_adapter(directory: Path, config: SpielConfig, layers: list[tuple[str, Any]]) -> None:
    """Write the adapter folder for ``layers`` (``[(module name, SparseDeltaLinear)]``) and ``config``.

    Raises:
        ValueError: a layer's ``values``/``indices`` are placeholders (meta tensors, or not ``k``
            elements: e.g. parameters partitioned by DeepSpeed ZeRO-3), naming the module; nothing is
            written then.
    """
    from safetensors.torch import save as safetensors_save

    state: dict[str, torch.Tensor] = {}
    for name, layer in layers:
        for part in ("indices", "values"):
            tensor = getattr(layer, part)
            if tensor.is_meta or tensor.numel() != layer.k or tensor.numel() == 0:
                raise ValueError(f"module {name!r}: {part} holds {tensor.numel()} element(s) on device "
                                 f"{tensor.device}, expected k={layer.k}: placeholder parameters (e.g. DeepSpeed "
                                 "ZeRO-3 partitions) cannot be saved; gather them first (deepspeed.zero."
                                 "GatheredParameters) and save from one process")
            state[f"{name}.{part}"] = tensor.detach().to("cpu", copy=True).contiguous()
    shapes = {name: [layer.out_features, layer.in_features] for name, layer in layers}
    payload = safetensors_save(state, metadata={"format": "pt",
                                                SHAPES_METADATA_KEY: json.dumps(shapes, sort_keys=True)})
    atomic_write_bytes(directory / WEIGHTS_NAME, _canonical(payload))
    atomic_write_bytes(directory / CONFIG_NAME, config.to_json_string().encode("utf-8"))


def _open(path: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt")
    except Exception as exc:  # safetensors raises its own SafetensorError for bad headers
        raise ValueError(f"{path}: not a readable safetensors file ({exc})") from None


def read_adapter_tensors(directory: os.PathLike | str, expected: dict[str, int], dense_numel: dict[str, int],
                         weight_shapes: Optional[dict[str, list[int]]] = None,
                         ) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
    """Read and check ``<directory>/adapter_model.safetensors`` for modules ``expected`` (``{name: k}``).

    Args:
        expected: the modules the file must hold exactly, each with ``k`` entries.
        dense_numel: ``{name: out * in}`` of the model's weights (the range of the indices).
        weight_shapes: ``{name: [out, in]}`` of the model; checked against the recorded shapes first.

    Returns:
        ``(tensors, shapes)``: ``{"<name>.indices"|"<name>.values": tensor}`` (CPU, as saved) and the
        recorded weight shapes ``{name: [out, in]}`` (empty for files without them).

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: (naming the file and tensor) unreadable file; tensor missing or unexpected; not 1-D of
            length ``k``; indices not integers, out of range or repeated; values not floating point or
            not finite.
    """
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no {WEIGHTS_NAME} (not a saved SpIEL adapter directory)")
    wanted = {f"{name}.{part}" for name in expected for part in ("indices", "values")}
    with _open(path) as handle:
        metadata = handle.metadata() or {}
        keys = set(handle.keys())
        missing, extra = sorted(wanted - keys), sorted(keys - wanted)
        if missing or extra:
            raise ValueError(f"{path}: adapter does not match the model: missing tensors {missing[:3]}, "
                             f"unexpected tensors {extra[:3]}")
        tensors = {key: handle.get_tensor(key) for key in sorted(wanted)}
    try:
        shapes = json.loads(metadata[SHAPES_METADATA_KEY]) if SHAPES_METADATA_KEY in metadata else {}
    except ValueError:
        raise ValueError(f"{path}: metadata {SHAPES_METADATA_KEY!r} is not JSON") from None
    for name, actual in (weight_shapes or {}).items():
        if name in shapes and list(shapes[name]) != list(actual):
            raise ValueError(f"{path}: module {name!r}: the adapter was saved for a weight of shape "
                             f"{list(shapes[name])}, the model has {list(actual)}")
    check_tensors(tensors, expected, dense_numel, str(path))
    return tensors, shapes


def check_tensors(tensors: dict[str, torch.Tensor], expected: dict[str, int], dense_numel: dict[str, int],
                  where: str) -> None:
    """Check adapter tensors (``{"<name>.indices"|"<name>.values": tensor}``) against ``expected``
    (``{name: k}``) and ``dense_numel`` (``{name: out * in}``).

    Raises:
        ValueError: (naming ``where`` and the tensor) a tensor missing or unexpected; not 1-D of length
            ``k``; indices not integers, out of range or repeated; values not floating point or not finite.
    """
    wanted = {f"{name}.{part}" for name in expected for part in ("indices", "values")}
    missing, extra = sorted(wanted - set(tensors)), sorted(set(tensors) - wanted)
    if missing or extra:
        raise ValueError(f"{where}: adapter does not match the model: missing tensors {missing[:3]}, "
                         f"unexpected tensors {extra[:3]}")
    for name, k in expected.items():
        for part in ("indices", "values"):
            key = f"{name}.{part}"
            if tensors[key].dim() != 1 or tensors[key].numel() != k:
                raise ValueError(f"{where}: {key!r} has shape {list(tensors[key].shape)}, expected [{k}]")
        indices, values = tensors[f"{name}.indices"], tensors[f"{name}.values"]
        if indices.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{where}: '{name}.indices' has dtype {indices.dtype}, expected int32 or int64")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= dense_numel[name]):
            raise ValueError(f"{where}: '{name}.indices' must be integers in [0, {dense_numel[name]})")
        if torch.unique(indices).numel() != indices.numel():
            raise ValueError(f"{where}: '{name}.indices' are not distinct")
        if not values.dtype.is_floating_point:
            raise ValueError(f"{where}: '{name}.values' has dtype {values.dtype}, expected a floating-point dtype")
        if not bool(torch.isfinite(values).all()):
            bad = int((~torch.isfinite(values)).sum())
            raise ValueError(f"{where}: '{name}.values' holds {bad} NaN/Inf value(s)")
