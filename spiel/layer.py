"""A linear layer with a trainable sparse delta: ``W = W0 + scatter(η, Δ)`` (docs/METHOD.md §2, §6).

:class:`SparseDeltaLinear` wraps a frozen ``nn.Linear`` or a bitsandbytes ``Linear4bit`` (NF4/FP4,
qSpIEL). It owns

* ``indices`` (η): a buffer ``[k]`` of flat row-major positions ``row * in_features + col`` into the
  ``[out_features, in_features]`` weight, distinct, ``int32`` when ``out * in < 2**31`` else ``int64``;
* ``values`` (Δ): an ``nn.Parameter`` ``[k]`` in the delta dtype, zeros at initialisation.

Forward, fused (the default for a dense base, :attr:`SparseDeltaLinear.fuse_delta`): the base weight
itself holds ``W0 + Δ`` at η between calls, written in O(k) before each forward and backward, and
``F.linear`` reads it directly (no dense temporary). :mod:`spiel.fused` describes the mechanism: when the
fused weight is updated, how every view of the base still sees ``W0``, and which weights are not fused.

Forward, unfused (a 4-bit base, ``fuse_delta=False``, or a compute dtype the fused weight cannot give
exactly, e.g. fp16 autocast over a bf16 base): ``W0 + Δ`` is materialised densely for this layer only
(a per-layer temporary, dequantising a 4-bit base on the fly; the base itself stays quantised), in
the forward and again in the backward. Either way only the input, Δ and η are saved for backward,
never a dense effective weight.

Backward (the lever over the reference, which forms a dense ``dW = dYᵀX`` in every step, docs/METHOD.md §6 and
§10.2.5):

* ``dx = dY · (W0 + Δ)`` exactly (the fused base weight, or the effective weight recomputed);
* ``dΔ[n] = Σ_t dY[t, row_n] · X[t, col_n]`` by the path :attr:`SparseDeltaLinear.delta_grad` and the
  per-device rule of :mod:`spiel.delta_grad` choose: a sampled product (SDDMM) at the k positions over a
  CSR pattern cached between steps (rebuilt when η changes), or a dense ``dYᵀX`` GEMM and a gather;
* while ``weight_grad_hook`` is set (the SpIEL-AG selection phase, docs/METHOD.md §4.1), the dense fp32
  ``dW [out, in]`` is computed once, passed to the hook, and ``dΔ`` is gathered from it;
* :meth:`SparseDeltaLinear.sample_weight_grad` asks for the weight gradient at extra positions (AG's
  fixed candidates after the first micro-batch of a phase) in the same product as dΔ (positions both
  active and candidates are computed once).

The bias, if any, stays frozen and the base weight never receives a gradient.

Mixed precision: under ``torch.autocast`` the layer computes in the autocast dtype (bf16/fp16); the
effective weight is formed as ``(W0[η] + Δ)`` in fp32 and rounded once to the compute dtype. The
sampled ``dΔ`` and the hook's dense ``dW`` are accumulated in fp32 (fp64 for fp64 inputs). Autocast
is resolved once in :meth:`SparseDeltaLinear.forward` and the autograd function does all casts
explicitly with autocast disabled inside, so its backward does not depend on whether ``backward()`` is
called inside or outside an autocast region (this replaces ``torch.amp.custom_fwd/custom_bwd``, whose
``device_type`` is fixed at decoration time). Gradient checkpointing (re-entrant or not) re-runs
:meth:`forward` under the saved autocast state and gives identical gradients.
"""
from __future__ import annotations

import sys
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .fused import FusedWeightMixin, fusable_weight
from .delta_grad import check_path, csr_pattern, delta_grad as _delta_grad, sampled_grad as _sampled_path

__all__ = [
    "SparseDeltaLinear",
    "sparse_delta_linear",
    "random_indices",
    "index_dtype_for",
    "is_linear4bit",
    "fusable_weight",
]

_HALF_DTYPES = (torch.float16, torch.bfloat16)

def index_dtype_for(numel: int) -> torch.dtype:
    """The dtype of η for a weight of ``numel`` elements: ``int32`` if ``numel < 2**31`` else ``int64`` (docs/METHOD.md §2)."""
    return torch.int32 if numel < 2**31 else torch.int64


