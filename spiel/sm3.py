"""SM3 for sparse deltas: one fp32 accumulator per row and per column of each weight matrix (SpIEL-MA,
docs/METHOD.md §5.1); the MA growth rule scores inactive positions by ``row[i] * col[j]`` (§5.2)."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch.optim import Optimizer

from .sparse_state import (SparseDeltaLike, _apply_update, _check_hyper, _closure_loss, _dense_grad, _FP32StateMixin,
                           _Scratch)

__all__ = ["SM3"]

_EXACT_FP64_INDEX = 1 << 48  # flat indices below this divide exactly (after floor) in fp64


class SM3(_FP32StateMixin, Optimizer):
    """SM3 for sparse deltas with a row and a column accumulator (docs/METHOD.md §5.1).

    For each values parameter ``Δ`` (shape ``[k]``) of a sparse-delta layer with weight shape
    ``[out_features, in_features]`` and active positions ``(i, j)`` (from ``layer.indices``), state:
    ``row_accumulator`` fp32 ``[out_features]`` (the reference's ``accumulator_0``),
    ``col_accumulator`` fp32 ``[in_features]`` (``accumulator_1``), both zero-initialised; ``step``
    (update count); ``momentum_buffer`` fp32 ``[k]`` only when ``momentum > 0``. One step:

    1. ``ν = min(row[i], col[j]) + g²`` per active entry (``row[i] + g²`` with ``row_cover_only``)
    2. ``row[i] = max(row[i], max of ν over the active entries of row i)`` and likewise ``col[j]``
       (scatter "amax", including the old value)
    3. ``u = g / sqrt(ν + eps)``; with momentum μ > 0: ``u = (1−μ)·u + μ·u_prev`` (kept as the buffer)
    4. ``Δ -= lr · u``, then decoupled weight decay ``Δ += −lr·wd·Δ``

    The accumulators never decay (no β / EMA), as in the reference.

    Args:
        params: parameters or parameter groups; every parameter must be the ``values`` of one of
            ``sparse_layers``.
        sparse_layers: the layers that own the parameters (objects with ``values``, ``indices``,
            ``in_features``, ``out_features``; see :class:`SparseDeltaLike`). The layer's current
            ``indices`` are read at every step, so reselections need no notification.
        lr: learning rate (reference default 0.1).
        momentum: μ in [0, 1) (default 0, as in the reference runs).
        eps: inside the square root (default 1e-8).
        weight_decay: decoupled weight decay.
        row_cover_only: use the row accumulator only.

    Raises:
        ValueError: a parameter without a layer in ``sparse_layers``; a hyper-parameter out of range;
            ``load_state_dict`` of a SparseAdamW state.
    """

    _KIND = ("SM3 (SpIEL-MA)", frozenset({"row_accumulator", "col_accumulator", "momentum_buffer"}))

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        sparse_layers: Iterable[SparseDeltaLike] | Mapping[torch.Tensor, SparseDeltaLike],
        lr: float = 0.1,
        momentum: float = 0.0,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        row_cover_only: bool = False,
    ) -> None:
        _check_hyper(lr, eps, weight_decay)
        if not (0.0 <= momentum < 1.0):
            raise ValueError(f"momentum: expected a number in [0, 1), got {momentum!r}")
        super().__init__(
            params, dict(lr=lr, momentum=momentum, eps=eps, weight_decay=weight_decay, row_cover_only=row_cover_only)
        )
        self._scratch = _Scratch()
        layers = list(sparse_layers.values()) if isinstance(sparse_layers, Mapping) else list(sparse_layers)
        self._layer_of: dict[int, SparseDeltaLike] = {id(layer.values): layer for layer in layers}
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) not in self._layer_of:
                    raise ValueError(
                        f"sparse_layers: SM3 parameter of shape {tuple(p.shape)} is not the values of any "
                        "given sparse-delta layer (SM3 here supports sparse deltas only)"
                    )

    def layer_of(self, p: torch.Tensor) -> SparseDeltaLike:
        """The sparse-delta layer whose ``values`` is ``p``. Raises ValueError if there is none."""
        try:
            return self._layer_of[id(p)]
        except KeyError:
            raise ValueError(f"parameter of shape {tuple(p.shape)} is not managed by this SM3") from None

    def state_for(self, p: torch.Tensor) -> dict[str, Any]:
        """The state of ``p`` (``row_accumulator`` [out], ``col_accumulator`` [in], fp32; ``step``;
        ``momentum_buffer`` [k] when momentum > 0), created zero-initialised if absent."""
        state = self.state[p]
        if not state:
            layer = self.layer_of(p)
            state["step"] = 0
            state["row_accumulator"] = torch.zeros(layer.out_features, dtype=torch.float32, device=p.device)
            state["col_accumulator"] = torch.zeros(layer.in_features, dtype=torch.float32, device=p.device)
        return state

    def accumulators(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(row_accumulator [out_features], col_accumulator [in_features])`` of ``p``, fp32."""
        state = self.state_for(p)
        return state["row_accumulator"], state["col_accumulator"]

    @torch.no_grad()
    def reset_entries(self, p: torch.Tensor, slots: torch.Tensor) -> None:
        """Zero the momentum buffer at ``slots`` (int64 ``[n]``) after a reselection.

        The row/column accumulators are per row/column, not per entry, and stay untouched
        (docs/METHOD.md §3.2, §5.2). The reference has no momentum in its runs; a stale per-slot
        momentum would belong to the position that was dropped, so it is cleared here.
        """
        self.layer_of(p)
        buf = self.state[p].get("momentum_buffer")
        if buf is not None:
            buf[slots] = 0.0

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 (documented on the class)
        loss = _closure_loss(closure)
        for group in self.param_groups:
            lr, eps, wd, mu = group["lr"], group["eps"], group["weight_decay"], group["momentum"]
            row_only = group["row_cover_only"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = _dense_grad(p, "SM3").float().reshape(-1)
                layer = self.layer_of(p)
                state = self.state_for(p)
                n = g.numel()
                scratch = self._scratch
                idx = scratch.get("idx", n, g, torch.int64).copy_(layer.indices.view(-1))
                rows = scratch.get("rows", n, g, torch.int64)
                if layer.out_features * layer.in_features < _EXACT_FP64_INDEX:
                    # row = floor(idx / in) in fp64 (vectorised; exact for idx < 2**48), cheaper than
                    # torch's int64 division
                    quotient = scratch.get("quotient", n, g, torch.float64).copy_(idx)
                    rows.copy_(quotient.div_(layer.in_features).floor_())
                else:
                    torch.div(idx, layer.in_features, rounding_mode="floor", out=rows)
                row_acc, col_acc = state["row_accumulator"], state["col_accumulator"]
                nu = torch.index_select(row_acc, 0, rows, out=scratch.get("nu", n, g, torch.float32))
                if not row_only:
                    cols = idx.sub_(rows, alpha=layer.in_features)
                    col_vals = torch.index_select(col_acc, 0, cols, out=scratch.get("tmp", n, g, torch.float32))
                    torch.minimum(nu, col_vals, out=nu)
                nu.addcmul_(g, g)
                if not row_only:
                    col_acc.scatter_reduce_(0, cols, nu, reduce="amax", include_self=True)
                row_acc.scatter_reduce_(0, rows, nu, reduce="amax", include_self=True)
                update = torch.div(g, nu.add_(eps).sqrt_(), out=scratch.get("tmp", n, g, torch.float32))
                if mu > 0.0:
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = torch.zeros(n, dtype=torch.float32, device=g.device)
                    update.mul_(1.0 - mu).add_(buf, alpha=mu)
                    buf.copy_(update)
                _apply_update(p, update, lr, wd)
                state["step"] += 1
        return loss

