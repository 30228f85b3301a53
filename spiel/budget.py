"""Trainable-parameter budgets and their allocation over weight matrices (docs/METHOD.md §2.1, §2.2).

* :func:`count_parameters` counts all model parameters as the reference does (4-bit weights at their
  original ``out x in`` shape, not their packed uint8 storage).
* :func:`find_target_modules` picks the linear layers to tune.
* :func:`lora_equivalent_budget` is LoRA's trainable count at rank r, ``r * Σ(in + out)``, so SpIEL and
  LoRA can be compared at exactly equal trainable parameters (the sft-llm runs do this, docs/METHOD.md §2.2).
* :func:`allocate` gives each matrix ``k_m = floor(N * numel_m / Σ numel)`` (uniform density over
  the targeted matrices; computed in exact integer arithmetic).
"""
from __future__ import annotations

import math
import re
from typing import Iterable, Optional, Sequence, Union

from torch import nn

from .config import SpielConfig
from .layer import SparseDeltaLinear, is_linear4bit

__all__ = [
    "count_parameters",
    "parameter_numel",
    "find_target_modules",
    "lora_equivalent_budget",
    "resolve_budget",
    "allocate",
    "compute_num_deltas",
]


def parameter_numel(param) -> int:
    """The logical element count of one parameter: ``prod(quant_state.shape)`` for a quantised bitsandbytes
    ``Params4bit`` (which stores packed uint8, two 4-bit values per byte), else ``param.numel()``."""
    quant_state = getattr(param, "quant_state", None)
    shape = getattr(quant_state, "shape", None)
    if shape is not None:
        return int(math.prod(shape))
    return int(param.numel())


def count_parameters(model: nn.Module) -> int:
    """Σ numel over ALL parameters of ``model`` (shared/tied parameters once; embeddings and ``lm_head``
    included; 4-bit weights at their original shape), the reference's ``total_params`` (docs/METHOD.md §2.2)."""
    return sum(parameter_numel(p) for p in model.parameters())


def _is_target_type(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_linear4bit(module)


def _matches(name: str, target_modules: Union[Sequence[str], str]) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def find_target_modules(model: nn.Module, target_modules: Optional[Union[Sequence[str], str]] = None
                        ) -> list[tuple[str, nn.Module]]:
    """The modules to wrap, as ``[(qualified name, module)]`` in ``named_modules()`` order (docs/METHOD.md §2.1).

    ``None``: every ``nn.Linear``/``Linear4bit`` whose name starts with ``model.base_model_prefix`` (all
    linear layers when the model has no prefix), which for LLaMA is the 7 projections per block and never
    ``lm_head``. A list: names equal to an entry or ending in ``.<entry>``. A string: a regex that must
    match the whole qualified name.

    Raises:
        ValueError: nothing matched (naming ``target_modules``); a matched module is not a linear layer;
            the model already holds SpIEL layers.
    """
    if any(isinstance(m, SparseDeltaLinear) for m in model.modules()):
        raise ValueError("model already contains SparseDeltaLinear layers (SpIEL was applied twice?)")
    found = []
    if target_modules is None:
        prefix = getattr(model, "base_model_prefix", "") or ""
        for name, module in model.named_modules():
            if _is_target_type(module) and (not prefix or name == prefix or name.startswith(prefix + ".")):
                found.append((name, module))
        if not found:
            raise ValueError(f"target_modules=None: the model has no nn.Linear/Linear4bit layer under its "
                             f"base_model_prefix {prefix!r}; pass target_modules explicitly")
        return found
    for name, module in model.named_modules():
        if name and _matches(name, target_modules):
            if not _is_target_type(module):
                raise ValueError(f"target_modules={target_modules!r} matched {name!r}, a "
                                 f"{type(module).__name__}; only nn.Linear and bitsandbytes Linear4bit are supported")
            found.append((name, module))
    if not found:
        raise ValueError(f"target_modules={target_modules!r} matched no module of the model "
                         f"(e.g. {[n for n, m in model.named_modules() if _is_target_type(m)][:3]})")
    return found


def _shape(module: nn.Module) -> tuple[int, int]:
    return int(module.out_features), int(module.in_features)


def lora_equivalent_budget(modules: Iterable[tuple[str, nn.Module]], rank: int) -> int:
    """``rank * Σ(in_features + out_features)`` over ``modules``: LoRA's trainable-parameter count at ``rank``
    (A is ``[r, in]``, B is ``[out, r]``; no bias) on the same modules.

    Raises ValueError if ``rank < 1``."""
    if rank < 1:
        raise ValueError(f"lora_rank_equivalent: expected an integer >= 1, got {rank}")
    return rank * sum(sum(_shape(m)) for _, m in modules)


def resolve_budget(model: nn.Module, config: SpielConfig, modules: Sequence[tuple[str, nn.Module]]) -> int:
    """The total trainable count N from the config's budget (docs/METHOD.md §2.2): ``int(count_parameters(model) *
    density)``, ``num_tunable_weights``, or :func:`lora_equivalent_budget` at ``lora_rank_equivalent``.
    ``model`` must not be wrapped yet (its parameter count is the base model's).

    Raises ValueError if the config has no budget field set (a config carrying only ``num_deltas``)."""
    if config.density is not None:
        return int(count_parameters(model) * config.density)
    if config.num_tunable_weights is not None:
        return int(config.num_tunable_weights)
    if config.lora_rank_equivalent is not None:
        return lora_equivalent_budget(modules, config.lora_rank_equivalent)
    raise ValueError("density/num_tunable_weights/lora_rank_equivalent: no budget set to allocate from")


def allocate(total: int, sizes: dict[str, int]) -> dict[str, int]:
    """Per-matrix counts ``k_m = floor(total * numel_m / Σ numel)`` (docs/METHOD.md §2.2), in exact integer arithmetic.

    ``sizes`` maps module name -> ``numel_m`` (``out * in``). The sum of the k_m may fall short of
    ``total`` by less than ``len(sizes)`` (flooring, as in the reference).

    Raises ValueError naming the module if some ``k_m`` would be 0 (budget too small) or exceed
    ``numel_m`` (budget larger than the targeted weights)."""
    if total < 1:
        raise ValueError(f"budget: expected at least 1 trainable parameter, got {total}")
    if not sizes:
        raise ValueError("allocate: no target modules")
    denominator = sum(sizes.values())
    counts = {}
    for name, numel in sizes.items():
        k = total * numel // denominator
        if k < 1:
            raise ValueError(f"budget of {total} trainable parameters gives module {name!r} ({numel} weights) "
                             f"k = 0; raise the budget or narrow target_modules")
        if k > numel:
            raise ValueError(f"budget of {total} trainable parameters gives module {name!r} k = {k} > its "
                             f"{numel} weights; the budget exceeds the targeted matrices ({denominator})")
        counts[name] = k
    return counts


def compute_num_deltas(model: nn.Module, config: SpielConfig,
                       modules: Optional[Sequence[tuple[str, nn.Module]]] = None) -> dict[str, int]:
    """``{module name: k_m}`` for ``config`` on an unwrapped ``model``: find the targets
    (:func:`find_target_modules`), resolve N (:func:`resolve_budget`) and :func:`allocate` it.

    Raises ValueError as those functions do."""
    if modules is None:
        modules = find_target_modules(model, config.target_modules)
    total = resolve_budget(model, config, modules)
    sizes = {name: math.prod(_shape(m)) for name, m in modules}
    return allocate(total, sizes)