def is_linear4bit(module: nn.Module) -> bool:
    """True if ``module`` is a bitsandbytes ``Linear4bit`` (NF4/FP4). Never imports bitsandbytes itself:
    a ``Linear4bit`` instance can only exist once bitsandbytes has been imported."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return False
    return isinstance(module, bnb.nn.Linear4bit)


def random_indices(numel: int, k: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """k distinct positions drawn uniformly at random from ``range(numel)``, sorted ascending (docs/METHOD.md §2).

    Returns an int64 CPU tensor ``[k]``. Memory is O(k) when ``k <= numel / 2`` (rejection sampling with
    ``randint`` + ``unique``, then a uniform subset of the distinct draws), else one ``randperm(numel)``.

    Raises ValueError if ``k < 1`` or ``k > numel``.
    """
    if not 1 <= k <= numel:
        raise ValueError(f"k must be in [1, numel={numel}], got {k}")
    if 2 * k > numel:
        return torch.randperm(numel, generator=generator)[:k].sort().values
    draws = torch.empty(0, dtype=torch.int64)
    while draws.numel() < k:
        need = k - draws.numel()
        extra = torch.randint(0, numel, (need + need // 8 + 16,), generator=generator, dtype=torch.int64)
        draws = torch.unique(torch.cat([draws, extra]))
    if draws.numel() > k:
        # The set of distinct draws is exchangeable, so a uniform subset of it is a uniform k-subset.
        keep = torch.randperm(draws.numel(), generator=generator)[:k]
        draws = draws[keep].sort().values
    return draws


def _no_autocast(device_type: str):
    """An autocast-disabled region for ``device_type`` (a no-op context for device types autocast lacks)."""
    try:
        return torch.autocast(device_type=device_type, enabled=False)
    except RuntimeError:  # e.g. "meta"
        return torch.autocast(device_type="cpu", enabled=False)


def _accumulate_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    """fp32 for half-precision compute, else the compute dtype itself (fp32, or fp64 in gradchecks)."""
    return torch.float32 if compute_dtype in _HALF_DTYPES else compute_dtype


class _SparseDeltaLinearFunction(torch.autograd.Function):
    """``y = x @ (W0 + scatter(η, Δ))ᵀ + b`` with a sampled gradient for Δ (see the module docstring).

    Inputs: ``x [..., in]``, ``values [k]``, ``indices [k]`` (no gradient), the owning layer and the
    compute dtype. Saves ``x`` (in the compute dtype), ``values`` and ``indices``.
    """

    @staticmethod
    def forward(ctx, x, values, indices, layer, compute_dtype, use_hooks=True):
        with _no_autocast(x.device.type):
            xc = x.to(compute_dtype)
            weight = layer._compute_weight(compute_dtype, values, indices)
            bias = layer.base_layer.bias
            y = F.linear(xc, weight, None if bias is None else bias.to(compute_dtype))
        del weight
        ctx.save_for_backward(xc, values, indices)
        ctx.layer = layer
        ctx.compute_dtype = compute_dtype
        ctx.x_dtype = x.dtype
        ctx.use_hooks = use_hooks
        return y

    @staticmethod
    def backward(ctx, grad_out):
        xc, values, indices = ctx.saved_tensors
        layer: SparseDeltaLinear = ctx.layer
        compute_dtype = ctx.compute_dtype
        grad_x = grad_values = None
        with _no_autocast(grad_out.device.type):
            g = grad_out.reshape(-1, layer.out_features)
            # hooks are read once: a hook may switch the layer to sampled candidates for later backwards
            dense_hook = layer.weight_grad_hook if ctx.use_hooks else None
            sample_hook = layer.grad_sample_hook if ctx.use_hooks else None
            sample_at = layer.grad_sample_indices if sample_hook is not None else None
            if ctx.needs_input_grad[1] or dense_hook is not None or sample_at is not None:
                x2d = xc.reshape(-1, layer.in_features)
                acc = _accumulate_dtype(compute_dtype)
                if dense_hook is not None:
                    dense_grad = g.to(acc).t() @ x2d.to(acc)  # [out, in], fp32 (fp64 in gradchecks)
                    dense_hook(dense_grad)
                    flat = dense_grad.view(-1)
                    grad_values = flat[indices]
                    if sample_at is not None:
                        sample_hook(flat[sample_at])
                    del dense_grad, flat
                elif sample_at is not None:
                    both = _delta_grad(layer.delta_grad, lambda: layer._csr_pattern(indices, sample_at), g, x2d, acc,
                                       (layer.out_features, layer.in_features), indices, sample_at)
                    grad_values = both[: indices.numel()]
                    sample_hook(both[indices.numel():])
                else:
                    grad_values = _delta_grad(layer.delta_grad, lambda: layer._csr_pattern(indices), g, x2d, acc,
                                              (layer.out_features, layer.in_features), indices)
                grad_values = grad_values.to(values.dtype)
                if not ctx.needs_input_grad[1]:
                    grad_values = None
            if ctx.needs_input_grad[0]:
                weight = layer._compute_weight(compute_dtype, values, indices)
                grad_x = (g.to(compute_dtype) @ weight).view(*grad_out.shape[:-1], layer.in_features)
                grad_x = grad_x.to(ctx.x_dtype)
        return grad_x, grad_values, None, None, None, None


@torch.compiler.disable  # runs eagerly under torch.compile: the fused write mutates the base weight in place
def sparse_delta_linear(layer: "SparseDeltaLinear", x: torch.Tensor, values: Optional[torch.Tensor] = None,
                        compute_dtype: Optional[torch.dtype] = None, use_hooks: bool = True) -> torch.Tensor:
    """The functional form of :meth:`SparseDeltaLinear.forward` (ignores ``merged``/``disabled``).

    ``x [..., in]``; ``values [k]`` defaults to ``layer.values`` (pass another tensor, e.g. fp64, for
    gradchecks); ``compute_dtype`` defaults to the autocast dtype when autocast is on, else the base's
    compute dtype (the weight dtype for ``nn.Linear``; ``compute_dtype`` or ``x.dtype`` for 4-bit).
    Returns ``[..., out]`` in the compute dtype (4-bit: cast back to ``x.dtype``, as bitsandbytes does).
    ``use_hooks=False`` keeps the layer's selection hooks out of this call's backward. Under
    ``torch.compile`` this call is a graph break (it runs eagerly; the code around it is compiled).
    """
    if values is None:
        values = layer.values
    if compute_dtype is None:
        compute_dtype = layer._compute_dtype(x)
    y = _SparseDeltaLinearFunction.apply(x, values, layer.indices, layer, compute_dtype, use_hooks)
    if layer.is_4bit:
        y = y.to(x.dtype)
    return y


class SparseDeltaLinear(FusedWeightMixin, nn.Module):
    """A frozen linear layer plus a trainable sparse delta Δ at indices η (docs/METHOD.md §2, §6).

    Args:
        base_layer: ``nn.Linear`` or bitsandbytes ``Linear4bit``; its parameters are frozen here.
        k: number of trainable entries (ignored if ``indices`` is given), ``1 <= k <= out*in``.
        indices: optional initial flat indices ``[k]`` (distinct, in ``[0, out*in)``); by default k
            distinct positions drawn uniformly at random with ``generator``, sorted (docs/METHOD.md §2).
        delta_dtype: dtype of Δ (``torch.float32``; ``torch.bfloat16`` in the reference qSpIEL runs).
        generator: CPU ``torch.Generator`` for the random initial indices (seeded by the caller).

    Attributes (the contract in docs/DESIGN.md): ``base_layer``, ``in_features``, ``out_features``,
    ``values`` (Parameter ``[k]``, zeros at init), ``indices`` (buffer ``[k]``), ``weight_grad_hook``
    (None or a callable receiving the dense fp32 ``dW [out, in]`` in each backward; used by SpIEL-AG
    selection), ``grad_sample_indices``/``grad_sample_hook`` (set with :meth:`sample_weight_grad`: the
    weight gradient at extra positions from the sampled product, no dense dW), ``merged`` (Δ currently
    added into the base weight), ``disabled`` (forward = base only), ``fuse_delta`` (True: keep
    ``W0 + Δ`` in the base weight between calls, see the module docstring; set False for a base whose
    storage does not persist between forward and backward, e.g. FSDP-sharded weights).

    Raises:
        TypeError: ``base_layer`` is neither ``nn.Linear`` nor ``Linear4bit``.
        ValueError: k out of range, or ``indices`` of the wrong shape/range or not distinct.
    """

    def __init__(self, base_layer: nn.Module, k: Optional[int] = None, *, indices: Optional[torch.Tensor] = None,
                 delta_dtype: torch.dtype = torch.float32, generator: Optional[torch.Generator] = None):
        super().__init__()
        if not (isinstance(base_layer, nn.Linear) or is_linear4bit(base_layer)):
            raise TypeError(f"base_layer must be nn.Linear or bitsandbytes Linear4bit, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.in_features = int(base_layer.in_features)
        self.out_features = int(base_layer.out_features)
        numel = self.dense_numel
        if indices is None:
            if k is None:
                raise ValueError("either k or indices must be given")
            indices = random_indices(numel, int(k), generator)
        else:
            indices = torch.as_tensor(indices).reshape(-1)
            if indices.dtype.is_floating_point or indices.numel() < 1:
                raise ValueError(f"indices must be a non-empty integer tensor, got {indices.dtype} [{indices.numel()}]")
            if int(indices.min()) < 0 or int(indices.max()) >= numel:
                raise ValueError(f"indices must lie in [0, {numel}) for a [{self.out_features}, {self.in_features}] weight")
            if torch.unique(indices).numel() != indices.numel():
                raise ValueError("indices must be distinct")
        device = self._weight_device()
        self.register_buffer("indices", indices.to(device=device, dtype=index_dtype_for(numel)), persistent=True)
        self.values = nn.Parameter(torch.zeros(self.indices.numel(), dtype=delta_dtype, device=device))
        self.weight_grad_hook: Optional[Callable[[torch.Tensor], None]] = None
        self.grad_sample_indices: Optional[torch.Tensor] = None
        self.grad_sample_hook: Optional[Callable[[torch.Tensor], None]] = None
        self.merged = False
        self.disabled = False
        self.fuse_delta = True
        self._delta_grad_path = "auto"
        self._merge_backup: Optional[torch.Tensor] = None
        self._fused: Optional[_FusedState] = None  # the fused state (module docstring), None while unfused
        self._csr_cache = None  # (key, crow, col, gather); key holds the index tensors themselves and versions

    # ----------------------------------------------------------------------------------- properties
    @property
    def k(self) -> int:
        """Number of trainable entries (len(η))."""
        return self.indices.numel()

    @property
    def dense_numel(self) -> int:
        """``out_features * in_features``: the size of the full weight this delta indexes."""
        return self.out_features * self.in_features

    @property
    def delta_grad(self) -> str:
        """How the backward computes dΔ: ``"auto"`` (the per-device rule of :mod:`spiel.delta_grad`),
        ``"sampled"`` (SDDMM at η) or ``"dense"`` (``dYᵀX`` GEMM, then a gather). Setting another value
        raises ValueError."""
        return self.__dict__.get("_delta_grad_path", "auto")

    @delta_grad.setter
    def delta_grad(self, path: str) -> None:
        self._delta_grad_path = check_path(path)

    @property
    def is_4bit(self) -> bool:
        """True if the base is a quantised bitsandbytes ``Linear4bit`` (its weight holds a ``quant_state``)."""
        return is_linear4bit(self.base_layer) and getattr(self.base_layer.weight, "quant_state", None) is not None

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's (frozen) weight Parameter, for code that reads ``module.weight`` (dtype, device)."""
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        """The base layer's (frozen) bias, or None."""
        return self.base_layer.bias

    def _weight_device(self) -> torch.device:
        return self.base_layer.weight.device

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, k={self.k}, "
                f"density={self.k / self.dense_numel:.4%}, delta_dtype={self.values.dtype}, 4bit={self.is_4bit}")

    # ------------------------------------------------------------------------------- dense weights
    def base_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The dense base weight ``[out, in]``: dequantised for a 4-bit base (a new per-layer tensor,
        in the quant state's dtype), else the base Parameter's data itself (not a copy; the layer is
        unfused first, and the next forward writes ``W0 + Δ`` at η into it again).
        ``dtype`` converts the result (a copy if it differs). Includes Δ only while ``merged``."""
        self._release_base()
        weight = self.base_layer.weight
        if self.is_4bit:
            import bitsandbytes.functional as bnbF

            dense = bnbF.dequantize_4bit(weight.data, weight.quant_state)
        else:
            dense = weight.data
        dense = dense.reshape(self.out_features, self.in_features)
        return dense if dtype is None else dense.to(dtype)

    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense delta ``scatter(η, Δ)`` as a new ``[out, in]`` tensor in ``dtype`` (tests, inspection)."""
        dense = torch.zeros(self.dense_numel, dtype=dtype, device=self.values.device)
        dense[self.indices] = self.values.detach().to(dtype)
        return dense.view(self.out_features, self.in_features)

    def _compute_weight(self, dtype: torch.dtype, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """The effective weight ``W0 + scatter(η, Δ)`` ``[out, in]`` in ``dtype`` for one forward or backward:
        the fused base weight itself where possible (cast once if ``dtype`` is narrower), else a fresh
        per-layer tensor (:meth:`_effective_weight`). Bit-identical either way."""
        if self._fused is not None:
            self._valid_fused_state()  # may find the weight swapped and turn fusion off
        if self._can_fuse(dtype):
            weight = self._fuse(values, indices)
            return weight if weight.dtype == dtype else weight.to(dtype)
        return self._effective_weight(dtype, values, indices)  # base_weight() inside restores W0 first

    def _effective_weight(self, dtype: torch.dtype, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """A new dense ``W0 + scatter(η, Δ)`` in ``dtype``; each changed entry is ``(W0[η] + Δ)`` summed in
        fp32 (or ``dtype`` if wider) and rounded once. A per-layer temporary."""
        base = self.base_weight()
        weight = base.to(dtype, copy=not self.is_4bit)  # a dequantised base is already a fresh tensor
        flat_base = base.reshape(-1)
        acc = _accumulate_dtype(dtype)
        updated = flat_base[indices].to(acc) + values.detach().to(acc)
        weight.view(-1)[indices] = updated.to(dtype)
        return weight

    # ---------------------------------------------------------------------------- sampled gradient
    def _csr_pattern(self, *index_sets: torch.Tensor):
        """The CSR pattern of the *distinct* flat positions of the index sets (η, then any extra sampled
        positions): ``(crow [out+1], col [u], gather [m])`` where ``u`` counts the distinct positions and
        ``gather[i]`` is the pattern slot of entry i of ``cat(index_sets)``. A position present in
        several sets (a SpIEL-AG candidate that is already active) is computed once.

        Cached between steps (one pattern); rebuilt when any set is replaced or written in place (its
        version or storage changes)."""
        cache = self._csr_cache
        if (cache is not None and len(cache[0]) == len(index_sets)
                and all(t is ref and t._version == version for t, (ref, version) in zip(index_sets, cache[0]))):
            return cache[1:]
        key = tuple((t, t._version) for t in index_sets)  # strong refs: identity + version, never stale
        crow, cols, gather = csr_pattern((self.out_features, self.in_features), *index_sets)
        self._csr_cache = (key, crow, cols, gather)
        return crow, cols, gather

    def _sampled_grad(self, grad_out: torch.Tensor, x2d: torch.Tensor, *index_sets: torch.Tensor) -> torch.Tensor:
        """``dW[p] = Σ_t grad_out[t, row_p] · x2d[t, col_p]`` at every flat position p of the concatenated
        ``index_sets`` (``grad_out [T, out]``, ``x2d [T, in]``, fp32/fp64) by the sampled path
        (:func:`spiel.delta_grad.sampled_grad` over the cached CSR pattern), whatever :attr:`delta_grad`
        says. Returns ``[Σ len]`` in the order of ``cat(index_sets)``."""
        return _sampled_path(self._csr_pattern(*index_sets), (self.out_features, self.in_features), grad_out, x2d)

    def sample_weight_grad(self, indices: Optional[torch.Tensor], hook: Optional[Callable[[torch.Tensor], None]]
                           ) -> None:
        """Ask each following backward for the weight gradient at extra flat positions (e.g. SpIEL-AG's
        fixed candidates after the first micro-batch of a selection phase, docs/METHOD.md §4.1): ``hook`` receives
        ``dW.flatten()[indices]`` as an fp32 tensor ``[m]``, computed in the same SDDMM as dΔ (no dense dW
        unless ``weight_grad_hook`` is also set, in which case it is gathered from that). Pass
        ``(None, None)`` to stop. ``indices`` may overlap η (shared positions are computed once).

        Raises ValueError if exactly one of the two is None or indices are out of range."""
        if (indices is None) != (hook is None):
            raise ValueError("sample_weight_grad: pass both indices and hook, or neither")
        if indices is not None:
            indices = torch.as_tensor(indices, device=self.indices.device).reshape(-1)
            if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.dense_numel):
                raise ValueError(f"sample_weight_grad: indices must lie in [0, {self.dense_numel})")
            indices = indices.to(self.indices.dtype)
        self.grad_sample_indices = indices
        self.grad_sample_hook = hook

    # ------------------------------------------------------------------------------------- forward
    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        device_type = x.device.type
        if device_type in ("cpu", "cuda", "xpu", "mps", "hpu") and torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
        if self.is_4bit:
            return getattr(self.base_layer, "compute_dtype", None) or x.dtype
        return self.base_layer.weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., in] -> [..., out]``: ``x @ (W0 + scatter(η, Δ))ᵀ + b``; the base layer alone while
        ``disabled`` or ``merged`` (then Δ is already inside the base weight).

        Raises RuntimeError if both ``disabled`` and ``merged`` (unmerge first: the merged base cannot
        give base-only outputs)."""
        if self.merged:
            if self.disabled:
                raise RuntimeError("SparseDeltaLinear: cannot run disabled while merged; call unmerge() first")
            return self.base_layer(x)
        if self.disabled:
            if torch.is_grad_enabled() and self._can_fuse(self._compute_dtype(x)):
                # Through the autograd function with Δ = 0: nothing saved for backward refers to the base
                # weight, so a fused forward of this layer between this forward and its backward cannot
                # invalidate it (the backward rewrites W0 + 0 at η before use).
                zeros = torch.zeros_like(self.values, requires_grad=False)
                return sparse_delta_linear(self, x, values=zeros, use_hooks=False)
            self._release_base()
            return self.base_layer(x)
        return sparse_delta_linear(self, x)

    # ------------------------------------------------------------------------------- index updates
    @torch.no_grad()
    def replace_entries(self, slots: torch.Tensor, new_indices: torch.Tensor) -> None:
        """Write ``new_indices`` into η at positions ``slots`` and zero Δ (and any ``values.grad``) there
        (docs/METHOD.md §3.2: grown entries start at Δ = 0). Invalidates the cached CSR pattern.

        ``slots [n]`` are positions in ``[0, k)``; ``new_indices [n]`` flat positions in ``[0, out*in)``.
        The caller keeps η distinct (the selection rules guarantee it; not re-checked here, O(k log k)).

        Raises ValueError on length mismatch or out-of-range values, RuntimeError while merged.
        """
        if self.merged:
            raise RuntimeError("SparseDeltaLinear.replace_entries: unmerge() before changing indices")
        slots = torch.as_tensor(slots, device=self.indices.device).reshape(-1).long()
        new_indices = torch.as_tensor(new_indices, device=self.indices.device).reshape(-1)
        if slots.numel() != new_indices.numel():
            raise ValueError(f"replace_entries: {slots.numel()} slots but {new_indices.numel()} new indices")
        if slots.numel() == 0:
            return
        if int(slots.min()) < 0 or int(slots.max()) >= self.k:
            raise ValueError(f"replace_entries: slots must lie in [0, {self.k})")
        if int(new_indices.min()) < 0 or int(new_indices.max()) >= self.dense_numel:
            raise ValueError(f"replace_entries: new indices must lie in [0, {self.dense_numel})")
        self.indices[slots] = new_indices.to(self.indices.dtype)
        self.values[slots] = 0
        if self.values.grad is not None:
            self.values.grad[slots] = 0
        self._csr_cache = None

    # --------------------------------------------------------------------------------- merge/unmerge
    @torch.no_grad()
    def merge(self, keep_backup: bool = True) -> None:
        """Add Δ into the base weight in place: ``W[η] = (W[η] + Δ)`` computed in fp32, cast to the weight
        dtype (docs/METHOD.md §7). With ``keep_backup`` the original ``W0[η]`` (k values) is kept so that
        :meth:`unmerge` restores W bit-exactly. No-op if already merged.

        Raises ValueError for a 4-bit base (re-quantising is lossy; evaluate 4-bit runs unmerged)."""
        if self.merged:
            return
        if self.is_4bit:
            raise ValueError("SparseDeltaLinear.merge: cannot merge into a 4-bit (NF4/FP4) base weight; "
                             "re-quantisation would be lossy. Evaluate 4-bit runs unmerged.")
        self._release_base()
        flat = self.base_layer.weight.data.view(-1)
        original = flat[self.indices]
        acc = torch.float64 if original.dtype == torch.float64 else torch.float32
        flat[self.indices] = (original.to(acc) + self.values.to(acc)).to(flat.dtype)
        self._merge_backup = original if keep_backup else None
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge`: restore the saved ``W0[η]`` exactly (or subtract Δ in fp32 if no backup was
        kept). No-op if not merged."""
        if not self.merged:
            return
        flat = self.base_layer.weight.data.view(-1)
        if self._merge_backup is not None:
            flat[self.indices] = self._merge_backup
        else:
            current = flat[self.indices]
            acc = torch.float64 if current.dtype == torch.float64 else torch.float32
            flat[self.indices] = (current.to(acc) - self.values.to(acc)).to(flat.dtype)
        self._merge_backup = None
        self.merged = False
