"""Optimizers for sparse deltas: AdamW with per-entry state and SM3 with row/column accumulators.

The optimizers live in :mod:`spiel.adamw` and :mod:`spiel.sm3` (their shared machinery in
:mod:`spiel.sparse_state`); this module picks one for a model and clears per-entry state after a
reselection, for any optimizer.

Both optimizers keep state only for the *active* entries of each sparse delta (the ``values`` of a
:class:`spiel.layer.SparseDeltaLinear`), never for the dense weight matrix:

- :class:`SparseAdamW` (SpIEL-AG, docs/METHOD.md §3.3): per-entry ``age`` (bias-correction counter),
  ``exp_avg`` and ``exp_avg_sq``, all fp32 tensors of shape ``[k]``. Because every entry carries its
  own age, entries grown by a reselection can be given a fresh (or seeded, §4.3) state while the
  rest keep theirs.
- :class:`SM3` (SpIEL-MA, docs/METHOD.md §5.1): one fp32 accumulator per row ``[out_features]`` and
  one per column ``[in_features]`` of the weight matrix; the MA growth rule scores inactive positions
  by ``row[i] * col[j]`` (§5.2).

:func:`build_optimizer` picks the optimizer from the model's ``SpielConfig.selection_algorithm``.
All arithmetic is vectorised over the entries of a tensor; Python loops run over tensors only.
Parameters stored in bf16 (``delta_dtype="bfloat16"``) are updated in fp32 and written back.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.optim import Optimizer

from .adamw import SparseAdamW
from .sm3 import SM3
from .sparse_state import SparseDeltaLike

__all__ = ["SparseAdamW", "SM3", "build_optimizer", "reset_optimizer_entries", "SparseDeltaLike"]

_AG_NAMES = ("ag", "rigl")
_MA_NAMES = ("ma", "sm3")


def reset_optimizer_entries(optimizer: Optimizer, p: torch.Tensor, slots: torch.Tensor) -> None:
    """Clear the per-entry optimizer state of ``p[slots]`` after a reselection, for any optimizer.

    Uses ``optimizer.reset_entries`` when it exists (:class:`SparseAdamW`, :class:`SM3`); otherwise
    zeroes every state tensor with the shape of ``p`` at ``slots`` (e.g. ``torch.optim.AdamW``'s
    moments; its shared ``step`` counter cannot be reset per entry). ``slots``: int64 ``[n]``.
    """
    reset = getattr(optimizer, "reset_entries", None)
    if callable(reset):
        reset(p, slots)
        return
    for value in optimizer.state.get(p, {}).values():
        if isinstance(value, torch.Tensor) and value.shape == p.shape:
            value[slots] = 0


def _algorithm_of(model: Any) -> str:
    cfg = getattr(model, "spiel_config", None)
    if cfg is None:
        cfg = getattr(model, "config", None)
    algo = getattr(cfg, "selection_algorithm", None)
    if algo is None:
        raise ValueError("model: expected a SpielModel with a SpielConfig (selection_algorithm not found)")
    return str(algo).lower()


def build_optimizer(
    model: Any,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    momentum: float = 0.0,
    row_cover_only: bool = False,
    algorithm: str | None = None,
) -> Optimizer:
    """The optimizer SpIEL uses for ``model``: :class:`SparseAdamW` for SpIEL-AG, :class:`SM3` for MA.

    The choice follows ``model.spiel_config.selection_algorithm`` ("ag"/"rigl" → SparseAdamW,
    "ma"/"sm3" → SM3; docs/METHOD.md §8.3) unless ``algorithm`` overrides it. All trainable ``values``
    of ``model.sparse_layers()`` are optimised; under SparseAdamW any other trainable parameter
    (for instance a classifier head) joins with the same settings.

    Args:
        model: a ``spiel.SpielModel`` (needs ``sparse_layers()`` and ``spiel_config``) or a
            data-parallel wrapper of one.
        lr: learning rate. weight_decay: decoupled weight decay (on Δ, i.e. toward W0).
        betas: AdamW betas (ignored by SM3). eps: AdamW/SM3 epsilon (default 1e-8).
        momentum, row_cover_only: SM3 options (ignored by AdamW).
        algorithm: "ag"/"rigl"/"ma"/"sm3" to override the config.

    Raises:
        ValueError: unknown algorithm; no trainable sparse deltas; SM3 asked to optimise a
            parameter that is not a sparse delta.
    """
    from spiel.model import unwrap_spiel_model

    model = unwrap_spiel_model(model)
    algo = (algorithm or _algorithm_of(model)).lower()
    layers = [layer for _, layer in model.sparse_layers()]
    values = [layer.values for layer in layers if layer.values.requires_grad]
    if not values:
        hint = (" (loaded with SpielModel.from_pretrained: pass is_trainable=True to train it)"
                if getattr(model, "inference_mode", False) else "")
        raise ValueError(f"model: no trainable sparse deltas (every SparseDeltaLinear.values is frozen){hint}")
    value_ids = {id(v) for v in values}
    others = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in value_ids]
    if algo in _AG_NAMES:
        return SparseAdamW(values + [p for _, p in others], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if algo in _MA_NAMES:
        if others:
            raise ValueError(
                f"model: SM3 (selection_algorithm={algo!r}) supports sparse deltas only, but "
                f"{others[0][0]!r} is also trainable"
            )
        return SM3(
            values, sparse_layers=layers, lr=lr, momentum=momentum, eps=eps,
            weight_decay=weight_decay, row_cover_only=row_cover_only,
        )
    raise ValueError(f"selection_algorithm: expected one of 'ag', 'rigl', 'ma', 'sm3', got {algo!r}")
