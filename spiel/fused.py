"""The fused forward of :class:`spiel.layer.SparseDeltaLinear`: the base weight holds ``W0 + Δ`` at η between
calls (docs/METHOD.md §6).

With ``fuse_delta`` (the default for a dense base) the base weight itself holds the effective weight. The
layer keeps ``W0[η]`` (k values in the weight dtype) and a copy of η in a plain attribute (never a registered parameter or buffer: parameter names, ``state_dict`` keys and
tie detection are unchanged by a forward), and before each forward and each backward writes only the k
entries ``W[η] = W0[η] + Δ`` (summed in fp32, rounded once to the weight dtype), an O(k) scatter;
``F.linear`` then reads the base weight directly, with no dense temporary. Measured on SmolLM2-1.7B shapes
at 128 tokens (1 thread): the 7 projections of one step 14.9 s with a fresh temporary per forward and
backward, 8.9 s fused, 8.6 s with frozen weights (README, Performance).

When fusion is updated (docs/METHOD.md §6): Δ is written on every forward and backward, so any change to
Δ (the optimizer step, ``load_adapter``, a user's write, even through ``.data``) is in the next call. η
changes at reselection (:meth:`SparseDeltaLinear.replace_entries`) or by any other in-place write to
``indices`` (loading): its version counter moves, and the next call (or anything that needs ``W0``)
restores the old positions from the copy and re-takes ``W0`` at the new ones (an O(1) check). A write to
η through ``.data`` is invisible to version counters: call :meth:`SparseDeltaLinear.refresh` after it.

Every way of looking at the base weight sees ``W0``: ``state_dict``/``load_state_dict``,
:meth:`SparseDeltaLinear.base_weight`, ``disabled``, :meth:`~SparseDeltaLinear.merge` and
:meth:`~SparseDeltaLinear.unfuse` restore ``W0[η]`` first (O(k)), and the next forward fuses again.
Reading ``base_layer.weight`` directly between forwards shows ``W0 + Δ`` at η: call ``unfuse()`` first.
Tensors returned by ``state_dict()`` alias the live weight (as for any module): save or clone them before
the next forward. Other code's changes to the base are respected: ``.to()``/``.half()``/``.cuda()``
unfuse first; an in-place write to the base weight by anything else (its version changes) is taken as a
new ``W0``; a new Parameter put in its place is taken as a new ``W0`` and turns fusion off for the layer
(a weight swapped between calls, as FSDP's unshard/reshard does, is not one the layer can own), except in
an ``nn.DataParallel`` replica, whose weight is a copy of the fused one. Layers sharing one base layer
(:class:`spielbench.reference_layer.ReferenceSparseDeltaLinear` built from another) find each other
through a plain attribute on the base layer and unfuse each other before fusing. Fusion is off by itself
for weights the layer cannot own (:func:`fusable_weight`): tensor subclasses (DTensor, ``Params4bit``),
DeepSpeed ZeRO-3 partitions, views into a larger storage (FSDP1 flat parameters) and freed or placeholder
storages. Under FSDP2 (``fully_shard``) the layer fuses into the unsharded Parameter FSDP gathers for each
call, which owns its storage, and never writes the sharded parameter (the sharded DTensor is not
fusable); every call rewrites η from the cached ``W0[η]``, so a re-gathered unsharded weight is right too; :func:`spiel.model.get_spiel_model` also turns it off for a weight another module reads (tied
input embeddings and ``lm_head``). Under ``torch.compile`` the layer's call runs eagerly (a graph break).
A disabled forward under autograd goes through the same function with Δ = 0, so that nothing saved for
its backward aliases the base weight.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn

__all__ = ["FusedWeightMixin", "fusable_weight"]

_HALF_DTYPES = (torch.float16, torch.bfloat16)
_OWNER_ATTR = "_spiel_fused_by"  # on the base layer: the SparseDeltaLinear whose Δ is fused into its weight


class _FusedState:
    """What a fused layer wrote into its base weight (module docstring): the Parameter ``weight`` and its
    version right after the last write, a copy of η (``positions``) and ``W0`` there (``base``), and the η
    tensor (with its version) the positions were taken from. A plain object: never a registered parameter
    or buffer, so parameter names and ``state_dict`` keys do not change."""

    __slots__ = ("weight", "weight_version", "positions", "base", "indices", "indices_version")

    def __getstate__(self):
        return {name: getattr(self, name) for name in self.__slots__}

    def __setstate__(self, state):
        for name, value in state.items():
            setattr(self, name, value)


def fusable_weight(weight: torch.Tensor) -> bool:
    """Whether fusion may write into ``weight``: a plain strided ``nn.Parameter`` (not a subclass such as
    DTensor or bitsandbytes' ``Params4bit``, not a DeepSpeed ZeRO-3 partition) that owns its whole storage
    (not a view into an FSDP flat parameter, not a freed or placeholder storage)."""
    return (type(weight) is nn.Parameter and weight.layout == torch.strided and weight.device.type != "meta"
            and not hasattr(weight, "ds_id") and weight.storage_offset() == 0
            and weight.untyped_storage().nbytes() == weight.numel() * weight.element_size())


class FusedWeightMixin:
    """The fused-weight state and its maintenance for :class:`spiel.layer.SparseDeltaLinear` (module
    docstring). Expects ``base_layer``, ``fuse_delta``, ``merged``, ``is_4bit`` and ``_csr_cache`` on the
    layer and a ``_fused`` attribute initialised to None."""

    @property
    def fused(self) -> bool:
        """True while the base weight holds ``W0 + Δ`` at η (between forwards of a fused layer)."""
        return self._fused is not None

    def fused_cache_bytes(self) -> int:
        """Bytes held for the fused forward: the copy of η and ``W0[η]`` (0 while unfused)."""
        state = self._fused
        if state is None:
            return 0
        return sum(t.numel() * t.element_size() for t in (state.positions, state.base))

    def _can_fuse(self, dtype: torch.dtype) -> bool:
        """Whether the fused base weight gives the compute weight in ``dtype`` bit-exactly (a dense base in
        ``dtype``, or an fp32 base under half-precision autocast: one rounding of the fp32 sum either way)
        and this layer may own the weight's storage (:func:`fusable_weight`: not sharded, subclassed or a view)."""
        if not self.fuse_delta or self.merged or self.is_4bit:
            return False
        weight = self.base_layer.weight
        wdtype = weight.dtype
        return (wdtype == dtype or (wdtype == torch.float32 and dtype in _HALF_DTYPES)) and fusable_weight(weight)

    @torch.no_grad()
    def unfuse(self) -> None:
        """Restore ``W0`` at the fused positions of the base weight (O(k)); no-op while unfused. The next
        fused forward writes ``W0 + Δ`` again. Call before reading ``base_layer.weight`` directly."""
        state = self._valid_fused_state()
        if state is None:
            return
        flat = state.weight.view(-1)
        flat[state.positions] = state.base.to(device=flat.device, dtype=flat.dtype)
        self._forget_fused()

    def refresh(self) -> None:
        """Restore ``W0`` and drop the cached CSR pattern, so the next forward and backward re-read η and Δ.
        Needed only after writing η through ``.data`` (which autograd's version counter, the layer's change
        detection, does not see); every other change is picked up by itself (module docstring)."""
        self.unfuse()
        self._csr_cache = None

    def _forget_fused(self) -> None:
        """Drop the fused state without writing to the base weight."""
        self._fused = None
        if self.base_layer.__dict__.get(_OWNER_ATTR) is self:
            del self.base_layer.__dict__[_OWNER_ATTR]

    def _valid_fused_state(self) -> Optional[_FusedState]:
        """The fused state if the base weight still holds what this layer wrote, else forget it and return
        None. The base weight is taken as a new ``W0`` when it is another Parameter (replaced by other code;
        if the new one is a plain Parameter, fusion is also turned off for this layer, ``fuse_delta = False``,
        as a weight swapped between calls is not one the layer can own; a sharded one, e.g. FSDP2's DTensor
        between calls, is simply not fused) or the same one written by other code since (its version moved:
        ``load_state_dict`` on the base layer alone, a manual edit). A data-parallel replica (``_is_replica``,
        made by ``nn.DataParallel``) holds a copy of the fused weight taken with this state: the state is
        carried over to the copy.

        Replace the base Parameter only while the layer is unfused (after ``unfuse()``, ``state_dict()`` or
        ``.to()``): a copy of a fused weight put in its place would be taken as ``W0`` with Δ inside it."""
        state = self._fused
        if state is None:
            return None
        weight = self.base_layer.weight
        if weight is state.weight:
            if weight._version == state.weight_version:
                return state
        elif getattr(self, "_is_replica", False) and weight.shape == state.weight.shape:
            carried = _FusedState()
            carried.__setstate__(state.__getstate__())
            carried.weight, carried.weight_version = weight, weight._version
            carried.positions, carried.base = state.positions.to(weight.device), state.base.to(weight.device)
            self._fused = carried
            return carried
        if weight is not state.weight and fusable_weight(weight):  # another plain Parameter swapped in by other
            self.fuse_delta = False                                  # code (a wrapper per call, a user)
            warnings.warn("SparseDeltaLinear: the fused base weight was replaced by another Parameter behind the "
                          "layer's back (e.g. FSDP unshard/reshard); fusion is turned off for such layers and the "
                          "new weight is taken as W0", RuntimeWarning, stacklevel=3)
        self._forget_fused()
        return None

    def _release_base(self) -> None:
        """Make the base weight hold ``W0``: unfuse this layer and any other layer fused into the same base
        layer (layers sharing a base, e.g. :class:`spielbench.reference_layer.ReferenceSparseDeltaLinear`
        built from this one), which the base layer names in a plain attribute."""
        self.unfuse()
        other = self.base_layer.__dict__.get(_OWNER_ATTR)
        if other is not None and other is not self:
            other.unfuse()

    @torch.no_grad()
    def _fuse(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Write ``W[η] = W0[η] + Δ`` (fp32 sum, one rounding) into the base weight and return it (O(k)). A
        changed η (another tensor, or its version moved) first restores the old positions and re-takes ``W0``
        at the new ones (O(1) to detect)."""
        weight = self.base_layer.weight
        state = self._valid_fused_state()
        if state is not None and (indices is not state.indices or indices._version != state.indices_version):
            self.unfuse()  # η changed: restore the old positions
            state = None
        if state is None:
            self._release_base()
            with torch.inference_mode(False):  # the cached tensors outlive any inference-mode region
                state = _FusedState()
                state.weight, state.indices, state.indices_version = weight, indices, indices._version
                state.positions = indices.detach().clone()
                state.base = weight.view(-1)[indices]
            self._fused = state
            self.base_layer.__dict__[_OWNER_ATTR] = self
        # Δ is written on every call (O(k)): a version check would miss writes through ``.data`` (gradcheck's
        # perturbations, user code), and the write costs k of the GEMM's out·in·T multiply-adds
        flat = weight.view(-1)
        acc = torch.float64 if flat.dtype == torch.float64 else torch.float32
        flat[state.positions] = (state.base.to(acc) + values.detach().to(acc)).to(flat.dtype)
        state.weight_version = weight._version
        return weight

    def _apply(self, fn, *args, **kwargs):
        self._release_base()  # dtype/device conversions (.to, .half, .cuda) see W0; the next forward fuses again
        return super()._apply(fn, *args, **kwargs)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self._release_base()  # the base layer's entries (saved after this module's own) must hold W0
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        self._release_base()  # W0 goes back before the base layer's entries are overwritten
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
