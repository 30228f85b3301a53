"""``metrics.json``: what one training run recorded (written by ``spielbench.train``; timings from
``spielbench.measure``). Units in the key names (``_s`` seconds, ``_bytes`` bytes); losses nats per token.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from spielbench.records.base import Record


@dataclass(kw_only=True)
class Budget(Record):
    """The trainable-parameter budget of a run (``budget`` of metrics.json)."""

    rank: int | None = None
    requested_density: float | None = None
    trainable_params: int | None = None


@dataclass(kw_only=True)
class TrainingSettings(Record):
    """The training settings a run recorded (``training`` of metrics.json); learning rate as used."""

    seed: int | None = None
    learning_rate: float | None = None
    gradient_checkpointing: bool | None = None


@dataclass(kw_only=True)
class Memory(Record):
    """Peak memory and exact state bytes (``memory`` of metrics.json), in bytes.

    ``trainable_state_bytes`` = trainable parameters + their gradients + optimizer state.
    """

    cuda_max_allocated_bytes: int | None = None
    peak_rss_bytes: int | None = None
    trainable_state_bytes: int | None = None


@dataclass(kw_only=True)
class LossPoint(Record):
    """One logged training loss (nats per target token) at an optimizer step."""

    step: int | None = None
    loss: float | None = None


@dataclass(kw_only=True)
class ReselectionEvent(Record):
    """One drop/grow event of a SpIEL run (docs/METHOD.md §3): rate p(t), indices replaced and active
    (over all matrices), and the fraction of the index set still in the initial one."""

    step: int | None = None
    rate: float | None = None
    num_replaced: int | None = None
    num_active: int | None = None
    overlap_initial: float | None = None


#: ``status`` of a run that stopped on a non-finite training loss (metrics.json, eval.json, the adapter marker).
DIVERGED = "diverged"


@dataclass(kw_only=True)
class Divergence(Record):
    """``adapter/diverged.json``: the marker a diverged run leaves in place of its adapter (written by
    ``spielbench.train --record-divergence``; read by ``spielbench.evaluate``).

    ``step`` is the update step whose training loss was non-finite; ``detail`` the trainer's message.
    """

    VERSION: ClassVar[str] = "spielbench-divergence/1"
    FORMATS: ClassVar[tuple[str, ...]] = (VERSION,)
    FILE: ClassVar[str] = "diverged.json"

    format: str = VERSION
    status: str = DIVERGED
    step: int | None = None
    detail: str | None = None


@dataclass(kw_only=True)
class RunMetrics(Record):
    """One training run's ``metrics.json`` (written by ``spielbench.train``; its timings from ``spielbench.measure``).

    ``device`` is ``measure.device_description``'s object (``{"device", "name", ...}``) or a bare string;
    ``heldout_loss`` is the trainer's own held-out loss after training (nats/token);
    ``selector_history`` is None for methods without reselection. ``status`` is absent (None) for a run that
    trained to the end and :data:`DIVERGED` for one that stopped on a non-finite loss at ``diverged_at_step``
    (its losses, timings and held-out loss after training are then None; ``loss_curve`` ends before it).
    """

    VERSION: ClassVar[str] = "spielbench-metrics/1"
    FORMATS: ClassVar[tuple[str, ...]] = (VERSION,)

    format: str = VERSION
    run_id: str | None = None
    method: str | None = None
    status: str | None = None
    diverged_at_step: int | None = None
    budget: Budget | None = None
    training: TrainingSettings | None = None
    steps: int | None = None
    tokens_seen: int | None = None
    wall_time_s: float | None = None
    step_time_mean_s: float | None = None
    step_time_p50_s: float | None = None
    tokens_per_s: float | None = None
    memory: Memory | None = None
    adapter_bytes: int | None = None
    loss_curve: list[LossPoint] | None = None
    heldout_loss: float | None = None
    selector_history: list[ReselectionEvent] | None = None
    device: Any = None

    @property
    def device_name(self) -> str | None:
        """The device string (``cpu``, ``cuda:0``) whichever form ``device`` has."""
        return self.device.get("device") if isinstance(self.device, dict) else self.device

