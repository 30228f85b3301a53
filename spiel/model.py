"""Wrap a transformers model with SpIEL sparse deltas; save, load, merge (docs/METHOD.md §2, §7).

:func:`get_spiel_model` freezes every base parameter and replaces each targeted linear layer with a
:class:`~spiel.layer.SparseDeltaLinear`. The returned :class:`SpielModel` is an ``nn.Module`` whose
``forward``/``generate``/``config`` (and any other attribute it lacks) delegate to the wrapped model, so
Hugging Face ``Trainer``, ``generate`` and lm-eval's ``HFLM(pretrained=model)`` accept it. Where peft
has the same concept the name and behaviour are peft's (``save_pretrained``, ``from_pretrained(...,
is_trainable=)``, ``merge_and_unload(safe_merge=)``, ``unload``, ``get_nb_trainable_parameters``,
``peft_config``, ``active_adapters``); peft options spiel has no counterpart for are refused with a
message that names the alternative.

``state_dict()`` holds the adapter only (``<module>.indices``/``<module>.values``): the base is frozen
and comes from the base model, so a stock ``Trainer`` checkpoint is the adapter, not a copy of the base
(and tied embeddings are no problem). The folder layout of ``save_pretrained`` and its checks are in
:mod:`spiel.adapter_io`.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Union

import torch
from torch import nn

from .adapter_io import WEIGHTS_NAME, base_record, check_tensors, check_wrappable, read_adapter_tensors, write_adapter
from .adapter_io import check_base as _check_recorded_base
from .budget import compute_num_deltas, count_parameters, find_target_modules
from .config import CONFIG_NAME, SpielConfig
from .layer import SparseDeltaLinear, fusable_weight

__all__ = ["SpielModel", "get_spiel_model", "WEIGHTS_NAME", "ADAPTER_NAME"]

#: The one adapter name a SpielModel has (peft's default name).
ADAPTER_NAME = "default"


def _replace_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _inject(model: nn.Module, config: SpielConfig,
            indices: Optional[dict[str, torch.Tensor]] = None) -> SpielConfig:
    """Freeze ``model`` and replace its targets in place; returns the config with ``num_deltas`` set.

    With ``indices`` (loading), each layer takes its saved index set instead of a random one."""
    modules = find_target_modules(model, config.target_modules)
    for name, module in modules:
        check_wrappable(name, module)
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
    record = base_record(model, modules)
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
    return config.replace(num_deltas=num_deltas, base_model_name_or_path=base_name, **record)


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
    and zero deltas (docs/METHOD.md §2, §2.2). Returns the :class:`SpielModel`; its ``spiel_config`` has
    ``num_deltas`` filled in.

    Raises:
        TypeError: ``config`` is not a :class:`SpielConfig`.
        ValueError: targets match nothing (naming ``target_modules``), a budget gives some module
            k = 0 or k > its size (naming the module), the model already holds SpIEL layers, or a target
            is a layer SpIEL cannot wrap (8-bit ``Linear8bitLt``, a tensor-subclass or parametrized
            weight; :func:`spiel.adapter_io.check_wrappable`), before anything is changed.
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
        #: True after ``from_pretrained(..., is_trainable=False)`` (the deltas are frozen), as in peft.
        self.inference_mode = False

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

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: Optional[list[str]] = None) -> nn.Module:
        """Merge Δ into the base weights (fp32 sum, cast to the weight dtype; docs/METHOD.md §7) and put the
        original ``nn.Linear`` modules back. Returns the plain transformers model; this SpielModel is
        unusable afterwards. As in peft: ``safe_merge=True`` first computes every merged weight and
        checks it is finite (raising before any weight changes); ``progressbar`` is accepted and shows
        nothing (the merge is a scatter per layer); ``adapter_names`` may only name ``"default"``.

        Raises ValueError (before changing anything): a 4-bit base; ``safe_merge`` finds NaN/Inf in a
        merged weight (naming the module); ``adapter_names`` names another adapter."""
        self._check_usable()
        self._check_adapter_names(adapter_names, "merge_and_unload")
        layers = self.sparse_layers()
        for name, layer in layers:
            if layer.is_4bit:
                raise ValueError(f"merge_and_unload: module {name!r} has a 4-bit base weight; re-quantisation is "
                                 "lossy, evaluate 4-bit runs unmerged")
        if safe_merge:
            for name, layer in layers:
                weight = layer.base_layer.weight
                flat = weight.detach().reshape(-1)
                merged = flat[layer.indices].float() + (0 if layer.merged else layer.values.detach().float())
                if not bool(torch.isfinite(merged.to(weight.dtype)).all()) or not bool(torch.isfinite(flat).all()):
                    raise ValueError(f"merge_and_unload(safe_merge=True): module {name!r} would hold NaN/Inf after "
                                     "merging; nothing was merged")
        for name, layer in layers:
            if layer.merged:
                layer._merge_backup = None  # keep the merged weight
            else:
                layer.merge(keep_backup=False)
            _replace_submodule(self.base_model, name, layer.base_layer)
        self._unloaded = True
        return self.base_model

    def unload(self) -> nn.Module:
        """Put the original base modules back without merging (as peft's ``unload``): returns the base
        transformers model with its weights exactly as before wrapping. This SpielModel is unusable
        afterwards."""
        self._check_usable()
        for name, layer in self.sparse_layers():
            layer.unmerge()
            _replace_submodule(self.base_model, name, layer.base_layer)
        self._unloaded = True
        return self.base_model

    def _check_usable(self) -> None:
        if self._unloaded:
            raise RuntimeError("this SpielModel was merged and unloaded; use the model merge_and_unload() returned")

    @staticmethod
    def _check_adapter_names(names: Any, where: str) -> None:
        if names is None or names == ADAPTER_NAME or (isinstance(names, (list, tuple)) and list(names) == [ADAPTER_NAME]):
            return
        raise ValueError(f"{where}: a SpielModel holds one adapter, {ADAPTER_NAME!r}; got adapter names {names!r} "
                         "(load another SpIEL adapter onto a fresh base with SpielModel.from_pretrained)")

    # ------------------------------------------------------------------------- peft-shaped views
    @property
    def peft_config(self) -> dict[str, SpielConfig]:
        """``{"default": spiel_config}`` (peft's mapping from adapter name to config)."""
        return {ADAPTER_NAME: self.spiel_config}

    @property
    def active_adapters(self) -> list[str]:
        """``["default"]``: the one adapter, always active (use :meth:`disable_adapter` to switch it off)."""
        return [ADAPTER_NAME]

    @property
    def active_adapter(self) -> str:
        """``"default"``."""
        return ADAPTER_NAME

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable parameters, all parameters)``, as peft's method of that name."""
        return self.num_trainable_parameters(), self.num_total_parameters()

    # ------------------------------------------------------------------------------ save/load
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """``{"<module>.indices": [k] int, "<module>.values": [k] delta dtype}`` (CPU, contiguous copies)."""
        state = {}
        for name, layer in self.sparse_layers():
            state[f"{name}.indices"] = layer.indices.detach().to("cpu", copy=True).contiguous()
            state[f"{name}.values"] = layer.values.detach().to("cpu", copy=True).contiguous()
        return state

    def state_dict(self, *args: Any, destination: Optional[dict] = None, prefix: str = "",
                   keep_vars: bool = False) -> dict[str, torch.Tensor]:
        """The adapter only: ``{prefix + "<module>.indices"|"<module>.values": tensor}`` on the model's
        device (the frozen base is the base model's; ``get_base_model().state_dict()`` has it). This is
        what a stock ``Trainer`` writes into a checkpoint and reloads with :meth:`load_state_dict`."""
        if args:
            raise TypeError("SpielModel.state_dict: pass destination/prefix/keep_vars by keyword")
        out: dict[str, torch.Tensor] = destination if destination is not None else {}
        for name, layer in self.sparse_layers():
            for part in ("indices", "values"):
                tensor = getattr(layer, part)
                out[f"{prefix}{name}.{part}"] = tensor if keep_vars else tensor.detach()
        return out

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True, assign: bool = False):
        """Load :meth:`state_dict` output in place (the checks of :meth:`load_adapter`; ``strict`` is
        implied: the keys must be exactly this adapter's). Returns torch's ``(missing_keys,
        unexpected_keys)`` named tuple, both empty.

        Raises ValueError as :meth:`load_adapter` (naming the tensor); ``assign=True`` is refused."""
        from torch.nn.modules.module import _IncompatibleKeys

        if assign:
            raise ValueError("SpielModel.load_state_dict: assign=True is not supported (the deltas are loaded in place)")
        self._load_tensors(dict(state_dict), "state_dict", shapes={})
        return _IncompatibleKeys([], [])

    def save_pretrained(self, save_directory: Union[str, os.PathLike], is_main_process: bool = True,
                        safe_serialization: bool = True, selected_adapters: Optional[list[str]] = None,
                        state_dict: Optional[dict] = None, **kwargs: Any) -> None:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``save_directory`` (created
        if needed), each atomically (:func:`spiel.adapter_io.write_adapter`). Only the main process writes
        (``is_main_process``). peft's keywords: ``safe_serialization`` must stay True (safetensors
        only); ``selected_adapters`` may only name ``"default"``; ``state_dict`` is ignored (the deltas are
        read from the layers); any other keyword is refused.

        Raises:
            ValueError: ``save_directory`` is a file; placeholder parameters (ZeRO-3); an option above.
            TypeError: an unknown keyword (naming it).
        """
        self._check_usable()
        if kwargs:
            raise TypeError(f"SpielModel.save_pretrained: unsupported argument(s) {sorted(kwargs)} (spiel saves one "
                            "adapter as safetensors; peft-only options have no SpIEL counterpart)")
        if not safe_serialization:
            raise ValueError("save_pretrained(safe_serialization=False): spiel writes safetensors only; drop the "
                             "argument (load with SpielModel.from_pretrained)")
        self._check_adapter_names(selected_adapters, "save_pretrained")
        if not is_main_process:
            return
        directory = Path(save_directory)
        if directory.exists() and not directory.is_dir():
            raise ValueError(f"save_directory: {directory} exists and is not a directory")
        directory.mkdir(parents=True, exist_ok=True)
        layers = self.sparse_layers()
        config = self.spiel_config.replace(num_deltas={name: layer.k for name, layer in layers})
        write_adapter(directory, config, layers)

    @torch.no_grad()
    def _load_tensors(self, tensors: dict[str, torch.Tensor], where: str, shapes: dict) -> None:
        """Check ``tensors`` against this model's layers, then copy them in place (nothing written on error)."""
        layers = self.sparse_layers()
        check_tensors(tensors, {name: layer.k for name, layer in layers},
                       {name: layer.dense_numel for name, layer in layers}, where)
        for name, layer in layers:
            if layer.merged:
                raise ValueError(f"{where}: cannot load into merged layer {name!r}; unmerge first")
            shape = shapes.get(name)
            if shape is not None and list(shape) != [layer.out_features, layer.in_features]:
                raise ValueError(f"{where}: {name!r} was saved for a weight of shape {list(shape)}, the model has "
                                 f"{[layer.out_features, layer.in_features]}")
        for name, layer in layers:
            layer.indices.copy_(tensors[f"{name}.indices"])  # in place: the layer's CSR cache sees the new version
            layer.values.copy_(tensors[f"{name}.values"])

    def load_adapter(self, adapter_directory: Union[str, os.PathLike], adapter_name: Optional[str] = None,
                     is_trainable: Optional[bool] = None, **kwargs: Any) -> None:
        """Load the indices and deltas saved by :meth:`save_pretrained` into this model in place: the same
        ``values`` Parameters and ``indices`` buffers are overwritten (an optimizer built on them stays
        valid), e.g. to resume a run or restore the best checkpoint. ``adapter_name`` may only be
        ``"default"``; ``is_trainable`` (if given) sets ``requires_grad`` of the deltas.

        Everything is checked before anything is written (:func:`spiel.adapter_io.read_adapter_tensors`):
        the saved tensor names must be exactly this model's, each of the model's length ``k``; weight
        shapes recorded in the file must match; indices integers, distinct and in range; values floating
        point and finite.

        Raises:
            FileNotFoundError: ``<adapter_directory>/adapter_model.safetensors`` is missing.
            ValueError: (naming the file and tensor) as above; a layer is merged (unmerge first); another
                adapter name. TypeError: an unknown keyword.
        """
        self._check_usable()
        if kwargs:
            raise TypeError(f"SpielModel.load_adapter: unsupported argument(s) {sorted(kwargs)}")
        self._check_adapter_names(adapter_name, "load_adapter")
        layers = self.sparse_layers()
        tensors, shapes = read_adapter_tensors(adapter_directory, {n: layer.k for n, layer in layers},
                                               {n: layer.dense_numel for n, layer in layers},
                                               {n: [layer.out_features, layer.in_features] for n, layer in layers})
        self._load_tensors(tensors, str(Path(adapter_directory) / WEIGHTS_NAME), shapes)
        if is_trainable is not None:
            for _, layer in layers:
                layer.values.requires_grad_(bool(is_trainable))

    @classmethod
    def from_pretrained(cls, model: nn.Module, adapter_directory: Union[str, os.PathLike],
                        is_trainable: bool = False, check_base: bool = True, **kwargs: Any) -> "SpielModel":
        """Load a saved adapter onto ``model`` (the same base model it was trained on, modified in place).

        ``is_trainable=False`` (as in peft) leaves the deltas frozen for inference; pass True to continue
        training. With ``check_base`` the base the adapter records (``base_model_quantization``,
        ``base_model_dtype``) must match ``model`` (float32 accepted for any dtype;
        :func:`spiel.adapter_io.check_base`).

        Raises:
            FileNotFoundError: ``adapter_config.json`` or ``adapter_model.safetensors`` is missing.
            ValueError: the config is invalid; the base differs from the recorded one; the saved
                modules/shapes/index counts do not match the model (naming the module); saved tensors are
                missing or malformed (non-integer indices, non-float or non-finite values).
            TypeError: ``model`` is not an ``nn.Module``; an unknown keyword (peft's ``adapter_name`` may
                only be ``"default"``).
        """
        adapter_name = kwargs.pop("adapter_name", None)
        if kwargs:
            raise TypeError(f"SpielModel.from_pretrained: unsupported argument(s) {sorted(kwargs)}")
        cls._check_adapter_names(adapter_name, "from_pretrained")
        directory = Path(adapter_directory)
        config = SpielConfig.from_pretrained(directory)
        if config.num_deltas is None:
            raise ValueError(f"{directory / CONFIG_NAME}: num_deltas is missing; cannot rebuild the adapter")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch nn.Module, got {type(model).__name__}")
        modules = find_target_modules(model, config.target_modules)
        dense = {name: int(m.out_features) * int(m.in_features) for name, m in modules}
        if check_base:
            _check_recorded_base(config, base_record(model, modules), str(directory / CONFIG_NAME))
        missing = sorted(set(config.num_deltas) - set(dense))
        if missing:
            raise ValueError(f"{directory / CONFIG_NAME}: num_deltas names modules the model lacks: {missing[:5]}")
        tensors, _ = read_adapter_tensors(directory, config.num_deltas, dense,
                                          {name: [int(m.out_features), int(m.in_features)] for name, m in modules})
        indices = {name: tensors[f"{name}.indices"] for name in config.num_deltas}
        final_config = _inject(model, config, indices=indices)
        if config.base_model_dtype is not None:  # keep the record of the base it was trained over
            final_config = final_config.replace(base_model_dtype=config.base_model_dtype,
                                                base_model_quantization=config.base_model_quantization)
        spiel_model = cls(model, final_config)
        spiel_model.inference_mode = not is_trainable
        with torch.no_grad():
            for name, layer in spiel_model.sparse_layers():
                layer.values.copy_(tensors[f"{name}.values"].to(layer.values.dtype))
                layer.values.requires_grad_(is_trainable)
        return spiel_model

