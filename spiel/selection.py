"""SpIEL reselection: the drop/grow schedule and the SpIEL-AG and SpIEL-MA growth rules.

The schedule (when phases open and close, p(t)) is :mod:`spiel.schedule`; the top-k kernels of drop and
grow are :mod:`spiel.topk`; this module holds :class:`SpielSelector`, which runs them on a model.

Drop (both algorithms, §3.1): per matrix, the ``n = int(k·p)`` entries with the smallest ``|Δ|``.
Grow, SpIEL-AG (§4): candidates are the top-k ``|dW|`` positions of the first micro-batch of the phase;
later micro-batches add ``dW`` and ``dW²`` at them (sampled, no dense ``dW``). Incoming = top ``|Σ dW|``
candidates not in the kept set; positions both outgoing and incoming stay as they are; outgoing is
truncated to the number of incoming. Grown entries get Δ = 0 and a seeded Adam state (§4.3).
Grow, SpIEL-MA (§5.2): incoming = top ``row[i]·col[j]`` over positions that are inactive before the
drop; Δ = 0; SM3 accumulators untouched.

Differences from the reference, all on purpose (the schedule's own are listed in :mod:`spiel.schedule`):

- §10.2.10: on resume the selector restores the exact phase state from :meth:`SpielSelector.state_dict`
  (open/closed, accumulated candidate gradients).
- §10.2.1: SpIEL-AG accumulates candidate gradients, squared gradients and the sample count in fp32.
- §4.1: only the first backward of a phase through a matrix forms its dense ``dW`` (to choose the
  candidates); the hook then switches the layer to
  :meth:`~spiel.layer.SparseDeltaLinear.sample_weight_grad`, so later micro-batches of the phase get
  ``dW`` at the fixed candidates from the layer's sampled product (the same SDDMM as ``dΔ``) and no
  dense ``dW``. The values equal ``dW[candidates]`` up to the order of fp32 summation. A subclass of
  the layer with its own forward keeps receiving the dense ``dW`` and its candidates are gathered from it.

Under ``torch.distributed`` (initialised when the selector is built) every rank makes the same choice:
the first ``dW`` of a phase is summed over ranks before choosing candidates, and the accumulated sums,
squares and sample counts are summed before selecting (on a process group of the selector's own).
SpIEL-MA needs no communication because its SM3 accumulators see the data-parallel (all-reduced)
gradients. Plain-loop usage is shown in :mod:`spiel.trainer`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.optim import Optimizer

from .layer import SparseDeltaLinear
from .model import unwrap_spiel_model
from .optim import reset_optimizer_entries
from .schedule import POLICIES, next_phase_end, phase_open_after, reselection_rate, reselection_steps
from .topk import choose_ag_growth, drop_slots, isin_distinct, top_inactive_scores, topk_abs_indices

__all__ = [
    "SpielSelector",
    "reselection_rate",
    "reselection_steps",
    "phase_open_after",
    "drop_slots",
    "choose_ag_growth",
    "top_inactive_scores",
    "topk_abs_indices",
]

_AG_NAMES = ("ag", "rigl")
_MA_NAMES = ("ma", "sm3")
_STATE_VERSION = 1


@dataclass
class _Accumulator:
    """SpIEL-AG candidate statistics of one matrix during a selection phase (all fp32, §4.1)."""

    candidates: torch.Tensor  # [c] flat positions, dtype of the layer's indices
    grad_sum: torch.Tensor  # [c] Σ dW at the candidates
    grad_sq_sum: torch.Tensor  # [c] Σ dW²
    samples: int  # hook calls (micro-batches) accumulated on this rank


def _config_of(model: Any) -> Any:
    for attr in ("spiel_config", "peft_config", "config"):
        cfg = getattr(model, attr, None)
        if cfg is not None and hasattr(cfg, "selection_algorithm"):
            return cfg
    raise ValueError("model: expected a SpielModel carrying a SpielConfig (no selection_algorithm found)")


class SpielSelector:
    """Runs the SpIEL drop/grow schedule on a wrapped model (docs/METHOD.md §3–§5).

    Call :meth:`step` after every optimizer update (not after every micro-batch). SpIEL-AG installs a
    ``weight_grad_hook`` on every :class:`~spiel.layer.SparseDeltaLinear` when a selection phase opens;
    the first backward through each layer chooses its candidates from the dense ``dW`` and replaces the
    hook by a ``grad_sample_hook`` at the candidates (:meth:`~spiel.layer.SparseDeltaLinear.sample_weight_grad`)
    for the rest of the phase, so :attr:`phase_open` (not the hooks) tells whether a phase is open.
    SpIEL-MA reads the SM3 row/column accumulators of the optimizer.

    Args:
        model: a ``spiel.SpielModel`` (``sparse_layers()`` → ``[(name, SparseDeltaLinear)]`` and its
            ``SpielConfig``), or a data-parallel wrapper of one (``.module`` is used).
        optimizer: the optimizer of the deltas (:func:`spiel.optim.build_optimizer`). AG seeds grown
            entries through ``optimizer.seed_entries`` (:class:`~spiel.optim.SparseAdamW`) and otherwise
            clears their per-entry state; MA needs ``optimizer.accumulators(values)`` (:class:`~spiel.optim.SM3`).
        total_steps: T, the number of optimizer updates of the run (≥ 1).
        grad_accumulation_steps: micro-batches per update (GA ≥ 1); the seeded Adam age is
            ``samples / (GA · world_size)``.
        config: overrides the model's SpielConfig (needs ``selection_algorithm``, ``reselection_steps``,
            ``selection_accumulation_steps``, ``initial_reselection_rate``, ``reselection_rate_policy``).
        completed_steps: resume point when no selector state is available: the phase state is then
            the one the schedule has at that step (no extra phase). Prefer :meth:`load_state_dict`.
        block_elements: SpIEL-MA block size in scores (see :func:`top_inactive_scores`).
        track_overlap: keep a sorted copy of the initial η (4 bytes per entry for int32 indices) to
            record the overlap of the current index set with it at every reselection.

    Attributes:
        completed_steps: t. phase_open: whether a selection phase is open.
        history: one dict per reselection: ``step``, ``rate`` (p), ``num_requested`` (Σ int(k·p)),
            ``num_replaced`` (Σ indices actually changed), ``replaced`` ({matrix name: count}),
            ``num_active`` (Σ k), ``overlap_initial`` (fraction of active indices also in the initial
            set; None without ``track_overlap``).

    Raises:
        ValueError: bad ``total_steps``/``grad_accumulation_steps``/``completed_steps``; unknown
            algorithm or policy; S < 1; γ outside ``[0, S)``; ζ outside [0, 1]; MA without an
            optimizer exposing SM3 accumulators.
    """

    def __init__(self, model: Any, optimizer: Optimizer, total_steps: int, grad_accumulation_steps: int = 1, *,
                 config: Any = None, completed_steps: int = 0, block_elements: int = 1 << 22,
                 track_overlap: bool = True) -> None:
        model = unwrap_spiel_model(model)
        cfg = config if config is not None else _config_of(model)
        if not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps: expected an integer >= 1, got {total_steps!r}")
        if not isinstance(grad_accumulation_steps, int) or grad_accumulation_steps < 1:
            raise ValueError(f"grad_accumulation_steps: expected an integer >= 1, got {grad_accumulation_steps!r}")
        if not isinstance(completed_steps, int) or completed_steps < 0:
            raise ValueError(f"completed_steps: expected an integer >= 0, got {completed_steps!r}")
        algo = str(cfg.selection_algorithm).lower()
        if algo in _AG_NAMES:
            self.algorithm = "ag"
        elif algo in _MA_NAMES:
            self.algorithm = "ma"
        else:
            raise ValueError(f"selection_algorithm: expected one of 'ag', 'rigl', 'ma', 'sm3', got {algo!r}")
        self.policy = str(cfg.reselection_rate_policy).lower()
        if self.policy not in POLICIES:
            raise ValueError(f"reselection_rate_policy: expected one of {POLICIES}, got {self.policy!r}")
        self.period = int(cfg.reselection_steps)
        self.accumulation_steps = int(cfg.selection_accumulation_steps)
        self.initial_rate = float(cfg.initial_reselection_rate)
        if self.period < 1:
            raise ValueError(f"reselection_steps: expected an integer >= 1, got {self.period}")
        if not 0 <= self.accumulation_steps < self.period:
            raise ValueError(f"selection_accumulation_steps: expected an integer in [0, reselection_steps="
                             f"{self.period}), got {self.accumulation_steps}")
        if not 0.0 <= self.initial_rate <= 1.0:
            raise ValueError(f"initial_reselection_rate: expected a number in [0, 1], got {self.initial_rate}")
        if self.algorithm == "ma" and self.policy != "none" and not callable(getattr(optimizer, "accumulators", None)):
            raise ValueError("optimizer: SpIEL-MA needs SM3 row/column accumulators (use spiel.optim.SM3 "
                             "or build_optimizer with selection_algorithm='ma')")

        self.model = model
        self.optimizer = optimizer
        self.total_steps = total_steps
        self.grad_accumulation_steps = grad_accumulation_steps
        self.block_elements = int(block_elements)
        self.layers: list[tuple[str, Any]] = list(model.sparse_layers())
        if not self.layers:
            raise ValueError("model: no SparseDeltaLinear layers to select for")
        self.completed_steps = completed_steps
        self.phase_open = False
        self.history: list[dict[str, Any]] = []
        self._acc: dict[str, _Accumulator] = {}
        self._group = None
        self._world_size = 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # A group of our own, so that collectives issued inside backward hooks never interleave
            # with the data-parallel wrapper's gradient all-reduces on the default group.
            self._group = torch.distributed.new_group()
            self._world_size = torch.distributed.get_world_size()
        self.initial_step = completed_steps
        self._initial: dict[str, torch.Tensor] | None = None
        if track_overlap:
            self._initial = {name: torch.sort(layer.indices.detach().clone()).values for name, layer in self.layers}
        if self.policy != "none" and phase_open_after(completed_steps, total_steps, self.period,
                                                      self.accumulation_steps):
            self._begin_phase()

    # ------------------------------------------------------------------------------- schedule
    def step(self) -> None:
        """Advance by one completed optimizer update; open/close selection phases and reselect (§3)."""
        self.completed_steps += 1
        if self.policy == "none":
            return
        t = self.completed_steps
        if t % self.period == self.accumulation_steps:
            self._end_phase()
        if (t + 1) % self.period == 0 and next_phase_end(t, self.period, self.accumulation_steps) <= self.total_steps:
            self._begin_phase()

    def current_rate(self) -> float:
        """p(t) at the current ``completed_steps`` (what a reselection now would use)."""
        return reselection_rate(self.completed_steps, self.total_steps, self.initial_rate, self.policy,
                                self.accumulation_steps)

    def _begin_phase(self) -> None:
        self._remove_hooks()
        self._acc = {}
        self.phase_open = True
        if self.algorithm == "ag":
            for name, layer in self.layers:
                layer.weight_grad_hook = self._make_hook(name, layer)

    def _remove_hooks(self) -> None:
        for _, layer in self.layers:
            if getattr(layer.weight_grad_hook, "_spiel_selector", None) is self:
                layer.weight_grad_hook = None
            if getattr(getattr(layer, "grad_sample_hook", None), "_spiel_selector", None) is self:
                layer.sample_weight_grad(None, None)

    def close(self) -> None:
        """End any open phase without selecting and remove this selector's gradient hooks."""
        self._remove_hooks()
        self._acc = {}
        self.phase_open = False

    def _end_phase(self) -> None:
        self._remove_hooks()
        self.phase_open = False
        t = self.completed_steps
        if t <= self.total_steps:
            self.reselect(self.current_rate())
        self._acc = {}

    # ------------------------------------------------------------------------------- AG hooks
    def _make_hook(self, name: str, layer: Any):
        """The dense ``weight_grad_hook`` of a phase: receives ``dW [out, in]`` (fp32)."""
        def hook(dense_grad: torch.Tensor) -> None:
            with torch.no_grad():
                self._accumulate(name, layer, dense_grad)

        hook._spiel_selector = self  # type: ignore[attr-defined]
        return hook

    def _make_sample_hook(self, name: str):
        """The ``grad_sample_hook`` of a phase: receives ``dW`` at the candidates (fp32 ``[c]``)."""
        def hook(candidate_grad: torch.Tensor) -> None:
            with torch.no_grad():
                self._add_sample(self._acc[name], candidate_grad)

        hook._spiel_selector = self  # type: ignore[attr-defined]
        return hook

    @staticmethod
    def _add_sample(acc: _Accumulator, candidate_grad: torch.Tensor) -> None:
        g = candidate_grad.float()
        acc.grad_sum.add_(g)
        acc.grad_sq_sum.addcmul_(g, g)
        acc.samples += 1

    def _accumulate(self, name: str, layer: Any, dense_grad: torch.Tensor) -> None:
        """First dense ``dW`` of the phase for this matrix: choose the candidates (top-k ``|dW|``, summed
        over ranks first), start the sums, and switch the layer to sampled candidate gradients. A dense
        ``dW`` arriving after that (a layer that cannot sample) is gathered at the candidates."""
        flat = dense_grad.detach().reshape(-1)
        acc = self._acc.get(name)
        if acc is not None:
            self._add_sample(acc, flat.index_select(0, acc.candidates))
            return
        first = flat.float()
        if self._group is not None:
            first = first.clone()  # the layer still gathers dΔ from dense_grad after the hook
            torch.distributed.all_reduce(first, group=self._group)
        k = min(layer.values.numel(), first.numel())
        cand = topk_abs_indices(first, k)
        del first
        g = flat.index_select(0, cand).float()
        self._acc[name] = _Accumulator(cand.to(layer.indices.dtype), g.clone(), g * g, 1)
        self._use_sampled(name, layer)

    def _use_sampled(self, name: str, layer: Any) -> None:
        """Stop the dense hook of ``layer`` and ask it for ``dW`` at its fixed candidates instead (§4.1).

        Only for layers whose forward is :class:`~spiel.layer.SparseDeltaLinear`'s own (its backward
        honours ``sample_weight_grad``). A subclass with its own forward (e.g. the benchmark's
        reference-style layer, which forms a dense ``dW`` in every backward anyway) keeps the dense
        hook, and its candidates are gathered from that ``dW`` in every backward, as the reference does."""
        if not (isinstance(layer, SparseDeltaLinear) and type(layer).forward is SparseDeltaLinear.forward):
            return
        if getattr(layer.weight_grad_hook, "_spiel_selector", None) is self:
            layer.weight_grad_hook = None
        layer.sample_weight_grad(self._acc[name].candidates, self._make_sample_hook(name))

    def _reduced_accumulators(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]]:
        """Per layer ``(candidates, grad_sum, grad_sq_sum, samples)`` summed over ranks."""
        names = [name for name, _ in self.layers]
        local = torch.tensor([float(self._acc[n].samples) if n in self._acc else 0.0 for n in names],
                             dtype=torch.float64)
        if self._group is not None:
            lowest = local.clone()
            torch.distributed.all_reduce(local, group=self._group)
            torch.distributed.all_reduce(lowest, op=torch.distributed.ReduceOp.MIN, group=self._group)
            missing = [n for n, lo, tot in zip(names, lowest.tolist(), local.tolist()) if lo == 0 < tot]
            if missing:
                raise RuntimeError(f"SpIEL-AG selection: ranks disagree on gradient samples for {missing[:3]} "
                                   "(some rank ran no backward through them in this phase)")
        out = {}
        for name, total in zip(names, local.tolist()):
            if total == 0:
                continue
            acc = self._acc[name]
            sums = torch.stack([acc.grad_sum, acc.grad_sq_sum])
            if self._group is not None:
                torch.distributed.all_reduce(sums, group=self._group)
            out[name] = (acc.candidates, sums[0], sums[1], total)
        return out

    # ------------------------------------------------------------------------------- selection
    @torch.no_grad()
    def reselect(self, rate: float) -> dict[str, Any]:
        """Drop the ``int(k·rate)`` smallest ``|Δ|`` of every matrix and grow as many new entries by the
        selector's algorithm (AG: accumulated gradients of the current phase; MA: SM3 scores).

        Returns the history record (also appended to :attr:`history`). Raises RuntimeError if a
        layer is merged (unmerge before training).
        """
        for name, layer in self.layers:
            if getattr(layer, "merged", False):
                raise RuntimeError(f"reselection: layer {name!r} is merged; unmerge before training")
        reduced = self._reduced_accumulators() if self.algorithm == "ag" else {}
        replaced: dict[str, int] = {}
        requested = 0
        for name, layer in self.layers:
            values = layer.values
            n = int(values.numel() * rate)
            requested += n
            outgoing = drop_slots(values, n)
            if self.algorithm == "ag":
                slots, new_indices = self._grow_ag(name, layer, outgoing, reduced.get(name))
            else:
                slots, new_indices = self._grow_ma(layer, outgoing)
            replaced[name] = int(slots.numel())
            values.grad = None
        record = {
            "step": self.completed_steps,
            "rate": float(rate),
            "num_requested": requested,
            "num_replaced": sum(replaced.values()),
            "num_active": sum(layer.values.numel() for _, layer in self.layers),
            "replaced": replaced,
            "overlap_initial": self.overlap_with_initial(),
        }
        self.history.append(record)
        return record

    def _grow_ag(self, name, layer, outgoing, stats):
        if stats is None or outgoing.numel() == 0:
            empty = torch.empty(0, dtype=torch.int64, device=outgoing.device)
            return empty, empty
        candidates, grad_sum, grad_sq_sum, samples = stats
        slots, chosen = choose_ag_growth(layer.indices, outgoing, candidates, grad_sum.abs())
        if slots.numel() == 0:
            return slots, chosen
        new_indices = candidates.index_select(0, chosen)
        layer.replace_entries(slots, new_indices)
        seed = getattr(self.optimizer, "seed_entries", None)
        if callable(seed):
            age = samples / (self.grad_accumulation_steps * self._world_size)
            seed(layer.values, slots, grad_sum.index_select(0, chosen) / samples,
                 grad_sq_sum.index_select(0, chosen) / samples, age)
        else:
            reset_optimizer_entries(self.optimizer, layer.values, slots)
        return slots, new_indices

    def _grow_ma(self, layer, outgoing):
        if outgoing.numel() == 0:
            return outgoing, outgoing
        row, col = self.optimizer.accumulators(layer.values)
        incoming, _ = top_inactive_scores(row, col, layer.indices, outgoing.numel(), self.block_elements)
        slots = outgoing[: incoming.numel()]
        layer.replace_entries(slots, incoming)
        reset_optimizer_entries(self.optimizer, layer.values, slots)
        return slots, incoming

    def overlap_with_initial(self) -> float | None:
        """Fraction of all active indices that were also in the initial index set (None if untracked)."""
        if self._initial is None:
            return None
        same = sum(int(isin_distinct(layer.indices, self._initial[name].to(layer.indices.dtype)).sum())
                   for name, layer in self.layers)
        return same / sum(layer.values.numel() for _, layer in self.layers)

    # ------------------------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: ``completed_steps``, ``phase_open``, the AG accumulators
        of an open phase (``{name: {candidates, grad_sum, grad_sq_sum, samples}}``), ``history``, the
        initial index sets (sorted) and the schedule settings (informational). Tensors are copies;
        the dict is loadable with ``torch.load(..., weights_only=True)``."""
        return {
            "version": _STATE_VERSION,
            "completed_steps": self.completed_steps,
            "phase_open": self.phase_open,
            "initial_step": self.initial_step,
            "accumulators": {
                name: {"candidates": a.candidates.clone(), "grad_sum": a.grad_sum.clone(),
                       "grad_sq_sum": a.grad_sq_sum.clone(), "samples": a.samples}
                for name, a in self._acc.items()
            },
            "history": [dict(r, replaced=dict(r["replaced"])) for r in self.history],
            "initial_indices": None if self._initial is None else {n: t.clone() for n, t in self._initial.items()},
            "schedule": {"algorithm": self.algorithm, "policy": self.policy, "reselection_steps": self.period,
                         "selection_accumulation_steps": self.accumulation_steps,
                         "initial_reselection_rate": self.initial_rate, "total_steps": self.total_steps,
                         "grad_accumulation_steps": self.grad_accumulation_steps},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output: the step counter, the exact phase state (hooks installed
        iff the phase was open, accumulators restored onto the layers' device, and layers with restored
        candidates asked for sampled candidate gradients directly) and the history. No extra phase is
        started.

        Raises ValueError if the state is not a selector state or names matrices this model lacks.
        """
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise ValueError(f"selector state: expected a dict with version {_STATE_VERSION}")
        saved_algorithm = (state.get("schedule") or {}).get("algorithm")
        if saved_algorithm is not None and saved_algorithm != self.algorithm:
            raise ValueError(f"selector state: saved by a SpIEL-{saved_algorithm.upper()} run, this selector is "
                             f"SpIEL-{self.algorithm.upper()}; resume with the selection_algorithm the checkpoint was "
                             "trained with")
        names = {name for name, _ in self.layers}
        unknown = set(state["accumulators"]) - names
        if state.get("initial_indices") is not None:
            unknown |= set(state["initial_indices"]) - names
        if unknown:
            raise ValueError(f"selector state: matrices not in this model: {sorted(unknown)[:5]}")
        self.close()
        self.completed_steps = int(state["completed_steps"])
        self.initial_step = int(state.get("initial_step", 0))
        self.history = [dict(r, replaced=dict(r["replaced"])) for r in state["history"]]
        if state.get("initial_indices") is not None:
            self._initial = {n: t.clone() for n, t in state["initial_indices"].items()}
        if state["phase_open"]:
            self._begin_phase()
            for name, layer in self.layers:
                a = state["accumulators"].get(name)
                if a is None:
                    continue
                device = layer.indices.device
                self._acc[name] = _Accumulator(a["candidates"].to(device=device, dtype=layer.indices.dtype).clone(),
                                               a["grad_sum"].to(device=device, dtype=torch.float32).clone(),
                                               a["grad_sq_sum"].to(device=device, dtype=torch.float32).clone(),
                                               int(a["samples"]))
                self._use_sampled(name, layer)  # candidates known: no dense dW needed
