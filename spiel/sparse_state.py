"""The machinery SpIEL's two optimizers share: the layer protocol, hyper-parameter checks, the fp32 update
with decoupled weight decay, reusable scratch buffers, and state that keeps its saved dtype on load.

Both optimizers (:class:`spiel.adamw.SparseAdamW`, :class:`spiel.sm3.SM3`) keep state only for the
*active* entries of each sparse delta, never for the dense weight matrix (docs/METHOD.md §3.3, §5.1).
"""
from __future__ import annotations

import math
from typing import Any, Protocol

import torch

__all__ = ["SparseDeltaLike"]


class SparseDeltaLike(Protocol):
    """What :class:`SM3` needs from a sparse-delta layer (``spiel.layer.SparseDeltaLinear`` has it).

    ``values``: Parameter ``[k]``; ``indices``: int32/int64 tensor ``[k]`` of flat row-major positions
    ``row * in_features + col`` in the ``[out_features, in_features]`` weight.
    """

    values: torch.nn.Parameter
    indices: torch.Tensor
    in_features: int
    out_features: int


def _check_hyper(lr: float, eps: float, weight_decay: float) -> None:
    if not (isinstance(lr, (int, float)) and lr >= 0.0 and math.isfinite(lr)):
        raise ValueError(f"lr: expected a finite number >= 0, got {lr!r}")
    if not (isinstance(eps, (int, float)) and eps >= 0.0):
        raise ValueError(f"eps: expected a number >= 0, got {eps!r}")
    if not (isinstance(weight_decay, (int, float)) and weight_decay >= 0.0):
        raise ValueError(f"weight_decay: expected a number >= 0, got {weight_decay!r}")



def _dense_grad(p: torch.Tensor, name: str) -> torch.Tensor:
    grad = p.grad
    if grad.is_sparse:
        raise ValueError(f"{name}: sparse gradients are not supported (parameter shape {tuple(p.shape)})")
    return grad


def _apply_update(p: torch.Tensor, update: torch.Tensor, lr: float, weight_decay: float) -> None:
    """``Δ -= lr · update``, then decoupled weight decay ``Δ -= lr · wd · Δ`` (docs/METHOD.md §3.3, §5.1), in
    fp32: in place for a contiguous fp32 ``p``, else through an fp32 copy written back once. ``update``
    is fp32 ``[numel(p)]``."""
    direct = p.dtype == torch.float32 and p.is_contiguous()
    p32 = p.view(-1) if direct else p.detach().float().reshape(-1)
    p32.add_(update, alpha=-lr)
    if weight_decay != 0.0:
        p32.add_(p32, alpha=-lr * weight_decay)
    if not direct:
        p.copy_(p32.view(p.shape))


class _Scratch:
    """Reusable flat work buffers (one set per device and dtype), grown on demand, never in the state.

    The update rules are written with in-place and ``out=`` operations on these buffers: allocating
    fresh k-sized temporaries for every tensor at every step costs far more than the arithmetic on
    CPU (page faults; README, Performance).
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}

    def get(self, tag: str, n: int, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        key = (tag, like.device, dtype)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < n:
            buf = torch.empty(n, dtype=dtype, device=like.device)
            self._buffers[key] = buf
        return buf[:n]

    def clear(self) -> None:
        self._buffers.clear()


class _FP32StateMixin:
    """Keeps the optimizer state tensors in the dtype they were saved with across ``load_state_dict``.

    ``torch.optim.Optimizer.load_state_dict`` casts every floating state tensor to its parameter's
    dtype; for bf16 deltas that would silently round the fp32 moments and ages. After the base
    class has loaded, each state tensor is replaced by a copy of the saved tensor in its saved dtype.
    """

    #: ``(kind as the user knows it, the per-parameter state keys this optimizer writes)``; set per class.
    _KIND: tuple[str, frozenset] = ("", frozenset())

    def _check_kind(self, state_dict: dict[str, Any]) -> None:
        """Refuse the state of the other SpIEL optimizer (an AG checkpoint resumed as MA, or back)."""
        from .adamw import SparseAdamW
        from .sm3 import SM3

        kinds = {cls._KIND[0]: cls._KIND[1] for cls in (SparseAdamW, SM3)}
        own_name, own_keys = self._KIND
        groups = state_dict.get("param_groups") or [{}]
        own_group_keys = set(self.param_groups[0]) - {"params"}  # type: ignore[attr-defined]
        for entry in (state_dict.get("state") or {}).values():
            keys = set(entry)
            if keys and not keys & own_keys:
                saved = next((name for name, k in kinds.items() if keys & k), "an unknown optimizer")
                raise ValueError(f"optimizer state: saved by {saved} (state {sorted(keys)}), but this optimizer is "
                                 f"{own_name}; resume with the selection_algorithm the checkpoint was trained with")
        missing = own_group_keys - set(groups[0])
        if missing:
            raise ValueError(f"optimizer state: its parameter groups lack {sorted(missing)}, which {own_name} needs "
                             "(saved by another optimizer); resume with the selection_algorithm the checkpoint was "
                             "trained with")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # noqa: D102 (documented on the class)
        self._check_kind(state_dict)
        super().load_state_dict(state_dict)  # type: ignore[misc]
        saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]  # type: ignore[attr-defined]
        for pid, p in zip(saved_ids, params):
            saved = state_dict["state"].get(pid)
            if not saved:
                continue
            for key, value in saved.items():
                if isinstance(value, torch.Tensor):
                    self.state[p][key] = value.detach().to(device=p.device).clone()  # type: ignore[attr-defined]


def _closure_loss(closure: Any) -> Any:
    """The loss ``closure()`` returns, evaluated with gradients enabled (None without a closure), as the
    ``step(closure)`` of every ``torch.optim.Optimizer``."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()
