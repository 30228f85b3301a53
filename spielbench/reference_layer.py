"""A reference-style SpIEL layer, for the side-by-side efficiency benchmark only ("spiel-reference").

It computes the same function as :class:`spiel.layer.SparseDeltaLinear`, ``y = x (W0 + scatter(η, Δ))ᵀ + b``,
the way the original implementation does (docs/METHOD.md §6, ``linear_sd.cpp``):

* forward: ``W' = W0.clone(); W'.view(-1)[η] += Δ`` (one dense per-layer copy, dequantised for a 4-bit
  base), ``y = F.linear(x, W', b)``; only ``x``, Δ and η are saved;
* backward: recompute ``W'``; ``dx = dY·W'``; the **dense** ``dW = dYᵀ·X`` is formed in **every**
  backward, in the activation dtype (docs/METHOD.md §10.2.5); ``dΔ = dW.view(-1)[η]``; a ``weight_grad_hook``, when
  installed (SpIEL-AG selection phase), receives that ``dW``.

The project's layer differs only in the backward: it evaluates ``dΔ`` at the k active positions
(sampled product) and forms a dense ``dW`` only while a selection phase needs it. Putting both in the
same benchmark shows what that saves (issue "Efficiency benchmark", item 4).

:func:`to_reference_layers` converts the :class:`~spiel.layer.SparseDeltaLinear` layers of a wrapped
model in place, keeping their indices, deltas and base weights, so that the optimizer, the selector and
everything else stay those of the library.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from spiel.layer import SparseDeltaLinear

__all__ = ["ReferenceSparseDeltaLinear", "reference_sparse_delta_linear", "to_reference_layers"]


def _reference_weight(layer: SparseDeltaLinear, values: torch.Tensor, indices: torch.Tensor,
                      dtype: torch.dtype) -> torch.Tensor:
    """``W0 + scatter(η, Δ)`` as a new dense ``[out, in]`` tensor in ``dtype`` (the reference adds Δ cast to
    the weight dtype: ``W'.view(-1).scatter_add_(η, Δ.to(W.dtype))``)."""
    weight = layer.base_weight(dtype)
    if weight.data_ptr() == layer.base_layer.weight.data_ptr():
        weight = weight.clone()
    weight.view(-1).index_add_(0, indices, values.detach().to(dtype))
    return weight


class _ReferenceFunction(torch.autograd.Function):
    """Autograd function of the reference-style layer (module docstring). Inputs: ``x [..., in]``,
    ``values [k]``, ``indices [k]``, the layer, the compute dtype."""

    @staticmethod
    def forward(ctx, x, values, indices, layer, compute_dtype):
        xc = x.to(compute_dtype)
        weight = _reference_weight(layer, values, indices, compute_dtype)
        bias = layer.base_layer.bias
        y = F.linear(xc, weight, None if bias is None else bias.to(compute_dtype))
        del weight
        ctx.save_for_backward(xc, values, indices)
        ctx.layer = layer
        ctx.compute_dtype = compute_dtype
        ctx.x_dtype = x.dtype
        return y

    @staticmethod
    def backward(ctx, grad_out):
        xc, values, indices = ctx.saved_tensors
        layer: SparseDeltaLinear = ctx.layer
        dtype = ctx.compute_dtype
        g = grad_out.reshape(-1, layer.out_features).to(dtype)
        weight = _reference_weight(layer, values, indices, dtype)
        grad_x = (g @ weight).view(*grad_out.shape[:-1], layer.in_features).to(ctx.x_dtype)
        del weight
        dense_grad = g.t() @ xc.reshape(-1, layer.in_features)  # [out, in], every backward (docs/METHOD.md §6 step 3)
        grad_values = dense_grad.view(-1).index_select(0, indices).to(values.dtype)
        if layer.weight_grad_hook is not None:
            layer.weight_grad_hook(dense_grad)
        del dense_grad
        return grad_x, (grad_values if ctx.needs_input_grad[1] else None), None, None, None


def reference_sparse_delta_linear(layer: SparseDeltaLinear, x: torch.Tensor, values: Optional[torch.Tensor] = None,
                                  compute_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The reference-style forward of ``layer`` on ``x [..., in]`` → ``[..., out]`` (ignores merged/disabled).

    ``values [k]`` defaults to ``layer.values`` (pass another tensor, e.g. fp64, for checks);
    ``compute_dtype`` defaults to the layer's (autocast dtype under autocast, else the base weight dtype;
    for a 4-bit base its ``compute_dtype``). The output of a 4-bit base is cast back to ``x.dtype``.
    Autocast is disabled inside; all casts are explicit.
    """
    if values is None:
        values = layer.values
    if compute_dtype is None:
        compute_dtype = layer._compute_dtype(x)
    device_type = x.device.type if x.device.type in ("cpu", "cuda") else "cpu"
    with torch.autocast(device_type=device_type, enabled=False):
        y = _ReferenceFunction.apply(x, values, layer.indices, layer, compute_dtype)
    return y.to(x.dtype) if layer.is_4bit else y


class ReferenceSparseDeltaLinear(SparseDeltaLinear):
    """:class:`spiel.layer.SparseDeltaLinear` with the reference's backward: a dense ``dW`` in every backward.

    Same constructor, attributes, merge/unmerge and index replacement as the parent (it is one, so
    ``SpielModel.sparse_layers()``, the optimizers and the selector treat it as any SpIEL layer); only
    :meth:`forward` differs (see the module docstring). Use :meth:`from_layer` or
    :func:`to_reference_layers` to convert an existing layer.
    """

    @classmethod
    def from_layer(cls, layer: SparseDeltaLinear) -> "ReferenceSparseDeltaLinear":
        """A reference-style layer sharing ``layer``'s base layer, with a copy of its η and Δ (and its
        ``weight_grad_hook``). Raises ValueError if ``layer`` is merged (unmerge first)."""
        if layer.merged:
            raise ValueError("ReferenceSparseDeltaLinear.from_layer: unmerge the layer first")
        layer.unfuse()  # the shared base weight must hold W0
        new = cls(layer.base_layer, indices=layer.indices.detach().clone(), delta_dtype=layer.values.dtype)
        with torch.no_grad():
            new.values.copy_(layer.values.detach())
        new.values.requires_grad_(layer.values.requires_grad)
        new.weight_grad_hook = layer.weight_grad_hook
        new.disabled = layer.disabled
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., in] -> [..., out]`` as the reference computes it; the base layer alone while
        ``disabled`` or ``merged``. Raises RuntimeError if both (as the parent)."""
        if self.merged or self.disabled:
            return super().forward(x)
        return reference_sparse_delta_linear(self, x)


def to_reference_layers(model: nn.Module) -> int:
    """Replace every :class:`SparseDeltaLinear` inside ``model`` (in place) by a
    :class:`ReferenceSparseDeltaLinear` with the same base layer, η and Δ. Build the optimizer and the
    selector *after* this call (the deltas are new Parameters).

    Returns the number of layers converted. Raises ValueError if ``model`` has none, or one is merged.
    """
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, SparseDeltaLinear) and not isinstance(m, ReferenceSparseDeltaLinear)]
    if not targets and not any(isinstance(m, ReferenceSparseDeltaLinear) for m in model.modules()):
        raise ValueError("to_reference_layers: the model holds no SparseDeltaLinear layer (wrap it with spiel first)")
    for name, layer in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, ReferenceSparseDeltaLinear.from_layer(layer))
    return len(targets)
