"""Wrap a transformers model with SpIEL sparse deltas; save, load, merge (SPIEL_SPEC.md §2, §7).

:func:`get_spiel_model` freezes every base parameter and replaces each targeted linear layer with a
:class:`~spiel.layer.SparseDeltaLinear`. The returned :class:`SpielModel` is an ``nn.Module`` whose
``forward``/``generate``/``config`` (and any other attribute it lacks) delegate to the wrapped model, so
Hugging Face ``Trainer``, ``generate`` and lm-eval's ``HFLM(pretrained=model)`` accept it.

On disk (``save_pretrained``): ``adapter_config.json`` (:class:`~spiel.config.SpielConfig` with
``num_deltas``) and ``adapter_model.safetensors`` holding ``<module>.indices`` (int32/int64, flat
row-major) and ``<module>.values`` (delta dtype) per module, plus the weight shapes in the safetensors
metadata. Both files are written atomically (temporary file + ``os.replace``).
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch
from torch import nn

from .budget import compute_num_deltas, count_parameters, find_target_modules
from .config import CONFIG_NAME, SpielConfig
from .layer import SparseDeltaLinear, fusable_weight

__all__ = ["SpielModel", "get_spiel_model", "WEIGHTS_NAME"]

WEIGHTS_NAME = "adapter_model.safetensors"
_SHAPES_METADATA_KEY = "spiel_shapes"


def _atomic_write_bytes(path: Path, data: bytes) -> None:
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


def _replace_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _inject(model: nn.Module, config: SpielConfig,
            indices: Optional[dict[str, torch.Tensor]] = None) -> SpielConfig:
    """Freeze ``model`` and replace its targets in place; returns the config with ``num_deltas`` set.

    With ``indices`` (loading), each layer takes its saved index set instead of a random one."""
    modules = find_target_modules(model, config.target_modules)
    names = [name for name, _ in modules]
    if config.num_deltas is not None:
        missing = sorted(set(config.num_deltas) - set(names))
        extra = sorted(set(names) - set(config.num_deltas))
        if missing or extra:
            raise ValueError(f"num_deltas does not match the model's target modules: "
                             f"in num_deltas but not matched in the model: {missing[:5]}{'...' if len(missing) > 5 else ''}; "
                             f"matched in the model but not in num_deltas: {extra[:5]}{'...' if len(extra) > 5 else ''}")
        num_deltas = {name: int(config.num_deltas[name]) for name in names}
        for name, module in modules:
            numel = int(module.out_features) * int(module.in_features)
            if num_deltas[name] > numel:
                raise ValueError(f"num_deltas[{name!r}] = {num_deltas[name]} exceeds the module's {numel} weights")
    else:
        num_deltas = compute_num_deltas(model, config, modules)
    for param in model.parameters():
        param.requires_grad_(False)
    generator = torch.Generator().manual_seed(config.seed)
    dtype = config.torch_delta_dtype
    # A weight also read by another module (tied input embeddings and lm_head) must keep W0 between calls:
    # such layers build W0 + Δ per call instead of keeping it fused in the base weight (spiel/layer.py).
    uses: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        uses[id(param)] = uses.get(id(param), 0) + 1
    for name, module in modules:
        if indices is not None:
            try:
                layer = SparseDeltaLinear(module, indices=indices[name], delta_dtype=dtype)
            except ValueError as exc:
                raise ValueError(f"module {name!r}: {exc}") from None
        else:
            layer = SparseDeltaLinear(module, num_deltas[name], delta_dtype=dtype, generator=generator)
        if uses.get(id(module.weight), 0) > 1 or not fusable_weight(module.weight):  # shared, sharded or subclassed
            layer.fuse_delta = False
        _replace_submodule(model, name, layer)
    base_name = config.base_model_name_or_path or getattr(model, "name_or_path", None) or None
    return config.replace(num_deltas=num_deltas, base_model_name_or_path=base_name)


def _open_safetensors(path: Path):
    """``safe_open(path)``; a corrupt or truncated file raises ValueError naming it (not a bare SafetensorError)."""
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt")
    except Exception as exc:  # safetensors raises its own SafetensorError for bad headers
        raise ValueError(f"{path}: not a readable safetensors file ({exc})") from None


def unwrap_spiel_model(model):
    """The SpielModel inside a data-parallel wrapper (``DistributedDataParallel(model).module``, nested or
    not); any other model is returned unchanged."""
    while not callable(getattr(model, "sparse_layers", None)) and hasattr(model, "module"):
        model = model.module
    return model


def get_spiel_model(model: nn.Module, config: SpielConfig) -> "SpielModel":
    """Wrap ``model`` (a transformers model, modified in place) with SpIEL sparse deltas.

    Every base parameter is frozen; each targeted ``nn.Linear``/``Linear4bit`` (see
    :func:`spiel.budget.find_target_modules`) becomes a :class:`SparseDeltaLinear` with
    ``k_m = floor(N * numel_m / Σ numel)`` random distinct initial indices (seeded by ``config.seed``)
    and zero deltas (spec §2, §2.2). Returns the :class:`SpielModel`; its ``spiel_config`` has
    ``num_deltas`` filled in.

    Raises:
        TypeError: ``config`` is not a :class:`SpielConfig`.
        ValueError: targets match nothing (naming ``target_modules``), a budget gives some module
            k = 0 or k > its size (naming the module), or the model already holds SpIEL layers.
    """
    if not isinstance(config, SpielConfig):
        raise TypeError(f"config: expected a SpielConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch nn.Module, got {type(model).__name__}")
    final_config = _inject(model, config)
    return SpielModel(model, final_config)


class SpielModel(nn.Module):
    """A transformers model with SpIEL sparse deltas inside (built by :func:`get_spiel_model` or
    :meth:`from_pretrained`). ``forward``/``generate`` and unknown attributes (``config``, ``device``,
    ``dtype``, ``tie_weights``, ``name_or_path``, ...) go to the wrapped model, ``base_model``.

    Attributes:
        base_model: the wrapped transformers model (holding the SparseDeltaLinear layers).
        spiel_config: the :class:`SpielConfig` with ``num_deltas``.
    """

    # transformers' Trainer refuses to train a quantized model "without adapters" unless this flag is set
    # (``trainer_utils.validate_quantization_for_training``); the sparse deltas are the trainable adapter
    # here (qSpIEL), so a stock ``Trainer`` accepts an NF4 SpielModel. Set on this wrapper only: the
    # wrapped transformers model keeps its own (False) flag for its save/checkpointing logic.
    _hf_peft_config_loaded = True

    def __init__(self, model: nn.Module, config: SpielConfig):
        super().__init__()
        self.base_model = model
        self.spiel_config = config
        self._unloaded = False

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # ------------------------------------------------------------------------------- delegation
    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, **kwargs):
        """The wrapped model's forward (arguments passed by keyword; ``None`` ones are left out)."""
        self._check_usable()
        named = dict(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, labels=labels)
        kwargs.update({k: v for k, v in named.items() if v is not None})
        return self.base_model(**kwargs)

    def generate(self, *args, **kwargs):
        """The wrapped model's ``generate`` (the sparse deltas apply unless disabled)."""
        self._check_usable()
        return self.base_model.generate(*args, **kwargs)

    def get_base_model(self) -> nn.Module:
        """The wrapped transformers model (with the SparseDeltaLinear layers inside, as peft does)."""
        return self.base_model

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: Optional[dict] = None, **kwargs) -> None:
        """Turn on the wrapped model's gradient checkpointing (non-re-entrant by default, as peft does) and
        make the input embeddings' output require grad so checkpointed blocks get gradients."""
        kw = {"use_reentrant": False} if gradient_checkpointing_kwargs is None else dict(gradient_checkpointing_kwargs)
        base = self.base_model
        if hasattr(base, "activation_checkpointing_enable"):
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=kw, **kwargs)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw, **kwargs)
        if hasattr(base, "enable_input_require_grads"):
            base.enable_input_require_grads()

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: Optional[dict] = None,
                                        **kwargs) -> None:
        """transformers v5 name of :meth:`gradient_checkpointing_enable` (what ``Trainer`` calls)."""
        self.gradient_checkpointing_enable(activation_checkpointing_kwargs, **kwargs)

    # ----------------------------------------------------------------------------------- layers
    def sparse_layers(self) -> list[tuple[str, SparseDeltaLinear]]:
        """``[(qualified name in the wrapped model, layer)]`` for every SparseDeltaLinear, in module order."""
        return [(name, m) for name, m in self.base_model.named_modules() if isinstance(m, SparseDeltaLinear)]

    @property
    def num_deltas(self) -> dict[str, int]:
        """``{module name: k}``."""
        return {name: layer.k for name, layer in self.sparse_layers()}

    def num_trainable_parameters(self) -> int:
        """Number of parameters with ``requires_grad`` (Σ k over the layers after :func:`get_spiel_model`)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def num_total_parameters(self) -> int:
        """All parameters: the base model's (4-bit weights at their original shape) plus the deltas."""
        return count_parameters(self)

    def print_trainable_parameters(self) -> None:
        """Print ``trainable params: N || all params: M || trainable%: P`` (as peft does)."""
        trainable = self.num_trainable_parameters()
        total = self.num_total_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / max(total, 1):.4f}")

    # ------------------------------------------------------------------------ adapter switches
    def merge_adapter(self) -> None:
        """Add Δ into every base weight in place (fp32 sum, cast to the weight dtype; exact undo kept).

        Raises ValueError for 4-bit bases (evaluate those unmerged)."""
        self._check_usable()
        for _, layer in self.sparse_layers():
            if layer.is_4bit:
                raise ValueError("merge_adapter: the model has 4-bit (NF4/FP4) base weights; "
                                 "re-quantisation is lossy, evaluate 4-bit runs unmerged")
        for _, layer in self.sparse_layers():
            layer.merge()

    def unmerge_adapter(self) -> None:
        """Restore every base weight exactly as before :meth:`merge_adapter`."""
        self._check_usable()
        for _, layer in self.sparse_layers():
            layer.unmerge()

    def disable_adapter_layers(self) -> None:
        """Forward through the base weights only (unmerging first where merged)."""
        for _, layer in self.sparse_layers():
            layer.unmerge()
            layer.disabled = True

    def enable_adapter_layers(self) -> None:
        """Undo :meth:`disable_adapter_layers`."""
        for _, layer in self.sparse_layers():
            layer.disabled = False

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Context manager: inside, the model computes with its base weights only; on exit the previous
        state (enabled/disabled, merged/unmerged per layer) is restored."""
        self._check_usable()
        state = [(layer, layer.merged, layer.disabled) for _, layer in self.sparse_layers()]
        try:
            for layer, _, _ in state:
                layer.unmerge()
                layer.disabled = True
            yield
        finally:
            for layer, merged, disabled in state:
                layer.disabled = disabled
                if merged:
                    layer.merge()

    def merge_and_unload(self) -> nn.Module:
        """Merge Δ into the base weights (fp32 sum, cast to the weight dtype; spec §7) and put the
        original ``nn.Linear`` modules back. Returns the plain transformers model; this SpielModel is
        unusable afterwards.

        Raises ValueError for 4-bit bases (before changing anything)."""
        self._check_usable()
        layers = self.sparse_layers()
        for name, layer in layers:
            if layer.is_4bit:
                raise ValueError(f"merge_and_unload: module {name!r} has a 4-bit base weight; re-quantisation is "
                                 "lossy, evaluate 4-bit runs unmerged")
        for name, layer in layers:
            if layer.merged:
                layer._merge_backup = None  # keep the merged weight
            else:
                layer.merge(keep_backup=False)
            _replace_submodule(self.base_model, name, layer.base_layer)
        self._unloaded = True
        return self.base_model

    def _check_usable(self) -> None:
        if self._unloaded:
            raise RuntimeError("this SpielModel was merged and unloaded; use the model merge_and_unload() returned")

    # ------------------------------------------------------------------------------ save/load
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """``{"<module>.indices": [k] int, "<module>.values": [k] delta dtype}`` (CPU, contiguous copies)."""
        state = {}
        for name, layer in self.sparse_layers():
            state[f"{name}.indices"] = layer.indices.detach().to("cpu", copy=True).contiguous()
            state[f"{name}.values"] = layer.values.detach().to("cpu", copy=True).contiguous()
        return state

    def save_pretrained(self, save_directory: Union[str, os.PathLike], is_main_process: bool = True) -> None:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``save_directory`` (created
        if needed), each atomically. Only the main process writes (``is_main_process``)."""
        from safetensors.torch import save as safetensors_save

        self._check_usable()
        if not is_main_process:
            return
        directory = Path(save_directory)
        if directory.exists() and not directory.is_dir():
            raise ValueError(f"save_directory: {directory} exists and is not a directory")
        directory.mkdir(parents=True, exist_ok=True)
        layers = self.sparse_layers()
        config = self.spiel_config.replace(num_deltas={name: layer.k for name, layer in layers})
        shapes = {name: [layer.out_features, layer.in_features] for name, layer in layers}
        payload = safetensors_save(self.adapter_state_dict(),
                                   metadata={"format": "pt", _SHAPES_METADATA_KEY: json.dumps(shapes)})
        _atomic_write_bytes(directory / WEIGHTS_NAME, payload)
        _atomic_write_bytes(directory / CONFIG_NAME, config.to_json_string().encode("utf-8"))

    @torch.no_grad()
    def load_adapter(self, adapter_directory: Union[str, os.PathLike]) -> None:
        """Load the indices and deltas saved by :meth:`save_pretrained` into this model in place: the same
        ``values`` Parameters and ``indices`` buffers are overwritten (an optimizer built on them stays
        valid; ``requires_grad`` is unchanged), e.g. to resume a run or restore the best checkpoint.

        Everything is checked before anything is written: the saved tensor names must be exactly this
        model's ``<module>.indices``/``<module>.values``, each of the model's length ``k``; weight shapes
        recorded in the file must match; indices must be distinct and in range.

        Raises:
            FileNotFoundError: ``<adapter_directory>/adapter_model.safetensors`` is missing.
            ValueError: (naming the file and tensor) a tensor missing, unexpected, of the wrong shape,
                or indices out of range / repeated; or a layer is merged (unmerge first).
        """
        self._check_usable()
        path = Path(adapter_directory) / WEIGHTS_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no {WEIGHTS_NAME} (not a saved SpIEL adapter directory)")
        layers = self.sparse_layers()
        expected = {f"{name}.{part}": getattr(layer, part) for name, layer in layers for part in ("indices", "values")}
        with _open_safetensors(path) as handle:
            metadata = handle.metadata() or {}
            keys = set(handle.keys())
            missing, extra = sorted(set(expected) - keys), sorted(keys - set(expected))
            if missing or extra:
                raise ValueError(f"{path}: adapter does not match the model: missing {missing[:3]}, "
                                 f"unexpected {extra[:3]}")
            saved = {key: handle.get_tensor(key) for key in expected}
        shapes = json.loads(metadata[_SHAPES_METADATA_KEY]) if _SHAPES_METADATA_KEY in metadata else {}
        for name, layer in layers:
            if layer.merged:
                raise ValueError(f"{path}: cannot load into merged layer {name!r}; unmerge first")
            shape = shapes.get(name)
            if shape is not None and list(shape) != [layer.out_features, layer.in_features]:
                raise ValueError(f"{path}: {name!r} was saved for a weight of shape {list(shape)}, the model has "
                                 f"{[layer.out_features, layer.in_features]}")
            for part in ("indices", "values"):
                key = f"{name}.{part}"
                if saved[key].shape != expected[key].shape:
                    raise ValueError(f"{path}: {key!r} has shape {list(saved[key].shape)}, the model has "
                                     f"{list(expected[key].shape)}")
            indices = saved[f"{name}.indices"]
            if indices.dtype.is_floating_point or (indices.numel() and (
                    int(indices.min()) < 0 or int(indices.max()) >= layer.dense_numel)):
                raise ValueError(f"{path}: '{name}.indices' must be integers in [0, {layer.dense_numel})")
            if torch.unique(indices).numel() != indices.numel():
                raise ValueError(f"{path}: '{name}.indices' are not distinct")
        for name, layer in layers:
            layer.indices.copy_(saved[f"{name}.indices"])  # in place: the layer's CSR cache sees the new version
            layer.values.copy_(saved[f"{name}.values"])

    @classmethod
    def from_pretrained(cls, model: nn.Module, adapter_directory: Union[str, os.PathLike],
                        is_trainable: bool = False) -> "SpielModel":
        """Load a saved adapter onto ``model`` (the same base model it was trained on, modified in place).

        ``is_trainable=False`` (as in peft) leaves the deltas frozen for inference; pass True to continue
        training.

        Raises:
            FileNotFoundError: ``adapter_config.json`` or ``adapter_model.safetensors`` is missing.
            ValueError: the config is invalid, or the saved modules/shapes/index counts do not match the
                model (naming the module), or saved tensors are missing or malformed.
        """
        directory = Path(adapter_directory)
        config = SpielConfig.from_pretrained(directory)
        weights_path = directory / WEIGHTS_NAME
        if not weights_path.is_file():
            raise FileNotFoundError(f"{weights_path}: no {WEIGHTS_NAME} (not a saved SpIEL adapter directory)")
        if config.num_deltas is None:
            raise ValueError(f"{directory / CONFIG_NAME}: num_deltas is missing; cannot rebuild the adapter")
        tensors: dict[str, torch.Tensor] = {}
        with _open_safetensors(weights_path) as handle:
            metadata = handle.metadata() or {}
            keys = set(handle.keys())
            for name, k in config.num_deltas.items():
                for part in ("indices", "values"):
                    key = f"{name}.{part}"
                    if key not in keys:
                        raise ValueError(f"{weights_path}: tensor {key!r} is missing")
                    tensor = handle.get_tensor(key)
                    if tensor.dim() != 1 or tensor.numel() != k:
                        raise ValueError(f"{weights_path}: {key!r} has shape {list(tensor.shape)}, expected [{k}] "
                                         f"(num_deltas[{name!r}])")
                    tensors[key] = tensor
            extra = sorted(keys - set(tensors))
            if extra:
                raise ValueError(f"{weights_path}: unexpected tensors {extra[:5]} not listed in num_deltas")
        shapes = json.loads(metadata[_SHAPES_METADATA_KEY]) if _SHAPES_METADATA_KEY in metadata else {}
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch nn.Module, got {type(model).__name__}")
        # check shapes before touching the model
        for name, module in find_target_modules(model, config.target_modules):
            expected = shapes.get(name)
            actual = [int(module.out_features), int(module.in_features)]
            if expected is not None and list(expected) != actual:
                raise ValueError(f"module {name!r}: the adapter was saved for a weight of shape {expected}, "
                                 f"the model has {actual}")
        indices = {name: tensors[f"{name}.indices"] for name in config.num_deltas}
        final_config = _inject(model, config, indices=indices)
        spiel_model = cls(model, final_config)
        with torch.no_grad():
            for name, layer in spiel_model.sparse_layers():
                layer.values.copy_(tensors[f"{name}.values"].to(layer.values.dtype))
                layer.values.requires_grad_(is_trainable)
        return spiel_model
